"""Storage features against moto's S3 server over HTTP (through a request-logging proxy): the per-process rate
limit, adaptive slow-down on throttling, the bounded disk cache, missing shards, prefetch that keeps the stream."""

from __future__ import annotations

import json
import time

import boto3
import pytest
import torch

from config import DataConfig, load_config
from data.loader import StageLoader
from data.samples import ShardSource
from model.registry import FLAVORS
from storage import LocalStorage, S3Options, S3Storage
from storage.cache import CachedStorage, DiskCache
from tests.integration.fault_proxy import FaultProxy
from tests.integration.test_s3_loader import BUCKET, s3_corpus  # noqa: F401  (the module-scoped S3 server)
from tests.unit.test_loader import FOREGROUND


def upstream(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def through(proxy: FaultProxy, prefix: str = "corpus", **options) -> S3Storage:
    return S3Storage(f"s3://{BUCKET}/{prefix}", S3Options(endpoint_url=f"http://127.0.0.1:{proxy.port}",
                                                          backoff_base_s=0.001, **options))


def test_rate_limit_bounds_the_requests_in_every_window(s3_corpus):  # noqa: F811
    rate, burst, count = 25.0, 2, 14
    with FaultProxy(upstream(s3_corpus), ["ok"]) as proxy:
        storage = through(proxy, requests_per_second=rate, request_burst=burst)
        start = time.monotonic()
        for i in range(count):
            storage.read_range("caption/shard-000000.tar", 512 * i, 100)
        elapsed = time.monotonic() - start
        arrivals = proxy.object_gets()
    assert len(arrivals) == count
    # The limiter sleeps until each token is due, so this lower bound holds however slow the machine is.
    assert elapsed >= (count - burst) / rate
    # Seen by the server: no window holds more than burst + rate * width (one request of slack for arrival
    # jitter between the grant and the proxy). Unlimited, these requests arrive within a few milliseconds.
    for i in range(count):
        for j in range(i + 1, count):
            assert j - i + 1 <= burst + rate * (arrivals[j] - arrivals[i]) + 1, (i, j, arrivals[j] - arrivals[i])


def test_throttling_halves_the_rate_then_it_recovers(s3_corpus):  # noqa: F811
    with FaultProxy(upstream(s3_corpus), ["503", "503"] + ["ok"] * 100) as proxy:
        storage = through(proxy, requests_per_second=1000.0, request_burst=50)
        data = storage.read_range("caption/shard-000000.tar", 0, 100)
        assert len(data) == 100
        # Two SlowDowns halve the rate twice (1000 -> 250), the success adds a twentieth back.
        assert storage.bucket_limit.rate == pytest.approx(300.0)
        for _ in range(30):
            storage.read_range("caption/shard-000000.tar", 0, 10)
        assert storage.bucket_limit.rate == 1000.0
    assert proxy.injected["503"] >= 2


def read_all(source: ShardSource) -> dict[str, dict[str, bytes]]:
    return {sample.key: sample.members for sample in map(source.read, range(len(source)))}


def test_cache_second_pass_issues_no_request_and_stays_bounded(s3_corpus, demo_root, tmp_path):  # noqa: F811
    manifest = json.loads((demo_root / "manifest.json").read_text())
    shards = manifest["sources"]["caption"]["shards"]
    reference = read_all(ShardSource("caption", LocalStorage(demo_root), shards))
    with FaultProxy(upstream(s3_corpus), ["ok"]) as proxy:
        first = read_all(ShardSource("caption", CachedStorage(through(proxy), DiskCache(tmp_path / "c", 2**30)),
                                     shards))
        before = len(proxy.requests)
        # A new storage and cache object on the same folder: as another process (or the next epoch) sees it.
        second = read_all(ShardSource("caption", CachedStorage(through(proxy), DiskCache(tmp_path / "c", 2**30)),
                                      shards))
        assert before > 0 and len(proxy.requests) == before
    assert first == second == reference

    # Indexed lazily (sidecars), random access: each shard and sidecar is fetched once, then a pass is free.
    entry = manifest["sources"]["caption"]
    with FaultProxy(upstream(s3_corpus), ["ok"]) as proxy:
        for attempt in range(2):
            lazy = ShardSource("caption", CachedStorage(through(proxy), DiskCache(tmp_path / "lazy", 2**30)),
                               shards, shard_samples=entry["shard_samples"], index_suffix=entry["index_suffix"])
            assert {sample.key: sample.members for sample in map(lazy.read, range(len(lazy) - 1, -1, -3))} == {
                key: members for i, (key, members) in enumerate(reference.items()) if (len(lazy) - 1 - i) % 3 == 0}
            if attempt == 0:
                assert len(proxy.object_gets()) == 2 * len(shards)
        assert len(proxy.object_gets()) == 2 * len(shards)

    sizes = [(demo_root / shard).stat().st_size for shard in manifest["sources"]["ocr"]["shards"]]
    sizes += [(demo_root / shard).stat().st_size for shard in shards]
    bound = max(sizes)  # room for any one shard, never two
    small = DiskCache(tmp_path / "small", bound)
    with FaultProxy(upstream(s3_corpus), ["ok"]) as proxy:
        storage = CachedStorage(through(proxy), small)
        for shard in [*manifest["sources"]["ocr"]["shards"], *shards]:
            assert storage.read(shard) == (demo_root / shard).read_bytes()
            assert small.total_bytes() <= bound
        # The most recently read shard is served from disk, an evicted one from the server.
        before = len(proxy.object_gets())
        assert storage.read_range(shards[-1], 0, 64) == (demo_root / shards[-1]).read_bytes()[:64]
        assert len(proxy.object_gets()) == before
        assert storage.read_range(shards[0], 0, 64) == (demo_root / shards[0]).read_bytes()[:64]
        assert len(proxy.object_gets()) == before + 1


@pytest.fixture(scope="module")
def broken_corpus(s3_corpus, demo_root):  # noqa: F811
    """s3://kimi-demo/broken-{lazy,eager}: the demo corpus whose grounding source lists a shard that was never
    uploaded, with shard counts in the manifest (indexed shard by shard on first use) and without (all at once)."""
    client = boto3.client("s3", endpoint_url=s3_corpus, region_name="us-east-1")
    local = LocalStorage(demo_root)
    for mode in ("lazy", "eager"):
        manifest = json.loads((demo_root / "manifest.json").read_text())
        grounding = manifest["sources"]["grounding"]
        grounding["shards"].append("grounding/shard-000099.tar")
        grounding["shard_samples"].append(100)
        if mode == "eager":
            del grounding["shard_samples"]
        for key in local.list():
            body = json.dumps(manifest).encode() if key == "manifest.json" else local.read(key)
            client.put_object(Bucket=BUCKET, Key=f"broken-{mode}/{key}", Body=body)
    return f"s3://{BUCKET}/broken"


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_a_missing_shard_fails_by_name_or_is_skipped_and_counted(s3_corpus, broken_corpus, tokenizer,  # noqa: F811
                                                                 mode):
    storage = S3Storage(f"{broken_corpus}-{mode}", S3Options(endpoint_url=s3_corpus, max_attempts=2))
    stage = load_config(["recipe=debug"]).curriculum.stages["vit_coca"]
    vision = FLAVORS["debug"].vision
    strict = StageLoader("vit_coca", stage, FOREGROUND, storage, tokenizer, vision, 0, (0, 1))
    with pytest.raises(FileNotFoundError, match="grounding/shard-000099.tar"):
        for _ in range(10):  # lazily, the shard is looked for when a draw first lands in it
            strict.next_image_text_batch(0.0)
    data = DataConfig(skip_missing_shards=True, prefetch_samples=0, max_corrupt_fraction=1.0)
    lenient = StageLoader("vit_coca", stage, data, storage, tokenizer, vision, 0, (0, 1))
    for _ in range(4):
        batch = lenient.next_image_text_batch(0.0)
        assert batch.text_ids.shape[0] == stage.micro_batch_size
    assert lenient.missing_shards == ["grounding/shard-000099.tar"]
    # Eagerly its samples are left out; lazily its draws are skipped and counted like corrupt samples.
    assert (lenient.corrupt > 0) == (mode == "lazy")


def test_prefetch_over_a_slow_flaky_server_keeps_the_stream(s3_corpus, demo_root, tokenizer):  # noqa: F811
    stage = load_config(["recipe=debug"]).curriculum.stages["joint_cooldown"]
    vision = FLAVORS["debug"].vision
    local = StageLoader("joint_cooldown", stage, FOREGROUND, LocalStorage(demo_root), tokenizer, vision, 0, (0, 1))
    with FaultProxy(upstream(s3_corpus), ["ok", "slow", "ok", "503", "slow", "reset", "ok"], 0.02) as proxy:
        data = DataConfig(prefetch_samples=6, prefetch_threads=4)
        fetched = StageLoader("joint_cooldown", stage, data, through(proxy, max_attempts=10), tokenizer, vision, 0,
                              (0, 1))
        for step in range(4):
            a, b = fetched.next_packed_batch(step / 4), local.next_packed_batch(step / 4)
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
        assert fetched.prefetcher.hits > 0
        fetched.close()


def test_a_closed_loaders_reads_ahead_stop_retrying(s3_corpus, tokenizer):  # noqa: F811
    """Reads ahead still running when their loader closes, against a server that now fails every request, give up
    at once instead of retrying with backoff (here up to 8 attempts, ~10 s) and holding up the interpreter's exit."""
    stage = load_config(["recipe=debug"]).curriculum.stages["vit_coca"]
    vision = FLAVORS["debug"].vision
    with FaultProxy(upstream(s3_corpus), ["ok"]) as proxy:
        storage = S3Storage(f"s3://{BUCKET}/corpus", S3Options(endpoint_url=f"http://127.0.0.1:{proxy.port}",
                                                               backoff_base_s=0.5, max_attempts=8))
        data = DataConfig(prefetch_samples=4, prefetch_threads=2)
        loader = StageLoader("vit_coca", stage, data, storage, tokenizer, vision, 0, (0, 1))
        loader.next_image_text_batch(0.0)  # manifest and shard indexes read; reads ahead under way
        loader.settle()
        proxy.schedule = iter(lambda: "503", None)  # the server is down from now on
        prefetcher = loader.prefetcher
        prefetcher.want(key for stream in loader.slots for key in loader.planner.plan(stream, 0.0, 12)[0][8:])
        time.sleep(0.3)  # the new reads have failed once and wait to retry
        failing = len(proxy.requests)
        start = time.monotonic()
        loader.close()
        prefetcher.pool.shutdown(wait=True)
        assert time.monotonic() - start < 2.0
        assert len(proxy.requests) - failing <= 2  # at most the attempts already on the wire
