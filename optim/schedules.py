"""Per-stage learning-rate schedules.

A stage warms up linearly to ``peak_lr`` over ``warmup_steps`` (a re-warm when the previous stage ended lower), then
``decay``s to ``peak_lr * min_lr_ratio`` at its last step: ``constant`` (no decay), ``linear``, ``cosine``, or
``wsd`` (warmup-stable-decay: flat at the peak, then a linear decay over the last ``decay_fraction`` of the stage).
With ``continue_previous`` the stage picks up where the previous stage's schedule ended (no warmup; its decay
starts from that learning rate), as a cooldown continuing the pretraining schedule does.
"""

from __future__ import annotations

import math

from config.schema import LRScheduleConfig


def lr_at(schedule: LRScheduleConfig, step: int, total_steps: int, previous_final_lr: float | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a stage of ``total_steps`` steps.

    Args:
        schedule: The stage's schedule.
        step: Optimizer step within the stage.
        total_steps: Steps of the stage.
        previous_final_lr: The last learning rate of the previous stage; required with ``continue_previous``.
    """
    peak, warmup = schedule.peak_lr, schedule.warmup_steps
    if schedule.continue_previous:
        if previous_final_lr is None:
            raise ValueError("continue_previous needs the previous stage's final learning rate")
        peak, warmup = previous_final_lr, 0
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * schedule.min_lr_ratio
    span = max(total_steps - 1 - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    if schedule.decay == "constant":
        return peak
    if schedule.decay == "wsd":
        decay_start = 1.0 - schedule.decay_fraction
        if progress <= decay_start:
            return peak
        progress = (progress - decay_start) / schedule.decay_fraction
        return peak + (floor - peak) * progress
    if schedule.decay == "linear":
        return peak + (floor - peak) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def final_lr(schedule: LRScheduleConfig, total_steps: int, previous_final_lr: float | None = None) -> float:
    """The learning rate of a stage's last step (what a ``continue_previous`` stage starts from)."""
    return lr_at(schedule, total_steps - 1, total_steps, previous_final_lr)
