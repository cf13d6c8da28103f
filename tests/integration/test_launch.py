"""Launchers: the SLURM batch script under fake ``srun``/``scontrol`` (real torchrun, real training, real signals),
and the submitit submitter with its local executor."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STEPS = 10

# srun: log the call, drop its options and become the command (so signals sent to "srun" reach torchrun, as a real
# srun forwards them to its tasks). scontrol: log the call; `show hostnames` prints the one node.
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [ "$1" = show ] && [ "$2" = hostnames ]; then echo localhost; fi
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_overrides(out: Path, demo_root: Path, steps: int = STEPS) -> list[str]:
    """One short stage of the debug recipe from scratch (a checkpoint only at the end or when leaving)."""
    stage = "curriculum.stages.joint_pretrain"
    return ["recipe=debug", f"output_dir={out}", "run_name=run", f"data.root={demo_root}", "log.progress_bar=false",
            "log.peak_tflops=1", "curriculum.order=[joint_pretrain]", f"{stage}.init_from=scratch",
            f"{stage}.steps={steps}", f"{stage}.checkpoint_interval=0", f"{stage}.lr.warmup_steps=1"]


def wait_for_steps(metrics: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(metrics)) < count:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no training step in time"
        time.sleep(0.1)


@pytest.fixture
def fake_slurm(tmp_path):
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (shims / name).write_text(body)
        (shims / name).chmod((shims / name).stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{shims}:{VENV_BIN}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log),
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node-a", "GPUS_PER_NODE": "2",
           "MASTER_PORT": str(free_port()), "REPO": str(REPO), "OMP_NUM_THREADS": "1"}
    return env, log


def test_sbatch_script_trains_checkpoints_on_usr1_requeues_and_the_rerun_resumes(fake_slurm, demo_root, tmp_path):
    env, log = fake_slurm
    script = REPO / "launch" / "slurm" / "train.sbatch"
    args = train_overrides(tmp_path / "out", demo_root)
    metrics = tmp_path / "out" / "run" / "joint_pretrain" / "metrics.jsonl"
    batch = subprocess.Popen(["bash", str(script), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for_steps(metrics, 1, batch)
    batch.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@300` does before the time limit
    _, stderr = batch.communicate(timeout=120)
    assert batch.returncode == 0, stderr[-3000:]
    calls = log.read_text().splitlines()
    srun = next(c for c in calls if c.startswith("srun "))
    port = env["MASTER_PORT"]
    for part in ("--nodes=1", "--ntasks-per-node=1", "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint=localhost:{port}", "--rdzv_id=4242", "SIGUSR1", "-m train recipe=debug"):
        assert part in srun, (part, srun)
    assert "scontrol show hostnames node-a" in calls
    assert calls[-1] == "scontrol requeue 4242"
    stopped = read_metrics(metrics)[-1]["step"]
    assert 1 <= stopped < STEPS
    checkpoints = sorted(p.name for p in (metrics.parent / "checkpoints").iterdir())
    assert checkpoints == [f"step-{stopped:08d}"]
    assert "received SIGUSR1" in stderr and not (metrics.parent / "DONE.json").exists()

    # The requeued job: same script and arguments; it resumes and finishes without asking for another requeue.
    log.write_text("")
    rerun = subprocess.run(["bash", str(script), *args], env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {stopped}" in rerun.stderr
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, STEPS + 1))
    assert (metrics.parent / "DONE.json").exists()
    assert not any("requeue" in c for c in log.read_text().splitlines())


def submitit_task_pid(root: int) -> int:
    """The process running the submitted function: a descendant of the local job's controller."""
    pending = [root]
    while pending:
        pid = pending.pop()
        if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
        pending += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    raise AssertionError("no submitit task process under the local job")


def test_submit_command_matches_the_sbatch_job(fake_slurm, monkeypatch):
    from submitit.slurm.slurm import _make_sbatch_string

    from launch.submit import build_executor, torchrun_command

    assert torchrun_command(["recipe=kimi_vl_a3b", "run_name=a"], 4, 8, "node-a", 29500, "77", 240) == [
        "torchrun", "--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=node-a:29500",
        "--rdzv_id=77", "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown_timeout=240",
        "-m", "train", "recipe=kimi_vl_a3b", "run_name=a"]
    sbatch = (REPO / "launch" / "slurm" / "train.sbatch").read_text()
    assert "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in sbatch
    # The SLURM job submitit would submit (the fake srun on PATH lets its executor build here).
    monkeypatch.setenv("PATH", fake_slurm[0]["PATH"])
    executor = build_executor("slurm", "/tmp/jobs", nodes=4, gpus_per_node=8, time_min=1440, partition="gpu")
    script = _make_sbatch_string(command="python -m submitit.core._submit X", folder="/tmp/jobs",
                                 **executor._executor.parameters)
    for line in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--time=1440",
                 "--signal=USR2@300"):
        assert f"#SBATCH {line}\n" in script, line


def test_submitit_local_job_is_preempted_checkpoints_requeues_and_finishes(demo_root, tmp_path, monkeypatch):
    """submitit's local executor runs the job (torchrun, 2 processes); its preemption signal makes the trainer
    checkpoint, submitit requeues, and the requeued job resumes and completes the stage."""
    from launch.submit import TrainJob, build_executor

    monkeypatch.chdir(REPO)  # the job process unpickles launch.submit.TrainJob from here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    steps = 6
    executor = build_executor("local", str(tmp_path / "submitit"), 1, 2, time_min=10)
    job = executor.submit(TrainJob(train_overrides(tmp_path / "out", demo_root, steps), 2, port=free_port(),
                                   shutdown_timeout=60))
    metrics = tmp_path / "out" / "run" / "joint_pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while len(read_metrics(metrics)) < 1:
        assert not job.done(), job.stderr()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The preemption signal, sent to the task process as SLURM does (submitit's local controller does not forward
    # one it receives itself).
    os.kill(submitit_task_pid(job._process.pid), signal.SIGUSR2)
    assert job.result() == 0
    log = job.stderr()
    assert "received SIGUSR1" in log and "resumed from step" in log, log[-3000:]
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, steps + 1))
    assert (metrics.parent / "DONE.json").exists()
