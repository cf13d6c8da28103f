"""The dry run's peak against the measured peak of real training steps.

Each configuration trains one real ``joint_pretrain`` step (``--seq`` tokens per row, images and text, the
``small`` flavor with ``--layers`` decoder layers) on forked gloo ranks: a layout (1 rank, dp2, dp2 x ep2, cp2),
an activation checkpointing policy (none, selective, full) and 1 or 2 micro-batches. Every rank measures its peak
tensor bytes over the whole step (forward and backward of every micro-batch, the fused loss, then the ZeRO-1
optimizer step: reduce-scatter, gradient norm, updates, all-gather) with torch's ``MemTracker``
(parallel/memory.py ``measure_peak_bytes``), weights, optimizer state and the batch included. The dry run
(train/dry_run.py ``predict``) is asked for the same configuration and layout, and each rank's measured peak is
compared with the prediction for its pipeline stage.

The dry run plans a stage's image patches from its mixture (a bound: every multimodal token an image token); a
drawn batch holds fewer (captions, interleaved text). Each rank is therefore compared with the prediction given its
batch's measured image-token share, the one input the dry run cannot know; the mixture-bound prediction is printed
beside it. Prints one JSON line per configuration (predicted and measured peaks in GiB, relative error) and a last
line with ``max_peak_rel_error`` = worst |predicted - measured| / measured over every rank of every configuration
(goal <= 0.10) and ``max_mixture_bound_excess``, the worst (bound - measured) / measured.

Before a configuration's figures are printed, the dry run is checked to describe the step the ranks ran
(``benchmarks/_check.py``: one line on stderr and exit status 1 otherwise): each rank's step held ``--seq`` tokens
per micro-batch, and the dry run's parameter and gradient bytes equal the trainer's on every rank and its
optimizer-state bytes the largest rank's, exactly (the static part of the peak; only the activations and step
buffers are estimated). Recorded measurements without these figures (``--measured`` files of earlier versions)
are measured again.

    python benchmarks/dry_run_accuracy.py [--seq 4096 --layers 4 --layouts 1rank,dp2,dp2_ep2,cp2
                                           --policies none,selective,full --micro-batches 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from config import load_config
from parallel.memory import measure_peak_bytes

# tests/ is not installed: the forked-rank runner comes from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.forked import run_ranks  # noqa: E402

try:
    from benchmarks._check import require_equal
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from _check import require_equal

GIB = 1024**3
STAGE = "curriculum.stages.joint_pretrain"
LAYOUTS = {
    "1rank": dict(world=1),
    "dp2": dict(world=2),
    "dp2_ep2": dict(world=2, ep_degree=2),
    "cp2": dict(world=2, cp_degree=2),
    # bf16 parameters, fp32 reduction (micro-batches accumulated sharded), masters and state
    "dp2_bf16": dict(world=2, precision={"param_dtype": "bfloat16"}),
    "dp2_ep2_bf16": dict(world=2, ep_degree=2, precision={"param_dtype": "bfloat16"}),
}


def overrides(root: Path, out: Path, layout: str, policy: str, micro_batches: int, seq: int, layers: int,
              image_patches: int) -> list[str]:
    """The run configuration of one measured configuration (the dry run reads the same one)."""
    spec = dict(LAYOUTS[layout])
    spec.pop("world")
    args = ["recipe=debug", "model=small", f"model.decoder.num_layers={layers}", f"output_dir={out}",
            "run_name=run", f"data.root={root}", "log.progress_bar=false", "log.peak_tflops=1",
            "curriculum.order=[joint_pretrain]", f"{STAGE}.init_from=scratch", f"{STAGE}.steps=1",
            f"{STAGE}.lr.warmup_steps=0", f"{STAGE}.checkpoint_interval=0", f"{STAGE}.seq_len={seq}",
            f"{STAGE}.micro_batch_size=1", f"{STAGE}.grad_accum_steps={micro_batches}",
            f"{STAGE}.max_image_patches={image_patches}",
            # a constant multimodal share: the dry run plans for the stage's largest, the step draws at its start
            f"{STAGE}.mixture.multimodal_share_start=0.5", f"{STAGE}.mixture.multimodal_share_end=0.5",
            f"parallel.activation_checkpoint={policy}"]
    precision = spec.pop("precision", {})
    return (args + [f"parallel.{key}={value}" for key, value in spec.items()]
            + [f"precision.{key}={value}" for key, value in precision.items()])


def measure_rank(rank: int, world: int, args: list[str]) -> dict:
    """This rank's peak tensor bytes over one whole training step (see the module docstring)."""
    from data.loader import StageLoader
    from train.builders import build_optimizer
    from train.device_feed import DeviceFeed
    from train.stages import apply_stage
    from train.trainer import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    cfg = load_config(args)
    trainer = Trainer(cfg)
    name = cfg.curriculum.order[0]
    stage = cfg.curriculum.stages[name]
    # What Trainer.run_stage does before its loop; the step below is Trainer.train_step's model and optimizer work.
    apply_stage(trainer.model, stage)
    trainer._enter_stage_layout(stage)
    optimizer = build_optimizer(trainer.model, cfg.optim, stage.lr.peak_lr, trainer.groups, cfg.precision,
                                pipelined=trainer.parallel.pipeline is not None)
    loader = StageLoader(name, stage, cfg.data, trainer.storage, trainer.tokenizer, cfg.model.vision, cfg.seed,
                         trainer._data_shard(stage))
    feed = DeviceFeed(loader, stage.objective, stage.grad_accum_steps, trainer.device)
    batches = feed.next_step(0.0)

    def step() -> None:
        optimizer.zero_grad()
        result = trainer.forward_backward(stage, batches, optimizer)
        result.to_host()
        optimizer.step(max_grad_norm=cfg.optim.grad_clip_norm)

    inputs = [t for batch in batches for t in vars(batch).values() if isinstance(t, torch.Tensor)]
    state = [t for unit_state in optimizer.state.values() for t in unit_state.values()]
    state += list(optimizer.master.values())
    start = time.perf_counter()
    peak = measure_peak_bytes(step, trainer.model, *state, *inputs)
    seconds = time.perf_counter() - start
    image_tokens = sum(int(b.image_token_positions.numel()) for b in batches if b.image_token_positions is not None)
    tokens = sum(int(b.input_ids.numel()) for b in batches)
    params = list(trainer.model.parameters())
    static = {"param_bytes": sum(p.numel() * p.element_size() for p in params),
              "grad_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
              "optimizer_bytes": optimizer.state_bytes(), "master_bytes": optimizer.master_bytes()}
    loader.close()
    trainer.close()
    return {"peak": peak, "image_tokens": image_tokens, "tokens": tokens, "step_s": seconds, **static}


