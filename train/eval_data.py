"""Evaluation inputs: held-out samples read from a data root, documents turned into model batches, and the
log-probabilities the metrics are built from.

Evaluation reuses the training formats end to end (:mod:`data.samples` renders a sample exactly as the loader does,
:mod:`data.packing` collates rows), so a held-out loss is the same quantity as the training loss, on other samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from config.model import VisionArgs
from data.batch import PackedBatch
from data.loader import read_manifest
from data.packing import RowBuilder, collate_rows
from data.samples import (
    Document,
    ImagePatches,
    SampleError,
    ShardSource,
    load_images,
    load_meta,
)
from data.tokenizer import TextTokenizer
from storage import Storage
from train.loss import linear_cross_entropy_sum, masked_targets


@dataclass
class HeldOutSample:
    """One decoded sample of a source: its metadata (segments, caption, ...) and its images by member name."""

    source: str
    key: str
    meta: dict
    images: dict[str, ImagePatches]


class HeldOutData:
    """Read-only access to the samples of a data root, for evaluation.

    A source whose manifest entry has a held-out split (``heldout_shards``: written by ``python -m data.prepare
    --heldout-fraction`` and by the demo generator; the loader never reads them) is evaluated on it. Otherwise
    samples are taken from the *end* of the source's training shards, which the loader does draw from: held out
    only if the root is not the training root (e.g. ``python -m data.synthetic --seed 1``). Either way the choice is
    deterministic, so two evaluations of different checkpoints see the same samples.

    Args:
        storage: Where ``manifest.json`` and the shards are.
        vision: The model's vision hyper-parameters (patch and merge size for patchifying).
        max_image_patches: Per-image patch cap (the stage's ``max_image_patches``).
        use_heldout_split: Read held-out splits where sources have them; False reads every source's training
            shards (a root kept apart from training as a whole).
    """

    def __init__(self, storage: Storage, vision: VisionArgs, max_image_patches: int, use_heldout_split: bool = True):
        self.storage = storage
        self.use_heldout_split = use_heldout_split
        self.vision = vision
        self.max_image_patches = max_image_patches
        self.manifest = read_manifest(storage)
        self._sources: dict[str, ShardSource] = {}

    @property
    def source_names(self) -> list[str]:
        return list(self.manifest["sources"])

    def source(self, name: str) -> ShardSource:
        if name not in self.manifest["sources"]:
            raise KeyError(f"source '{name}' is not in {self.storage.url}/manifest.json; available: "
                           f"{sorted(self.manifest['sources'])}")
        if name not in self._sources:
            entry = self.manifest["sources"][name]
            split = "heldout_" if self.has_heldout_split(name) else ""
            self._sources[name] = ShardSource(name, self.storage, entry[f"{split}shards"], False, 1,
                                              entry.get(f"{split}shard_samples"), entry.get("index_suffix", ""))
        return self._sources[name]

    def has_heldout_split(self, name: str) -> bool:
        """Whether source ``name`` has held-out shards of its own (else its training shards' tail is read)."""
        return self.use_heldout_split and bool(self.manifest["sources"][name].get("heldout_shards"))

    def samples(self, name: str, count: int, max_image_patches: int | None = None) -> Iterator[HeldOutSample]:
        """Up to ``count`` valid samples of source ``name``, from its last positions backwards (corrupt ones are
        skipped: evaluation measures the model, not the data)."""
        source = self.source(name)
        cap = max_image_patches or self.max_image_patches
        produced = 0
        for position in range(len(source) - 1, -1, -1):
            if produced >= count:
                return
            raw = source.read(position)
            try:
                meta = load_meta(raw)
                images = load_images(raw, meta, self.vision.patch_size, self.vision.merge_size, cap)
            except SampleError:
                continue
            produced += 1
            yield HeldOutSample(name, raw.key, meta, images)


def image_span_document(tokens: list[int], tokenizer: TextTokenizer, merge: int,
                        parts: list[list[int] | ImagePatches]) -> Document:
    """A :class:`Document` of ``tokens`` followed by ``parts``: token lists and images (each image becomes its
    ``<|image_start|> <|image|> * n <|image_end|>`` span, as :func:`data.samples.render_document` writes it).

    Nothing is supervised: evaluation reads logits where it needs them.
    """
    doc = Document(list(tokens), [False] * len(tokens))
    for part in parts:
        if isinstance(part, ImagePatches):
            count = (part.grid[0] // merge) * (part.grid[1] // merge)
            doc.spans.append((len(doc.tokens), len(doc.tokens) + count + 2))
            doc.tokens += [tokenizer.image_start_id] + [tokenizer.image_id] * count + [tokenizer.image_end_id]
            doc.supervised += [False] * (count + 2)
            doc.images.append(part)
        else:
            doc.tokens += part
            doc.supervised += [False] * len(part)
    return doc


def pack_documents(docs: list[Document], seq_len: int, tokenizer: TextTokenizer, vision: VisionArgs
                   ) -> Iterator[PackedBatch]:
    """Pack whole documents (each at most ``seq_len`` tokens) greedily into one-row batches of ``seq_len``.

    Each document keeps its own positions and attention span (``cu_seqlens``), so a document's loss does not depend
    on what it is packed with.
    """
    patch_dim = vision.in_channels * vision.patch_size**2
    builder = RowBuilder(seq_len, tokenizer.pad_id)
    for doc in docs:
        if len(doc.tokens) > seq_len:
            raise ValueError(f"a document of {len(doc.tokens)} tokens does not fit a row of {seq_len}")
        if not builder.fits(doc):
            yield collate_rows([builder.finish()], tokenizer.image_id, patch_dim, vision.merge_size)
        builder.add(doc)
    if builder.row.tokens:
        yield collate_rows([builder.finish()], tokenizer.image_id, patch_dim, vision.merge_size)


def document_batch(doc: Document, tokenizer: TextTokenizer, vision: VisionArgs) -> PackedBatch:
    """One document as a one-row batch of exactly its length (no padding)."""
    return next(pack_documents([doc], len(doc.tokens), tokenizer, vision))


def forward_logits(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """``[rows, seq_len, vocab]`` next-token logits of a packed batch."""
    logits, _ = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.pixel_values,
                      batch.image_grid_hw, batch.image_token_positions)
    return logits.float()


def batch_loss_sum(model: nn.Module, batch: PackedBatch) -> tuple[float, int]:
    """Summed next-token cross-entropy over the batch's supervised targets, and their count (the trainer's
    ``lm_step`` quantity and loss function, without the gradient)."""
    hidden, _ = model.hidden_states(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.pixel_values,
                                    batch.image_grid_hw, batch.image_token_positions)
    ce = linear_cross_entropy_sum(hidden, model.decoder.output.weight, masked_targets(batch.labels, batch.loss_mask))
    return float(ce), batch.num_loss_tokens


def continuation_logprobs(model: nn.Module, prefix: Document, candidates: list[list[int]],
                          tokenizer: TextTokenizer, vision: VisionArgs) -> list[float]:
    """``log p(candidate | prefix)`` summed over each candidate's tokens.

    When every candidate is one token, a single forward pass of the prefix scores them all (the next-token
    distribution at its last position); otherwise each candidate is appended and scored by its own pass.
    """
    if all(len(c) == 1 for c in candidates):
        logits = forward_logits(model, document_batch(prefix, tokenizer, vision))[0, -1]
        logprobs = logits.log_softmax(-1)
        return [float(logprobs[c[0]]) for c in candidates]
    scores = []
    for candidate in candidates:
        doc = Document(prefix.tokens + candidate, prefix.supervised + [False] * len(candidate), prefix.images,
                       prefix.spans)
        logits = forward_logits(model, document_batch(doc, tokenizer, vision))[0]
        start = len(prefix.tokens)
        logprobs = logits[start - 1: start - 1 + len(candidate)].log_softmax(-1)
        scores.append(float(logprobs.gather(-1, torch.tensor(candidate).view(-1, 1)).sum()))
    return scores


def greedy_decode(model: nn.Module, prefix: Document, max_new_tokens: int, tokenizer: TextTokenizer,
                  vision: VisionArgs) -> list[int]:
    """Greedy continuation of ``prefix``, ``max_new_tokens`` tokens (stops early at ``<|eos|>``).

    Without a KV cache every token re-runs the whole prefix: fine for the few answer tokens a needle needs.
    """
    generated: list[int] = []
    for _ in range(max_new_tokens):
        doc = Document(prefix.tokens + generated, prefix.supervised + [False] * len(generated), prefix.images,
                       prefix.spans)
        logits = forward_logits(model, document_batch(doc, tokenizer, vision))[0, -1]
        token = int(logits.argmax())
        generated.append(token)
        if token == tokenizer.eos_id:
            break
    return generated
