"""Activation memory of transformer blocks, measured (not guessed) on the CPU with torch's ``MemTracker``.

A block's activation bytes are what its forward leaves alive for the backward: linear in the tokens it processes
(attention runs per document through SDPA, which never stores ``T x T`` scores). So one forward of one real block
at the real width on a modest number of tokens gives bytes per token, and the dry run scales that to any sequence
length, layer count and pipeline schedule without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from config.model import DecoderArgs, VisionArgs
from model.attention import rope_angles_1d, rope_angles_2d
from model.decoder import DecoderLayer
from model.vision import VisionBlock
from parallel.activation_checkpoint import ActivationCheckpointing

__all__ = ["BlockBytes", "decoder_layer_bytes_per_token", "loss_head_peak_bytes", "measure_activation_bytes",
           "measure_block_bytes", "measure_peak_bytes", "vision_block_bytes_per_patch"]


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


class _DeviceTotals(MemTracker):
    """``MemTracker``'s per-device totals and peak without its per-module statistics, which refuse a module run
    twice in one tracked region (every micro-batch of a step runs the model again)."""

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        pass

    def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        pass

    def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
        pass

    def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
        pass

    def reset_peak(self) -> None:
        """Start a new peak from the current totals (the peak of a later phase alone)."""
        self._peak_mem_snap = self.get_tracker_snapshot("current")
        self._peak_mem = {dev: snap["Total"] for dev, snap in self._peak_mem_snap.items()}


def measure_peak_bytes(run: Callable[[], Any], *alive: nn.Module | torch.Tensor) -> int:
    """Peak tensor bytes (all devices) while ``run()`` runs, counting ``alive``: the modules (parameters, buffers)
    and tensors that exist before it (optimizer state, inputs). Tensors made outside ``run`` and not listed are not
    seen, so list everything the region holds."""
    tracker = _DeviceTotals()
    tracker.track_external(*alive)
    with tracker:
        run()
    return int(sum(by_type["Total"] for by_type in tracker.get_tracker_snapshot("peak").values()))


def _initialized(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)
    return module


@dataclass(frozen=True)
class BlockBytes:
    """Bytes per token (per patch for vision blocks) of one block under a checkpointing policy, measured.

    Attributes:
        stored: Kept by the forward for the backward, the block's output included and its input not (the
            previous block's output): summed over a stack of blocks, this is what the forward leaves.
        forward_extra: The forward's peak above ``stored`` (temporaries freed before the block returns).
        backward_extra: The backward's peak above ``stored``: the recomputed forward under checkpointing, the
            gradients of the output and input and every temporary; not the gradients of the parameters (the dry run
            counts those whole).
    """

    stored: float
    forward_extra: float
    backward_extra: float


def measure_block_bytes(build: Callable[[int], tuple[nn.Module, list[torch.Tensor], Callable[[], torch.Tensor]]],
                        policy: str, tokens: int) -> BlockBytes:
    """:class:`BlockBytes` of a block: ``build(n)`` gives the block, its inputs and its forward on ``n`` tokens.

    Measured at ``tokens`` and ``tokens / 2``: the difference per token is the slope, free of what does not grow
    with tokens. The parameters' gradients exist before (as in every micro-batch after the first), so the backward
    accumulates into them and they are not counted.
    """
    points = [_block_bytes(*build(n), policy) for n in (tokens // 2, tokens)]
    (small, large), span = points, tokens - tokens // 2
    return BlockBytes(*((b - a) / span for a, b in zip(small, large, strict=True)))


def _block_bytes(block: nn.Module, inputs: list[torch.Tensor], run: Callable[[], torch.Tensor],
                 policy: str) -> tuple[int, int, int]:
    ActivationCheckpointing(nn.ModuleList([block])).set_policy(policy)
    for param in block.parameters():
        param.grad = torch.zeros_like(param)
    tracker = _DeviceTotals()
    tracker.track_external(block, *inputs, *(p.grad for p in block.parameters()))
    with tracker:
        base = _total(tracker.get_tracker_snapshot("current"))
        out = run()
        after_forward = _total(tracker.get_tracker_snapshot("current"))
        forward_peak = _total(tracker.get_tracker_snapshot("peak"))
        tracker.reset_peak()
        out.float().square().mean().backward()
        backward_peak = _total(tracker.get_tracker_snapshot("peak"))
    return after_forward - base, forward_peak - after_forward, backward_peak - after_forward


def _total(snapshot: dict) -> int:
    return int(sum(by_type["Total"] for by_type in snapshot.values()))


def _initialized(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)
    return module


def _in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` with its parameters (not its buffers: the router's bias stays fp32) in ``dtype``, as
    ``parallelize`` casts them."""
    for param in module.parameters():
        param.data = param.data.to(dtype)
    return module


