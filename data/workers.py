"""The per-draw read (fetch, parse, decode, augment, patchify), in-process or in worker processes.

A draw's read is a pure function of ``(source, position, draw index, patch cap)`` and the stage's fixed settings, so
it can run anywhere: :class:`SampleReader` is that function; :class:`ProcessReader` runs it in spawned worker
processes (spawned, not forked: the trainer has threads, process groups and possibly CUDA, none of which survive a
fork) for when decoding and resizing need more than one core. Workers write patches into a shared-memory arena
the reader owns (no per-tensor shared-memory handles cross the process boundary); the loader's output is the same
with any number of workers.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import shared_memory

import torch

from data.augment import AugmentConfig, plan_augment
from data.mixture import draw_rng
from data.samples import ImagePatches, RawSample, load_images, load_meta
from data.shards import ShardSource

Loaded = tuple[RawSample, dict, dict[str, ImagePatches]]
# Shared-memory bytes per concurrent read; a sample whose patches do not fit goes through the pipe instead.
SLOT_BYTES = 16 * 1024 * 1024


class SampleReader:
    """Reads one draw of a stage: raw members, checked metadata and decoded (augmented) image patches.

    Args:
        sources: The stage's sources by name.
        augment_cfg: The stage's augmentation.
        seed: Run seed.
        stage_name: Stage name (part of every random choice).
        patch_size: ViT patch side.
        merge_size: Projector merge side.
    """

    def __init__(self, sources: dict[str, ShardSource], augment_cfg: AugmentConfig, seed: int, stage_name: str,
                 patch_size: int, merge_size: int):
        self.sources = sources
        self.augment_cfg = augment_cfg
        self.seed, self.stage_name = seed, stage_name
        self.patch_size, self.merge_size = patch_size, merge_size

    def load(self, name: str, position: int, draw: int, cap: int) -> Loaded:
        raw = self.sources[name].read(position)
        meta = load_meta(raw)
        augmenter = None
        cfg = self.augment_cfg
        if cfg.enabled and meta.get("kind") in cfg.kinds:
            # A pure function of the draw: the same sample drawn again (or re-rendered after resume) looks the same.
            rng = draw_rng(self.seed, self.stage_name, draw, "augment")
            augmenter = lambda size, objects: plan_augment(size, objects, cfg, rng)  # noqa: E731
        images = load_images(raw, meta, self.patch_size, self.merge_size, cap, augmenter)
        return raw, meta, images


_READER: SampleReader | None = None
_ARENA: shared_memory.SharedMemory | None = None
_SLOT_BYTES = 0


def _start(reader: SampleReader, arena: str, slot_bytes: int) -> None:
    global _READER, _ARENA, _SLOT_BYTES
    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    _READER, _SLOT_BYTES = reader, slot_bytes
    _ARENA = shared_memory.SharedMemory(name=arena)


def _load_in_worker(keys: list[tuple[str, int, int, int]], slot: int) -> list:
    start, end = slot * _SLOT_BYTES, (slot + 1) * _SLOT_BYTES
    outcomes = []
    for key in keys:
        try:
            raw, meta, images = _READER.load(*key)
        except Exception as error:  # this draw's outcome (e.g. a corrupt sample); the others still count
            outcomes.append(error)
            continue
        arrays = {}
        for ext, image in images.items():
            count = image.patches.numel()
            if start + 4 * count <= end:  # into the caller's slot of the shared arena: no copy through the pipe
                torch.frombuffer(_ARENA.buf, dtype=torch.float32, count=count, offset=start).copy_(
                    image.patches.view(-1))
                arrays[ext] = ((start, tuple(image.patches.shape)), image.grid, image.size)
                start += 4 * count
            else:  # larger than the slot's rest: through the pipe
                arrays[ext] = (image.patches.numpy(), image.grid, image.size)
        # The members stay here: the loader uses the metadata and the patches, not the encoded bytes.
        outcomes.append((RawSample(raw.source, raw.shard, raw.key, {}), meta, arrays))
    return outcomes


class ProcessReader:
    """:meth:`SampleReader.load` in ``processes`` spawned workers; :meth:`load` and :meth:`load_many` block for
    their results (call them from up to ``callers`` threads at once to keep the workers busy; more wait their turn).

    A round trip costs the pool's bookkeeping (threads, queues, pickling): read several samples per trip
    (:meth:`load_many`). Patches come back through a shared-memory arena with one slot per concurrent call (a pipe
    would copy them four times, in chunks of its buffer, which costs more than decoding a small image); the
    returned raw samples have no members.
    """

    def __init__(self, reader: SampleReader, processes: int, callers: int, slot_bytes: int = SLOT_BYTES):
        self.arena = shared_memory.SharedMemory(create=True, size=callers * slot_bytes)
        self.closed = False
        self.slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(callers):
            self.slots.put(slot)
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start, initargs=(reader, self.arena.name, slot_bytes))

    def load(self, name: str, position: int, draw: int, cap: int) -> Loaded:
        outcome = self.load_many([(name, position, draw, cap)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def load_many(self, keys: list[tuple[str, int, int, int]]) -> list[Loaded | Exception]:
        """The reads of ``keys`` in one round trip to a worker: each a :meth:`SampleReader.load` result or the
        exception it raised."""
        slot = self.slots.get()
        try:
            outcomes = self.pool.submit(_load_in_worker, keys, slot).result()
            for index, outcome in enumerate(outcomes):
                if isinstance(outcome, BaseException):
                    continue
                raw, meta, arrays = outcome
                images = {}
                for ext, (patches, grid, size) in arrays.items():
                    if isinstance(patches, tuple):  # (offset, shape) in the arena: copied out before reuse
                        offset, shape = patches
                        patches = torch.frombuffer(self.arena.buf, dtype=torch.float32, count=math.prod(shape),
                                                   offset=offset).view(shape).clone()
                    else:
                        patches = torch.from_numpy(patches)
                    images[ext] = ImagePatches(patches, tuple(grid), tuple(size))
                outcomes[index] = (raw, meta, images)
        finally:
            self.slots.put(slot)
        return outcomes

    def close(self) -> None:
        # A worker in the middle of a chunk would finish it (reads, and retries against a storage that may be
        # gone) long after the loader is done: stop the processes. The pool names them publicly only from Python
        # 3.14 (terminate_workers).
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        if not self.closed:
            # Only the name goes now: a prefetch thread may still be copying out of the arena, so the mapping is
            # released with this object, once no thread uses it.
            self.closed = True
            self.arena.unlink()
