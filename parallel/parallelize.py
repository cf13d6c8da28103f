"""The one ordered sequence that turns a model built on ``meta`` into this rank's part of the layout, on its device.

:func:`parallelize` runs, in this order (torchtitan's):

1. expert parallelism (``ep > 1``): each MoE layer keeps its ``E / ep`` experts and dispatches tokens with
   all-to-all (parallel/expert.py);
2. pipeline pruning (``pp > 1``): the model keeps only this rank's stages (parallel/pipeline.py);
3. activation checkpointing hooks on every transformer block that remains (parallel/activation_checkpoint.py),
   whose policy is chosen per stage;
4. ``compile``: each remaining block's ``forward`` through ``torch.compile`` (parallel/compile.py). After the
   sharding and pruning (a block is compiled as this rank runs it) and inside the checkpoint hooks, which run
   eagerly around the compiled forward (compilation itself happens at the first call, in the parameters' dtype);
5. ``to_empty(device)``: the first allocation, of exactly the parameters this rank holds;
6. initialization of those parameters from the run's seed, each by its name (model/init.py): an expert at global
   index ``e`` and a layer ``i`` get the values one process gives them, whatever ``ep`` and ``pp`` are.

Until step 5 every tensor is on ``meta``, so no rank ever allocates a parameter it does not own.

Per curriculum stage, :meth:`ParallelModel.apply_stage` sets what changes between stages: context parallelism
(``cp > 1``) swaps the decoder's attention cores for the all-gather-KV or ring version laid out for the stage's
sequence length (parallel/context.py), and the stage's checkpointing policy.

Data parallelism needs no change to the model: the ZeRO-1 optimizer reduces gradients over the right groups
(dense over data x context ranks, experts over expert-data ranks; optim/distributed.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.init import ParamInit
from model.vlm import KimiVL
from parallel.activation_checkpoint import ActivationCheckpointing, default_policy
from parallel.compile import apply_compile
from parallel.context import apply_context_parallel
from parallel.dims import ParallelDims, ParallelGroups
from parallel.expert import apply_expert_parallel
from parallel.pipeline import PipelineRunner, SumLoss, build_pipeline

logger = logging.getLogger(__name__)

__all__ = ["ParallelModel", "PipelineOptions", "parallelize", "resolve_checkpoint_policy"]


@dataclass(frozen=True)
class PipelineOptions:
    """How a ``pp > 1`` layout is cut: the schedule, its virtual stages per rank, the longest row (the cost
    model's attention term grows with it), and the last stage's loss sum (the trainer's fused loss)."""

    schedule: str
    virtual_stages: int
    seq_len: int
    loss: SumLoss


@dataclass
class ParallelModel:
    """This rank's part of the model, on its device and initialized, with what the trainer drives per stage.

    Attributes:
        model: The (possibly pruned, expert-sharded) model: hand its parameters to the optimizer.
        dims: The layout.
        groups: This rank's process groups.
        device: Where parameters and activations live.
        checkpointing: The activation-checkpointing handle (policy set per stage).
        pipeline: This rank's pipeline stages when ``pp > 1``, else None.
    """

    model: KimiVL
    dims: ParallelDims
    groups: ParallelGroups
    device: torch.device
    checkpointing: ActivationCheckpointing
    pipeline: PipelineRunner | None = None

    def apply_stage(self, cp_group: dist.ProcessGroup | None, policy: str, seq_len: int,
                    cp_method: str = "allgather") -> None:
        """Apply what depends on the curriculum stage: its context-parallel layout (``cp_group`` None or of one
        rank: none) for ``seq_len`` tokens per row with the ``cp_method`` exchange, and its checkpointing policy."""
        apply_context_parallel(self.model, cp_group, seq_len, cp_method)
        self.checkpointing.set_policy(resolve_checkpoint_policy(policy, seq_len))
        if self.pipeline is not None:
            self.pipeline.set_context_parallel(cp_group)


def parallelize(model: KimiVL, dims: ParallelDims, groups: ParallelGroups, device: torch.device | str, seed: int,
                pipeline: PipelineOptions | None = None, param_dtype: torch.dtype = torch.float32,
                compile: bool = False) -> ParallelModel:
    """Shard, prune, wrap, place and initialize ``model`` for this rank (see the module docstring for the order).

    Args:
        model: A model built under ``torch.device("meta")``; changed in place.
        dims: The validated layout.
        groups: This rank's process groups (``groups.pp`` is used when ``dims.pp_degree > 1``).
        device: This rank's device (``cuda:<local rank>`` or ``cpu``).
        seed: The run's seed: each parameter's values are a function of it and the parameter's name.
        pipeline: How to cut the pipeline; required when ``dims.pp_degree > 1``.
        param_dtype: The parameters' dtype (activations follow it). Buffers keep theirs: the router's balancing
            bias stays fp32.
        compile: Compile every transformer block (``compile: true``); the layouts that allow it are checked by
            config/validate.py.

    Returns:
        The :class:`ParallelModel`.
    """
    materialized = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if not tensor.is_meta]
    if materialized:
        raise ValueError(f"parallelize takes a model built on meta (under torch.device('meta')), so that no rank "
                         f"allocates what it does not own; {materialized[0]} is already materialized.")
    device = torch.device(device)
    if dims.ep_degree > 1:
        layers = apply_expert_parallel(model, groups.ep)
        logger.info("expert parallelism: %d MoE layers sharded over %d ranks", layers, dims.ep_degree)
    runner = None
    if dims.pp_degree > 1:
        if pipeline is None or groups.pp is None:
            raise ValueError(f"pp_degree={dims.pp_degree} needs PipelineOptions and a pipeline process group")
        runner = build_pipeline(model, pipeline.schedule, groups.pp, pipeline.seq_len, pipeline.loss,
                                pipeline.virtual_stages, device=device)
    checkpointing = ActivationCheckpointing(model)
    if compile:
        logger.info("compiled blocks: %d", apply_compile(model))
    for param in model.parameters():  # on meta: nothing is allocated yet
        param.data = param.data.to(param_dtype)
    model.to_empty(device=device)
    model.init_weights(ParamInit(seed))
    return ParallelModel(model, dims, groups, device, checkpointing, runner)


def resolve_checkpoint_policy(policy: str, seq_len: int) -> str:
    """``auto`` becomes the per-stage default for ``seq_len`` (wider checkpointing for long rows)."""
    return default_policy(seq_len) if policy == "auto" else policy
