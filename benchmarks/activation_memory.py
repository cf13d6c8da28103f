"""Activation checkpointing policies on a long sequence: activation bytes kept for the backward, and step time.

Two MoE decoder layers of the ``small`` flavor on one row of ``--seq`` tokens (two documents). For each policy
(``none``, ``selective``, ``full``): the activation bytes alive after the forward (torch's ``MemTracker``; the
peak of what the backward needs, since the backward only frees) and the best forward+backward time. Prints one JSON
line with both per policy, ``selective_saving`` (1 - selective / none bytes; goal >= 0.4) and
``selective_time_overhead`` (selective / none time - 1; goal <= 0.25).

    python benchmarks/activation_memory.py [--seq 4096 --layers 2 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from model.attention import rope_angles_1d
from model.decoder import DecoderLayer
from model.registry import FLAVORS
from parallel.activation_checkpoint import POLICIES, ActivationCheckpointing
from parallel.memory import measure_activation_bytes


def build_layers(count: int) -> nn.ModuleList:
    args = FLAVORS["small"].decoder
    torch.manual_seed(0)
    layers = nn.ModuleList([DecoderLayer(args, use_moe=True) for _ in range(count)])
    with torch.no_grad():
        for param in layers.parameters():
            param.normal_(0.0, 0.02)
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
