"""Inspecting a step costs the distance to its checkpoint, not the step's number: time to inspect step 1,000,000 ÷
time to inspect step 10 of a run on the demo corpus (goal: <= 1.5).

A short single-process run of ``joint_pretrain`` (declared 1,000,000 steps long, left after 10 with checkpoints at 5
and 10) gives the real checkpoint step 10 is inspected from. For step 1,000,000 a checkpoint at step 999,995 is
written whose loader state is step 5's with every counter scaled to that step (a stream position as deep as a real
run's there: late epochs of every source, large draw indices); ``metrics.jsonl`` gets a line for every step up to
there (about 0.4 GB, as a run that got there has). Both
inspections then draw 5 steps forward from their checkpoint. Prints one JSON line: ``inspect_step_10_s``,
``inspect_step_1000000_s``, ``inspect_latency_ratio``.

    python benchmarks/inspect_latency.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is not an installed package: run as a script, find its siblings

STAGE, STEPS, FAR = "joint_pretrain", 1_000_000, 999_995


def short_run(out: Path, demo: Path) -> Path:
    prefix = f"curriculum.stages.{STAGE}"
    command = [sys.executable, "-m", "train", "recipe=debug", f"output_dir={out}", "run_name=run", f"data.root={demo}",
               "log.progress_bar=false", f"curriculum.order=[{STAGE}]", f"{prefix}.init_from=scratch",
               f"{prefix}.steps={STEPS}", f"{prefix}.checkpoint_interval=5", "exit_after_steps=10",
               "checkpoint.keep_last=5"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out / "run"


def far_checkpoint(run_dir: Path) -> None:
    """A committed checkpoint at step FAR holding step 5's loader state with its counters scaled to FAR."""
    import torch.distributed.checkpoint as dcp

    from train.inspect import open_run, stage_loader
    from train.stages import checkpoints_of

    cfg = open_run(run_dir)
    manager = checkpoints_of(cfg, STAGE)
    loader = stage_loader(cfg, STAGE, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        manager.load(5, {"loader": loader})
        scale = FAR // 5
        for slot in loader.slots:
            slot.draws *= scale
            slot.source_draws = {name: count * scale for name, count in slot.source_draws.items()}
            slot.pending = None
        target = manager.path(FAR)
        dcp.save({"loader": loader}, checkpoint_id=str(target))
    (target / "checkpoint.json").write_text(json.dumps(manager.info(5)))
    loader.close()
    # A line per step up to STEPS, as a run that got there has (the real step 10's line, renumbered): finding a
    # step's layout and how far the run got must not read them all.
    metrics = run_dir / STAGE / "metrics.jsonl"
    template = json.dumps({**json.loads(metrics.read_text().splitlines()[-1]), "step": -1}).replace(
        '"step": -1', '"step": @STEP@')
    with metrics.open("a") as f:
        for start in range(11, STEPS + 1, 10_000):
            steps = range(start, min(start + 10_000, STEPS + 1))
            f.write("".join(template.replace("@STEP@", str(s)) + "\n" for s in steps))


def timed(run_dir: Path, step: int, repeats: int) -> float:
    from train.inspect import inspect_step

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        inspect_step(run_dir, STAGE, step)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from data.synthetic import generate_corpus

    work = Path(tempfile.mkdtemp(prefix="inspect-latency-"))
    try:
        generate_corpus(work / "demo", seed=0, scale=0.3)
        run_dir = short_run(work / "out", work / "demo")
        far_checkpoint(run_dir)
        near, far = timed(run_dir, 10, args.repeats), timed(run_dir, STEPS, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"inspect_step_10_s": round(near, 4), "inspect_step_1000000_s": round(far, 4),
                      "inspect_latency_ratio": round(far / near, 3)}))


if __name__ == "__main__":
    main()
