"""The GPU tier (skipped without CUDA): the debug curriculum on GPUs equals the CPU run of the same recipe.

Both runs start from the same weights (initialization draws from CPU generators whatever the device,
model/init.py) and read the same batches; they differ only in kernels (fp32 matmuls and SDPA on CUDA; TF32 stays
off for fp32 matmuls, torch's default), Newton-Schulz in fp32 on both. Tolerances:

* the first step of the first stage (same weights, same batch): loss within 1e-4 relative;
* every logged step of every stage: loss within 2e-2 relative (the runs drift apart through the updates, and a
  token whose top-k experts are tied may route differently).

Run on a GPU node: ``python -m pytest tests/gpu -q`` (one GPU and, under torchrun, all local GPUs with NCCL).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.test_curriculum import STAGES, short_curriculum
from train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs a CUDA device")

REPO = Path(__file__).resolve().parents[2]
FIRST_STEP_TOLERANCE = 1e-4
STEP_TOLERANCE = 2e-2


def run(out: Path, demo_root: Path, device: str, nproc: int) -> dict[str, list[float]]:
    """Train the short debug curriculum on ``nproc`` processes of ``device``; the losses of every stage."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
               "train", *short_curriculum(out, demo_root, steps=4), f"runtime.device={device}",
               "optim.muon_ns_dtype=float32"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return {stage: [r["loss"] for r in read_metrics(out / "run" / stage / "metrics.jsonl")] for stage in STAGES}


def assert_close(gpu: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    first = STAGES[0]
    assert abs(gpu[first][0] - cpu[first][0]) <= FIRST_STEP_TOLERANCE * abs(cpu[first][0])
    for stage in STAGES:
        assert len(gpu[stage]) == len(cpu[stage]), stage
        for step, (g, c) in enumerate(zip(gpu[stage], cpu[stage], strict=True)):
            assert abs(g - c) <= STEP_TOLERANCE * abs(c), f"{stage} step {step + 1}: {g} on CUDA, {c} on the CPU"


def test_the_debug_curriculum_on_one_gpu_equals_the_cpu_run(demo_root, tmp_path):
    assert_close(run(tmp_path / "gpu", demo_root, "cuda", 1), run(tmp_path / "cpu", demo_root, "cpu", 1))


def test_the_debug_curriculum_on_every_local_gpu_with_nccl_equals_the_cpu_run(demo_root, tmp_path):
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip("needs at least 2 GPUs")
    assert_close(run(tmp_path / "gpu", demo_root, "cuda", gpus), run(tmp_path / "cpu", demo_root, "cpu", gpus))
