"""The next-token loss, fused with the output projection and computed in chunks of tokens.

``linear_cross_entropy_sum(hidden, weight, targets)`` is ``F.cross_entropy(hidden @ weight.T, targets,
reduction="sum")`` (positions whose target is ``IGNORE_INDEX`` count for nothing) without ever holding the logits
of more than ``chunk_tokens`` tokens: at 8K tokens and a 163,840-token vocabulary one fp32 logits buffer is 5 GiB,
and an unfused loss keeps about four of them alive through its backward.

Each chunk's logits are computed in fp32, turned into the loss and, when a gradient is wanted, into the chunk's
gradients right away (Liger-Kernel's fused linear cross-entropy, written in torch so CPU and GPU share it):

* ``d loss / d logits = softmax(logits) - onehot(target)`` (zero on ignored positions), computed in place;
* ``d loss / d hidden[chunk] = dlogits @ weight`` and ``d loss / d weight += dlogits.T @ hidden[chunk]``.

The backward then only scales the stored gradients by the incoming one. Memory: one chunk's logits plus gradients
the size of ``hidden`` and of ``weight`` (which autograd would hold anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.layers import IGNORE_INDEX, masked_targets

__all__ = ["DEFAULT_CHUNK_TOKENS", "linear_cross_entropy_sum", "masked_targets", "reference_cross_entropy_sum"]

DEFAULT_CHUNK_TOKENS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                grad_enabled: bool):
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        want_weight = grad_enabled and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = hidden[start : start + chunk_tokens]
            target = targets[start : start + chunk_tokens]
            logits = (rows @ weight.t()).float()  # [chunk, vocab]
            counted = target != IGNORE_INDEX
            index = target.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1)
            total = total + ((lse - logits.gather(1, index).squeeze(1)) * counted).sum()
            if not (want_hidden or want_weight):
                continue
            dlogits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            dlogits.scatter_add_(1, index, -torch.ones_like(index, dtype=dlogits.dtype))
            dlogits.mul_(counted.unsqueeze(1))
            dlogits = dlogits.to(hidden.dtype)
            if want_hidden:
                grad_hidden[start : start + chunk_tokens] = dlogits @ weight
            if want_weight:
                grad_weight.addmm_(dlogits.t().float(), rows.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, in chunks (see the module docstring).

    Args:
        hidden: ``[..., H]`` final hidden states (after the last norm).
        weight: ``[V, H]`` output projection.
        targets: ``int64 [...]`` next-token ids, :data:`IGNORE_INDEX` where no loss is taken.
        chunk_tokens: Tokens whose logits exist at once.

    Returns:
        The fp32 scalar sum over counted positions.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_tokens,
                                     torch.is_grad_enabled())


def reference_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused loss the chunked one must equal (tests and benchmarks): all logits at once, fp32."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
