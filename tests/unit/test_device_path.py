"""The device path: device choice, the ordered parallelize(), layout-independent initialization, batches ahead."""

from __future__ import annotations

import pytest
import torch

from config import ConfigError, load_config
from model.registry import FLAVORS, build_model
from model.vlm import KimiVL
from parallel.dims import ParallelDims
from parallel.parallelize import PipelineOptions, parallelize
from tests.forked import run_ranks
from tests.unit.test_loader import batches_equal, make_loader
from train.device_feed import DeviceFeed
from train.loss import linear_cross_entropy_by_group
from train.runtime import resolve_device

ARGS = FLAVORS["debug"]
SEED = 7


def test_auto_is_the_cpu_without_cuda_and_the_local_gpu_with_it():
    assert resolve_device("auto", cuda_available=False, local_rank=3, local_world_size=4) == torch.device("cpu")
    assert resolve_device("auto", cuda_available=True, cuda_devices=8, local_rank=3,
                          local_world_size=8) == torch.device("cuda", 3)
    assert resolve_device("cpu", cuda_available=True, cuda_devices=8) == torch.device("cpu")
    assert resolve_device("cuda", cuda_available=True, cuda_devices=2, local_rank=1,
                          local_world_size=2) == torch.device("cuda", 1)


def test_impossible_device_choices_fail_with_what_to_change():
    with pytest.raises(ConfigError, match="runtime.device=cuda: no CUDA device"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(ConfigError, match="8 processes on this node but 4 visible GPU"):
        resolve_device("cuda", cuda_available=True, cuda_devices=4, local_rank=0, local_world_size=8)
    with pytest.raises(ConfigError, match="8 processes on this node but 4 visible GPU"):
        resolve_device("auto", cuda_available=True, cuda_devices=4, local_rank=0, local_world_size=8)
    with pytest.raises(ConfigError, match="runtime.device='gpu'"):
        load_config(["recipe=debug", "runtime.device=gpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_entry_point_refuses_cuda_here_before_anything_starts(tmp_path, capsys):
    from train.__main__ import main

    code = main(["recipe=debug", "runtime.device=cuda", f"output_dir={tmp_path}"])
    assert code == 2
    assert "runtime.device=cuda: no CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # not even the run directory


def test_parallelize_takes_only_a_model_built_on_meta():
    dims = ParallelDims(pp_degree=1, dp_degree=1, cp_degree=1, ep_degree=1, world_size=1)
    with pytest.raises(ValueError, match="built on meta"):
        parallelize(build_model(ARGS), dims, None, "cpu", seed=SEED)


def test_values_depend_on_the_seed_and_the_name_only():
    one, other = build_model(ARGS, seed=SEED).state_dict(), build_model(ARGS, seed=SEED).state_dict()
    assert all(torch.equal(one[k], other[k]) for k in one)
    third = build_model(ARGS, seed=SEED + 1).state_dict()
    assert not torch.equal(one["decoder.output.weight"], third["decoder.output.weight"])
    # Same shapes, different names: different values (no two parameters share a stream).
    layers = [one[f"decoder.layers.{i}.attention.q_proj.weight"] for i in range(ARGS.decoder.num_layers)]
    assert not torch.equal(layers[0], layers[1])


def rank_values(rank: int, world: int, pp: int, ep: int) -> dict:
    """This rank's parameters after the device path, with the global index of its first expert."""
    dims = ParallelDims(pp_degree=pp, dp_degree=world // pp, cp_degree=1, ep_degree=ep, world_size=world)
    with torch.device("meta"):
        model = KimiVL(ARGS)
    pipeline = PipelineOptions("1f1b", 1, 64, linear_cross_entropy_by_group)
    parallel = parallelize(model, dims, dims.build_groups(), "cpu", SEED, pipeline)
    offsets = {name: getattr(module, "expert_offset", 0) for name, module in parallel.model.named_modules()}
    return {"params": {n: p.detach().clone() for n, p in parallel.model.named_parameters()}, "offsets": offsets}


@pytest.mark.parametrize("pp,ep", [(1, 2), (2, 1), (2, 2)], ids=["ep2", "pp2", "pp2_ep2"])
def test_every_rank_holds_exactly_its_share_with_the_single_process_values(pp: int, ep: int):
    world = max(pp * ep, 2)
    reference = dict(build_model(ARGS, seed=SEED).named_parameters())
    held: dict[str, int] = {}
    for result in run_ranks(rank_values, world, pp, ep):
        for name, value in result["params"].items():
            module = name.rpartition(".")[0]
            if ".experts." in name:  # this rank's experts: a slice of the whole stack at its global index
                first = result["offsets"][module]
                expected = reference[name][first: first + value.shape[0]]
                assert value.shape[0] == ARGS.decoder.num_routed_experts // ep
            else:
                expected = reference[name]
            assert torch.equal(value, expected), name
            held[name] = held.get(name, 0) + value.numel()
    # Over the ranks of one data-parallel replica, every parameter is held, and no rank holds more than its share.
    replicas = world // (pp * ep)
    for name, param in reference.items():
        assert held[name] == param.numel() * replicas * (1 if ".experts." in name else ep), name


def test_a_pruned_rank_never_allocates_the_other_stages():
    sizes = [sum(p.numel() for p in result["params"].values()) for result in run_ranks(rank_values, 2, 2, 1)]
    whole = sum(p.numel() for p in build_model(ARGS, seed=SEED).parameters())
    assert sum(sizes) == whole and max(sizes) < whole


# -------------------------------------------------------------------------------------------- batches ahead


@pytest.mark.parametrize("objective,stage", [("lm", "joint_pretrain"), ("coca", "vit_coca")])
def test_batches_drawn_ahead_are_the_same_and_a_checkpoint_never_skips_them(demo_root, tokenizer, objective,
                                                                            stage):
    steps, micro = 5, 2
    plain = DeviceFeed(make_loader(demo_root, tokenizer, stage), objective, micro, torch.device("cpu"))
    ahead = DeviceFeed(make_loader(demo_root, tokenizer, stage), objective, micro, torch.device("cpu"),
                       look_ahead=True)
    saved = None
    for step in range(steps):
        expected = plain.next_step(step / steps)
        got = ahead.next_step(step / steps)
        ahead.prefetch((step + 1) / steps)  # the trainer's order: next step drawn during this one
        assert all(batches_equal(a, b) for a, b in zip(expected, got, strict=True))
        if step == 2:  # a checkpoint here must resume at step 3, not after the batches already drawn ahead
            saved = ahead.state_dict()
            assert saved == plain.state_dict()
    resumed = DeviceFeed(make_loader(demo_root, tokenizer, stage), objective, micro, torch.device("cpu"),
                         look_ahead=True)
    resumed.load_state_dict(saved)
    fresh = DeviceFeed(make_loader(demo_root, tokenizer, stage), objective, micro, torch.device("cpu"))
    for step in range(steps):
        fresh.next_step(step / steps)
        if step == 2:
            break
    assert all(batches_equal(a, b) for a, b in zip(resumed.next_step(3 / steps), fresh.next_step(3 / steps),
                                                    strict=True))


def test_a_batch_moved_to_its_device_keeps_its_index_metadata_on_the_host(demo_root, tokenizer):
    batch = make_loader(demo_root, tokenizer, "joint_pretrain").next_packed_batch(0.5)
    moved = batch.to("meta")
    assert moved.input_ids.is_meta and moved.loss_mask.is_meta and moved.pixel_values.is_meta
    assert moved.cu_seqlens is batch.cu_seqlens and moved.image_grid_hw is batch.image_grid_hw
    assert (moved.num_loss_tokens, moved.num_tokens) == (batch.num_loss_tokens, batch.num_tokens)

