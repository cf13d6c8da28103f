"""Automatic loss-spike recovery: detect a spike, roll back, skip the spiking steps' data, continue.

A step is a spike when its loss exceeds ``recovery.loss_spike_factor`` x the mean loss of the last
``recovery.window`` trained steps, or its gradient norm exceeds ``recovery.grad_spike_factor`` x their mean (only
once the window is full); with recovery on, a non-finite loss or gradient (its update already skipped) rolls back
too. Every rank computes the same numbers (the loss and the gradient norm are global), and the
decision is all-reduced besides, so all ranks act together. On a spike at step ``s``:

1. the decision is recorded (steps ``s .. s + skip_steps - 1`` are to be skipped) and the stage reopened from its
   last checkpoint before ``s`` (no checkpoint is ever taken at a detected spike: detection runs before the save);
2. the steps up to ``s - 1`` are trained again (the same data, the same arithmetic);
3. each skipped step draws its micro-batches and drops them: the loader's counters move past them, so their samples
   are never trained on; ``<stage>/recovery.jsonl`` names them (step, trigger, loss, gradient norm, samples);
4. training continues. Past ``recovery.max_rollbacks_per_stage`` rollbacks the run stops, naming the spike steps.

The decisions are part of the checkpoint (:class:`RecoveryState`, merged on load: a rollback loads an older state
but keeps the newer decisions), so a rerun after a crash skips the same steps; one that crashed before the decision
reached a checkpoint meets the same spike again (the stream and the arithmetic are reproducible) and decides the
same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from config.schema import RecoveryConfig
from data.loader import StageLoader

# What can trigger a rollback, by precedence when ranks disagree (the decision is all-reduced with MAX).
TRIGGERS = ("", "loss", "grad_norm", "nonfinite")

__all__ = ["TRIGGERS", "RecoveryState", "SkippedSamples", "append_recovery_line", "read_recovery"]


class RecoveryState(Stateful):
    """The detector's running windows and the stage's recovery decisions (part of the checkpoint)."""

    def __init__(self, cfg: RecoveryConfig):
        self.cfg = cfg
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.rollbacks = 0
        self.events: dict[int, dict[str, Any]] = {}  # spike step -> what triggered it
        self.skip: set[int] = set()  # steps whose data is drawn and dropped

    def spike(self, loss: float, grad_norm: float, device: torch.device) -> str:
        """The trigger if the step of ``loss`` and ``grad_norm`` is a spike ("loss" or "grad_norm"; "" if not),
        agreed by every rank; a step that is no spike joins the windows."""
        trigger = ""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # its update was skipped; its data is bad too
            trigger = "nonfinite"
        elif len(self.losses) >= self.cfg.window:
            if self.cfg.loss_spike_factor and loss > self.cfg.loss_spike_factor * _mean(self.losses):
                trigger = "loss"
            elif self.cfg.grad_spike_factor and grad_norm > self.cfg.grad_spike_factor * _mean(self.grad_norms):
                trigger = "grad_norm"
        flag = torch.tensor([float(TRIGGERS.index(trigger))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's spike is every rank's
        trigger = TRIGGERS[int(flag.item())]
        if not trigger:
            self.losses = (self.losses + [loss])[-self.cfg.window:]
            self.grad_norms = (self.grad_norms + [grad_norm])[-self.cfg.window:]
        return trigger

    def decide(self, step: int, trigger: str, loss: float, grad_norm: float, rolled_back_to: int) -> None:
        """Record a rollback for the spike at ``step``: its ``skip_steps`` steps are skipped from now on."""
        self.rollbacks += 1
        skipped = list(range(step, step + self.cfg.skip_steps))
        self.events[step] = {"step": step, "trigger": trigger, "loss": loss, "grad_norm": grad_norm,
                             "rolled_back_to": rolled_back_to, "skipped_steps": skipped}
        self.skip.update(skipped)

    def spike_steps(self) -> list[int]:
        return sorted(self.events)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "rollbacks": self.rollbacks,
                "events": json.dumps(self.events), "skip": sorted(self.skip)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The windows as saved; the decisions merged with those held (a rollback keeps the newer ones)."""
        self.losses = [float(v) for v in state_dict["losses"]]
        self.grad_norms = [float(v) for v in state_dict["grad_norms"]]
        self.rollbacks = max(self.rollbacks, int(state_dict["rollbacks"]))
        self.events.update({int(k): v for k, v in json.loads(state_dict["events"]).items()})
        self.skip.update(int(s) for s in state_dict["skip"])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class SkippedSamples:
    """Records the samples a skipped step's draws hold on this rank (the loader's observer), gathered to all."""

    def __init__(self, loader: StageLoader):
        self.loader, self.samples = loader, []

    def __call__(self, kind: str, slot: int, *event: Any) -> None:
        if kind == "row":
            keys = [(piece[0], piece[1], piece[2]) for piece in event[0].pieces]
        elif kind == "pair":
            keys = [(event[0], 0, None)]
        else:
            return
        for (source, position, draw, _), start, stop in keys:
            where = self.loader.reader.sources[source].locate(position)
            self.samples.append({"slot": slot, "source": source, "position": position, "draw": draw,
                                 "where": where, "doc_tokens": [start, stop]})

    def gathered(self) -> list[dict[str, Any]]:
        """Every rank's records, by slot (ranks of a context-parallel group hold the same rows: kept once)."""
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, self.samples)
        unique = {json.dumps(s, sort_keys=True): s for records in everyone for s in records}
        return sorted(unique.values(), key=lambda s: (s["slot"], s["draw"]))


def append_recovery_line(path: Path, record: dict[str, Any]) -> None:
    """Add one skipped step to ``recovery.jsonl`` unless a rerun already wrote it."""
    if any(r["step"] == record["step"] for r in read_recovery(path)):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_recovery(path: Path) -> list[dict[str, Any]]:
    """The skipped steps of a stage's ``recovery.jsonl`` (empty without one)."""
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def steps_named(steps: Iterable[int]) -> str:
    return ", ".join(str(s) for s in sorted(steps))
