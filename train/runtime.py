"""This rank's device and process group: chosen and checked before any process group exists.

``runtime.device``:

* ``auto``: ``cuda:$LOCAL_RANK`` when CUDA is available, else ``cpu``;
* ``cuda``: ``cuda:$LOCAL_RANK``; refused without CUDA or with more local ranks than visible GPUs;
* ``cpu``: the CPU, whatever else the machine has.

The backend follows the device: NCCL for CUDA (the current device is set first, so NCCL binds each rank to its
GPU), gloo for the CPU. Groups made for background work (checkpoint writes) ask for gloo themselves.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from config import ConfigError

__all__ = ["backend_for", "init_distributed", "resolve_device"]


def resolve_device(setting: str, cuda_available: bool | None = None, cuda_devices: int | None = None,
                   local_rank: int | None = None, local_world_size: int | None = None) -> torch.device:
    """The device this rank runs on, or a :class:`ConfigError` saying what to change.

    Args:
        setting: ``auto``, ``cpu`` or ``cuda``.
        cuda_available: Whether CUDA can be used (default: ``torch.cuda.is_available()``).
        cuda_devices: Visible GPUs (default: ``torch.cuda.device_count()``).
        local_rank: This process's rank on its node (default: ``$LOCAL_RANK`` or 0).
        local_world_size: Processes on this node (default: ``$LOCAL_WORLD_SIZE`` or 1).
    """
    if setting not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"Invalid value runtime.device={setting!r}: allowed is one of ('auto', 'cpu', 'cuda').")
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_world_size is None else local_world_size
    if setting == "cpu" or (setting == "auto" and not cuda_available):
        return torch.device("cpu")
    if not cuda_available:
        raise ConfigError(f"Invalid value runtime.device=cuda: no CUDA device is usable here (torch "
                          f"{torch.__version__}, built with CUDA {torch.version.cuda}); use runtime.device=cpu or "
                          "auto, or run on a GPU node with a CUDA build of torch.")
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if local_world_size > cuda_devices:
        raise ConfigError(f"Invalid layout: {local_world_size} processes on this node but {cuda_devices} visible "
                          f"GPU(s) with runtime.device={setting}; start at most {cuda_devices} per node "
                          "(torchrun --nproc_per_node) or use runtime.device=cpu.")
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """The collective backend of ``device``: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group on ``device``'s backend, or form a group of one (no launcher)."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group: NCCL binds the rank to its current device
    backend = backend_for(device)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
