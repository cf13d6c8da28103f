"""Images to native-resolution patch grids (MoonViT input), with a pixel cap.

An image keeps its aspect ratio: it is resized only so that both sides are multiples of ``patch_size * merge_size``
(so the projector's 2x2 merge tiles it exactly), so that it has at most ``max_patches`` patches, and so that neither
side exceeds ``max_grid_side`` patches (the position range of MoonViT's 2D RoPE). Images the model cannot use are
rejected here with a message, never passed on to fail as a shape error inside the model.
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
# Kimi-VL precomputes its 2D RoPE for grids up to 512 x 512 patches; longer sides would leave its position range.
MAX_GRID_SIDE = 512
# Beyond this the short side collapses to a single merge block and the image is mostly distortion (Qwen2-VL's
# processor draws the same line).
MAX_ASPECT_RATIO = 200


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
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"image of {width}x{height} pixels has an aspect ratio above {MAX_ASPECT_RATIO}:1")
    return image.convert("RGB")


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


def image_to_patches(
    image: Image.Image, patch_size: int, merge_size: int, max_patches: int, max_grid_side: int = MAX_GRID_SIDE
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to the fitted grid, normalize and cut into patches.

    Returns:
        ``(patches, (rows, cols))``: patches [rows * cols, 3 * p * p] in row-major grid order, each flattened as
        (channel, y, x) to match a Conv2d patch embedding.
    """
    rows, cols = fit_grid(image.width, image.height, patch_size, merge_size, max_patches, max_grid_side)
    size = (cols * patch_size, rows * patch_size)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
    pixels = (pixels - PIXEL_MEAN) / PIXEL_STD  # [H, W, 3]
    p = patch_size
    patches = pixels.view(rows, p, cols, p, 3).permute(0, 2, 4, 1, 3).reshape(rows * cols, 3 * p * p)
    return patches.contiguous(), (rows, cols)

