"""Pipeline parallelism of :class:`~model.vlm.KimiVL` on ``torch.distributed.pipelining``.

Split. The decoder's layers are cut into ``pp_degree * virtual_stages`` contiguous stages balanced by a per-layer
cost estimate (:func:`layer_costs`, :func:`split_layers`): stage 0 also carries the token embedding, the vision tower
and the projector (images are scattered into the sequence there), the last stage the final norm and the output head.
Each rank keeps a *pruned* KimiVL holding only its stages' parts (layers keep their ``decoder.layers.<i>`` names, so
the optimizer, checkpoints and ``update_expert_bias`` work unchanged); one :class:`StageModule` per stage runs the
model's own forward on a view of that model holding only the stage's modules (:func:`stage_model`: no embedding
after the first stage, no final norm before the last).

What crosses stages. Every stage sends ``(hidden [B, S, H], position_ids [B, S] int64, doc_ids [B, S] int32)``: the
per-token document index, from which each stage rebuilds ``cu_seqlens`` for its attention. Rows are packed to a
fixed length, so these shapes are the same for every micro-batch and step, and the stages are declared with static
shapes (no metadata-inference forward, which would run MoE routing on meta tensors and count expert loads twice).

Images. Only stage 0 needs them and their patch count varies per micro-batch. They are passed as keyword inputs,
each micro-batch's patches / grids / placeholder positions padded to the step's largest and stacked on a leading
micro-batch dimension, with the true counts alongside; the schedule chunks them along that dimension like any other
input, and stage 0 slices the padding off. Keyword inputs are not shape-checked against the static stage metadata,
so the cap can change from step to step without any communication (it never leaves stage 0).

Loss. The last stage's loss is ``CE sum / global loss-token count`` (the count of the whole step over every
data-parallel replica, passed per step), and the schedules do *not* divide gradients by the number of micro-batches
(``scale_grads=False``): summed over micro-batches and replicas the gradients are exactly one process's.

MoE side outputs. Each stage adds up the expert loads of its MoE layers over the step's micro-batches
(:meth:`PipelineRunner.expert_load`, in the pruned decoder's layer order, ready for ``update_expert_bias``). The
optional balance loss of a layer is attached to the hidden state with :class:`AttachAuxLoss` (its gradient enters
the backward where the layer is, as Megatron's ``MoEAuxLossAutoScaler`` does), so it needs no extra stage output.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from config.model import ModelArgs
from config.schema import PIPELINE_SCHEDULES
from data.batch import PackedBatch
from model.layers import masked_targets
from model.vlm import KimiVL
from parallel.context import context_parallel_share, embed_inputs_context_parallel
from parallel.zigzag import ZigzagLayout

__all__ = ["SCHEDULES", "AttachAuxLoss", "PipelineRunner", "StageModule", "SumLoss", "build_pipeline",
           "cu_seqlens_from_doc_ids", "doc_ids_from_cu_seqlens", "layer_costs",
           "pipeline_lm_step", "split_layers", "stage_ranks"]

# name -> (schedule class, layout of stages over ranks: "loop" puts stage s on rank s % pp, "v" puts stages r and
# 2 pp - 1 - r on rank r, fixed stages per rank or None for ``virtual_stages``)
SCHEDULES: dict[str, tuple[type, str, int | None]] = {
    "gpipe": (ScheduleGPipe, "loop", 1),
    "1f1b": (Schedule1F1B, "loop", 1),
    "interleaved_1f1b": (ScheduleInterleaved1F1B, "loop", None),
    "interleaved_zero_bubble": (ScheduleInterleavedZeroBubble, "loop", None),
    "zero_bubble": (ScheduleZBVZeroBubble, "v", 2),
}
assert {name: per_rank for name, (_, _, per_rank) in SCHEDULES.items()} == PIPELINE_SCHEDULES


# ---------------------------------------------------------------------------------------------------------- split


def layer_costs(args: ModelArgs, seq_len: int, patches_per_token: float = 0.5) -> tuple[list[float], float, float]:
    """Forward FLOPs per decoder token of each decoder layer, of stage 0's extras and of the last stage's extras.

    Estimates (matmuls only, ``2 * params`` per token, attention core with the mean causal context ``seq_len / 2``):
    MoE layers count their router, ``k`` routed and the shared experts; stage 0 counts the vision tower and projector
    for ``patches_per_token`` image patches per decoder token; the last stage counts the output head.

    Args:
        args: Model hyper-parameters.
        seq_len: Tokens per packed row.
        patches_per_token: Expected vision patches per decoder token in the stage's data.

    Returns:
        ``(per-layer costs, first-stage extra, last-stage extra)``.
    """
    d = args.decoder
    heads, qk = d.num_heads, d.qk_nope_head_dim + d.qk_rope_head_dim
    attn_params = (d.hidden_size * heads * qk + d.hidden_size * (d.kv_lora_rank + d.qk_rope_head_dim)
                   + d.kv_lora_rank * heads * (d.qk_nope_head_dim + d.v_head_dim)
                   + heads * d.v_head_dim * d.hidden_size)
    attention = 2 * attn_params + 2 * heads * (qk + d.v_head_dim) * seq_len / 2
    dense = 2 * 3 * d.hidden_size * d.dense_ffn_size
    moe = 2 * (d.hidden_size * d.num_routed_experts
               + 3 * d.hidden_size * d.moe_ffn_size * (d.num_experts_per_token + d.num_shared_experts))
    costs = [attention + (dense if i < d.num_dense_layers else moe) for i in range(d.num_layers)]
    v = args.vision
    patch_dim = v.in_channels * v.patch_size**2
    vision_block = 2 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.mlp_hidden_size) + 4 * v.hidden_size * seq_len / 2
    merged = v.hidden_size * v.merge_size**2
    projector = 2 * (merged * merged + merged * d.hidden_size) / v.merge_size**2
    first = patches_per_token * (2 * patch_dim * v.hidden_size + v.num_layers * vision_block + projector)
    last = 2 * d.hidden_size * d.vocab_size
    return costs, first, last


def split_layers(costs: list[float], num_stages: int, first_extra: float = 0.0,
                 last_extra: float = 0.0) -> list[list[int]]:
    """Cut layers into ``num_stages`` contiguous stages (at least one layer each) minimizing the costliest stage.

    Exact dynamic programming over cut points (``O(layers^2 * stages)``, trivial for real depths).

    Args:
        costs: Cost of each layer, in order.
        num_stages: Number of stages (all virtual stages of all ranks).
        first_extra: Cost added to the first stage (embeddings, vision tower, projector).
        last_extra: Cost added to the last stage (final norm, output head).

    Returns:
        The layer indices of each stage.
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot cut {n} decoder layers into {num_stages} pipeline stages of at least one layer "
                         f"each: use at most {n} stages (pp_degree x virtual stages) or a deeper model.")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(start: int, stop: int, index: int) -> float:
        extra = (first_extra if index == 0 else 0.0) + (last_extra if index == num_stages - 1 else 0.0)
        return prefix[stop] - prefix[start] + extra

    # best[s][j]: smallest max-cost of cutting the first j layers into s stages; cut[s][j]: where stage s starts.
    best = [[math.inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(s, n - (num_stages - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], stage_cost(i, j, s - 1))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    stages, stop = [], n
    for s in range(num_stages, 0, -1):
        start = cut[s][stop]
        stages.append(list(range(start, stop)))
        stop = start
    return stages[::-1]


def stage_ranks(num_stages: int, pp_degree: int, layout: str) -> list[int]:
    """The pipeline rank of each stage: round robin (``loop``) or the ZBV ``v`` shape (rank r: r and 2pp-1-r)."""
    if layout == "loop":
        return [s % pp_degree for s in range(num_stages)]
    if num_stages != 2 * pp_degree:
        raise ValueError(f"the V layout needs exactly 2 stages per rank, got {num_stages} for pp={pp_degree}")
    return [s if s < pp_degree else 2 * pp_degree - 1 - s for s in range(num_stages)]


# ---------------------------------------------------------------------------------------------------------- stages


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, rows: int, seq: int) -> torch.Tensor:
    """``int32 [rows, seq]`` index of the document of every token (what crosses stages instead of ``cu_seqlens``,
    whose length varies)."""
    tokens = torch.arange(rows * seq, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True).to(torch.int32).view(rows, seq)


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """``int32 [docs + 1]`` boundaries rebuilt from per-token document indices (empty documents vanish, which
    changes no attention), on the host where attention reads them: the stage's one wait for the device."""
    flat = doc_ids.reshape(-1).cpu()
    starts = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    edges = torch.tensor([0, flat.numel()], device=flat.device)
    return torch.cat((edges[:1], starts, edges[1:])).to(torch.int32)


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends ``weight`` as the gradient of ``aux`` (so ``weight * aux`` is
    part of the loss without being an output of the stage)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        # A copy, not a view: zero-bubble schedules detach stage outputs in place, which views do not allow.
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full(ctx.aux_shape, ctx.weight, dtype=ctx.aux_dtype, device=grad.device), None


class StageModule(nn.Module):
    """One pipeline stage: a view of the rank's pruned model holding only this stage's modules (:func:`stage_model`),
    run by the model's own forward. The view is registered here, so ``parameters()`` is exactly this stage's, as
    zero-bubble weight gradients require.

    Args:
        model: This rank's pruned model.
        layers: Keys of this stage's decoder layers.
        is_first: Whether it embeds tokens and images.
        is_last: Whether it applies the final norm (the loss applies the output head).
    """

    def __init__(self, model: KimiVL, layers: list[str], is_first: bool, is_last: bool):
        super().__init__()
        self.model = stage_model(model, layers, is_first, is_last)
        self.is_first, self.is_last = is_first, is_last
        moe = {key: layer.moe for key, layer in self.model.decoder.layers.items() if layer.moe is not None}
        self.moe_layers = list(moe)
        self.has_balance_loss = any(m.aux_loss_enabled for m in moe.values())
        self.aux_weight = 0.0
        # Context parallelism (set per curriculum stage): the first stage cuts the embedded rows by the zig-zag
        # layout; hidden states and positions then travel sharded, document ids whole (the attention cores need the
        # global document boundaries).
        self.cp_group: dist.ProcessGroup | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the expert loads and the balance-loss sum added up over a step's micro-batches."""
        self.expert_load: dict[str, torch.Tensor] = {}
        self.aux_loss_sum = 0.0

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_grid_hw: torch.Tensor | None = None,
                image_token_positions: torch.Tensor | None = None, image_counts: torch.Tensor | None = None):
        """Run the stage on one micro-batch.

        Args:
            x: Token ids ``[B, S]`` on the first stage, else the hidden states ``[B, S, H]``.
            position_ids: ``int64 [B, S]``.
            doc_ids: ``int32 [B, S]`` document index of every token.
            pixel_values, image_grid_hw, image_token_positions: This micro-batch's images, padded, with a leading
                micro-batch dimension of 1 (first stage only; other stages ignore them).
            image_counts: ``[1, 3]`` true numbers of patches, images and placeholder positions.

        Returns:
            The final hidden states ``[B, S, H]`` on the last stage, else ``(hidden, position_ids, doc_ids)``.
        """
        if self.is_first:
            x = self._embed(x, pixel_values, image_grid_hw, image_token_positions, image_counts)
            if self.cp_group is not None:
                layout = ZigzagLayout(*doc_ids.shape, dist.get_world_size(self.cp_group))
                cp_rank = dist.get_rank(self.cp_group)
                x, position_ids = layout.shard(x, cp_rank), layout.shard(position_ids, cp_rank)
        hidden, aux = self.model.decoder(position_ids=position_ids, cu_seqlens=cu_seqlens_from_doc_ids(doc_ids),
                                         inputs_embeds=x)
        for key, load in zip(self.moe_layers, aux.expert_load, strict=True):
            self.expert_load[key] = self.expert_load[key] + load if key in self.expert_load else load
        if self.has_balance_loss:  # once per stage: one copy of the hidden state, whatever the number of MoE layers
            self.aux_loss_sum += float(aux.aux_loss.detach())
            hidden = AttachAuxLoss.apply(hidden, aux.aux_loss, self.aux_weight)
        return hidden if self.is_last else (hidden, position_ids, doc_ids)

    def _embed(self, input_ids, pixel_values, image_grid_hw, image_token_positions, image_counts) -> torch.Tensor:
        if image_counts is None or int(image_counts[0, 0]) == 0:
            return self.model.embed_inputs(input_ids)
        patches, images, tokens = image_counts[0].tolist()
        inputs = (input_ids, pixel_values[0, :patches], image_grid_hw[0, :images], image_token_positions[0, :tokens])
        if self.cp_group is not None:  # images divided among the context ranks (parallel/context.py)
            return embed_inputs_context_parallel(self.model, *inputs, self.cp_group)
        return self.model.embed_inputs(*inputs)


