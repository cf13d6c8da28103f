"""Ring attention over the zig-zag layout: each rank holds its own keys and values plus *one* remote block at a time.

The ``cp`` ranks of a context-parallel group form a ring. At step ``s`` (``0 <= s < cp``) rank ``r`` holds the
key/value block of rank ``(r - s) mod cp``. It first issues the shift of that block to rank ``r + 1`` (and the
receive of the next one from ``r - 1``), then attends its local queries to the block it holds while the transfer is in
flight, and merges the partial result into a running ``(out, lse)`` by log-sum-exp:

    lse' = log(exp(lse) + exp(lse_b)),   out' = out * exp(lse - lse') + out_b * exp(lse_b - lse').

What a query attends to in a block is planned on the host from the layout and ``cu_seqlens`` (:func:`plan_ring`), as
:class:`Segment` s: for each local query chunk and each document overlapping it, the document's keys in the block
that lie in chunks *before* the query chunk (fully visible: no mask) and, in the rank's own block only, the query
chunk itself (plain causal: the same positions, a square block). Keys in later chunks are never visited, and a block
sharing no document with a query chunk costs nothing. The document's keys in a block are always one interval of the
block's local order (the zig-zag local order is increasing in global position), so each (query chunk, document)
needs at most one unmasked and one causal kernel call per step.

Kernels (each returns the log-sum-exp the merge needs; none forms a ``Tq x Tk`` mask or score tensor):

* CUDA, fp16/bf16: flash-attn 2's varlen kernel as bundled by torch (``aten::_flash_attention_forward`` /
  ``_flash_attention_backward``, the ``mha_varlen_fwd/bwd`` of flash-attn), one call per step and mask kind, every
  segment packed with its own ``cu_seqlens_q/k``. Causal segments are square, so the kernel's bottom-right alignment
  and a top-left one agree. Torch's copy rather than the ``flash_attn`` package: its backward entry takes an
  external output and log-sum-exp under a signature pinned with torch (the package's ``_flash_attn_varlen_backward``
  changes between releases), it needs no extra install, and its meta kernels let the fake-CUDA tests run the call.
  Ampere or newer (as flash-attn).
* CPU (and ``meta``): torch's fused flash CPU op per segment (``_scaled_dot_product_flash_attention_for_cpu``).
* anything else (e.g. CUDA fp32): an explicit per-segment fallback, ``O(segment_q x segment_k)``.

The backward (:class:`_RingAttention`) is the standard ring-attention backward: the ring runs again, each block's
gradient is recomputed by the kernel's backward from the saved *global* output and log-sum-exp (which gives every
block its exact share), ``dQ`` accumulates locally and each block's ``dK/dV`` accumulator travels around the ring with
it, arriving at its owner after the last step. Nothing but ``q, k, v, out, lse`` of the local tokens is saved; forward
and backward hold at most two key/value blocks (the held and the incoming one) and, in the backward, three fp32
gradient blocks (the one being filled, the one being sent, the one being received).
"""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.zigzag import ZigzagLayout

__all__ = ["Segment", "plan_block", "plan_ring", "ring_attention"]

