"""Building the pieces of a run and training the curriculum stage by stage.

Loss normalization: every rank scales its loss sums by the *global* number of loss tokens of the step (all ranks,
all micro-batches), and gradients are summed over the data-parallel group, so one step equals one process running
the whole global batch (token-mean loss, not a mean of per-rank means).
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from config import ConfigError, OptimConfig, PrecisionConfig, RunConfig, StageConfig
from config.validate import check_layout
from data.batch import ImageTextBatch, PackedBatch
from data.loader import StageLoader, read_manifest
from data.tokenizer import TextTokenizer, load_root_tokenizer
from model.coca import caption_loss_sum, siglip_loss
from model.vlm import KimiVL
from optim.distributed import ZeroOptimizer
from optim.muon import AdamWHParams, MuonHParams
from optim.schedules import lr_at
from parallel.context import forward_context_parallel
from parallel.dims import ParallelDims, ParallelGroups
from parallel.parallelize import PipelineOptions, parallelize
from parallel.pipeline import pipeline_lm_step
from storage import LocalStorage, build_storage
from train.checkpoint import CheckpointManager, ModelState, RNGState
from train.device_feed import DeviceFeed
from train.loss import DEFAULT_CHUNK_TOKENS, linear_cross_entropy_sum, masked_targets
from train.metrics import MetricsWriter, format_summary, read_metrics, summarize_stage, write_atomic
from train.preflight import check_run, is_demo_root
from train.reporting import WandbLogger, measure_peak_flops, plot_losses, step_model_flops
from train.runtime import init_distributed, resolve_device
from train.signals import STOP
from train.stages import (
    apply_stage,
    check_init_sources,
    checkpoints_of,
    init_stage_weights,
    is_done,
    mark_done,
    previous_final_lrs,
    stage_dir,
)

logger = logging.getLogger(__name__)
# Weight of the caption loss in the CoCa objective: L = L_siglip + 2 * L_caption (report, section 2.3).
CAPTION_LOSS_WEIGHT = 2.0


@dataclass
class TrainState(Stateful):
    """Progress of the current stage: optimizer steps taken and tokens consumed (all ranks)."""

    step: int = 0
    tokens: int = 0
    # Steps whose update was skipped for a non-finite loss or gradient, in all and in a row.
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("step", "tokens", "skipped_steps", "nonfinite_in_a_row"):
            setattr(self, key, int(state_dict[key]))


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


class RunLocked(RuntimeError):
    """Another process is training the same run directory."""


def lock_run_dir(run_dir: Path) -> IO:
    """Hold an exclusive lock on the run directory, so two trainers (e.g. a restart while orphaned workers of a
    killed launcher still run) never write the same checkpoints and metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunLocked(f"another process is training {run_dir}: stop it (or pick another run_name)") from None
    return handle


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


