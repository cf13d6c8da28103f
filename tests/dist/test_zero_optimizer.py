"""ZeRO-1 Muon + AdamW on forked gloo ranks equals the single-process optimizer; its state reshards."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from model.moe import GroupedExperts
from optim.distributed import ZeroOptimizer
from tests.forked import run_ranks

LR, WD, CLIP = 0.01, 0.1, 4.0


class Mixed(nn.Module):
    """Every kind of unit, with sizes that do not divide by 2 or 4."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(101, 16)
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 37)
        self.wide = nn.Linear(37, 64, bias=False)
        self.experts = GroupedExperts(3, 16, 24)
        self.head = nn.Linear(16, 101, bias=False)


def mixed_model() -> Mixed:
    torch.manual_seed(0)
    model = Mixed()
    for param in model.experts.parameters():
        nn.init.normal_(param, std=0.05)
    return model


def rank_grads(model: nn.Module, step: int, rank: int) -> None:
    """Dyadic gradients (multiples of 2^-10): their sum over ranks is exact in any order, so reduction order cannot
    blur the comparison."""
    generator = torch.Generator().manual_seed(10_000 * step + rank)
    for param in model.parameters():
        param.grad = torch.randint(-512, 512, param.shape, generator=generator).float() / 1024


def set_summed_grads(model: nn.Module, step: int, ranks: int, share: float = 1.0) -> None:
    """Give ``model`` the sum over ``ranks`` of their :func:`rank_grads` (times ``share``, a power of two)."""
    parts = mixed_model()
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for rank in range(ranks):
        rank_grads(parts, step, rank)
        for name, p in parts.named_parameters():
            total[name] += p.grad
    for name, p in model.named_parameters():
        p.grad = total[name] * share


def train(rank: int, world: int, steps: int, group_world: bool = True, bucket_elements: int = 1 << 24) -> dict:
    model = mixed_model()
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, group=dist.group.WORLD if group_world else None,
                              bucket_elements=bucket_elements)
    norms = []
    for step in range(steps):
        rank_grads(model, step, rank)
        norms.append(optimizer.step(max_grad_norm=CLIP))
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "norms": norms,
            "state_bytes": optimizer.state_bytes(), "owned": len(optimizer.owned_pieces())}


def single_process(world: int, steps: int) -> dict:
    """The reference: one process, gradients summed over the ranks' contributions."""
    model = mixed_model()
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD)
    norms = []
    for step in range(steps):
        set_summed_grads(model, step, world)
        norms.append(optimizer.step(max_grad_norm=CLIP))
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "norms": norms,
            "state_bytes": optimizer.state_bytes()}


# The default bucket holds a whole segment; 37 elements cut units (and their rows) across many collectives.
@pytest.mark.parametrize("world,bucket", [(2, 1 << 24), (4, 1 << 24), (4, 37)])
def test_distributed_equals_single_process_over_50_steps(world, bucket):
    results = run_ranks(train, world, 50, True, bucket)
    reference = single_process(world, 50)
    for result in results:
        assert result["norms"] == pytest.approx(reference["norms"], rel=1e-9)
        for name, expected in reference["params"].items():
            error = (result["params"][name] - expected).norm() / expected.norm()
            assert error <= 1e-6, f"{name}: relative error {error:.2e}"
    # Clipping was active in some steps (the comparison covers it).
    assert any(norm > CLIP for norm in reference["norms"])
    # Optimizer state is split: every unit owned once, each rank holding about 1/world of the bytes.
    total = reference["state_bytes"]
    assert sum(r["state_bytes"] for r in results) == total
    largest_unit = 64 * 37 * 4  # bytes of the largest Muon momentum (LPT bound: mean + one unit)
    assert max(r["state_bytes"] for r in results) <= total / world + largest_unit
    assert all(r["owned"] > 0 for r in results)


def save_after(rank: int, world: int, steps: int, path: str) -> None:
    model = mixed_model()
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, group=dist.group.WORLD)
    for step in range(steps):
        rank_grads(model, step, rank)
        optimizer.step(max_grad_norm=CLIP)
    dcp.save({"model": model.state_dict(), "optim": optimizer}, checkpoint_id=path)


def resume_and_step(rank: int, world: int, step: int, path: str, saved_world: int) -> dict:
    model = mixed_model()
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, group=dist.group.WORLD)
    model_state = model.state_dict()
    dcp.load({"model": model_state, "optim": optimizer}, checkpoint_id=path)
    model.load_state_dict(model_state)
    # The next step's gradients are what the saved layout's ranks would have produced, split over this layout.
    set_summed_grads(model, step, saved_world, share=1 / world)
    optimizer.step(max_grad_norm=CLIP)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_resharded_resume_is_identical(saved_world: int, resumed_world: int, path: str) -> None:
    """State saved after 3 steps at ``saved_world`` ranks, loaded at ``resumed_world``: the 4th step's parameters
    equal an uninterrupted run's."""
    run_ranks(save_after, saved_world, 3, path)
    resumed = run_ranks(resume_and_step, resumed_world, 3, path, saved_world)
    uninterrupted = run_ranks(train, saved_world, 4)
    for name, expected in uninterrupted[0]["params"].items():
        for result in resumed:
            assert torch.allclose(result[name], expected, rtol=1e-6, atol=1e-9), name


