"""Reading samples ahead on background threads, without changing what the loader delivers.

The loader knows its next draws (they are a pure function of its counters), so it asks for them early: the threads
fetch their members, decode, augment and patchify their images and tokenize their text (a pure function of the
draw; PIL and torch release the GIL while they work). The consumer still takes samples in its own order and gets
exactly what a synchronous read would return: a sample not fetched yet (or mispredicted, e.g. because the mixture
moved with progress) is simply read in the foreground. Timing can change only how long a batch takes, never its
contents.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from threading import Event
from typing import Any

from storage import abandoned_when


class Prefetcher:
    """Background reads of ``read(*key)`` for wanted keys, handed out once each.

    Args:
        read: The synchronous read (thread-safe).
        threads: Background threads.
        capacity: Reads in flight or waiting to be taken; the oldest unclaimed ones are dropped beyond it.
        read_many: Reads a list of keys in one call, returning for each its value or the exception it raised;
            with ``chunk`` > 1, wanted keys are read ``chunk`` at a time through it.
        chunk: Keys per background call.
        submit_many: Starts the reads of a list of keys elsewhere, e.g. in worker processes, and returns a future
            of what ``read_many`` would return (cancelling it withdraws the reads if they have not started); used
            instead of ``read_many`` on the threads, which are then not started.
    """

    def __init__(self, read: Callable[..., Any], threads: int, capacity: int,
                 read_many: Callable[[list[tuple]], list[Any]] | None = None, chunk: int = 1,
                 submit_many: Callable[[list[tuple]], Future] | None = None):
        self.read = read
        self.read_many = read_many or self._read_each
        self.chunk = max(1, chunk)
        self.capacity = max(1, capacity)
        self.pool = None if submit_many else ThreadPoolExecutor(max(1, threads), thread_name_prefix="prefetch")
        self.submit_many = submit_many or (lambda keys: self.pool.submit(self._read_ahead, keys))
        self.closed = Event()
        # key -> (future of its chunk's outcomes, its index in them)
        self.pending: OrderedDict[tuple, tuple[Future, int]] = OrderedDict()
        self.hits = self.misses = 0

    def _read_ahead(self, keys: list[tuple]) -> list[Any]:
        with abandoned_when(self.closed):  # a read still retrying when the loader closes gives up
            return self.read_many(keys)

    def _read_each(self, keys: list[tuple]) -> list[Any]:
        outcomes = []
        for key in keys:
            try:
                outcomes.append(self.read(*key))
            except Exception as error:  # handed to the caller of get() for this key
                outcomes.append(error)
        return outcomes

    def want(self, keys: Iterable[tuple]) -> None:
        """Start reading ``keys`` (in order) that are not already in flight."""
        fresh = [key for key in dict.fromkeys(keys) if key not in self.pending]
        for start in range(0, len(fresh), self.chunk):
            group = fresh[start:start + self.chunk]
            future = self.submit_many(group)
            for index, key in enumerate(group):
                self.pending[key] = (future, index)
        while len(self.pending) > self.capacity:
            _, (stale, _) = self.pending.popitem(last=False)
            stale.cancel()  # only if it has not started; its other keys, if any, are then read in the foreground

    def get(self, *key) -> Any:
        """The value of ``read(*key)``: the prefetched one if there is one (its exception re-raised here), else a
        foreground read."""
        entry = self.pending.pop(key, None)
        if entry is None or entry[0].cancelled():
            self.misses += 1
            return self.read(*key)
        self.hits += 1
        outcome = entry[0].result()[entry[1]]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def settle(self) -> None:
        """Wait until every read asked for has finished (they stay ready to be taken): e.g. before timing other
        work on the same cores, which the reads in flight would otherwise slow down."""
        wait([future for future, _ in self.pending.values()])

    def close(self) -> None:
        self.closed.set()
        for future, _ in self.pending.values():
            future.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
