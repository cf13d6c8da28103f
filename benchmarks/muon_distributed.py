"""Cost of ZeRO-1 distributed Muon against ZeRO-1 AdamW on the same model, same run (dp ranks forked, gloo, CPU).

Prints one JSON line:

* ``comm_bytes_ratio_vs_adamw_zero1``: bytes one step hands to collectives (reduce-scatter of gradients + all-gather
  of parameters) by our Muon ÷ by ZeRO-1 AdamW with DeepSpeed's even flat partition (``ceil(total / dp)`` elements
  per rank). "Muon is Scalable" Algorithm 1 reaches <= 1.25 (its extra gather of every Muon matrix is estimated as
  ``algorithm1_comm_ratio_estimate``); goal <= 1.05.
* ``ns_flops_imbalance``: max per-rank Newton-Schulz FLOPs ÷ mean (goal <= 1.1).
* ``state_bytes_imbalance``: max per-rank optimizer-state bytes ÷ mean.
* ``step_time_ratio_vs_adamw_zero1``: wall time of one optimizer step (reduce, clip, update, gather), Muon ÷ AdamW.

    python benchmarks/muon_distributed.py [--flavor small --dp 4 --steps 3]

With ``--plan FLAVOR --world 8,64,256,1024`` it also computes the real plan at each world size without allocating:
the model is built on ``meta``, its experts sharded over ``ep`` ranks (``apply_expert_parallel``, as the trainer
does), and :class:`~optim.distributed.ZeroOptimizer` is built on rank 0 of a fake process group of that size, with
dense units over all ranks and expert units over the expert-data ranks. Every rank's figures come from the plans
the optimizer executes (the same on every rank): bytes per step (``Plan.comm_bytes``: ZeRO-1's reduce-scatter and
all-gather plus the compute-layout all-to-alls) against ZeRO-1 AdamW's even partition of the same groups, Newton-Schulz
FLOPs (dense plus the rank's experts) max ÷ mean, optimizer-state bytes max ÷ the even share. The worst over the
world sizes are ``comm_bytes_ratio_at_scale``, ``ns_flops_imbalance_at_scale``, ``state_bytes_imbalance_at_scale``.
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

# tests/ is not installed: the forked-rank runner comes from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.forked import run_ranks  # noqa: E402


def measure(rank: int, world: int, flavor: str, use_muon: bool, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(FLAVORS[flavor])
    model.coca.requires_grad_(False)  # the language-model stages' trainable set
    optimizer = ZeroOptimizer(model, lr=1e-3, weight_decay=0.1, use_muon=use_muon, group=dist.group.WORLD)
    generator = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps + 1):
        for param in optimizer.params:
            param.grad = torch.randn(param.shape, generator=generator) * 1e-3
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
    dense, experts = muon.partitions[0].plan, (muon.partitions[1].plan if len(muon.partitions) > 1 else None)

    def per_rank(figure: str) -> list[float]:
        own = getattr(dense, figure)()
        other = getattr(experts, figure)() if experts is not None else [0] * world
        return [own[r] + other[r // (world // len(other))] for r in range(world)]

    comm, flops, state = per_rank("comm_bytes"), per_rank("ns_flops"), per_rank("state_bytes")
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
            "worlds": worlds,
        }))
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
