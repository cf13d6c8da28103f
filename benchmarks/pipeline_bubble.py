"""Pipeline bubble of the 1F1B and interleaved 1F1B schedules, measured on the real ``torch.distributed.pipelining``
runtime at pp4 with 8 micro-batches (forked gloo ranks).

Method. Every stage is a tiny linear layer followed by a *fixed-duration* compute: a custom autograd function that
waits ``--forward-ms`` in its forward and twice that in its backward (the usual B = 2F). The waiting is a sleep, on
purpose: these machines give 4 ranks 2 shared cores, so CPU-bound stage work would run at a speed that depends on
how many ranks happen to compute at once (and on the other users of the machine), which would turn contention into
fake bubble. A sleep costs no CPU, so every stage takes the same time whatever runs next to it, exactly the "equal
stages" model of the theory; what remains between the compute is what the schedule and its runtime impose: waiting
in receives for the neighbour's activations or gradients, plus the (real) send/recv and bookkeeping overhead.

Per rank, ``busy`` is the time spent inside the fixed-cost compute during a step and ``wall`` the step's duration
(from a barrier to the end of the slowest rank's step). The bubble is ``1 - mean(busy) / wall``, the fraction of
the pipeline's device-time spent idle. Interleaved schedules run ``--virtual`` stages per rank, each with ``1 /
virtual`` of a rank's work, so the total compute is the same. The median over ``--steps`` steps (after a warm-up
step) is reported with the theory ``(p - 1) / (m + p - 1)`` of 1F1B and ``(p - 1) / (v m + p - 1)`` of interleaving.

The excess over theory is the runtime's per-action overhead (gloo send/recv, Python bookkeeping) relative to the
stage time, so it shrinks as stages get longer (figures: docs/benchmarks.md); interleaving doubles the number of
actions, hence its larger excess over its own (lower) theory.

    python benchmarks/pipeline_bubble.py [--pp 4 --microbatches 8 --forward-ms 40 --steps 3]

Before anything is timed, one step of each schedule is checked against the work the theory counts
(``benchmarks/_check.py``: one line on stderr and exit status 1 otherwise): every rank ran each of its stages'
fixed-cost forward and backward exactly once per micro-batch, and the gradients of every stage's weights equal those
of the same stages run one after the other on the whole batch in one process, within 1e-5 of each gradient's largest
entry (fp32; the schedule sums the micro-batches' gradients in another order).

Prints one JSON line: ``bubble_1f1b``, ``bubble_interleaved``, ``bubble_1f1b_theory``,
``bubble_interleaved_theory``, ``bubble_excess_1f1b`` (measured - theory; goal <= 0.05) and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from parallel.pipeline import SCHEDULES, stage_ranks

# tests/ is not installed: the forked-rank runner comes from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.forked import run_ranks  # noqa: E402

try:
    from benchmarks._check import require_close_scaled, require_equal
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from _check import require_close_scaled, require_equal

HIDDEN, ROWS = 16, 4
GRAD_TOL = 1e-5  # of each gradient's largest entry


class FixedCost(torch.autograd.Function):
    """Identity whose forward takes ``seconds`` and backward ``2 * seconds``, recorded in ``clock``: ``[seconds spent,
    forwards, backwards]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seconds: float, clock: list[float]) -> torch.Tensor:
        ctx.seconds, ctx.clock = seconds, clock
        _spend(seconds, clock)
        clock[1] += 1
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _spend(2 * ctx.seconds, ctx.clock)
        ctx.clock[2] += 1
        return grad, None, None


def _spend(seconds: float, clock: list[float]) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    clock[0] += time.perf_counter() - start


class EqualStage(nn.Module):
    """A stage whose compute takes a fixed time: a small linear layer, then :class:`FixedCost`."""

    def __init__(self, seconds: float, clock: list[float]):
        super().__init__()
        self.linear = nn.Linear(HIDDEN, HIDDEN)
        self.seconds, self.clock = seconds, clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FixedCost.apply(torch.tanh(self.linear(x)), self.seconds, self.clock)


def sum_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output * target).sum()


def stage_owners(schedule_name: str, world: int, virtual: int) -> list[int]:
    """The rank of every stage of ``schedule_name`` at ``world`` ranks."""
    _, layout, per_rank = SCHEDULES[schedule_name]
    return stage_ranks(world * (per_rank or virtual), world, layout)


def build_rank(per_rank: int, forward_s: float, clock: list[float], microbatches: int):
    """A rank's stage modules (in the order of its stages) and the step's inputs and target (the same on every rank):
    drawn from seed 0 in this order, so that one process can rebuild any rank's."""
    torch.manual_seed(0)
    modules = [EqualStage(forward_s / per_rank, clock) for _ in range(per_rank)]
    return modules, torch.randn(ROWS * microbatches, HIDDEN), torch.randn(ROWS * microbatches, HIDDEN)


