"""Every loss of the framework: cross-entropy (one convention) and SigLIP's sigmoid loss, local or distributed.

Cross-entropy takes ``targets`` with :data:`IGNORE_INDEX` where no loss is taken (build them from labels and a loss
mask with :func:`masked_targets`) and returns a *sum*: callers divide by the global count of targets (all ranks, all
micro-batches), so that a step equals one process running the whole batch.

* :func:`cross_entropy_sum`: of logits the caller holds (the CoCa caption decoder's, fp32).
* :func:`linear_cross_entropy_sum`: of ``hidden @ weight.T``, fused with the output projection and chunked (the
  decoder's next-token loss: training, the pipeline's last stage through the loss the trainer hands it, and
  evaluation).
* :func:`caption_loss_sum`: the caption decoder's next-token loss over its texts (:func:`caption_loss_by_group`:
  the same per data source).
* :func:`siglip_loss`: SigLIP's sigmoid contrastive loss, over every rank's pairs when a process group exists.

The fused next-token loss ``linear_cross_entropy_sum(hidden, weight, targets)`` is ``cross_entropy_sum(hidden @
weight.T, targets)`` without ever holding the logits of more than ``chunk_tokens`` tokens: at 8K tokens and a
163,840-token vocabulary one fp32 logits buffer is 5 GiB, and an unfused loss keeps about four of them alive
through its backward.

Each chunk's logits are computed in fp32, turned into the loss and, when a gradient is wanted, into the chunk's
gradients right away (Liger-Kernel's fused linear cross-entropy, written in torch so CPU and GPU share it):

* ``d loss / d logits = softmax(logits) - onehot(target)`` (zero on ignored positions), computed in place;
* ``d loss / d hidden[chunk] = dlogits @ weight`` and ``d loss / d weight += dlogits.T @ hidden[chunk]``.

The backward then only scales the stored gradients by the incoming one. Memory: one chunk's logits plus gradients
the size of ``hidden`` and of ``weight`` (which autograd would hold anyway).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

# The convention lives with the model's layers because the pipeline (parallel/) builds targets too.
from model.layers import IGNORE_INDEX, masked_targets

__all__ = ["DEFAULT_CHUNK_TOKENS", "IGNORE_INDEX", "caption_loss_by_group", "caption_loss_sum", "cross_entropy_sum",
           "linear_cross_entropy_by_group", "linear_cross_entropy_sum", "masked_targets", "reference_cross_entropy_sum",
           "siglip_loss"]

DEFAULT_CHUNK_TOKENS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                grad_enabled: bool, groups: torch.Tensor | None = None, num_groups: int = 0):
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        want_weight = grad_enabled and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        # Per-group sums (e.g. per data source) of the same per-token losses: no extra logits are computed.
        by_group = torch.zeros(num_groups, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = hidden[start : start + chunk_tokens]
            target = targets[start : start + chunk_tokens]
            logits = (rows @ weight.t()).float()  # [chunk, vocab]
            counted = target != IGNORE_INDEX
            index = target.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1)
            per_token = (lse - logits.gather(1, index).squeeze(1)) * counted
            total = total + per_token.sum()
            if groups is not None:
                group = groups[start : start + chunk_tokens]
                by_group.index_add_(0, group.clamp(min=0).long(), per_token * (group >= 0))
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
        ctx.mark_non_differentiable(by_group)
        return total, by_group

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_by_group: torch.Tensor | None = None):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


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
    return linear_cross_entropy_by_group(hidden, weight, targets, None, 0, chunk_tokens)[0]


def linear_cross_entropy_by_group(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  groups: torch.Tensor | None, num_groups: int,
                                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_cross_entropy_sum` and, from the same per-token losses, their sums per group.

    Args:
        hidden, weight, targets, chunk_tokens: As :func:`linear_cross_entropy_sum`.
        groups: ``int [...]`` group id of each position (e.g. its data source), negative for none; or None.
        num_groups: Number of groups (ids ``0 .. num_groups - 1``).

    Returns:
        ``(total, by_group)``: the fp32 sum (differentiable, bit-identical to :func:`linear_cross_entropy_sum`) and
        ``fp32 [num_groups]`` sums per group (no gradient).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    flat_groups = groups.reshape(-1).to(targets.device) if groups is not None else None
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_tokens,
                                     torch.is_grad_enabled(), flat_groups, num_groups)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``logits [..., V]`` (taken in fp32) against ``targets [...]``, skipping
    :data:`IGNORE_INDEX`."""
    return _fp32_cross_entropy(logits, targets, "sum")


