"""MoonViT: a native-resolution ViT over NaViT-style packed patch sequences.

Every image keeps its own patch grid ``(h, w)``; the patches of all images are concatenated (never padded) and
attention is restricted to each image through ``cu_seqlens``. Positions are given twice, as in Kimi-VL: a learnable
absolute table (SigLIP's, bicubically interpolated to each grid) added after the patch embedding, and 2D RoPE on
queries and keys inside every block.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from config.model import VisionArgs
from model.attention import HostBounds, apply_rotary, rope_angles_2d, varlen_attention
from model.init import ParamInit
from model.layers import init_default_weights

__all__ = ["MoonViT", "grid_cu_seqlens", "grid_positions", "interpolate_pos_table"]


def grid_cu_seqlens(grid_hw: torch.Tensor) -> tuple[int, ...]:
    """Boundaries of the packed images, one attention document per image, as host ints (``cu_seqlens`` form;
    derived from the host grids in Python, no tensor op runs on the metadata)."""
    return (0, *itertools.accumulate(h * w for h, w in grid_hw.tolist()))


def grid_positions(grid_hw: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every packed patch inside its own image grid (row-major), each ``int64 [patches]`` on
    ``device`` (``grid_hw``'s by default: grids are host metadata, positions feed device math)."""
    device = grid_hw.device if device is None else device
    rows, cols = [], []
    for h, w in grid_hw.tolist():
        rows.append(torch.arange(h, device=device).repeat_interleave(w))
        cols.append(torch.arange(w, device=device).repeat(h))
    return torch.cat(rows), torch.cat(cols)


