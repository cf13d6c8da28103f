"""The curriculum: which parts train in a stage, RoPE base changes, and the hand-off between stages.

A stage is finished when its directory holds ``DONE.json``; its last committed checkpoint is then the "final
checkpoint" the next stage starts from (``init_from: previous``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from config import TRAINABLE_PARTS, ConfigError, RunConfig, StageConfig
from config.init_sources import parse_init_from, per_part
from optim.schedules import final_lr
from storage import S3Options
from train.checkpoint import CheckpointManager, ModelState, load_checkpoint
from train.checkpoint_store import open_checkpoint_store
from train.init_from import check_sources, load_parts
from train.metrics import write_atomic


def stage_dir(cfg: RunConfig, name: str) -> Path:
    return cfg.run_dir / name


def checkpoint_s3_options(cfg: RunConfig) -> S3Options:
    return S3Options(endpoint_url=cfg.checkpoint.endpoint_url, region=cfg.checkpoint.region,
                     max_attempts=cfg.checkpoint.max_attempts)


def checkpoint_location(cfg: RunConfig, name: str) -> str:
    """Where a stage's checkpoints live: ``<run>/<stage>/checkpoints``, or ``<checkpoint.url>/<run name>/<stage>``."""
    if not cfg.checkpoint.url:
        return str(stage_dir(cfg, name) / "checkpoints")
    return f"{cfg.checkpoint.url.rstrip('/')}/{cfg.run_dir.name}/{name}"


def checkpoints_of(cfg: RunConfig, name: str, async_group: dist.ProcessGroup | None = None) -> CheckpointManager:
    store = open_checkpoint_store(checkpoint_location(cfg, name), checkpoint_s3_options(cfg))
    spike_window = cfg.recovery.spike_window if cfg.recovery.enabled else 0
    return CheckpointManager(store, cfg.checkpoint.keep_last, async_group, spike_window=spike_window)


def is_done(cfg: RunConfig, name: str) -> bool:
    return (stage_dir(cfg, name) / "DONE.json").exists()


def mark_done(cfg: RunConfig, name: str, final_step: int) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = stage_dir(cfg, name) / "DONE.json"
        write_atomic(path, json.dumps({"stage": name, "final_step": final_step}) + "\n")
    if dist.is_initialized():
        dist.barrier()


def apply_stage(model: nn.Module, stage: StageConfig) -> None:
    """Set the stage's RoPE base and freeze every part it does not train.

    Frozen parts still pass gradients through to earlier trainable parts (e.g. the LLM in ``vit_align``); they are
    left out of the optimizer, so not even weight decay touches them.
    """
    model.set_rope_theta(stage.rope_theta)
    for part in TRAINABLE_PARTS:
        module = getattr(model, part)
        if module is not None:  # a pipeline stage holds only some parts
            module.requires_grad_(part in stage.trainable)


def init_stage_weights(model: nn.Module, cfg: RunConfig, name: str, expert_mesh: DeviceMesh | None = None) -> str:
    """Load the weights a stage starts from (when it has no checkpoint of its own); returns where from.
    ``expert_mesh``: the mesh of expert-parallel shards (:class:`ModelState`), if experts are sharded."""
    stage = cfg.curriculum.stages[name]
    if per_part(stage.init_from, cfg.curriculum.order):
        return init_parts(model, cfg, name, expert_mesh)
    if stage.init_from == "scratch":
        return "scratch (the run's seeded initialization)"
    if stage.init_from == "previous":
        index = cfg.curriculum.order.index(name)
        previous = cfg.curriculum.order[index - 1]
        manager = checkpoints_of(cfg, previous)
        step = manager.latest_step()
        if not is_done(cfg, previous) or step is None:
            raise RuntimeError(f"stage '{name}' starts from stage '{previous}', which has no final checkpoint")
        manager.load(step, {"model": ModelState(model, expert_mesh)})
        return manager.location(step)
    load_checkpoint(stage.init_from, {"model": ModelState(model, expert_mesh)}, checkpoint_s3_options(cfg))
    return stage.init_from


def final_checkpoint(cfg: RunConfig, name: str) -> str:
    """The location of a finished stage's final checkpoint."""
    manager = checkpoints_of(cfg, name)
    step = manager.latest_step()
    if not is_done(cfg, name) or step is None:
        raise RuntimeError(f"stage '{name}' has no final checkpoint (it has not finished)")
    return manager.location(step)


def init_parts(model: nn.Module, cfg: RunConfig, name: str, expert_mesh: DeviceMesh | None = None) -> str:
    """Per-part ``init_from`` (train/init_from.py): each part of this rank's model from its own source."""
    order = cfg.curriculum.order
    earlier = order[:order.index(name)]
    sources = parse_init_from(cfg.curriculum.stages[name].init_from, earlier, order, list(cfg.curriculum.stages))
    try:
        done = load_parts(model, cfg.model, sources, earlier, lambda stage: final_checkpoint(cfg, stage), cfg.seed,
                          expert_mesh, checkpoint_s3_options(cfg))
    except (ValueError, FileNotFoundError) as error:  # InitError, HFConfigError, an absent directory
        raise ConfigError(f"curriculum.stages.{name}.init_from: {error}") from None
    return ", ".join(f"{part} from {where}" for part, where in done.items())


def check_init_sources(cfg: RunConfig) -> None:
    """Check every stage's ``hf:`` and checkpoint-path sources against the model before anything trains."""
    for name in cfg.curriculum.order:
        init_from = cfg.curriculum.stages[name].init_from
        if per_part(init_from, cfg.curriculum.order):
            order = cfg.curriculum.order
            sources = parse_init_from(init_from, order[:order.index(name)], order, list(cfg.curriculum.stages))
            try:
                check_sources(cfg.model, sources, order, checkpoint_s3_options(cfg))
            except (ValueError, FileNotFoundError) as error:
                raise ConfigError(f"curriculum.stages.{name}.init_from: {error}") from None


def previous_final_lrs(cfg: RunConfig) -> dict[str, float | None]:
    """For each stage, the learning rate the previous stage ends with (None for the first): what a
    ``continue_previous`` schedule starts from. A pure function of the recipe, so it survives restarts."""
    lrs, last = {}, None
    for name in cfg.curriculum.order:
        stage = cfg.curriculum.stages[name]
        lrs[name] = last
        last = final_lr(stage.lr, stage.steps, last)
    return lrs
