"""Cost of ZeRO-1 distributed Muon against ZeRO-1 AdamW on the same model, same run (dp ranks forked, gloo, CPU).

Prints one JSON line:

* ``comm_bytes_ratio_vs_adamw_zero1``: bytes one step hands to collectives (reduce-scatter of gradients + all-gather
  of parameters) by our Muon ÷ by ZeRO-1 AdamW with DeepSpeed's even flat partition (``ceil(total / dp)`` elements
  per rank). "Muon is Scalable" Algorithm 1 reaches <= 1.25 (its extra gather of every Muon matrix is estimated as
  ``algorithm1_comm_ratio_estimate``); goal <= 1.05.
* ``ns_flops_imbalance``: max per-rank Newton-Schulz FLOPs ÷ mean (goal <= 1.1).
* ``state_bytes_imbalance``: max per-rank optimizer-state bytes ÷ mean.
* ``comm_bytes_ratio_bf16_vs_fp32`` (with ``--plan``): bytes per step of the most loaded rank with bf16 parameters
  (fp32 reduce-scatter, bf16 all-gather) ÷ with fp32 for both, worst over the world sizes.
* ``step_time_ratio_vs_adamw_zero1``: wall time of one optimizer step (reduce, clip, update, gather), Muon ÷ AdamW.

    python benchmarks/muon_distributed.py [--flavor small --dp 4 --steps 3]

Before anything is timed, both distributed optimizers are checked to compute what one process computes
(``benchmarks/_check.py``: one line on stderr and exit status 1 otherwise): two steps on ``--dp`` ranks, each
rank with its own gradients, must leave every rank with the same parameters (bit for bit) and change every parameter
as two steps of the same optimizer in one process given the ranks' summed gradients do, within 2e-3 of each
parameter's largest change (measured: 6e-4, from AdamW elements whose summed gradient is near its eps, where the
order of the sum shows). Newton-Schulz runs in fp32 for the check (in bf16, the timed setting, rounding flips
leave ~2e-2 between any two summation orders); the ranks' code is the same. The check also requires both
optimizers to cover the same parameter elements, which the bytes ratio divides by.

With ``--plan FLAVOR --world 8,64,256,1024`` it also computes the real plan at each world size without allocating:
the model is built on ``meta``, its experts sharded over ``ep`` ranks (``apply_expert_parallel``, as the trainer
does), and :class:`~optim.distributed.ZeroOptimizer` is built on rank 0 of a fake process group of that size, with
dense units over all ranks and expert units over the expert-data ranks. Every rank's figures come from the plans
the optimizer executes (the same on every rank): bytes per step (``Plan.comm_bytes``: ZeRO-1's reduce-scatter and
all-gather plus the compute-layout all-to-alls) against ZeRO-1 AdamW's even partition of the same groups, Newton-Schulz
FLOPs (dense plus the rank's experts) max ÷ mean, optimizer-state bytes max ÷ the even share. The worst over the
world sizes are ``comm_bytes_ratio_at_scale``, ``ns_flops_imbalance_at_scale``, ``state_bytes_imbalance_at_scale``.
The plans are required to hold the same elements in each partition (dense, experts) as the AdamW baseline's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.registry import FLAVORS, build_model
from optim.build import MUON
from optim.distributed import ZeroOptimizer
from optim.muon import MuonHParams

# tests/ is not installed: the forked-rank runner comes from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.forked import run_ranks  # noqa: E402

try:
    from benchmarks._check import require_close_scaled, require_equal
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from _check import require_close_scaled, require_equal

CHECK_STEPS = 2
CHANGE_TOL = 2e-3  # of each parameter's largest change over the checked steps


def build(flavor: str, use_muon: bool, group, ns_dtype: torch.dtype = MuonHParams.ns_dtype):
    """The model (seed 0) and its optimizer over ``group`` (None: one process)."""
    torch.manual_seed(0)
    model = build_model(FLAVORS[flavor])
    model.coca.requires_grad_(False)  # the language-model stages' trainable set
    return model, ZeroOptimizer(model, lr=1e-3, weight_decay=0.1, use_muon=use_muon, group=group,
                                muon=MuonHParams(ns_dtype=ns_dtype))


def fake_grads(params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """A rank's gradients of one step: small normal values, drawn in the optimizer's parameter order."""
    return [torch.randn(param.shape, generator=generator) * 1e-3 for param in params]


def measure(rank: int, world: int, flavor: str, use_muon: bool, steps: int) -> dict:
    _, optimizer = build(flavor, use_muon, dist.group.WORLD)
    generator = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps + 1):
        for param, grad in zip(optimizer.params, fake_grads(optimizer.params, generator), strict=True):
            param.grad = grad
        dist.barrier()
        start = time.perf_counter()
        optimizer.step(max_grad_norm=1.0)
        dist.barrier()
        if step > 0:  # the first step pays one-time allocation
            times.append(time.perf_counter() - start)
    return {
        "comm_bytes": optimizer.communication_bytes(),
        "ns_flops": optimizer.ns_flops(),
        "state_bytes": optimizer.state_bytes(),
        "step_s": min(times),
        "total_elements": sum(u.numel for u in optimizer.units),
        "muon_elements": sum(u.numel for u in optimizer.units if u.route.rule == MUON),
    }


def updates_after_steps(rank: int, world: int, flavor: str, use_muon: bool, steps: int, ns_dtype: torch.dtype):
    """Every parameter's change over ``steps`` steps on ``world`` ranks (rank 0's, None elsewhere), and the largest
    difference of any parameter between ranks (the all-gather must leave every rank with the same model)."""
    model, optimizer = build(flavor, use_muon, dist.group.WORLD, ns_dtype)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        for param, grad in zip(optimizer.params, fake_grads(optimizer.params, generator), strict=True):
            param.grad = grad
        optimizer.step(max_grad_norm=1.0)
    spread = 0.0
    for name, param in model.named_parameters():
        if name in before:
            high, low = param.detach().clone(), param.detach().clone()
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            spread = max(spread, float((high - low).abs().max()))
    changes = {name: p.detach() - before[name] for name, p in model.named_parameters() if name in before}
    return {"changes": changes if rank == 0 else None, "spread": spread}


def reference_changes(flavor: str, use_muon: bool, world: int, steps: int, ns_dtype: torch.dtype):
    """The same steps in one process (no group), each step's gradient the sum of the ``world`` ranks' gradients."""
    model, optimizer = build(flavor, use_muon, None, ns_dtype)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    generators = [torch.Generator().manual_seed(rank) for rank in range(world)]
    for _ in range(steps):
        per_rank = [fake_grads(optimizer.params, g) for g in generators]
        for param, *grads in zip(optimizer.params, *per_rank, strict=True):
            param.grad = torch.stack(grads).sum(0)
        optimizer.step(max_grad_norm=1.0)
    return {name: p.detach() - before[name] for name, p in model.named_parameters() if name in before}


def check_against_one_process(flavor: str, world: int) -> None:
    """Both distributed optimizers must compute what one process computes (see the module docstring)."""
    totals = {}
    for use_muon, name in ((True, "muon"), (False, "adamw")):
        ranks = run_ranks(updates_after_steps, world, flavor, use_muon, CHECK_STEPS, torch.float32, timeout=1800)
        require_equal(f"{name} zero-1 parameters on every rank", max(r["spread"] for r in ranks), 0.0)
        expected = reference_changes(flavor, use_muon, world, CHECK_STEPS, torch.float32)
        require_close_scaled(f"{name} zero-1 on {world} ranks vs one process, parameter changes", ranks[0]["changes"],
                             expected, CHANGE_TOL)
        totals[name] = sum(change.numel() for change in expected.values())
    require_equal("elements optimized, muon vs adamw", totals["muon"], totals["adamw"])


def plan_figures(flavor: str, world: int, ep: int) -> dict:
    """The real plan of ``flavor`` at ``world`` data x context ranks with experts over ``ep``, per rank (no
    allocation: meta model, fake process group)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel.expert import apply_expert_parallel

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        model = build_model(FLAVORS[flavor], device="meta")
        model.coca.requires_grad_(False)  # the language-model stages' trainable set
        ep = ep if world % ep == 0 else 1
        # ParallelDims' layout: expert-parallel groups of ep consecutive ranks; rank 0's expert-data group is every
        # ep-th rank.
        ep_group = dist.new_group(list(range(ep)))
        expert_data = dist.new_group(list(range(0, world, ep)))
        if ep > 1:
            apply_expert_parallel(model, ep_group)
        muon = ZeroOptimizer(model, lr=1e-3, weight_decay=0.1, group=dist.group.WORLD, expert_group=expert_data)
        adamw = ZeroOptimizer(model, lr=1e-3, weight_decay=0.1, use_muon=False, group=dist.group.WORLD,
                              expert_group=expert_data)
    finally:
        dist.destroy_process_group()
    require_equal(f"elements per partition at {world} ranks, muon plan vs adamw",
                  [sum(u.numel for u in p.plan.units) for p in muon.partitions],
                  [sum(u.numel for u in p.plan.units) for p in adamw.partitions])
    dense, experts = muon.partitions[0].plan, (muon.partitions[1].plan if len(muon.partitions) > 1 else None)

    def per_rank(figure: str, *args) -> list[float]:
        own = getattr(dense, figure)(*args)
        other = getattr(experts, figure)(*args) if experts is not None else [0] * world
        return [own[r] + other[r // (world // len(other))] for r in range(world)]

    comm, flops, state = per_rank("comm_bytes"), per_rank("ns_flops"), per_rank("state_bytes")
    # Mixed precision: fp32 reduce-scatter, bf16 all-gather (optim/distributed.py), against fp32 for both.
    comm_bf16 = per_rank("comm_bytes", 4, 2)
    # Every byte sent and received, on both sides of the comparison (ZeRO-1 AdamW's collectives twice).
    comm_both = per_rank("comm_bytes", 4, 4, True)
    even_comm = sum(p.plan.even_comm_bytes() for p in adamw.partitions)
    return {
        "world": world, "ep": ep, "expert_data": world // ep,
        "dense_segment_elements": dense.segment,
        "split_matrices": sum(len(t) > 1 for t in dense.tasks.values()),
        "comm_bytes_ratio": round(max(comm) / even_comm, 4),
        "our_adamw_comm_bytes_ratio": round(sum(p.communication_bytes() for p in adamw.partitions) / even_comm, 4),
        "ns_flops_imbalance": round(max(flops) / (sum(flops) / world), 4),
        "state_bytes_imbalance": round(max(state) / (sum(state) / world), 4),
        "max_state_gib": round(max(state) / 2**30, 3),
        "max_comm_gib": round(max(comm) / 2**30, 3),
        "comm_bytes_ratio_bf16_vs_fp32": round(max(comm_bf16) / max(comm), 4),
        "comm_bytes_ratio_both_directions": round(max(comm_both) / (2 * even_comm), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--plan", default=None, help="also compute the real plan of this flavor at scale")
    parser.add_argument("--world", default="8,64,256,1024")
    parser.add_argument("--ep", type=int, default=8)
    args = parser.parse_args()
    if args.plan:
        worlds = [plan_figures(args.plan, int(w), args.ep) for w in args.world.split(",")]
        print(json.dumps({
            "benchmark": "muon_distributed_plan", "flavor": args.plan,
            "comm_bytes_ratio_at_scale": max(w["comm_bytes_ratio"] for w in worlds),
            "ns_flops_imbalance_at_scale": max(w["ns_flops_imbalance"] for w in worlds),
            "state_bytes_imbalance_at_scale": max(w["state_bytes_imbalance"] for w in worlds),
            "comm_bytes_ratio_bf16_vs_fp32": max(w["comm_bytes_ratio_bf16_vs_fp32"] for w in worlds),
            "comm_bytes_ratio_both_directions_at_scale": max(w["comm_bytes_ratio_both_directions"] for w in worlds),
            "worlds": worlds,
        }))
    check_against_one_process(args.flavor, args.dp)
    muon = run_ranks(measure, args.dp, args.flavor, True, args.steps)
    adamw = run_ranks(measure, args.dp, args.flavor, False, args.steps)
    total = muon[0]["total_elements"]
    even_partition_bytes = 2 * args.dp * math.ceil(total / args.dp) * 4  # DeepSpeed ZeRO-1's flat partition
    mean_flops = sum(r["ns_flops"] for r in muon) / args.dp
    mean_state = sum(r["state_bytes"] for r in muon) / args.dp
    muon_share = muon[0]["muon_elements"] / total
    print(json.dumps({
        "benchmark": "muon_distributed",
        "flavor": args.flavor,
        "dp": args.dp,
        "parameters": total,
        "muon_parameter_share": round(muon_share, 3),
        "comm_bytes_ratio_vs_adamw_zero1": round(muon[0]["comm_bytes"] / even_partition_bytes, 4),
        "our_adamw_comm_bytes_ratio_vs_even_partition": round(adamw[0]["comm_bytes"] / even_partition_bytes, 4),
        # Algorithm 1 adds an all-gather of every Muon matrix's gradient to the ZeRO-1 traffic.
        "algorithm1_comm_ratio_estimate": round(1 + muon_share / 2, 4),
        "ns_flops_imbalance": round(max(r["ns_flops"] for r in muon) / mean_flops, 4),
        "state_bytes_imbalance": round(max(r["state_bytes"] for r in muon) / mean_state, 4),
        "muon_step_s": round(max(r["step_s"] for r in muon), 4),
        "adamw_step_s": round(max(r["step_s"] for r in adamw), 4),
        "step_time_ratio_vs_adamw_zero1": round(max(r["step_s"] for r in muon) / max(r["step_s"] for r in adamw), 3),
    }))


if __name__ == "__main__":
    main()
