"""Images to native-resolution patch grids (MoonViT input), with a pixel cap.

An image keeps its aspect ratio: it is resized only so that both sides are multiples of ``patch_size * merge_size``
(so the projector's 2x2 merge tiles it exactly), so that it has at most ``max_patches`` patches, and so that neither
side exceeds ``max_grid_side`` patches (the position range of MoonViT's 2D RoPE). Images the model cannot use are
rejected here with a message, never passed on to fail as a shape error inside the model.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from data.pixel_view import rgbx_view

# Refuse absurd images before decoding them fully (decompression bombs).
MAX_DECODED_PIXELS = 64 * 1024 * 1024
# Kimi-VL precomputes its 2D RoPE for grids up to 512 x 512 patches; longer sides would leave its position range.
MAX_GRID_SIDE = 512
# Beyond this the short side collapses to a single merge block and the image is mostly distortion (Qwen2-VL's
# processor draws the same line).
MAX_ASPECT_RATIO = 200
# A large downscale first shrinks by an integer factor (a box filter) to within this factor of the target, then
# resamples bicubically: far faster on big images, and indistinguishable (PIL's guidance for reducing_gap >= 3).
RESIZE_REDUCING_GAP = 3.0
# What augmentation fills outside the image: mid-grey, the nearest byte to what the model normalizes to 0.
MID_GREY = 128
# What transparent pixels are composited onto (``data.alpha_background``): the hidden colour of a transparent pixel
# is arbitrary (often black), so dropping alpha shows clip-art as black or blank squares.
WHITE = (255, 255, 255)
# An image whose grey levels (after compositing) have a standard deviation below this, on a 0..255 scale, is counted
# as near-blank (``data.prepare`` and ``data.stats`` report them; they are still trained on).
NEAR_BLANK_STD = 3.0
# PIL's grey level ("L" mode): 299/1000 R + 587/1000 G + 114/1000 B.
GREY_WEIGHTS = (0.299, 0.587, 0.114)


class ImageError(ValueError):
    """An image that cannot be used (undecodable, empty, too large)."""


# The 8-bit PNG layouts without transparency (IHDR colour types: grey, RGB, palette; no tRNS chunk) that OpenCV
# decodes to exactly Pillow's RGB conversion (grey and palette expanded; tested). PNG is lossless and OpenCV's
# decoder is the faster of the two; other layouts (anything with alpha or a transparent
# colour, composited onto the background through Pillow; 16-bit samples, which the two round differently; fewer
# bits a sample) are decoded by Pillow.
OPENCV_PNG_COLOUR_TYPES = frozenset({0, 2, 3})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Decoded straight to RGB (OpenCV >= 4.10; older ones decode BGR, converted after), ignoring EXIF orientation
# (Pillow does not apply it either).
_OPENCV_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


# Where patches are cut: given their size in bytes, a writable uint8 buffer of exactly that many, or None for fresh
# memory (a loader worker cuts them straight into the shared memory it hands them over in).
PatchBuffer = Callable[[int], np.ndarray | None]


@dataclass(frozen=True)
class EncodedPng:
    """A PNG whose header says OpenCV decodes it (:data:`OPENCV_PNG_COLOUR_TYPES`), opened without Pillow (its
    header read directly, far cheaper than ``Image.open``): :func:`decode_png_pixels` decodes
    it; :meth:`pil` opens it with Pillow, for the reduced decodes and resizes only Pillow does."""

    data: bytes
    size: tuple[int, int]  # (width, height)

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def pil(self) -> Image.Image:
        return _open_pil(self.data)


def open_image(data: bytes, background: tuple[int, int, int] = WHITE) -> Image.Image | EncodedPng:
    """Parse an image's header and check its size; the pixels are decoded later (at a reduced scale when that is
    all the patch grid needs, see :func:`image_to_patches`). Rejects empty, unreadable and oversized images.

    A PNG of a layout OpenCV decodes exactly as Pillow comes back as an :class:`EncodedPng`, any other image as a
    Pillow image. An image with transparency (an alpha channel, or a transparent palette index or colour) is decoded
    here and composited onto ``background`` (:func:`composite_alpha`): it comes back as a loaded RGB image."""
    if not data:
        raise ImageError("empty image bytes")
    image = _png_header(data) or _open_pil(data)
    width, height = image.size
    if width * height > MAX_DECODED_PIXELS:
        raise ImageError(f"image of {width}x{height} pixels exceeds the {MAX_DECODED_PIXELS} pixel limit")
    if width == 0 or height == 0:
        raise ImageError("image has zero size")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"image of {width}x{height} pixels has an aspect ratio above {MAX_ASPECT_RATIO}:1")
    if isinstance(image, Image.Image) and has_alpha(image):
        return composite_alpha(image, background)
    return image


def background_rgb(colour: str) -> tuple[int, int, int]:
    """An RGB triple from a colour name or ``#rrggbb`` (Pillow's ``ImageColor``), e.g. ``white``.

    Raises:
        ValueError: An unknown colour (a configuration error: the message says what is allowed).
    """
    from PIL import ImageColor

    try:
        return tuple(ImageColor.getrgb(colour)[:3])
    except ValueError:
        raise ValueError(f"unknown colour {colour!r}: a colour name (white, black, grey, ...) or #rrggbb") from None


def has_alpha(image: Image.Image) -> bool:
    """Whether an opened image has transparent pixels to composite: an alpha channel (RGBA, LA, PA, ...) or a
    transparent palette index or colour (PNG's tRNS, GIF's transparency)."""
    return "A" in image.getbands() or "transparency" in image.info


def composite_alpha(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The image over an opaque ``background``: Pillow's ``alpha_composite`` of its RGBA conversion, as RGB."""
    try:
        rgba = image.convert("RGBA")
    except Exception as error:  # PIL raises many types for broken data
        raise ImageError(f"undecodable image: {error}") from None
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")


