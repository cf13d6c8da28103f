"""Recompute one logged step of a run and compare it with what ``metrics.jsonl`` says.

``python -m train.replay RUN --stage S --step N [key=value ...]`` (under ``torchrun`` with the run's world size)

Loads the last checkpoint of stage ``S`` before step ``N`` (or the stage's start weights), trains forward to ``N``
exactly as the run did (the same recipe, from the run's ``config.yaml``; the same stream, from the checkpoint's
loader state) and compares step ``N``'s loss, its parts, its per-source losses and its gradient norm with the logged
ones. Nothing in the run directory is written. On CPU at the run's layout and precision the values are
bit-identical; ``key=value`` overrides (e.g. ``precision.param_dtype=bfloat16``) or another world size change the
arithmetic, and the report says so and gives the differences instead.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf

from config import ConfigError, RunConfig
from data.formats import DataError
from train.inspect import InspectError, open_run, start_checkpoint, step_layout
from train.metrics import metrics_record
from train.trainer import Trainer

__all__ = ["compare_step", "main", "replay_step"]

# What is compared: the step's loss and gradient norm, every loss part, every per-source loss.
COMPARED_PREFIXES = ("loss", "lm_loss", "aux_loss", "siglip_loss", "caption_loss", "grad_norm", "loss/")


def _apply_overrides(cfg: RunConfig, overrides: list[str]) -> tuple[RunConfig, list[str]]:
    """The run's configuration with ``key=value`` overrides (validated again), and what they changed."""
    if not overrides:
        return cfg, []
    from config.load import to_run_config

    base = OmegaConf.structured(cfg)
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
    keys = [o.split("=", 1)[0] for o in overrides]
    changed = [o for o, key in zip(overrides, keys, strict=True)
               if OmegaConf.select(base, key) != OmegaConf.select(merged, key)]
    new = to_run_config(OmegaConf.create(OmegaConf.to_container(merged)))
    new.output_dir, new.run_name = cfg.output_dir, cfg.run_name
    return new, changed


def _differences(info: dict[str, Any], layout: dict[str, int], cfg: RunConfig, world: int,
                 changed: list[str]) -> list[str]:
    """Why bit-identity cannot be expected: a layout (``layout``: the one that trained the step) or a precision
    other than the run's at that step."""
    reasons = [f"override {o}" for o in changed]
    if layout and layout["world_size"] != world:
        reasons.append(f"world size {world}, the run had {layout['world_size']} at that step ({layout})")
    saved = info.get("config", {}).get("precision")
    now = OmegaConf.to_container(OmegaConf.structured(cfg.precision))
    if saved and saved != now and not changed:
        reasons.append(f"precision {now}, the run had {saved}")
    return reasons


def compare_step(logged: dict[str, Any], replayed: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """``{key: (logged, replayed)}`` for every compared value that is not bit-identical (NaN equals NaN)."""
    keys = sorted(k for k in set(logged) | set(replayed) if k.startswith(COMPARED_PREFIXES)
                  and not k.startswith("loss_tokens/"))
    diff = {}
    for key in keys:
        a, b = logged.get(key, float("nan")), replayed.get(key, float("nan"))
        if not (a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))):
            diff[key] = (a, b)
    return diff


def replay_step(run_dir: str | Path, name: str, step: int, overrides: list[str] | None = None) -> dict[str, Any]:
    """Recompute step ``step`` of stage ``name`` (call on every rank of a process group of the run's size, or in
    one process for a one-process run).

    Returns:
        ``{"logged", "replayed", "from_checkpoint", "expect_identical", "reasons", "differences"}``.
    """
    cfg, changed = _apply_overrides(open_run(run_dir), list(overrides or []))
    cfg.log.wandb, cfg.exit_after_steps = False, 0
    start, info = start_checkpoint(cfg, name, step)
    logged = metrics_record(cfg.run_dir / name / "metrics.jsonl", step)
    if logged is None:
        raise InspectError(f"{cfg.run_dir / name / 'metrics.jsonl'} has no step {step}")
    trainer = Trainer(cfg, lock=False)
    try:
        run = trainer.open_stage(name, resume_from=start)
        try:
            record: dict[str, Any] = {}
            while run.train.step < step:
                record = trainer.train_step(name, run.stage, run.optimizer, run.feed, run.train, run.step)
        finally:
            run.feed.loader.close()
        reasons = _differences(info, step_layout(cfg, name, step, info), cfg, trainer.world, changed)
    finally:
        trainer.close()
    return {"logged": logged, "replayed": record, "from_checkpoint": start, "expect_identical": not reasons,
            "reasons": reasons, "differences": compare_step(logged, record)}


def format_report(result: dict[str, Any], name: str, step: int) -> tuple[str, bool]:
    """The report's lines, and whether the replay agrees with what was expected."""
    start = result["from_checkpoint"]
    origin = f"checkpoint step {start}" if start else "the stage's start"
    lines = [f"stage {name} step {step}: replayed from {origin}"]
    differences = result["differences"]
    if not result["expect_identical"]:
        lines.append("bit-identity is not expected: " + "; ".join(result["reasons"]))
    if not differences:
        lines.append("bit-identical: " + ", ".join(f"{k}={result['logged'][k]!r}" for k in sorted(result["logged"])
                                                    if k.startswith(COMPARED_PREFIXES) and "/" not in k))
    for key, (logged, replayed) in differences.items():
        delta = replayed - logged if isinstance(logged, float) and isinstance(replayed, float) else float("nan")
        lines.append(f"DIFFERS {key}: logged {logged!r}, replayed {replayed!r} (difference {delta:.3g})")
    return "\n".join(lines), not differences or not result["expect_identical"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.replay", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run directory (<output_dir>/<run_name>)")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--step", type=int, required=True, help="as metrics.jsonl numbers it (1 is the first)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the run's configuration")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        result = replay_step(args.run, args.stage, args.step, args.overrides)
    except (InspectError, ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    text, agrees = format_report(result, args.stage, args.step)
    print(text)
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