def _fp32_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy of ``logits [..., V]`` taken in fp32 against ``targets [...]``, 0 at :data:`IGNORE_INDEX`;
    ``reduction`` "sum", or "none" for ``targets``' shape."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction=reduction)
    return losses if reduction == "sum" else losses.view(targets.shape)


def reference_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused loss the chunked one must equal (tests and benchmarks): all logits at once, fp32."""
    return cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]) @ weight.t(), targets)


def caption_loss_sum(
    caption_logits: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of the caption decoder over real targets, and how many there are.

    Position ``t`` predicts token ``t + 1``; a target counts when ``text_mask[:, t + 1]`` is True.

    Args:
        caption_logits: ``[N, L, vocab]``.
        text_ids: ``int64 [N, L]``.
        text_mask: ``bool [N, L]``.

    Returns:
        ``(loss_sum, count)``: scalar fp32 sum and int64 scalar count of targets.
    """
    counted = text_mask[:, 1:]
    return cross_entropy_sum(caption_logits[:, :-1], masked_targets(text_ids[:, 1:], counted)), counted.sum()


def caption_loss_by_group(caption_logits: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                          pair_groups: torch.Tensor, num_groups: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`caption_loss_sum`'s sum and, from the same per-token losses (one pass over the logits), the sums per
    group of pairs: ``(fp32 scalar sum (differentiable), fp32 [num_groups] loss sums, fp32 [num_groups] target
    counts)`` (no gradient on the last two); ``pair_groups`` is ``int [N]``, negative for none."""
    counted = text_mask[:, 1:]
    per_token = _fp32_cross_entropy(caption_logits[:, :-1], masked_targets(text_ids[:, 1:], counted), "none")
    by_pair = per_token.detach().sum(1)
    return (per_token.sum(), _sum_by_group(by_pair, pair_groups, num_groups),
            _sum_by_group(counted.sum(1).float(), pair_groups, num_groups))


def _sum_by_group(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``values [N]`` summed per ``groups [N]`` id (negative ids dropped) into ``fp32 [num_groups]``."""
    groups = groups.to(values.device).long()
    kept = groups >= 0
    return torch.zeros(num_groups, dtype=torch.float32, device=values.device).index_add_(
        0, groups[kept], values[kept].float())


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, group: dist.ProcessGroup | None = None,
                image_groups: torch.Tensor | None = None, num_groups: int = 0) -> torch.Tensor:
    """SigLIP's sigmoid loss: every (image, text) pair is a binary problem, matched pairs positive.

    ``-sum(logsigmoid(labels * (exp(scale) * img @ txt.T + bias))) / N`` with ``labels = 2 I - 1`` over the ``N``
    pairs of the whole batch. With a process group of several ranks (the default group when one exists), each rank
    holds ``n`` pairs of it and scores its images against every rank's texts (gathered with autograd, so the
    texts' gradients return to their ranks); its result is its share: summed over ranks, exactly the loss of one
    process holding the whole batch, every rank's pairs negatives.

    Args:
        image_embeds: ``[n, E]`` normalized image embeddings (this rank's).
        text_embeds: ``[n, E]`` normalized text embeddings (this rank's; every rank holds ``n``).
        logit_scale: Scalar log-temperature.
        logit_bias: Scalar bias.
        group: The ranks sharing the batch; None for the default group, if any.
        image_groups: ``int [n]`` group of each of this rank's images (negative: none), to get the terms per group.
        num_groups: Number of groups.

    Returns:
        The scalar loss (this rank's share); with ``image_groups``, ``(loss, by_group)`` where ``by_group`` (fp32
        ``[num_groups]``, no gradient) sums the terms of each group's images (each image against every text;
        ``loss`` is all of them ``/ N``).
    """
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    texts = text_embeds
    if world > 1:
        texts = torch.cat(dist_nn.all_gather(text_embeds, group=dist.group.WORLD if group is None else group))
    logits = logit_scale.exp() * image_embeds @ texts.t() + logit_bias
    local, total = image_embeds.shape[0], texts.shape[0]
    first = dist.get_rank(group) * local if world > 1 else 0
    rows = torch.arange(local, device=logits.device)
    labels = -torch.ones_like(logits)
    labels[rows, first + rows] = 1.0
    terms = -F.logsigmoid(labels * logits)
    loss = terms.sum() / total
    if image_groups is None:
        return loss
    return loss, _sum_by_group(terms.detach().sum(1), image_groups, num_groups)