aten = torch.ops.aten
# The kernels, as module attributes so that tests can stand in a CPU emulation of the CUDA one.
flash_varlen_forward = aten._flash_attention_forward
flash_varlen_backward = aten._flash_attention_backward
cpu_flash_forward = aten._scaled_dot_product_flash_attention_for_cpu
cpu_flash_backward = aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class Segment:
    """Local queries ``[q_start, q_end)`` attend keys ``[k_start, k_end)`` of the held block (in its local order),
    fully, or causally (``causal``: the same global positions, a square block)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool


def plan_block(layout: ZigzagLayout, q_rank: int, k_rank: int, bounds: tuple[int, ...],
               causal: bool) -> list[Segment]:
    """The segments of ``q_rank``'s queries against ``k_rank``'s block.

    Args:
        layout: The zig-zag layout of the rows.
        q_rank: The context rank whose queries attend.
        k_rank: The context rank whose keys and values form the block.
        bounds: Document boundaries over the global flattened rows (``0, ..., rows * seq_len``).
        causal: Causal attention within documents (else every token of the document is visible).
    """
    size = layout.chunk
    key_starts = layout.chunk_starts(k_rank)
    segments = []
    for i, q_chunk in enumerate(layout.chunk_starts(q_rank)):
        doc = bisect.bisect_right(bounds, q_chunk) - 1
        while doc + 1 < len(bounds) and bounds[doc] < q_chunk + size:
            doc_start, doc_end = bounds[doc], bounds[doc + 1]
            doc += 1
            q_lo, q_hi = max(q_chunk, doc_start), min(q_chunk + size, doc_end)
            if q_lo >= q_hi:
                continue
            q_local = (i * size + q_lo - q_chunk, i * size + q_hi - q_chunk)
            visible = None  # the unmasked key interval (block-local) of this document
            for j, k_chunk in enumerate(key_starts):
                k_lo, k_hi = max(k_chunk, doc_start), min(k_chunk + size, doc_end)
                if k_lo >= k_hi or (causal and k_chunk > q_chunk):
                    continue
                k_local = (j * size + k_lo - k_chunk, j * size + k_hi - k_chunk)
                if causal and k_chunk == q_chunk:
                    segments.append(Segment(*q_local, *k_local, causal=True))
                elif visible is None:
                    visible = k_local
                else:
                    if visible[1] != k_local[0]:  # impossible: the local order is increasing in global position
                        raise AssertionError(f"document keys {visible} and {k_local} are not one block interval")
                    visible = (visible[0], k_local[1])
            if visible is not None:
                segments.append(Segment(*q_local, *visible, causal=False))
    return segments


@functools.lru_cache(maxsize=16)
def plan_ring(layout: ZigzagLayout, rank: int, bounds: tuple[int, ...], causal: bool) -> tuple[list[Segment], ...]:
    """The segments of every ring step of ``rank``: step ``s`` holds the block of rank ``(rank - s) mod cp``.
    Cached: every attention layer of a step plans the same rows."""
    cp = layout.cp_degree
    return tuple(plan_block(layout, rank, (rank - step) % cp, bounds, causal) for step in range(cp))


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: tuple[list[Segment], ...],
                   group: dist.ProcessGroup, scale: float | None = None) -> torch.Tensor:
    """Attention of the local queries against every rank's keys and values, one block held at a time.

    Args:
        q: Local queries ``[T, H, D]`` (zig-zag local order).
        k: Local keys ``[T, H, D]``.
        v: Local values ``[T, H, Dv]`` with ``Dv <= D`` (padded to ``D`` for the kernels, block by block).
        plans: :func:`plan_ring` of this rank.
        group: The context-parallel group (the ring).
        scale: Softmax scale (``1 / sqrt(D)`` when None).

    Returns:
        ``[T, H, Dv]``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, plans, group, scale)


