"""Image augmentations that keep 2-D annotations right: crop, flip, rotation, resize and colour jitter.

Boxes ``[x0, y0, x1, y1]`` (pixels, x1/y1 exclusive) and points ``[x, y]`` move with the pixels: a box that enclosed
an object before encloses it after (a rotated box becomes the axis-aligned box around its rotated corners, rounded
outwards; a crop clips boxes to the window and drops objects left outside). Every random choice comes from the
generator the caller passes, itself a pure function of ``(seed, stage, sample index)``, so augmentation is as
reproducible as the rest of the stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance


@dataclass
class AugmentConfig:
    """Per-stage augmentation; each transform is skipped when its strength is 0."""

    enabled: bool = False
    # Sample kinds to augment: those whose text stays true under flips and crops (grounding boxes move with the
    # pixels; a caption saying "top left" or rendered text would not).
    kinds: list[str] = field(default_factory=lambda: ["grounding"])
    # Keep at least this share of each side in a random crop (1.0: no crop).
    crop_min_scale: float = 0.8
    # Objects with less than this share of their box inside the crop are dropped (a sliver is no longer them).
    crop_min_visible: float = 0.3
    flip_prob: float = 0.5
    max_rotation_deg: float = 10.0
    # Resize by a factor drawn from [1 - resize_jitter, 1 + resize_jitter].
    resize_jitter: float = 0.2
    # Brightness, contrast and saturation factors drawn from [1 - color_jitter, 1 + color_jitter].
    color_jitter: float = 0.2


def augment(image: Image.Image, objects: list[dict], cfg: AugmentConfig,
            rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """Apply the configured transforms to an image and its objects (``{"label", "box", "point"?}``, pixels)."""
    boxes = [list(map(float, o["box"])) for o in objects]
    points = [list(map(float, o["point"])) if "point" in o else None for o in objects]
    if cfg.crop_min_scale < 1.0:
        image, boxes, points = _crop(image, boxes, points, cfg.crop_min_scale, cfg.crop_min_visible, rng)
    if rng.random() < cfg.flip_prob:
        image, boxes, points = _flip(image, boxes, points)
    if cfg.max_rotation_deg > 0:
        image, boxes, points = _rotate(image, boxes, points, rng.uniform(-1, 1) * cfg.max_rotation_deg)
    if cfg.resize_jitter > 0:
        image, boxes, points = _resize(image, boxes, points, 1 + rng.uniform(-1, 1) * cfg.resize_jitter)
    if cfg.color_jitter > 0:
        image = _jitter_colour(image, cfg.color_jitter, rng)
    kept = []
    for obj, box, point in zip(objects, boxes, points):
        if box is None:
            continue
        out = {key: value for key, value in obj.items() if key != "point"}  # a point cropped away is dropped
        out["box"] = _round_outwards(box, image.size)
        if point is not None:
            out["point"] = [min(max(round(point[0]), 0), image.width - 1), min(max(round(point[1]), 0),
                                                                              image.height - 1)]
        kept.append(out)
    return image, kept


def _round_outwards(box: list[float], size: tuple[int, int]) -> list[int]:
    width, height = size
    return [max(0, math.floor(box[0])), max(0, math.floor(box[1])), min(width, math.ceil(box[2])),
            min(height, math.ceil(box[3]))]


def _area(box: list[float]) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def _crop(image, boxes, points, min_scale, min_visible, rng):
    width, height = image.size
    w = max(1, round(width * rng.uniform(min_scale, 1.0)))
    h = max(1, round(height * rng.uniform(min_scale, 1.0)))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    new_boxes, new_points = _crop_annotations(boxes, points, left, top, w, h, min_visible)
    if any(b is not None for b in boxes) and all(b is None for b in new_boxes):
        return image, boxes, points  # a crop that removes every object would leave nothing to ground: skip it
    return image.crop((left, top, left + w, top + h)), new_boxes, new_points


def _crop_annotations(boxes, points, left, top, w, h, min_visible):
    new_boxes, new_points = [], []
    for box, point in zip(boxes, points):
        if box is None:
            new_boxes.append(None)
            new_points.append(None)
            continue
        clipped = [max(box[0] - left, 0), max(box[1] - top, 0), min(box[2] - left, w), min(box[3] - top, h)]
        visible = _area(clipped) > 0 and _area(clipped) >= min_visible * _area(box)
        new_boxes.append(clipped if visible else None)
        inside = point is not None and 0 <= point[0] - left < w and 0 <= point[1] - top < h
        new_points.append([point[0] - left, point[1] - top] if inside else None)
    return new_boxes, new_points


def _flip(image, boxes, points):
    width = image.width
    boxes = [None if b is None else [width - b[2], b[1], width - b[0], b[3]] for b in boxes]
    # Pixel centres map x -> width - 1 - x.
    points = [None if p is None else [width - 1 - p[0], p[1]] for p in points]
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), boxes, points


def _rotate(image, boxes, points, degrees):
    """Rotate counter-clockwise about the centre, growing the canvas so no pixel is lost."""
    width, height = image.size
    # Mid-grey fills the new corners: it normalizes to 0, so the padding carries no signal.
    rotated = image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    cx, cy = width / 2, height / 2
    nx, ny = rotated.width / 2, rotated.height / 2

    def move(x: float, y: float) -> tuple[float, float]:
        # Image y points down, so a counter-clockwise turn on screen is (x, y) -> (x cos + y sin, -x sin + y cos).
        dx, dy = x - cx, y - cy
        return nx + dx * cos + dy * sin, ny - dx * sin + dy * cos

    new_boxes = []
    for box in boxes:
        if box is None:
            new_boxes.append(None)
            continue
        corners = [move(x, y) for x in (box[0], box[2]) for y in (box[1], box[3])]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        # One pixel of margin: bicubic resampling spreads an edge over about a pixel.
        new_boxes.append([min(xs) - 1, min(ys) - 1, max(xs) + 1, max(ys) + 1])
    new_points = [None if p is None else list(move(p[0] + 0.5, p[1] + 0.5)) for p in points]
    new_points = [None if p is None else [p[0] - 0.5, p[1] - 0.5] for p in new_points]
    return rotated, new_boxes, new_points


def _resize(image, boxes, points, factor):
    width, height = image.size
    new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
    sx, sy = new_w / width, new_h / height
    boxes = [None if b is None else [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
    points = [None if p is None else [(p[0] + 0.5) * sx - 0.5, (p[1] + 0.5) * sy - 0.5] for p in points]
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC), boxes, points


def _jitter_colour(image, strength, rng):
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(1 + rng.uniform(-1, 1) * strength)
    return image
