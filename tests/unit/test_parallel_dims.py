"""Parallel degrees: impossible layouts fail before any process group, naming the values and what would work."""

from __future__ import annotations

import pytest

from config import ConfigError, ParallelConfig, load_config
from model.registry import FLAVORS
from parallel.dims import ParallelDims

REAL = FLAVORS["kimi_vl_a3b"]


def dims(world: int, **degrees) -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(**degrees), world, REAL, [8192, 32768, 131072])


def test_256_ranks_pp4_dp64_ep8():
    layout = dims(256, pp_degree=4, ep_degree=8)
    assert (layout.pp_degree, layout.dp_degree, layout.cp_degree, layout.ep_degree) == (4, 64, 1, 8)
    assert layout.expert_data_degree == 8
    ep_groups, expert_data_groups = layout.expert_group_ranks()
    # Every rank is in exactly one group of each kind; groups stay inside a pipeline stage.
    for groups, size in ((ep_groups, 8), (expert_data_groups, 8)):
        assert sorted(r for g in groups for r in g) == list(range(256))
        assert all(len(g) == size and len({r // 64 for r in g}) == 1 for g in groups)
    # An expert-parallel group and an expert-data group meet in exactly one rank.
    assert all(len(set(a) & set(b)) <= 1 for a in ep_groups for b in expert_data_groups)


def test_coordinates_follow_pp_dp_cp_order():
    layout = dims(16, pp_degree=2, cp_degree=2, ep_degree=4)
    assert layout.dp_degree == 4
    assert layout.coordinates(0) == {"pp": 0, "dp": 0, "cp": 0, "ep": 0, "expert_data": 0}
    assert layout.coordinates(13) == {"pp": 1, "dp": 2, "cp": 1, "ep": 1, "expert_data": 1}


@pytest.mark.parametrize(
    ("world", "degrees", "fragments"),
    [
        (8, {"pp_degree": 3}, ["pp_degree=3", "divide the world size 8"]),
        (8, {"dp_degree": 3}, ["dp_degree=3", "dp_degree=8 or -1"]),
        (8, {"ep_degree": 3}, ["ep_degree=3", "[1, 2, 4, 8]"]),
        (128, {"ep_degree": 128}, ["ep_degree=128", "64 routed experts"]),
        (64, {"pp_degree": 32}, ["pp_degree=32", "27 layers"]),
        (8, {"cp_degree": 0}, ["cp_degree=0", ">= 1"]),
    ],
)
def test_impossible_layouts_say_what_would_work(world, degrees, fragments):
    with pytest.raises(ConfigError) as error:
        dims(world, **degrees)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_sequence_length_must_split_into_two_chunks_per_context_rank():
    with pytest.raises(ConfigError, match="not divisible by 2 x cp_degree"):
        ParallelDims.from_config(ParallelConfig(cp_degree=8), 8, REAL, [8200])


def test_recipe_validation_checks_the_layout_before_anything_starts(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match="ep_degree=3"):
        load_config(["recipe=debug", "parallel.ep_degree=3"])
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="routed experts"):
        load_config(["recipe=debug", "parallel.ep_degree=16", "parallel.dp_degree=16"])


def test_mesh_and_expert_groups_on_a_simulated_world():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    layout = dims(16, pp_degree=2, cp_degree=2, ep_degree=4)
    dist.init_process_group(backend="fake", rank=13, world_size=16, store=FakeStore())
    try:
        mesh = layout.build_mesh()
        assert mesh.mesh_dim_names == ("pp", "dp", "cp") and tuple(mesh.shape) == (2, 4, 2)
        assert mesh["dp"].size() == 4 and mesh["cp"].size() == 2 and mesh["pp"].size() == 2
        ep_group, expert_data_group = layout.build_expert_groups()
        assert dist.get_world_size(ep_group) == 4 and dist.get_world_size(expert_data_group) == 2
        assert layout.dp_rank() == 2
    finally:
        dist.destroy_process_group()
