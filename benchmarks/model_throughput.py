"""Model throughput on CPU, same weights, same run, forward + backward:

* ``decoder_speedup_vs_hf``: tokens/s of our ``small`` MoE decoder over transformers' ``DeepseekV3ForCausalLM``
  loaded with the same weights (through :mod:`model.hf`), both in their default kernels (the reference picks SDPA
  attention and its grouped-GEMM experts). Goal >= 1.5.
* ``vit_packed_speedup_vs_padded``: a mixed-resolution batch through our packed MoonViT (``small``) vs the same
  images padded to the largest grid and run as one batch with a key-padding mask (what a tower without packing
  has to do), same modules, weights and pixel layout. Goal >= 1.5.

The default decoder batch is one 4096-token row: pretraining packs 8192-token rows (32K and 128K later), and 4096
keeps a CPU step at seconds. The ratio grows with the row length (figures: docs/benchmarks.md), because the
reference's grouped-GEMM experts are as good as ours, and
the vocabulary head, identical on both sides, is ~46% of the ``small`` flavor's FLOPs (~14% in ``kimi_vl_a3b``);
our edge is attention, where MLA's narrower values push the reference's SDPA onto its quadratic-memory math path
while ours pads them and stays on the flash kernel, and that edge grows with the row.

Before anything is timed, each baseline is checked to compute what the measured side computes (``benchmarks/_check.py``:
one line on stderr and exit status 1 otherwise):

* decoder, on the timed batch: logits within rtol = atol = 1e-4, the loss within rtol 1e-4, and every parameter's
  gradient (mapped to transformers' names) within 1e-4 of that gradient's largest entry;
* ViT, on the timed fp32 batch: the real patches' features within rtol = atol = 1e-5; and on a small batch of four
  mixed grids in fp64, features and every gradient within 1e-9 (gradients: of each tensor's largest entry).

Runs alternate between the two sides and keep each side's best time, so load from other processes hits both.
Prints one JSON line, with the largest differences the checks found.

``compiled_decoder_speedup`` (:func:`bench_compiled_decoder`): tokens/s of the ``small`` decoder's forward + backward
with compiled blocks (``compile: true``, parallel/compile.py) over the same decoder eager, same weights, at each of
``--compile-seqs`` (one row each), in fp32 and, as ``compiled_decoder_speedup_bf16``, with bf16 parameters.

    python benchmarks/model_throughput.py [--rows 1 --seq 4096 --repeats 3 --threads 1]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time

import torch
import torch.nn.functional as F

from model.attention import apply_rotary, rope_angles_2d
from model.decoder import MoEDecoder
from model.hf import export_state_dict
from model.registry import FLAVORS, build_model
from model.vision import MoonViT, interpolate_pos_table
from parallel.compile import apply_compile

try:
    from benchmarks._check import require_close, require_close_scaled
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from _check import require_close, require_close_scaled

# Kimi-VL-like mix of native resolutions (patch grids), from a full 32 x 32 page down to a small thumbnail.
VIT_GRIDS = [(32, 32), (16, 24), (8, 8), (12, 20), (24, 16), (8, 32), (20, 12), (4, 8)]
# A small mix of the same kind for the fp64 check of the padded tower (the timed batch in fp64 takes ~20 s).
VIT_CHECK_GRIDS = [(8, 8), (4, 8), (12, 20), (6, 10)]
# Tolerances of the baseline checks (rtol and atol; for gradients, of each tensor's largest entry). Measured at the
# default sizes: decoder logits 2.8e-6, gradients 2e-6; vit features 9.5e-7 (fp32); fp64 gradients ~1e-11.
DECODER_TOL = 1e-4
VIT_TOL = 1e-5
VIT_FP64_TOL = 1e-9


def best_of(fns: list, repeats: int) -> list[float]:
    """Best wall time (s) of each no-arg callable, interleaved across repeats after one warm-up each."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


