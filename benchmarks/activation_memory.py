"""Activation checkpointing policies on a long sequence: activation bytes kept for the backward, and step time.

Two MoE decoder layers of the ``small`` flavor on one row of ``--seq`` tokens (two documents). For each policy
(``none``, ``selective``, ``full``): the activation bytes alive after the forward (torch's ``MemTracker``; the
peak of what the backward needs, since the backward only frees) and the best forward+backward time. Prints one JSON
line with both per policy, ``selective_saving`` (1 - selective / none bytes; goal >= 0.4) and
``selective_time_overhead`` (selective / none time - 1; goal <= 0.25).

And the loss: ``loss_peak_bytes_ratio``, the peak tensor bytes of the next-token loss's forward and backward fused
and chunked (train/loss.py, ``loss_chunk_tokens`` tokens' logits at a time) over the unfused loss holding the
whole logits, at ``--loss-tokens`` tokens with ``kimi_vl_a3b``'s vocabulary and width (goal <= 0.25). Measured
with ``MemTracker`` on ``meta`` tensors (the unfused loss needs many GiB there).

Before anything is measured, each side is checked to compute what its baseline computes (``benchmarks/_check.py``:
one line on stderr and exit status 1 otherwise):

* the policies, on the benchmark's own row: ``selective`` and ``full`` give the output of ``none`` within rtol = atol
  = 1e-6 and the gradients of the input and of every parameter within 1e-6 of each one's largest entry (fp32;
  recomputation repeats the same kernels, so they agree to the bit here);
* the losses, on real values at a small size (512 tokens, vocabulary 4096): the chunked sum equals the unfused one
  within rtol 1e-5, and so do the gradients of the hidden states and of the output weight (within 1e-5 of each one's
  largest entry).

    python benchmarks/activation_memory.py [--seq 4096 --layers 2 --repeats 3 --loss-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

from model.attention import rope_angles_1d
from model.decoder import DecoderLayer
from model.registry import FLAVORS
from parallel.activation_checkpoint import POLICIES, ActivationCheckpointing
from parallel.memory import measure_activation_bytes
from train.loss import DEFAULT_CHUNK_TOKENS, linear_cross_entropy_sum, reference_cross_entropy_sum

try:
    from benchmarks._check import require_close, require_close_scaled
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from _check import require_close, require_close_scaled

POLICY_TOL = 1e-6  # rtol and atol of the outputs; of each gradient's largest entry
LOSS_TOL = 1e-5  # rtol of the loss; of each gradient's largest entry


def build_layers(count: int) -> nn.ModuleList:
    args = FLAVORS["small"].decoder
    torch.manual_seed(0)
    layers = nn.ModuleList([DecoderLayer(args, use_moe=True) for _ in range(count)])
    with torch.no_grad():
        for param in layers.parameters():
            param.normal_(0.0, 0.02)
    return layers


def peak_bytes(run) -> int:
    """Peak tensor bytes (``MemTracker``) of ``run()``'s forward and backward."""
    tracker = MemTracker()
    with tracker:
        run().backward()
    return int(sum(by_type["Total"] for by_type in tracker.get_tracker_snapshot("peak").values()))


def measure_loss_peaks(tokens: int, chunk_tokens: int) -> dict[str, float]:
    """The fused, chunked loss against the unfused one: same values (checked on real tensors), then peak bytes."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(512, 64, generator=generator, requires_grad=True)
    weight = torch.randn(4096, 64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 4096, (512,), generator=generator)
    fused = linear_cross_entropy_sum(hidden, weight, targets, 64)
    unfused = reference_cross_entropy_sum(hidden, weight, targets)
    require_close("chunked loss vs unfused", fused, unfused, LOSS_TOL, 0.0)
    require_close_scaled("chunked loss gradients (hidden, weight) vs unfused",
                         torch.autograd.grad(fused, [hidden, weight]), torch.autograd.grad(unfused, [hidden, weight]),
                         LOSS_TOL)
    decoder = FLAVORS["kimi_vl_a3b"].decoder

    def run(loss):
        hidden = torch.empty(tokens, decoder.hidden_size, device="meta", requires_grad=True)
        weight = torch.empty(decoder.vocab_size, decoder.hidden_size, device="meta", requires_grad=True)
        return loss(hidden, weight, torch.zeros(tokens, dtype=torch.int64, device="meta"))

    chunked = peak_bytes(lambda: run(lambda h, w, t: linear_cross_entropy_sum(h, w, t, chunk_tokens)))
    whole = peak_bytes(lambda: run(reference_cross_entropy_sum))
    return {"loss_tokens": tokens, "loss_chunk_tokens": chunk_tokens,
            "loss_chunked_peak_gib": round(chunked / 2**30, 3), "loss_unfused_peak_gib": round(whole / 2**30, 3),
            "loss_peak_bytes_ratio": round(chunked / whole, 3)}


def check_policies(forward, inputs: torch.Tensor, layers: int) -> None:
    """``selective`` and ``full`` must compute what ``none`` computes: the output and every gradient."""
    results = {}
    for policy in POLICIES:
        blocks = build_layers(layers)
        ActivationCheckpointing(blocks).set_policy(policy)
        out = forward(blocks)
        wrt = [inputs, *blocks.parameters()]
        results[policy] = out.detach(), torch.autograd.grad(out.float().square().mean(), wrt)
    out, grads = results["none"]
    for policy in (p for p in POLICIES if p != "none"):
        require_close(f"{policy} checkpointing output vs none", results[policy][0], out, POLICY_TOL, POLICY_TOL)
        require_close_scaled(f"{policy} checkpointing gradients vs none", results[policy][1], grads, POLICY_TOL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loss-tokens", type=int, default=8192)
    parser.add_argument("--loss-chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    cli = parser.parse_args()
    args = FLAVORS["small"].decoder
    x = torch.randn(1, cli.seq, args.hidden_size, requires_grad=True)
    angles = rope_angles_1d(torch.arange(cli.seq), args.qk_rope_head_dim, args.rope_theta)
    cu_seqlens = torch.tensor([0, cli.seq // 2, cli.seq], dtype=torch.int32)

    def forward(layers: nn.ModuleList) -> torch.Tensor:
        hidden = x
        for layer in layers:
            hidden = layer(hidden, angles, cu_seqlens)[0]
        return hidden

    check_policies(forward, x, cli.layers)
    loss_figures = measure_loss_peaks(cli.loss_tokens, cli.loss_chunk_tokens)
    result = {"seq": cli.seq, "layers": cli.layers, "flavor": "small"}
    for policy in POLICIES:
        layers = build_layers(cli.layers)
        result[f"{policy}_activation_bytes"] = measure_activation_bytes(layers, lambda l=layers: forward(l), policy)
        timed = build_layers(cli.layers)
        ActivationCheckpointing(timed).set_policy(policy)
        best = float("inf")
        for _ in range(cli.repeats):
            start = time.perf_counter()
            forward(timed).square().mean().backward()
            best = min(best, time.perf_counter() - start)
        result[f"{policy}_step_s"] = round(best, 3)
    result["selective_saving"] = round(1 - result["selective_activation_bytes"] / result["none_activation_bytes"], 3)
    result["full_saving"] = round(1 - result["full_activation_bytes"] / result["none_activation_bytes"], 3)
    result["selective_time_overhead"] = round(result["selective_step_s"] / result["none_step_s"] - 1, 3)
    result["full_time_overhead"] = round(result["full_step_s"] / result["none_step_s"] - 1, 3)
    print(json.dumps({**result, **loss_figures}))


if __name__ == "__main__":
    main()
