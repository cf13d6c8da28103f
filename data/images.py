"""Images to native-resolution patch grids (MoonViT input), with a pixel cap.

An image keeps its aspect ratio: it is resized only so that both sides are multiples of ``patch_size * merge_size``
(so the projector's 2x2 merge tiles it exactly) and so that it has at most ``max_patches`` patches.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

# SigLIP's normalization: pixels mapped from [0, 1] to [-1, 1].
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
# Refuse absurd images before decoding them fully (decompression bombs).
MAX_DECODED_PIXELS = 64 * 1024 * 1024


class ImageError(ValueError):
    """An image that cannot be used (undecodable, empty, too large)."""


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to RGB, rejecting empty, broken and oversized images."""
    if not data:
        raise ImageError("empty image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_DECODED_PIXELS:
            raise ImageError(f"image of {width}x{height} pixels exceeds the {MAX_DECODED_PIXELS} pixel limit")
        image.load()
    except ImageError:
        raise
    except Exception as error:  # PIL raises many types for broken data
        raise ImageError(f"undecodable image: {error}") from None
    if width == 0 or height == 0:
        raise ImageError("image has zero size")
    return image.convert("RGB")


def fit_grid(width: int, height: int, patch_size: int, merge_size: int, max_patches: int) -> tuple[int, int]:
    """The patch grid (rows, cols) an image of ``width`` x ``height`` pixels is resized to.

    Sides are rounded to multiples of the merge size (in patches), at least one merge block each, and the grid is
    scaled down (aspect ratio kept) until it holds at most ``max_patches`` patches.
    """
    unit = patch_size * merge_size
    rows = max(1, round(height / unit))
    cols = max(1, round(width / unit))
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


def image_to_patches(
    image: Image.Image, patch_size: int, merge_size: int, max_patches: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to the fitted grid, normalize and cut into patches.

    Returns:
        ``(patches, (rows, cols))``: patches [rows * cols, 3 * p * p] in row-major grid order, each flattened as
        (channel, y, x) to match a Conv2d patch embedding.
    """
    rows, cols = fit_grid(image.width, image.height, patch_size, merge_size, max_patches)
    size = (cols * patch_size, rows * patch_size)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
    pixels = (pixels - PIXEL_MEAN) / PIXEL_STD  # [H, W, 3]
    p = patch_size
    patches = pixels.view(rows, p, cols, p, 3).permute(0, 2, 4, 1, 3).reshape(rows * cols, 3 * p * p)
    return patches.contiguous(), (rows, cols)

