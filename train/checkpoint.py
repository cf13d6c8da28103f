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
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

STEP_DIR = re.compile(r"^step-(\d{8})$")


class ModelState(Stateful):
    """The full model (trainable and frozen parameters, persistent buffers) under its module names.

    Expert-parallel shards (modules with an ``expert_offset``) are saved as DTensors sharded over the ``ep`` dim of
    ``expert_mesh``: the checkpoint holds every expert once, at its global index, and loads into any expert-parallel
    degree (or none).

    Args:
        model: The model.
        expert_mesh: The ``(pp, expert_data, ep)`` mesh when experts are sharded, else None.
    """

    def __init__(self, model: nn.Module, expert_mesh: DeviceMesh | None = None):
        self.model = model
        self.expert_mesh = expert_mesh

    def _expert_shards(self) -> dict[str, torch.Tensor]:
        if self.expert_mesh is None:
            return {}
        return {f"{module_name}.{name}": param for module_name, module in self.model.named_modules()
                if hasattr(module, "expert_offset") for name, param in module.named_parameters(recurse=False)}

    def state_dict(self) -> dict[str, Any]:
        state = get_model_state_dict(self.model)
        for name, param in self._expert_shards().items():
            # Shares the parameter's storage: loading in place fills the parameter directly.
            state[name] = DTensor.from_local(param.data, self.expert_mesh, [Replicate(), Replicate(), Shard(0)],
                                             run_check=False)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        shards = self._expert_shards()
        for name, param in shards.items():
            loaded = state_dict.pop(name)
            local = loaded.to_local() if isinstance(loaded, DTensor) else loaded
            if local.data_ptr() != param.data_ptr():
                param.data.copy_(local)
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=not shards))


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
