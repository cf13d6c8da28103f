"""Each objective's forward and backward over one optimizer step's micro-batches, as one strategy per objective.

Every strategy is called the same way, ``step(batches) -> StepResult``, and is chosen once per stage by
:func:`select_step`: :class:`LMStep` (next-token loss, with or without context parallelism), :class:`PipelineLMStep`
(the same under pipeline parallelism) and :class:`CocaStep` (``L = L_siglip + 2 * L_caption``). Gradients
accumulate in the model's parameters; the trainer's optimizer reduces and applies them.

Loss normalization: every rank scales its loss sums by the *global* number of loss tokens of the step (all ranks,
all micro-batches), and gradients are summed over the data-parallel group, so one step equals one process running
the whole global batch (token-mean loss, not a mean of per-rank means).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from config import StageConfig
from data.batch import ImageTextBatch, PackedBatch
from data.mixture import mixture_sources
from parallel.context import context_parallel_share, forward_context_parallel
from parallel.pipeline import PipelineRunner, pipeline_lm_step
from train.loss import (
    DEFAULT_CHUNK_TOKENS,
    caption_loss_by_group,
    caption_loss_sum,
    linear_cross_entropy_by_group,
    masked_targets,
    siglip_loss,
)

__all__ = ["CAPTION_LOSS_WEIGHT", "CocaStep", "LMStep", "PipelineLMStep", "SourceLosses", "StepResult",
           "StepStrategy", "coca_step", "lm_step", "select_step"]

# Weight of the caption loss in the CoCa objective: L = L_siglip + 2 * L_caption (report, section 2.3).
CAPTION_LOSS_WEIGHT = 2.0

Batches = list[PackedBatch] | list[ImageTextBatch]


@dataclass
class StepResult:
    """What one step's forward and backward produced, as device scalars (read on the host once, by the trainer)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    tokens: torch.Tensor
    expert_load: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_host(self) -> dict[str, float]:
        """``loss``, every part, ``tokens`` and every extra as Python floats, read in one transfer."""
        named = {"loss": self.loss, **self.parts, "tokens": self.tokens, **self.extra}
        values = torch.stack([v.detach().double().reshape(()) for v in named.values()]).tolist()
        return dict(zip(named, values, strict=True))


class StepStrategy(Protocol):
    """An objective's forward and backward over this rank's micro-batches of one optimizer step.

    Attributes:
        rows_shared_by: How many ranks are handed the same rows, each doing its share of their model FLOPs (the
            ranks of a pipeline, or of a context-parallel group); 1 when every rank's rows are its own.
    """

    rows_shared_by: int

    def __call__(self, batches: Batches) -> StepResult: ...


