"""Run a function on N gloo ranks forked from this (already imported) process, for tests and benchmarks: the ranks
start in well under a second, where a torchrun launch imports everything again in every process."""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _entry(fn: Callable, rank: int, world: int, workdir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    code = 0
    try:
        store = dist.FileStore(os.path.join(workdir, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(workdir, f"result_{rank}.pt"))
    except BaseException:  # report any failure of the rank to the parent
        Path(workdir, f"error_{rank}.txt").write_text(traceback.format_exc())
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(code)  # skip the parent's atexit handlers (pytest's) in the child


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` forked gloo ranks; returns each rank's result (via torch.save)."""
    workdir = tempfile.mkdtemp(prefix="ranks-")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_entry, args=(fn, rank, world, workdir, args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    # One deadline for all ranks: a hung collective must fail the caller within ``timeout``, not world x timeout.
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    errors = [Path(workdir, f"error_{r}.txt") for r in range(world)]
    messages = [f"rank {r}:\n{e.read_text()}" for r, e in enumerate(errors) if e.exists()]
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    if messages or hung:
        raise RuntimeError("\n".join(messages) + (f"\nranks {hung} did not finish in {timeout}s" if hung else ""))
    return [torch.load(os.path.join(workdir, f"result_{r}.pt"), weights_only=False) for r in range(world)]
