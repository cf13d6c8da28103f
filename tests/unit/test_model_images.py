"""Bad image input stops at preprocessing (resized or rejected with a message), never as a shape error inside the
model: every grid the preprocessing emits runs through MoonViT and the 2x2 projector."""

from __future__ import annotations

import io
import math
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data.images as images
from config.model import VisionArgs
from data.images import ImageError, decode_image, fit_grid, image_to_patches
from model.projector import PatchMergerProjector
from model.vision import MoonViT


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 50)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_fit_grid_always_respects_merge_position_and_patch_limits():
    rng = random.Random(0)
    for _ in range(2000):
        patch, merge = rng.choice([(14, 2), (4, 2), (16, 3)])
        max_patches = rng.randint(merge * merge, 20000)
        max_side = rng.randint(merge, 600)
        width, height = rng.randint(1, 30000), rng.randint(1, 30000)
        rows, cols = fit_grid(width, height, patch, merge, max_patches, max_side)
        assert rows % merge == 0 and cols % merge == 0 and rows >= merge and cols >= merge
        assert rows * cols <= max(max_patches, merge * merge) and max(rows, cols) <= max_side, (width, height)


def test_huge_and_thin_images_are_resized_within_the_rope_range():
    # 100k x 2k pixels: 7143 x 143 patches unconstrained; the long side is cut to Kimi-VL's 512, aspect kept.
    rows, cols = fit_grid(100_000, 2_000, 14, 2, max_patches=10**9)
    assert cols == images.MAX_GRID_SIDE and rows == 10  # 512 * 2000 / 100000 ~ 10 patches, a multiple of 2
    assert fit_grid(10, 10, 14, 2, max_patches=64) == (2, 2)  # tiny images grow to one merge block


