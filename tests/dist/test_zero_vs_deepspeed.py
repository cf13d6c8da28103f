"""Our ZeRO-1 AdamW equals DeepSpeed's ZeRO stage 1 (CPU, gloo, 2 ranks) on the same model and data."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from optim.distributed import ZeroOptimizer
from optim.muon import AdamWHParams
from tests.forked import run_ranks

LR, WD, CLIP, STEPS = 1e-2, 0.1, 1.0, 10


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(97, 24), nn.LayerNorm(24), nn.Linear(24, 40, bias=False), nn.GELU(),
                         nn.Linear(40, 97, bias=False))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    tokens = torch.randint(0, 97, (4, 16), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model: nn.Module, step: int, rank: int) -> torch.Tensor:
    inputs, targets = batch(step, rank)
    return nn.functional.cross_entropy(model(inputs).reshape(-1, 97), targets.reshape(-1))


def deepspeed_zero1(model: nn.Module, rank: int, world: int, port: int, lr: float, weight_decay: float, clip: float,
                    bf16: bool = False):
    """DeepSpeed's engine and optimizer for ``model`` with ZeRO stage 1 and torch's AdamW (decay on matrices only);
    ``bf16``: bf16 parameters with fp32 gradient accumulation, fp32 master partitions (its ``BF16_Optimizer``)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,  # DeepSpeed's default is 1.0 too; set explicitly so both sides agree
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": weight_decay, "torch_adam": True,
                                                  "adam_w_mode": True}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 1_000_000,
    }
    if bf16:
        config |= {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return engine, optimizer


def with_deepspeed(rank: int, world: int) -> dict:
    engine, _ = deepspeed_zero1(make_model(), rank, world, 29555, LR, WD, CLIP)
    losses = []
    for step in range(STEPS):
        loss = loss_of(engine, step, rank)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return {"params": {k: v.detach().clone() for k, v in engine.module.named_parameters()}, "losses": losses}


def with_ours(rank: int, world: int) -> dict:
    model = make_model()
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD, use_muon=False, adamw=AdamWHParams(0.9, 0.95, 1e-8),
                              group=dist.group.WORLD)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = loss_of(model, step, rank)
        (loss / world).backward()  # our reduction sums; DeepSpeed averages over ranks
        optimizer.step(max_grad_norm=CLIP)
        losses.append(float(loss))
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "losses": losses}


def test_zero1_adamw_equals_deepspeed_zero_stage1():
    theirs = run_ranks(with_deepspeed, 2)
    ours = run_ranks(with_ours, 2)
    for rank in range(2):
        assert ours[rank]["losses"][0] == theirs[rank]["losses"][0]  # same model, same data
        for a, b in zip(ours[rank]["losses"], theirs[rank]["losses"]):
            assert abs(a - b) <= 1e-6 * abs(b)
        for name, expected in theirs[rank]["params"].items():
            error = float((ours[rank]["params"][name] - expected).norm() / expected.norm())
            assert error <= 1e-6, f"{name}: relative error {error:.2e}"
