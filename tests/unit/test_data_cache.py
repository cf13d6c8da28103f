"""The disk cache shared by processes, and the token bucket's arithmetic."""

from __future__ import annotations

import hashlib
import multiprocessing
import time

import pytest

from storage import LocalStorage, TokenBucket
from storage.cache import CachedStorage, DiskCache


def payload(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (50 + i % 7)  # 1.6-1.8 KB, content tied to its key


def _writer(root: str, bound: int, offset: int) -> None:
    cache = DiskCache(root, bound)
    for i in range(60):
        key = f"k{(i + offset) % 40}"
        cache.put(key, payload((i + offset) % 40))
        got = cache.get(f"k{(i * 7) % 40}")
        assert got is None or got == payload((i * 7) % 40)


def test_processes_sharing_a_cache_see_whole_entries_and_the_bound_holds(tmp_path):
    bound = 12_000
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(str(tmp_path), bound, 13 * w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    cache = DiskCache(tmp_path, bound)
    assert 0 < cache.total_bytes() <= bound
    present = [i for i in range(40) if (data := cache.get(f"k{i}")) is not None and data == payload(i)]
    assert len(present) == len(list(tmp_path.glob("*.obj")))  # every entry is whole and under its own key
    assert not list(tmp_path.glob(".*.tmp"))


def test_least_recently_used_goes_first(tmp_path):
    cache = DiskCache(tmp_path, 3 * len(payload(0)) + 10)
    for i in range(3):
        cache.put(f"k{i}", payload(0))
    assert cache.get("k0") == payload(0)  # k0 is now the most recently used
    cache.put("k3", payload(0))
    assert cache.get("k1") is None and cache.get("k0") == payload(0) and cache.get("k3") == payload(0)


def test_token_bucket_grants_at_most_burst_plus_rate_times_t():
    now = [0.0]
    grants = []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    bucket = TokenBucket(rate=10.0, burst=3, clock=lambda: now[0], sleep=sleep)
    for _ in range(23):
        bucket.acquire()
        grants.append(now[0])
    assert grants[:3] == [0.0, 0.0, 0.0]
    assert abs(grants[-1] - 2.0) < 1e-9  # 20 tokens beyond the burst at 10 per second
    for i in range(len(grants)):
        for j in range(i, len(grants)):
            assert j - i + 1 <= 3 + 10.0 * (grants[j] - grants[i]) + 1e-9
    bucket.throttled()
    assert bucket.rate == 5.0


class SlowStorage:
    """A remote store that counts whole-object fetches (shared between processes) and takes its time."""

    url = "s3://slow"

    def __init__(self, fetches):
        self.fetches = fetches

    def size(self, key: str) -> int:
        return len(payload(1))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with self.fetches.get_lock():
            self.fetches.value += 1
        time.sleep(0.3)
        return payload(1)[start:start + length]


def _reader(root: str, fetches, start: int) -> None:
    storage = CachedStorage(SlowStorage(fetches), DiskCache(root, 10**6))
    assert storage.read_range("shard.tar", start, 100) == payload(1)[start:start + 100]


def test_processes_missing_the_same_shard_fetch_it_once(tmp_path):
    context = multiprocessing.get_context("fork")
    fetches = context.Value("i", 0)
    readers = [context.Process(target=_reader, args=(str(tmp_path), fetches, 100 * r)) for r in range(3)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(30)
        assert reader.exitcode == 0
    assert fetches.value == 1


def test_local_ranged_reads_stop_at_the_end_of_the_file_and_name_a_missing_one(tmp_path):
    data = bytes(range(256)) * 10
    (tmp_path / "shard.tar").write_bytes(data)
    storage, cache = LocalStorage(tmp_path), DiskCache(tmp_path / "cache", 10**6)
    cache.put("shard", data)
    for start, length in ((0, 0), (10, 20), (2550, 100), (2560, 5), (0, len(data))):
        assert storage.read_range("shard.tar", start, length) == data[start:start + length]
        assert cache.get_range("shard", start, length) == data[start:start + length]
    assert cache.get_range("other", 0, 10) is None
    with pytest.raises(FileNotFoundError):
        storage.read_range("missing.tar", 0, 10)
