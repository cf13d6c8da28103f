"""The stateful per-rank data stream of one stage.

Each rank draws its own sub-stream: draw ``k`` of rank ``r`` has the global index ``k * dp_size + r``; its source
comes from :class:`~data.mixture.MixtureSampler` and its sample from the source's epoch permutation, the ``c``-th
draw of a source taking position ``c * dp_size + r`` of that order (ranks interleave, so they see different
samples). The state is a handful of counters plus the identity of the one document waiting for the next row, so a
resumed loader reproduces the uninterrupted stream exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from data.batch import ImageTextBatch, PackedBatch
from data.mixture import MixtureSampler, epoch_permutation
from data.packing import RowBuilder, collate_image_text, collate_rows
from data.samples import (
    Document,
    ImagePatches,
    RawSample,
    SampleError,
    ShardSource,
    caption_text,
    load_images,
    load_meta,
    render_document,
)
from data.tokenizer import TextTokenizer
from model.args import VisionArgs
from train.config import StageConfig

logger = logging.getLogger(__name__)
# Below this many draws a few corrupt samples say nothing about the corrupt fraction.
MIN_DRAWS_FOR_CORRUPT_CHECK = 100


class DataError(RuntimeError):
    """The data cannot feed the run (missing sources, too many corrupt samples)."""


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise DataError(f"no manifest at {path}: generate the demo data with `python -m data.synthetic --out {root}`")
    return json.loads(path.read_text())


class StageLoader:
    """Batches of one stage for one data-parallel rank; ``state_dict`` / ``load_state_dict`` make it resumable."""

    def __init__(
        self, stage_name: str, stage: StageConfig, root: str | Path, tokenizer: TextTokenizer, vision: VisionArgs,
        seed: int, dp_rank: int, dp_size: int, max_corrupt_fraction: float = 0.01,
    ):
        self.stage_name = stage_name
        self.stage = stage
        self.tokenizer = tokenizer
        self.vision = vision
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.max_corrupt_fraction = max_corrupt_fraction
        self.sampler = MixtureSampler(stage.mixture, seed, stage_name, images_only=stage.objective == "coca")
        manifest = read_manifest(root)
        known = manifest["sources"]
        missing = [name for name in self.sampler.sources() if name not in known]
        if missing:
            raise DataError(f"stage '{stage_name}' mixes sources {missing} that {Path(root) / 'manifest.json'} "
                            f"does not have; available: {sorted(known)}")
        self.sources = {name: ShardSource(name, Path(root), known[name]["shards"]) for name in self.sampler.sources()}
        self.draws = 0
        self.source_draws = {name: 0 for name in self.sources}
        self.corrupt = 0
        self.pending: tuple[str, int] | None = None
        self._pending_doc: Document | None = None
        self._orders: dict[tuple[str, int], Any] = {}

    # ----- drawing samples -------------------------------------------------------------------------------------

    def _draw(self, progress: float) -> tuple[str, int]:
        """The next (source, position) of this rank's stream; advances the counters."""
        name = self.sampler.choose(self.draws * self.dp_size + self.dp_rank, progress)
        slot = self.source_draws[name] * self.dp_size + self.dp_rank
        self.draws += 1
        self.source_draws[name] += 1
        size = len(self.sources[name])
        epoch, offset = divmod(slot, size)
        order = self._orders.get((name, epoch))
        if order is None:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != name}  # keep one epoch per source
            order = self._orders[(name, epoch)] = epoch_permutation(self.seed, self.stage_name, name, epoch, size)
        return name, int(order[offset])

    def _read(self, name: str, position: int) -> tuple[RawSample, dict, dict[str, ImagePatches]]:
        raw = self.sources[name].read(position)
        meta = load_meta(raw)
        images = load_images(raw, meta, self.vision.patch_size, self.vision.merge_size, self.stage.max_image_patches)
        return raw, meta, images

    def _skip(self, name: str, position: int, error: Exception) -> None:
        self.corrupt += 1
        where = self.sources[name].locate(position)
        logger.warning("skipped corrupt sample of source '%s' at %s: %s", name, where, error)
        if self.draws >= MIN_DRAWS_FOR_CORRUPT_CHECK and self.corrupt > self.max_corrupt_fraction * self.draws:
            raise DataError(f"{self.corrupt} of {self.draws} samples drawn in stage '{self.stage_name}' were corrupt, "
                            f"above data.max_corrupt_fraction={self.max_corrupt_fraction}")

    def _render(self, name: str, position: int) -> Document:
        _, meta, images = self._read(name, position)
        return render_document(meta, images, self.tokenizer, self.vision.merge_size, self.stage.seq_len)

    def _next_document(self, progress: float) -> tuple[tuple[str, int], Document]:
        while True:
            name, position = self._draw(progress)
            try:
                return (name, position), self._render(name, position)
            except SampleError as error:
                self._skip(name, position, error)

    # ----- batches ---------------------------------------------------------------------------------------------

    def next_packed_batch(self, progress: float) -> PackedBatch:
        """``micro_batch_size`` rows of ``seq_len`` tokens for the language-model objective."""
        builder = RowBuilder(self.stage.seq_len, self.tokenizer.pad_id)
        rows = []
        while len(rows) < self.stage.micro_batch_size:
            if self._pending_doc is None:
                self.pending, self._pending_doc = self._next_document(progress)
            if builder.fits(self._pending_doc):
                builder.add(self._pending_doc)
                self.pending, self._pending_doc = None, None
            else:
                rows.append(builder.finish())
        patch_dim = self.vision.in_channels * self.vision.patch_size**2
        return collate_rows(rows, self.tokenizer.image_id, patch_dim, self.vision.merge_size)

    def next_image_text_batch(self, progress: float) -> ImageTextBatch:
        """``micro_batch_size`` (image, text) pairs for the CoCa objective (first image of each sample)."""
        pairs = []
        tok = self.tokenizer
        while len(pairs) < self.stage.micro_batch_size:
            name, position = self._draw(progress)
            try:
                raw, meta, images = self._read(name, position)
                if not images:
                    raise SampleError("no image for the image-text objective")
                first = next(s["image"] for s in meta["segments"] if "image" in s)
                ids = tok.encode(caption_text(meta))[: self.stage.max_text_len - 2]
                pairs.append((images[first], [tok.bos_id, *ids, tok.eos_id]))
            except SampleError as error:
                self._skip(name, position, error)
        return collate_image_text(pairs, tok.pad_id)

    # ----- Stateful ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "source_draws": dict(self.source_draws),
            "corrupt": self.corrupt,
            "pending": list(self.pending) if self.pending is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
        self.source_draws = {name: int(state["source_draws"].get(name, 0)) for name in self.sources}
        self.corrupt = int(state["corrupt"])
        pending = state.get("pending")
        self.pending = (pending[0], int(pending[1])) if pending else None
        # The waiting document is re-rendered from its identity: rendering is a pure function of the sample.
        self._pending_doc = self._render(*self.pending) if self.pending else None
