"""A bounded local disk cache of whole shards in front of remote storage, safe to share between processes.

Only shards (``*.tar``) and their sidecar indexes are cached: the manifest and tokenizer are small and may be
rewritten (``data.prepare`` adds sources), while shards are immutable once written (a changed dataset gets new
shard names), so a cached copy never goes stale. The first read of a shard, ranged or not, brings the whole shard
(one request) if it fits the cache; later reads of it are served from disk. Size the cache for the shards in
rotation: when it is much smaller than that, random access keeps evicting and fetching whole shards, and reading
without a cache (ranged requests only) is cheaper. Entries are written to a private temporary file and renamed into
place, so a reader in another process sees a whole file or none; eviction removes the least recently used entries
(by modification time, refreshed on every hit) until the cache holds at most ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from storage.stores import Storage, read_file_range

SUFFIX = ".obj"
LOCK_SUFFIX = ".lock"  # beside an entry, held while one process fetches it
CACHED_SUFFIXES = (".tar", ".idx.json")
# Keys whose paths (and last LRU refresh) are remembered, at most.
MEMO_ENTRIES = 4096
TOUCH_INTERVAL_S = 1.0


class DiskCache:
    """Whole objects by key under ``root``, at most ``max_bytes`` in total (LRU by bytes).

    Args:
        root: Cache folder (created); several processes may share it.
        max_bytes: Size bound; an object larger than it is never cached.
    """

    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        self._touched: dict[Path, float] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        path = self._paths.get(key)
        if path is None:  # memoized: hashing and building the path cost more than the read of a small sample
            if len(self._paths) >= MEMO_ENTRIES:
                self._paths.clear()
            digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
            path = self._paths[key] = self.root / f"{digest}{SUFFIX}"
        return path

    def _hit(self, path: Path) -> None:
        self.hits += 1
        # The LRU clock: a hit makes the entry the most recently used. Refreshed at most every TOUCH_INTERVAL_S per
        # entry (a read of a sample per millisecond would otherwise spend as much on the update as on the read).
        now = time.monotonic()
        if now - self._touched.get(path, -TOUCH_INTERVAL_S) < TOUCH_INTERVAL_S:
            return
        if len(self._touched) >= MEMO_ENTRIES:
            self._touched.clear()
        self._touched[path] = now
        try:
            os.utime(path)
        except FileNotFoundError:
            pass  # evicted by another process after our read: the bytes we read are still whole

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        self._hit(path)
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        path = self._path(key)
        try:
            data = read_file_range(path, start, length)
        except FileNotFoundError:
            self.misses += 1
            return None
        self._hit(path)
        return data

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self._path(key)
        # Unique per process and thread: two writers of the same key never share a temporary file, and the
        # rename is atomic, so readers never see a partial entry.
        staging = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        staging.write_bytes(data)
        os.replace(staging, path)
        self.evict()

    @contextlib.contextmanager
    def filling(self, key: str) -> Iterator[None]:
        """Held while one process fetches ``key`` into the cache: the others wait, then find it on disk. (An advisory
        lock on a file beside the entry; at worst, e.g. on a file system without locks, two processes both fetch.)"""
        lock = self._path(key).with_suffix(LOCK_SUFFIX)
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:
                pass
            yield

    def discard(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def evict(self) -> None:
        """Remove least recently used entries until the cache holds at most ``max_bytes``."""
        with self._lock:
            entries = []
            for path in self.root.glob(f"*{SUFFIX}"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # removed by another process meanwhile
                entries.append((stat.st_mtime_ns, stat.st_size, path))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                path.with_suffix(LOCK_SUFFIX).unlink(missing_ok=True)
                total -= size

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob(f"*{SUFFIX}"))


class CachedStorage:
    """``storage`` with a :class:`DiskCache` in front (same calls as :class:`~storage.Storage`)."""

    def __init__(self, storage: Storage, cache: DiskCache):
        self.storage = storage
        self.cache = cache
        self.url = storage.url
        self._fills: dict[str, threading.Lock] = {}
        self._fills_lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fills": {}, "_fills_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fills_lock = threading.Lock()

    def _key(self, key: str) -> str:
        return f"{self.url}/{key}"

    @staticmethod
    def cacheable(key: str) -> bool:
        return key.endswith(CACHED_SUFFIXES)

    def read(self, key: str) -> bytes:
        if not self.cacheable(key):
            return self.storage.read(key)
        data = self.cache.get(self._key(key))
        if data is None:
            data = self.storage.read(key)
            self.cache.put(self._key(key), data)
        return data

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if not self.cacheable(key):
            return self.storage.read_range(key, start, length)
        data = self.cache.get_range(self._key(key), start, length)
        if data is not None:
            return data
        with self._fills_lock:
            fill = self._fills.setdefault(key, threading.Lock())
        # Prefetch threads drawing from the same new shard wait for one download, and so do the other processes
        # sharing the cache (the loader's worker processes, the other ranks of the node).
        with fill, self.cache.filling(self._key(key)):
            data = self.cache.get_range(self._key(key), start, length)
            if data is not None:
                return data
            size = self.storage.size(key)
            if size > self.cache.max_bytes:  # never fits: ranged reads only
                return self.storage.read_range(key, start, length)
            whole = self.storage.read_range(key, 0, size) if size else b""
            self.cache.put(self._key(key), whole)
        return whole[start:start + length]

    def size(self, key: str) -> int:
        size = self.cache.size(self._key(key))
        return size if size is not None else self.storage.size(key)

    def exists(self, key: str) -> bool:
        return self.cache.size(self._key(key)) is not None or self.storage.exists(key)

    def write(self, key: str, data: bytes) -> None:
        self.cache.discard(self._key(key))
        self.storage.write(key, data)

    def list(self, prefix: str = "") -> list[str]:
        return self.storage.list(prefix)