def interpolate_pos_table(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The ``(P, P, hidden)`` position table resized to an ``(h, w)`` grid, flattened row-major to ``[h*w, hidden]``.

    Bicubic, ``align_corners=False``; the table itself when the grid already has its size.
    """
    side, _, hidden = table.shape
    if (h, w) == (side, side):
        return table.reshape(h * w, hidden)
    grid = table.permute(2, 0, 1).unsqueeze(0)  # [1, hidden, P, P]
    resized = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return resized.squeeze(0).permute(1, 2, 0).reshape(h * w, hidden)


class VisionBlock(nn.Module):
    """Pre-norm transformer block: bidirectional attention within each image, then a GELU(tanh) MLP."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.head_dim = args.hidden_size // args.num_heads
        self.norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.qkv = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=True)
        self.proj = nn.Linear(args.hidden_size, args.hidden_size, bias=True)
        self.norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.fc1 = nn.Linear(args.hidden_size, args.mlp_hidden_size, bias=True)
        self.fc2 = nn.Linear(args.mlp_hidden_size, args.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: Sequence[int], angles: torch.Tensor | None) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Packed patch features ``[T, hidden]``.
            cu_seqlens: ``[images + 1]`` image boundaries as host ints (see ``grid_cu_seqlens``; MoonViT passes
                them as :class:`~model.attention.HostBounds`).
            angles: 2D RoPE angles ``[T, head_dim / 2]``, or None without RoPE.

        Returns:
            ``[T, hidden]``.
        """
        tokens = x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).view(tokens, 3, -1, self.head_dim).unbind(1)
        if angles is not None:
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        attn = varlen_attention(q, k, v, cu_seqlens, causal=False)
        x = x + self.proj(attn.flatten(1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


# SigLIP's normalization, (x / 255 - 0.5) / 0.5: raw RGB [0, 255] to [-1, 1].
PIXEL_SCALE = 2.0 / 255.0


class MoonViT(nn.Module):
    """The vision tower.

    Args:
        args: Its hyper-parameters.
    """

    def __init__(self, args: VisionArgs):
        super().__init__()
        if args.hidden_size % args.num_heads != 0:
            raise ValueError(f"vision hidden_size={args.hidden_size} is not divisible by num_heads={args.num_heads}.")
        self.patch_size = args.patch_size
        self.head_dim = args.hidden_size // args.num_heads
        self.use_rope = args.use_rope
        self.rope_theta = args.rope_theta
        if self.use_rope and self.head_dim % 4 != 0:
            raise ValueError(f"2D RoPE needs a vision head dim divisible by 4; hidden_size / num_heads = "
                             f"{self.head_dim}: change model.vision.num_heads.")
        self.patch_embed = nn.Conv2d(args.in_channels, args.hidden_size, args.patch_size, stride=args.patch_size)
        self.pos_table = nn.Parameter(torch.empty(args.pos_table_size, args.pos_table_size, args.hidden_size))
        self.blocks = nn.ModuleList(VisionBlock(args) for _ in range(args.num_layers))
        self.norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    @property
    def hidden_size(self) -> int:
        """Width of the features this tower emits."""
        return self.norm.normalized_shape[0]

    def init_weights(self, init: ParamInit | None = None, std: float = 0.02) -> None:
        """Initialize every parameter.

        Args:
            init: The initializer named at this tower (None: seeded from torch's global generator).
            std: Standard deviation of the weight matrices (the position table always uses 0.02).
        """
        init = init or ParamInit.from_global_rng()
        init_default_weights(self, std, init)
        init.normal_(self.pos_table, 0.02, "pos_table")

    def position_embeddings(self, grid_hw: torch.Tensor) -> torch.Tensor:
        """The absolute position embedding of every packed patch, ``[patches, hidden]``."""
        cache: dict[tuple[int, int], torch.Tensor] = {}  # images of one grid share one interpolation
        pieces = []
        for h, w in grid_hw.tolist():
            if (h, w) not in cache:
                cache[(h, w)] = interpolate_pos_table(self.pos_table, h, w)
            pieces.append(cache[(h, w)])
        return torch.cat(pieces)

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch embedding of ``[patches, p * p * C]`` patches flattened as (y, x, channel).

        uint8 patches are raw RGB (the loader's output: a quarter of the bytes to copy between processes and to the
        device) and are normalized here, on the model's device, with SigLIP's mean = std = 0.5; floating-point
        patches are taken as normalized already. The embedding is the Conv2d's (its weight keeps the checkpoint
        layout ``[hidden, C, p, p]``), applied as a matrix product with the weight permuted to the patches' (y, x,
        channel) order: permuting the small weight costs nothing, permuting the pixels would cost a copy.
        """
        weight = self.patch_embed.weight
        hidden, channels = weight.shape[0], weight.shape[1]
        if pixel_values.dim() != 2 or pixel_values.shape[1] != channels * self.patch_size**2:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [patches, "
                             f"{channels * self.patch_size ** 2}] (patch_size={self.patch_size}, {channels} channels).")
        if pixel_values.dtype == torch.uint8:
            # Normalized in fp32: a bf16 step near 1.0 is as coarse as one pixel level.
            pixel_values = pixel_values.float().mul_(PIXEL_SCALE).sub_(1.0)
        return F.linear(pixel_values.to(weight.dtype), weight.permute(0, 2, 3, 1).reshape(hidden, -1),
                        self.patch_embed.bias)

    def forward(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Encode packed images.

        Args:
            pixel_values: ``[patches, p * p * C]``, image after image, each row-major over its patch grid, every
                patch flattened as ``(p, p, C)``: uint8 raw RGB, or floats already normalized to [-1, 1]
                (:meth:`embed_patches`).
            grid_hw: ``int64 [images, 2]`` patch grid (height, width) of each image.

        Returns:
            Patch features ``[patches, hidden]`` in the same order.
        """
        patches = pixel_values.shape[0]
        expected = sum(h * w for h, w in grid_hw.tolist())
        if patches != expected:
            raise ValueError(f"pixel_values holds {patches} patches but image_grid_hw describes {expected}.")
        x = self.embed_patches(pixel_values)
        x = x + self.position_embeddings(grid_hw).to(x.dtype)
        cu_seqlens = HostBounds(grid_cu_seqlens(grid_hw))
        angles = None
        if self.use_rope:
            rows, cols = grid_positions(grid_hw, x.device)
            angles = rope_angles_2d(rows, cols, self.head_dim, self.rope_theta)
        for block in self.blocks:
            x = block(x, cu_seqlens, angles)
        return self.norm(x)
