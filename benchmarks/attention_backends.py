"""Attention over packed documents on CPU: our per-document SDPA backend vs one SDPA call with a block-diagonal
causal mask (the baseline a packed batch would otherwise need), forward + backward, same inputs, same run.

Prints one JSON line: times (ms), ``speedup_vs_masked`` (goal > 1: packing must not cost quadratic waste) and
``max_abs_diff`` between the two outputs.

    python benchmarks/attention_backends.py [--seq 4096 --heads 8 --dim 64 --docs 4 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from model.attention import varlen_attention


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens[1:] - cu_seqlens[:-1])
    same_doc = doc[:, None] == doc[None, :]
    return same_doc & torch.ones(total, total, dtype=torch.bool).tril()


def masked_attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
                                          attn_mask=mask)[0].transpose(0, 1)


def time_fwd_bwd(fn, inputs, repeats: int) -> tuple[float, torch.Tensor]:
    best = float("inf")
    for _ in range(repeats):
        for t in inputs:
            t.grad = None
        start = time.perf_counter()
        out = fn(*inputs)
        out.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best * 1e3, out.detach()


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
    ours_ms, ours = time_fwd_bwd(lambda a, b, c: varlen_attention(a, b, c, cu_seqlens, causal=True), [q, k, v],
                                 args.repeats)
    masked_ms, masked = time_fwd_bwd(lambda a, b, c: masked_attention(a, b, c, mask), [q, k, v], args.repeats)
    print(json.dumps({
        "benchmark": "attention_backends",
        "seq": args.seq, "heads": args.heads, "dim": args.dim, "docs": args.docs,
        "threads": torch.get_num_threads(),
        "per_document_sdpa_ms": round(ours_ms, 2),
        "block_mask_sdpa_ms": round(masked_ms, 2),
        "speedup_vs_masked": round(masked_ms / ours_ms, 2),
        "max_abs_diff": float((ours - masked).abs().max()),
    }))


if __name__ == "__main__":
    main()