def is_near_blank(image: Image.Image) -> bool:
    """Whether a decoded image is (nearly) one flat colour: the grey levels of a thumbnail of at most 64 px a side
    have a standard deviation below :data:`NEAR_BLANK_STD`."""
    thumbnail = image.convert("L")
    thumbnail.thumbnail((64, 64), Image.Resampling.BILINEAR)
    return float(np.asarray(thumbnail, dtype=np.float32).std()) < NEAR_BLANK_STD


def _open_pil(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Exception as error:  # PIL raises many types for broken data
        raise ImageError(f"undecodable image: {error}") from None


def _png_header(data: bytes) -> EncodedPng | None:
    """The PNG, if its IHDR chunk (first after the signature, 13 bytes: width, height, bit depth, colour type,
    compression, filter, interlace) names an 8-bit layout OpenCV decodes; anything else (or a malformed header)
    is left to Pillow."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if depth != 8 or colour not in OPENCV_PNG_COLOUR_TYPES or compression or filtering or interlace > 1:
        return None
    if _has_transparency_chunk(data):
        return None
    return EncodedPng(data, (width, height))


def _has_transparency_chunk(data: bytes) -> bool:
    """Whether a PNG has a tRNS chunk (a transparent palette index or colour); it precedes the first IDAT, so only
    the few chunk headers before the pixels are read."""
    offset = 33  # signature (8) + IHDR (length, type, 13 bytes, CRC)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"tRNS":
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        offset += 12 + length
    return False


def load_rgb(image: Image.Image, needed: tuple[float, float] | None = None) -> tuple[Image.Image, float]:
    """Decode an opened image to RGB, at a reduced scale when ``needed`` (width, height in pixels) asks for at most
    half its resolution and the format can decode smaller directly (JPEG's DCT scaling by 1/2, 1/4 or 1/8: several
    times faster than a full decode, and already a proper low-pass downscale).

    Returns:
        The RGB image and its scale: decoded pixels per stored pixel (1.0 unless reduced). Decoded pixel ``i``
        covers stored pixels ``[i / scale, (i + 1) / scale)``; a reduced image's last column or row may be partial.
    """
    scale = 1.0
    try:
        if needed is not None and image.format == "JPEG" and min(image.width / max(needed[0], 1.0),
                                                                  image.height / max(needed[1], 1.0)) >= 2:
            width = image.width
            drafted = image.draft("RGB", (max(1, math.ceil(needed[0])), max(1, math.ceil(needed[1]))))
            if drafted is not None:
                scale = drafted[1][2] / width
        image.load()
    except Exception as error:  # PIL raises many types for broken data
        raise ImageError(f"undecodable image: {error}") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image, scale


def decode_png_pixels(image: EncodedPng, alpha: bool = False) -> np.ndarray | None:
    """An :class:`EncodedPng`'s pixels, decoded by OpenCV: uint8 ``[height, width, 3]`` RGB (``[height, width, 4]``
    RGBX, fourth byte 255, with ``alpha``, as :func:`render` samples them). None if OpenCV cannot decode it (then
    Pillow, which may accept it, decodes it or says what is wrong)."""
    encoded = np.frombuffer(image.data, dtype=np.uint8)
    flags = (cv2.IMREAD_COLOR if _OPENCV_RGB is None else _OPENCV_RGB) | cv2.IMREAD_IGNORE_ORIENTATION
    pixels = cv2.imdecode(encoded, flags)
    if pixels is None or pixels.shape != (image.height, image.width, 3):
        return None
    if _OPENCV_RGB is None:
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGBA if alpha else cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(pixels, cv2.COLOR_RGB2RGBA) if alpha else pixels


def decode_image(data: bytes, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Decode encoded image bytes to RGB at full resolution (transparency composited onto ``background``),
    rejecting empty, broken and oversized images."""
    image = open_image(data, background)
    return load_rgb(image.pil() if isinstance(image, EncodedPng) else image)[0]