# Compiled vs eager, checked before any timing. fp32: the logits and every gradient within 1e-5 relative (fused
# kernels change the rounding only). bf16: eager rounds every op's output to bf16 where fused kernels keep fp32
# inside, and a token whose top-k experts nearly tie may be routed differently, so the two differ by bf16's own
# error (~0.1 relative on the gradients); the check is that the compiled step is no further from the same step in
# fp32 than the eager bf16 step is (logits and all gradients together, within 10% of eager's distance).
FP32_TOLERANCE = 1e-5
BF16_MARGIN = 1.1


def bench_compiled_decoder(seqs: list[int], repeats: int, dtype: torch.dtype, profile: bool = False) -> dict:
    """``compiled_decoder_speedup``: forward + backward of the ``small`` decoder (one row of ``seq`` tokens, output
    head and cross-entropy included) with every layer compiled, over the same decoder eager, same weights, same run.

    Each row length is compiled afresh (a training stage has one row length, so its graphs are static). Compiled
    and eager must agree first (:data:`FP32_TOLERANCE`, :data:`BF16_MARGIN`), or the run exits non-zero without
    timing. With ``profile``, one more step of each side is profiled: the shares of its CPU time in matmuls, in the
    attention kernels, in compiled graphs' own kernels and in the other operators.
    """
    torch.manual_seed(0)
    eager = build_model(FLAVORS["small"]).decoder
    for param in eager.parameters():  # as parallelize does: parameters in the run's dtype, buffers kept
        param.data = param.data.to(dtype)
    vocab = FLAVORS["small"].decoder.vocab_size
    suffix = "" if dtype == torch.float32 else "_bf16"
    speedups, out = {}, {}
    for seq in seqs:
        torch._dynamo.reset()  # fresh, static graphs for this row length
        torch._dynamo.utils.counters.clear()
        compiled = copy.deepcopy(eager)
        apply_compile(compiled)
        ids = torch.randint(0, vocab, (1, seq))
        labels = torch.randint(0, vocab, (1, seq))

        def step(decoder, ids=ids, labels=labels):
            decoder.zero_grad(set_to_none=True)
            logits = decoder.logits(decoder(ids)[0])
            F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
            return logits.detach()

        start = time.perf_counter()
        got = step(compiled), grads_of(compiled)
        compile_s = time.perf_counter() - start
        want = step(eager), grads_of(eager)
        errors = {"logits": relative_error(got[0], want[0]), "gradients": relative_error(got[1], want[1])}
        if dtype == torch.float32:
            per_param = {name: relative_error(p.grad, q.grad) for (name, p), q in
                         zip(compiled.named_parameters(), eager.parameters(), strict=True)}
            failed = max({**errors, **per_param}.items(), key=lambda item: item[1])
            if failed[1] > FP32_TOLERANCE:
                raise SystemExit(f"compiled and eager decoders disagree at seq {seq} (fp32): {failed[0]} relative "
                                 f"error {failed[1]:.2e} > {FP32_TOLERANCE:.0e}; not timing")
        else:
            reference = copy.deepcopy(eager)
            reference.float()
            exact = step(reference), grads_of(reference)
            del reference
            for i, part in enumerate(("logits", "gradients")):
                ours, theirs = relative_error(got[i], exact[i]), relative_error(want[i], exact[i])
                errors[f"{part}_vs_fp32"] = {"compiled": round(ours, 4), "eager": round(theirs, 4)}
                if ours > BF16_MARGIN * theirs:
                    raise SystemExit(f"compiled bf16 decoder is further from fp32 than eager bf16 at seq {seq}: "
                                     f"{part} relative error {ours:.3e} > {BF16_MARGIN} x {theirs:.3e}; not timing")
        del got, want
        (compiled_s, eager_s), (compiled_cpu, eager_cpu) = best_times(
            [functools.partial(step, compiled), functools.partial(step, eager)], repeats)
        speedups[str(seq)] = round(eager_s / compiled_s, 3)
        out[f"compiled_decoder{suffix}_{seq}"] = {
            "eager_tok_s": round(seq / eager_s, 1), "compiled_tok_s": round(seq / compiled_s, 1),
            "speedup_by_cpu_time": round(eager_cpu / compiled_cpu, 3),
            "rel_error_vs_eager": {k: float(f"{v:.2e}") for k, v in errors.items() if not isinstance(v, dict)},
            **{k: v for k, v in errors.items() if isinstance(v, dict)}, "first_step_s": round(compile_s, 1),
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
        if profile:
            out[f"compiled_decoder{suffix}_{seq}"]["cpu_time_shares"] = {
                "eager": time_shares(functools.partial(step, eager)),
                "compiled": time_shares(functools.partial(step, compiled))}
        print(json.dumps({f"compiled_decoder{suffix}_{seq}": out[f"compiled_decoder{suffix}_{seq}"]}),
              file=sys.stderr, flush=True)
    return {f"compiled_decoder_speedup{suffix}": speedups, **out}


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"}


def time_shares(fn) -> dict[str, float]:
    """Shares of one call's self CPU time: matmuls (the grouped GEMM's own loop included), the attention kernels,
    compiled graphs' own kernels (their extern matmuls count as matmuls), other operators, and the rest (Python,
    autograd, Dynamo's guards)."""
    with torch.profiler.profile() as prof:
        fn()
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        kind = ("matmul" if name in MATMULS else "attention" if "flash_attention" in name
                else "compiled_graphs" if name.startswith("## Call CompiledFxGraph")
                else "other_ops" if name.startswith("aten::") else "rest")
        shares[kind] = shares.get(kind, 0.0) + event.self_cpu_time_total
    total = sum(shares.values())
    return {kind: round(time / total, 3) for kind, time in sorted(shares.items())}


def grads_of(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter's gradient, flattened into one fp32 vector."""
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def best_times(fns: list, repeats: int) -> tuple[list[float], list[float]]:
    """:func:`best_of`, also keeping each callable's best process CPU time (all threads): on a machine shared with
    other jobs it moves far less than the wall time, whose best-of still needs a quiet moment for each side."""
    wall, cpu = [float("inf")] * len(fns), [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[i] = min(wall[i], time.perf_counter() - start)
            cpu[i] = min(cpu[i], time.process_time() - start_cpu)
    return wall, cpu


def hf_reference(decoder: MoEDecoder, flavor: str):
    """transformers' DeepseekV3ForCausalLM holding ``decoder``'s weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from model.hf import hf_config

    args = FLAVORS[flavor]
    config = hf_config("deepseek_v3", args)
    config = DeepseekV3Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    reference = DeepseekV3ForCausalLM(config)
    ours = {f"decoder.{name}": t for name, t in decoder.state_dict().items()}
    theirs = export_state_dict(ours, "deepseek_v3", args, fused_experts=True)
    missing, unexpected = reference.load_state_dict(theirs, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights did not map: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return reference


def hf_named_grads(decoder: MoEDecoder) -> dict[str, torch.Tensor]:
    """``decoder``'s gradients under transformers' names (the weight export is renames, concatenations and splits,
    so it maps gradients exactly); buffers, which have none, as zeros."""
    params = dict(decoder.named_parameters())
    ours = {f"decoder.{name}": params[name].grad if name in params else torch.zeros_like(t)
            for name, t in decoder.state_dict().items()}
    return export_state_dict(ours, "deepseek_v3", FLAVORS["small"], fused_experts=True)


def check_decoder(decoder: MoEDecoder, reference, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """One forward + backward of each side on the timed batch: logits, loss and every gradient must agree."""
    for module in (decoder, reference):
        module.zero_grad(set_to_none=True)
    ours = decoder.logits(decoder(ids)[0])
    theirs = reference(ids).logits
    ours_loss = F.cross_entropy(ours.flatten(0, 1), labels.flatten())
    their_loss = F.cross_entropy(theirs.flatten(0, 1), labels.flatten())
    ours_loss.backward()
    their_loss.backward()
    diff = require_close("decoder logits, ours vs transformers", ours, theirs, DECODER_TOL, DECODER_TOL)
    require_close("decoder loss, ours vs transformers", ours_loss, their_loss, DECODER_TOL, 0.0)
    mapped = hf_named_grads(decoder)
    their_grads = {name: p.grad for name, p in reference.named_parameters()}
    grad_diff = require_close_scaled("decoder gradients, ours vs transformers",
                                     {name: mapped[name] for name in their_grads}, their_grads, DECODER_TOL)
    for module in (decoder, reference):
        module.zero_grad(set_to_none=True)
    return {"decoder_logits_max_abs_diff": diff, "decoder_grad_max_rel_diff": grad_diff}


def bench_decoder(rows: int, seq: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(FLAVORS["small"])
    decoder = model.decoder
    reference = hf_reference(decoder, "small")
    vocab = FLAVORS["small"].decoder.vocab_size
    ids = torch.randint(0, vocab, (rows, seq))
    labels = torch.randint(0, vocab, (rows, seq))

    def ours_step():
        decoder.zero_grad(set_to_none=True)
        logits = decoder.logits(decoder(ids)[0])
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()

    def hf_step():
        reference.zero_grad(set_to_none=True)
        logits = reference(ids).logits
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()

    checked = check_decoder(decoder, reference, ids, labels)
    ours_s, hf_s = best_of([ours_step, hf_step], repeats)
    tokens = rows * seq
    return {"decoder_tokens": tokens, "decoder_ours_tok_s": round(tokens / ours_s, 1),
            "decoder_hf_tok_s": round(tokens / hf_s, 1), "decoder_speedup_vs_hf": round(hf_s / ours_s, 2),
            **checked,
            "hf_attn_implementation": reference.config._attn_implementation,
            "hf_experts_implementation": reference.config._experts_implementation}


def padded_vit_forward(vit: MoonViT, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """The tower on images padded to the longest one: ``pixels [N, L, p*p*C]`` -> ``[N, L, hidden]``.

    :meth:`MoonViT.forward`'s modules and math on a padded batch: the same patch embedding (``embed_patches``, patches
    flattened as (y, x, channel)), the same interpolated position table and 2D RoPE per image, and one attention call
    over the batch whose padded keys are masked out, so real patches get the features the packed tower gives them
    (checked before timing), at the cost of ``N`` images of the largest size.
    """
    images, length, _ = pixels.shape
    x = vit.embed_patches(pixels.flatten(0, 1)).view(images, length, -1)
    pos = x.new_zeros(x.shape)
    rows = torch.zeros(images, length, dtype=torch.long)
    cols = torch.zeros(images, length, dtype=torch.long)
    mask = torch.zeros(images, 1, 1, length, dtype=torch.bool)
    for i, (h, w) in enumerate(grids):
        pos[i, : h * w] = interpolate_pos_table(vit.pos_table, h, w)
        rows[i, : h * w] = torch.arange(h).repeat_interleave(w)
        cols[i, : h * w] = torch.arange(w).repeat(h)
        mask[i, ..., : h * w] = True
    x = x + pos
    angles = rope_angles_2d(rows.flatten(), cols.flatten(), vit.head_dim, vit.rope_theta) if vit.use_rope else None
    for block in vit.blocks:
        q, k, v = block.qkv(block.norm1(x)).view(images * length, 3, -1, vit.head_dim).unbind(1)
        if angles is not None:
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        q, k, v = (t.view(images, length, -1, vit.head_dim).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(images, length, -1)
        x = x + block.proj(attn)
        x = x + block.fc2(F.gelu(block.fc1(block.norm2(x)), approximate="tanh"))
    return vit.norm(x)


def vit_inputs(grids: list[tuple[int, int]], patch_dim: int, dtype: torch.dtype = torch.float32):
    """Random normalized patches of ``grids``: packed ``[patches, patch_dim]`` and the same padded ``[N, L, dim]``."""
    lengths = [h * w for h, w in grids]
    packed = torch.randn(sum(lengths), patch_dim, dtype=dtype)
    padded = packed.new_zeros(len(grids), max(lengths), patch_dim)
    for i, image in enumerate(packed.split(lengths)):
        padded[i, : len(image)] = image
    return packed, padded


def padded_real(out: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """The real patches' rows of a padded output, packed in image order."""
    return torch.cat([o[: h * w] for o, (h, w) in zip(out, grids, strict=True)])


def check_vit(vit: MoonViT, packed: torch.Tensor, padded: torch.Tensor) -> float:
    """The padded tower must compute the packed one's features: on the timed fp32 batch within
    :data:`VIT_TOL`, and, features and every gradient, on a small fp64 batch within :data:`VIT_FP64_TOL` (fp32
    gradients differ by ~5e-3 of their largest entry between any two summation orders, fp64 ones by ~1e-11)."""
    with torch.no_grad():
        diff = require_close("vit features, packed vs padded (fp32)", vit(packed, torch.tensor(VIT_GRIDS)),
                             padded_real(padded_vit_forward(vit, padded, VIT_GRIDS), VIT_GRIDS), VIT_TOL, VIT_TOL)
    exact = copy.deepcopy(vit).double()
    small, small_padded = vit_inputs(VIT_CHECK_GRIDS, packed.shape[1], torch.float64)
    ours = exact(small, torch.tensor(VIT_CHECK_GRIDS))
    theirs = padded_real(padded_vit_forward(exact, small_padded, VIT_CHECK_GRIDS), VIT_CHECK_GRIDS)
    require_close("vit features, packed vs padded (fp64)", ours, theirs, VIT_FP64_TOL, VIT_FP64_TOL)
    names, params = zip(*exact.named_parameters(), strict=True)

    def grads(out: torch.Tensor) -> dict[str, torch.Tensor]:  # a parameter left out of the graph gets zeros
        return dict(zip(names, torch.autograd.grad(out.square().mean(), params, allow_unused=True,
                                                   materialize_grads=True), strict=True))

    require_close_scaled("vit gradients, packed vs padded (fp64)", grads(ours), grads(theirs), VIT_FP64_TOL)
    return diff


def bench_vit(repeats: int) -> dict:
    torch.manual_seed(0)
    vit = build_model(FLAVORS["small"]).vision
    lengths = [h * w for h, w in VIT_GRIDS]
    grid_hw = torch.tensor(VIT_GRIDS)
    packed, padded = vit_inputs(VIT_GRIDS, 3 * vit.patch_size**2)

    def packed_step():
        vit.zero_grad(set_to_none=True)
        vit(packed, grid_hw).square().mean().backward()

    def padded_step():
        vit.zero_grad(set_to_none=True)
        padded_real(padded_vit_forward(vit, padded, VIT_GRIDS), VIT_GRIDS).square().mean().backward()

    diff = check_vit(vit, packed, padded)
    packed_s, padded_s = best_of([packed_step, padded_step], repeats)
    return {"vit_images": len(VIT_GRIDS), "vit_patches": sum(lengths),
            "vit_padded_patches": len(lengths) * max(lengths),
            "vit_packed_ms": round(packed_s * 1e3, 1), "vit_padded_ms": round(padded_s * 1e3, 1),
            "vit_packed_speedup_vs_padded": round(padded_s / packed_s, 2), "vit_max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile-seqs", default="2048,8192", help="rows of compiled_decoder_speedup ('': skip)")
    parser.add_argument("--compile-dtypes", default="float32,bfloat16", help="parameter dtypes of that comparison")
    parser.add_argument("--only-compile", action="store_true", help="run only the compiled-decoder comparison")
    parser.add_argument("--compile-profile", action="store_true", help="where that comparison's time goes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "model_throughput", "flavor": "small", "threads": torch.get_num_threads()}
    if not args.only_compile:
        result.update(bench_decoder(args.rows, args.seq, args.repeats))
        result.update(bench_vit(args.repeats))
    for dtype in filter(None, args.compile_dtypes.split(",")):
        seqs = [int(seq) for seq in args.compile_seqs.split(",") if seq]
        result.update(bench_compiled_decoder(seqs, args.repeats, getattr(torch, dtype), args.compile_profile)
                      if seqs else {})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
