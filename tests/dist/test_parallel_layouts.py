"""The trainer under data, expert and context parallelism (and activation checkpointing) equals one process.

Each layout trains 3 steps of ``joint_pretrain`` (images and text, from the same seeded initialization) on forked
gloo ranks; the loss of every step and every parameter afterwards must equal a single-process run on the same
global batch (fp32, Newton-Schulz in fp32, 1e-5 relative: losses to their value, parameters to their norm).
Activation checkpointing policies are spread over the layouts (it must not change a bit of the math either).
"""

from __future__ import annotations

import os

import pytest
import torch

from parallel.compile import compiled_block_names
from tests.forked import run_ranks
from config import load_config
from train.metrics import read_metrics
from train.trainer import Trainer

STEPS = 3
GLOBAL_ROWS = 4
# Relative to each tensor's norm. Measured: at most 1.7e-6 for any parameter of any layout (summation order only).
TOLERANCE = 1e-5
CLIP = 1.0


def overrides(out, demo_root, rows_per_rank: int, **parallel) -> list[str]:
    stage = "curriculum.stages.joint_pretrain"
    args = ["recipe=debug", f"output_dir={out}", "run_name=run", f"data.root={demo_root}", "log.progress_bar=false",
            "log.peak_tflops=1", "optim.muon_ns_dtype=float32", "curriculum.order=[joint_pretrain]",
            f"{stage}.init_from=scratch", f"{stage}.steps={STEPS}", f"{stage}.micro_batch_size={rows_per_rank}",
            f"{stage}.checkpoint_interval=0", f"{stage}.lr.warmup_steps=1", f"optim.grad_clip_norm={CLIP}",
            # images from the first step on, so vision features cross the context-parallel split
            f"{stage}.mixture.multimodal_share_start=0.5"]
    return args + [f"parallel.{key}={value}" for key, value in parallel.items()]


