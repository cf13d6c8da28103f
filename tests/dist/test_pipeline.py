"""Pipeline parallelism equals one process: every schedule, on forked gloo ranks, through the real model.

The ``debug`` flavor (4 decoder layers here, so interleaved schedules get one layer per virtual stage; balance loss
on, so its gradient path through the stages is exercised) trains one step on micro-batches of packed rows with
images of different sizes. The pipelined loss, every parameter's gradient, the expert loads and every parameter
after one ZeRO-1 Muon/AdamW step (norm clipping over the whole world) must equal a single-process ``lm_step`` on
the same micro-batches (fp32, 1e-5 relative to each tensor's norm).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from data.batch import PackedBatch
from model.registry import FLAVORS, build_model
from model.vlm import KimiVL
from optim.distributed import ZeroOptimizer
from optim.muon import MuonHParams
from parallel.compile import compiled_block_names
from parallel.dims import ParallelDims
from tests.forked import run_ranks
from parallel.parallelize import PipelineOptions, parallelize
from parallel.pipeline import (
    cu_seqlens_from_doc_ids,
    doc_ids_from_cu_seqlens,
    layer_costs,
    split_layers,
    stage_ranks,
)
from train.loss import linear_cross_entropy_by_group
from train.steps import lm_step

BASE = FLAVORS["debug"]
ARGS = dataclasses.replace(BASE, decoder=dataclasses.replace(BASE.decoder, num_layers=4, aux_loss_coef=0.1))
ROWS, SEQ, MICRO = 2, 32, 4
PATCH_DIM = 3 * ARGS.vision.patch_size**2
# Relative to each tensor's norm (summation order is the only difference).
TOLERANCE = 1e-5
LR, CLIP = 0.02, 1.0


def make_batches(seed: int = 0, count: int = MICRO) -> list[PackedBatch]:
    """Micro-batches of ``ROWS x SEQ`` packed documents; each has 0-2 images of different grids inside a document,
    and some positions without loss."""
    gen = torch.Generator().manual_seed(seed)
    grids = [(4, 6), (2, 4), (6, 4), (2, 2)]
    batches = []
    for index in range(count):
        lengths = []
        for _ in range(ROWS):
            cut = int(torch.randint(8, SEQ - 8, (), generator=gen))
            lengths += [cut, SEQ - cut]
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        position_ids = torch.cat([torch.arange(n) for n in lengths]).view(ROWS, SEQ)
        input_ids = torch.randint(5, ARGS.decoder.vocab_size, (ROWS, SEQ), generator=gen)
        chosen = [grids[(index + k) % len(grids)] for k in range(index % 3)]
        positions, start = [], 1
        for h, w in chosen:  # document 0 of row 0 is long enough for the merged tokens of these grids
            positions += list(range(start, start + h * w // 4))
            start += h * w // 4 + 1
        positions = torch.tensor(positions, dtype=torch.int64)
        input_ids.view(-1)[positions] = 1
        patches = sum(h * w for h, w in chosen)
        loss_mask = torch.rand(ROWS, SEQ, generator=gen) > 0.2
        loss_mask.view(-1)[positions] = False
        batches.append(PackedBatch(
            input_ids=input_ids, labels=torch.roll(input_ids, -1, dims=1), loss_mask=loss_mask,
            position_ids=position_ids, cu_seqlens=cu_seqlens,
            pixel_values=torch.randn(patches, PATCH_DIM, generator=gen),
            image_grid_hw=torch.tensor(chosen, dtype=torch.int64).view(-1, 2), image_token_positions=positions))
    return batches


SEED = 0


def build_reference_model():
    model = build_model(ARGS, seed=SEED)
    model.coca.requires_grad_(False)  # not part of the next-token objective (the trainer freezes it too)
    return model


def optimizer_for(model, group) -> ZeroOptimizer:
    return ZeroOptimizer(model, lr=LR, weight_decay=0.1, use_muon=True, muon=MuonHParams(ns_dtype=torch.float32),
                         group=group, norm_group=dist.group.WORLD)


def reference_rank(rank: int, world: int) -> dict:
    model = build_reference_model()
    result = lm_step(model, make_batches(), ARGS.decoder.aux_loss_coef, world=1)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    moe_keys = [k for k, layer in model.decoder.layers.items() if layer.moe is not None]
    optimizer_for(model, dist.group.WORLD).step(max_grad_norm=CLIP)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": float(result.loss), "grads": grads, "params": params,
            "loads": dict(zip(moe_keys, result.expert_load, strict=True))}


def pipeline_rank(rank: int, world: int, schedule: str, pp: int, compile: bool = False) -> dict:
    replicas = world // pp
    dims = ParallelDims(pp_degree=pp, dp_degree=replicas, cp_degree=1, ep_degree=1, world_size=world)
    groups = dims.build_groups()
    dense_group = groups.dense  # the replicas of one stage: dense gradients and optimizer state
    with torch.device("meta"):  # the device path: this rank's stages only are ever allocated and initialized
        model = KimiVL(ARGS)
    parallel = parallelize(model, dims, groups, "cpu", SEED, PipelineOptions(schedule, 2, SEQ, linear_cross_entropy_by_group),
                           compile=compile)
    model, runner = parallel.model, parallel.pipeline
    if model.coca is not None:
        model.coca.requires_grad_(False)
    batches = make_batches()
    num_targets = sum(b.num_loss_tokens for b in batches)
    mine = batches[rank % replicas :: replicas]
    aux_weight = ARGS.decoder.aux_loss_coef / len(batches)
    loss = runner.step(mine, num_targets, aux_weight)
    dist.all_reduce(loss)
    loads = runner.expert_load()
    dist.all_reduce(loads, group=dense_group)
    moe_keys = [k for k, layer in model.decoder.layers.items() if layer.moe is not None]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for grad in grads.values():  # what the optimizer's reduction sums over the replicas (on copies)
        dist.all_reduce(grad, group=dense_group)
    optimizer_for(model, dense_group).step(max_grad_norm=CLIP)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": float(loss), "grads": grads, "params": params, "layout": runner.layout,
            "loads": dict(zip(moe_keys, loads, strict=True)), "compiled_blocks": compiled_block_names(model)}


@pytest.fixture(scope="module")
def reference():
    return run_ranks(reference_rank, 1)[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


CASES = {
    "gpipe_pp2": ("gpipe", 2, 2),
    "1f1b_pp2": ("1f1b", 2, 2),
    "interleaved_1f1b_pp2": ("interleaved_1f1b", 2, 2),
    "interleaved_zero_bubble_pp2": ("interleaved_zero_bubble", 2, 2),
    "zero_bubble_pp2": ("zero_bubble", 2, 2),
    "1f1b_pp2_dp2": ("1f1b", 2, 4),
}


@pytest.mark.parametrize("case", [*CASES, "1f1b_pp2_compiled"])
def test_pipeline_equals_one_process(case, reference):
    # Compiled blocks (parallel/compile.py) run under the schedules whose backward is one call per stage; the
    # zero-bubble ones are refused by the config (config/validate.py).
    compiled = case.endswith("_compiled")
    schedule, pp, world = CASES[case.removesuffix("_compiled")]
    results = run_ranks(pipeline_rank, world, schedule, pp, compiled)
    if compiled:
        assert all(result["compiled_blocks"] for result in results)
    # Compiled graphs round differently (fused kernels): the gradients agree to 6e-7, but AdamW's first step
    # normalizes every element (g / (|g| + eps)), which magnifies the relative differences of the smallest ones: the
    # embedding differs by 1.2e-5 after the step.
    param_tolerance = 1e-4 if compiled else TOLERANCE
    worst = {"grad": 0.0, "param": 0.0}
    for rank, result in enumerate(results):
        assert abs(result["loss"] - reference["loss"]) <= TOLERANCE * abs(reference["loss"]), (rank, result["loss"])
        for name, grad in result["grads"].items():
            error = relative_error(grad, reference["grads"][name])
            worst["grad"] = max(worst["grad"], error)
            assert error <= TOLERANCE, f"{case} rank {rank}: gradient of {name} differs by {error:.2e}"
        for name, param in result["params"].items():
            error = relative_error(param, reference["params"][name])
            worst["param"] = max(worst["param"], error)
            assert error <= param_tolerance, f"{case} rank {rank}: {name} after the step differs by {error:.2e}"
        for key, load in result["loads"].items():
            assert torch.equal(load, reference["loads"][key]), f"{case} rank {rank}: expert load of layer {key}"
    # Every parameter that has a gradient in one process lives on exactly one stage of each replica.
    replicas = world // pp
    for replica in range(replicas):
        owned = [set(results[p * replicas + replica]["grads"]) for p in range(pp)]
        assert sum(len(o) for o in owned) == len(reference["grads"]) and set().union(*owned) == set(reference["grads"])
    print(f"{case}: worst relative error gradient {worst['grad']:.2e}, parameter {worst['param']:.2e}")


def test_split_balances_costs_and_keeps_vision_on_stage_zero():
    costs, first, last = layer_costs(FLAVORS["kimi_vl_a3b"], seq_len=8192, patches_per_token=0.5)
    assert costs[0] != costs[1]  # dense first layer vs MoE layers
    stages = split_layers(costs, 4, first, last)
    assert [i for s in stages for i in s] == list(range(27)) and all(stages)
    loads = [sum(costs[i] for i in s) for s in stages]
    loads[0] += first
    loads[-1] += last
    naive = [list(range(i * 27 // 4, (i + 1) * 27 // 4)) for i in range(4)]
    naive_loads = [sum(costs[i] for i in s) for s in naive]
    naive_loads[0] += first
    naive_loads[-1] += last
    assert max(loads) <= max(naive_loads)
    assert len(stages[0]) < len(stages[1])  # the vision tower's cost takes layers off stage 0
    # A heavy first stage gets a single layer; exact optimum on a small case.
    assert split_layers([1, 1, 1, 1], 2, first_extra=10) == [[0], [1, 2, 3]]
    assert split_layers([1, 2, 3, 4, 5], 3) == [[0, 1, 2], [3], [4]]
    with pytest.raises(ValueError, match="at most 3 stages"):
        split_layers([1, 1, 1], 4)


def test_stage_ranks_and_document_ids_round_trip():
    assert stage_ranks(4, 2, "loop") == [0, 1, 0, 1]
    assert stage_ranks(4, 2, "v") == [0, 1, 1, 0]
    cu = torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32)
    doc_ids = doc_ids_from_cu_seqlens(cu, 2, 16)
    assert doc_ids.dtype == torch.int32 and doc_ids.shape == (2, 16)
    assert torch.equal(cu_seqlens_from_doc_ids(doc_ids), cu)


TRAINER_LAYOUTS = {
    "pp2_1f1b": dict(world=2, pp_degree=2, pp_schedule="1f1b", activation_checkpoint="selective"),
    "pp2_dp2_interleaved_1f1b": dict(world=4, pp_degree=2, pp_schedule="interleaved_1f1b",
                                     activation_checkpoint="none"),
    "pp2_zero_bubble": dict(world=2, pp_degree=2, pp_schedule="zero_bubble", activation_checkpoint="none"),
    "pp2_interleaved_zero_bubble": dict(world=2, pp_degree=2, pp_schedule="interleaved_zero_bubble",
                                        activation_checkpoint="none"),
    "pp2_gpipe": dict(world=2, pp_degree=2, pp_schedule="gpipe", activation_checkpoint="full"),
    "pp2_cp2_1f1b": dict(world=4, pp_degree=2, cp_degree=2, pp_schedule="1f1b", activation_checkpoint="full"),
    # the combined layout: 8 ranks, experts over ep2 inside dp2 x cp2, two pipeline stages
    "pp2_dp2_cp2_ep2_1f1b": dict(world=8, pp_degree=2, cp_degree=2, ep_degree=2, pp_schedule="1f1b",
                                 activation_checkpoint="selective"),
}


# Two micro-batches per step (a pipeline needs at least one per stage) of GLOBAL_ROWS / 2 rows over the replicas:
# the loader's global stream depends on the rows per micro-step only, so every layout trains on the same rows.
TRAINER_EXTRA = ["curriculum.stages.joint_pretrain.grad_accum_steps=2", "model.decoder.num_layers=4"]


@pytest.fixture(scope="module")
def trainer_reference(demo_root, tmp_path_factory):
    from tests.dist.test_parallel_layouts import GLOBAL_ROWS, overrides, train_rank

    out = tmp_path_factory.mktemp("single")
    args = overrides(out, demo_root, GLOBAL_ROWS // 2, activation_checkpoint="none") + TRAINER_EXTRA
    return run_ranks(train_rank, 1, args)[0]


@pytest.mark.parametrize("layout", list(TRAINER_LAYOUTS))
def test_trainer_pipeline_equals_one_process(layout, trainer_reference, demo_root, tmp_path):
    """Three steps of ``joint_pretrain`` through the real Trainer (loader, images, ZeRO Muon, bias balancing,
    checkpoint at the end; selective activation checkpointing in one layout): every loss and every parameter
    equal one process."""
    from tests.dist.test_parallel_layouts import GLOBAL_ROWS, STEPS, assert_same_source_losses, overrides, train_rank

    spec = dict(TRAINER_LAYOUTS[layout])
    world = spec.pop("world")
    replicas = world // spec["pp_degree"]  # data x context ranks of a pipeline stage
    dp = replicas // spec.get("cp_degree", 1)
    args = overrides(tmp_path, demo_root, GLOBAL_ROWS // 2 // dp, **spec)
    results = run_ranks(train_rank, world, args + TRAINER_EXTRA)
    reference = trainer_reference
    assert len(results[0]["losses"]) == STEPS
    for step, (got, want) in enumerate(zip(results[0]["losses"], reference["losses"], strict=True)):
        assert abs(got - want) <= TOLERANCE * abs(want), f"{layout} step {step + 1}: loss {got} vs {want}"
    assert_same_source_losses(results[0]["source_losses"], reference["source_losses"], layout)
    if dp == 1:  # pipeline (and context) ranks share the rows: each counts its share of the model FLOPs
        assert results[0]["step_flops"] == pytest.approx([f / world for f in reference["step_flops"]], rel=1e-9)
    for rank, result in enumerate(results):
        for name, param in result["params"].items():
            expected = reference["params"][name]
            if name in result["offsets"]:  # this rank's experts of the layer
                expected = expected[result["offsets"][name] : result["offsets"][name] + param.shape[0]]
            assert param.shape == expected.shape, name
            error = relative_error(param, expected)
            assert error <= TOLERANCE, f"{layout} rank {rank}: {name} differs by {error:.2e} (relative)"
    for replica in range(replicas):  # the stages of each replica hold every parameter exactly once
        names = [set(results[p * replicas + replica]["params"]) for p in range(spec["pp_degree"])]
        assert sum(map(len, names)) == len(reference["params"]) and set().union(*names) == set(reference["params"])


@pytest.fixture(scope="module")
def wide_reference(demo_root, tmp_path_factory):
    """One process, 4 rows per micro-step (so that 4 data-parallel ranks can share them), 2 micro-steps."""
    from tests.dist.test_parallel_layouts import overrides, train_rank

    out = tmp_path_factory.mktemp("single_wide")
    return run_ranks(train_rank, 1, overrides(out, demo_root, 4, activation_checkpoint="none") + TRAINER_EXTRA)[0]


@pytest.mark.parametrize("resume_world", [4, 1])
def test_checkpoint_of_pp2_dp2_resumes_at_dp4_and_in_one_process(resume_world, wide_reference, demo_root, tmp_path):
    """Saved after 2 steps at pp2 x dp2 (each pipeline rank writes its stages' parameters and optimizer units),
    resumed at dp4 or by one process: the third step's loss and the final parameters are the uninterrupted run's."""
    from tests.dist.test_parallel_layouts import STEPS, overrides, train_rank

    spec = dict(pp_degree=2, pp_schedule="1f1b", activation_checkpoint="none")
    saved = overrides(tmp_path, demo_root, 2, **spec) + TRAINER_EXTRA + ["exit_after_steps=2"]
    run_ranks(train_rank, 4, saved)
    assert [c.name for c in (tmp_path / "run" / "joint_pretrain" / "checkpoints").iterdir()] == ["step-00000002"]
    resumed = run_ranks(train_rank, resume_world, overrides(tmp_path, demo_root, 4 // resume_world,
                                                            activation_checkpoint="none") + TRAINER_EXTRA)
    reference = wide_reference
    assert len(resumed[0]["losses"]) == STEPS
    assert abs(resumed[0]["losses"][-1] - reference["losses"][-1]) <= TOLERANCE * abs(reference["losses"][-1])
    for name, param in resumed[0]["params"].items():
        error = relative_error(param, reference["params"][name])
        assert error <= TOLERANCE, f"{name} differs by {error:.2e} (relative) after resuming at world {resume_world}"