def fit_grid(
    width: int, height: int, patch_size: int, merge_size: int, max_patches: int, max_grid_side: int = MAX_GRID_SIDE
) -> tuple[int, int]:
    """The patch grid (rows, cols) an image of ``width`` x ``height`` pixels is resized to.

    Sides are rounded to multiples of the merge size (in patches), at least one merge block each; the grid is scaled
    down (aspect ratio kept) until no side exceeds ``max_grid_side`` patches and it holds at most ``max_patches``.

    Raises:
        ValueError: If the limits admit no grid at all (a configuration error: the message says what to change).
    """
    if patch_size < 1 or merge_size < 1:
        raise ValueError(f"patch_size={patch_size} and merge_size={merge_size} must be positive.")
    if max_patches < merge_size * merge_size or max_grid_side < merge_size:
        raise ValueError(f"max_patches={max_patches} / max_grid_side={max_grid_side} leave no room for one "
                         f"{merge_size}x{merge_size} merge block: raise them to at least {merge_size * merge_size} / "
                         f"{merge_size}.")
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    unit = patch_size * merge_size
    rows = max(1, round(height / unit))
    cols = max(1, round(width / unit))
    side_blocks = max_grid_side // merge_size
    if max(rows, cols) > side_blocks:  # the position limit: shrink the long side, keep the aspect ratio
        scale = side_blocks / max(rows, cols)
        rows = min(side_blocks, max(1, round(rows * scale)))
        cols = min(side_blocks, max(1, round(cols * scale)))
    budget_blocks = max(1, max_patches // (merge_size * merge_size))
    if rows * cols > budget_blocks:
        scale = math.sqrt(budget_blocks / (rows * cols))
        rows = max(1, math.floor(rows * scale))
        cols = max(1, math.floor(cols * scale))
        while rows * cols > budget_blocks:  # floor of a very thin image can still overshoot by one block
            if rows >= cols:
                rows -= 1
            else:
                cols -= 1
    return rows * merge_size, cols * merge_size


@dataclass(frozen=True)
class Warp:
    """An affine map of the pixel plane from a stored image to a new frame of ``size`` (width, height) pixels.

    Coordinates are continuous: pixel (i, j) covers [i, i + 1) x [j, j + 1), its centre is (i + 0.5, j + 0.5) (PIL's
    convention, and that of boxes with exclusive x1/y1). ``matrix`` (a, b, c, d, e, f) maps a stored point (x, y)
    to (a x + b y + c, d x + e y + f) of the frame. Only the stored pixels inside ``window``
    (left, top, right, bottom; None: all) show in the frame: a crop's window; frame points mapped from outside it
    are fill.
    """

    matrix: tuple[float, float, float, float, float, float]
    size: tuple[int, int]
    window: tuple[int, int, int, int] | None = None

    def inverse(self) -> tuple[float, float, float, float, float, float]:
        """The matrix of the map back from the frame to the stored image."""
        a, b, c, d, e, f = self.matrix
        det = a * e - b * d
        ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
        return ia, ib, -(ia * c + ib * f), id_, ie, -(id_ * c + ie * f)

    @property
    def zoom(self) -> float:
        """Frame pixels per stored pixel (the geometric mean over both axes)."""
        a, b, _, d, e, _ = self.matrix
        return math.sqrt(abs(a * e - b * d))


@dataclass(frozen=True)
class ColourJitter:
    """Brightness, contrast and saturation factors (1.0 leaves the image unchanged), applied in that order with PIL
    ``ImageEnhance``'s definitions: brightness scales towards black, contrast towards the mean grey level, saturation
    towards each pixel's grey level; the result is clipped to the valid range."""

    brightness: float
    contrast: float
    saturation: float


def image_to_patches(
    image: Image.Image | EncodedPng, patch_size: int, merge_size: int, max_patches: int,
    max_grid_side: int = MAX_GRID_SIDE,
    warp: Warp | None = None, jitter: ColourJitter | None = None, patch_buffer: PatchBuffer | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to the fitted grid and cut into patches of raw RGB bytes, decoding only the resolution the grid needs.

    With ``warp`` (an augmentation's crop, flip, rotation and resize) the grid is fitted to the warped frame and its
    pixels are sampled from the stored image in one bilinear pass (one interpolation, however many transforms),
    then ``jitter`` changes their colours. Without either, a stored image that already has the grid's size is cut
    as it is, and any other is resized with PIL's bicubic filter.

    Args:
        image: An opened image (:func:`open_image`; decoded here) or a decoded one.
        patch_buffer: Where to cut the patches (see :data:`PatchBuffer`); fresh memory if not given.

    Returns:
        ``(patches, (rows, cols))``: uint8 patches [rows * cols, p * p * 3] in row-major grid order, each flattened
        as (y, x, channel), see :func:`cut_patches`; the model normalizes them.
    """
    frame = warp.size if warp is not None else image.size
    rows, cols = fit_grid(frame[0], frame[1], patch_size, merge_size, max_patches, max_grid_side)
    size = (cols * patch_size, rows * patch_size)
    if warp is None and jitter is None:
        if isinstance(image, EncodedPng):
            pixels = decode_png_pixels(image) if image.size == size else None  # cut as it is
            if pixels is not None:
                return cut_patches(pixels, patch_size, patch_buffer), (rows, cols)
            image = image.pil()  # resized by Pillow (or refused by OpenCV)
        image, scale = load_rgb(image, size)
        if image.size != size:
            box = (0.0, 0.0, frame[0] * scale, frame[1] * scale)
            image = image.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=RESIZE_REDUCING_GAP)
        return cut_patches(rgb_pixels(image), patch_size, patch_buffer), (rows, cols)
    return cut_patches(render(image, size, warp, jitter), patch_size, patch_buffer), (rows, cols)


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """A loaded RGB image's pixels, uint8 ``[height, width, 3]``: packed from a view of Pillow's own 4-byte pixels
    by OpenCV (``np.asarray`` packs them through Pillow's slower encoder, see :mod:`data.pixel_view`)."""
    view = rgbx_view(image)
    return np.asarray(image) if view is None else cv2.cvtColor(view, cv2.COLOR_RGBA2RGB)


def cut_patches(pixels: np.ndarray, patch_size: int, patch_buffer: PatchBuffer | None = None) -> torch.Tensor:
    """Cut ``[H, W, 3]`` uint8 pixels (sides multiples of ``patch_size``) into ``[patches, p * p * 3]``, row-major
    over the patch grid, each patch flattened as (y, x, channel): the decoded image's own layout, so the cut moves
    whole runs of ``p`` pixels (a (channel, y, x) order would gather single bytes, several times slower; the
    model's patch embedding reads either order for free, see :class:`~model.vision.MoonViT`). Each run moves as one
    opaque item of ``p * 3`` bytes (a numpy void dtype): numpy then copies run by run instead of byte by
    byte. Into ``patch_buffer``'s memory if it gives some."""
    height, width, channels = pixels.shape
    p = patch_size
    rows, cols = height // p, width // p
    run = np.dtype(f"V{p * channels}")  # one patch row: p pixels
    source = np.ascontiguousarray(pixels).reshape(height, width * channels).view(run)  # [H, cols] runs
    shape = (rows, cols, p, p * channels)
    buffer = patch_buffer(math.prod(shape)) if patch_buffer is not None else None
    patches = np.empty(shape, dtype=np.uint8) if buffer is None else buffer.reshape(shape)
    np.copyto(patches.view(run)[..., 0], source.reshape(rows, p, cols).transpose(0, 2, 1))
    return torch.from_numpy(patches).view(rows * cols, p * p * channels)


def render(image: Image.Image | EncodedPng, size: tuple[int, int], warp: Warp | None = None,
           jitter: ColourJitter | None = None) -> np.ndarray:
    """The warped (and colour-jittered) image at ``size`` pixels: uint8 ``[height, width, 3]``.

    Every output pixel is sampled bilinearly from the stored image (decoded at a reduced scale when the output is
    much smaller, as :func:`load_rgb` allows); points outside it are mid-grey (byte 128, 1/255 after the model's
    normalization: padding carries next to no signal before jitter). OpenCV's ``warpAffine`` samples the bytes as they
    are (a float round trip through ``grid_sample`` costs more on the small images the loader warps).
    """
    stored = image.size
    frame = warp.size if warp is not None else stored
    inverse = warp.inverse() if warp is not None else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    # Output pixels per stored pixel, for the decode scale (antialiasing is left to that reduced decode: bilinear
    # sampling alone would alias beyond a 2x reduction).
    zoom = math.sqrt(size[0] * size[1] / (frame[0] * frame[1])) * (warp.zoom if warp is not None else 1.0)
    # Four channels: OpenCV's vectorized bilinear warp handles 4 bytes a pixel, and is faster on them than on 3
    # (the extra conversions included); Pillow's own pixels have four (see data.pixel_view).
    # Without a reduction to come, a PNG's pixels come from OpenCV's faster decoder.
    pixels = None
    if isinstance(image, EncodedPng):
        pixels = decode_png_pixels(image, alpha=True) if zoom > 0.5 else None  # else reduced by Pillow
        image = image if pixels is not None else image.pil()
    scale = 1.0
    if pixels is None:
        image, scale = load_rgb(image, (stored[0] * zoom, stored[1] * zoom))
        while scale * 0.5 >= zoom and min(image.size) >= 2:  # e.g. a PNG: halve until bilinear sampling cannot alias
            image, scale = image.reduce(2), scale * 0.5
        pixels = rgbx_view(image)
        if pixels is None:
            pixels = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2RGBA)
    height, width = pixels.shape[:2]
    # The visible window in decoded pixels (a reduced decode rounds it to its own pixels).
    window = warp.window if warp is not None and warp.window is not None else (0, 0, *stored)
    left, top = min(round(window[0] * scale), width - 1), min(round(window[1] * scale), height - 1)
    right, bottom = max(round(window[2] * scale), left + 1), max(round(window[3] * scale), top + 1)
    source = pixels[top:bottom, left:right]
    # Output pixel centre (u + 0.5, v + 0.5) -> frame point (u + 0.5) sx -> stored point (inverse warp) -> decoded
    # point (times scale) -> window point (minus its corner) -> OpenCV's pixel coordinates (centres on integers).
    sx, sy = frame[0] / size[0], frame[1] / size[1]
    a, b, c, d, e, f = inverse
    to_source = np.array([
        [scale * a * sx, scale * b * sy, scale * (0.5 * a * sx + 0.5 * b * sy + c) - left - 0.5],
        [scale * d * sx, scale * e * sy, scale * (0.5 * d * sx + 0.5 * e * sy + f) - top - 0.5],
    ])
    pixels = cv2.warpAffine(source, to_source, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(MID_GREY,) * 3 + (0,))
    pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2RGB)
    return pixels if jitter is None else _jitter(pixels, jitter)


def _jitter(pixels: np.ndarray, jitter: ColourJitter) -> np.ndarray:
    """Brightness, contrast and saturation of uint8 ``[H, W, 3]`` pixels in one pass, rounded and clipped.

    In [0, 255] units, brightness b gives p1 = b p; contrast c gives p2 = c p1 + (1 - c) m, m the mean grey level
    of p1; saturation s gives p3 = s p2 + (1 - s) L(p2), L the grey level, linear with weights w summing to 1. So
    p3 = c b (s I + (1 - s) 1 w^T) p + (1 - c) m: one 3 x 3 colour matrix and one offset (OpenCV's ``transform``).
    """
    b, c, s = jitter.brightness, jitter.contrast, jitter.saturation
    weights = np.asarray(GREY_WEIGHTS)
    grey_mean = b * float(weights @ cv2.mean(pixels)[:3])
    matrix = (c * b) * (s * np.eye(3) + (1.0 - s) * weights[None, :])
    affine = np.concatenate([matrix, np.full((3, 1), (1.0 - c) * grey_mean)], axis=1)
    return cv2.transform(pixels, affine.astype(np.float32))