def lm_step(model: nn.Module, batches: list[PackedBatch], aux_loss_coef: float, world: int,
            cp_group: dist.ProcessGroup | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> StepResult:
    """Forward and backward of the next-token objective over ``batches`` (this rank's micro-batches).

    With a context-parallel group of ``cp`` ranks, every rank of it receives the same rows and computes the loss of
    its share of their tokens (parallel/context.py); counts are divided by ``cp`` so that no token counts twice.
    The loss is fused with the output projection, ``chunk_tokens`` tokens' logits at a time (train/loss.py).
    """
    cp = dist.get_world_size(cp_group) if cp_group is not None else 1
    device = batches[0].input_ids.device
    counts = _sum_over_ranks([sum(b.num_loss_tokens for b in batches) / cp, sum(b.num_tokens for b in batches) / cp],
                             device)
    global_targets = counts[0].clamp(min=1.0).float()
    loss_sum, aux_sum, loads = [], [], []
    for batch in batches:
        if cp > 1:
            hidden, labels, loss_mask, aux = forward_context_parallel(model, batch, cp_group)
        else:
            hidden, aux = model.hidden_states(batch.input_ids, batch.position_ids, batch.cu_seqlens,
                                              batch.pixel_values, batch.image_grid_hw, batch.image_token_positions)
            labels, loss_mask = batch.labels, batch.loss_mask
        ce = linear_cross_entropy_sum(hidden, model.decoder.output.weight, masked_targets(labels, loss_mask),
                                      chunk_tokens)
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
    return StepResult(lm_loss, parts, counts[1], expert_load=torch.stack(loads).sum(0))


def global_siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                       logit_bias: torch.Tensor) -> torch.Tensor:
    """This rank's share of the SigLIP loss of the whole micro-step batch (all ranks' pairs).

    Each rank scores its images against every rank's texts (gathered with autograd, so the gradient of the texts
    returns to their rank), and divides by the global pair count: summed over ranks this is exactly the loss one
    process computes on the whole batch, negatives from every rank included.
    """
    world = dist.get_world_size()
    if world == 1:
        return siglip_loss(image_embeds, text_embeds, logit_scale, logit_bias)
    texts = torch.cat(dist_nn.all_gather(text_embeds), dim=0)
    local, total = image_embeds.shape[0], texts.shape[0]
    logits = logit_scale.exp() * image_embeds @ texts.t() + logit_bias
    labels = -torch.ones_like(logits)
    rows = torch.arange(local, device=logits.device)
    labels[rows, dist.get_rank() * local + rows] = 1.0
    return -F.logsigmoid(labels * logits).sum() / total


