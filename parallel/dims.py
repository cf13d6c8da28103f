"""Parallel degrees: validated before any process group exists, then turned into a DeviceMesh."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    """The layout of the world. Only data parallelism exists so far (pp, cp, ep arrive with the 4D engine)."""

    dp_degree: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        dp = world_size if cfg.dp_degree == -1 else cfg.dp_degree
        if dp != world_size:
            raise ConfigError(f"Invalid value parallel.dp_degree={cfg.dp_degree!r}: the product of the parallel "
                              f"degrees must equal the world size {world_size}; use {world_size} or -1.")
        return cls(dp_degree=dp, world_size=world_size)

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        return init_device_mesh(device_type, (self.dp_degree,), mesh_dim_names=("dp",))

    def dp_rank(self) -> int:
        return dist.get_rank() % self.dp_degree