def test_preprocessed_images_run_through_the_tower_and_projector():
    args = VisionArgs(patch_size=4, hidden_size=32, num_layers=1, num_heads=2, mlp_hidden_size=32, pos_table_size=6)
    torch.manual_seed(0)
    vit = MoonViT(args)
    vit.init_weights()
    projector = PatchMergerProjector(32, 2, 16, 1e-5)
    projector.init_weights()
    pieces, grids = [], []
    for width, height in [(37, 101), (3, 3), (1000, 7), (64, 64), (250, 9)]:  # odd sizes, thin, tiny
        patches, grid = image_to_patches(Image.new("RGB", (width, height)), 4, 2, max_patches=96, max_grid_side=24)
        pieces.append(patches)
        grids.append(grid)
    grid_hw = torch.tensor(grids)
    with torch.no_grad():
        tokens = projector(vit(torch.cat(pieces), grid_hw), grid_hw)
    assert tokens.shape == (sum(h * w for h, w in grids) // 4, 16)


def test_unusable_images_are_rejected_with_a_message(monkeypatch):
    with pytest.raises(ImageError, match="aspect ratio above 200:1"):
        decode_image(_png(2010, 10))
    assert decode_image(_png(1990, 10)).size == (1990, 10)
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", 1000)
    with pytest.raises(ImageError, match="exceeds the 1000 pixel limit"):
        decode_image(_png(50, 50))
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")


def test_limits_that_admit_no_grid_are_configuration_errors():
    with pytest.raises(ValueError, match="max_patches=3"):
        fit_grid(100, 100, 14, 2, max_patches=3)
    with pytest.raises(ValueError, match="max_grid_side=1"):
        fit_grid(100, 100, 14, 2, max_patches=100, max_grid_side=1)


def _reference_patches(image: Image.Image, size: tuple[int, int], patch: int) -> torch.Tensor:
    """The per-pixel formula: PIL's bicubic resize to the grid (if needed), then each patch's pixels, row by row,
    pixel by pixel, channel by channel."""
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    rows, cols = size[1] // patch, size[0] // patch
    cut = [pixels[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].reshape(-1) for r in range(rows)
           for c in range(cols)]
    return torch.from_numpy(np.stack(cut))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def _photo(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).normal(0, 12, (height, width, 3))
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_patches_equal_the_per_pixel_formula_bit_for_bit():
    # At the grid's size (cut as it is) and off it (bicubic resize, less than the 6x reducing gap), PNG and JPEG.
    for size in [(84, 56), (100, 70), (300, 200)]:
        for fmt in ("PNG", "JPEG"):
            data = _encoded(_photo(*size), fmt)
            patches, (rows, cols) = image_to_patches(images.open_image(data), 14, 2, 256)
            expected = _reference_patches(decode_image(data), (cols * 14, rows * 14), 14)
            assert torch.equal(patches, expected), (size, fmt)


def test_jpegs_decode_only_the_resolution_their_grid_needs():
    data = _encoded(_photo(1024, 768), "JPEG")
    opened = images.open_image(data)
    patches, (rows, cols) = image_to_patches(opened, 14, 2, 64)
    assert opened.size == (128, 96)  # decoded at 1/8 scale (DCT scaling), still above the 112 x 84 grid
    expected = _reference_patches(decode_image(data), (cols * 14, rows * 14), 14)
    assert patches.shape == expected.shape and (patches.float() - expected.float()).abs().mean() < 4.0


def test_one_pass_warp_and_colour_jitter_match_pil():
    from PIL import ImageEnhance

    image = _photo(70, 50)
    identity = images.Warp((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), image.size)
    assert np.array_equal(images.render(image, image.size, identity), np.asarray(image))
    # Factors that keep every value in range (PIL clips after each step, the fused pass once at the end).
    jitter = images.ColourJitter(brightness=0.9, contrast=0.85, saturation=1.1)
    expected = image
    for enhancer, factor in ((ImageEnhance.Brightness, 0.9), (ImageEnhance.Contrast, 0.85),
                             (ImageEnhance.Color, 1.1)):
        expected = enhancer(expected).enhance(factor)
    jittered = images.render(image, image.size, None, jitter).astype(np.float32)
    difference = np.abs(jittered - np.asarray(expected, dtype=np.float32))
    assert difference.mean() < 2.0 and difference.max() <= 3.0  # PIL truncates to integers after each of its steps


def test_a_rotated_scaled_cropped_warp_matches_pil_affine_transform():
    # A crop window, a 7 degree rotation about a point and a 0.8x scale, sampled at an output size other than the
    # frame's: against PIL's bilinear affine transform of the cropped image (the same pixel-centre convention).
    image = _photo(120, 90)
    left, top, right, bottom = 10, 5, 110, 85
    angle = math.radians(7.0)
    cos, sin = math.cos(angle), math.sin(angle)
    # stored -> frame: shift the window's corner to the origin, rotate, scale by 0.8, shift into the frame.
    a, b, d, e = 0.8 * cos, 0.8 * sin, -0.8 * sin, 0.8 * cos
    c, f = -(a * left + b * top) + 12.0, -(d * left + e * top) + 20.0
    frame, size = (96, 80), (84, 70)
    warp = images.Warp((a, b, c, d, e, f), frame, (left, top, right, bottom))
    got = images.render(image, size, warp).astype(np.float32)
    # PIL maps output pixels to input points: output -> frame (scale) -> stored (inverse) -> cropped image.
    ia, ib, ic, id_, ie, if_ = warp.inverse()
    sx, sy = frame[0] / size[0], frame[1] / size[1]
    data = (ia * sx, ib * sy, ic - left, id_ * sx, ie * sy, if_ - top)
    cropped = image.crop((left, top, right, bottom))
    expected = np.asarray(cropped.transform(size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR),
                          dtype=np.float32)
    # Where every bilinear tap lies inside the crop (PIL and OpenCV treat the outer half pixel differently).
    v, u = np.mgrid[0:size[1], 0:size[0]] + 0.5
    x, y = data[0] * u + data[1] * v + data[2], data[3] * u + data[4] * v + data[5]
    inside = (x >= 1) & (x <= cropped.width - 1) & (y >= 1) & (y <= cropped.height - 1)
    assert inside.mean() > 0.6
    difference = np.abs(got - expected)[inside]
    # Fixed-point weights on both sides; half a pixel off would give a mean of 5.5 and a maximum of 39.
    assert difference.mean() < 1.0 and difference.max() <= 2.0
    assert np.all(got[~inside & ((x < -1) | (y < -1) | (x > cropped.width + 1) | (y > cropped.height + 1))] ==
                  images.MID_GREY)  # well outside the window: fill


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _raw_png(pixels: np.ndarray, interlaced: bool = False, gamma: int | None = None) -> bytes:
    """An 8-bit RGB PNG written by hand: Adam7-interlaced if asked (Pillow cannot write that), with a gAMA chunk if
    given (a decoder that applied it would change the pixels)."""
    height, width, _ = pixels.shape
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    scans = [pixels[y0::dy, x0::dx] for x0, y0, dx, dy in passes] if interlaced else [pixels]
    raw = b"".join(b"\0" + row.tobytes() for scan in scans if scan.size for row in scan)  # filter 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, int(interlaced))
    chunks = [_png_chunk(b"IHDR", header)]
    if gamma is not None:
        chunks.append(_png_chunk(b"gAMA", struct.pack(">I", gamma)))
    chunks += [_png_chunk(b"IDAT", zlib.compress(raw)), _png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def test_pngs_decoded_by_opencv_have_exactly_pillows_rgb_pixels():
    photo = _photo(53, 37)
    pixels = np.asarray(photo)
    palette = photo.convert("P")
    grey = photo.convert("L")
    layouts = {
        "RGB": _encoded(photo, "PNG"), "L": _encoded(grey, "PNG"), "P": _encoded(palette, "PNG"),
        "interlaced": _raw_png(pixels, interlaced=True), "gamma": _raw_png(pixels, gamma=45455),
    }
    for name, data in layouts.items():
        assert isinstance(images.open_image(data), images.EncodedPng), name
        expected = np.asarray(decode_image(data))
        got = images.decode_png_pixels(images.open_image(data))
        assert got is not None and np.array_equal(got, expected), name
        rgbx = images.decode_png_pixels(images.open_image(data), alpha=True)
        assert np.array_equal(rgbx[..., :3], expected) and np.all(rgbx[..., 3] == 255), name
    assert np.array_equal(decode_image(layouts["interlaced"]), pixels)
    # Pillow keeps opening and decoding what OpenCV does not take: 16-bit samples, anything with transparency
    # (composited, see test_transparency_is_composited_onto_the_background), other formats.
    with_transparency = {"P": palette.copy(), "L": grey.copy()}
    with_transparency["P"].info["transparency"] = 3
    with_transparency["L"].info["transparency"] = 40
    for data in (_encoded(Image.fromarray(np.full((8, 8), 999, np.uint16)), "PNG"), _encoded(grey.convert("LA"), "PNG"),
                 _encoded(photo.convert("RGBA"), "PNG"), *(_encoded(i, "PNG") for i in with_transparency.values()),
                 _encoded(photo, "JPEG")):
        assert isinstance(images.open_image(data), Image.Image)
    # Headers are checked as strictly either way.
    with pytest.raises(ImageError, match="aspect ratio"):
        images.open_image(_raw_png(np.zeros((1, 201, 3), np.uint8)))
    # A PNG cut short: OpenCV refuses it; Pillow takes it if the pixels are all there, else names the fault.
    whole = layouts["RGB"]
    assert images.decode_png_pixels(images.open_image(whole[:-20])) is None
    patches, (rows, cols) = image_to_patches(images.open_image(whole[:-20]), 1, 1, 10**6)
    assert (rows, cols) == (37, 53) and np.array_equal(patches.numpy().reshape(37, 53, 3), pixels)
    with pytest.raises(ImageError, match="undecodable image"):
        image_to_patches(images.open_image(whole[:len(whole) // 2]), 1, 1, 10**6)


def test_warped_pngs_sample_the_same_pixels_from_either_decoder(monkeypatch):
    data = _encoded(_photo(120, 90), "PNG")
    angle = math.radians(-6.0)
    warp = images.Warp((math.cos(angle), math.sin(angle), 4.0, -math.sin(angle), math.cos(angle), 9.0), (112, 98),
                       (3, 2, 117, 88))
    jitter = images.ColourJitter(1.1, 0.9, 1.2)
    fast = images.render(images.open_image(data), (84, 70), warp, jitter)
    monkeypatch.setattr(images, "decode_png_pixels", lambda image, alpha=False: None)
    assert np.array_equal(fast, images.render(images.open_image(data), (84, 70), warp, jitter))


def test_pillow_pixels_are_viewed_without_a_copy_and_outlive_their_image():
    import gc

    from data.pixel_view import rgbx_view

    image = _photo(53, 37)
    expected = np.asarray(image).copy()
    view = rgbx_view(image)
    assert view is not None and view.shape == (37, 53, 4) and not view.flags.writeable
    assert np.array_equal(view[..., :3], expected) and np.all(view[..., 3] == 255)
    del image
    gc.collect()
    _ = [_photo(53, 37 + i) for i in range(20)]  # fresh images may reuse freed pixel memory
    assert np.array_equal(view[..., :3], expected)
    assert rgbx_view(Image.new("L", (8, 8))) is None  # only RGB is read this way
    # Larger than one block of Pillow's allocator: no zero-copy export; the pixels are still cut exactly.
    large = _photo(2200, 2000)
    assert rgbx_view(large) is None
    assert np.array_equal(images.rgb_pixels(large), np.asarray(large))
    assert np.array_equal(images.rgb_pixels(_photo(53, 37)), expected)


@pytest.mark.parametrize("patch", [1, 3, 14, 16])
def test_the_cut_moves_each_patch_row_whole(patch):
    pixels = np.random.default_rng(patch).integers(0, 256, (patch * 3, patch * 5, 3), dtype=np.uint8)
    cut = images.cut_patches(pixels, patch)
    reference = torch.from_numpy(pixels).view(3, patch, 5, patch * 3).permute(0, 2, 1, 3).reshape(15, -1)
    assert torch.equal(cut, reference)
    strided = np.random.default_rng(0).integers(0, 256, (patch * 2, patch * 4 + 1, 3), dtype=np.uint8)[:, 1:]
    assert torch.equal(images.cut_patches(strided, patch),
                       torch.from_numpy(strided.copy()).view(2, patch, 4, patch * 3).permute(0, 2, 1, 3).reshape(8, -1))


def _transparent_layouts() -> dict[str, Image.Image]:
    """RGBA, LA and palette-with-a-transparent-index images whose hidden pixels are black (as clip-art often is)."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (23, 31, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((23, 31)) < 0.4, 0, rgba[..., 3])  # 40% fully transparent
    rgba[rgba[..., 3] == 0, :3] = 0
    la = rgba[..., [0, 3]]
    palette = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    index = np.asarray(palette).copy()
    index[rgba[..., 3] == 0] = 63
    palette = Image.fromarray(index, "P")
    palette.putpalette(Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
                       .getpalette()[:63 * 3] + [0, 0, 0])
    palette.info["transparency"] = 63
    return {"RGBA": Image.fromarray(rgba, "RGBA"), "LA": Image.fromarray(la, "LA"), "P": palette}


@pytest.mark.parametrize("background", [(255, 255, 255), (12, 200, 77)])
def test_transparency_is_composited_onto_the_background(background):
    """Images with alpha reach the model composited onto ``data.alpha_background`` exactly as Pillow's
    ``alpha_composite`` does it, through every path (the plain patch cut, a resize, the warp), never as their hidden
    (black) pixels."""
    for name, image in _transparent_layouts().items():
        data = _encoded(image, "PNG")
        reference = Image.alpha_composite(Image.new("RGBA", image.size, (*background, 255)), image.convert("RGBA"))
        expected = np.asarray(reference.convert("RGB"))
        assert np.array_equal(np.asarray(decode_image(data, background)), expected), name
        opened = images.open_image(data, background)
        assert not isinstance(opened, images.EncodedPng)
        patches, (rows, cols) = image_to_patches(opened, 1, 1, 10**6)
        assert (rows, cols) == (23, 31) and np.array_equal(patches.numpy().reshape(23, 31, 3), expected), name
        # The warp path samples the composited pixels: an identity warp gives them back.
        warp = images.Warp((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (31, 23))
        assert np.array_equal(images.render(images.open_image(data, background), (31, 23), warp), expected), name
        transparent = np.asarray(image.convert("RGBA"))[..., 3] == 0
        assert np.all(expected[transparent] == background), name


def test_near_blank_images_are_recognized():
    flat = Image.new("RGB", (200, 120), (250, 250, 250))
    assert images.is_near_blank(flat)
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert images.is_near_blank(decode_image(_encoded(clear, "PNG")))  # white once composited
    drawn = flat.copy()
    drawn.paste((0, 0, 0), (40, 30, 120, 90))
    assert not images.is_near_blank(drawn)
    assert not images.is_near_blank(Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 50, 3),
                                                                                      dtype=np.uint8)))
    with pytest.raises(ValueError, match="unknown colour"):
        images.background_rgb("whit")
    assert images.background_rgb("#0a0b0c") == (10, 11, 12)
