"""bf16 training against fp32: the debug curriculum's loss curves, and the real model's per-rank memory.

Runs ``python -m train recipe=debug`` twice, fp32 (the baseline) and with ``precision.param_dtype=bfloat16`` (fp32
reduction, masters and optimizer state), on the same data, and prints one JSON line:

* ``max_stage_mean_rel_loss_delta``: per stage, the mean over steps of ``|loss_bf16 - loss_fp32| / loss_fp32``;
  the worst stage (goal <= 0.02);
* ``final_rel_loss_delta``: the same at each stage's last step, worst stage (goal <= 0.03);
* ``step_time_ratio_bf16_vs_fp32``: median step time, bf16 / fp32, on this machine (informational);
* ``bf16_memory_ratio``: the dry run's per-rank peak of ``kimi_vl_a3b`` at its 256 ranks with bf16 parameters
  (fp32 reduction, masters and state) / with fp32 parameters, worst stage (goal <= 0.65), with the breakdown.

Before comparing, it checks that the two runs trained on the same data: every step's token count is equal, and the
first step's loss (the same weights, rounded to bf16) agrees within 1%. Otherwise it exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(output_dir: Path, overrides: list[str]) -> dict[str, list[dict]]:
    """Run the debug curriculum; each stage's metrics records, in order."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    command = [sys.executable, "-m", "train", "recipe=debug", f"output_dir={output_dir}", "log.progress_bar=false",
               *overrides]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"training failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    run = output_dir / "debug"
    order = json.loads((run / "summary.json").read_text())
    return {stage: [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
            for stage in order}


def loss_deltas(fp32: dict[str, list[dict]], bf16: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per stage: mean and final relative loss delta; exits if the runs did not see the same data."""
    deltas = {}
    for stage, reference in fp32.items():
        ours = bf16[stage]
        if [r["tokens"] for r in ours] != [r["tokens"] for r in reference]:
            sys.exit(f"{stage}: the bf16 and fp32 runs trained on different batches (token counts differ)")
        if abs(ours[0]["loss"] - reference[0]["loss"]) > 0.01 * reference[0]["loss"]:
            sys.exit(f"{stage}: first-step losses {ours[0]['loss']} vs {reference[0]['loss']} differ by more than "
                     "1%: not the same model and data")
        relative = [abs(o["loss"] - r["loss"]) / r["loss"] for o, r in zip(ours, reference, strict=True)]
        deltas[stage] = {"mean": statistics.fmean(relative), "final": relative[-1]}
    return deltas


def memory_ratio(recipe_overrides: list[str]) -> dict:
    """The dry run's per-rank peaks of ``kimi_vl_a3b`` in bf16 and in fp32 parameters, worst stage."""
    import torch

    from config import load_config
    from train.dry_run import predict

    def peaks(param_dtype: str):
        cfg = load_config(["recipe=kimi_vl_a3b", "moonlight_dir=/unused", f"precision.param_dtype={param_dtype}",
                           "precision.reduce_dtype=float32", "precision.optimizer_state_dtype=float32",
                           *recipe_overrides])
        return {(r.stage, r.pp_rank): r for r in predict(cfg)}

    torch.set_num_threads(1)
    fp32, bf16 = peaks("float32"), peaks("bfloat16")
    ratios = {key: bf16[key].peak / fp32[key].peak for key in fp32}
    worst = max(ratios, key=ratios.get)
    gib = 2**30

    def breakdown(r) -> dict:
        return {"params": round(r.params / gib, 2), "grads": round(r.grads / gib, 2),
                "grad_shards": round(r.grad_shards / gib, 2), "masters": round(r.masters / gib, 2),
                "optimizer": round(r.optimizer / gib, 2),
                "activations": round(r.activations / gib, 2), "step_buffers": round(r.step_buffers / gib, 2),
                "peak": round(r.peak / gib, 2)}

    return {"bf16_memory_ratio": round(ratios[worst], 4), "worst_stage": worst[0],
            "bf16_gib": breakdown(bf16[worst]), "fp32_gib": breakdown(fp32[worst])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="extra overrides of both training runs (e.g. shorter stages)")
    parser.add_argument("--memory-only", action="store_true", help="only the dry-run memory ratio")
    args = parser.parse_args()
    result = {"benchmark": "precision_parity"}
    if not args.memory_only:
        with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
            from data.synthetic import generate_corpus

            generate_corpus(Path(tmp) / "demo", seed=0)  # the debug recipe's demo corpus, made once for both runs
            both = [f"data.root={Path(tmp) / 'demo'}", *args.overrides]
            fp32 = train(Path(tmp) / "fp32", both)
            bf16 = train(Path(tmp) / "bf16", ["precision.param_dtype=bfloat16", *both])
        deltas = loss_deltas(fp32, bf16)
        step_time = {name: statistics.median(r["step_time_s"] for stage in run.values() for r in stage)
                     for name, run in (("fp32", fp32), ("bf16", bf16))}
        result |= {
            "max_stage_mean_rel_loss_delta": round(max(d["mean"] for d in deltas.values()), 5),
            "final_rel_loss_delta": round(max(d["final"] for d in deltas.values()), 5),
            "step_time_ratio_bf16_vs_fp32": round(step_time["bf16"] / step_time["fp32"], 3),
            "per_stage": {stage: {k: round(v, 5) for k, v in d.items()} for stage, d in deltas.items()},
        }
    result |= memory_ratio([])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