def decoder_layer_bytes_per_token(args: DecoderArgs, moe: bool, policy: str, tokens: int = 512,
                                  dtype: torch.dtype = torch.float32) -> BlockBytes:
    """:class:`BlockBytes` of one decoder layer with ``dtype`` parameters and activations, measured on rows of two
    documents.

    A MoE layer is measured with ``num_experts_per_token + 2`` routed experts: every token still visits ``k`` of
    them (what activations depend on), while the weights stay small; only the ``[T, E]`` router scores shrink
    (< 1% of a layer's activations at E = 64).
    """
    if moe:
        args = replace(args, num_routed_experts=min(args.num_routed_experts, args.num_experts_per_token + 2))

    def build(n: int):
        torch.manual_seed(0)
        layer = _in_dtype(_initialized(DecoderLayer(args, use_moe=moe)), dtype)
        x = torch.randn(1, n, args.hidden_size, dtype=dtype, requires_grad=True)
        angles = rope_angles_1d(torch.arange(n), args.qk_rope_head_dim, args.rope_theta)
        cu_seqlens = torch.tensor([0, n // 2, n], dtype=torch.int32)
        return layer, [x, angles], lambda: layer(x, angles, cu_seqlens)[0]

    return measure_block_bytes(build, policy, tokens)


def vision_block_bytes_per_patch(args: VisionArgs, policy: str, side: int = 16,
                                 dtype: torch.dtype = torch.float32) -> BlockBytes:
    """:class:`BlockBytes` per patch of one MoonViT block with ``dtype`` parameters and activations, measured on
    square images."""

    def build(patches: int):
        torch.manual_seed(0)
        block = _in_dtype(_initialized(VisionBlock(args)), dtype)
        width = int(patches**0.5)
        x = torch.randn(patches, args.hidden_size, dtype=dtype, requires_grad=True)
        grid = torch.arange(patches)
        angles = rope_angles_2d(grid // width, grid % width, args.hidden_size // args.num_heads, args.rope_theta)
        cu_seqlens = torch.tensor([0, patches], dtype=torch.int32)
        return block, [x, angles], lambda: block(x, cu_seqlens, angles)

    return measure_block_bytes(build, policy, side * side)


def loss_head_peak_bytes(args: DecoderArgs, tokens: int, loss: Callable[..., torch.Tensor],
                         accumulating: bool, dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes of the final norm and the loss, forward and backward, above their weights and input, at the real
    shapes on ``meta`` (nothing is allocated). ``loss(hidden, weight, targets)`` is the trainer's (the fused,
    chunked one of train/loss.py: the gradients of hidden states, one chunk's logits and their temporaries, the output
    projection's gradient, and, when ``accumulating``, the new gradient beside the accumulated one). The output
    weight's accumulated gradient itself is not included."""
    from model.layers import RMSNorm

    with torch.device("meta"):
        norm = _in_dtype(RMSNorm(args.hidden_size, eps=args.rms_norm_eps), dtype)
        weight = nn.Parameter(torch.empty(args.vocab_size, args.hidden_size, dtype=dtype))
        hidden = torch.empty(tokens, args.hidden_size, dtype=dtype, requires_grad=True)
        targets = torch.zeros(tokens, dtype=torch.int64)
        if accumulating:
            weight.grad = torch.zeros_like(weight)
            norm.weight.grad = torch.zeros_like(norm.weight)
    tracker = _DeviceTotals()
    tracker.track_external(norm, weight, hidden, targets)
    with tracker:
        base = _total(tracker.get_tracker_snapshot("current"))
        loss(norm(hidden), weight, targets).backward()
        peak = _total(tracker.get_tracker_snapshot("peak"))
    return peak - base
