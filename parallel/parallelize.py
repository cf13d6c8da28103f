"""The one ordered sequence that turns a single-device model into this rank's part of the parallel layout.

Order matters and is fixed here:

1. expert parallelism (``ep > 1``): each MoE layer keeps its ``E / ep`` experts and dispatches tokens with
   all-to-all (parallel/expert.py); done once, right after the model is built and initialized identically on every
   rank, and before the optimizer sees the parameters;
2. activation checkpointing hooks on every transformer block (parallel/activation_checkpoint.py), whose policy is
   chosen per stage;
3. per stage: context parallelism (``cp > 1``) swaps the decoder's attention cores for the all-gather-KV version
   laid out for the stage's sequence length (parallel/context.py), and the stage's checkpointing policy is set.

Data parallelism needs no change to the model: the ZeRO-1 optimizer reduces gradients over the right groups
(dense over data x context ranks, experts over expert-data ranks; optim/distributed.py).
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn

from parallel.activation_checkpoint import ActivationCheckpointing, default_policy
from parallel.context import apply_context_parallel
from parallel.dims import ParallelDims, ParallelGroups
from parallel.expert import apply_expert_parallel

logger = logging.getLogger(__name__)

__all__ = ["apply_stage_parallel", "parallelize_model", "resolve_checkpoint_policy"]


def parallelize_model(model: nn.Module, dims: ParallelDims, groups: ParallelGroups) -> ActivationCheckpointing:
    """Apply the parallelisms that hold for the whole run, in place.

    Returns:
        The activation-checkpointing handle (policy ``none`` until a stage sets one).
    """
    if dims.ep_degree > 1:
        layers = apply_expert_parallel(model, groups.ep)
        logger.info("expert parallelism: %d MoE layers sharded over %d ranks", layers, dims.ep_degree)
    return ActivationCheckpointing(model)


def resolve_checkpoint_policy(policy: str, seq_len: int) -> str:
    """``auto`` becomes the per-stage default for ``seq_len`` (wider checkpointing for long rows)."""
    return default_policy(seq_len) if policy == "auto" else policy


def apply_stage_parallel(model: nn.Module, cp_group: dist.ProcessGroup | None,
                         checkpointing: ActivationCheckpointing, policy: str, seq_len: int,
                         cp_method: str = "allgather") -> None:
    """Apply what depends on the stage: its context-parallel layout (``cp_group`` None or of one rank: none) for
    ``seq_len`` tokens per row with the ``cp_method`` exchange, and its checkpointing policy."""
    apply_context_parallel(model, cp_group, seq_len, cp_method)
    checkpointing.set_policy(resolve_checkpoint_policy(policy, seq_len))
