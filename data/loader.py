"""The stateful data stream of one stage, as seen by one data-parallel rank: a façade over the stage's
:class:`~data.planner.Planner` (what each draw is; its counters are the state), :class:`~data.reader.Reader` (the
reads, ahead of need, and the corrupt samples) and :class:`~data.packer.Packer` (rows or image-text pairs).

Every random choice is a pure function of ``(seed, stage, index)`` and the state is a handful of counters per slot
of the global batch plus the identity of the one document waiting for the next row, so a resumed loader reproduces
the uninterrupted stream exactly, at any data-parallel size.
"""

from __future__ import annotations

import json
from typing import Any

from config.model import VisionArgs
from config.schema import DataConfig, StageConfig
from data.batch import ImageTextBatch, PackedBatch
from data.formats import DataError
from data.images import background_rgb
from data.megatron import MegatronSource, is_megatron
from data.mixture import MixtureSampler
from data.packer import MAX_ROWS_PER_DOCUMENT, Packer
from data.planner import Planner, SlotStream
from data.prefetch import Prefetcher
from data.reader import Reader
from data.sample_reader import SampleReader
from data.samples import ShardSource
from data.tokenizer import TextTokenizer
from storage import Storage

# Observers every new loader gets (see StageLoader.observe): for tests that record what each rank consumed.
TEST_OBSERVERS: list = []


def read_manifest(storage: Storage) -> dict:
    try:
        return json.loads(storage.read("manifest.json"))
    except FileNotFoundError:
        raise DataError(f"no manifest.json in {storage.url}: generate the demo data with "
                        f"`python -m data.synthetic --out DIR` or build shards with your own tooling") from None


def open_sources(stage_name: str, names: list[str], storage: Storage, data: DataConfig,
                 vocab_size: int) -> dict[str, ShardSource | MegatronSource]:
    """The sources ``names`` of the manifest in ``storage``; a :class:`DataError` lists those it lacks."""
    manifest = read_manifest(storage)
    known = manifest["sources"]
    missing = [name for name in names if name not in known]
    if missing:
        hint = ""
        if "scale" in manifest:  # the generated demo corpus, from before these sources existed
            hint = f"; regenerate the demo corpus: python -m data.synthetic --out {storage.url}"
        raise DataError(f"stage '{stage_name}' mixes sources {missing} that {storage.url}/manifest.json "
                        f"does not have; available: {sorted(known)}{hint}")
    return {
        name: MegatronSource(name, storage, known[name], vocab_size, data.cache_dir)
        if is_megatron(known[name]) else
        ShardSource(name, storage, known[name]["shards"], data.skip_missing_shards, data.prefetch_threads,
                    known[name].get("shard_samples"), known[name].get("index_suffix", ""))
        for name in names}


class StageLoader:
    """Batches of one stage for one data-parallel rank; ``state_dict`` / ``load_state_dict`` make it resumable.

    The global batch of a micro-step has ``micro_batch_size x dp_size`` slots (packed rows, or image-text pairs);
    each slot is an independent stream (:class:`~data.planner.SlotStream`) and rank ``r`` serves slots
    ``r * m .. r * m + m - 1``. So the global stream depends only on the number of slots, not on how they are split:
    dp=2 with 2 rows per rank and dp=4 with 1 row per rank train on the same rows, and a checkpoint (one state per
    slot) resumes at either.

    Args:
        stage_name: The stage's name (part of every random choice).
        stage: The stage.
        data: The run's data options: read-ahead (``prefetch_samples``, ``prefetch_threads``, ``loader_workers``;
            none of them changes the stream), ``max_corrupt_fraction``, ``skip_missing_shards``, ``cache_dir``
            (Megatron sources), ``alpha_background``.
        storage: Where the manifest and the shards are (:func:`storage.open_storage`, :func:`storage.build_storage`).
        tokenizer: The text tokenizer.
        vision: The vision tower's patch, merge and channel sizes.
        seed: The run's seed.
        shard: ``(rank, size)`` of this rank's share of the global batch.
    """

    def __init__(self, stage_name: str, stage: StageConfig, data: DataConfig, storage: Storage,
                 tokenizer: TextTokenizer, vision: VisionArgs, seed: int, shard: tuple[int, int]):
        self.stage_name = stage_name
        self.stage = stage
        self.shard = shard
        self.image_text = stage.objective == "coca"
        sampler = MixtureSampler(stage.mixture, seed, stage_name, images_only=self.image_text)
        sources = open_sources(stage_name, sampler.sources(), storage, data, tokenizer.vocab_size)
        self.planner = Planner(sampler, sources, stage, shard)
        max_tokens = stage.max_text_len if self.image_text else stage.seq_len * MAX_ROWS_PER_DOCUMENT
        sample_reader = SampleReader(sources, stage.augment, seed, stage_name, vision.patch_size, vision.merge_size,
                                     tokenizer, self.image_text, max_tokens, background_rgb(data.alpha_background))
        self.reader = Reader(self.planner, sample_reader, data, stage_name)
        self.packer = Packer(self.reader, stage.seq_len, tokenizer, vision)
        for observer in TEST_OBSERVERS:
            self.observe(lambda *event, _observer=observer: _observer(self, *event))

    def observe(self, observer) -> None:
        """Call ``observer("row", slot, PackedRow)`` for every row packed, ``observer("pair", slot, draw key,
        (image, caption ids))`` for every image-text pair and ``observer("skip", slot, draw key, error)`` for every
        corrupt sample skipped (inspection: train/inspect.py; None: stop). The stream is unchanged."""
        self.packer.observer = self.reader.observer = observer

    @property
    def slots(self) -> list[SlotStream]:
        return self.planner.slots

    @property
    def corrupt(self) -> int:
        return self.reader.corrupt

    @property
    def missing_shards(self) -> list[str]:
        """Shards of this stage's sources that were missing and skipped (``data.skip_missing_shards``)."""
        return self.reader.missing_shards

    @property
    def prefetcher(self) -> Prefetcher | None:
        return self.reader.prefetcher

    def image_patch_cap(self, progress: float) -> int:
        """The per-image patch cap at ``progress`` (see :meth:`Planner.image_patch_cap`)."""
        return self.planner.image_patch_cap(progress)

    def settle(self) -> None:
        """Wait until the reads prefetched so far are done (see :meth:`Prefetcher.settle`); the stream is unchanged."""
        self.reader.settle()

    def close(self) -> None:
        """Stop the prefetch threads and worker processes (the loader keeps working, reading in the foreground)."""
        self.reader.close()

    def next_packed_batch(self, progress: float) -> PackedBatch:
        """One packed row of ``seq_len`` tokens from each of this rank's slots (the language-model objective)."""
        self._check_objective(False)
        self.reader.read_ahead(progress)
        return self.packer.packed_batch(self.slots, progress)

    def next_image_text_batch(self, progress: float) -> ImageTextBatch:
        """One (image, caption ids) pair from each of this rank's slots (the CoCa objective; first image of a
        sample)."""
        self._check_objective(True)
        self.reader.read_ahead(progress)
        return self.packer.image_text_batch(self.slots, progress)

    def _check_objective(self, image_text: bool) -> None:
        if image_text != self.image_text:
            wanted = "image-text pairs" if image_text else "packed rows"
            raise DataError(f"stage '{self.stage_name}' has the '{self.stage.objective}' objective, which does not "
                            f"train on {wanted}")

    def state_dict(self) -> dict[str, Any]:
        """One entry per slot, keyed by its global slot index: reshardable across data-parallel sizes."""
        return self.planner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.planner.load_state_dict(state)
        self.packer.forget()
