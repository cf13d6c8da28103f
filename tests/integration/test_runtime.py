"""Runtime guards: a stop signal checkpoints and leaves cleanly; non-finite steps are skipped, then stop the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from config import load_config
from train.__main__ import main
from train.metrics import read_metrics
from train.trainer import RunLocked, Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parents[2]
STAGES = ["text_pretrain", "vit_coca", "vit_align", "joint_pretrain", "joint_cooldown", "long_ctx_32k",
          "long_ctx_128k"]


def overrides(out: Path, demo_root: Path, long_stage_steps: int = 2) -> list[str]:
    args = ["recipe=debug", f"output_dir={out}", "run_name=run", f"data.root={demo_root}", "log.progress_bar=false"]
    for name in STAGES:
        steps = 12 if name == "joint_pretrain" else long_stage_steps if name.startswith("long") else 2
        args += [f"curriculum.stages.{name}.steps={steps}", f"curriculum.stages.{name}.checkpoint_interval=0",
                 f"curriculum.stages.{name}.lr.warmup_steps=1"]
    return args


def test_sigterm_checkpoints_at_the_step_boundary_and_the_rerun_matches(demo_root, tmp_path):
    args = overrides(tmp_path / "signalled", demo_root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "signalled" / "run" / "joint_pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while len(read_metrics(metrics)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "received SIGTERM" in stderr
    stopped_at = read_metrics(metrics)[-1]["step"]
    assert 3 <= stopped_at < 12  # left mid-stage
    checkpoints = sorted((metrics.parent / "checkpoints").iterdir())
    assert checkpoints[-1].name == f"step-{stopped_at:08d}"
    assert not (tmp_path / "signalled" / "run" / "summary.json").exists()
    # Rerunning continues from there; the result equals an uninterrupted run.
    assert main(args) == 0
    assert main(overrides(tmp_path / "straight", demo_root)) == 0
    for name in STAGES:
        got = read_metrics(tmp_path / "signalled" / "run" / name / "metrics.jsonl")
        expected = read_metrics(tmp_path / "straight" / "run" / name / "metrics.jsonl")
        assert [r["loss"] for r in got] == [r["loss"] for r in expected], name


def test_a_warning_signal_during_start_up_is_not_fatal(demo_root, tmp_path):
    """SLURM's USR1 may come while the trainer is still importing torch: it is recorded from the first moment
    (train/signals.py), so the run leaves cleanly at its first step boundary instead of dying of the signal."""
    args = overrides(tmp_path / "early", demo_root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # well inside the imports (torch alone takes longer), well after the handlers
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "received SIGUSR1" in stderr
    assert not (tmp_path / "early" / "run" / "summary.json").exists()
    assert not (tmp_path / "early" / "run" / "vit_coca" / "DONE.json").exists()


def test_non_finite_steps_are_skipped_then_stop_the_run(demo_root, tmp_path):
    # vit_coca first, starting from the weights in memory (the string form of init_from), which are then broken.
    cfg = load_config([*overrides(tmp_path, demo_root), "max_nonfinite_steps=2", "curriculum.order=[vit_coca]",
                       "curriculum.stages.vit_coca.init_from=scratch", "curriculum.stages.vit_coca.steps=5"])
    trainer = Trainer(cfg)
    try:
        # Broken weights (as after a bad update or a corrupt import): every loss is NaN.
        with torch.no_grad():
            trainer.model.vision.pos_table.fill_(float("nan"))
        before = {k: v.clone() for k, v in trainer.model.coca.state_dict().items()}
        with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row.*last good checkpoint"):
            trainer.run()
    finally:
        trainer.close()
        torch.distributed.destroy_process_group()
    after = trainer.model.coca.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped steps change nothing
    records = read_metrics(tmp_path / "run" / "vit_coca" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [1]  # the second skip raised before its line was written


def test_a_second_trainer_on_the_same_run_is_refused(demo_root, tmp_path):
    cfg = load_config(overrides(tmp_path, demo_root))
    first = Trainer(cfg)
    try:
        with pytest.raises(RunLocked, match="another process is training"):
            Trainer(cfg)
    finally:
        first.close()
        torch.distributed.destroy_process_group()


def test_wandb_logs_offline_into_the_run(demo_root, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [*overrides(tmp_path, demo_root), "log.wandb=true", "curriculum.order=[vit_coca,vit_align]"]
    assert main(args) == 0
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the offline event log, ready for `wandb sync`
