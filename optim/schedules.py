"""Per-stage learning-rate schedules: linear warmup, then constant, linear or cosine decay to a floor."""

from __future__ import annotations

import math

from train.config import LRScheduleConfig


def lr_at(schedule: LRScheduleConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a stage of ``total_steps`` steps.

    Warmup reaches ``peak_lr`` at step ``warmup_steps``; the decay then reaches ``peak_lr * min_lr_ratio`` at the
    stage's last step.
    """
    peak = schedule.peak_lr
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    floor = peak * schedule.min_lr_ratio
    span = max(total_steps - 1 - schedule.warmup_steps, 1)
    progress = min((step - schedule.warmup_steps) / span, 1.0)
    if schedule.decay == "constant":
        return peak
    if schedule.decay == "linear":
        return peak + (floor - peak) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
