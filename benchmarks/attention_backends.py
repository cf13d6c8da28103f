"""Attention over packed documents on CPU: our per-document SDPA backend vs one SDPA call with a block-diagonal
causal mask (the baseline a packed batch would otherwise need), forward + backward, same inputs, same run.

Before timing, both are checked to compute the same attention (``benchmarks/_check.py``: one line on stderr and exit
status 1 otherwise): outputs within rtol = atol = 1e-5, and the gradients of ``q``, ``k``, ``v`` (of ``out.sum()``)
within 1e-5 of each one's largest entry.

Prints one JSON line: times (ms), ``speedup_vs_masked`` (goal > 1: packing must not cost quadratic waste) and the
largest differences the check found, ``max_abs_diff`` (outputs) and ``grad_max_rel_diff``.

    python benchmarks/attention_backends.py [--seq 4096 --heads 8 --dim 64 --docs 4 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from model.attention import varlen_attention

try:
    from benchmarks._check import require_close, require_close_scaled
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from _check import require_close, require_close_scaled

# rtol and atol of the outputs; of each input's largest gradient entry for the gradients (measured: ~1e-6 at the
# default sizes).
TOL = 1e-5


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens[1:] - cu_seqlens[:-1])
    same_doc = doc[:, None] == doc[None, :]
    return same_doc & torch.ones(total, total, dtype=torch.bool).tril()


def masked_attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                                          attn_mask=mask)[0].transpose(0, 1)


def check_same(ours, masked, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """Outputs and input gradients of the two attentions must agree (see the module docstring)."""
    out_ours, out_masked = ours(*inputs), masked(*inputs)
    grads_ours = torch.autograd.grad(out_ours.sum(), inputs)
    grads_masked = torch.autograd.grad(out_masked.sum(), inputs)
    diff = require_close("attention outputs, per-document vs block mask", out_ours, out_masked, TOL, TOL)
    grad_diff = require_close_scaled("attention gradients (q, k, v), per-document vs block mask", grads_ours,
                                     grads_masked, TOL)
    return diff, grad_diff


def time_fwd_bwd(fn, inputs, repeats: int) -> float:
    """Best forward + backward time of ``fn(*inputs)`` in ms."""
    best = float("inf")
    for _ in range(repeats):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        out = fn(*inputs)
        out.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    cuts = sorted(torch.randperm(args.seq - 1)[: args.docs - 1].add(1).tolist())
    cu_seqlens = torch.tensor([0, *cuts, args.seq], dtype=torch.int32)
    q, k, v = (torch.randn(args.seq, args.heads, args.dim, requires_grad=True) for _ in range(3))
    mask = block_causal_mask(cu_seqlens, args.seq)

    def ours(a, b, c):
        return varlen_attention(a, b, c, cu_seqlens, causal=True)

    def masked(a, b, c):
        return masked_attention(a, b, c, mask)

    diff, grad_diff = check_same(ours, masked, [q, k, v])
    ours_ms = time_fwd_bwd(ours, [q, k, v], args.repeats)
    masked_ms = time_fwd_bwd(masked, [q, k, v], args.repeats)
    print(json.dumps({
        "benchmark": "attention_backends",
        "seq": args.seq, "heads": args.heads, "dim": args.dim, "docs": args.docs,
        "threads": torch.get_num_threads(),
        "per_document_sdpa_ms": round(ours_ms, 2),
        "block_mask_sdpa_ms": round(masked_ms, 2),
        "speedup_vs_masked": round(masked_ms / ours_ms, 2),
        "max_abs_diff": diff,
        "grad_max_rel_diff": grad_diff,
    }))


if __name__ == "__main__":
    main()
