"""Checkpoints: ``torch.distributed.checkpoint`` directories on a local path or S3, committed atomically, keep-last-k,
optionally written in the background; the Stateful wrappers of the model and the RNG.

The commit is what makes a crash during a save harmless: a checkpoint counts only once committed (a rename on a
local path, DCP's ``.metadata`` object on S3: train/checkpoint_store.py). Leftovers of an interrupted save are
removed at the next commit.

**Asynchronous saves** (``checkpoint.async_save``): the state is copied to host memory at the step boundary (DCP's
staging, so training may change the parameters right away), then written by a background thread that talks to the
other ranks over a process group of its own (gloo), never interleaving with the training collectives. Rank 0
commits when its write finishes: DCP's coordinator finishes only after every rank's write, so that is the moment
the checkpoint is complete. One save is in flight at most; the next save, the end of a stage and leaving all wait for
it, and its errors surface there.

Each checkpoint carries ``checkpoint.json`` (stage, step, RoPE base, sequence length, layout and the run's resolved
configuration), so evaluation and conversion know what they hold without the run directory.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
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

from storage import S3Options
from train.checkpoint_store import METADATA_FILE, CheckpointStore, open_checkpoint_store, split_location

__all__ = ["CheckpointManager", "ModelState", "RNGState", "load_checkpoint", "read_checkpoint_info",
           "retained_steps"]

logger = logging.getLogger(__name__)


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
    """The torch CPU generator and, on a GPU, the CUDA generator of this rank's device.

    Args:
        device: The rank's device; its generator is saved as well when it is a CUDA device.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state_dict["cuda"], self.device)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


class CheckpointManager:
    """Saves, commits, prunes and finds the checkpoints of one stage.

    Args:
        store: Where they live (:func:`open_checkpoint_store`).
        keep_last: Committed checkpoints kept; older ones are deleted at each commit.
        async_group: A process group for background saves (gloo, created by every rank), or None to save
            synchronously.
        spike_window: With spike recovery, the steps before a detected spike whose checkpoints are not trusted;
            retention keeps a checkpoint older than them besides the last ``keep_last`` (:func:`retained_steps`).
    """

    def __init__(self, store: CheckpointStore | str | Path, keep_last: int,
                 async_group: dist.ProcessGroup | None = None, spike_window: int = 0):
        self.store = store if not isinstance(store, (str, Path)) else open_checkpoint_store(store)
        self.keep_last = keep_last
        self.spike_window = spike_window
        self.async_group = async_group
        self._pending: tuple[int, Future] | None = None
        self._commit_error: BaseException | None = None
        # Set by rank 0's background commit when it has finished (a future's callbacks run after its waiters wake).
        self._committed = threading.Event()

    @property
    def directory(self) -> Path:
        """The local directory of a local store."""
        return Path(self.store.url)

    def path(self, step: int) -> Path:
        """The local directory of a checkpoint (local stores)."""
        return Path(self.store.location(step))

    def location(self, step: int) -> str:
        return self.store.location(step)

    def committed_steps(self) -> list[int]:
        return self.store.committed_steps()

    def latest_step(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Any], info: dict[str, Any] | None = None,
             blocking: bool = True) -> str:
        """Write ``state`` (tensors and Stateful objects) as the checkpoint of ``step`` and commit it.

        With an ``async_group`` and ``blocking=False`` this returns once the state is staged in host memory; the
        write and the commit finish in the background (:meth:`wait`). Returns the checkpoint's location.
        """
        self.wait()
        group = self.async_group
        if _is_rank0():
            self.store.begin(step)
            if info is not None:
                self.store.write_info(step, info)
        _barrier(group)
        writer = self.store.writer(step)
        if group is None or blocking:
            dcp.save(state, storage_writer=writer, process_group=group)
            _barrier(group)
            if _is_rank0():
                self._commit(step)
            _barrier(group)
            return self.location(step)
        self._committed.clear()
        future = dcp.async_save(state, storage_writer=writer, process_group=group)
        if _is_rank0():
            # Rank 0's save ends with the coordinator's .metadata, written after every rank's files: commit then.
            future.add_done_callback(lambda done: self._commit_in_background(step, done))
        self._pending = (step, future)
        return self.location(step)

    def _commit_in_background(self, step: int, done: Future) -> None:
        try:
            if done.exception() is None:
                self._commit(step)
        except BaseException as error:  # raised by wait(): a callback's exception would only be logged
            self._commit_error = error
        finally:
            self._committed.set()

    def _commit(self, step: int) -> None:
        self.store.commit(step)
        committed = self.store.committed_steps()
        kept = retained_steps(committed, step, self.keep_last, self.spike_window)
        for old in committed:
            if old not in kept:
                self.store.remove(old)
        self.store.remove_leftovers(keep=None)
        logger.info("checkpoint %s committed", self.location(step))

    @property
    def saving(self) -> int | None:
        """The step of the save in flight, if any."""
        return self._pending[0] if self._pending else None

    def wait(self) -> None:
        """Finish the save in flight (write and commit) on every rank; re-raises its error."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        future.result()  # the write's error, if any
        if _is_rank0():
            self._committed.wait()
        # All ranks wait here for rank 0's commit, so every rank then sees the checkpoint committed.
        _barrier(self.async_group)
        error, self._commit_error = self._commit_error, None
        if error is not None:
            raise RuntimeError(f"committing checkpoint {self.location(step)} failed: {error}") from error

    def abandon(self) -> None:
        """On an error: let the save in flight finish (it holds a good step) without waiting for the other ranks
        at a barrier, which a rank-local error would never reach; its own failure is logged, not raised."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        try:
            future.result()
            if _is_rank0():
                self._committed.wait()
        except Exception as error:
            logger.error("checkpoint %s was not completed: %s", self.location(step), error)

    def rollback_target(self, spike_step: int) -> int:
        """The newest committed checkpoint before a spike at ``spike_step`` and the ``spike_window`` steps before it
        (:func:`retained_steps` keeps one); 0 (the stage's start) when there is none."""
        trusted_until = spike_step - self.spike_window - 1
        return max((c for c in self.committed_steps() if c <= trusted_until), default=0)

    def discard_after(self, step: int) -> list[int]:
        """Delete every committed checkpoint newer than ``step`` (a rollback's target: those were taken inside a
        spike's window). Called by every rank with no save in flight; returns the steps deleted."""
        newer = [c for c in self.committed_steps() if c > step]
        if _is_rank0():
            for c in newer:
                self.store.remove(c)
        _barrier()
        return newer

    def load(self, step: int, state: dict[str, Any]) -> None:
        """Fill ``state`` in place from the committed checkpoint of ``step``."""
        dcp.load(state, storage_reader=self.store.reader(step))

    def info(self, step: int) -> dict[str, Any]:
        """The ``checkpoint.json`` of a committed checkpoint."""
        return self.store.read_info(step)


