"""Activation checkpointing of transformer blocks (decoder layers and vision blocks), by policy.

* ``none``: every activation is kept for the backward.
* ``full``: a block keeps only its input; its whole forward is recomputed during the backward.
* ``selective``: a block keeps the outputs of its matrix multiplications (expensive to recompute, and what the
  backward of the following op needs) and recomputes everything else: norms, activations, elementwise products,
  RoPE and the attention core (cheap in FLOPs, large in bytes: softmax inputs, padded values).

Applied with torch's composable ``checkpoint`` (forward hooks), so parameter names, the optimizer's unit keys and
checkpoints do not change with the policy. With compiled blocks (parallel/compile.py) the hooks run eagerly around
the compiled ``forward``. Gradients are identical to ``none`` (tested): recomputation replays the
same ops on the same inputs.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from model.decoder import DecoderLayer
from model.vision import VisionBlock

__all__ = ["POLICIES", "ActivationCheckpointing", "apply_activation_checkpointing", "default_policy"]

POLICIES = ("none", "selective", "full")

aten = torch.ops.aten
# Outputs kept by the selective policy: matrix multiplications, collectives (never re-issued in a recompute), and
# compiled graphs (parallel/compile.py): a graph's outputs hold what its partitioner saved for its backward, matmul
# outputs, while its fused pointwise work is recomputed inside the compiled backward.
SAVED_OPS = {
    torch.ops.higher_order.inductor_compiled_code,
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten._grouped_mm.default,
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def default_policy(seq_len: int, long_threshold: int = 32768) -> str:
    """The per-stage default: ``selective`` up to ``long_threshold`` tokens per row, ``full`` beyond (128K rows)."""
    return "selective" if seq_len <= long_threshold else "full"


class ActivationCheckpointing:
    """Activation checkpointing of every :class:`DecoderLayer` and :class:`VisionBlock` of a model, whose policy can
    change between curriculum stages (the hooks are installed once; the policy is read at each forward).

    Args:
        model: The model (before or after the other parallelisms are applied).
    """

    def __init__(self, model: nn.Module):
        self.blocks = [m for m in model.modules() if isinstance(m, (DecoderLayer, VisionBlock))]
        self.policy = "none"
        self._installed = False

    def set_policy(self, policy: str) -> None:
        """Use ``policy`` (one of :data:`POLICIES`) from the next forward on."""
        if policy not in POLICIES:
            raise ValueError(f"unknown activation checkpointing policy '{policy}': allowed are {POLICIES}")
        if policy != "none" and not self._installed:
            for block in self.blocks:
                checkpoint(block, context_fn=self._contexts)
            self._installed = True
        if self._installed:
            for block in self.blocks:
                checkpoint.state(block).enable_hook = policy != "none"
        self.policy = policy

    def _contexts(self):
        if self.policy == "selective":
            return create_selective_checkpoint_contexts(_selective_policy)
        return nullcontext(), nullcontext()


def apply_activation_checkpointing(model: nn.Module, policy: str) -> ActivationCheckpointing:
    """Checkpoint every transformer block of ``model`` under ``policy``, in place; returns the handle that can
    change the policy later."""
    handle = ActivationCheckpointing(model)
    handle.set_policy(policy)
    return handle
