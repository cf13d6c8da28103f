"""Per-matrix update rules: Muon with the Moonlight rule, and AdamW.

Both are pure functions of one unit's gradient and state, so the distributed optimizer (:mod:`optim.distributed`)
can apply them to whatever units a rank owns and get exactly the single-process result.

Muon, for one 2-D matrix ``W`` with gradient ``G`` (as in ``torch.optim.Muon`` and Moonlight):

* momentum ``B <- mu B + (1 - mu) G``; Nesterov ``U = (1 - mu) G + mu B``. (Moonlight writes ``B <- mu B + G``, a
  rescaling of the same buffer by ``1 / (1 - mu)``, which the normalization below removes.)
* ``O = NS5(U)``: ``X = U / ||U||_F`` (transposed if it has more rows than columns), then 5 quintic Newton-Schulz
  steps ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` and ``(a, b, c) = (3.4445, -4.7750, 2.0315)``.
* decoupled weight decay ``W <- W (1 - lr wd)``, then ``W <- W - lr * 0.2 * sqrt(max(rows, cols)) * O``: the
  0.2 sqrt(max) factor gives the update the RMS of an AdamW update, so Muon reuses AdamW's lr and weight decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@dataclass(frozen=True)
class MuonHParams:
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS
    eps: float = 1e-7
    # Newton-Schulz runs in bf16 in Moonlight and torch.optim.Muon; float32 is exact to a tighter tolerance.
    ns_dtype: torch.dtype = torch.bfloat16


@dataclass(frozen=True)
class AdamWHParams:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


def newton_schulz(update: torch.Tensor, hp: MuonHParams) -> torch.Tensor:
    """Approximately orthogonalize a 2-D matrix (the "zeroth power" ``U S^0 V^T`` of its SVD)."""
    a, b, c = hp.ns_coefficients
    x = update.to(hp.ns_dtype)
    transposed = update.shape[0] > update.shape[1]
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=hp.eps)
    for _ in range(hp.ns_steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if transposed else x


def newton_schulz_flops(rows: int, cols: int, steps: int = 5) -> int:
    """Multiply-add FLOPs of :func:`newton_schulz` on a ``rows x cols`` matrix (for load balancing)."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)


def muon_lr_scale(rows: int, cols: int) -> float:
    """Moonlight's update scale: matches the RMS of an AdamW update (``match_rms_adamw`` in torch)."""
    return 0.2 * math.sqrt(max(rows, cols))


@torch.no_grad()
def muon_update_(param: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, lr: float, weight_decay: float,
                 hp: MuonHParams) -> None:
    """One Muon step of a single matrix ``param`` (a view; updated in place) with its momentum buffer."""
    momentum.lerp_(grad, 1 - hp.momentum)
    update = grad.lerp(momentum, hp.momentum) if hp.nesterov else momentum
    ortho = newton_schulz(update, hp)
    param.mul_(1 - lr * weight_decay)
    param.add_(ortho.to(param.dtype), alpha=-lr * muon_lr_scale(*param.shape))


@torch.no_grad()
def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, weight_decay: float, hp: AdamWHParams) -> None:
    """One AdamW step (``step`` counted from 1) in ``torch.optim.AdamW``'s operation order."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - hp.beta1)
    exp_avg_sq.mul_(hp.beta2).addcmul_(grad, grad, value=1 - hp.beta2)
    bias_correction1 = 1 - hp.beta1**step
    bias_correction2 = 1 - hp.beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(hp.eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
