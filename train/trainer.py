"""Training the curriculum stage by stage: the loop, resumption, skipping non-finite steps, and the metrics.

The pieces a run is made of come from train/builders.py (runtime, data, model, optimizer, checkpoint state); each
stage's forward and backward is one strategy of train/steps.py, chosen when the stage starts. Loss normalization is
described there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.stateful import Stateful

from config import RunConfig, StageConfig
from data.batch import ImageTextBatch, PackedBatch
from optim.distributed import ZeroOptimizer
from optim.schedules import lr_at
from train.builders import (
    StageLayout,
    build_data,
    build_feed,
    build_model,
    build_optimizer,
    build_runtime,
    checkpoint_info,
    checkpoint_state,
    data_shard,
    enter_stage_layout,
)
from train.checkpoint import CheckpointManager
from train.device_feed import DeviceFeed
from train.metrics import (
    MetricsWriter,
    drop_unseen_sources,
    format_summary,
    read_metrics,
    summarize_stage,
    write_atomic,
)
from train.preflight import check_run
from train.recovery import RecoveryState, SkippedSamples, append_recovery_line, read_recovery, steps_named
from train.reporting import WandbLogger, measure_peak_flops, plot_losses, step_model_flops
from train.runtime import resolve_device
from train.signals import STOP
from train.stages import (
    apply_stage,
    checkpoints_of,
    init_stage_weights,
    is_done,
    mark_done,
    previous_final_lrs,
    stage_dir,
)
from train.steps import StepResult, StepStrategy, select_step

__all__ = ["RunLocked", "StageRun", "TrainState", "Trainer", "TrainingDiverged", "lock_run_dir", "run_curriculum"]

logger = logging.getLogger(__name__)


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
class StageRun:
    """A stage ready to train: its optimizer, step strategy, feed, progress, checkpoint state and checkpoints."""

    name: str
    stage: StageConfig
    optimizer: ZeroOptimizer
    step: StepStrategy
    feed: DeviceFeed
    train: TrainState
    state: dict[str, Stateful]
    checkpoints: CheckpointManager


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


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row: the run stops, its last good checkpoint intact."""


