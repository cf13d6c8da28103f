"""Image augmentations that keep 2-D annotations right: crop, flip, rotation, resize and colour jitter.

Boxes ``[x0, y0, x1, y1]`` (pixels, x1/y1 exclusive) and points ``[x, y]`` move with the pixels: a box that enclosed
an object before encloses it after (a rotated box becomes the axis-aligned box around its rotated corners, rounded
outwards; a crop clips boxes to the window and drops objects left outside). Every random choice comes from the
generator the caller passes, itself a pure function of ``(seed, stage, sample index)``, so augmentation is as
reproducible as the rest of the stream.

The transforms are planned on the image's size alone (:func:`plan_augment`): the crop, flip, rotation and resize
compose into one affine :class:`~data.images.Warp` whose pixels are sampled once, at the patch grid's resolution,
when the image is cut into patches (one interpolation instead of three, and no full-size intermediate images);
the annotations are moved exactly, transform by transform.
"""

from __future__ import annotations

import math
from typing import Protocol

from PIL import Image

from config.schema import AugmentConfig
from data.images import ColourJitter, Warp, render


class Random(Protocol):
    """The random numbers an augmentation plan draws: a ``numpy.random.Generator``, or the loader's cheaper
    :class:`data.mixture.DrawRandom` (one per draw)."""

    def random(self) -> float: ...

    def uniform(self, low: float, high: float) -> float: ...

    def integers(self, low: int, high: int) -> int: ...


# An affine map (a, b, c, d, e, f): (x, y) -> (a x + b y + c, d x + e y + f). Plain floats: composing a few of
# them in Python costs less than building numpy matrices.
Affine = tuple[float, float, float, float, float, float]
IDENTITY: Affine = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _then(first: Affine, second: Affine) -> Affine:
    """The map that applies ``first``, then ``second``."""
    a1, b1, c1, d1, e1, f1 = first
    a2, b2, c2, d2, e2, f2 = second
    return (a2 * a1 + b2 * d1, a2 * b1 + b2 * e1, a2 * c1 + b2 * f1 + c2,
            d2 * a1 + e2 * d1, d2 * b1 + e2 * e1, d2 * c1 + e2 * f1 + f2)


def plan_augment(size: tuple[int, int], objects: list[dict], cfg: AugmentConfig,
                 rng: Random) -> tuple[Warp, ColourJitter | None, list[dict]]:
    """The configured transforms of an image of ``size`` (width, height) and its objects (``{"label", "box",
    "point"?}``, pixels): the warp from the stored image to the augmented frame, the colour jitter (None when
    off), and the objects in the augmented frame (those cropped away dropped)."""
    boxes = [list(map(float, o["box"])) for o in objects]
    points = [list(map(float, o["point"])) if "point" in o else None for o in objects]
    matrix, size = IDENTITY, tuple(size)
    window = None
    if cfg.crop_min_scale < 1.0:
        matrix, cropped, boxes, points = _crop(size, boxes, points, cfg.crop_min_scale, cfg.crop_min_visible, rng)
        left, top = int(-matrix[2]), int(-matrix[5])
        window, size = (left, top, left + cropped[0], top + cropped[1]), cropped
    if rng.random() < cfg.flip_prob:
        step, size, boxes, points = _flip(size, boxes, points)
        matrix = _then(matrix, step)
    if cfg.max_rotation_deg > 0:
        step, size, boxes, points = _rotate(size, boxes, points, rng.uniform(-1, 1) * cfg.max_rotation_deg)
        matrix = _then(matrix, step)
    if cfg.resize_jitter > 0:
        step, size, boxes, points = _resize(size, boxes, points, 1 + rng.uniform(-1, 1) * cfg.resize_jitter)
        matrix = _then(matrix, step)
    jitter = None
    if cfg.color_jitter > 0:
        brightness, contrast, saturation = (1 + rng.uniform(-1, 1) * cfg.color_jitter for _ in range(3))
        jitter = ColourJitter(brightness, contrast, saturation)
    kept = []
    for obj, box, point in zip(objects, boxes, points):
        if box is None:
            continue
        out = {key: value for key, value in obj.items() if key != "point"}  # a point cropped away is dropped
        out["box"] = _round_outwards(box, size)
        if point is not None:
            out["point"] = [min(max(round(point[0]), 0), size[0] - 1), min(max(round(point[1]), 0), size[1] - 1)]
        kept.append(out)
    warp = Warp(tuple(float(v) for v in matrix), (int(size[0]), int(size[1])), window)
    return warp, jitter, kept


