"""The per-draw read: fetch, parse, decode, augment, patchify, tokenize.

A draw's read is a pure function of ``(source, position, draw index, patch cap)`` and the stage's fixed settings, so
it can run anywhere: in the trainer's process, on its read-ahead threads, or in worker processes
(:mod:`data.workers`). :class:`SampleReader` is that function, down to what the loader packs or collates (a
tokenized document, or an image and its caption's token ids): the trainer's process, whose threads share one GIL
with the training step, is left with collation.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

from data.augment import AugmentConfig, plan_augment
from data.images import WHITE, PatchBuffer
from data.megatron import read_with_token_sources
from data.mixture import DrawRandom
from data.samples import (
    Augmenter,
    Document,
    ImagePatches,
    RawSample,
    SampleError,
    caption_text,
    load_meta,
    open_images,
    patchify_images,
    render_document,
)
from data.shards import INDEX_READS_AT_ONCE, ShardSource, shards_to_index
from data.tokenizer import TextTokenizer

Loaded = tuple[RawSample, dict, dict[str, ImagePatches]]
# A draw as the loader uses it: a document for the language-model objective; for the image-text (CoCa) objective
# the sample's first image and its caption's token ids (with bos and eos).
ImageText = tuple[ImagePatches, list[int]]
Drawn = Document | ImageText


class SampleReader:
    """Reads draws of a stage: raw members, checked metadata and decoded (augmented) image patches, and from them
    what the loader uses (:meth:`read`; several draws at a time, step by step over them: :meth:`read_many`).

    Args:
        sources: The stage's sources by name.
        augment_cfg: The stage's augmentation.
        seed: Run seed.
        stage_name: Stage name (part of every random choice).
        patch_size: ViT patch side.
        merge_size: Projector merge side.
        tokenizer: The text tokenizer (:meth:`read` only).
        image_text: :meth:`read` gives image-text pairs (the CoCa objective) instead of documents.
        max_tokens: :meth:`read`'s limit: tokens of a caption (bos and eos included), or of a document.
        background: RGB colour transparent pixels are composited onto (``data.alpha_background``).
    """

    def __init__(self, sources: dict[str, ShardSource], augment_cfg: AugmentConfig, seed: int, stage_name: str,
                 patch_size: int, merge_size: int, tokenizer: TextTokenizer | None = None, image_text: bool = False,
                 max_tokens: int = 0, background: tuple[int, int, int] = WHITE):
        self.sources = sources
        self.augment_cfg = augment_cfg
        self.seed, self.stage_name = seed, stage_name
        self.patch_size, self.merge_size = patch_size, merge_size
        self.tokenizer, self.image_text, self.max_tokens = tokenizer, image_text, max_tokens
        self.background = background

    def read(self, name: str, position: int, draw: int, cap: int) -> Drawn:
        """The draw as the loader uses it (see :data:`Drawn`); raises :class:`SampleError` for a corrupt sample."""
        outcome = self.read_many([(name, position, draw, cap)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def read_many(self, keys: list[tuple[str, int, int, int]],
                  patch_buffer: PatchBuffer | None = None) -> list[Drawn | Exception]:
        """:meth:`read` of each key, or the exception it raised; patches are cut into ``patch_buffer``'s memory if
        given (:data:`data.images.PatchBuffer`).

        The draws go through the read step by step together (fetch all, parse all, open and plan all, decode and
        patchify all, tokenize all), not one after another: each step's code and tables then stay in the CPU caches
        from one draw to the next (fetching, parsing and tokenizing interleaved with decoding cost several times
        what they do in a row), and captions are tokenized in one call."""
        if any(getattr(self.sources[key[0]], "token_source", False) for key in keys):
            return read_with_token_sources(self, keys, patch_buffer)  # Megatron corpora (data/megatron.py)
        self._index_shards(keys)
        staged: list = list(keys)
        for step in (self._fetch, self._parse, self._open, functools.partial(self._decode, patch_buffer=patch_buffer)):
            _each(staged, step)
        if self.image_text:
            return self._pairs(staged)
        _each(staged, self._render)
        return staged

    def _index_shards(self, keys: list[tuple[str, int, int, int]]) -> None:
        """Read the indexes of the shards these draws land in that are not indexed yet, all at once: fetched one
        draw after another, each would wait for its own (at a start or resume, a request's draws land in a dozen
        shards never read)."""
        if len(keys) < 2:  # one draw reads its own shard's index as it is fetched
            return
        unindexed = shards_to_index(self.sources, keys)
        if len(unindexed) > 1:
            with ThreadPoolExecutor(min(len(unindexed), INDEX_READS_AT_ONCE), "shard-index") as pool:
                list(pool.map(lambda job: self.sources[job[0]].load_index(job[1]), unindexed))

    def _fetch(self, key: tuple[str, int, int, int]) -> tuple:
        name, position, _, _ = key
        return key, self.sources[name].read(position)

    def _parse(self, fetched: tuple) -> tuple:
        key, raw = fetched
        return key, raw, load_meta(raw)

    def _open(self, parsed: tuple) -> tuple:
        key, raw, meta = parsed
        _, _, draw, _ = key
        return key, raw, meta, open_images(raw, meta, self._augmenter(draw, meta), self.background)

    def _decode(self, opened: tuple, patch_buffer: PatchBuffer | None = None) -> Loaded:
        (_, _, _, cap), raw, meta, images = opened
        return raw, meta, patchify_images(images, self.patch_size, self.merge_size, cap, patch_buffer)

    def _render(self, loaded: Loaded) -> Document:
        _, meta, images = loaded
        return render_document(meta, images, self.tokenizer, self.merge_size, self.max_tokens)

    def _augmenter(self, draw: int, meta: dict) -> Augmenter | None:
        """A sample's augmentation plan, if its kind is augmented: a pure function of the draw, so the same sample
        drawn again (or re-rendered after resume) looks the same."""
        cfg = self.augment_cfg
        if not (cfg.enabled and meta.get("kind") in cfg.kinds):
            return None
        rng = DrawRandom(self.seed, self.stage_name, draw, "augment")
        return lambda size, objects: plan_augment(size, objects, cfg, rng)

    def _pairs(self, loaded: list[Loaded | Exception]) -> list[ImageText | Exception]:
        outcomes: list[ImageText | Exception] = []
        texts = []
        for outcome in loaded:
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                image, text = self._image_and_text(outcome[1], outcome[2])
                outcomes.append(image)
                texts.append(text)
            except Exception as error:
                outcomes.append(error)
        tok = self.tokenizer
        encoded = iter(tok.encode_many(texts))
        return [outcome if isinstance(outcome, Exception) else
                (outcome, [tok.bos_id, *next(encoded)[:self.max_tokens - 2], tok.eos_id]) for outcome in outcomes]

    def _image_and_text(self, meta: dict, images: dict[str, ImagePatches]) -> tuple[ImagePatches, str]:
        """The image-text objective's pair: the sample's first image, and its caption (OCR text, object labels)."""
        if not images:
            raise SampleError("no image for the image-text objective")
        first = next(s["image"] for s in meta["segments"] if "image" in s)
        return images[first], caption_text(meta)


def _each(staged: list, step) -> None:
    """Replace each entry of ``staged`` that is not an exception by ``step`` of it, or by the exception it raised (a
    corrupt sample fails its own draw, the others go on)."""
    for index, entry in enumerate(staged):
        if not isinstance(entry, Exception):
            try:
                staged[index] = step(entry)
            except Exception as error:  # noqa: BLE001 (this draw's outcome, e.g. a corrupt sample)
                staged[index] = error