def test_state_saved_at_dp4_loads_at_dp2_and_the_next_step_is_identical(tmp_path):
    assert_resharded_resume_is_identical(4, 2, str(tmp_path / "checkpoint"))


# ----- expert parameters sharded over their expert-data group ------------------------------------------------------

GLOBAL_EXPERTS, EP = 4, 2


class DenseAndExperts(nn.Module):
    def __init__(self, experts: int):
        super().__init__()
        self.proj = nn.Linear(16, 37)
        self.experts = GroupedExperts(experts, 16, 24)


def global_model() -> DenseAndExperts:
    torch.manual_seed(1)
    model = DenseAndExperts(GLOBAL_EXPERTS)
    for param in model.experts.parameters():
        nn.init.normal_(param, std=0.05)
    return model


def local_model(ep_rank: int) -> DenseAndExperts:
    """What one rank holds under expert parallelism: the dense part and its EP shard of the experts."""
    full = global_model()
    local = DenseAndExperts(GLOBAL_EXPERTS // EP)
    local.proj.load_state_dict(full.proj.state_dict())
    shard = slice(ep_rank * GLOBAL_EXPERTS // EP, (ep_rank + 1) * GLOBAL_EXPERTS // EP)
    for name, param in local.experts.named_parameters():
        param.data.copy_(getattr(full.experts, name)[shard])
    return local


def ep_rank_of(rank: int) -> int:
    return rank % EP  # ranks 0,1 form one expert-parallel group; {0, 2} and {1, 3} hold the same experts


def expert_grads(step: int, rank: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(77 * step + rank)
    shapes = {n: p.shape for n, p in local_model(0).named_parameters()}
    return {n: torch.randint(-512, 512, shape, generator=generator).float() / 1024 for n, shape in shapes.items()}


def train_expert_parallel(rank: int, world: int, steps: int) -> dict:
    expert_data_groups = [dist.new_group([r for r in range(world) if ep_rank_of(r) == e]) for e in range(EP)]
    model = local_model(ep_rank_of(rank))
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, group=dist.group.WORLD,
                              expert_group=expert_data_groups[ep_rank_of(rank)], norm_group=dist.group.WORLD)
    for step in range(steps):
        for name, param in model.named_parameters():
            param.grad = expert_grads(step, rank)[name]
        optimizer.step(max_grad_norm=CLIP)
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "ep_rank": ep_rank_of(rank),
            "state_keys": sorted(optimizer.state)}


def test_experts_are_sharded_over_their_expert_data_group():
    world, steps = 4, 20
    results = run_ranks(train_expert_parallel, world, steps)
    reference = global_model()
    optimizer = ZeroOptimizer(reference, lr=LR, weight_decay=WD)
    per_ep = GLOBAL_EXPERTS // EP
    for step in range(steps):
        dense = {n: torch.zeros_like(p) for n, p in reference.proj.named_parameters()}
        experts = {n: torch.zeros_like(p) for n, p in reference.experts.named_parameters()}
        for rank in range(world):
            grads = expert_grads(step, rank)
            for name in dense:
                dense[name] += grads[f"proj.{name}"]
            shard = slice(ep_rank_of(rank) * per_ep, (ep_rank_of(rank) + 1) * per_ep)
            for name in experts:
                experts[name][shard] += grads[f"experts.{name}"]
        for name, param in reference.proj.named_parameters():
            param.grad = dense[name]
        for name, param in reference.experts.named_parameters():
            param.grad = experts[name]
        optimizer.step(max_grad_norm=CLIP)
    for result in results:
        shard = slice(result["ep_rank"] * per_ep, (result["ep_rank"] + 1) * per_ep)
        for name, param in reference.named_parameters():
            expected = param.detach()[shard] if name.startswith("experts.") else param.detach()
            error = (result["params"][name] - expected).norm() / expected.norm()
            assert error <= 1e-6, f"{name}: relative error {error:.2e}"
    # Each expert matrix's state lives on exactly one rank of its expert-data group.
    for ep_rank in range(EP):
        keys = [k for r in results if r["ep_rank"] == ep_rank for k in r["state_keys"] if k.startswith("experts.")]
        assert len(keys) == len(set(keys)) == 3 * per_ep
