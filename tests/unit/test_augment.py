"""Augmentations keep boxes and points right: after crop, flip, rotation and resize every object still lies inside
its box and its point still lies on it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from data.augment import AugmentConfig, augment
from data.images import Warp, render
from data.synthetic import COLORS
from tests.unit.test_synthetic import samples_of

STRONG = AugmentConfig(enabled=True, crop_min_scale=0.7, flip_prob=0.5, max_rotation_deg=25.0, resize_jitter=0.3,
                       color_jitter=0.0)


def object_mask(image: Image.Image, obj: dict) -> Image.Image:
    """A white-on-black picture of exactly this object's pixels (its colour, inside its original box)."""
    pixels = np.asarray(image)
    x0, y0, x1, y1 = obj["box"]
    inside = np.zeros(pixels.shape[:2], dtype=bool)
    inside[y0:y1, x0:x1] = np.all(pixels[y0:y1, x0:x1] == COLORS[obj["label"].split()[0]], axis=-1)
    return Image.fromarray((inside * 255).astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boxes_and_points_still_mark_their_objects(demo_root, seed):
    checked = points = 0
    for index, (_, members) in enumerate(samples_of(demo_root, "grounding")):
        meta = json.loads(members["json"])
        image = Image.open(io.BytesIO(members["0.png"])).convert("RGB")
        annotated = [{**o, "id": i} for i, o in enumerate(meta["objects"])]
        out, objects = augment(image, annotated, STRONG, np.random.default_rng([seed, index]))
        kept = {o["id"]: o for o in objects}
        for original in annotated:
            # The same generator state and objects move the object's own mask exactly as they moved the image.
            mask_out, _ = augment(object_mask(image, original), annotated, STRONG,
                                  np.random.default_rng([seed, index]))
            assert mask_out.size == out.size
            if original["id"] not in kept:
                continue  # cropped away
            x0, y0, x1, y1 = kept[original["id"]]["box"]
            assert 0 <= x0 < x1 <= out.width and 0 <= y0 < y1 <= out.height
            core = np.asarray(mask_out)[..., 0] > 191  # object: 255, background: 0, rotation fill: 128
            outside = core.copy()
            outside[y0:y1, x0:x1] = False
            assert not outside.any(), f"{original['label']}: object pixels outside its box after augmentation"
            if min(x1 - x0, y1 - y0) >= 8:
                assert core[y0:y1, x0:x1].any(), "the box lost its object"
            # The point (the object's centre pixel) moved with the pixels: it is still on the object, to within the
            # pixel that resampling blurs at a crop edge (unless the crop cut it away, and then it is gone).
            if "point" in kept[original["id"]]:
                px, py = kept[original["id"]]["point"]
                assert core[max(py - 1, 0):py + 2, max(px - 1, 0):px + 2].any(), f"{original['label']}: point moved"
                points += 1
            checked += 1
        assert 1 <= len(kept) <= len(meta["objects"])
    assert checked > 50 and points > 0.8 * checked


def test_same_generator_state_same_result(demo_root):
    _, members = next(iter(samples_of(demo_root, "grounding")))
    meta = json.loads(members["json"])
    image = Image.open(io.BytesIO(members["0.png"])).convert("RGB")
    a = augment(image, meta["objects"], AugmentConfig(enabled=True), np.random.default_rng(7))
    b = augment(image, meta["objects"], AugmentConfig(enabled=True), np.random.default_rng(7))
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]


def test_flip_is_exact():
    image = Image.new("RGB", (60, 40), (255, 255, 255))
    image.paste((200, 0, 0), (5, 10, 15, 20))  # x in [5, 15), y in [10, 20)
    cfg = AugmentConfig(enabled=True, crop_min_scale=1.0, flip_prob=1.0, max_rotation_deg=0, resize_jitter=0,
                        color_jitter=0)
    out, objects = augment(image, [{"label": "red square", "box": [5, 10, 15, 20], "point": [9, 14]}], cfg,
                           np.random.default_rng(0))
    assert objects[0]["box"] == [45, 10, 55, 20] and objects[0]["point"] == [50, 14]
    red = np.argwhere(np.all(np.asarray(out) == (200, 0, 0), axis=-1))
    assert red[:, 1].min() == 45 and red[:, 1].max() == 54


def test_a_crop_never_removes_every_object():
    image = Image.new("RGB", (100, 100), (255, 255, 255))
    image.paste((200, 0, 0), (0, 0, 6, 6))  # a tiny object in a corner that most crops cut away
    cfg = AugmentConfig(enabled=True, crop_min_scale=0.5, crop_min_visible=0.9, flip_prob=0, max_rotation_deg=0,
                        resize_jitter=0, color_jitter=0)
    for seed in range(50):
        _, objects = augment(image, [{"label": "red square", "box": [0, 0, 6, 6]}], cfg, np.random.default_rng(seed))
        assert len(objects) == 1


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_points_follow_exact_rotations(degrees):
    from data.augment import _rotate

    image = Image.new("RGB", (60, 40), (255, 255, 255))
    image.putpixel((7, 31), (200, 0, 0))
    matrix, size, _, points = _rotate(image.size, [None], [[7.0, 31.0]], degrees)
    rotated = render(image, size, Warp(matrix, size))
    x, y = (round(v) for v in points[0])
    red = np.argwhere(rotated[..., 1] < 100)  # the one red pixel (green channel 0, white elsewhere)
    assert red.tolist() == [[y, x]]
