"""The pixel-shuffle MLP projector: every ``m x m`` block of vision patches becomes one decoder token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.init import ParamInit
from model.layers import init_default_weights

__all__ = ["PatchMergerProjector", "merge_patches"]


def merge_patches(features: torch.Tensor, grid_hw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Gather each ``m x m`` block of every image into one vector (pixel shuffle).

    Args:
        features: Packed patch features ``[patches, D]``, image after image, row-major over each grid.
        grid_hw: ``int64 [images, 2]`` patch grids.
        merge_size: Block side ``m``; both grid sides must be divisible by it.

    Returns:
        ``[patches / m^2, m * m * D]``: blocks image after image, row-major over each merged grid ``(h/m, w/m)``;
        within a block the ``m * m`` patches are concatenated in row-major order.

    Raises:
        ValueError: If a grid side is not divisible by ``m`` or the grids do not cover ``features``.
    """
    m = merge_size
    grids = grid_hw.tolist()
    bad = [(h, w) for h, w in grids if h % m or w % m]
    if bad:
        raise ValueError(f"image patch grids {bad} are not divisible by the merge size {m}: every image side must "
                         f"be a multiple of {m} patches (resize images to a multiple of {m} * patch_size pixels).")
    total = sum(h * w for h, w in grids)
    if total != features.shape[0]:
        raise ValueError(f"image_grid_hw describes {total} patches but the features hold {features.shape[0]}.")
    dim = features.shape[-1]
    merged = []
    for image, (h, w) in zip(features.split([h * w for h, w in grids]), grids, strict=True):
        # [h, w, D] -> [h/m, m, w/m, m, D] -> [h/m, w/m, m(row), m(col), D]: each block's patches row-major.
        blocks = image.view(h // m, m, w // m, m, dim).permute(0, 2, 1, 3, 4)
        merged.append(blocks.reshape((h // m) * (w // m), m * m * dim))
    return torch.cat(merged)


class PatchMergerProjector(nn.Module):
    """LayerNorm per patch, pixel shuffle ``m x m``, then ``Linear -> GELU -> Linear`` to the decoder width.

    Args:
        vision_hidden: Width ``Dv`` of the vision features.
        merge_size: Block side ``m``.
        out_hidden: Decoder hidden size.
        eps: LayerNorm epsilon.
    """

    def __init__(self, vision_hidden: int, merge_size: int, out_hidden: int, eps: float):
        super().__init__()
        self.merge_size = merge_size
        merged = vision_hidden * merge_size * merge_size
        self.pre_norm = nn.LayerNorm(vision_hidden, eps=eps)
        self.linear_1 = nn.Linear(merged, merged, bias=True)
        self.linear_2 = nn.Linear(merged, out_hidden, bias=True)

    def init_weights(self, init: ParamInit | None = None, std: float = 0.02) -> None:
        """Initialize every parameter (weights ``normal(0, std)``).

        Args:
            init: The initializer named at this module (None: seeded from torch's global generator).
            std: Standard deviation of the weight matrices.
        """
        init_default_weights(self, std, init or ParamInit.from_global_rng())

    def forward(self, features: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Project packed vision features ``[patches, Dv]`` to decoder tokens ``[patches / m^2, out_hidden]``."""
        merged = merge_patches(self.pre_norm(features), grid_hw, self.merge_size)
        return self.linear_2(F.gelu(self.linear_1(merged)))
