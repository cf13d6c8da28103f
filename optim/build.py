"""Optimizer construction over the trainable parameters of a stage."""

from __future__ import annotations

import torch
from torch import nn

from train.config import OptimConfig


def split_decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters with and without weight decay: tensors of 2 or more dims (matrices, stacked experts,
    embeddings, the position table) decay; vectors and scalars (norms, biases, SigLIP temperature and bias) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only, so frozen ones are never touched (not even by weight decay)."""
    decay, no_decay = split_decay_groups(model)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
