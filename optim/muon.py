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


def ns_prepare(update: torch.Tensor, hp: MuonHParams) -> tuple[torch.Tensor, bool]:
    """Newton-Schulz's start ``X``: the update in ``ns_dtype``, wide (transposed if it has more rows than columns:
    the Gram matrix is then the smaller one), contiguous, divided by its Frobenius norm. Returns ``(X, transposed)``.

    ``X`` is made contiguous so that a block of its rows is multiplied exactly as in the whole product (a non-
    contiguous transposed view can take another bf16 GEMM path): the distributed optimizer computes row blocks of one
    matrix on several ranks and must get the single-process result."""
    transposed = update.shape[0] > update.shape[1]
    x = update.to(hp.ns_dtype)
    x = (x.T if transposed else x).contiguous()
    return x / x.norm().clamp(min=hp.eps), transposed


def ns_gram_rows(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo:hi`` of the Gram matrix ``A = X X^T`` (each element one full dot product, as in ``X @ X.T``)."""
    return x[lo:hi] @ x.T


def ns_step_rows(x: torch.Tensor, gram: torch.Tensor, lo: int, hi: int, hp: MuonHParams) -> torch.Tensor:
    """Rows ``lo:hi`` of one quintic step ``a X + (b A + c A^2) X`` from the whole ``X`` and ``A``."""
    a, b, c = hp.ns_coefficients
    poly = torch.addmm(gram[lo:hi], gram[lo:hi], gram, beta=b, alpha=c)
    return torch.addmm(x[lo:hi], poly, x, beta=a)


def newton_schulz(update: torch.Tensor, hp: MuonHParams) -> torch.Tensor:
    """Approximately orthogonalize a 2-D matrix (the "zeroth power" ``U S^0 V^T`` of its SVD)."""
    x, transposed = ns_prepare(update, hp)
    rows = x.shape[0]
    for _ in range(hp.ns_steps):
        x = ns_step_rows(x, ns_gram_rows(x, 0, rows), 0, rows, hp)
    return x.T if transposed else x


def newton_schulz_flops(rows: int, cols: int, steps: int = 5) -> int:
    """Multiply-add FLOPs of :func:`newton_schulz` on a ``rows x cols`` matrix (for load balancing)."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)


def muon_lr_scale(rows: int, cols: int) -> float:
    """Moonlight's update scale: matches the RMS of an AdamW update (``match_rms_adamw`` in torch)."""
    return 0.2 * math.sqrt(max(rows, cols))


@torch.no_grad()
def muon_momentum_(grad: torch.Tensor, momentum: torch.Tensor, hp: MuonHParams) -> torch.Tensor:
    """Update the momentum buffer in place and return the update Newton-Schulz orthogonalizes (elementwise: any
    piece of a matrix gives that piece of the result)."""
    momentum.lerp_(grad, 1 - hp.momentum)
    return grad.lerp(momentum, hp.momentum) if hp.nesterov else momentum


@torch.no_grad()
def muon_apply_(param: torch.Tensor, ortho: torch.Tensor, lr: float, weight_decay: float,
                shape: tuple[int, int]) -> None:
    """Decoupled weight decay, then the scaled orthogonalized step (elementwise; ``shape`` is the whole matrix's)."""
    param.mul_(1 - lr * weight_decay)
    param.add_(ortho.to(param.dtype), alpha=-lr * muon_lr_scale(*shape))


@torch.no_grad()
def muon_update_(param: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, lr: float, weight_decay: float,
                 hp: MuonHParams) -> None:
    """One Muon step of a single matrix ``param`` (a view; updated in place) with its momentum buffer."""
    update = muon_momentum_(grad, momentum, hp)
    muon_apply_(param, newton_schulz(update, hp), lr, weight_decay, tuple(param.shape))


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