def _sum_over_ranks(values: list[torch.Tensor | float], device: torch.device) -> torch.Tensor:
    """``fp64 [len(values)]``: each value summed over every rank, in one all-reduce on ``device`` (host numbers
    are sent there; device scalars are never waited for)."""
    total = torch.stack([v.detach().double().reshape(()) if isinstance(v, torch.Tensor)
                         else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(total)
    return total


def _host_order_sum(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """fp64 sum of fp32 device scalars, added one after another (the order a Python float sum would take)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for value in values:
        total = total + value.double()
    return total


class SourceLosses:
    """Token-weighted cross-entropy per data source over a step's micro-batches (``loss/<source>`` and
    ``loss_tokens/<source>`` in the metrics, or other keys): sums and counts per source, summed over every rank."""

    def __init__(self, names: tuple[str, ...], device: torch.device, loss_key: str = "loss",
                 count_key: str = "loss_tokens"):
        self.names, self.loss_key, self.count_key = names, loss_key, count_key
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, by_source: torch.Tensor, source_ids: torch.Tensor, loss_mask: torch.Tensor) -> None:
        """Add this rank's positions of one micro-batch (``source_ids`` and ``loss_mask`` of the positions whose loss
        sums per source are ``by_source``): the sums and the loss tokens per source (no host sync)."""
        self.sums += by_source.double()
        self.add_tokens(source_ids, loss_mask)

    def add_tokens(self, source_ids: torch.Tensor, loss_mask: torch.Tensor) -> None:
        """Count the loss tokens per source of these positions."""
        sources = source_ids.to(self.counts.device).reshape(-1).long()
        counted = loss_mask.to(self.counts.device).reshape(-1) & (sources >= 0)
        self.counts.index_add_(0, sources.clamp(min=0), counted.double())

    def reduced(self) -> dict[str, torch.Tensor]:
        """The per-source means and token counts over every rank (one all-reduce of its own: the step's loss is
        reduced exactly as without it)."""
        both = torch.cat([self.sums, self.counts])
        dist.all_reduce(both)
        sums, counts = both.split(len(self.names))
        means = sums / counts.clamp(min=1.0)
        return {**{f"{self.loss_key}/{n}": means[i] for i, n in enumerate(self.names)},
                **{f"{self.count_key}/{n}": counts[i] for i, n in enumerate(self.names)}}


def lm_step(model: nn.Module, batches: list[PackedBatch], aux_loss_coef: float, world: int,
            cp_group: dist.ProcessGroup | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
            between_micro_batches: Callable[[], None] | None = None, source_names: tuple[str, ...] = ()) -> StepResult:
    """Forward and backward of the next-token objective over ``batches`` (this rank's micro-batches).

    With a context-parallel group of ``cp`` ranks, every rank of it receives the same rows and computes the loss of
    its share of their tokens (parallel/context.py); counts are divided by ``cp`` so that no token counts twice.
    The loss is fused with the output projection, ``chunk_tokens`` tokens' logits at a time (train/loss.py).
    ``between_micro_batches`` runs after every micro-batch's backward but the last (the optimizer's sharded
    accumulation). ``source_names`` (what the batches' ``source_ids`` index) adds the loss per data source.
    """
    cp = dist.get_world_size(cp_group) if cp_group is not None else 1
    device = batches[0].input_ids.device
    counts = _sum_over_ranks([sum(b.num_loss_tokens for b in batches) / cp, sum(b.num_tokens for b in batches) / cp],
                             device)
    global_targets = counts[0].clamp(min=1.0).float()
    loss_sum, aux_sum, loads = [], [], []
    per_source = (SourceLosses(source_names, device)
                  if source_names and all(b.source_ids is not None for b in batches) else None)
    for index, batch in enumerate(batches):
        if index and between_micro_batches is not None:
            between_micro_batches()
        sources = batch.source_ids if per_source else None
        if cp > 1:  # this rank's share of the rows' positions
            hidden, labels, loss_mask, aux = forward_context_parallel(model, batch, cp_group)
            sources = context_parallel_share(sources, cp_group) if per_source else None
        else:
            hidden, aux = model.hidden_states(batch.input_ids, batch.position_ids, batch.cu_seqlens,
                                              batch.pixel_values, batch.image_grid_hw, batch.image_token_positions)
            labels, loss_mask = batch.labels, batch.loss_mask
        ce, by_source = linear_cross_entropy_by_group(
            hidden, model.decoder.output.weight, masked_targets(labels, loss_mask),
            sources, len(per_source.names) if per_source else 0, chunk_tokens)
        if per_source is not None:
            per_source.add(by_source, sources, loss_mask)
        loss = ce / global_targets
        if aux_loss_coef > 0:
            # The balance loss is a mean per micro-batch; average it over every micro-batch of every rank.
            loss = loss + aux_loss_coef * aux.aux_loss / (len(batches) * world)
            aux_sum.append(aux.aux_loss.detach())
        loss.backward()
        loss_sum.append(ce.detach())
        loads.append(aux.expert_load)
    total_ce, total_aux = _sum_over_ranks([_host_order_sum(loss_sum, device), _host_order_sum(aux_sum, device)],
                                          device)
    lm_loss = total_ce / counts[0].clamp(min=1.0)
    parts = {"lm_loss": lm_loss}
    if aux_loss_coef > 0:
        parts["aux_loss"] = total_aux / (len(batches) * world)
    extra = per_source.reduced() if per_source is not None else {}
    return StepResult(lm_loss, parts, counts[1], expert_load=torch.stack(loads).sum(0), extra=extra)


def coca_step(model: nn.Module, batches: list[ImageTextBatch],
              between_micro_batches: Callable[[], None] | None = None,
              source_names: tuple[str, ...] = ()) -> StepResult:
    """Forward and backward of ``L = L_siglip + 2 * L_caption`` over this rank's micro-batches.

    The SigLIP loss of each micro-step takes every rank's pairs as negatives (as one process with the whole batch
    would) and is averaged over micro-steps; the caption loss is a global token mean. ``source_names`` (what the
    batches' ``source_ids`` index) adds the objective per data source: ``caption_loss/<source>`` (token mean),
    ``siglip_loss/<source>`` (mean over the source's images of each image's terms against every text) and
    ``loss/<source>``, their sum weighted as the objective's.
    """
    device = batches[0].pixel_values.device
    counts = _sum_over_ranks([sum(b.num_loss_tokens for b in batches), sum(b.num_tokens for b in batches)], device)
    global_targets = counts[0].clamp(min=1.0).float()
    by_source = bool(source_names) and all(b.source_ids is not None for b in batches)
    captions = SourceLosses(source_names, device, "caption_loss", "loss_tokens") if by_source else None
    images = SourceLosses(source_names, device, "siglip_loss", "images") if by_source else None
    siglip_parts, caption_parts = [], []
    for index, batch in enumerate(batches):
        if index and between_micro_batches is not None:
            between_micro_batches()
        out = model.forward_coca(batch.pixel_values, batch.image_grid_hw, batch.text_ids, batch.text_mask)
        if by_source:
            groups = len(source_names)
            siglip, siglip_by_source = siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale,
                                                   out.logit_bias, image_groups=batch.source_ids, num_groups=groups)
            images.sums += siglip_by_source.double()  # per image: its terms against every text
            images.add_tokens(batch.source_ids, torch.ones_like(batch.source_ids, dtype=torch.bool))
            caption_sum, caption_sums, caption_counts = caption_loss_by_group(
                out.caption_logits, batch.text_ids, batch.text_mask, batch.source_ids, groups)
            captions.sums += caption_sums.double()
            captions.counts += caption_counts.double()
        else:
            siglip = siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
            caption_sum, _ = caption_loss_sum(out.caption_logits, batch.text_ids, batch.text_mask)
        loss = siglip / len(batches) + CAPTION_LOSS_WEIGHT * caption_sum / global_targets
        loss.backward()
        siglip_parts.append(siglip.detach())
        caption_parts.append(caption_sum.detach())
    siglip_total, caption_total = _sum_over_ranks([_host_order_sum(siglip_parts, device),
                                                   _host_order_sum(caption_parts, device)], device)
    siglip_mean = siglip_total / len(batches)
    caption_mean = caption_total / counts[0].clamp(min=1.0)
    loss = siglip_mean + CAPTION_LOSS_WEIGHT * caption_mean
    extra = {"logit_scale": model.coca.logit_scale.detach().exp()}
    if by_source:
        caption_means, image_means = captions.reduced(), images.reduced()
        extra.update({**caption_means, **image_means})
        extra.update({f"loss/{n}": image_means[f"siglip_loss/{n}"] + CAPTION_LOSS_WEIGHT
                      * caption_means[f"caption_loss/{n}"] for n in source_names})
    return StepResult(loss, {"siglip_loss": siglip_mean, "caption_loss": caption_mean}, counts[1], extra=extra)


@dataclass(frozen=True)
class LMStep:
    """The next-token objective on a whole model (:func:`lm_step`), context-parallel over ``cp_group`` if given."""

    model: nn.Module
    aux_loss_coef: float
    world: int
    cp_group: dist.ProcessGroup | None = None
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    between_micro_batches: Callable[[], None] | None = None
    source_names: tuple[str, ...] = ()  # the stage's sorted sources: per-source loss

    @property
    def rows_shared_by(self) -> int:
        return dist.get_world_size(self.cp_group) if self.cp_group is not None else 1

    def __call__(self, batches: list[PackedBatch]) -> StepResult:
        return lm_step(self.model, batches, self.aux_loss_coef, self.world, self.cp_group, self.chunk_tokens,
                       self.between_micro_batches, self.source_names)


@dataclass(frozen=True)
class PipelineLMStep:
    """The next-token objective on this rank's pipeline stages (parallel/pipeline.py's schedule runs forward and
    backward; the last stage takes the loss the trainer handed to :func:`~parallel.parallelize.parallelize`)."""

    runner: PipelineRunner
    aux_loss_coef: float
    pp_degree: int
    cp_degree: int = 1
    source_names: tuple[str, ...] = ()  # the stage's sorted sources: per-source loss (summed on the last stage)

    @property
    def rows_shared_by(self) -> int:
        return self.pp_degree * self.cp_degree

    def __call__(self, batches: list[PackedBatch]) -> StepResult:
        runner = self.runner
        per_source = (SourceLosses(self.source_names, runner.device)
                      if self.source_names and all(b.source_ids is not None for b in batches) else None)
        lm_loss, aux_loss, tokens, load = pipeline_lm_step(runner, batches, self.aux_loss_coef, self.pp_degree,
                                                           self.cp_degree, len(self.source_names) if per_source else 0)
        as_tensor = lambda value: torch.tensor(value, dtype=torch.float64, device=runner.device)  # noqa: E731
        parts = {"lm_loss": as_tensor(lm_loss)}
        if self.aux_loss_coef:
            parts["aux_loss"] = as_tensor(aux_loss)
        extra = {}
        if per_source is not None:  # last stages hold the sums of their positions; the others add zeros
            if runner.has_last:
                per_source.sums += runner.group_sums
                for batch in batches:
                    per_source.add_tokens(runner.last_stage_share(batch.source_ids),
                                          runner.last_stage_share(batch.loss_mask))
            extra = per_source.reduced()
        return StepResult(parts["lm_loss"], parts, as_tensor(tokens), expert_load=load, extra=extra)


@dataclass(frozen=True)
class CocaStep:
    """The CoCa objective (:func:`coca_step`); every rank's image-text pairs are its own (no token split)."""

    model: nn.Module
    rows_shared_by: int = 1
    between_micro_batches: Callable[[], None] | None = None
    source_names: tuple[str, ...] = ()  # the stage's sorted sources: per-source losses

    def __call__(self, batches: list[ImageTextBatch]) -> StepResult:
        return coca_step(self.model, batches, self.between_micro_batches, self.source_names)


def select_step(stage: StageConfig, model: nn.Module, pipeline: PipelineRunner | None, aux_loss_coef: float,
                cp_group: dist.ProcessGroup | None, pp_degree: int, cp_degree: int,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                between_micro_batches: Callable[[], None] | None = None) -> StepStrategy:
    """The strategy of ``stage``'s objective on this rank's layout.

    Args:
        stage: The curriculum stage (its ``objective``: ``lm`` or ``coca``).
        model: This rank's model.
        pipeline: This rank's pipeline stages when ``pp > 1``, else None.
        aux_loss_coef: Weight of the MoE balance loss.
        cp_group: The stage's context-parallel group (None: no context parallelism).
        pp_degree: Pipeline ranks per replica.
        cp_degree: The stage's context-parallel degree.
        chunk_tokens: Tokens whose logits exist at once in the fused next-token loss.
        between_micro_batches: Run between micro-batches (not by a pipeline, whose schedule runs them all).
    """
    if stage.objective == "coca":
        return CocaStep(model, between_micro_batches=between_micro_batches,
                        source_names=tuple(mixture_sources(stage.mixture)))
    if pipeline is None:
        return LMStep(model, aux_loss_coef, dist.get_world_size(), cp_group, chunk_tokens, between_micro_batches,
                      tuple(mixture_sources(stage.mixture)))
    return PipelineLMStep(pipeline, aux_loss_coef, pp_degree, cp_degree, tuple(mixture_sources(stage.mixture)))
