"""The per-draw read (fetch, parse, decode, augment, patchify), in-process or in worker processes.

A draw's read is a pure function of ``(source, position, draw index, patch cap)`` and the stage's fixed settings, so
it can run anywhere: :class:`SampleReader` is that function; :class:`ProcessReader` runs it in spawned worker
processes (spawned, not forked: the trainer has threads, process groups and possibly CUDA, none of which survive a
fork) for when decoding and resizing need more than one core. Workers return patches as arrays, so no shared-memory
tensor handles cross the process boundary; the loader's output is the same with any number of workers.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch

from data.augment import AugmentConfig, plan_augment
from data.mixture import draw_rng
from data.samples import ImagePatches, RawSample, load_images, load_meta
from data.shards import ShardSource

Loaded = tuple[RawSample, dict, dict[str, ImagePatches]]


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


def _start(reader: SampleReader) -> None:
    global _READER
    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    _READER = reader


def _load_in_worker(key: tuple[str, int, int, int]):
    raw, meta, images = _READER.load(*key)
    return raw, meta, {ext: (p.patches.numpy(), p.grid, p.size) for ext, p in images.items()}


class ProcessReader:
    """:meth:`SampleReader.load` in ``processes`` spawned workers; :meth:`load` blocks for one result (call it from
    several threads to keep the workers busy)."""

    def __init__(self, reader: SampleReader, processes: int):
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start, initargs=(reader,))

    def load(self, name: str, position: int, draw: int, cap: int) -> Loaded:
        raw, meta, arrays = self.pool.submit(_load_in_worker, (name, position, draw, cap)).result()
        images = {ext: ImagePatches(torch.from_numpy(patches), tuple(grid), tuple(size))
                  for ext, (patches, grid, size) in arrays.items()}
        return raw, meta, images

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
