"""Shard indexing: lazily from the manifest's counts and the sidecar indexes (no shard read up front) gives the
same samples in the same positions as reading every shard; wrong counts are named."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from data.shards import INDEX_SUFFIX, ShardSource
from storage import LocalStorage


class CountingStorage(LocalStorage):
    """A local folder that records what was read (whole objects and ranges)."""

    def __init__(self, root):
        super().__init__(root)
        self.reads: list[str] = []

    def read(self, key: str) -> bytes:
        self.reads.append(key)
        return super().read(key)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        self.reads.append(f"{key}[{start}:{start + length}]")
        return super().read_range(key, start, length)


@pytest.mark.parametrize("source", ["caption", "video"])
def test_lazy_index_equals_the_eager_one_and_reads_only_what_is_drawn(demo_root, source):
    entry = json.loads((demo_root / "manifest.json").read_text())["sources"][source]
    eager = ShardSource(source, LocalStorage(demo_root), entry["shards"])
    storage = CountingStorage(demo_root)
    lazy = ShardSource(source, storage, entry["shards"], shard_samples=entry["shard_samples"],
                       index_suffix=entry["index_suffix"])
    assert len(lazy) == len(eager) == entry["num_samples"] and storage.reads == []
    last = len(lazy) - 1
    first = lazy.read(last)
    # One small sidecar, no shard read whole, and one ranged read for all the sample's members (video: 3-6 frames).
    assert storage.reads[0] == entry["shards"][-1] + INDEX_SUFFIX and len(storage.reads) == 2
    assert len(first.members) >= (4 if source == "video" else 2)
    assert first.key == eager.read(last).key and first.members == eager.read(last).members
    for position in range(0, len(lazy), 7):
        a, b = lazy.read(position), eager.read(position)
        assert (a.key, a.members, lazy.locate(position)) == (b.key, b.members, eager.locate(position))


def test_without_sidecars_a_shard_is_read_once_and_wrong_counts_are_named(demo_root, tmp_path):
    entry = json.loads((demo_root / "manifest.json").read_text())["sources"]["caption"]
    storage = CountingStorage(demo_root)
    lazy = ShardSource("caption", storage, entry["shards"], shard_samples=entry["shard_samples"])
    keys = {lazy.read(position).key for position in range(5)}
    assert len(keys) == 5 and [r for r in storage.reads if "[" not in r] == [entry["shards"][0]]
    wrong = ShardSource("caption", LocalStorage(demo_root), entry["shards"],
                        shard_samples=[n + 1 for n in entry["shard_samples"]], index_suffix=INDEX_SUFFIX)
    with pytest.raises(ValueError, match="shard-000000.tar holds"):
        wrong.read(0)


class SlowIndexStorage(LocalStorage):
    """A local folder whose shard indexes take a while to read (a round trip to S3), recording how many were being
    read at once."""

    def __init__(self, root):
        super().__init__(root)
        self.lock = threading.Lock()
        self.reading = self.most_at_once = 0
        self.index_reads: list[str] = []

    def read(self, key: str) -> bytes:
        if not key.endswith(INDEX_SUFFIX):
            return super().read(key)
        with self.lock:
            self.reading += 1
            self.most_at_once = max(self.most_at_once, self.reading)
            self.index_reads.append(key)
        try:
            time.sleep(0.05)
            return super().read(key)
        finally:
            with self.lock:
                self.reading -= 1


@pytest.mark.parametrize("threads", [0, 1])
def test_draws_landing_in_new_shards_read_their_indexes_at_once(demo_root, tokenizer, threads):
    """A start's first draws land in shards not indexed yet: a worker request (threads=0: SampleReader.read_many) or
    the read-ahead thread's plan (threads=1) reads all their indexes at once, each once, and the batch is the one a
    loader reading one draw after another gives."""
    from config import DataConfig
    from data.loader import StageLoader
    from tests.unit.test_loader import FOREGROUND, VISION, stage_of

    stage = stage_of("vit_coca", micro_batch_size=16)
    reference = StageLoader("vit_coca", stage, FOREGROUND, LocalStorage(demo_root), tokenizer, VISION, 0,
                            (0, 1)).next_image_text_batch(0.0)
    storage = SlowIndexStorage(demo_root)
    data = DataConfig(prefetch_samples=4 if threads else 0, prefetch_threads=max(threads, 1))
    loader = StageLoader("vit_coca", stage, data, storage, tokenizer, VISION, 0, (0, 1))
    try:
        if threads:
            batch = loader.next_image_text_batch(0.0)
        else:
            keys = [loader.planner.plan(slot, 0.0, 1)[0][0] for slot in loader.slots]
            pairs = loader.reader.sample_reader.read_many(keys)
            assert storage.most_at_once > 1 and len(storage.index_reads) == len(set(storage.index_reads)) > 1
            batch = loader.next_image_text_batch(0.0)  # the same draws, read again from the indexes loaded
    finally:
        loader.close()
    assert storage.most_at_once > 1 and len(storage.index_reads) == len(set(storage.index_reads)) > 1
    for name in ("pixel_values", "image_grid_hw", "text_ids", "text_mask"):
        assert torch.equal(getattr(batch, name), getattr(reference, name)), name
    if not threads:
        assert [ids for _, ids in pairs] == [row[mask].tolist() for row, mask in zip(batch.text_ids, batch.text_mask)]
