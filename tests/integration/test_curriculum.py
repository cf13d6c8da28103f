"""The debug curriculum end to end through the real entry point: outputs, freezing, hand-off, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from config import load_config
from model.registry import FLAVORS, build_model
from train.__main__ import main
from train.checkpoint import ModelState, load_checkpoint
from train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
STAGES = ["text_pretrain", "vit_coca", "vit_align", "joint_pretrain", "joint_cooldown", "long_ctx_32k",
          "long_ctx_128k"]
FROZEN = {  # parts each stage must leave untouched
    "text_pretrain": ["vision", "projector", "coca"],
    "vit_coca": ["projector", "decoder"],
    "vit_align": ["decoder"],
    "joint_pretrain": ["coca"],
    "joint_cooldown": ["coca"],
    "long_ctx_32k": ["coca"],
    "long_ctx_128k": ["coca"],
}
METRIC_KEYS = {"stage", "step", "loss", "lr", "tokens", "grad_norm", "step_time_s", "tokens_per_s"}
DROPPED = {"vit_align": ["coca"]}  # init_from: drop -> the seeded values, whatever the previous stage left
LOSS_PARTS = {"vit_coca": {"siglip_loss", "caption_loss"}, "joint_pretrain": {"lm_loss"}}


def short_curriculum(out: Path, demo_root: Path, steps: int = 2, interval: int = 0) -> list[str]:
    overrides = ["recipe=debug", f"output_dir={out}", "run_name=run", f"data.root={demo_root}",
                 "log.progress_bar=false"]
    for name in STAGES:
        overrides.append(f"curriculum.stages.{name}.steps={steps}")
        overrides.append(f"curriculum.stages.{name}.checkpoint_interval={interval}")
        overrides.append(f"curriculum.stages.{name}.lr.warmup_steps=1")
    return overrides


def final_model_state(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    checkpoints = sorted((run_dir / stage / "checkpoints").iterdir())
    model = build_model(FLAVORS["debug"])
    load_checkpoint(checkpoints[-1], {"model": ModelState(model)})
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def torchrun_run(demo_root, tmp_path_factory):
    """The debug curriculum, 2 steps per stage, on 2 data-parallel processes through torchrun."""
    out = tmp_path_factory.mktemp("outputs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # float32 Newton-Schulz: the comparison with one process below is then limited by summation order only.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
               *short_curriculum(out, demo_root), "optim.muon_ns_dtype=float32"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out / "run", done.stdout


def test_outputs_of_a_full_run(torchrun_run):
    run_dir, stdout = torchrun_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary) == STAGES
    for name in STAGES:
        assert summary[name]["steps"] == 2
        assert summary[name]["tokens"] > 0
        assert summary[name]["first_loss"] > 0 and summary[name]["last_loss"] > 0
        records = read_metrics(run_dir / name / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2]
        for record in records:
            assert METRIC_KEYS <= set(record)
            assert LOSS_PARTS.get(name, {"lm_loss"}) <= set(record)
            assert record["stage"] == name
        assert (run_dir / name / "DONE.json").exists()
        checkpoint = run_dir / name / "checkpoints" / "step-00000002"
        assert (checkpoint / ".metadata").exists()
        assert (run_dir / name / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert all(0 < r["mfu"] < 1 and r["model_tflops_per_s"] > 0 for r in records)
    assert "long_ctx_128k" in stdout and "outputs:" in stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["recipe"] == "debug" and saved["curriculum"]["stages"]["vit_coca"]["steps"] == 2


def test_frozen_parts_are_bit_identical_and_trained_parts_change(torchrun_run):
    run_dir, _ = torchrun_run
    # The run's initialization (seed 0) is the single-process one, parameter by parameter, at any layout.
    seeded = {k: v.clone() for k, v in build_model(FLAVORS["debug"], seed=0).state_dict().items()}
    before = dict(seeded)
    for name in STAGES:
        after = final_model_state(run_dir, name)
        for part in ("vision", "projector", "decoder", "coca"):
            keys = [k for k in after if k.startswith(part + ".") and after[k].is_floating_point()]
            same = all(torch.equal(before[k], after[k]) for k in keys)
            if part in DROPPED.get(name, ()):
                assert all(torch.equal(seeded[k], after[k]) for k in keys), f"{name} kept dropped {part}"
            elif part in FROZEN[name]:
                assert same, f"{name} changed frozen {part}"
            else:
                assert not same, f"{name} did not train {part}"
        before = after


def test_two_data_parallel_ranks_equal_one_process_on_the_same_global_batch(torchrun_run, demo_root, tmp_path):
    """dp=2 with m rows per rank and one process with 2m rows see the same global batches (the loader's slots) and
    must follow the same trajectory: losses and final parameters, every stage (SigLIP negatives span ranks)."""
    run_dir, _ = torchrun_run
    per_rank = load_config(["recipe=debug"]).curriculum.stages
    doubled = [f"curriculum.stages.{n}.micro_batch_size={2 * per_rank[n].micro_batch_size}" for n in STAGES]
    assert main([*short_curriculum(tmp_path, demo_root), "optim.muon_ns_dtype=float32", *doubled]) == 0
    for name in STAGES:
        two = read_metrics(run_dir / name / "metrics.jsonl")
        one = read_metrics(tmp_path / "run" / name / "metrics.jsonl")
        assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
        for a, b in zip(two, one):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
    dp2, single = final_model_state(run_dir, STAGES[-1]), final_model_state(tmp_path / "run", STAGES[-1])
    errors = {key: float((dp2[key] - single[key]).norm() / single[key].norm().clamp(min=1e-12))
              for key in dp2 if dp2[key].is_floating_point()}
    worst = max(errors, key=errors.get)
    # Summation order differs between one and two processes (~1e-7); AdamW then amplifies it only where the true
    # gradient is ~0 (attention key biases, to which softmax is invariant): those reach ~1.4e-4, the rest ~2e-5.
    assert errors[worst] <= 5e-4, f"{worst}: relative error {errors[worst]:.2e}"
    # Measured 2e-5 to 1.1e-4 over two data streams (the grouped expert GEMM blocks rows differently for different
    # row counts; how much AdamW amplifies that depends on the data).
    top = sorted(errors, key=errors.get)[-3:]
    assert errors[top[0]] <= 2e-4, {key: f"{errors[key]:.2e}" for key in top}


def test_rerun_of_a_finished_run_trains_nothing(demo_root, tmp_path):
    args = short_curriculum(tmp_path, demo_root, steps=1)
    assert main(args) == 0
    metrics = {n: (tmp_path / "run" / n / "metrics.jsonl").read_text() for n in STAGES}
    assert main(args) == 0
    assert metrics == {n: (tmp_path / "run" / n / "metrics.jsonl").read_text() for n in STAGES}


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_resume_equals_an_uninterrupted_run(demo_root, tmp_path, param_dtype):
    """Bit-exact, in fp32 and in bf16 (fp32 masters, reduction and state: the masters are in the checkpoints)."""
    # bf16 with two micro-batches in a language and a CoCa stage: the sharded accumulation between them.
    precision = [f"precision.param_dtype={param_dtype}"] + ([] if param_dtype == "float32" else [
        "curriculum.stages.joint_pretrain.grad_accum_steps=2", "curriculum.stages.vit_coca.grad_accum_steps=2"])
    straight = [*short_curriculum(tmp_path / "a", demo_root, steps=3, interval=2), *precision]
    assert main(straight) == 0
    resumed = [*short_curriculum(tmp_path / "b", demo_root, steps=3, interval=2), *precision]
    invocations = 0
    while not (tmp_path / "b" / "run" / "summary.json").exists():
        # Leaves after 2 steps each time: mid-stage and exactly at stage boundaries.
        assert main([*resumed, "exit_after_steps=2"]) == 0
        invocations += 1
        assert invocations <= 12
    assert invocations == 11  # 7 stages x 3 steps, 2 steps per invocation
    for name in STAGES:
        expected = read_metrics(tmp_path / "a" / "run" / name / "metrics.jsonl")
        got = read_metrics(tmp_path / "b" / "run" / name / "metrics.jsonl")
        assert [r["step"] for r in got] == [1, 2, 3]
        for a, b in zip(expected, got):
            assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["tokens"] == b["tokens"]
    a_final = final_model_state(tmp_path / "a" / "run", "long_ctx_128k")
    b_final = final_model_state(tmp_path / "b" / "run", "long_ctx_128k")
    assert all(torch.equal(a_final[k], b_final[k]) for k in a_final)