def coca_step(model: nn.Module, batches: list[ImageTextBatch]) -> StepResult:
    """Forward and backward of ``L = L_siglip + 2 * L_caption`` over this rank's micro-batches.

    The SigLIP loss of each micro-step takes every rank's pairs as negatives (as one process with the whole batch
    would) and is averaged over micro-steps; the caption loss is a global token mean.
    """
    device = batches[0].pixel_values.device
    counts = _sum_over_ranks([sum(b.num_loss_tokens for b in batches), sum(b.num_tokens for b in batches)], device)
    global_targets = counts[0].clamp(min=1.0).float()
    siglip_parts, caption_parts = [], []
    for batch in batches:
        out = model.forward_coca(batch.pixel_values, batch.image_grid_hw, batch.text_ids, batch.text_mask)
        siglip = global_siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
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
    return StepResult(loss, {"siglip_loss": siglip_mean, "caption_loss": caption_mean}, counts[1], extra=extra)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row: the run stops, its last good checkpoint intact."""


class Trainer:
    """Runs the curriculum of a :class:`RunConfig`, resuming from whatever the run directory already holds.

    SIGTERM or SIGUSR1 (preemption, SLURM's warning signal) makes every rank checkpoint at the next step boundary and
    leave cleanly; rerunning the same command continues.
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.exit_reason = ""
        self.device = resolve_device(cfg.runtime.device)  # before anything starts: a bad choice fails here
        self._lock = lock_run_dir(cfg.run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
        # Installed early by `python -m train` (train/signals.py); here for programmatic use.
        self._installed_signals = STOP.install()
        init_distributed(self.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        seq_lens = [cfg.curriculum.stages[n].seq_len for n in cfg.curriculum.order]
        check_layout(cfg, self.world)
        self.dims = ParallelDims.from_config(cfg.parallel, self.world, cfg.model, seq_lens)
        self.groups = self.dims.build_groups(self.device.type)
        # Background checkpoint writes talk over a group of their own, never interleaving with training collectives.
        self.checkpoint_group = dist.new_group(backend="gloo") if cfg.checkpoint.async_save else None
        self.checkpoints: CheckpointManager | None = None
        self.stage_dims, self.stage_cp_group = self.dims, None
        self._cp_groups = {self.dims.cp_degree: self.groups.cp}
        self.tokenizer = self._build_tokenizer()
        check_init_sources(cfg)  # hf: and checkpoint sources of every stage: names and shapes, before any step
        torch.manual_seed(cfg.seed)
        with torch.device("meta"):  # nothing is allocated before this rank's share is known
            model = KimiVL(cfg.model)
        pipeline = PipelineOptions(cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages, max(seq_lens),
                                   functools.partial(linear_cross_entropy_sum, chunk_tokens=cfg.loss_chunk_tokens))
        self.parallel = parallelize(model, self.dims, self.groups, self.device, cfg.seed, pipeline,
                                    param_dtype=getattr(torch, cfg.precision.param_dtype), compile=cfg.compile)
        self.model, self.pipeline = self.parallel.model, self.parallel.pipeline
        self.steps_this_run = 0
        self.peak_flops = (cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops > 0
                           else measure_peak_flops(4096 if self.device.type == "cuda" else 1024, device=self.device))
        self.wandb = WandbLogger(cfg.log.wandb and self.rank == 0, cfg.log.wandb_project, cfg.run_dir,
                                 OmegaConf.to_container(OmegaConf.structured(cfg)))
        # Steps of the stages before each one: W&B's global step axis across the curriculum.
        steps = [cfg.curriculum.stages[n].steps for n in cfg.curriculum.order]
        self.step_offset = {n: sum(steps[:i]) for i, n in enumerate(cfg.curriculum.order)}
        self.previous_final_lr = previous_final_lrs(cfg)

    def _build_tokenizer(self) -> TextTokenizer:
        data = self.cfg.data
        root = data.root
        # S3 with the request-rate limit and the bounded disk cache in front, as the recipe says (storage/).
        self.storage = build_storage(data)
        local = isinstance(self.storage, LocalStorage)
        # Only ever at the default demo path: a mistyped root must fail (train/preflight.py), not fill with demo data.
        if (self.rank == 0 and data.generate_if_missing and local and is_demo_root(root)
                and not self.storage.exists("manifest.json")):
            from data.synthetic import generate_corpus

            logger.info("generating the demo corpus into %s", root)
            generate_corpus(self.storage.root, seed=self.cfg.seed)
        dist.barrier()
        tokenizer = load_root_tokenizer(self.storage, read_manifest(self.storage))
        vocab = self.cfg.model.decoder.vocab_size
        if tokenizer.vocab_size > vocab:
            raise ConfigError(f"Invalid value model.decoder.vocab_size={vocab}: the tokenizer of {root} has "
                              f"{tokenizer.vocab_size} tokens; allowed is >= {tokenizer.vocab_size}.")
        return tokenizer

    def run(self) -> dict[str, dict[str, Any]]:
        """Train every stage in order (skipping finished ones) and write ``summary.json``."""
        if self.rank == 0:
            self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
            # The resolved configuration of every invocation, for reproducing the run (no credentials live in it).
            write_atomic(self.cfg.run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(self.cfg)))
        finished = True
        for name in self.cfg.curriculum.order:
            if is_done(self.cfg, name):
                logger.info("stage %s already finished: skipped", name)
                continue
            finished = not self._leaving() and self.run_stage(name)
            if not finished:
                logger.info("left after %d steps (%s), checkpointed; rerun the same command to continue",
                            self.steps_this_run, self.exit_reason)
                break
        summary = {n: summarize_stage(stage_dir(self.cfg, n) / "metrics.jsonl") for n in self.cfg.curriculum.order}
        if self.rank == 0 and finished:
            write_atomic(self.cfg.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            print(format_summary(summary))
            print(f"outputs: {self.cfg.run_dir.resolve()}")
        return summary

    def close(self) -> None:
        """Finish W&B, restore the signal handlers and release the run directory."""
        self.wandb.finish()
        if self._installed_signals:
            STOP.restore()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _leaving(self) -> bool:
        """Whether to stop at this step boundary; all ranks agree (a signal may reach only some of them)."""
        if self.cfg.exit_after_steps and self.steps_this_run >= self.cfg.exit_after_steps:
            self.exit_reason = f"exit_after_steps={self.cfg.exit_after_steps}"
            return True
        flag = torch.tensor([1.0 if STOP.received else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.exit_reason = f"received {STOP.received or 'a stop signal on another rank'}"
            return True
        return False

    def _data_shard(self, stage: StageConfig) -> tuple[int, int]:
        """``(rank, size)`` of this rank's share of the global batch. Context-parallel ranks split the tokens of
        the same rows; the CoCa objective has no token sequence to split (whole images), so there they serve
        batch slots of their own, like data-parallel ranks."""
        dims = self.stage_dims
        coords = dims.coordinates(self.rank)
        if stage.objective == "coca":
            return coords["dp"] * dims.cp_degree + coords["cp"], dims.dp_degree * dims.cp_degree
        return coords["dp"], dims.dp_degree

    def _enter_stage_layout(self, stage: StageConfig) -> None:
        """The stage's own context-parallel degree (same ranks, regrouped), its attention cores and checkpointing."""
        self.stage_dims = self.dims.for_stage(stage.cp_degree, stage.seq_len)
        cp = self.stage_dims.cp_degree
        if cp not in self._cp_groups:  # every rank runs the same stages in the same order: groups line up
            self._cp_groups[cp] = self.stage_dims.build_cp_group()
        self.stage_cp_group = self._cp_groups[cp] if cp > 1 else None
        self.parallel.apply_stage(self.stage_cp_group,
                                  stage.activation_checkpoint or self.cfg.parallel.activation_checkpoint,
                                  stage.seq_len, self.cfg.parallel.cp_attention)

    def _state(self, optimizer: ZeroOptimizer, train: TrainState, feed: DeviceFeed) -> dict[str, Any]:
        return {
            "model": ModelState(self.model, self.groups.expert_mesh),
            "optim": optimizer,
            "train": train,
            # The loader's state as of the batches trained on; one state per global-batch slot: a checkpoint
            # resumes at another data-parallel size.
            "loader": feed,
            # Ranks start from the same seed and draw no rank-specific randomness, so one generator state serves all.
            "rng": RNGState(self.device),
        }

    def run_stage(self, name: str) -> bool:
        """Train one stage to its end (True), or until ``exit_after_steps`` (False, checkpointed)."""
        cfg, stage = self.cfg, self.cfg.curriculum.stages[name]
        apply_stage(self.model, stage)
        self._enter_stage_layout(stage)
        optimizer = build_optimizer(self.model, cfg.optim, stage.lr.peak_lr, self.groups, cfg.precision)
        loader = StageLoader(name, stage, self.storage, self.tokenizer, cfg.model.vision, cfg.seed,
                             *self._data_shard(stage), cfg.data.max_corrupt_fraction, data=cfg.data)
        feed = DeviceFeed(loader, stage.objective, stage.grad_accum_steps, self.device)
        train = TrainState()
        checkpoints = self.checkpoints = checkpoints_of(cfg, name, self.checkpoint_group)
        latest = checkpoints.latest_step()
        if latest is not None:
            checkpoints.load(latest, self._state(optimizer, train, feed))
            logger.info("stage %s: resumed from step %d", name, train.step)
        else:
            source = init_stage_weights(self.model, cfg, name, self.groups.expert_mesh)
            logger.info("stage %s: weights from %s", name, source)
        metrics = MetricsWriter(stage_dir(cfg, name) / "metrics.jsonl", train.step, self.rank == 0,
                                cfg.log.progress_bar, stage.steps, name)
        try:
            while train.step < stage.steps:
                record = self.train_step(name, stage, optimizer, feed, train)
                metrics.log(record)
                self.wandb.log(record, self.step_offset[name] + record["step"])
                self.steps_this_run += 1
                leaving = self._leaving()
                interval = stage.checkpoint_interval
                last = train.step == stage.steps
                if last or leaving or (interval and train.step % interval == 0):
                    # The stage's final checkpoint (the next stage starts from it) and the one taken when leaving
                    # are committed before going on; the others may finish in the background.
                    checkpoints.save(train.step, self._state(optimizer, train, feed),
                                     self._checkpoint_info(name, stage, train), blocking=last or leaving)
                if leaving and train.step < stage.steps:
                    return False
        except BaseException:
            checkpoints.abandon()
            raise
        finally:
            metrics.close()
            loader.close()  # its read-ahead threads and worker processes: the next stage has its own
        self._report_stage(name)
        mark_done(cfg, name, train.step)
        return True

    def _checkpoint_info(self, name: str, stage: StageConfig, train: TrainState) -> dict[str, Any]:
        """What a checkpoint holds, readable without the run directory (``checkpoint.json``): evaluation takes the
        RoPE base, sequence length and model from here."""
        dims = self.stage_dims
        return {"stage": name, "step": train.step, "tokens": train.tokens, "objective": stage.objective,
                "seq_len": stage.seq_len, "rope_theta": stage.rope_theta, "trainable": list(stage.trainable),
                "layout": {"world_size": self.world, "dp": dims.dp_degree, "cp": dims.cp_degree,
                           "ep": dims.ep_degree, "pp": dims.pp_degree},
                "config": OmegaConf.to_container(OmegaConf.structured(self.cfg))}

    def _report_stage(self, name: str) -> None:
        """The stage's throughput line and loss-curve PNG (rank 0)."""
        records = read_metrics(stage_dir(self.cfg, name) / "metrics.jsonl")
        if self.rank != 0 or not records:
            return
        plot_losses(records, stage_dir(self.cfg, name) / "loss.png", f"{self.cfg.run_dir.name}: {name}")
        seconds = sum(r["step_time_s"] for r in records)
        tokens_per_s = sum(r["tokens_per_s"] * r["step_time_s"] for r in records) / seconds
        mfu = sum(r["mfu"] for r in records) / len(records)
        logger.info("stage %s: %.0f tokens/s over %d ranks, model FLOPs utilization %.1f%% (of %.1f TFLOP/s per "
                    "rank)", name, tokens_per_s, self.world, 100 * mfu, self.peak_flops / 1e12)

    def forward_backward(self, stage: StageConfig, batches: list[PackedBatch] | list[ImageTextBatch]) -> StepResult:
        """The stage objective's forward and backward over this rank's micro-batches (gradients accumulate)."""
        if stage.objective == "coca":
            return coca_step(self.model, batches)
        if self.pipeline is None:
            return lm_step(self.model, batches, self.cfg.model.decoder.aux_loss_coef, self.world,
                           self.stage_cp_group, self.cfg.loss_chunk_tokens)
        lm_loss, aux_loss, tokens, load = pipeline_lm_step(
            self.pipeline, batches, self.cfg.model.decoder.aux_loss_coef, self.dims.pp_degree,
            self.stage_dims.cp_degree)
        as_tensor = lambda value: torch.tensor(value, dtype=torch.float64, device=self.device)  # noqa: E731
        parts = {"lm_loss": as_tensor(lm_loss)}
        if self.cfg.model.decoder.aux_loss_coef:
            parts["aux_loss"] = as_tensor(aux_loss)
        return StepResult(parts["lm_loss"], parts, as_tensor(tokens), expert_load=load)

    def train_step(self, name: str, stage: StageConfig, optimizer: ZeroOptimizer, feed: DeviceFeed,
                   train: TrainState) -> dict[str, Any]:
        """One optimizer step: micro-batches, backward, then the optimizer's gradient reduction, clipping and
        update, and bookkeeping."""
        start = time.perf_counter()
        lr = lr_at(stage.lr, train.step, stage.steps, self.previous_final_lr[name])
        optimizer.lr = lr
        optimizer.zero_grad()
        batches = feed.next_step(train.step / stage.steps)
        result = self.forward_backward(stage, batches)
        if train.step + 1 < stage.steps:  # the device is busy with this step: draw and copy the next one meanwhile
            feed.prefetch((train.step + 1) / stage.steps)
        host = result.to_host()
        grad_norm = self._update(name, stage, optimizer, result, host["loss"], train)
        train.step += 1
        tokens = int(host.pop("tokens"))
        train.tokens += tokens
        elapsed = time.perf_counter() - start
        # Model FLOPs this rank did: the ranks of a pipeline (each its share of the layers) or of a context-parallel
        # group (each its share of the tokens) are all handed the same rows. CoCa rows are whole per rank (no
        # token split; pipelines refuse CoCa stages).
        shared_by = 1 if stage.objective == "coca" else self.dims.pp_degree * self.stage_dims.cp_degree
        flops = step_model_flops(self.cfg.model, batches) / shared_by
        return {"stage": name, "step": train.step, **host, "lr": lr,
                "tokens": train.tokens, "grad_norm": float(grad_norm), "step_time_s": elapsed,
                "tokens_per_s": tokens / elapsed, "corrupt_samples": feed.loader.corrupt,
                "skipped_steps": train.skipped_steps, "model_tflops_per_s": flops / elapsed / 1e12,
                "mfu": flops / elapsed / self.peak_flops}

    def _update(self, name: str, stage: StageConfig, optimizer: ZeroOptimizer, result: StepResult, loss: float,
                train: TrainState) -> float:
        """The optimizer step, unless the loss or a gradient is not finite: then the update is skipped and counted,
        and after ``max_nonfinite_steps`` in a row the run stops (:class:`TrainingDiverged`)."""
        reason = "" if math.isfinite(loss) else f"loss {loss}"
        grad_norm = float("nan")
        if not reason:
            try:
                grad_norm = optimizer.step(max_grad_norm=self.cfg.optim.grad_clip_norm)
            except FloatingPointError as error:  # raised before any parameter changed
                reason = str(error)
        if not reason:
            train.nonfinite_in_a_row = 0
            if result.expert_load is not None and "decoder" in stage.trainable:
                load = result.expert_load.clone()
                dist.all_reduce(load, group=self.groups.dense)  # the replicas of this rank's layers
                self.model.decoder.update_expert_bias(load)
            return grad_norm
        train.skipped_steps += 1
        train.nonfinite_in_a_row += 1
        logger.warning("stage %s step %d: update skipped (%s); %d in a row", name, train.step + 1, reason,
                       train.nonfinite_in_a_row)
        if train.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            checkpoints = self.checkpoints or checkpoints_of(self.cfg, name)
            checkpoints.wait()  # a save in flight holds a good step: finish it first
            last = checkpoints.latest_step()
            where = checkpoints.location(last) if last is not None else "the stage's start weights"
            raise TrainingDiverged(f"{train.nonfinite_in_a_row} non-finite steps in a row in stage '{name}' (last: "
                                   f"{reason}); stopping. The last good checkpoint is {where}.")
        return grad_norm


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, groups: ParallelGroups | None = None,
                    precision: PrecisionConfig | None = None) -> ZeroOptimizer:
    """The stage's optimizer over the trainable parameters only (frozen ones are never touched, not even by weight
    decay), ZeRO-1 sharded: dense state over the data x context ranks, expert state over the expert-data ranks,
    the gradient norm over the whole world; gradients reduced and state stored in ``precision``'s dtypes."""
    precision = precision or PrecisionConfig()
    muon = MuonHParams(momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps,
                       ns_dtype=getattr(torch, cfg.muon_ns_dtype))
    adamw = AdamWHParams(beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps)
    return ZeroOptimizer(model, lr=lr, weight_decay=cfg.weight_decay, use_muon=cfg.name == "muon", muon=muon,
                         adamw=adamw, group=groups.dense if groups else dist.group.WORLD,
                         expert_group=groups.expert_data if groups else None, norm_group=dist.group.WORLD,
                         bucket_elements=max(1, int(cfg.reduce_bucket_mb * 2**20) // 4),
                         reduce_dtype=getattr(torch, precision.reduce_dtype),
                         state_dtype=getattr(torch, precision.optimizer_state_dtype))


def run_curriculum(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Entry used by ``python -m train``: check the data of every stage, train, then leave the process group."""
    check_run(cfg)
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
        dist.destroy_process_group()
