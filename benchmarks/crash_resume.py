"""Crash-proof resume: SIGKILL the debug curriculum at random moments (some during checkpoint writes), rerun the same
command each time, and compare the final parameters with an uninterrupted run's.

Prints one JSON line with ``kills``, ``kills_during_checkpoint_write``, ``resumes``, ``max_abs_param_diff`` (goal:
exactly 0 on CPU) and ``losses_identical``. The uninterrupted run is the baseline the killed one must equal: the
final parameters bit for bit (the same names, max abs diff 0) and every stage's logged ``(step, loss)`` pairs
identical, or it exits with status 1 after the JSON line (``benchmarks/_check.py``: one line on stderr, the run
directories kept). Its time is only reported.

``--async-save`` makes the killed run write its checkpoints in the background (the uninterrupted run saves
synchronously), so kills also strike while training goes on beside a write; ``--s3`` puts the killed run's
checkpoints on a real S3 server (moto's, in its own process), where a write in progress is a step prefix without
its ``.metadata``.

    python benchmarks/crash_resume.py [--kills 10 --nproc 2 --seed 0 --async-save --s3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is not an installed package: run as a script, find its siblings

from benchmarks._check import require, require_equal  # noqa: E402

STAGES = ["text_pretrain", "vit_coca", "vit_align", "joint_pretrain", "joint_cooldown", "long_ctx_32k",
          "long_ctx_128k"]


BUCKET = "crash-resume"


def command(out: Path, data: Path, nproc: int, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "train", "recipe=debug", f"output_dir={out}", "run_name=run", f"data.root={data}",
            "log.progress_bar=false", *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so a process-group kill
    would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once, as a node failure would."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


class CheckpointWatch:
    """Tells whether a checkpoint of the run is being written: a ``.tmp`` directory locally, a step prefix without
    ``.metadata`` on S3."""

    def __init__(self, run_dir: Path, s3_url: str = "", endpoint: str = ""):
        self.run_dir = run_dir
        self.storage = None
        if s3_url:
            from storage import S3Options, S3Storage

            self.storage = S3Storage(s3_url, S3Options(endpoint_url=endpoint))

    def writing(self) -> bool:
        if self.storage is None:
            return any(self.run_dir.glob("*/checkpoints/*.tmp"))
        steps: dict[str, set[str]] = {}
        for key in self.storage.list(""):
            prefix, _, name = key.rpartition("/")
            steps.setdefault(prefix, set()).add(name)
        return any(".metadata" not in names for names in steps.values())


def kill_at(process: subprocess.Popen, watch: CheckpointWatch, delay: float, during_write: bool) -> bool:
    """SIGKILL after ``delay`` seconds, or as soon as a checkpoint is being written; True if it was killed."""
    deadline = time.monotonic() + delay
    while process.poll() is None:
        writing = during_write and watch.writing()
        if writing or (not during_write and time.monotonic() >= deadline):
            kill_tree(process)
            return writing
        time.sleep(0.002 if watch.storage is None else 0.02)
    return False


def final_parameters(location: str, endpoint: str = "") -> dict[str, torch.Tensor]:
    """The model of the last stage's latest checkpoint under ``location`` (a directory or an S3 URL)."""
    from model.registry import FLAVORS, build_model
    from storage import S3Options
    from train.checkpoint import CheckpointManager, ModelState
    from train.checkpoint_store import open_checkpoint_store

    model = build_model(FLAVORS["debug"])
    checkpoints = CheckpointManager(open_checkpoint_store(location, S3Options(endpoint_url=endpoint)), keep_last=1)
    checkpoints.load(checkpoints.latest_step(), {"model": ModelState(model)})
    return model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--async-save", action="store_true", help="the killed run saves in the background")
    parser.add_argument("--s3", action="store_true", help="the killed run checkpoints to an S3 server")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="crash-resume-"))
    data = work / "data"
    from data.synthetic import generate_corpus

    generate_corpus(data, seed=0)
    server, endpoint, extra = None, "", []
    if args.s3:
        from benchmarks.s3_server import start_s3_server

        server, endpoint = start_s3_server(BUCKET)
        extra += [f"checkpoint.url=s3://{BUCKET}/ckpt", f"checkpoint.endpoint_url={endpoint}"]
    if args.async_save:
        extra.append("checkpoint.async_save=true")
    try:
        began = time.monotonic()
        straight = start(command(work / "straight", data, args.nproc), work / "logs" / "straight.log")
        if straight.wait() != 0:
            raise SystemExit(f"the uninterrupted run failed: see {work / 'logs'}")
        duration = time.monotonic() - began
        run_dir = work / "crashed" / "run"
        watch = CheckpointWatch(run_dir, f"s3://{BUCKET}/ckpt" if args.s3 else "", endpoint)
        kills = during_write = resumes = 0
        for attempt in range(args.kills):
            process = start(command(work / "crashed", data, args.nproc, *extra),
                            work / "logs" / f"attempt-{attempt}.log")
            resumes += attempt > 0
            # Every third kill waits for a checkpoint write; the others strike at a random moment, drawn so that
            # the kills spread over the whole curriculum instead of the run finishing before the last of them.
            targeted = attempt % 3 == 2
            hit_write = kill_at(process, watch, rng.uniform(2.0, max(3.0, 1.5 * duration / args.kills)), targeted)
            if process.returncode == 0:  # finished before the kill came
                break
            kills += 1
            during_write += hit_write
        final = start(command(work / "crashed", data, args.nproc, *extra), work / "logs" / "final.log")
        resumes += 1
        if final.wait() != 0:
            raise SystemExit(f"the resumed run failed: see {work / 'logs' / 'final.log'}")
        crashed_checkpoints = (f"s3://{BUCKET}/ckpt/run/{STAGES[-1]}" if args.s3
                               else str(run_dir / STAGES[-1] / "checkpoints"))
        expected = final_parameters(str(work / "straight" / "run" / STAGES[-1] / "checkpoints"))
        got = final_parameters(crashed_checkpoints, endpoint)
    finally:
        if server is not None:
            server.terminate()
    require_equal("parameter names, killed and resumed vs uninterrupted", sorted(got), sorted(expected))
    max_diff = max(float((expected[k].float() - got[k].float()).abs().max()) for k in expected)
    from train.metrics import read_metrics

    differing = [n for n in STAGES
                 if [(r["step"], r["loss"]) for r in read_metrics(work / "straight" / "run" / n / "metrics.jsonl")]
                 != [(r["step"], r["loss"]) for r in read_metrics(run_dir / n / "metrics.jsonl")]]
    print(json.dumps({"benchmark": "crash_resume", "nproc": args.nproc, "async_save": args.async_save,
                      "checkpoints_on": "s3" if args.s3 else "local", "kills": kills,
                      "kills_during_checkpoint_write": during_write, "resumes": resumes,
                      "uninterrupted_s": round(duration, 1), "max_abs_param_diff": max_diff,
                      "losses_identical": not differing, "stages_with_differing_metrics": differing}))
    if differing or max_diff != 0.0:
        print(f"kept for inspection: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    require_equal("final parameters, killed and resumed vs uninterrupted: max abs diff", max_diff, 0.0)
    require("metrics, killed and resumed vs uninterrupted", not differing,
            f"stages {differing} logged other (step, loss) pairs")


if __name__ == "__main__":
    main()
