"""Training-step throughput, peak memory and MFU on one GPU (exits 2 without CUDA; ``--device cpu`` runs the same
code on the CPU, at small sizes, to check it).

Cases, each timed over ``--steps`` steps after ``--warmup`` (CUDA events around the whole step):

* ``small``: a whole training step of the ``small`` flavor through the device path (``parallelize`` on
  ``cuda:0``, packed rows of ``--seq`` tokens with images, ``lm_step`` forward + backward, the ZeRO-1 Muon/AdamW
  step);
* ``a3b_decoder_block``: forward + backward of one real-width ``kimi_vl_a3b`` MoE decoder layer (MLA, 64 routed + 2
  shared experts, top-6) on one ``--seq``-token row of 4 documents;
* ``a3b_vision_block``: forward + backward of one real-width MoonViT block on ``--patches`` patches of 4 images.

For each: ``tokens_per_s``, ``peak_memory_gib`` (``torch.cuda.max_memory_allocated``) and ``mfu``: model FLOPs per
second divided by the best fp32 / bf16 matmul rate measured on the same GPU in the same run (the baseline), so the
figure needs no datasheet. ``--dtype bfloat16`` casts the parameters (mixed precision proper is its own issue).

The baseline counts a multiply-add as 2 FLOPs; so must the model FLOPs the MFU divides by it. Before the peak is
measured or anything is timed, each case's model FLOPs (``step_model_flops`` for ``small``, the layer formulas for
the blocks) are checked against the FLOPs torch's ``FlopCounterMode`` counts in one forward + backward of the case
(the optimizer step is not model work; grouped expert GEMMs, in-place ``addmm_`` and the CPU attention kernel
counted too), within 15% (``benchmarks/_check.py``: one line on stderr and exit status 1 otherwise). The margin:
the counter counts causal attention as full (SDPA) or not at all (flash-attn's kernels), attention is at most ~13% of
a case's FLOPs at the default sizes, and ``step_model_flops`` leaves out the projector (~2%). Measured at the CPU
sizes below: formula / counted 0.95 (small), 0.99-1.00 (blocks).

    python benchmarks/gpu_step.py [--seq 8192 --patches 4096 --steps 10 --dtype float32]
    python benchmarks/gpu_step.py --device cpu --seq 512 --patches 256 --steps 1 --warmup 1   # code check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from data.batch import PackedBatch
from model.decoder import DecoderLayer
from model.init import ParamInit
from model.layers import init_default_weights
from model.registry import FLAVORS
from model.vision import VisionBlock
from model.vlm import KimiVL
from optim.distributed import ZeroOptimizer
from parallel.dims import ParallelDims
from parallel.parallelize import parallelize
from parallel.pipeline import layer_costs
from train.reporting import measure_peak_flops, step_model_flops
from train.runtime import init_distributed
from train.steps import lm_step

try:
    from benchmarks._check import require_close
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from _check import require_close

FLOP_TOL = 0.15  # relative, model FLOPs formula vs counted (see the module docstring)


def timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds of ``step()`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / steps


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._grouped_mm`` (which ``FlopCounterMode`` does not count): each group multiplies its rows or
    columns, so the total is that of one product of the whole operands, times the groups when both are 3-D."""
    groups = b_shape[0] if len(a_shape) == 3 and len(b_shape) == 3 else 1
    return 2 * groups * a_shape[-2] * a_shape[-1] * b_shape[-1]


def addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.addmm_`` (the fused loss accumulates the output weight's gradient with it; the counter knows
    only ``addmm``)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash-attention kernel, counted as the counter counts the CUDA ones."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def cpu_sdpa_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


# Operations FlopCounterMode does not count, and their FLOPs.
UNCOUNTED = {torch.ops.aten._grouped_mm: grouped_mm_flops, torch.ops.aten.addmm_: addmm_inplace_flops,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward_flops}


def check_model_flops(case: str, model_work, flops: float) -> float:
    """``flops`` must be the FLOPs one ``model_work()`` (a forward + backward) executes, within :data:`FLOP_TOL`."""
    with FlopCounterMode(display=False, custom_mapping=UNCOUNTED) as counter:
        model_work()
    counted = counter.get_total_flops()
    require_close(f"{case} model FLOPs, formula vs counted", flops, counted, FLOP_TOL, 0.0)
    return flops / counted


