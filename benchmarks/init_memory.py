"""Host memory of building one rank of a real-size layout through the device path.

Builds ``kimi_vl_a3b`` (or ``--flavor``) as rank 0 of an ``ep``-way expert-parallel layout of ``--world`` ranks
under a fake process group (``parallel.parallelize``: meta build, expert slice, pipeline prune, checkpointing,
``to_empty`` on the CPU, name-seeded initialization) and prints one JSON line:

* ``init_peak_rss_vs_shard``: growth of the process's peak resident memory during build + parallelize + init,
  divided by the bytes of the parameters this rank holds. Goal <= 1.2.
* ``full_model_vs_shard``: the bytes a build-then-slice path would materialize on every rank (the whole model),
  divided by the same shard bytes: the baseline, computed on ``meta`` (it does not fit this machine).
* ``seconds_to_build``: wall time of build + parallelize + init.

The peak is the kernel's high-water mark (``VmHWM``), reset just before the build (``/proc/self/clear_refs``).

    python benchmarks/init_memory.py [--flavor kimi_vl_a3b --world 8 --ep 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from config import ParallelConfig
from model.registry import FLAVORS
from model.vlm import KimiVL
from parallel.dims import ParallelDims
from parallel.parallelize import PipelineOptions, parallelize
from train.loss import linear_cross_entropy_sum


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset the high-water mark of resident memory to the current resident size (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="kimi_vl_a3b", choices=sorted(FLAVORS))
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()

    model_args = FLAVORS[args.flavor]
    with torch.device("meta"):
        full_bytes = sum(p.numel() * p.element_size() for p in KimiVL(model_args).parameters())
    dist.init_process_group("fake", rank=0, world_size=args.world, store=FakeStore())
    dims = ParallelDims.from_config(ParallelConfig(pp_degree=args.pp, ep_degree=args.ep), args.world, model_args)
    groups = dims.build_groups()

    reset_peak()
    rss_before = status_bytes("VmRSS")
    start = time.perf_counter()
    with torch.device("meta"):
        model = KimiVL(model_args)
    pipeline = PipelineOptions("1f1b", 1, 8192, linear_cross_entropy_sum)
    parallel = parallelize(model, dims, groups, "cpu", seed=0, pipeline=pipeline)
    seconds = time.perf_counter() - start
    growth = status_bytes("VmHWM") - rss_before
    shard_bytes = sum(p.numel() * p.element_size() for p in parallel.model.parameters())
    assert all(p.device.type == "cpu" for p in parallel.model.parameters())
    print(json.dumps({
        "flavor": args.flavor, "world": args.world, "ep": args.ep, "pp": args.pp,
        "shard_param_gib": round(shard_bytes / 2**30, 3), "full_model_param_gib": round(full_bytes / 2**30, 3),
        "peak_rss_growth_gib": round(growth / 2**30, 3),
        "init_peak_rss_vs_shard": round(growth / shard_bytes, 4),
        "full_model_vs_shard": round(full_bytes / shard_bytes, 3),
        "seconds_to_build": round(seconds, 2),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