class Trainer:
    """Runs the curriculum of a :class:`RunConfig`, resuming from whatever the run directory already holds.

    SIGTERM or SIGUSR1 (preemption, SLURM's warning signal) makes every rank checkpoint at the next step boundary and
    leave cleanly; rerunning the same command continues.
    """

    def __init__(self, cfg: RunConfig, lock: bool = True):
        self.cfg = cfg
        self.exit_reason = ""
        device = resolve_device(cfg.runtime.device)  # before anything starts: a bad choice fails here
        # Tools that only read the run (train.replay) do not lock it.
        self._lock = lock_run_dir(cfg.run_dir) if lock and int(os.environ.get("RANK", "0")) == 0 else None
        # Installed early by `python -m train` (train/signals.py); here for programmatic use.
        self._installed_signals = STOP.install()
        self.runtime = build_runtime(cfg, device)
        self.data = build_data(cfg)
        self.parallel = build_model(cfg, self.runtime)
        self.layout = StageLayout(self.runtime.dims, None)
        self.checkpoints: CheckpointManager | None = None
        self.steps_this_run = 0
        self.peak_flops = (cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops > 0
                           else measure_peak_flops(4096 if device.type == "cuda" else 1024, device=device))
        self.wandb = WandbLogger(cfg.log.wandb and self.rank == 0, cfg.log.wandb_project, cfg.run_dir,
                                 OmegaConf.to_container(OmegaConf.structured(cfg)))
        # Steps of the stages before each one: W&B's global step axis across the curriculum.
        steps = [cfg.curriculum.stages[n].steps for n in cfg.curriculum.order]
        self.step_offset = {n: sum(steps[:i]) for i, n in enumerate(cfg.curriculum.order)}
        self.previous_final_lr = previous_final_lrs(cfg)

    # What the builders made, by the names callers use.
    device = property(lambda self: self.runtime.device)
    rank = property(lambda self: self.runtime.rank)
    world = property(lambda self: self.runtime.world)
    groups = property(lambda self: self.runtime.groups)
    storage = property(lambda self: self.data.storage)
    tokenizer = property(lambda self: self.data.tokenizer)
    model = property(lambda self: self.parallel.model)

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
        """``(rank, size)`` of this rank's share of the global batch in the current stage layout."""
        return data_shard(stage, self.layout.dims, self.rank)

    def _enter_stage_layout(self, stage: StageConfig) -> None:
        """The stage's own context-parallel degree (same ranks, regrouped), its attention cores and checkpointing."""
        self.layout = enter_stage_layout(self.runtime, self.parallel, stage, self.cfg)

    def _select_step(self, stage: StageConfig, optimizer: ZeroOptimizer | None = None) -> StepStrategy:
        """The forward and backward of ``stage``'s objective on the current stage layout (with ``optimizer``'s
        sharded accumulation between micro-batches when it does that)."""
        between = optimizer.accumulate if optimizer is not None and optimizer.accumulate_sharded else None
        return select_step(stage, self.model, self.parallel.pipeline, self.cfg.model.decoder.aux_loss_coef,
                           self.layout.cp_group, self.runtime.dims.pp_degree, self.layout.dims.cp_degree,
                           self.cfg.loss_chunk_tokens, between)

    def open_stage(self, name: str, resume_from: int | None = None,
                   recovery: RecoveryState | None = None) -> StageRun:
        """Everything a stage trains with, restored from checkpoint step ``resume_from`` (None: the latest one, if
        any; 0: none, the stage's start weights), with ``recovery``'s decisions in the checkpoint state."""
        cfg, stage = self.cfg, self.cfg.curriculum.stages[name]
        apply_stage(self.model, stage)
        self._enter_stage_layout(stage)
        optimizer = build_optimizer(self.model, cfg.optim, stage.lr.peak_lr, self.groups, cfg.precision,
                                    pipelined=self.parallel.pipeline is not None)
        step = self._select_step(stage, optimizer)
        feed = build_feed(name, stage, cfg, self.data, self.runtime, self.layout)
        train = TrainState()
        state = checkpoint_state(self.model, self.runtime, optimizer, train, feed)
        if recovery is not None:
            state["recovery"] = recovery
        checkpoints = self.checkpoints = checkpoints_of(cfg, name, self.runtime.checkpoint_group)
        start = checkpoints.latest_step() if resume_from is None else resume_from
        if start:
            checkpoints.load(start, state)
            logger.info("stage %s: resumed from step %d", name, train.step)
        else:
            source = init_stage_weights(self.model, cfg, name, self.groups.expert_mesh)
            optimizer.take_parameters_as_masters()
            logger.info("stage %s: weights from %s", name, source)
        return StageRun(name, stage, optimizer, step, feed, train, state, checkpoints)

    def run_stage(self, name: str) -> bool:
        """Train one stage to its end (True), or until ``exit_after_steps`` (False, checkpointed)."""
        cfg = self.cfg
        recovery = RecoveryState(cfg.recovery) if cfg.recovery.enabled else None
        run = self.open_stage(name, recovery=recovery)
        metrics = MetricsWriter(stage_dir(cfg, name) / "metrics.jsonl", run.train.step, self.rank == 0,
                                cfg.log.progress_bar, run.stage.steps, name)
        try:
            while run.train.step < run.stage.steps:
                if recovery is not None and run.train.step + 1 in recovery.skip:
                    self._skip_step(run, recovery)
                else:
                    record = self.train_step(name, run.stage, run.optimizer, run.feed, run.train, run.step)
                    trigger = "" if recovery is None else recovery.spike(record["loss"], record["grad_norm"],
                                                                         self.device)
                    if trigger:
                        run = self._roll_back(run, recovery, record, trigger)
                        metrics.rewind(run.train.step)
                        continue
                    metrics.log(record)
                    self.wandb.log(record, self.step_offset[name] + record["step"])
                    self.steps_this_run += 1
                if not self._after_step(run):
                    return False
        except BaseException:
            run.checkpoints.abandon()
            raise
        finally:
            metrics.close()
            run.feed.loader.close()  # its read-ahead threads and worker processes: the next stage has its own
        self._report_stage(name)
        mark_done(cfg, name, run.train.step)
        return True

    def _after_step(self, run: StageRun) -> bool:
        """Checkpoint when due; False when leaving before the stage's end (checkpointed)."""
        leaving = self._leaving()
        stage, train = run.stage, run.train
        interval = stage.checkpoint_interval
        last = train.step == stage.steps
        if last or leaving or (interval and train.step % interval == 0):
            # The stage's final checkpoint (the next stage starts from it) and the one taken when leaving are
            # committed before going on; the others may finish in the background.
            info = checkpoint_info(self.cfg, run.name, stage, train.step, train.tokens, self.layout, self.world)
            run.checkpoints.save(train.step, run.state, info, blocking=last or leaving)
        return not (leaving and train.step < stage.steps)

    def _roll_back(self, run: StageRun, recovery: RecoveryState, record: dict[str, Any], trigger: str) -> StageRun:
        """The stage reopened from its last checkpoint before the spike at ``record``'s step, the spike's steps to be
        skipped; past ``recovery.max_rollbacks_per_stage`` the run stops (:class:`TrainingDiverged`)."""
        step, limit = record["step"], self.cfg.recovery.max_rollbacks_per_stage
        if recovery.rollbacks >= limit:
            raise TrainingDiverged(f"{trigger} spikes in stage '{run.name}' at steps "
                                   f"{steps_named([*recovery.spike_steps(), step])}: more than "
                                   f"recovery.max_rollbacks_per_stage={limit} rollbacks; stopping")
        run.checkpoints.wait()  # a save in flight holds a good step
        # Steps step - spike_window .. step are suspect: the target is the last checkpoint before them, and the
        # checkpoints taken among them are discarded.
        target = run.checkpoints.rollback_target(step)
        recovery.decide(step, trigger, record["loss"], record["grad_norm"], target)
        discarded = run.checkpoints.discard_after(target)
        logger.warning("stage %s step %d: %s spike (loss %.4f, grad norm %.4f); rolling back to step %d%s and "
                       "skipping steps %s", run.name, step, trigger, record["loss"], record["grad_norm"], target,
                       f" (discarding the checkpoints of steps {steps_named(discarded)})" if discarded else "",
                       steps_named(recovery.events[step]["skipped_steps"]))
        run.feed.loader.close()
        if not target:  # the stage's start: no window yet
            recovery.losses, recovery.grad_norms = [], []
        return self.open_stage(run.name, resume_from=target, recovery=recovery)

    def _skip_step(self, run: StageRun, recovery: RecoveryState) -> None:
        """Draw the next step's micro-batches and drop them (their samples are never trained on), and name them in
        ``<stage>/recovery.jsonl``."""
        step, loader = run.train.step + 1, run.feed.loader
        observed, recorder = loader.packer.observer, SkippedSamples(loader)
        loader.observe(recorder)
        run.feed.next_step(run.train.step / run.stage.steps)
        loader.observe(observed)
        run.train.step += 1
        samples = recorder.gathered()
        spike = next(e for e in recovery.events.values() if step in e["skipped_steps"])
        if self.rank == 0:
            append_recovery_line(stage_dir(self.cfg, run.name) / "recovery.jsonl",
                                 {**spike, "step": step, "spike_step": spike["step"], "samples": samples})
        logger.warning("stage %s step %d skipped: %d samples dropped", run.name, step, len(samples))

    def _report_stage(self, name: str) -> None:
        """The stage's throughput line and loss-curve PNG (rank 0)."""
        records = read_metrics(stage_dir(self.cfg, name) / "metrics.jsonl")
        if self.rank != 0 or not records:
            return
        skipped = [r["step"] for r in read_recovery(stage_dir(self.cfg, name) / "recovery.jsonl")]
        plot_losses(records, stage_dir(self.cfg, name) / "loss.png", f"{self.cfg.run_dir.name}: {name}", skipped)
        seconds = sum(r["step_time_s"] for r in records)
        tokens_per_s = sum(r["tokens_per_s"] * r["step_time_s"] for r in records) / seconds
        mfu = sum(r["mfu"] for r in records) / len(records)
        logger.info("stage %s: %.0f tokens/s over %d ranks, model FLOPs utilization %.1f%% (of %.1f TFLOP/s per "
                    "rank)", name, tokens_per_s, self.world, 100 * mfu, self.peak_flops / 1e12)

    def forward_backward(self, stage: StageConfig, batches: list[PackedBatch] | list[ImageTextBatch],
                         optimizer: ZeroOptimizer | None = None) -> StepResult:
        """The stage objective's forward and backward over this rank's micro-batches (gradients accumulate, sharded
        by ``optimizer`` between micro-batches when it does that)."""
        return self._select_step(stage, optimizer)(batches)

    def train_step(self, name: str, stage: StageConfig, optimizer: ZeroOptimizer, feed: DeviceFeed,
                   train: TrainState, step: StepStrategy) -> dict[str, Any]:
        """One optimizer step: micro-batches, the stage's forward and backward (``step``), then the optimizer's
        gradient reduction, clipping and update, and bookkeeping."""
        start = time.perf_counter()
        lr = lr_at(stage.lr, train.step, stage.steps, self.previous_final_lr[name])
        optimizer.lr = lr
        optimizer.zero_grad()
        batches = feed.next_step(train.step / stage.steps)
        result = step(batches)
        if train.step + 1 < stage.steps:  # the device is busy with this step: draw and copy the next one meanwhile
            feed.prefetch((train.step + 1) / stage.steps)
        host = drop_unseen_sources(result.to_host())
        grad_norm = self._update(name, stage, optimizer, result, host["loss"], train)
        train.step += 1
        tokens = int(host.pop("tokens"))
        train.tokens += tokens
        elapsed = time.perf_counter() - start
        # Model FLOPs this rank did: ranks handed the same rows (a pipeline's, each its share of the layers; a
        # context-parallel group's, each its share of the tokens) share them.
        flops = step_model_flops(self.cfg.model, batches) / step.rows_shared_by
        return {"stage": name, "step": train.step, **host, "lr": lr,
                "tokens": train.tokens, "grad_norm": float(grad_norm), "step_time_s": elapsed,
                "tokens_per_s": tokens / elapsed, "corrupt_samples": feed.loader.corrupt,
                "skipped_steps": train.skipped_steps, "model_tflops_per_s": flops / elapsed / 1e12,
                "mfu": flops / elapsed / self.peak_flops,
                # the layout that trained this step (a resume may change it): train.inspect and train.replay
                "world_size": self.world, "data_parallel": feed.loader.shard[1],
                "micro_batch_size": stage.micro_batch_size}

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


def run_curriculum(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Entry used by ``python -m train``: check the device and the data of every stage, train, then leave the
    process group."""
    resolve_device(cfg.runtime.device)  # a device that cannot be used is the first thing to say
    check_run(cfg)
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
        dist.destroy_process_group()
