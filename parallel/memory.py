"""Activation memory of transformer blocks, measured (not guessed) on the CPU with torch's ``MemTracker``.

A block's activation bytes are what its forward leaves alive for the backward: linear in the tokens it processes
(attention runs per document through SDPA, which never stores ``T x T`` scores). So one forward of one real block
at the real width on a modest number of tokens gives bytes per token, and the dry run scales that to any sequence
length, layer count and pipeline schedule without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from model.args import DecoderArgs, VisionArgs
from model.attention import rope_angles_1d, rope_angles_2d
from model.decoder import DecoderLayer
from model.vision import VisionBlock
from parallel.activation_checkpoint import ActivationCheckpointing

__all__ = ["decoder_layer_activation_bytes_per_token", "measure_activation_bytes",
           "vision_block_activation_bytes_per_token"]


def measure_activation_bytes(blocks: nn.ModuleList, run: Callable[[], torch.Tensor], policy: str) -> int:
    """Bytes of activations alive after ``run()`` (a forward through ``blocks`` returning a tensor to differentiate),
    with ``policy`` applied to the blocks; the backward runs too, so the measurement includes a full step."""
    ActivationCheckpointing(blocks).set_policy(policy)
    tracker = MemTracker()
    tracker.track_external(blocks)
    with tracker:
        out = run()
        snapshot = tracker.get_tracker_snapshot("current")
        out.float().square().mean().backward()
    return sum(by_type.get(_MemRefType.ACT, 0) for by_type in snapshot.values())


def _initialized(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)
    return module


def decoder_layer_activation_bytes_per_token(args: DecoderArgs, moe: bool, policy: str, tokens: int = 512) -> float:
    """Activation bytes per token of one decoder layer (fp32), measured on ``tokens`` tokens in two documents.

    A MoE layer is measured with ``num_experts_per_token + 2`` routed experts: every token still visits ``k`` of
    them (what activations depend on), while the weights stay small; only the ``[T, E]`` router scores shrink
    (< 1% of a layer's activations at E = 64).
    """
    if moe:
        args = replace(args, num_routed_experts=min(args.num_routed_experts, args.num_experts_per_token + 2))
    torch.manual_seed(0)
    layer = _initialized(DecoderLayer(args, use_moe=moe))
    x = torch.randn(1, tokens, args.hidden_size, requires_grad=True)
    angles = rope_angles_1d(torch.arange(tokens), args.qk_rope_head_dim, args.rope_theta)
    cu_seqlens = torch.tensor([0, tokens // 2, tokens], dtype=torch.int32)
    used = measure_activation_bytes(nn.ModuleList([layer]), lambda: layer(x, angles, cu_seqlens)[0], policy)
    return used / tokens


def vision_block_activation_bytes_per_token(args: VisionArgs, policy: str, side: int = 16) -> float:
    """Activation bytes per patch of one MoonViT block (fp32), measured on one ``side x side`` image."""
    torch.manual_seed(0)
    block = _initialized(VisionBlock(args))
    patches = side * side
    x = torch.randn(patches, args.hidden_size, requires_grad=True)
    grid = torch.arange(patches)
    angles = rope_angles_2d(grid // side, grid % side, args.hidden_size // args.num_heads, args.rope_theta)
    cu_seqlens = torch.tensor([0, patches], dtype=torch.int32)
    used = measure_activation_bytes(nn.ModuleList([block]), lambda: block(x, cu_seqlens, angles), policy)
    return used / patches
