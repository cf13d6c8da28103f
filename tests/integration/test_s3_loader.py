"""The data system over S3: boto3 against a real S3 HTTP server on 127.0.0.1 (moto's), same stream as local files."""

from __future__ import annotations

import socket

import boto3
import pytest
import torch

from config import load_config
from data.loader import StageLoader
from storage import LocalStorage, S3Options, S3Storage
from tests.unit.test_loader import FOREGROUND, VISION
from train.__main__ import main

BUCKET = "kimi-demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_corpus(demo_root):
    """The demo corpus uploaded to a moto S3 server under s3://kimi-demo/corpus."""
    from moto.server import ThreadedMotoServer

    monkey = pytest.MonkeyPatch()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkey.setenv(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    local = LocalStorage(demo_root)
    for key in local.list():
        client.put_object(Bucket=BUCKET, Key=f"corpus/{key}", Body=local.read(key))
    yield endpoint
    server.stop()
    monkey.undo()


def test_s3_stream_equals_the_local_stream(s3_corpus, demo_root, tokenizer):
    storage = S3Storage(f"s3://{BUCKET}/corpus", S3Options(endpoint_url=s3_corpus))
    stages = load_config(["recipe=debug"]).curriculum.stages
    for name, next_batch in (("joint_pretrain", "next_packed_batch"), ("vit_coca", "next_image_text_batch")):
        over_s3 = StageLoader(name, stages[name], FOREGROUND, storage, tokenizer, VISION, 0, (0, 1))
        local = StageLoader(name, stages[name], FOREGROUND, LocalStorage(demo_root), tokenizer, VISION, 0, (0, 1))
        for step in range(3):
            a, b = getattr(over_s3, next_batch)(step / 3), getattr(local, next_batch)(step / 3)
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


def test_ranged_reads_and_missing_keys(s3_corpus, demo_root):
    storage = S3Storage(f"s3://{BUCKET}/corpus", S3Options(endpoint_url=s3_corpus, max_attempts=2))
    local = LocalStorage(demo_root)
    key = "caption/shard-000000.tar"
    assert storage.size(key) == local.size(key)
    assert storage.read_range(key, 1000, 5000) == local.read_range(key, 1000, 5000)
    assert storage.read_range(key, storage.size(key) - 10, 100) == local.read_range(key, local.size(key) - 10, 100)
    assert set(storage.list("caption/")) == set(local.list("caption/"))
    with pytest.raises(FileNotFoundError, match="caption/shard-999999.tar"):
        storage.read("caption/shard-999999.tar")
    assert not storage.exists("nothing-here")


def test_the_trainer_reads_its_data_from_s3(s3_corpus, tmp_path):
    args = ["recipe=debug", f"output_dir={tmp_path}", "run_name=s3", f"data.root=s3://{BUCKET}/corpus",
            f"data.endpoint_url={s3_corpus}", "log.progress_bar=false", "curriculum.order=[vit_coca,vit_align]",
            "curriculum.stages.vit_coca.steps=2", "curriculum.stages.vit_align.steps=2",
            "curriculum.stages.vit_coca.lr.warmup_steps=1", "curriculum.stages.vit_align.lr.warmup_steps=1"]
    assert main(args) == 0
    assert (tmp_path / "s3" / "summary.json").exists()


def test_every_sample_arrives_exactly_once_through_storage_faults(s3_corpus, demo_root):
    """503 SlowDown, 500, connection resets, truncated bodies and latency between boto3 and the server: every
    member of every sample of two sources reads back byte-identical to the local shards."""
    from data.samples import ShardSource
    from tests.integration.fault_proxy import FaultProxy

    upstream = int(s3_corpus.rsplit(":", 1)[1])
    schedule = ["ok", "503", "ok", "truncate", "ok", "500", "ok", "reset", "slow", "ok"]
    with FaultProxy(upstream, schedule) as proxy:
        options = S3Options(endpoint_url=f"http://127.0.0.1:{proxy.port}", backoff_base_s=0.001, max_attempts=10)
        storage = S3Storage(f"s3://{BUCKET}/corpus", options)
        local = LocalStorage(demo_root)
        manifest = __import__("json").loads(local.read("manifest.json"))
        for name in ("grounding", "dialogue"):
            over_s3 = ShardSource(name, storage, manifest["sources"][name]["shards"])
            reference = ShardSource(name, local, manifest["sources"][name]["shards"])
            assert len(over_s3) == len(reference) == manifest["sources"][name]["num_samples"]
            for position in range(len(reference)):
                a, b = over_s3.read(position), reference.read(position)
                assert a.key == b.key and a.members == b.members
    assert all(proxy.injected.get(fault, 0) > 0 for fault in ("503", "500", "truncate", "reset", "slow"))


def test_credentials_never_reach_logs_configs_metrics_or_caches(s3_corpus, tmp_path, monkeypatch, capfd, caplog):
    """A run reading S3 with distinctive AWS credentials, logging to W&B (offline) with a distinctive API key and
    caching shards on disk: no file it writes and nothing it prints contains either secret."""
    secrets = {"AWS_ACCESS_KEY_ID": "AKIDSECRETPROBE4242", "AWS_SECRET_ACCESS_KEY": "s3cr3t-probe-value-4242",
               "WANDB_API_KEY": "wandb-probe-key-0123456789abcdef0123456789abcdef"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "outputs"
    args = ["recipe=debug", f"output_dir={out}", "run_name=creds", f"data.root=s3://{BUCKET}/corpus",
            f"data.endpoint_url={s3_corpus}", f"data.cache_dir={tmp_path / 'cache'}", "log.progress_bar=false",
            "log.wandb=true", "curriculum.order=[vit_coca]", "curriculum.stages.vit_coca.steps=2",
            "curriculum.stages.vit_coca.lr.warmup_steps=1"]
    assert main(args) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in written) and any("wandb" in p.parts for p in written)
    assert any((tmp_path / "cache").rglob("*.obj"))  # shards were cached (and are scanned below)
    printed = capfd.readouterr()
    texts = {"stdout": printed.out, "stderr": printed.err, "log": caplog.text}
    for secret in secrets.values():
        for path in written:
            assert secret.encode() not in path.read_bytes(), f"{secret} leaked into {path}"
        for where, text in texts.items():
            assert secret not in text, f"{secret} leaked into {where}"
