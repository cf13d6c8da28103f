"""Data parallelism: gradients summed over the data-parallel group in flat buckets.

The trainer scales each rank's loss by the global number of loss tokens, so a SUM of gradients is the exact
gradient of the global token-mean loss (the same as one process on the whole global batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

# Gradients are flattened into buckets of about this size: few collectives, bounded extra memory.
BUCKET_BYTES = 25 * 1024 * 1024


def reduce_gradients(params: list[nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of ``params`` over ``group`` in place.

    A missing gradient (e.g. an expert no token of this rank chose) becomes zeros even on a single rank, so the
    optimizer treats every trainable parameter the same whatever the data-parallel size.
    """
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    if group is None or dist.get_world_size(group) == 1:
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for param in params:
        bucket.append(param.grad)
        size += param.grad.numel() * param.grad.element_size()
        if size >= BUCKET_BYTES:
            _all_reduce_bucket(bucket, group)
            bucket, size = [], 0
    if bucket:
        _all_reduce_bucket(bucket, group)


def _all_reduce_bucket(grads: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