def augment(image: Image.Image, objects: list[dict], cfg: AugmentConfig,
            rng: Random) -> tuple[Image.Image, list[dict]]:
    """Apply the configured transforms to an image and its objects: the augmented image at its own (frame) size,
    as the loader would sample it, e.g. to look at. The loader itself samples the warp straight at the patch
    grid's size (:func:`~data.images.image_to_patches`)."""
    warp, jitter, kept = plan_augment(image.size, objects, cfg, rng)
    return Image.fromarray(render(image, warp.size, warp, jitter)), kept


def _translation(dx: float, dy: float) -> Affine:
    return (1.0, 0.0, dx, 0.0, 1.0, dy)


def _round_outwards(box: list[float], size: tuple[int, int]) -> list[int]:
    width, height = size
    return [max(0, math.floor(box[0])), max(0, math.floor(box[1])), min(width, math.ceil(box[2])),
            min(height, math.ceil(box[3]))]


def _area(box: list[float]) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def _crop(size, boxes, points, min_scale, min_visible, rng):
    width, height = size
    w = max(1, round(width * rng.uniform(min_scale, 1.0)))
    h = max(1, round(height * rng.uniform(min_scale, 1.0)))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    new_boxes, new_points = _crop_annotations(boxes, points, left, top, w, h, min_visible)
    if any(b is not None for b in boxes) and all(b is None for b in new_boxes):
        return IDENTITY, size, boxes, points  # a crop that removes every object would leave nothing to ground
    return _translation(-left, -top), (w, h), new_boxes, new_points


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


def _flip(size, boxes, points):
    width = size[0]
    boxes = [None if b is None else [width - b[2], b[1], width - b[0], b[3]] for b in boxes]
    # Pixel centres map x -> width - 1 - x.
    points = [None if p is None else [width - 1 - p[0], p[1]] for p in points]
    return (-1.0, 0.0, float(width), 0.0, 1.0, 0.0), size, boxes, points


def rotated_size(size: tuple[int, int], degrees: float) -> tuple[int, int]:
    """The canvas that holds an image of ``size`` rotated by ``degrees`` whole, exactly as PIL's
    ``rotate(expand=True)`` computes it (the stream's frames do not change with the implementation)."""
    width, height = size
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    c = a * (-width / 2) + b * (-height / 2) + width / 2
    f = -b * (-width / 2) + a * (-height / 2) + height / 2
    xs = [a * x + b * y + c for x, y in ((0, 0), (width, 0), (width, height), (0, height))]
    ys = [-b * x + a * y + f for x, y in ((0, 0), (width, 0), (width, height), (0, height))]
    return math.ceil(max(xs)) - math.floor(min(xs)), math.ceil(max(ys)) - math.floor(min(ys))


def _rotate(size, boxes, points, degrees):
    """Rotate counter-clockwise about the centre, growing the canvas so no pixel is lost (mid-grey fills the new
    corners, see :func:`~data.images.render`)."""
    width, height = size
    new_size = rotated_size(size, degrees)
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    cx, cy = width / 2, height / 2
    nx, ny = new_size[0] / 2, new_size[1] / 2

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
        # One pixel of margin: resampling spreads an edge over about a pixel.
        new_boxes.append([min(xs) - 1, min(ys) - 1, max(xs) + 1, max(ys) + 1])
    new_points = [None if p is None else list(move(p[0] + 0.5, p[1] + 0.5)) for p in points]
    new_points = [None if p is None else [p[0] - 0.5, p[1] - 0.5] for p in new_points]
    # The same map as move(): about the old centre, onto the new one.
    matrix = (cos, sin, nx - cx * cos - cy * sin, -sin, cos, ny + cx * sin - cy * cos)
    return matrix, new_size, new_boxes, new_points


def _resize(size, boxes, points, factor):
    width, height = size
    new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
    sx, sy = new_w / width, new_h / height
    boxes = [None if b is None else [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
    points = [None if p is None else [(p[0] + 0.5) * sx - 0.5, (p[1] + 0.5) * sy - 0.5] for p in points]
    return (sx, 0.0, 0.0, 0.0, sy, 0.0), (new_w, new_h), boxes, points