def predicted_ranks(args: list[str], world: int, image_token_share: float | None = None) -> list:
    """The dry run's ``RankMemory`` per pipeline stage for this configuration at ``world`` ranks, with the
    image-token share of the mixture's bound (None) or of the measured batch."""
    from train.dry_run import predict

    cfg = load_config([*args, "dry_run=true", f"world_size={world}"])
    return predict(cfg, image_token_share)


def predicted_peaks(args: list[str], world: int, image_token_share: float | None = None) -> list[int]:
    """The dry run's peak per pipeline stage (see :func:`predicted_ranks`)."""
    return [r.peak for r in predicted_ranks(args, world, image_token_share)]


def check_same_step(key: str, prediction, measured: list[dict], seq: int, micro_batches: int) -> None:
    """The dry run must describe the step the ranks ran (see the module docstring): the same tokens, and, exactly,
    the same parameter, gradient and optimizer-state bytes (its optimizer state is the largest rank's share)."""
    for rank, figures in enumerate(measured):
        require_equal(f"{key} rank {rank} tokens in the step", figures["tokens"], seq * micro_batches)
        require_equal(f"{key} rank {rank} parameter bytes, dry run vs trainer", prediction.params,
                      figures["param_bytes"])
        require_equal(f"{key} rank {rank} gradient bytes, dry run vs trainer", prediction.grads,
                      figures["grad_bytes"])
    require_equal(f"{key} optimizer-state bytes, dry run vs the largest rank's", prediction.optimizer,
                  max(figures["optimizer_bytes"] for figures in measured))
    require_equal(f"{key} master-weight bytes, dry run vs the largest rank's", prediction.masters,
                  max(figures.get("master_bytes", 0) for figures in measured))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-patches", type=int, default=1024)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--policies", default="none,selective,full")
    parser.add_argument("--micro-batches", default="1,2")
    parser.add_argument("--measured", default="",
                        help="JSON-lines file of measurements: configurations found there are not run again, new "
                             "ones are appended (re-checks the dry run against the same measured steps)")
    parser.add_argument("--measure-only", action="store_true", help="measure (and record), predict nothing")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "dry_run_accuracy_data"),
                        help="demo corpus directory (generated when missing)")
    cli = parser.parse_args()
    root = Path(cli.data)
    if not (root / "manifest.json").exists():
        from data.synthetic import generate_corpus

        generate_corpus(root, seed=0, scale=0.3)
    recorded = {}
    if cli.measured and Path(cli.measured).exists():
        for line in Path(cli.measured).read_text().splitlines():
            entry = json.loads(line)
            recorded[entry["key"]] = entry["ranks"]
    configurations, worst, worst_bound = [], 0.0, -1.0
    for layout in cli.layouts.split(","):
        for policy in cli.policies.split(","):
            for micro in (int(m) for m in cli.micro_batches.split(",")):
                out = Path(tempfile.mkdtemp(prefix="dry-run-accuracy-"))
                args = overrides(root, out, layout, policy, micro, cli.seq, cli.layers, cli.image_patches)
                world = LAYOUTS[layout]["world"]
                key = f"{layout}/{policy}/{micro}/{cli.seq}/{cli.layers}/{cli.image_patches}"
                measured = recorded.get(key)
                if measured is None or "param_bytes" not in measured[0]:  # not recorded, or before the static figures
                    measured = run_ranks(measure_rank, world, args, timeout=1800)
                    if cli.measured:
                        with open(cli.measured, "a") as handle:
                            handle.write(json.dumps({"key": key, "ranks": measured}) + "\n")
                shutil.rmtree(out, ignore_errors=True)
                if cli.measure_only:
                    print(json.dumps({"key": key, "measured_gib": [round(m["peak"] / GIB, 3) for m in measured]}),
                          flush=True)
                    continue
                # No pipeline: every rank is stage 0. Each rank against the prediction for its batch's image share.
                shares = [m["image_tokens"] / m["tokens"] for m in measured]
                check_same_step(key, predicted_ranks(args, world, shares[0])[0], measured, cli.seq, micro)
                predicted = [predicted_peaks(args, world, share)[0] for share in shares]
                bound = predicted_peaks(args, world)[0]
                errors = [abs(p - m["peak"]) / m["peak"] for p, m in zip(predicted, measured, strict=True)]
                worst = max(worst, *errors)
                worst_bound = max(worst_bound, *((bound - m["peak"]) / m["peak"] for m in measured))
                configurations.append({
                    "layout": layout, "activation_checkpoint": policy, "micro_batches": micro,
                    "predicted_gib": [round(p / GIB, 3) for p in predicted],
                    "measured_gib": [round(m["peak"] / GIB, 3) for m in measured],
                    "rel_error": round(max(errors), 4), "predicted_mixture_bound_gib": round(bound / GIB, 3),
                    "image_token_share": [round(share, 3) for share in shares],
                    "step_s": [round(m["step_s"], 1) for m in measured]})
                print(json.dumps(configurations[-1]), flush=True)
    print(json.dumps({"seq": cli.seq, "flavor": "small", "decoder_layers": cli.layers,
                      "max_peak_rel_error": round(worst, 4),
                      "max_mixture_bound_excess": round(worst_bound, 4), "configurations": configurations}))


if __name__ == "__main__":
    main()
