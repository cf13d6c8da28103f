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

The ratios compare the shard with the whole model, so the shard is checked to be the whole model's slice before any
figure is printed (``benchmarks/_check.py``: one line on stderr and exit status 1 otherwise): every parameter it
holds exists in the whole model (built on ``meta``) with the same dtype and shape, routed-expert tensors holding
``1 / ep`` of the experts (without a pipeline, no parameter is missing); and its values equal, bit for bit, those the
whole model's single-process initialization gives the same parameters, for as many parameters as fit
:data:`VALUE_CHECK_ELEMENTS` (the first routed-expert tensor first, sliced to this rank's experts, then the others by
name; the parameters whose values are compared are reported as ``values_checked``).

    python benchmarks/init_memory.py [--flavor kimi_vl_a3b --world 8 --ep 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore

from config import ParallelConfig
from model.init import ParamInit
from model.moe import GroupedExperts
from model.registry import FLAVORS
from model.vlm import KimiVL
from parallel.dims import ParallelDims
from parallel.parallelize import PipelineOptions, parallelize
from train.loss import linear_cross_entropy_by_group

try:
    from benchmarks._check import require, require_equal
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from _check import require, require_equal

# Elements (fp32) of the whole model materialized to compare the shard's values with: 1 GiB, one routed-expert
# tensor of kimi_vl_a3b (0.7 GiB) and the smaller parameters after it.
VALUE_CHECK_ELEMENTS = 1 << 28


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset the high-water mark of resident memory to the current resident size (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def check_shard(shard: nn.Module, args, ep: int, rank: int, pp: int, seed: int) -> int:
    """The shard must be the whole model's slice (see the module docstring); returns the parameters compared by value.

    Args:
        shard: This rank's model after ``parallelize``.
        args: The flavor's model arguments.
        ep: Expert-parallel degree; rank: this rank's index in its expert group; pp: pipeline degree.
        seed: The seed ``parallelize`` initialized with.
    """
    with torch.device("meta"):
        whole = KimiVL(args)
    whole_params = dict(whole.named_parameters())
    experts = {f"{module_name}.{name}" for module_name, module in whole.named_modules()
               if isinstance(module, GroupedExperts) for name, _ in module.named_parameters()}
    held = dict(shard.named_parameters())
    unknown = sorted(set(held) - set(whole_params))
    require("shard parameter names", not unknown, f"not in the whole model: {unknown[:3]}")
    if pp == 1:
        missing = sorted(set(whole_params) - set(held))
        require("shard parameter names", not missing, f"missing from the shard: {missing[:3]}")
    for name, param in held.items():
        whole_shape = tuple(whole_params[name].shape)
        expected = (whole_shape[0] // ep, *whole_shape[1:]) if name in experts else whole_shape
        require_equal(f"shape of {name}", tuple(param.shape), expected)
        require_equal(f"dtype of {name}", param.dtype, whole_params[name].dtype)
    # Materialize a budget of the whole model's parameters and initialize it as one process does (meta skipped).
    chosen, budget = [], VALUE_CHECK_ELEMENTS
    for name in sorted(held, key=lambda n: (n not in experts, n)):
        if whole_params[name].numel() <= budget:
            chosen.append(name)
            budget -= whole_params[name].numel()
    for name in chosen:
        module_name, _, leaf = name.rpartition(".")
        module = whole.get_submodule(module_name)
        module._parameters[leaf] = nn.Parameter(torch.empty(whole_params[name].shape), requires_grad=False)
    whole.init_weights(ParamInit(seed))
    for name in chosen:
        value = whole.get_parameter(name)
        if name in experts:
            local = held[name].shape[0]
            value = value[rank * local:(rank + 1) * local]
        require_equal(f"values of {name}, shard vs whole model", held[name].detach(), value.detach())
    return len(chosen)


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
    pipeline = PipelineOptions("1f1b", 1, 8192, linear_cross_entropy_by_group)
    parallel = parallelize(model, dims, groups, "cpu", seed=0, pipeline=pipeline)
    seconds = time.perf_counter() - start
    growth = status_bytes("VmHWM") - rss_before
    shard_bytes = sum(p.numel() * p.element_size() for p in parallel.model.parameters())
    assert all(p.device.type == "cpu" for p in parallel.model.parameters())
    checked = check_shard(parallel.model, model_args, args.ep, dist.get_rank() % args.ep, args.pp, seed=0)
    print(json.dumps({
        "flavor": args.flavor, "world": args.world, "ep": args.ep, "pp": args.pp,
        "shard_param_gib": round(shard_bytes / 2**30, 3), "full_model_param_gib": round(full_bytes / 2**30, 3),
        "peak_rss_growth_gib": round(growth / 2**30, 3),
        "init_peak_rss_vs_shard": round(growth / shard_bytes, 4),
        "full_model_vs_shard": round(full_bytes / shard_bytes, 3),
        "seconds_to_build": round(seconds, 2),
        "values_checked": f"{checked} of {sum(1 for _ in parallel.model.parameters())} parameters",
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
