"""Shard indexing: lazily from the manifest's counts and the sidecar indexes (no shard read up front) gives the
same samples in the same positions as reading every shard; wrong counts are named."""

from __future__ import annotations

import json

import pytest

from data.shards import INDEX_SUFFIX, ShardSource
from data.storage import LocalStorage


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