def prune_model(model: KimiVL, keep_layers: set[str], first: bool, last: bool) -> KimiVL:
    """Drop, in place, everything this rank's stages do not run (names of what stays are unchanged)."""
    decoder = model.decoder
    for key in [k for k in decoder.layers if k not in keep_layers]:
        del decoder.layers[key]
    if not first:
        # The CoCa towers belong to the vision side: kept with the tower, so the state stays whole over the ranks.
        model.vision = model.projector = model.coca = decoder.embed_tokens = None
    if not last:
        decoder.norm = decoder.output = None
    return model


def stage_model(model: KimiVL, layers: list[str], first: bool, last: bool) -> KimiVL:
    """One stage's model (torchtitan's per-stage model chunk): a shallow copy of ``model`` and of its decoder that
    shares every module of ``model`` but holds only the stage's, so the model's forward runs exactly the stage.

    A rank may run several stages of one pruned model (interleaved and zero-bubble schedules); the copies leave that
    model, which the optimizer and checkpoints see, as it is. Parameters, buffers and the RoPE base are read from
    the shared modules, so later changes (``to_empty``, ``set_rope_theta``) reach the stage.
    """
    view = _shallow_copy(model)
    view.decoder = _shallow_copy(model.decoder)
    view.decoder.layers = nn.ModuleDict(model.decoder.layers)  # its own table, pruned to the stage's layers below
    view.coca = None  # next-token stages never run the CoCa towers
    return prune_model(view, set(layers), first, last)