def train_rank(rank: int, world: int, args: list[str]) -> dict:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    trainer = Trainer(load_config(args))
    try:
        trainer.run()
    finally:
        trainer.close()
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    offsets = {f"{name}.{p}": m.expert_offset for name, m in trainer.model.named_modules()
               if hasattr(m, "expert_offset") for p in ("w_gate", "w_up", "w_down")}
    records = read_metrics(trainer.cfg.run_dir / "joint_pretrain" / "metrics.jsonl")
    return {"params": params, "offsets": offsets, "losses": [r["loss"] for r in records],
            "compiled_blocks": compiled_block_names(trainer.model),
            "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            "grad_norms": [r["grad_norm"] for r in records],
            "source_losses": [{k: v for k, v in r.items() if k.startswith(("loss/", "loss_tokens/"))} for r in records],
            "step_flops": [r["model_tflops_per_s"] * 1e12 * r["step_time_s"] for r in records]}


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return run_ranks(train_rank, 1, overrides(out, demo_root, GLOBAL_ROWS, activation_checkpoint="none"))[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_same_source_losses(got: list[dict], want: list[dict], layout: str) -> None:
    """Every step's loss and loss-token count per data source equal the one process's (several sources)."""
    assert len(got) == len(want) and all(len([k for k in w if k.startswith("loss/")]) > 1 for w in want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.keys() == w.keys(), f"{layout} step {step + 1}: {sorted(g)} vs {sorted(w)}"
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=TOLERANCE), f"{layout} step {step + 1}: {key}"


LAYOUTS = {
    "dp2": dict(world=2, activation_checkpoint="none"),
    "dp2_ep2": dict(world=2, ep_degree=2, activation_checkpoint="selective"),
    "cp2": dict(world=2, cp_degree=2, activation_checkpoint="full"),
    "cp4": dict(world=4, cp_degree=4, activation_checkpoint="none"),
    "cp2_ring": dict(world=2, cp_degree=2, cp_attention="ring", activation_checkpoint="full"),
    "cp4_ring": dict(world=4, cp_degree=4, cp_attention="ring", activation_checkpoint="selective"),
    "dp2_cp2_ep2": dict(world=4, cp_degree=2, ep_degree=2, activation_checkpoint="selective"),
    "dp2_cp2_ep4": dict(world=4, cp_degree=2, ep_degree=4, activation_checkpoint="none"),
    # a run laid out dp4 whose stage regroups the same ranks as dp2 x cp2 (curriculum.stages.<name>.cp_degree)
    "dp4_stage_cp2_ep2": dict(world=4, ep_degree=2, stage_cp=2, activation_checkpoint="selective"),
    # compiled blocks (parallel/compile.py) around the eager expert dispatch and ring attention
    "cp2_ep2_ring_compiled": dict(world=2, cp_degree=2, ep_degree=2, cp_attention="ring",
                                  activation_checkpoint="selective", compile=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_one_process(layout, reference, demo_root, tmp_path):
    spec = dict(LAYOUTS[layout])
    world = spec.pop("world")
    stage_cp = spec.pop("stage_cp", 0)
    compiled = spec.pop("compile", False)
    dp = world // (stage_cp or spec.get("cp_degree", 1))
    args = overrides(tmp_path, demo_root, GLOBAL_ROWS // dp, **spec)
    if stage_cp:
        args.append(f"curriculum.stages.joint_pretrain.cp_degree={stage_cp}")
    args.append(f"compile={str(compiled).lower()}")
    results = run_ranks(train_rank, world, args)
    for result in results:  # every block compiled, and graphs were built (none skipped: see tests/unit/test_compile.py)
        assert bool(result["compiled_blocks"]) == compiled and (result["compiled_graphs"] > 0) == compiled
    assert len(results[0]["losses"]) == STEPS
    for step, (got, want) in enumerate(zip(results[0]["losses"], reference["losses"], strict=True)):
        assert abs(got - want) <= TOLERANCE * abs(want), f"{layout} step {step + 1}: loss {got} vs {want}"
    assert_same_source_losses(results[0]["source_losses"], reference["source_losses"], layout)
    # The global gradient norm (over every group) is the one process's, and clipping by it was active.
    assert results[0]["grad_norms"] == pytest.approx(reference["grad_norms"], rel=TOLERANCE)
    assert max(reference["grad_norms"]) > CLIP
    if dp == 1:  # the context-parallel ranks share the rows: each did 1/cp of the model FLOPs (MFU not inflated)
        assert results[0]["step_flops"] == pytest.approx([f / world for f in reference["step_flops"]], rel=1e-9)
    sharded = spec.get("ep_degree", 1) > 1
    for rank, result in enumerate(results):
        assert set(result["params"]) == set(reference["params"])
        for name, param in result["params"].items():
            expected = reference["params"][name]
            if name in result["offsets"]:
                start = result["offsets"][name]
                expected = expected[start : start + param.shape[0]]
                assert sharded and param.shape[0] < reference["params"][name].shape[0]
            assert param.shape == expected.shape, name
            error = relative_error(param, expected)
            assert error <= TOLERANCE, f"{layout} rank {rank}: {name} differs by {error:.2e} (relative)"


def test_checkpoint_of_dp2_cp2_ep2_resumes_in_one_process(reference, demo_root, tmp_path):
    """Saved after 2 steps at dp2 x cp2 x ep2 (experts as DTensors, optimizer state by global unit keys, one loader
    state per batch slot), resumed by one process: the third step and the final parameters are the uninterrupted
    single-process run's."""
    spec = dict(cp_degree=2, ep_degree=2, activation_checkpoint="none")
    run_ranks(train_rank, 4, [*overrides(tmp_path, demo_root, GLOBAL_ROWS // 2, **spec), "exit_after_steps=2"])
    checkpoints = sorted((tmp_path / "run" / "joint_pretrain" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-00000002"]
    resumed = run_ranks(train_rank, 1, overrides(tmp_path, demo_root, GLOBAL_ROWS, activation_checkpoint="none"))[0]
    assert len(resumed["losses"]) == STEPS
    assert abs(resumed["losses"][-1] - reference["losses"][-1]) <= TOLERANCE * abs(reference["losses"][-1])
    for name, param in resumed["params"].items():
        error = relative_error(param, reference["params"][name])
        assert error <= TOLERANCE, f"{name} differs by {error:.2e} (relative) after the resharded resume"


def test_async_s3_checkpoint_of_dp2_ep2_resumes_in_one_process(reference, demo_root, tmp_path, s3_endpoint):
    """Two ranks (dp2 x ep2) checkpoint every step to S3 in the background (staged, written over their own gloo
    group while training goes on, the leaving step's save waited for), then one process resumes from S3: the third
    step and the final parameters are the uninterrupted single-process run's."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="layouts")
    s3 = ["checkpoint.url=s3://layouts/ckpt", f"checkpoint.endpoint_url={s3_endpoint}", "checkpoint.async_save=true"]
    every_step = "curriculum.stages.joint_pretrain.checkpoint_interval=1"
    args = overrides(tmp_path, demo_root, GLOBAL_ROWS // 2, ep_degree=2, activation_checkpoint="none")
    run_ranks(train_rank, 2, [*args, *s3, every_step, "exit_after_steps=2"])
    assert not (tmp_path / "run" / "joint_pretrain" / "checkpoints").exists()
    resumed = run_ranks(train_rank, 1, [*overrides(tmp_path, demo_root, GLOBAL_ROWS, activation_checkpoint="none"),
                                        *s3])[0]
    assert len(resumed["losses"]) == STEPS
    assert abs(resumed["losses"][-1] - reference["losses"][-1]) <= TOLERANCE * abs(reference["losses"][-1])
    for name, param in resumed["params"].items():
        error = relative_error(param, reference["params"][name])
        assert error <= TOLERANCE, f"{name} differs by {error:.2e} (relative) after the resume from S3"
