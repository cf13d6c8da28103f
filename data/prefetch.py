"""Reading samples ahead on background threads, without changing what the loader delivers.

The loader knows its next draws (they are a pure function of its counters), so it asks for them early: the threads
fetch their members and decode, augment and patchify their images (a pure function of the draw; PIL and torch
release the GIL while they work). The consumer still takes samples in its own order and gets exactly what a
synchronous read would return: a sample not fetched yet (or mispredicted, e.g. because the mixture moved with
progress) is simply read in the foreground. Timing can change only how long a batch takes, never its contents.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Prefetcher:
    """Background reads of ``read(*key)`` for wanted keys, handed out once each.

    Args:
        read: The synchronous read (thread-safe).
        threads: Background threads.
        capacity: Reads in flight or waiting to be taken; the oldest unclaimed ones are dropped beyond it.
    """

    def __init__(self, read: Callable[..., Any], threads: int, capacity: int):
        self.read = read
        self.capacity = max(1, capacity)
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="prefetch")
        self.pending: OrderedDict[tuple, Future] = OrderedDict()
        self.hits = self.misses = 0

    def want(self, keys: Iterable[tuple]) -> None:
        """Start reading ``keys`` (in order) that are not already in flight."""
        for key in keys:
            if key in self.pending:
                continue
            self.pending[key] = self.pool.submit(self.read, *key)
            while len(self.pending) > self.capacity:
                _, stale = self.pending.popitem(last=False)
                stale.cancel()

    def get(self, *key) -> Any:
        """The value of ``read(*key)``: the prefetched one if there is one (its exception re-raised here), else a
        foreground read."""
        future = self.pending.pop(key, None)
        if future is None or future.cancelled():
            self.misses += 1
            return self.read(*key)
        self.hits += 1
        return future.result()

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
