"""Small building blocks shared by the towers: RMSNorm, the SwiGLU MLP, and the default weight initialization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.init import ParamInit

__all__ = ["IGNORE_INDEX", "RMSNorm", "SwiGLU", "init_default_weights", "masked_targets"]

# The target id a cross-entropy skips (torch's default): every loss of the project masks positions with it.
IGNORE_INDEX = -100


def masked_targets(labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``labels`` with the positions outside ``loss_mask`` set to :data:`IGNORE_INDEX` (static shapes: nothing is
    cut out, so nothing waits for the device)."""
    return labels.masked_fill(~loss_mask, IGNORE_INDEX)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the input dtype (as DeepSeek-V3 does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dim of ``x`` and scale it by ``weight``."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def init_weights(self) -> None:
        """Reset the scale to ones."""
        nn.init.ones_(self.weight)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases (dense layers and shared experts)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP to the last dim of ``x``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@torch.no_grad()
def init_default_weights(module: nn.Module, std: float, init: ParamInit) -> None:
    """Initialize the standard layers of ``module`` in place, each parameter from its own named generator.

    Linear, convolution and embedding weights get ``normal(0, std)``, their biases zeros; LayerNorm and RMSNorm
    scales ones and shifts zeros. Parameters owned directly by custom modules (position tables, stacked experts,
    learned queries) are left to the caller.

    Args:
        module: The module tree to initialize.
        std: Standard deviation of the weight matrices.
        init: The initializer named at ``module``'s path.
    """
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear | nn.Conv2d | nn.Embedding):
            init.child(name).normal_(sub.weight, std, "weight")
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            if sub.weight is not None:
                nn.init.ones_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, RMSNorm):
            sub.init_weights()
