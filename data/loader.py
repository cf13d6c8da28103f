"""The stateful data stream of one stage, as seen by one data-parallel rank.

Every random choice is a pure function of ``(seed, stage, index)``: the source of a draw comes from
:class:`~data.mixture.MixtureSampler`, its sample from the source's epoch permutation. The global batch is cut into
slots (rows or image-text pairs), each an independent stream, so the global stream does not depend on the
data-parallel size. The state is a handful of counters per slot plus the identity of the one document waiting for
the next row, so a resumed loader reproduces the uninterrupted stream exactly.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from config.model import VisionArgs
from config.schema import DataConfig, StageConfig
from data.batch import ImageTextBatch, PackedBatch
from data.images import background_rgb
from data.megatron import MegatronSource, is_megatron
from data.mixture import MixtureSampler, epoch_permutation
from data.packing import PackedRow, RowBuilder, collate_image_text, collate_rows
from data.prefetch import Prefetcher
from data.samples import Document, SampleError, ShardSource
from data.shards import INDEX_READS_AT_ONCE, shards_to_index
from data.tokenizer import TextTokenizer
from data.workers import REQUESTS_PER_WORKER, Drawn, ImageText, ProcessReader, SampleReader
from storage import Storage, abandoned_when, open_storage

logger = logging.getLogger(__name__)
# Below this many draws a few corrupt samples say nothing about the corrupt fraction.
MIN_DRAWS_FOR_CORRUPT_CHECK = 100
# A document continues into the next row only in pieces of at least this many tokens (shorter heads are padding).
MIN_PIECE_TOKENS = 16
# Documents are rendered up to this many rows long; the rest of a longer one is dropped.
MAX_ROWS_PER_DOCUMENT = 8
# Draws per request to a worker process, at most (see worker_request_draws).
MAX_WORKER_REQUEST = 64
# Epoch orders of the sources kept for reuse (LRU), in bytes.
ORDER_CACHE_BYTES = 256 * 1024 * 1024
# Progressive resolution raises the patch cap in this many equal steps: a cap that moved with every batch would make
# most draws read ahead (planned at one progress, taken at a later one) misses, while between steps the reads
# ahead stay valid.
RESOLUTION_STEPS = 16


def _load_index(source: ShardSource, shard: int, closed: threading.Event) -> None:
    with abandoned_when(closed):  # a closed loader's index reads stop retrying
        source.load_index(shard)


class DataError(RuntimeError):
    """The data cannot feed the run (missing sources, too many corrupt samples)."""


def worker_request_draws(window_draws: int, workers: int) -> int:
    """Draws per request to a loader worker: the read-ahead window (``window_draws``, over every slot) split evenly
    over the places the workers hold requests in (:data:`~data.workers.REQUESTS_PER_WORKER` each), so the window is
    asked for at once, at most :data:`MAX_WORKER_REQUEST`. A trip's fixed cost falls on the training process
    (receiving, copying out, resolving, dispatching: its share of the cores), so larger requests leave more of them
    to the reads (figures: docs/benchmarks.md)."""
    return max(1, min(MAX_WORKER_REQUEST, math.ceil(window_draws / (workers * REQUESTS_PER_WORKER))))


def read_manifest(storage: Storage) -> dict:
    try:
        return json.loads(storage.read("manifest.json"))
    except FileNotFoundError:
        raise DataError(f"no manifest.json in {storage.url}: generate the demo data with "
                        f"`python -m data.synthetic --out DIR` or build shards with your own tooling") from None


class SlotStream:
    """The documents of one slot of the global batch: draws ``k`` of slot ``v`` (of ``V``) have the global index
    ``k * V + v``; the ``c``-th draw of a source from this slot takes position ``c * V + v`` of that source's epoch
    order. State: counters and the identity of the one document waiting for the next row."""

    def __init__(self, slot: int, num_slots: int, sources: list[str]):
        self.slot = slot
        self.num_slots = num_slots
        self.draws = 0
        # Every source is listed from the start: a checkpoint template (torch.distributed.checkpoint loads into the
        # keys it is given) must hold every counter.
        self.source_draws = {name: 0 for name in sources}
        self.corrupt = 0
        # The waiting document's (source, position, global draw index, patch cap) -- enough to render it again --
        # and the offset of its first token not yet placed in a row.
        self.pending: tuple[str, int, int, int, int] | None = None
        self.pending_doc: Document | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "source_draws": dict(self.source_draws),
            "corrupt": self.corrupt,
            "pending": list(self.pending) if self.pending is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
        self.source_draws = {name: int(count) for name, count in state["source_draws"].items()}
        self.corrupt = int(state["corrupt"])
        pending = state.get("pending")
        self.pending = (pending[0], *map(int, pending[1:])) if pending else None
        self.pending_doc = None  # re-rendered from its identity on first use


class StageLoader:
    """Batches of one stage for one data-parallel rank; ``state_dict`` / ``load_state_dict`` make it resumable.

    The global batch of a micro-step has ``micro_batch_size x dp_size`` slots (packed rows, or image-text pairs);
    each slot is an independent stream (:class:`SlotStream`) and rank ``r`` serves slots ``r * m .. r * m + m - 1``.
    So the global stream depends only on the number of slots, not on how they are split: dp=2 with 2 rows per rank
    and dp=4 with 1 row per rank train on the same rows, and a checkpoint (one state per slot) resumes at either.

    ``data`` (optional) brings the run's storage options: ``prefetch_samples`` draws per slot read and decoded ahead
    on ``prefetch_threads`` background threads (which also read shard indexes in parallel), and
    ``skip_missing_shards``, and its ``max_corrupt_fraction`` replaces the argument. None of them changes the
    stream.
    """

    def __init__(
        self, stage_name: str, stage: StageConfig, root: str | Path | Storage, tokenizer: TextTokenizer,
        vision: VisionArgs, seed: int, dp_rank: int, dp_size: int, max_corrupt_fraction: float = 0.01,
        data: DataConfig | None = None,
    ):
        self.stage_name = stage_name
        self.stage = stage
        self.tokenizer = tokenizer
        self.vision = vision
        self.seed = seed
        self.max_corrupt_fraction = max_corrupt_fraction
        self.sampler = MixtureSampler(stage.mixture, seed, stage_name, images_only=stage.objective == "coca")
        storage = root if hasattr(root, "read_range") else open_storage(root)
        manifest = read_manifest(storage)
        known = manifest["sources"]
        missing = [name for name in self.sampler.sources() if name not in known]
        if missing:
            hint = ""
            if "scale" in manifest:  # the generated demo corpus, from before these sources existed
                hint = f"; regenerate the demo corpus: python -m data.synthetic --out {storage.url}"
            raise DataError(f"stage '{stage_name}' mixes sources {missing} that {storage.url}/manifest.json "
                            f"does not have; available: {sorted(known)}{hint}")
        if data is not None:  # the run's data config: its corrupt-sample limit too
            self.max_corrupt_fraction = data.max_corrupt_fraction
        data = data or DataConfig(prefetch_samples=0)
        self.sources = {
            name: MegatronSource(name, storage, known[name], tokenizer.vocab_size, data.cache_dir)
            if is_megatron(known[name]) else
            ShardSource(name, storage, known[name]["shards"], data.skip_missing_shards, data.prefetch_threads,
                        known[name].get("shard_samples"), known[name].get("index_suffix", ""))
            for name in self.sampler.sources()}
        self.image_text = stage.objective == "coca"
        max_tokens = stage.max_text_len if self.image_text else stage.seq_len * MAX_ROWS_PER_DOCUMENT
        self.reader = SampleReader(self.sources, stage.augment, seed, stage_name, vision.patch_size,
                                   vision.merge_size, tokenizer, self.image_text, max_tokens,
                                   background_rgb(data.alpha_background))
        self.prefetch_samples = data.prefetch_samples
        self.prefetcher = self.workers = None
        if data.prefetch_samples > 0:
            # Whole reads (fetch, decode, augment, patchify, tokenize) run ahead: on threads (decoding and resizing
            # release the GIL), or in worker processes when data.loader_workers > 0.
            capacity = 2 * data.prefetch_samples * stage.micro_batch_size
            if data.loader_workers > 0:
                # Requests in the order batches take the draws (the next batch's first).
                self.workers = ProcessReader(self.reader, data.loader_workers)
                chunk = worker_request_draws(data.prefetch_samples * stage.micro_batch_size, data.loader_workers)
                self.prefetcher = Prefetcher(self.workers.read, 0, capacity, chunk=chunk,
                                             submit_many=self.workers.submit)
            else:
                self.prefetcher = Prefetcher(self.reader.read, data.prefetch_threads, capacity)
        per_rank = stage.micro_batch_size
        num_slots = per_rank * dp_size
        self.slots = [SlotStream(v, num_slots, list(self.sources))
                      for v in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)]
        self._orders: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()  # LRU
        # Per slot, the draws planned and asked for (prefetch) but not drawn yet, and where that plan ends: the
        # slot's draw count and per-source draw counts after its last planned draw.
        self._ahead: dict[int, collections.deque[tuple[str, int, int, int]]] = {}
        self._plan_end: dict[int, tuple[int, dict[str, int]]] = {}
        self._plan_cap = -1  # the patch cap of the draws planned
        # Shard indexes read ahead for the read-ahead threads (see _index_ahead): the pool, and the shards asked for.
        self._index_pool: ThreadPoolExecutor | None = None
        self._indexing: set[tuple[str, int]] = set()

    @property
    def corrupt(self) -> int:
        return sum(slot.corrupt for slot in self.slots)

    @property
    def missing_shards(self) -> list[str]:
        """Shards of this stage's sources that were missing and skipped (``data.skip_missing_shards``)."""
        return [shard for source in self.sources.values() for shard in source.missing_shards]

    def settle(self) -> None:
        """Wait until the reads prefetched so far are done (see :meth:`Prefetcher.settle`); the stream is unchanged."""
        if self.prefetcher is not None:
            self.prefetcher.settle()

    def close(self) -> None:
        """Stop the prefetch threads and worker processes (the loader keeps working, reading in the foreground)."""
        if self._index_pool is not None:
            self._index_pool.shutdown(wait=False, cancel_futures=True)
            self._index_pool = None
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    # ----- drawing samples -------------------------------------------------------------------------------------

    def image_patch_cap(self, progress: float) -> int:
        """Progressive resolution: the per-image patch cap grows over the stage from ``min_image_patches``
        (0: no ramp) to ``max_image_patches``, in :data:`RESOLUTION_STEPS` equal steps."""
        low, high = self.stage.min_image_patches or self.stage.max_image_patches, self.stage.max_image_patches
        step = math.floor(min(max(progress, 0.0), 1.0) * RESOLUTION_STEPS) / RESOLUTION_STEPS
        return int(low + step * (high - low))

    def _plan(self, stream: SlotStream, progress: float, count: int,
              start: tuple[int, dict[str, int]] | None = None) -> tuple[list[tuple[str, int, int, int]], tuple]:
        """The next ``count`` (source, position, global draw index, patch cap) of a slot's stream, without
        advancing it (a pure function of its counters and ``progress``), and where they end: the slot's draw
        count and per-source draw counts after them. From ``start`` (such an end) instead of its counters, if
        given."""
        draws, source_draws = start if start is not None else (stream.draws, stream.source_draws)
        planned, source_draws = [], dict(source_draws)
        cap = self.image_patch_cap(progress)
        for ahead in range(count):
            draw = (draws + ahead) * stream.num_slots + stream.slot
            name = self.sampler.choose(draw, progress)
            planned.append((name, self._position(name, source_draws[name] * stream.num_slots + stream.slot), draw,
                            cap))
            source_draws[name] += 1
        return planned, (draws + count, source_draws)

    def _position(self, name: str, index: int) -> int:
        """The sample of source ``name`` that its ``index``-th draw (over all slots) visits."""
        epoch, offset = divmod(index, len(self.sources[name]))
        return int(self._order(name, epoch)[offset])

    def _order(self, name: str, epoch: int) -> Any:
        key = (name, epoch)
        order = self._orders.get(key)
        if order is not None:
            self._orders.move_to_end(key)
            return order
        # Slots do not move through a source's epochs in step (each draws it at its own rate: their counts drift
        # apart like random walks), so several epochs of a source are in use at once, more the smaller it is.
        # Keep the recent orders up to a memory bound (a source of 10M samples has an 80 MB order).
        while self._orders and sum(o.nbytes for o in self._orders.values()) > ORDER_CACHE_BYTES:
            self._orders.popitem(last=False)
        size = len(self.sources[name])
        order = self._orders[key] = epoch_permutation(self.seed, self.stage_name, name, epoch, size)
        return order

    def _draw(self, stream: SlotStream, progress: float) -> tuple[str, int, int, int]:
        """The next (source, position, global draw index, patch cap) of a slot's stream; advances its counters."""
        ahead = self._ahead.get(stream.slot)
        if ahead and not self.sampler.depends_on_progress:
            # The plan is this very computation, from the same counters at the same patch cap (_prefetch drops
            # plans of another cap): taken as it is, each draw's source and position are computed once.
            key = ahead.popleft()
            stream.draws += 1
            stream.source_draws[key[0]] += 1
            return key
        draw = stream.draws * stream.num_slots + stream.slot
        name = self.sampler.choose(draw, progress)
        position = self._position(name, stream.source_draws[name] * stream.num_slots + stream.slot)
        stream.draws += 1
        stream.source_draws[name] += 1
        key = name, position, draw, self.image_patch_cap(progress)
        if not ahead:  # drawn past its plan (or none): the next plan starts from the counters
            self._plan_end.pop(stream.slot, None)
        elif ahead.popleft() != key:  # planned otherwise: plan this slot again from its counters
            ahead.clear()
            self._plan_end.pop(stream.slot, None)
        return key

    def _prefetch(self, progress: float) -> None:
        """Ask for the reads of every slot's next draws (predicted at the current progress), once some slot has at
        most half of ``prefetch_samples`` draws asked for: then each slot's plan is extended to the whole window,
        from where it ended (each draw is planned once; planning is a large part of the trainer's own work per
        sample). A draw that turns out other than planned (the mixture moved with progress) drops the
        rest of its slot's plan, which starts again from the slot's counters."""
        if self.prefetcher is None:
            return
        window = self.prefetch_samples
        cap = self.image_patch_cap(progress)
        if cap != self._plan_cap:  # a step of progressive resolution: every read planned is now another one
            self._ahead.clear()
            self._plan_end.clear()
            self._plan_cap = cap
        if all(len(self._ahead.get(s.slot, ())) > window // 2 for s in self.slots):
            return
        plans = []
        for stream in self.slots:
            ahead = self._ahead.setdefault(stream.slot, collections.deque())
            plan, self._plan_end[stream.slot] = self._plan(stream, progress, window - len(ahead),
                                                           self._plan_end.get(stream.slot))
            ahead.extend(plan)
            plans.append(plan)
        if self.workers is None:
            self._index_ahead([key for plan in plans for key in plan])
        # Round-robin over the slots, in the order batches consume draws: the next batch's samples first.
        self.prefetcher.want(plan[k] for k in range(max(map(len, plans))) for plan in plans if k < len(plan))

    def _index_ahead(self, keys: list[tuple[str, int, int, int]]) -> None:
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

    def _read(self, name: str, position: int, draw: int, cap: int) -> Drawn:
        if self.prefetcher is not None:  # the same pure function, maybe already computed in the background
            return self.prefetcher.get(name, position, draw, cap)
        return self.reader.read(name, position, draw, cap)

    def _skip(self, stream: SlotStream, name: str, position: int, error: Exception) -> None:
        stream.corrupt += 1
        where = self.sources[name].locate(position)
        logger.warning("skipped corrupt sample of source '%s' at %s: %s", name, where, error)
        draws = sum(slot.draws for slot in self.slots)
        if draws >= MIN_DRAWS_FOR_CORRUPT_CHECK and self.corrupt > self.max_corrupt_fraction * draws:
            raise DataError(f"{self.corrupt} of {draws} samples drawn in stage '{self.stage_name}' were corrupt, "
                            f"above data.max_corrupt_fraction={self.max_corrupt_fraction}")

    def _render(self, name: str, position: int, draw: int, cap: int) -> Document:
        return self._read(name, position, draw, cap)

    def _next_document(self, stream: SlotStream, progress: float) -> tuple[tuple[str, int, int, int, int], Document]:
        while True:
            name, position, draw, cap = self._draw(stream, progress)
            try:
                return (name, position, draw, cap, 0), self._render(name, position, draw, cap)
            except SampleError as error:
                self._skip(stream, name, position, error)

    # ----- batches ---------------------------------------------------------------------------------------------

    def _next_row(self, stream: SlotStream, progress: float) -> PackedRow:
        """Fill one row: whole documents while they fit, then the head of the next one (never inside an image
        span; the rest opens the next row), so rows carry almost no padding and long documents are not lost."""
        builder = RowBuilder(self.stage.seq_len, self.tokenizer.pad_id)
        while True:
            if stream.pending is None:
                stream.pending, stream.pending_doc = self._next_document(stream, progress)
            elif stream.pending_doc is None:  # restored from a checkpoint: rendering is a pure function
                stream.pending_doc = self._render(*stream.pending[:4])
            doc, offset = stream.pending_doc, stream.pending[4]
            if len(doc.tokens) - offset <= builder.free:
                builder.add(doc.piece(offset, len(doc.tokens)))
                stream.pending, stream.pending_doc = None, None
                continue
            cut = doc.split_point(offset, offset + builder.free)
            if cut - offset >= MIN_PIECE_TOKENS:
                builder.add(doc.piece(offset, cut))
                stream.pending = (*stream.pending[:4], cut)
            elif builder.free == self.stage.seq_len:  # an image span longer than a whole row: cannot be placed
                self._skip(stream, stream.pending[0], stream.pending[1],
                           SampleError(f"an image of more than {self.stage.seq_len} tokens; lower max_image_patches"))
                stream.pending, stream.pending_doc = None, None
                continue
            return builder.finish()

    def next_packed_batch(self, progress: float) -> PackedBatch:
        """One packed row of ``seq_len`` tokens from each of this rank's slots (the language-model objective)."""
        self._check_objective(False)
        self._prefetch(progress)
        rows = [self._next_row(stream, progress) for stream in self.slots]
        patch_dim = self.vision.in_channels * self.vision.patch_size**2
        return collate_rows(rows, self.tokenizer.image_id, patch_dim, self.vision.merge_size)

    def _next_pair(self, stream: SlotStream, progress: float) -> ImageText:
        while True:
            name, position, draw, cap = self._draw(stream, progress)
            try:
                return self._read(name, position, draw, cap)
            except SampleError as error:
                self._skip(stream, name, position, error)

    def _check_objective(self, image_text: bool) -> None:
        if image_text != self.image_text:
            wanted = "image-text pairs" if image_text else "packed rows"
            raise DataError(f"stage '{self.stage_name}' has the '{self.stage.objective}' objective, which does not "
                            f"train on {wanted}")

    def next_image_text_batch(self, progress: float) -> ImageTextBatch:
        """One (image, caption ids) pair from each of this rank's slots (the CoCa objective; first image of a
        sample)."""
        self._check_objective(True)
        self._prefetch(progress)
        return collate_image_text([self._next_pair(stream, progress) for stream in self.slots], self.tokenizer.pad_id)

    # ----- Stateful ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """One entry per slot, keyed by its global slot index: reshardable across data-parallel sizes."""
        return {f"slot{stream.slot}": stream.state_dict() for stream in self.slots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for stream in self.slots:
            key = f"slot{stream.slot}"
            if key not in state:
                raise DataError(f"the loader state has no {key}: it was saved with a different global batch")
            stream.load_state_dict(state[key])
        self._ahead.clear()
        self._plan_end.clear()
