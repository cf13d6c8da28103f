"""Reading the draws a :class:`~data.planner.Planner` names: in the foreground, or ahead of need on threads or in
worker processes, and skipping corrupt samples (counted per slot, named in the log, fatal past a limit).

Reading ahead changes timing only, never what is delivered: a read is a pure function of its draw
(:class:`~data.sample_reader.SampleReader`), and a draw not read ahead (or mispredicted) is read in the foreground.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor

from config.schema import DataConfig
from data.formats import DataError
from data.planner import DrawKey, Planner, SlotStream
from data.prefetch import Prefetcher
from data.sample_reader import Drawn, SampleReader
from data.samples import SampleError, ShardSource
from data.shards import INDEX_READS_AT_ONCE, shards_to_index
from data.workers import REQUESTS_PER_WORKER, ProcessReader
from storage import abandoned_when

logger = logging.getLogger(__name__)
# Below this many draws a few corrupt samples say nothing about the corrupt fraction.
MIN_DRAWS_FOR_CORRUPT_CHECK = 100
# Draws per request to a worker process, at most (see worker_request_draws).
MAX_WORKER_REQUEST = 64


def worker_request_draws(window_draws: int, workers: int) -> int:
    """Draws per request to a loader worker: the read-ahead window (``window_draws``, over every slot) split evenly
    over the places the workers hold requests in (:data:`~data.workers.REQUESTS_PER_WORKER` each), so the window is
    asked for at once, at most :data:`MAX_WORKER_REQUEST`. A trip's fixed cost falls on the training process
    (receiving, copying out, resolving, dispatching: its share of the cores), so larger requests leave more of them
    to the reads."""
    return max(1, min(MAX_WORKER_REQUEST, math.ceil(window_draws / (workers * REQUESTS_PER_WORKER))))


def _load_index(source: ShardSource, shard: int, closed: threading.Event) -> None:
    with abandoned_when(closed):  # a closed loader's index reads stop retrying
        source.load_index(shard)


class Reader:
    """The reads of one rank's draws, with their read-ahead and the corrupt-sample count.

    ``data.prefetch_samples`` draws per slot are read ahead (fetched, decoded, augmented, patchified, tokenized) on
    ``data.prefetch_threads`` threads (which also read shard indexes in parallel), or in ``data.loader_workers``
    spawned worker processes; more than ``data.max_corrupt_fraction`` of the draws corrupt fails the run.

    Args:
        planner: The draws (and the slots whose corrupt samples are counted).
        sample_reader: The per-draw read, with the stage's sources.
        data: The run's data options.
        stage_name: For messages.
    """

    def __init__(self, planner: Planner, sample_reader: SampleReader, data: DataConfig, stage_name: str):
        self.planner = planner
        self.sample_reader = sample_reader
        self.sources = sample_reader.sources
        self.stage_name = stage_name
        self.max_corrupt_fraction = data.max_corrupt_fraction
        self.window = data.prefetch_samples
        self.prefetcher: Prefetcher | None = None
        self.workers: ProcessReader | None = None
        if data.prefetch_samples > 0:
            # Whole reads run ahead: on threads (decoding and resizing release the GIL), or in worker processes.
            slots = len(planner.slots)
            capacity = 2 * data.prefetch_samples * slots
            if data.loader_workers > 0:
                # Requests in the order batches take the draws (the next batch's first).
                self.workers = ProcessReader(sample_reader, data.loader_workers)
                chunk = worker_request_draws(data.prefetch_samples * slots, data.loader_workers)
                self.prefetcher = Prefetcher(self.workers.read, 0, capacity, chunk=chunk,
                                             submit_many=self.workers.submit)
            else:
                self.prefetcher = Prefetcher(sample_reader.read, data.prefetch_threads, capacity)
        # Shard indexes read ahead for the read-ahead threads (see _index_ahead): the pool, and the shards asked for.
        self._index_pool: ThreadPoolExecutor | None = None
        self._indexing: set[tuple[str, int]] = set()
        # Called with ("skip", slot, draw key, error) for each corrupt sample skipped (see Packer.observer).
        self.observer = None

    @property
    def corrupt(self) -> int:
        return sum(slot.corrupt for slot in self.planner.slots)

    @property
    def missing_shards(self) -> list[str]:
        """Shards of the stage's sources that were missing and skipped (``data.skip_missing_shards``)."""
        return [shard for source in self.sources.values() for shard in source.missing_shards]

    def read_ahead(self, progress: float) -> None:
        """Ask for the reads of every slot's next draws (:meth:`Planner.plan_ahead`), if reading ahead."""
        if self.prefetcher is None:
            return
        plans = self.planner.plan_ahead(progress, self.window)
        if not plans:
            return
        if self.workers is None:
            self._index_ahead([key for plan in plans for key in plan])
        # Round-robin over the slots, in the order batches consume draws: the next batch's samples first.
        self.prefetcher.want(plan[k] for k in range(max(map(len, plans))) for plan in plans if k < len(plan))

    def _index_ahead(self, keys: list[DrawKey]) -> None:
        """Start reading, all at once, the indexes of the shards planned draws land in that are not indexed yet:
        each read-ahead thread would otherwise wait for them one after another before its draws (at a start or a
        resume, the first batch lands in a dozen shards never read). Worker processes do this per request
        (:meth:`SampleReader.read_many`)."""
        for name, shard in shards_to_index(self.sources, keys):
            if (name, shard) in self._indexing:  # already asked for, its read maybe still under way
                continue
            self._indexing.add((name, shard))
            if self._index_pool is None:
                self._index_pool = ThreadPoolExecutor(INDEX_READS_AT_ONCE, thread_name_prefix="shard-index")
            self._index_pool.submit(_load_index, self.sources[name], shard, self.prefetcher.closed)

    def read(self, key: DrawKey) -> Drawn:
        """The draw as the loader uses it; raises :class:`SampleError` for a corrupt sample."""
        if self.prefetcher is not None:  # the same pure function, maybe already computed in the background
            return self.prefetcher.get(*key)
        return self.sample_reader.read(*key)

    def read_next(self, stream: SlotStream, progress: float) -> tuple[DrawKey, Drawn]:
        """The slot's next draw that is not corrupt, and its read; the corrupt ones before it are skipped."""
        while True:
            key = self.planner.draw(stream, progress)
            try:
                return key, self.read(key)
            except SampleError as error:
                self.skip(stream, key, error)

    def skip(self, stream: SlotStream, key: DrawKey, error: Exception) -> None:
        """Count a corrupt draw of the slot and name it in the log; raise :class:`DataError` once more than
        ``data.max_corrupt_fraction`` of this rank's draws were corrupt."""
        stream.corrupt += 1
        if self.observer is not None:
            self.observer("skip", stream.slot, key, error)
        name, position = key[:2]
        where = self.sources[name].locate(position)
        logger.warning("skipped corrupt sample of source '%s' at %s: %s", name, where, error)
        draws = sum(slot.draws for slot in self.planner.slots)
        if draws >= MIN_DRAWS_FOR_CORRUPT_CHECK and self.corrupt > self.max_corrupt_fraction * draws:
            raise DataError(f"{self.corrupt} of {draws} samples drawn in stage '{self.stage_name}' were corrupt, "
                            f"above data.max_corrupt_fraction={self.max_corrupt_fraction}")

    def settle(self) -> None:
        """Wait until the reads asked for so far are done (see :meth:`Prefetcher.settle`)."""
        if self.prefetcher is not None:
            self.prefetcher.settle()

    def close(self) -> None:
        """Stop the read-ahead threads and worker processes (reads then run in the foreground)."""
        if self._index_pool is not None:
            self._index_pool.shutdown(wait=False, cancel_futures=True)
            self._index_pool = None
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self.workers is not None:
            self.workers.close()
            self.workers = None
