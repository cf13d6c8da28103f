"""Sample formats: checking samples read from the shards (:mod:`data.shards`) and rendering them into token
documents.

A sample is a group of tar members sharing a key: ``<key>.json`` (``kind``, ordered ``segments`` of
``{"text": ...}`` / ``{"image": "<member ext>"}``, plus kind-specific fields such as grounding ``objects``) and its
images. Rendering turns it into a :class:`Document`: token ids with image placeholder spans
(``<|image_start|> <|image|> * n <|image_end|>``) and the patch grids that fill them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from data.formats import (  # noqa: F401  (SampleError, BOX_* and format_box are part of this module's interface)
    BOX_END,
    BOX_GRID,
    BOX_START,
    SampleError,
    check_actions,
    check_point,
    expand_segments,
    format_action,
    format_box,
    grounding_text,
)
from data.images import WHITE, ColourJitter, EncodedPng, ImageError, PatchBuffer, Warp, image_to_patches, open_image
from data.shards import RawSample, ShardSource  # noqa: F401  (part of this module's interface)
from data.tokenizer import TextTokenizer

KINDS = ("caption", "ocr", "grounding", "interleaved", "text", "long_doc", "dialogue", "video", "agent")
# ChatML roles of dialogue segments; only assistant turns are loss targets.
ROLES = ("system", "user", "assistant")
# Plans an image's augmentation from its (width, height) and its grounding objects: the warp to the augmented
# frame, the colour jitter and the moved objects (data.augment.plan_augment with a draw's generator).
Augmenter = Callable[[tuple[int, int], list[dict]], tuple[Warp, ColourJitter | None, list[dict]]]


@dataclass
class ImagePatches:
    patches: torch.Tensor  # uint8 [rows * cols, p * p * 3], each patch (y, x, channel) (data.images.cut_patches)
    grid: tuple[int, int]  # (rows, cols) in patches
    size: tuple[int, int]  # (width, height) of the stored image, the frame of its boxes


@dataclass
class Document:
    """One rendered sample: ``tokens[t]`` is predicted from ``tokens[:t]`` when ``supervised[t]``."""

    tokens: list[int]
    supervised: list[bool]
    images: list[ImagePatches] = field(default_factory=list)
    # [start, end) of each image's placeholder span, in the order of ``images``.
    spans: list[tuple[int, int]] = field(default_factory=list)

    def split_point(self, start: int, limit: int) -> int:
        """The largest cut at most ``limit`` that does not split an image span (pieces start at ``start``)."""
        for span_start, span_end in self.spans:
            if span_start < limit < span_end:
                return max(span_start, start)
        return limit

    def piece(self, start: int, stop: int) -> Document:
        """Tokens ``[start, stop)`` as a document of their own, with the images whose spans lie inside."""
        inside = [i for i, (a, b) in enumerate(self.spans) if start <= a and b <= stop]
        return Document(self.tokens[start:stop], self.supervised[start:stop], [self.images[i] for i in inside],
                        [(self.spans[i][0] - start, self.spans[i][1] - start) for i in inside])


def load_meta(sample: RawSample) -> dict:
    """Parse and check ``<key>.json``; raise :class:`SampleError` on anything malformed."""
    if "json" not in sample.members:
        raise SampleError("missing field: no .json member")
    try:
        meta = json.loads(sample.members["json"].decode("utf-8"))
    except UnicodeDecodeError:
        raise SampleError("invalid UTF-8 in .json") from None
    except json.JSONDecodeError as error:
        raise SampleError(f"invalid JSON: {error}") from None
    segments = meta.get("segments") if isinstance(meta, dict) else None
    if not isinstance(segments, list) or not segments:
        raise SampleError("missing field: 'segments' must be a non-empty list")
    for segment in segments:
        if not isinstance(segment, dict) or not (isinstance(segment.get("text"), str) or "image" in segment):
            raise SampleError(f"bad segment {segment!r}: expected {{'text': str}} or {{'image': ext}}")
        if segment.get("role", "user") not in ROLES:
            raise SampleError(f"bad role {segment['role']!r}: expected one of {ROLES}")
    expand_segments(meta)  # video frames and agent steps become segments
    for segment in meta["segments"]:
        if "image" in segment and segment["image"] not in sample.members:
            raise SampleError(f"missing field: image member '{segment['image']}'")
    return meta


@dataclass
class OpenedImage:
    """An image of a sample with its header parsed and checked and its augmentation planned, not yet decoded."""

    image: Image.Image | EncodedPng
    # (width, height) of the frame it is shown in: the augmented one, else the stored image's (taken when opened: a
    # JPEG decoded at a reduced scale changes its image's size).
    frame: tuple[int, int]
    warp: Warp | None = None
    jitter: ColourJitter | None = None


def open_images(sample: RawSample, meta: dict, augmenter: Augmenter | None = None,
                background: tuple[int, int, int] = WHITE) -> dict[str, OpenedImage]:
    """Parse and check the header of every image the segments reference (keyed by member extension), and plan its
    augmentation; nothing is decoded yet (:func:`patchify_images` does that), except images with transparency,
    composited onto ``background`` as they are opened (:func:`data.images.open_image`).

    ``augmenter`` plans each image's augmentation from its size and the sample's grounding objects, which belong to
    its first image; ``meta["objects"]`` is replaced by the transformed ones.
    """
    images: dict[str, OpenedImage] = {}
    for segment in meta["segments"]:
        ext = segment.get("image")
        if ext is None or ext in images:
            continue
        try:
            image = open_image(sample.members[ext], background)
        except ImageError as error:
            raise SampleError(f"image '{ext}': {error}") from None
        first = not images
        if first:
            _check_objects(meta, image.size)
        opened = images[ext] = OpenedImage(image, image.size)
        if augmenter is not None:
            opened.warp, opened.jitter, objects = augmenter(image.size, meta.get("objects", []) if first else [])
            opened.frame = opened.warp.size
            if first and "objects" in meta:
                meta["objects"] = objects
    # Before augmentation would matter: agent steps are never augmented, their screenshots keep their frame.
    check_actions(meta, {ext: opened.frame for ext, opened in images.items()})
    return images


def patchify_images(images: dict[str, OpenedImage], patch: int, merge: int, max_patches: int,
                    patch_buffer: PatchBuffer | None = None) -> dict[str, ImagePatches]:
    """Decode opened images and cut them into patch grids of at most ``max_patches`` (the planned warp is sampled
    as they are patchified, so an image is decoded once and resampled at most once), in ``patch_buffer``'s memory
    if given (:data:`data.images.PatchBuffer`)."""
    patched = {}
    for ext, opened in images.items():
        try:
            patches, grid = image_to_patches(opened.image, patch, merge, max_patches, warp=opened.warp,
                                             jitter=opened.jitter, patch_buffer=patch_buffer)
        except ImageError as error:
            raise SampleError(f"image '{ext}': {error}") from None
        patched[ext] = ImagePatches(patches, grid, opened.frame)
    return patched


def load_images(sample: RawSample, meta: dict, patch: int, merge: int, max_patches: int,
                augmenter: Augmenter | None = None, background: tuple[int, int, int] = WHITE
                ) -> dict[str, ImagePatches]:
    """Decode and patchify every image the segments reference, keyed by member extension (:func:`open_images`, then
    :func:`patchify_images`)."""
    return patchify_images(open_images(sample, meta, augmenter, background), patch, merge, max_patches)


def _check_objects(meta: dict, size: tuple[int, int]) -> None:
    width, height = size
    for obj in meta.get("objects", []):
        if not (isinstance(obj, dict) and isinstance(obj.get("label"), str) and ("box" in obj or "point" in obj)):
            raise SampleError(f"bad grounding object {obj!r}: expected {{'label': str, 'box': [x0, y0, x1, y1]}} "
                              "and/or 'point': [x, y]")
        if "box" in obj:
            box = obj["box"]
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise SampleError(f"bad box {box!r}: expected [x0, y0, x1, y1]")
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise SampleError(f"box {box} outside the {width}x{height} image")
        if "point" in obj:
            check_point(obj["point"], size)


def render_document(
    meta: dict, images: dict[str, ImagePatches], tokenizer: TextTokenizer, merge: int,
    max_len: int,
) -> Document:
    """Tokens of a sample for the language-model objective, cut to at most ``max_len`` tokens.

    Segments with a ``role`` (ChatML dialogue) are wrapped in ``<|im_start|>role\n ... <|im_end|>\n`` turns and only
    assistant turns are loss targets; other samples are supervised on all their text. Placeholder tokens are never
    targets (their content comes from the vision tower). A cut never splits an image span: an image that does not
    fit whole is dropped with everything after it.
    """
    pieces = list(meta["segments"])
    if meta.get("kind") == "grounding":
        first_image = next(s["image"] for s in pieces if "image" in s)
        pieces.append({"text": grounding_text(meta.get("objects", []), images[first_image].size)})
    doc = Document([tokenizer.bos_id], [False])
    spans = doc.spans
    role = None
    for segment in pieces:
        if segment.get("role") != role:
            _close_turn(doc, tokenizer, role)
            role = segment.get("role")
            if role is not None:
                header = [tokenizer.im_start_id, *tokenizer.encode(f"{role}\n")]
                doc.tokens += header
                doc.supervised += [False] * len(header)
        if "action" in segment:  # an agent step: text with coordinates on its screenshot's grid
            size = images[segment["screen"]].size if segment["screen"] else None
            segment = {"text": format_action(segment["action"], size) + "\n"}
        if "image" in segment:
            patches = images[segment["image"]]
            count = (patches.grid[0] // merge) * (patches.grid[1] // merge)
            spans.append((len(doc.tokens), len(doc.tokens) + count + 2))
            doc.tokens += [tokenizer.image_start_id] + [tokenizer.image_id] * count + [tokenizer.image_end_id]
            doc.supervised += [False] * (count + 2)
            doc.images.append(patches)
        else:
            ids = tokenizer.encode(segment["text"])
            doc.tokens += ids
            doc.supervised += [role in (None, "assistant")] * len(ids)
    _close_turn(doc, tokenizer, role)
    doc.tokens.append(tokenizer.eos_id)
    doc.supervised.append(role is None or role == "assistant")
    _cut(doc, spans, max_len)
    if sum(doc.supervised) == 0:
        raise SampleError("renders to no supervised token")
    return doc


def _close_turn(doc: Document, tokenizer: TextTokenizer, role: str | None) -> None:
    if role is None:
        return
    closing = [tokenizer.im_end_id, *tokenizer.encode("\n")]
    doc.tokens += closing
    # The model learns to end its own turns, not the user's.
    doc.supervised += [role == "assistant"] + [False] * (len(closing) - 1)


def _cut(doc: Document, spans: list[tuple[int, int]], max_len: int) -> None:
    """Truncate to ``max_len`` tokens without splitting an image span."""
    if len(doc.tokens) <= max_len:
        return
    cut = max_len
    kept = 0
    for start, end in spans:
        if end > cut:
            cut = min(cut, start)
            break
        kept += 1
    del doc.tokens[cut:], doc.supervised[cut:], doc.images[kept:], doc.spans[kept:]


def caption_text(meta: dict) -> str:
    """The text paired with the image in the CoCa objective (caption, OCR text, or grounded object labels)."""
    if isinstance(meta.get("caption"), str) and meta["caption"]:
        return meta["caption"]
    labels = [o["label"] for o in meta.get("objects", []) if isinstance(o, dict) and isinstance(o.get("label"), str)]
    if labels:
        return ", ".join(labels)
    texts = [s["text"] for s in meta["segments"] if "text" in s]
    if not texts:
        raise SampleError("no text to pair with the image")
    return " ".join(texts)