def _shallow_copy(module: nn.Module) -> nn.Module:
    # copy.copy shares the table of children too: give the copy its own, so pruning it leaves ``module`` whole.
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


# ---------------------------------------------------------------------------------------------------------- runner


# The next-token loss *sum* of final hidden states, and the same per-token losses summed per group (the data source
# of each position): ``(hidden [B, S, H], output weight [V, H], targets [B, S] with IGNORE_INDEX where no loss is
# taken, groups [B, S] (negative: none) or None, number of groups) -> (fp32 scalar, fp32 [groups])``. The trainer
# hands in its fused, chunked loss (train/loss.py): one cross-entropy for training, pipelines and evaluation.
SumLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int],
                   tuple[torch.Tensor, torch.Tensor]]




class PipelineRunner:
    """This rank's part of the pipeline: the pruned model, its stage modules, and the schedule of the current batch
    shape (built on first use and rebuilt when micro-batch count, rows or sequence length change between curriculum
    stages; every rank of the pipeline sees the same shapes, since they all receive their replica's batches).

    Args:
        model: The pruned KimiVL (hand it to the optimizer).
        stages: This rank's stage modules, in stage order.
        stage_indices: Their global stage indices.
        num_stages: Stages of the whole pipeline.
        layout: Layer keys of every stage.
        schedule_name: One of :data:`SCHEDULES`.
        group: The pipeline process group.
        device: Where the stages run.
        loss: The last stage's loss sum of hidden states (:data:`SumLoss`).
    """

    def __init__(self, model: KimiVL, stages: list[StageModule], stage_indices: list[int], num_stages: int,
                 layout: list[list[str]], schedule_name: str, group: dist.ProcessGroup, device: torch.device,
                 loss: SumLoss):
        self.model, self.stages, self.stage_indices = model, stages, stage_indices
        self.num_stages, self.layout, self.schedule_name = num_stages, layout, schedule_name
        self.group, self.device = group, device
        self.loss = loss
        # Per-group loss sums of the last step's micro-batches on the last stage (``step(..., num_groups=...)``).
        self.num_groups = 0
        self.group_sums: torch.Tensor | None = None
        self._schedule: PipelineScheduleSingle | PipelineScheduleMulti | None = None
        self._shape: tuple[int, int, int] | None = None

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def last_stage_loss(self, hidden: torch.Tensor, target: torch.Tensor, num_targets: float) -> torch.Tensor:
        """The last stage's loss of one micro-batch: cross-entropy *sum* over its loss tokens / the step's global
        count, the output projection fused into it. With groups, ``target`` holds ``(targets, groups)`` in its
        last dimension and the per-group sums add to :attr:`group_sums`."""
        if not self.num_groups:
            return self.loss(hidden, self.model.decoder.output.weight, target, None, 0)[0] / num_targets
        targets, groups = target.unbind(-1)
        total, by_group = self.loss(hidden, self.model.decoder.output.weight, targets, groups, self.num_groups)
        self.group_sums += by_group.detach().double()
        return total / num_targets

    def last_stage_share(self, per_position: torch.Tensor) -> torch.Tensor:
        """This rank's positions of a ``[rows, seq]`` tensor at the last stage: the zigzag share of its
        context-parallel rank (whose hidden states cover only those), else all of them."""
        group = self.stages[-1].cp_group
        return per_position if group is None else context_parallel_share(per_position, group)

    @property
    def cp_degree(self) -> int:
        group = self.stages[0].cp_group
        return dist.get_world_size(group) if group is not None else 1

    def set_context_parallel(self, group: dist.ProcessGroup | None) -> None:
        """Shard the sequence over ``group`` from the next step on (None or one rank: whole rows)."""
        sharded = group is not None and dist.get_world_size(group) > 1
        for stage in self.stages:
            stage.cp_group = group if sharded else None

    def schedule_for(self, microbatches: int, rows: int, seq: int) -> PipelineScheduleSingle | PipelineScheduleMulti:
        """The schedule for micro-batches of ``rows x seq`` tokens (static stage shapes), cached."""
        if self._schedule is not None and self._shape == (microbatches, rows, seq, self.cp_degree):
            return self._schedule
        schedule_cls = SCHEDULES[self.schedule_name][0]
        dtype = next(iter(self.model.decoder.layers.values())).attention_norm.weight.dtype
        pipeline_stages = []
        for index, module in zip(self.stage_indices, self.stages, strict=True):
            inputs, outputs = _stage_metas(self.model.args, rows, seq, dtype, module.is_first, module.is_last,
                                           self.cp_degree)
            pipeline_stages.append(PipelineStage(module, index, self.num_stages, self.device, input_args=inputs,
                                                 output_args=outputs, group=self.group))
        # Sum, not mean, over micro-batches: the loss is already divided by the global token count. Every rank
        # passes a loss function (without one a schedule runs no backward); only the last stage's calls it.
        loss_fn = self.last_stage_loss
        if issubclass(schedule_cls, PipelineScheduleSingle):
            self._schedule = schedule_cls(pipeline_stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            self._schedule = schedule_cls(pipeline_stages, microbatches, loss_fn=loss_fn, scale_grads=False)
        self._shape = (microbatches, rows, seq, self.cp_degree)
        return self._schedule

    def step(self, batches: list[PackedBatch], num_targets: float, aux_weight: float = 0.0,
             num_groups: int = 0) -> torch.Tensor:
        """Forward and backward of ``batches`` (one per micro-batch) through the pipeline; gradients accumulate.

        Args:
            batches: This data-parallel replica's micro-batches (every rank of the pipeline passes the same).
            num_targets: Loss tokens of the whole step over every replica.
            aux_weight: Gradient weight of each MoE layer's balance loss of each micro-batch.
            num_groups: With the batches' ``source_ids``, the number of sources: the last stage also sums the loss
                per source into :attr:`group_sums` (this rank's tokens).

        Returns:
            The sum of this replica's micro-batch losses (0 on ranks without the last stage).
        """
        rows, seq = batches[0].input_ids.shape
        schedule = self.schedule_for(len(batches), rows, seq)
        for stage in self.stages:
            stage.reset_stats()
            stage.aux_weight = aux_weight
        args, kwargs = pack_microbatches(batches) if self.has_first else ((), {})
        target = None
        self.num_groups = num_groups if self.has_last else 0
        self.group_sums = torch.zeros(self.num_groups, dtype=torch.float64, device=self.device)
        if self.has_last:  # the last stage's logits are this rank's tokens only
            targets = [self.last_stage_share(masked_targets(b.labels, b.loss_mask)) for b in batches]
            if self.num_groups:  # chunked along rows with the targets by the schedule
                targets = [torch.stack((t, self.last_stage_share(b.source_ids).to(t.device, torch.int64)), dim=-1)
                           for t, b in zip(targets, batches, strict=True)]
            target = torch.cat(targets)
        losses: list[torch.Tensor] = []
        schedule.step(*args, target=target, losses=losses, return_outputs=False,
                      loss_kwargs={"num_targets": max(float(num_targets), 1.0)}, **kwargs)
        return torch.stack(losses).detach().sum() if losses else torch.zeros((), device=self.device)

    def expert_load(self) -> torch.Tensor:
        """``[local MoE layers, E]`` loads of the last step in the pruned decoder's layer order."""
        loads = {k: v for stage in self.stages for k, v in stage.expert_load.items()}
        keys = [k for k, layer in self.model.decoder.layers.items() if layer.moe is not None]
        if not keys:
            return torch.zeros(0, self.model.decoder.num_experts, device=self.device)
        return torch.stack([loads[k] for k in keys])

    def aux_loss_sum(self) -> float:
        """Sum of the (unweighted) balance losses of this rank's layers over the last step's micro-batches."""
        return sum(stage.aux_loss_sum for stage in self.stages)


def pack_microbatches(batches: list[PackedBatch]) -> tuple[tuple, dict]:
    """The schedule's whole-step inputs: token tensors concatenated over micro-batches along rows (chunked back by
    the schedule), images padded to the step's largest micro-batch and stacked along a leading micro-batch dim."""
    rows, seq = batches[0].input_ids.shape
    device = batches[0].input_ids.device
    input_ids = torch.cat([b.input_ids for b in batches])
    position_ids = torch.cat([b.position_ids for b in batches])
    doc_ids = torch.cat([doc_ids_from_cu_seqlens(b.cu_seqlens, rows, seq) for b in batches]).to(device)
    sizes = [[b.pixel_values.shape[0], b.image_grid_hw.shape[0], b.image_token_positions.shape[0]] for b in batches]
    counts = torch.tensor(sizes, dtype=torch.int64, device=device).view(len(batches), 3)
    caps = [max(column) for column in zip(*sizes, strict=True)]
    patch_dim = batches[0].pixel_values.shape[-1]

    def padded(tensors: list[torch.Tensor], cap: int, tail: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(len(tensors), cap, *tail, dtype=dtype, device=device)
        for i, t in enumerate(tensors):
            out[i, : t.shape[0]] = t
        return out

    kwargs = {
        "pixel_values": padded([b.pixel_values for b in batches], caps[0], (patch_dim,), batches[0].pixel_values.dtype),
        "image_grid_hw": padded([b.image_grid_hw.view(-1, 2) for b in batches], caps[1], (2,), torch.int64),
        "image_token_positions": padded([b.image_token_positions for b in batches], caps[2], (), torch.int64),
        "image_counts": counts,
    }
    return (input_ids, position_ids, doc_ids), kwargs


def _stage_metas(model_args: ModelArgs, rows: int, seq: int, dtype: torch.dtype, first: bool, last: bool,
                 cp_degree: int = 1):
    """Static input / output examples of a stage (on ``meta``: only shapes, dtypes and requires_grad matter).

    Under context parallelism hidden states and positions cover ``seq / cp`` tokens per row, document ids all
    ``seq``; the first stage receives whole rows."""
    hidden, local = model_args.decoder.hidden_size, seq // cp_degree
    ints = (torch.empty(rows, local, dtype=torch.int64, device="meta"),
            torch.empty(rows, seq, dtype=torch.int32, device="meta"))
    act = torch.empty(rows, local, hidden, dtype=dtype, device="meta", requires_grad=True)
    whole_rows = (torch.empty(rows, seq, dtype=torch.int64, device="meta"),
                  torch.empty(rows, seq, dtype=torch.int64, device="meta"), ints[1])
    inputs = whole_rows if first else (act, *ints)
    if last:  # final hidden states: the loss applies the output projection
        outputs = (torch.empty(rows, local, hidden, dtype=dtype, device="meta", requires_grad=True),)
    else:
        outputs = (act, *ints)
    return inputs, outputs


def build_pipeline(model: KimiVL, schedule: str, group: dist.ProcessGroup, seq_len: int, loss: SumLoss,
                   virtual_stages: int = 2, patches_per_token: float = 0.5,
                   device: torch.device | str = "cpu") -> PipelineRunner:
    """Cut ``model`` (built identically on every rank) into stages and prune it to this rank's, in place.

    Args:
        model: The whole model; pruned in place.
        schedule: One of :data:`SCHEDULES`.
        group: The pipeline process group (ranks of one data-parallel replica, in stage order).
        seq_len: Tokens per row, for the cost estimate (attention grows with it).
        loss: The last stage's loss sum (:data:`SumLoss`).
        virtual_stages: Stages per rank of the interleaved schedules.
        patches_per_token: Expected image patches per token, for the cost estimate of stage 0.
        device: Where the stages run.

    Returns:
        The :class:`PipelineRunner`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule '{schedule}': allowed are {sorted(SCHEDULES)}")
    schedule_cls, layout_kind, per_rank = SCHEDULES[schedule]
    per_rank = per_rank or virtual_stages
    if per_rank < 2 and issubclass(schedule_cls, PipelineScheduleMulti):
        raise ValueError(f"schedule '{schedule}' needs at least 2 virtual stages per rank, got {per_rank}")
    pp, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    num_stages = pp * per_rank
    costs, first_extra, last_extra = layer_costs(model.args, seq_len, patches_per_token)
    layout = [[str(i) for i in stage] for stage in split_layers(costs, num_stages, first_extra, last_extra)]
    owners = stage_ranks(num_stages, pp, layout_kind)
    mine = [s for s in range(num_stages) if owners[s] == pp_rank]
    prune_model(model, {k for s in mine for k in layout[s]}, first=0 in mine, last=num_stages - 1 in mine)
    modules = [StageModule(model, layout[s], is_first=s == 0, is_last=s == num_stages - 1) for s in mine]
    return PipelineRunner(model, modules, mine, num_stages, layout, schedule, group, torch.device(device), loss)


def pipeline_lm_step(runner: PipelineRunner, batches: list[PackedBatch], aux_loss_coef: float, pp_degree: int,
                     cp_degree: int = 1, num_groups: int = 0) -> tuple[float, float, int, torch.Tensor]:
    """The trainer's next-token step under pipeline parallelism (what ``train.trainer.lm_step`` is without it).

    Every rank of a pipeline, and every context-parallel rank, holds its replica's batches, so world-wide sums of
    per-rank counts are divided by ``pp_degree x cp_degree``; losses exist on last stages only (each context rank's
    for its tokens). The balance loss is averaged over every micro-batch of every
    replica, as in ``lm_step``.

    Args:
        runner: This rank's pipeline.
        batches: This replica's micro-batches.
        aux_loss_coef: Weight of the MoE balance loss.
        pp_degree: Pipeline ranks per replica.
        num_groups: Sources of the batches' ``source_ids`` whose losses the last stage sums (``runner.group_sums``).

    Returns:
        ``(lm_loss, aux_loss, tokens, expert_load)``: global token-mean loss, mean balance loss, tokens of the step
        (all replicas), this rank's ``[local MoE layers, E]`` loads (still to be summed over the stage's replicas).
    """
    counts = torch.tensor([sum(b.num_loss_tokens for b in batches), sum(b.num_tokens for b in batches)],
                          dtype=torch.float64, device=runner.device)
    dist.all_reduce(counts)
    num_targets, tokens = (counts / (pp_degree * cp_degree)).tolist()
    replicas = dist.get_world_size() // (pp_degree * cp_degree)
    loss = runner.step(batches, num_targets, aux_loss_coef / (len(batches) * replicas), num_groups)
    totals = torch.stack((loss.double(), torch.tensor(runner.aux_loss_sum(), dtype=torch.float64,
                                                      device=runner.device)))
    dist.all_reduce(totals)
    lm_loss, aux_total = totals.tolist()
    return lm_loss, aux_total / (len(batches) * replicas), int(tokens), runner.expert_load()
