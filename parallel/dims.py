"""Parallel degrees (checked by config/validate.py before any process group exists) turned into a DeviceMesh
and sub-groups.

The world is a ``pp x dp x cp`` mesh (pipeline outermost, context innermost, so context ranks, which exchange the
most, are neighbours). Expert parallelism is carved out of ``dp x cp``: the ``dp * cp`` ranks of a pipeline stage
are cut into expert-parallel groups of ``ep`` consecutive ranks, each holding ``1 / ep`` of the routed experts;
ranks at the same position of different groups hold the same experts and form an *expert-data* group, over which
expert gradients are reduced and expert optimizer state is sharded (Megatron's "EP inside DP", torchtitan's EP over
FSDP x CP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from config.model import ModelArgs
from config.schema import ParallelConfig
from config.validate import check_degrees, check_stage_cp_degree

MESH_DIMS = ("pp", "dp", "cp")


@dataclass
class ParallelGroups:
    """This rank's process groups: ``dense`` (data x context ranks of its pipeline stage: dense gradients and
    optimizer state), ``cp`` (context), ``ep`` (expert parallel), ``expert_data`` (same experts: expert gradients
    and their optimizer state) and ``pp`` (the ranks of its pipeline, in stage order; None without pipeline
    parallelism); ``expert_mesh`` is the ``(pp, expert_data, ep)`` mesh when experts are sharded."""

    dense: dist.ProcessGroup
    cp: dist.ProcessGroup
    ep: dist.ProcessGroup
    expert_data: dist.ProcessGroup
    expert_mesh: DeviceMesh | None = None
    pp: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class ParallelDims:
    """A validated layout of ``world_size`` ranks."""

    pp_degree: int
    dp_degree: int
    cp_degree: int
    ep_degree: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, model: ModelArgs | None = None,
                    seq_lens: list[int] | None = None) -> ParallelDims:
        """The layout of ``world_size`` ranks the recipe's degrees give (checked by
        :func:`config.validate.check_degrees`, which says what would work)."""
        pp, dp, cp, ep = check_degrees(cfg, world_size, model, seq_lens)
        return cls(pp_degree=pp, dp_degree=dp, cp_degree=cp, ep_degree=ep, world_size=world_size)

    @property
    def expert_data_degree(self) -> int:
        """Ranks holding the same experts (expert gradients and optimizer state go over them)."""
        return self.dp_degree * self.cp_degree // self.ep_degree

    def coordinates(self, rank: int) -> dict[str, int]:
        """The mesh position of ``rank``: pp, dp, cp indices plus its ep index and expert-data index."""
        pp, rest = divmod(rank, self.dp_degree * self.cp_degree)
        dp, cp = divmod(rest, self.cp_degree)
        expert_data, ep = divmod(rest, self.ep_degree)
        return {"pp": pp, "dp": dp, "cp": cp, "ep": ep, "expert_data": expert_data}

    def expert_group_ranks(self) -> tuple[list[list[int]], list[list[int]]]:
        """All expert-parallel groups and all expert-data groups, as lists of global ranks."""
        stage = self.dp_degree * self.cp_degree
        ep_groups, expert_data_groups = [], []
        for pp in range(self.pp_degree):
            base = pp * stage
            ep_groups += [[base + g * self.ep_degree + e for e in range(self.ep_degree)]
                          for g in range(self.expert_data_degree)]
            expert_data_groups += [[base + g * self.ep_degree + e for g in range(self.expert_data_degree)]
                                   for e in range(self.ep_degree)]
        return ep_groups, expert_data_groups

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """The ``pp x dp x cp`` DeviceMesh over the initialized default process group."""
        return init_device_mesh(device_type, (self.pp_degree, self.dp_degree, self.cp_degree),
                                mesh_dim_names=MESH_DIMS)

    def build_expert_groups(self) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        """This rank's expert-parallel group and expert-data group (every rank creates every group, in order)."""
        ep_groups, expert_data_groups = self.expert_group_ranks()
        rank = dist.get_rank()
        mine = {}
        for kind, groups in (("ep", ep_groups), ("expert_data", expert_data_groups)):
            for ranks in groups:
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine[kind] = group
        return mine["ep"], mine["expert_data"]

    def for_stage(self, cp_degree: int, seq_len: int, key: str = "cp_degree") -> ParallelDims:
        """The layout of a curriculum stage that sets its own context-parallel degree (0: keep this one).

        The ``dp x cp`` ranks of a pipeline stage stay the same, and with them the expert and dense groups; only how
        they divide rows and tokens changes (e.g. 8K stages data parallel, 128K stages with ``cp = 16``).
        """
        ranks = self.dp_degree * self.cp_degree
        cp = check_stage_cp_degree(ranks, self.cp_degree, cp_degree, seq_len, key)
        if cp == self.cp_degree:
            return self
        return ParallelDims(pp_degree=self.pp_degree, dp_degree=ranks // cp, cp_degree=cp, ep_degree=self.ep_degree,
                            world_size=self.world_size)

    def build_cp_group(self) -> dist.ProcessGroup:
        """This rank's context-parallel group of this layout (every rank creates every group, in order)."""
        stage = self.dp_degree * self.cp_degree
        mine = None
        for p in range(self.pp_degree):
            for d in range(self.dp_degree):
                ranks = [p * stage + d * self.cp_degree + c for c in range(self.cp_degree)]
                group = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    mine = group
        return mine

    def build_groups(self, device_type: str = "cpu") -> ParallelGroups:
        """Every process group this rank takes part in (every rank creates every group, in the same order); the
        expert mesh is of ``device_type`` (``cuda`` or ``cpu``), the device the expert shards live on."""
        stage = self.dp_degree * self.cp_degree
        rank = dist.get_rank()
        mine: dict[str, dist.ProcessGroup] = {}
        layouts = {
            # dense parameters are replicated over the data x context ranks of a pipeline stage
            "dense": [list(range(p * stage, (p + 1) * stage)) for p in range(self.pp_degree)],
            "cp": [[p * stage + d * self.cp_degree + c for c in range(self.cp_degree)]
                   for p in range(self.pp_degree) for d in range(self.dp_degree)],
        }
        layouts["ep"], layouts["expert_data"] = self.expert_group_ranks()
        if self.pp_degree > 1:  # pipeline outermost: ranks r, r + stage, r + 2 stage, ...
            layouts["pp"] = [[r + p * stage for p in range(self.pp_degree)] for r in range(stage)]
        for kind, groups in layouts.items():
            for ranks in groups:
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine[kind] = group
        # A mesh over which expert shards are DTensors in checkpoints (sharded over ep, replicated elsewhere).
        expert_mesh = init_device_mesh(device_type, (self.pp_degree, self.expert_data_degree, self.ep_degree),
                                       mesh_dim_names=("pp", "expert_data", "ep")) if self.ep_degree > 1 else None
        return ParallelGroups(dense=mine["dense"], cp=mine["cp"], ep=mine["ep"], expert_data=mine["expert_data"],
                              expert_mesh=expert_mesh, pp=mine.get("pp"))

    def dp_rank(self, rank: int | None = None) -> int:
        """This rank's index among the data-parallel replicas (the data loader's shard)."""
        return self.coordinates(dist.get_rank() if rank is None else rank)["dp"]