def measure_rank(rank: int, world: int, schedule_name: str, microbatches: int, virtual: int, forward_s: float,
                 steps: int) -> dict:
    """Run ``steps + 1`` steps of one schedule on this rank; return ``(busy, wall)`` of each measured step and, of
    the first (warm-up) step, the fixed-cost calls and every stage's gradients."""
    schedule_cls, _, per_rank = SCHEDULES[schedule_name]
    per_rank = per_rank or virtual
    owners = stage_owners(schedule_name, world, virtual)
    num_stages = len(owners)
    clock = [0.0, 0, 0]
    indices = [s for s in range(num_stages) if owners[s] == rank]
    modules, inputs, target = build_rank(per_rank, forward_s, clock, microbatches)
    stages = []
    for index, module in zip(indices, modules, strict=True):
        example = torch.empty(ROWS, HIDDEN, device="meta", requires_grad=index > 0)
        stages.append(PipelineStage(module, index, num_stages, torch.device("cpu"), input_args=(example,),
                                    output_args=(example.detach().requires_grad_(),)))
    if issubclass(schedule_cls, PipelineScheduleSingle):
        schedule = schedule_cls(stages[0], microbatches, loss_fn=sum_loss, scale_grads=False)
    else:
        schedule = schedule_cls(stages, microbatches, loss_fn=sum_loss, scale_grads=False)
    is_first, is_last = owners[0] == rank, owners[-1] == rank
    results, first = [], {}
    for _ in range(steps + 1):
        dist.barrier()
        clock[0] = 0.0
        start = time.perf_counter()
        schedule.step(*((inputs,) if is_first else ()), target=target if is_last else None, return_outputs=False)
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when its slowest rank ends
        results.append((clock[0], float(elapsed)))
        if not first:
            first = {"calls": (clock[1], clock[2]),
                     "grads": {index: [p.grad.clone() for p in module.linear.parameters()]
                               for index, module in zip(indices, modules, strict=True)}}
    return {"steps": results[1:], **first}


def check_schedule(schedule: str, pp: int, microbatches: int, virtual: int, forward_s: float) -> None:
    """One step of ``schedule`` must do the work the theory counts and compute the gradients of one process running
    the same stages in order on the whole batch (see the module docstring)."""
    per_rank = run_ranks(measure_rank, pp, schedule, microbatches, virtual, forward_s, 0)
    owners = stage_owners(schedule, pp, virtual)
    stages_per_rank = len(owners) // pp
    for rank, result in enumerate(per_rank):
        require_equal(f"{schedule} rank {rank} fixed-cost (forwards, backwards)", result["calls"],
                      (microbatches * stages_per_rank, microbatches * stages_per_rank))
    # Rank r's k-th stage is the k-th module of build_rank (every rank draws the same ones from the same seed: each
    # rank's copy is rebuilt here); inputs and target are the same everywhere.
    ranks = [build_rank(stages_per_rank, 0.0, [0.0, 0, 0], microbatches) for _ in range(pp)]
    inputs, target = ranks[0][1], ranks[0][2]
    linear = {s: ranks[owners[s]][0][owners[:s].count(owners[s])].linear for s in range(len(owners))}
    x = inputs
    for s in range(len(owners)):
        x = torch.tanh(linear[s](x))
    params = {s: list(linear[s].parameters()) for s in range(len(owners))}
    flat = [p for s in params for p in params[s]]
    grads = iter(torch.autograd.grad(sum_loss(x, target), flat))
    expected = {s: [next(grads) for _ in params[s]] for s in params}
    measured = {s: g for result in per_rank for s, g in result["grads"].items()}
    require_close_scaled(f"{schedule} stage gradients vs one process", measured, expected, GRAD_TOL)


def measure(schedule: str, pp: int, microbatches: int, virtual: int, forward_s: float, steps: int) -> float:
    """Median bubble fraction of ``schedule`` over ``steps`` steps."""
    per_rank = [r["steps"] for r in run_ranks(measure_rank, pp, schedule, microbatches, virtual, forward_s, steps)]
    bubbles = []
    for step in range(steps):
        busy = statistics.mean(rank[step][0] for rank in per_rank)
        wall = per_rank[0][step][1]
        bubbles.append(1.0 - busy / wall)
    return statistics.median(bubbles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--virtual", type=int, default=2)
    parser.add_argument("--forward-ms", type=float, default=40.0)
    parser.add_argument("--steps", type=int, default=3)
    cli = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p, m, v, forward_s = cli.pp, cli.microbatches, cli.virtual, cli.forward_ms / 1e3
    for schedule in ("1f1b", "interleaved_1f1b"):
        check_schedule(schedule, p, m, v, forward_s)
    bubble_1f1b = measure("1f1b", p, m, v, forward_s, cli.steps)
    bubble_interleaved = measure("interleaved_1f1b", p, m, v, forward_s, cli.steps)
    theory_1f1b = (p - 1) / (m + p - 1)
    theory_interleaved = (p - 1) / (v * m + p - 1)
    print(json.dumps({
        "pp": p, "microbatches": m, "virtual_stages": v, "forward_ms": cli.forward_ms,
        "backward_ms": 2 * cli.forward_ms,
        "bubble_1f1b": round(bubble_1f1b, 4), "bubble_interleaved": round(bubble_interleaved, 4),
        "bubble_1f1b_theory": round(theory_1f1b, 4), "bubble_interleaved_theory": round(theory_interleaved, 4),
        "bubble_excess_1f1b": round(bubble_1f1b - theory_1f1b, 4),
        "bubble_excess_interleaved": round(bubble_interleaved - theory_interleaved, 4),
    }))


if __name__ == "__main__":
    main()
