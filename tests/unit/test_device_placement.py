"""No hidden CPU tensors: every tensor the step creates takes its device from its inputs or the parameters.

Three proofs, each with a twin showing it fails when a CPU tensor is slipped into the step (tests/device_checks.py):

(a) A whole training step on ``meta`` under a fake process group: forward, backward and the ZeRO-1 optimizer's
    reduction, norm and update; data parallel, context parallel (all-gather and ring) and the CoCa objective. A
    ``meta`` tensor mixed with a CPU one raises. Parameters are bf16 there, so the MoE layers take the grouped GEMM
    path (the one GPUs run; its offsets stay on the device), the only one ``meta`` can run without values.
(b) The forward of the debug flavor on a fake ``cuda`` device (``FakeTensorMode``), fp32, text and images, the
    CoCa forward, and the context-parallel ring's forward (cp2 under a fake process group; bf16 through the
    flash-attn varlen kernel, fp32 through the explicit fallback): mixing devices raises
    ``FakeTensorDeviceMismatchError``. The looped expert path runs here (token counts read as symbolic sizes).
(c) Data-dependent paths that neither can run (expert all-to-all with host splits, pipeline schedules, the ring's
    and all-gather's real exchanges, the optimizer's finite check) run for real on forked gloo ranks under
    :class:`UndevicedFactoryCheck`, which flags any factory call made without a device.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

import model.moe as moe
import parallel.ring_attention as ring
from data.batch import ImageTextBatch
from model.vlm import KimiVL
from optim.distributed import ZeroOptimizer
from parallel.context import apply_context_parallel, forward_context_parallel
from parallel.dims import ParallelDims
from parallel.parallelize import PipelineOptions, parallelize
from parallel.pipeline import pipeline_lm_step
from tests.device_checks import (
    UndevicedFactoryCheck,
    batch_on_fake_cuda,
    fake_cuda,
    fake_world,
    place_on_fake_cuda,
)
from tests.dist.test_pipeline import ARGS, SEQ, make_batches
from tests.forked import run_ranks
from train.loss import linear_cross_entropy_by_group
from train.steps import coca_step, lm_step

NO_AUX = dataclasses.replace(ARGS, decoder=dataclasses.replace(ARGS.decoder, aux_loss_coef=0.0))
PIPELINE = PipelineOptions("1f1b", 1, SEQ, linear_cross_entropy_by_group)
LAYOUTS = {  # name: (pp, dp, cp, ep, cp attention)
    "dp2": (1, 2, 1, 1, "allgather"),
    "cp2_allgather": (1, 1, 2, 1, "allgather"),
    "cp2_ring": (1, 1, 2, 1, "ring"),
}


def image_text_batches(count: int = 2) -> list[ImageTextBatch]:
    """Three image-text pairs per batch, of different patch grids (raw uint8 patches, padded captions)."""
    generator = torch.Generator().manual_seed(3)
    patch_dim = 3 * ARGS.vision.patch_size**2
    batches = []
    for index in range(count):
        grids = [(2, 4), (4, 4), (2, 2), (2, 4), (4, 4)][index % 3 : index % 3 + 3]
        patches = sum(h * w for h, w in grids)
        text_ids = torch.randint(5, ARGS.decoder.vocab_size, (len(grids), 12), generator=generator)
        text_mask = torch.arange(12).expand(len(grids), 12) < torch.tensor([[12], [9], [7]][: len(grids)])
        batches.append(ImageTextBatch(
            pixel_values=torch.randint(0, 256, (patches, patch_dim), dtype=torch.uint8, generator=generator),
            image_grid_hw=torch.tensor(grids, dtype=torch.int64), text_ids=text_ids, text_mask=text_mask))
    return batches


def build_layout(layout: str, device: str, args=NO_AUX):
    """(model, groups, cp group) of rank 0 of ``layout`` through the one device path."""
    pp, dp, cp, ep, method = LAYOUTS[layout]
    dims = ParallelDims(pp_degree=pp, dp_degree=dp, cp_degree=cp, ep_degree=ep, world_size=pp * dp * cp)
    groups = dims.build_groups()
    with torch.device("meta"):
        model = KimiVL(args)
    parallel = parallelize(model, dims, groups, device, seed=0, pipeline=PIPELINE)
    cp_group = groups.cp if cp > 1 else None
    parallel.apply_stage(cp_group, "selective", SEQ, method)
    return parallel.model, groups, cp_group


def optimizer_math(model, groups) -> None:
    """The ZeRO-1 step without its one host read (the finite check): reduction, global norm, clipping, update."""
    optimizer = ZeroOptimizer(model, lr=0.01, weight_decay=0.1, group=groups.dense, expert_group=groups.expert_data,
                              norm_group=dist.group.WORLD)
    grads = optimizer.reduce_gradients()
    optimizer.apply_updates(grads, optimizer.global_squared_norm(grads), max_grad_norm=1.0)


def meta_lm_step(layout: str, slip_cpu_tensor: bool = False) -> torch.Tensor:
    model, groups, cp_group = build_layout(layout, "meta")
    model.to(torch.bfloat16)
    model.coca.requires_grad_(False)
    if slip_cpu_tensor:  # a CPU tensor created inside the step, as a leak would
        model.decoder.layers["1"].register_forward_hook(lambda module, inputs, out: (out[0] + torch.ones(1), *out[1:]))
    batches = [batch.to("meta") for batch in make_batches()]
    result = lm_step(model, batches, 0.0, dist.get_world_size(), cp_group)
    optimizer_math(model, groups)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.is_meta for g in grads)
    assert all(p.is_meta for p in model.parameters())
    return result.loss


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_whole_lm_step_runs_on_meta(layout: str):
    with fake_world(2):
        loss = meta_lm_step(layout)
    assert loss.is_meta and loss.shape == ()


def test_a_whole_coca_step_runs_on_meta():
    with fake_world(2):
        model, groups, _ = build_layout("dp2", "meta")
        model.to(torch.bfloat16)
        model.decoder.requires_grad_(False)
        model.projector.requires_grad_(False)
        result = coca_step(model, [batch.to("meta") for batch in image_text_batches()])
        optimizer_math(model, groups)
    assert result.loss.is_meta and all(p.grad.is_meta for p in model.vision.parameters())


def test_the_meta_step_fails_on_a_cpu_tensor_slipped_into_it():
    with fake_world(2), pytest.raises(RuntimeError, match="meta"):
        meta_lm_step("dp2", slip_cpu_tensor=True)


def fake_cuda_forward(batch_index: int, slip_cpu_tensor: bool = False) -> torch.Tensor:
    with torch.device("meta"):
        model = KimiVL(NO_AUX)
    if slip_cpu_tensor:
        model.projector.register_forward_hook(lambda module, inputs, out: out + torch.ones(1))
    batch = make_batches()[batch_index]
    with fake_cuda(), torch.no_grad():
        place_on_fake_cuda(model)
        b = batch_on_fake_cuda(batch)
        logits, aux = model(b.input_ids, b.position_ids, b.cu_seqlens, b.pixel_values, b.image_grid_hw,
                            b.image_token_positions)
        assert aux.expert_load.device.type == "cuda"
        return logits


@pytest.mark.parametrize("batch_index", [0, 1, 2], ids=["text", "one_image", "two_images"])
def test_the_forward_runs_on_a_fake_cuda_device(batch_index: int):
    assert (make_batches()[batch_index].image_grid_hw.shape[0] > 0) == (batch_index > 0)
    logits = fake_cuda_forward(batch_index)
    assert logits.device.type == "cuda" and logits.shape == (2, SEQ, NO_AUX.decoder.vocab_size)


def test_the_coca_forward_runs_on_a_fake_cuda_device():
    with torch.device("meta"):
        model = KimiVL(NO_AUX)
    batch = image_text_batches()[1]
    with fake_cuda(), torch.no_grad():
        place_on_fake_cuda(model)
        b = batch_on_fake_cuda(batch)
        out = model.forward_coca(b.pixel_values, b.image_grid_hw, b.text_ids, b.text_mask)
        assert {t.device.type for t in (out.image_embeds, out.text_embeds, out.caption_logits)} == {"cuda"}


def test_the_fake_cuda_forward_fails_on_a_cpu_tensor_slipped_into_it():
    with pytest.raises(FakeTensorDeviceMismatchError):
        fake_cuda_forward(1, slip_cpu_tensor=True)



def fake_cuda_ring_forward(dtype: torch.dtype, slip_cpu_tensor: bool = False) -> tuple[torch.Tensor, int]:
    """The cp2 ring forward of the text batch on fake CUDA; returns rank 0's hidden states and the number of
    flash-attn varlen calls."""
    with torch.device("meta"):
        model = KimiVL(NO_AUX)
    batch = make_batches()[0]
    calls = []
    flash = ring.flash_varlen_forward
    pack = ring._pack

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return flash(*args, **kwargs)

    def pack_on_the_host(group, q, keys, values):  # cu_seqlens made on the CPU, as a device-less factory would
        q_p, k_p, v_p, cu_q, cu_k, max_q, max_k = pack(group, q, keys, values)
        if slip_cpu_tensor:
            cu_q = torch.tensor([0, *itertools.accumulate(s.q_end - s.q_start for s in group)], dtype=torch.int32)
        return q_p, k_p, v_p, cu_q, cu_k, max_q, max_k

    with fake_world(2), pytest.MonkeyPatch.context() as patch:
        patch.setattr(ring, "flash_varlen_forward", counted)
        patch.setattr(ring, "_pack", pack_on_the_host)
        # The grouped GEMM's capability query needs the CUDA runtime, which a CPU build lacks: the looped experts run.
        patch.setattr(moe, "grouped_mm_supported", lambda x: False)
        apply_context_parallel(model, dist.group.WORLD, SEQ, "ring")
        with fake_cuda(), torch.no_grad():
            place_on_fake_cuda(model, dtype)
            hidden, _, _, aux = forward_context_parallel(model, batch_on_fake_cuda(batch), dist.group.WORLD)
    assert aux.expert_load.device.type == "cuda"
    return hidden, len(calls)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16_flash_varlen", "fp32_fallback"])
def test_the_context_parallel_ring_forward_runs_on_a_fake_cuda_device(dtype):
    hidden, flash_calls = fake_cuda_ring_forward(dtype)
    assert hidden.device.type == "cuda" and hidden.dtype == dtype
    assert hidden.shape == (2, SEQ // 2, NO_AUX.decoder.hidden_size)
    # bf16: every decoder layer's ring steps went through the varlen kernel; fp32 has no flash kernel
    assert (flash_calls >= NO_AUX.decoder.num_layers) if dtype == torch.bfloat16 else flash_calls == 0


def test_the_fake_cuda_ring_forward_fails_on_a_cpu_tensor_slipped_into_it():
    with pytest.raises(FakeTensorDeviceMismatchError):
        fake_cuda_ring_forward(torch.bfloat16, slip_cpu_tensor=True)

# ---------------------------------------------------------------------------------------------------- (c) on CPU

CHECKED_LAYOUTS = {  # name: (pp, dp, cp, ep, cp attention, objective)
    "one_process": (1, 1, 1, 1, "allgather", "lm"),
    "dp2_ep2": (1, 2, 1, 2, "allgather", "lm"),
    "cp2_ring_ep2": (1, 1, 2, 2, "ring", "lm"),
    "cp2_allgather": (1, 1, 2, 1, "allgather", "lm"),
    "pp2": (2, 1, 1, 1, "allgather", "lm"),
    "dp2_coca": (1, 2, 1, 1, "allgather", "coca"),
}


def checked_step_rank(rank: int, world: int, layout: str, slip_cpu_tensor: bool) -> list[str]:
    """One real step of ``layout`` (forward, backward, optimizer) under :class:`UndevicedFactoryCheck`."""
    pp, dp, cp, ep, method, objective = CHECKED_LAYOUTS[layout]
    dims = ParallelDims(pp_degree=pp, dp_degree=dp, cp_degree=cp, ep_degree=ep, world_size=world)
    groups = dims.build_groups()
    with torch.device("meta"):
        model = KimiVL(ARGS if pp > 1 else NO_AUX)
    parallel = parallelize(model, dims, groups, "cpu", seed=0, pipeline=PIPELINE)
    cp_group = groups.cp if cp > 1 else None
    parallel.apply_stage(cp_group, "selective", SEQ, method)
    model = parallel.model
    if objective == "coca":
        model.decoder.requires_grad_(False)
        model.projector.requires_grad_(False)
    elif model.coca is not None:
        model.coca.requires_grad_(False)
    if slip_cpu_tensor:  # a factory call without a device, as a leak would make it
        model.decoder.embed_tokens.register_forward_hook(lambda module, inputs, out: out + torch.zeros(1))
    optimizer = ZeroOptimizer(model, lr=0.01, weight_decay=0.1, group=groups.dense, expert_group=groups.expert_data,
                              norm_group=dist.group.WORLD)
    batches = image_text_batches()[rank::world] if objective == "coca" else make_batches()
    check = UndevicedFactoryCheck()
    try:
        with check:
            if objective == "coca":
                coca_step(model, batches)
            elif pp > 1:
                pipeline_lm_step(parallel.pipeline, batches, ARGS.decoder.aux_loss_coef, pp)
            else:
                lm_step(model, batches[dims.coordinates(rank)["dp"]::dp], 0.0, world, cp_group)
            optimizer.step(max_grad_norm=1.0)
    except RuntimeError:
        if not check.found:
            raise
    return check.found


@pytest.mark.parametrize("layout", sorted(CHECKED_LAYOUTS))
def test_no_factory_call_without_a_device_in_a_real_step(layout: str):
    pp, dp, cp, _, _, _ = CHECKED_LAYOUTS[layout]
    found = run_ranks(checked_step_rank, pp * dp * cp, layout, False)
    assert found == [[]] * (pp * dp * cp)


def test_the_factory_check_fails_on_a_cpu_tensor_slipped_into_the_step():
    (found,) = run_ranks(checked_step_rank, 1, "one_process", True)
    assert found and found[0].startswith("zeros at tests/unit/test_device_placement.py")
