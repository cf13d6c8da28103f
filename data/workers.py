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
from multiprocessing import shared_memory

import cv2
import torch

from data.augment import AugmentConfig, plan_augment
from data.mixture import DrawRandom
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
            rng = DrawRandom(self.seed, self.stage_name, draw, "augment")
            augmenter = lambda size, objects: plan_augment(size, objects, cfg, rng)  # noqa: E731
        images = load_images(raw, meta, self.patch_size, self.merge_size, cap, augmenter)
        return raw, meta, images


def _serve(connection, reader: SampleReader, arena_name: str, slot_bytes: int) -> None:
    """A worker process: answers ``(keys, slot)`` requests with their outcomes until it reads ``None``."""
    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    cv2.setNumThreads(1)
    arena = shared_memory.SharedMemory(name=arena_name)
    try:
        while (request := connection.recv()) is not None:
            keys, slot = request
            connection.send(_load_chunk(reader, arena, keys, slot * slot_bytes, (slot + 1) * slot_bytes))
    except (EOFError, KeyboardInterrupt):  # the loader went away (or the job is being stopped): nothing to answer
        pass
    finally:
        arena.close()


def _load_chunk(reader: SampleReader, arena: shared_memory.SharedMemory, keys: list[tuple[str, int, int, int]],
                start: int, end: int) -> list:
    outcomes = []
    for key in keys:
        try:
            raw, meta, images = reader.load(*key)
        except Exception as error:  # this draw's outcome (e.g. a corrupt sample); the others still count
            outcomes.append(error)
            continue
        arrays = {}
        for ext, image in images.items():
            count = image.patches.numel()  # uint8: bytes
            if start + count <= end:  # into the caller's slot of the shared arena: no copy through the pipe
                torch.frombuffer(arena.buf, dtype=torch.uint8, count=count, offset=start).copy_(image.patches.view(-1))
                arrays[ext] = ((start, tuple(image.patches.shape)), image.grid, image.size)
                start += count
            else:  # larger than the slot's rest: through the pipe
                arrays[ext] = (image.patches.numpy(), image.grid, image.size)
        # The members stay here: the loader uses the metadata and the patches, not the encoded bytes.
        outcomes.append((RawSample(raw.source, raw.shard, raw.key, {}), meta, arrays))
    return outcomes


class WorkerError(RuntimeError):
    """A loader worker process died (killed, out of memory, a crash in a native decoder)."""


class ProcessReader:
    """:meth:`SampleReader.load` in ``processes`` spawned workers; :meth:`load` and :meth:`load_many` block for
    their results (call them from up to ``callers`` threads at once to keep the workers busy; more wait their turn).

    Each worker serves one round trip at a time over its own pipe: a caller takes an idle worker, sends it the keys,
    and reads the outcomes back (no executor between them: its queues, feeder and management threads cost more
    per trip than pickling a chunk's keys and metadata). Read several samples per trip (:meth:`load_many`) to
    spread the trip's cost. Patches come back through a shared-memory arena with one slot per concurrent caller (a
    pipe would copy them four times, in chunks of its buffer, which costs more than decoding a small image); the
    returned raw samples have no members.
    """

    def __init__(self, reader: SampleReader, processes: int, callers: int, slot_bytes: int = SLOT_BYTES):
        self.arena = shared_memory.SharedMemory(create=True, size=callers * slot_bytes)
        self.closed = False
        self.broken = ""  # why no more round trips can be made (a dead worker, or closed)
        self.slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(callers):
            self.slots.put(slot)
        context = multiprocessing.get_context("spawn")
        self.processes = []
        self.idle: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, reader, self.arena.name, slot_bytes),
                                      name="loader-worker", daemon=True)
            process.start()
            theirs.close()
            self.processes.append(process)
            self.idle.put((ours, process))

    def load(self, name: str, position: int, draw: int, cap: int) -> Loaded:
        outcome = self.load_many([(name, position, draw, cap)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _round_trip(self, keys: list[tuple[str, int, int, int]], slot: int) -> list:
        worker = self.idle.get()
        if worker is None:  # closed, or a worker died: every caller waiting for a worker learns it
            self.idle.put(None)
            raise WorkerError(self.broken)
        connection, process = worker
        try:
            connection.send((keys, slot))
            outcomes = connection.recv()
        except (EOFError, OSError):
            if not self.broken:
                self.broken = (f"loader worker process {process.pid} died (exit code {process.exitcode}) while "
                               f"reading {keys[0]} and {len(keys) - 1} more draws")
            self.idle.put(None)
            raise WorkerError(self.broken) from None
        self.idle.put(worker)
        return outcomes

    def load_many(self, keys: list[tuple[str, int, int, int]]) -> list[Loaded | Exception]:
        """The reads of ``keys`` in one round trip to a worker: each a :meth:`SampleReader.load` result or the
        exception it raised."""
        slot = self.slots.get()
        try:
            outcomes = self._round_trip(keys, slot)
            for index, outcome in enumerate(outcomes):
                if isinstance(outcome, BaseException):
                    continue
                raw, meta, arrays = outcome
                images = {}
                for ext, (patches, grid, size) in arrays.items():
                    if isinstance(patches, tuple):  # (offset, shape) in the arena: copied out before reuse
                        offset, shape = patches
                        patches = torch.frombuffer(self.arena.buf, dtype=torch.uint8, count=math.prod(shape),
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
        # gone) long after the loader is done: stop the processes. Callers still waiting for a worker are woken
        # with an error (a prefetch thread blocked forever would hold up the interpreter's exit).
        self.broken = self.broken or "the loader's worker processes were closed"
        self.idle.put(None)
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join(timeout=5)
        self.processes = []
        if not self.closed:
            # Only the name goes now: a prefetch thread may still be copying out of the arena, so the mapping is
            # released with this object, once no thread uses it.
            self.closed = True
            self.arena.unlink()
