"""Checkpoints: ``torch.distributed.checkpoint`` directories, committed atomically, keep-last-k.

A checkpoint is written to ``step-XXXXXXXX.tmp`` by every rank and renamed to ``step-XXXXXXXX`` by rank 0 only
after all ranks finished writing, so a directory without ``.tmp`` is always complete: a crash during a save never
harms the last good checkpoint, and leftovers of an interrupted save are removed on the next one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

STEP_DIR = re.compile(r"^step-(\d{8})$")


class ModelState(Stateful):
    """The full model (trainable and frozen parameters, persistent buffers) under its module names."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class RNGState(Stateful):
    """The torch CPU generator."""

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class CheckpointManager:
    """Saves and finds the checkpoints of one stage under ``directory``."""

    def __init__(self, directory: Path, keep_last: int):
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def committed_steps(self) -> list[int]:
        if not self.directory.exists():
            return []
        found = (STEP_DIR.match(p.name) for p in self.directory.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest_step(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` (tensors and Stateful objects) as the checkpoint of ``step`` and commit it."""
        final = self.path(step)
        staging = final.with_name(final.name + ".tmp")
        if _is_rank0():
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        dcp.save(state, checkpoint_id=staging)
        _barrier()
        if _is_rank0():
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)  # the commit: atomic on a POSIX file system
            self._prune()
        _barrier()
        return final

    def load(self, step: int, state: dict[str, Any]) -> None:
        """Fill ``state`` in place from the committed checkpoint of ``step``."""
        load_checkpoint(self.path(step), state)

    def _prune(self) -> None:
        for step in self.committed_steps()[: -self.keep_last]:
            shutil.rmtree(self.path(step), ignore_errors=True)
        for leftover in self.directory.glob("*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Load the keys of ``state`` from a checkpoint directory (other keys in it are ignored)."""
    if not (Path(path) / ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a committed checkpoint (no .metadata)")
    dcp.load(state, checkpoint_id=path)