def packed_rows(rows: int, seq: int, vocab: int, grids: list[tuple[int, int]], patch_dim: int) -> PackedBatch:
    """Rows of four documents each, the first row holding the images' placeholders (host batch)."""
    lengths = [seq // 4] * 4 * rows
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).view(rows, seq)
    input_ids = torch.randint(5, vocab, (rows, seq))
    image_tokens = torch.arange(1, 1 + sum(h * w // 4 for h, w in grids))
    loss_mask = torch.ones(rows, seq, dtype=torch.bool)
    loss_mask.view(-1)[image_tokens] = False
    return PackedBatch(input_ids=input_ids, labels=torch.roll(input_ids, -1, 1), loss_mask=loss_mask,
                       position_ids=positions, cu_seqlens=cu_seqlens,
                       pixel_values=torch.randint(0, 256, (sum(h * w for h, w in grids), patch_dim), dtype=torch.uint8),
                       image_grid_hw=torch.tensor(grids, dtype=torch.int64), image_token_positions=image_tokens)


def small_step(device: torch.device, seq: int, dtype: torch.dtype) -> tuple:
    args = FLAVORS["small"]
    dims = ParallelDims(pp_degree=1, dp_degree=1, cp_degree=1, ep_degree=1, world_size=1)
    groups = dims.build_groups(device.type)
    with torch.device("meta"):
        model = KimiVL(args)
    parallel = parallelize(model, dims, groups, device, seed=0)
    parallel.apply_stage(None, "none", seq)
    model = parallel.model.to(dtype)
    model.coca.requires_grad_(False)
    optimizer = ZeroOptimizer(model, lr=1e-3, weight_decay=0.1, group=groups.dense)
    host = packed_rows(1, seq, args.decoder.vocab_size, [(32, 32), (16, 24), (8, 8)], 3 * args.vision.patch_size**2)
    batch = host.to(device)

    def model_work():
        optimizer.zero_grad()
        lm_step(model, [batch], 0.0, 1)

    def step():
        model_work()
        optimizer.step(max_grad_norm=1.0)

    return step, model_work, step_model_flops(args, [host]), host.num_tokens


def decoder_block_step(device: torch.device, seq: int, dtype: torch.dtype) -> tuple:
    args = FLAVORS["kimi_vl_a3b"].decoder
    with torch.device("meta"):
        layer = DecoderLayer(args, use_moe=True)
    layer.to_empty(device=device)
    init_default_weights(layer, args.init_std, ParamInit(0))
    layer.moe.init_weights(args.init_std, ParamInit(0).child("moe"))
    layer.to(dtype)
    x = torch.randn(1, seq, args.hidden_size, device=device, dtype=dtype, requires_grad=True)
    angles = torch.rand(seq, args.qk_rope_head_dim // 2, device=device)
    cu_seqlens = torch.tensor([0, seq // 4, seq // 2, 3 * seq // 4, seq], dtype=torch.int32)

    def step():
        out, _, _ = layer(x, angles, cu_seqlens)
        out.float().square().mean().backward()

    costs, _, _ = layer_costs(dataclasses.replace(FLAVORS["kimi_vl_a3b"], decoder=args), seq // 4)
    return step, step, 3 * costs[-1] * seq, seq


def vision_block_step(device: torch.device, patches: int, dtype: torch.dtype) -> tuple:
    args = FLAVORS["kimi_vl_a3b"].vision
    with torch.device("meta"):
        block = VisionBlock(args)
    block.to_empty(device=device)
    init_default_weights(block, 0.02, ParamInit(0))
    block.to(dtype)
    x = torch.randn(patches, args.hidden_size, device=device, dtype=dtype, requires_grad=True)
    per_image = patches // 4
    cu_seqlens = (0, per_image, 2 * per_image, 3 * per_image, patches)

    def step():
        block(x, cu_seqlens, None).float().square().mean().backward()

    h = args.hidden_size
    flops = 6 * (4 * h * h + 2 * h * args.mlp_hidden_size) * patches + 6 * 2 * h * per_image * patches
    return step, step, flops, patches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--patches", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "benchmarks/gpu_step.py needs a CUDA device (--device cpu checks the code)"}))
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    init_distributed(device)
    dtype = getattr(torch, args.dtype)
    cases = {"small": lambda: small_step(device, args.seq, dtype),
             "a3b_decoder_block": lambda: decoder_block_step(device, args.seq, dtype),
             "a3b_vision_block": lambda: vision_block_step(device, args.patches, dtype)}
    # Every case's FLOPs checked first, each case built on its own (the timed pass builds them again, so that each
    # case's peak memory is its own).
    flop_ratios = {case: check_model_flops(case, *build()[1:3]) for case, build in cases.items()}
    peak = measure_peak_flops(8192 if device.type == "cuda" else 1024, device=device, dtype=dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "dtype": args.dtype, "matmul_peak_tflops": round(peak / 1e12, 3)}
    for case, build in cases.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step, _, flops, tokens = build()
        seconds = timed(step, args.steps, args.warmup, device)
        peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results[case] = {"tokens_per_s": round(tokens / seconds), "step_ms": round(seconds * 1000, 2),
                         "peak_memory_gib": None if peak_memory is None else round(peak_memory, 3),
                         "mfu": round(flops / seconds / peak, 4),
                         "model_flops_vs_counted": round(flop_ratios[case], 4)}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