def retained_steps(committed: list[int], newest: int, keep_last: int, spike_window: int = 0) -> set[int]:
    """The committed checkpoints kept when the one of step ``newest`` is committed.

    A spike detected at step ``s`` makes steps ``s - spike_window .. s`` suspect, so its rollback needs a checkpoint
    of a step ``<= s - spike_window - 1``. The next spike can come at ``newest + 1``, so kept are: the last
    ``keep_last``; the newest checkpoint at or before ``newest - spike_window`` (that spike's rollback target; none
    before the first such checkpoint, when the stage's start is the target); and every checkpoint after it, each of
    which becomes the target as training goes on. With checkpoints every ``I`` steps that is at most
    ``max(keep_last, ceil(spike_window / I)) + 1`` checkpoints; ``spike_window = 0`` is plain keep-last-k.
    """
    horizon = newest - spike_window
    kept = set(committed[-keep_last:]) | {c for c in committed if c > horizon}
    target = max((c for c in committed if c <= horizon), default=None)
    if target is not None:
        kept.add(target)
    return kept


def load_checkpoint(location: str | Path, state: dict[str, Any], options: S3Options | None = None) -> None:
    """Load the keys of ``state`` from a committed checkpoint: a local ``step-XXXXXXXX`` directory or its S3 URL
    (other keys in it are ignored)."""
    text = str(location)
    if text.startswith("s3://"):
        store, step = split_location(text, options)
        if step not in store.committed_steps():
            raise FileNotFoundError(f"{location} is not a committed checkpoint (no {METADATA_FILE})")
        dcp.load(state, storage_reader=store.reader(step))
        return
    if not (Path(text) / METADATA_FILE).exists():
        raise FileNotFoundError(f"{location} is not a committed checkpoint (no {METADATA_FILE})")
    dcp.load(state, checkpoint_id=text)


def read_checkpoint_info(location: str | Path, options: S3Options | None = None) -> dict[str, Any]:
    """The ``checkpoint.json`` of a checkpoint (``{}`` for checkpoints written before it existed)."""
    store, step = split_location(location, options)
    return store.read_info(step)