class _Shift:
    """Send ``x`` to the next rank of the ring and receive the previous rank's, asynchronously (``wait()`` returns
    it). An all-to-all whose only non-empty splits are the two neighbours': NCCL issues just those two transfers,
    and it runs on gloo and the fake process group. Not a functional collective, so selective activation
    checkpointing re-issues it in a recompute instead of keeping every received block alive."""

    def __init__(self, x: torch.Tensor, group: dist.ProcessGroup):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        self.sent = x.contiguous()
        self.received = torch.empty_like(self.sent)
        rows = x.shape[0]
        send = [rows if peer == (rank + 1) % cp else 0 for peer in range(cp)]
        receive = [rows if peer == (rank - 1) % cp else 0 for peer in range(cp)]
        self.work = dist.all_to_all_single(self.received, self.sent, receive, send, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.received


class _RingAttention(torch.autograd.Function):
    """:func:`ring_attention` with the ring-attention backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, plans, group, scale):
        dim = q.shape[-1]
        out = torch.zeros_like(q, dtype=torch.float32)
        lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)  # [H, T] as the kernels
        held, states = torch.cat((k, v), dim=-1), []
        for step, segments in enumerate(plans):
            incoming = _Shift(held, group) if step + 1 < len(plans) else None  # overlaps this block's compute
            keys, values = _split_block(held, dim)
            state = {}
            for segment, block_out, block_lse in _forward_segments(q, keys, values, segments, scale, state):
                _merge(out, lse, segment, block_out, block_lse)
            states.append(state)
            held = incoming.wait() if incoming is not None else held
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.group, ctx.scale, ctx.states = plans, group, scale, states
        return out[..., : v.shape[-1]].clone() if v.shape[-1] < dim else out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dim, value_dim = q.shape[-1], v.shape[-1]
        grad_out = F.pad(grad_out, (0, dim - value_dim)).contiguous()
        grad_q = torch.zeros_like(q, dtype=torch.float32)
        held, in_flight = torch.cat((k, v), dim=-1), None
        for step, segments in enumerate(ctx.plans):
            incoming = _Shift(held, ctx.group) if step + 1 < len(ctx.plans) else None
            keys, values = _split_block(held, dim)
            grad_block = torch.zeros_like(held, dtype=torch.float32)  # this rank's share of the held block's dK/dV
            for segment, dq, dk, dv in _backward_segments(grad_out, q, keys, values, out, lse, segments, ctx.scale,
                                                          ctx.states[step]):
                grad_q.narrow(0, segment.q_start, segment.q_end - segment.q_start).add_(dq)
                rows = grad_block.narrow(0, segment.k_start, segment.k_end - segment.k_start)
                rows.narrow(-1, 0, dim).add_(dk)
                rows.narrow(-1, dim, value_dim).add_(dv[..., :value_dim])
            # The accumulator of the held block arrives from the previous rank (which held it one step earlier);
            # it moves on to the next one, and after the last step it reaches the block's owner.
            if in_flight is not None:
                grad_block += in_flight.wait()
            in_flight = _Shift(grad_block, ctx.group)
            held = incoming.wait() if incoming is not None else held
        grad_k, grad_v = in_flight.wait().split((dim, value_dim), dim=-1)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def _split_block(held: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = held[..., :dim], held[..., dim:]
    if values.shape[-1] < dim:  # one head dim for q, k and v keeps the fused kernels (see model/attention.py)
        values = F.pad(values, (0, dim - values.shape[-1]))
    return keys, values


def _merge(out: torch.Tensor, lse: torch.Tensor, segment: Segment, block_out: torch.Tensor,
           block_lse: torch.Tensor) -> None:
    """Fold one segment's ``(out [n, H, D], lse [H, n])`` into the running fp32 ``out [T, H, D]``, ``lse [H, T]``."""
    rows = segment.q_end - segment.q_start
    run_out, run_lse = out.narrow(0, segment.q_start, rows), lse.narrow(1, segment.q_start, rows)
    # out' = out * exp(lse - lse') + block_out * exp(block_lse - lse') with lse' = logaddexp(lse, block_lse), written
    # with the block's share sigmoid(block_lse - lse) (1 while nothing is merged yet: lse = -inf).
    share = torch.sigmoid(block_lse - run_lse).t().unsqueeze(-1)
    run_out.add_((block_out.float() - run_out) * share)
    torch.logaddexp(run_lse, block_lse, out=run_lse)  # in place (copy_ has no fake-CUDA kernel on CPU builds)


def _kernel(q: torch.Tensor) -> str:
    if q.device.type in ("cpu", "meta"):
        return "cpu"
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        return "flash"
    return "math"


def _rows(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return t.narrow(0, start, end - start)


def _heads_first(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``[start, end)`` of ``[T, H, D]`` as the CPU op's ``[1, H, n, D]`` (a view)."""
    return _rows(t, start, end).transpose(0, 1).unsqueeze(0)


def _forward_segments(q, keys, values, segments, scale, state):
    """``(segment, out [n, H, D], lse [H, n] fp32)`` of each segment. ``state`` keeps what the flash backward needs
    of its forward (the dropout RNG state, unused at dropout 0)."""
    kernel = _kernel(q)
    if kernel == "flash":
        for causal in (False, True):
            group = [s for s in segments if s.causal == causal]
            if not group:
                continue
            packed = _pack(group, q, keys, values)
            out, lse, rng, unused, _ = flash_varlen_forward(*packed, 0.0, causal, False, scale=scale)
            state[causal] = (rng, unused)
            lengths = [s.q_end - s.q_start for s in group]
            yield from zip(group, out.split(lengths), lse.split(lengths, dim=1))
        return
    for s in segments:
        q_s, k_s, v_s = _heads_first(q, s.q_start, s.q_end), *(
            _heads_first(t, s.k_start, s.k_end) for t in (keys, values))
        if kernel == "cpu":
            out, lse = cpu_flash_forward(q_s, k_s, v_s, 0.0, s.causal, scale=scale)
        else:
            out, lse = _math_forward(q_s, k_s, v_s, s.causal, scale)
        yield s, out[0].transpose(0, 1), lse[0]


def _backward_segments(grad_out, q, keys, values, out, lse, segments, scale, state):
    """``(segment, dq, dk, dv)`` of each segment (each ``[n, H, D]``), from the global ``out`` and ``lse``."""
    kernel = _kernel(q)
    if kernel == "flash":
        for causal in (False, True):
            group = [s for s in segments if s.causal == causal]
            if not group:
                continue
            q_p, k_p, v_p, cu_q, cu_k, max_q, max_k = _pack(group, q, keys, values)
            grad_p, out_p = (torch.cat([_rows(t, s.q_start, s.q_end) for s in group]) for t in (grad_out, out))
            lse_p = torch.cat([lse.narrow(1, s.q_start, s.q_end - s.q_start) for s in group], dim=1)
            rng, unused = state[causal]
            dq, dk, dv = flash_varlen_backward(grad_p, q_p, k_p, v_p, out_p, lse_p, cu_q, cu_k, max_q, max_k, 0.0,
                                               causal, rng, unused, scale=scale)
            q_lengths = [s.q_end - s.q_start for s in group]
            k_lengths = [s.k_end - s.k_start for s in group]
            yield from zip(group, dq.split(q_lengths), dk.split(k_lengths), dv.split(k_lengths))
        return
    for s in segments:
        q_s, grad_s, out_s = (_heads_first(t, s.q_start, s.q_end) for t in (q, grad_out, out))
        k_s, v_s = (_heads_first(t, s.k_start, s.k_end) for t in (keys, values))
        lse_s = lse.narrow(1, s.q_start, s.q_end - s.q_start).unsqueeze(0).contiguous()
        if kernel == "cpu":
            grads = cpu_flash_backward(grad_s, q_s, k_s, v_s, out_s, lse_s, 0.0, s.causal, scale=scale)
        else:
            grads = _math_backward(grad_s, q_s, k_s, v_s, out_s, lse_s, s.causal, scale)
        yield s, *(g[0].transpose(0, 1) for g in grads)


def _pack(group, q, keys, values):
    """The varlen kernel's inputs for ``group``: packed ``q, k, v`` and ``cu_seqlens_q/k`` (int32 on the device,
    built from host ints: no device read) with their maxima."""
    q_p = torch.cat([_rows(q, s.q_start, s.q_end) for s in group])
    k_p, v_p = (torch.cat([_rows(t, s.k_start, s.k_end) for s in group]) for t in (keys, values))
    q_lengths = [s.q_end - s.q_start for s in group]
    k_lengths = [s.k_end - s.k_start for s in group]
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=q.device)
                  for n in (q_lengths, k_lengths))
    return q_p, k_p, v_p, cu_q, cu_k, max(q_lengths), max(k_lengths)


def _math_scores(q, k, causal, scale):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [1, H, n, m]
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


def _math_forward(q, k, v, causal, scale):
    """Fallback for devices without a fused kernel that returns the log-sum-exp (``[1, H, n, D]`` inputs)."""
    scores = _math_scores(q, k, causal, scale)
    lse = scores.logsumexp(-1)
    return torch.matmul((scores - lse.unsqueeze(-1)).exp(), v.float()).to(q.dtype), lse


def _math_backward(grad, q, k, v, out, lse, causal, scale):
    probs = (_math_scores(q, k, causal, scale) - lse.unsqueeze(-1)).exp()  # with the *global* lse
    grad = grad.float()
    grad_v = torch.matmul(probs.transpose(-1, -2), grad)
    delta = (grad * out.float()).sum(-1, keepdim=True)
    grad_scores = probs * (torch.matmul(grad, v.float().transpose(-1, -2)) - delta)
    grad_q = torch.matmul(grad_scores, k.float()) * scale
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q.float()) * scale
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
