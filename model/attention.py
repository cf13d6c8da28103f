"""Attention over packed documents and the rotary position embeddings of the decoder (1D) and the vision tower (2D).

Tokens of a batch are flattened and packed: a ``[T, heads, head_dim]`` tensor plus ``cu_seqlens`` (the flash-attn
varlen convention, ``int32 [docs + 1]``, ``cu_seqlens[i]:cu_seqlens[i + 1]`` is document ``i``). Attention never
crosses a document boundary. ``cu_seqlens`` is host metadata, a CPU tensor (a batch's) or a sequence of ints
(boundaries derived in Python, e.g. from image grids): the CPU backend loops over the documents and the flash
kernel's maximum length is read without waiting for the device.

Both RoPE flavours rotate *interleaved* pairs: elements ``2j`` and ``2j + 1`` of a head form complex number ``j``,
rotated by an angle ``angles[..., j]``. The 1D and 2D variants differ only in how those angles are computed, so one
:func:`apply_rotary` serves both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:  # The optional ``gpu`` extra; only ever used for CUDA tensors.
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = None

__all__ = [
    "DocumentAttention",
    "HostBounds",
    "apply_rotary",
    "document_bounds",
    "document_lengths",
    "rope_angles_1d",
    "rope_angles_2d",
    "varlen_attention",
]


class HostBounds(Sequence[int]):
    """Document boundaries as host ints that a compiled block (parallel/compile.py) hands to the eager attention core
    without reading them. Dynamo guards a tuple argument on its length, so each new number of documents (of images,
    in the vision tower) would compile the block again; an object it never looks into costs no guard."""

    __slots__ = ("_bounds",)

    def __init__(self, bounds: Sequence[int]):
        self._bounds = tuple(bounds)

    def __getitem__(self, index):
        return self._bounds[index]

    def __len__(self) -> int:
        return len(self._bounds)

    def __repr__(self) -> str:
        return f"HostBounds{self._bounds}"


def document_bounds(cu_seqlens: torch.Tensor | Sequence[int]) -> list[int]:
    """The document boundaries as Python ints (a host tensor is read once; no tensor op runs on the metadata)."""
    return cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)


def document_lengths(cu_seqlens: torch.Tensor | Sequence[int]) -> list[int]:
    """Lengths of the documents delimited by ``cu_seqlens``."""
    bounds = document_bounds(cu_seqlens)
    return [end - start for start, end in zip(bounds[:-1], bounds[1:])]


# Compiled blocks (parallel/compile.py) call the core eagerly, at a graph break: its loop over documents runs on
# host metadata whose count and lengths change every batch, which a graph would have to specialize on (a recompile
# per batch), and its kernels (SDPA, flash-attn) are library calls that a compiler would not fuse anyway.
@torch.compiler.disable
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention restricted to each packed document.

    Args:
        q: Queries ``[T, H, Dqk]``.
        k: Keys ``[T, H, Dqk]``.
        v: Values ``[T, H, Dv]`` (``Dv`` may differ from ``Dqk``, as in MLA).
        cu_seqlens: ``int32 [docs + 1]`` cumulative document lengths over ``T``, starting at 0 and ending at ``T``.
        causal: Whether a token attends only to itself and earlier tokens of its document.
        scale: Softmax scale; ``1 / sqrt(Dqk)`` when None.

    Returns:
        The attention output ``[T, H, Dv]``.
    """
    if q.is_cuda and flash_attn_varlen_func is not None and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_varlen(q, k, v, cu_seqlens, causal, scale)
    return _sdpa_per_document(q, k, v, cu_seqlens, causal, scale)


class DocumentAttention(nn.Module):
    """The attention core (no parameters) as a module of its own, so that the parallel engine can act on it by name:
    context parallelism swaps it for an exchange of keys and values over the context-parallel ranks, and selective
    activation checkpointing recomputes it instead of storing its inputs.

    Args:
        causal: Whether a token attends only to itself and earlier tokens of its document.
    """

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                scale: float | None = None) -> torch.Tensor:
        """:func:`varlen_attention` of ``q``, ``k`` ``[T, H, Dqk]`` and ``v [T, H, Dv]`` within each document."""
        return varlen_attention(q, k, v, cu_seqlens, causal=self.causal, scale=scale)

    def extra_repr(self) -> str:
        return f"causal={self.causal}"


def _sdpa_per_document(q, k, v, cu_seqlens, causal: bool, scale: float | None) -> torch.Tensor:
    # One SDPA call per document: on CPU this beats a single call with a block-diagonal mask (no wasted T^2 work,
    # no mask materialization), forward and backward.
    bounds = document_bounds(cu_seqlens)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens spans tokens {bounds[0]}..{bounds[-1]} but there are {q.shape[0]} tokens; the "
                         "packed documents must cover every token exactly once.")
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        # SDPA's fused CPU kernel needs one head dim for q, k and v; with MLA's narrower v it falls back to the math
        # path, which materializes T x T scores. Zero-padding v is exact and keeps the fused kernel, forward and
        # backward.
        v = F.pad(v, (0, q.shape[-1] - dv))
    outputs = []
    start = 0
    for length in lengths:
        if length == 0:
            continue
        end = start + length
        # SDPA wants [batch, heads, tokens, dim]; without the batch dim it takes the slow math path on CPU.
        qd, kd, vd = (t[None, start:end].transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale)
        outputs.append(out[0].transpose(0, 1))
        start = end
    return torch.cat(outputs, dim=0)[..., :dv]


def _flash_varlen(q, k, v, cu_seqlens, causal: bool, scale: float | None) -> torch.Tensor:
    # flash-attn 2 needs one head dim for q, k and v: pad v (MLA has Dv < Dqk) and drop the padding afterwards.
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    bounds = document_bounds(cu_seqlens)
    max_len = max(end - start for start, end in zip(bounds[:-1], bounds[1:]))  # host metadata: no device wait
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=causal)
    return out[..., :dv]


def rope_angles_1d(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Rotation angles of standard (1D) RoPE.

    Args:
        positions: Integer positions ``[...]``.
        dim: Number of rotated dims per head (even); there are ``dim / 2`` frequencies ``theta^(-2i/dim)``.
        theta: RoPE base.

    Returns:
        fp32 angles ``[..., dim / 2]``: pair ``i`` of a token at position ``p`` rotates by ``p * theta^(-2i/dim)``.
    """
    # Computed in fp32 exactly like the HF reference (same op order), so parity tests agree to the last bits.
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    return positions.float().unsqueeze(-1) * inv_freq


def rope_angles_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Rotation angles of MoonViT's 2D RoPE.

    The head is ``dim / 2`` interleaved complex pairs sharing ``dim / 4`` frequencies ``theta^(-4i/dim)``: pair
    ``2i`` rotates by ``col * freq_i`` (width) and pair ``2i + 1`` by ``row * freq_i`` (height), so a q-k logit
    depends only on the (row, col) offset between the two patches.

    Args:
        rows: Integer row (height) position of each patch ``[T]``.
        cols: Integer column (width) position of each patch ``[T]``.
        dim: Head dim, divisible by 4.
        theta: RoPE base.

    Returns:
        fp32 angles ``[T, dim / 2]``.
    """
    if dim % 4 != 0:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {dim}: change the number of vision heads.")
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4, device=rows.device, dtype=torch.float32) / dim))
    width = cols.float().unsqueeze(-1) * freqs
    height = rows.float().unsqueeze(-1) * freqs
    return torch.stack((width, height), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2j], x[2j+1])`` of every head by ``angles[..., j]``.

    Args:
        x: ``[T, H, D]`` (or any ``[..., T, H, D]``) with ``D = 2 * angles.shape[-1]``.
        angles: ``[T, D / 2]`` fp32, broadcast over heads.

    Returns:
        The rotated tensor, same shape and dtype as ``x``.
    """
    cos = angles.cos().unsqueeze(-2)
    sin = angles.sin().unsqueeze(-2)
    # At least fp32: bf16 rotations lose the low bits of large angles.
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    real, imag = pairs.unbind(-1)
    rotated = torch.stack((real * cos - imag * sin, imag * cos + real * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """Causal attention of queries standing at the *last* ``Tq`` positions of ``Tk`` keys (bottom-right aligned):
    every query sees the ``Tk - Tq`` prefix keys and the keys up to itself. What a sequence chunk of one document
    does under context parallelism.

    Memory stays ``O(T x D)``: no ``Tq x Tk`` mask or scores exist. On the CPU (and ``meta``) the prefix and the
    diagonal are two fused attention calls merged by their log-sum-exp (:class:`_PrefixCausalAttention`); on CUDA
    flash-attn aligns the causal mask bottom-right itself; elsewhere SDPA takes an explicit mask.

    Args:
        q: ``[Tq, H, D]``.
        k: ``[Tk, H, D]`` with ``Tk >= Tq``.
        v: ``[Tk, H, D]`` (one head dim for q, k and v: pad a narrower v first).
        scale: Softmax scale (``1 / sqrt(D)`` when None).

    Returns:
        ``[Tq, H, D]``.
    """
    prefix = k.shape[0] - q.shape[0]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type in ("cpu", "meta"):
        return _PrefixCausalAttention.apply(q, k, v, scale)
    if q.is_cuda and flash_attn_varlen_func is not None and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func

        return flash_attn_func(q[None], k[None], v[None], softmax_scale=scale, causal=True)[0]
    positions = torch.arange(k.shape[0], device=q.device)
    mask = positions[prefix:, None] >= positions[None, :]
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [T, H, D] -> [1, H, T, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


class _PrefixCausalAttention(torch.autograd.Function):
    """:func:`prefix_causal_attention` from two fused CPU attention calls: the queries against the prefix (no mask)
    and against their own positions (plain causal), merged exactly by log-sum-exp. The backward runs each call's
    fused backward with the *merged* output and log-sum-exp, which gives every block its exact share of the
    gradient (as ring attention does)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        prefix = k.shape[0] - q.shape[0]
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D]
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = flash(qb, kb[:, :, prefix:], vb[:, :, prefix:], 0.0, True, scale=scale)
        if prefix:
            out_prefix, lse_prefix = flash(qb, kb[:, :, :prefix], vb[:, :, :prefix], 0.0, False, scale=scale)
            merged = torch.logaddexp(lse, lse_prefix)
            out = (out.float() * torch.exp(lse - merged).unsqueeze(-1)
                   + out_prefix.float() * torch.exp(lse_prefix - merged).unsqueeze(-1)).to(q.dtype)
            lse = merged
        ctx.save_for_backward(qb, kb, vb, out, lse)
        ctx.scale = scale
        return out[0].transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qb, kb, vb, out, lse = ctx.saved_tensors
        prefix = kb.shape[2] - qb.shape[2]
        grad = grad_out.transpose(0, 1).unsqueeze(0).contiguous()
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dq, dk_diag, dv_diag = backward(grad, qb, kb[:, :, prefix:], vb[:, :, prefix:], out, lse, 0.0, True,
                                        scale=ctx.scale)
        dk, dv = dk_diag, dv_diag
        if prefix:
            dq_prefix, dk_prefix, dv_prefix = backward(grad, qb, kb[:, :, :prefix], vb[:, :, :prefix], out, lse,
                                                       0.0, False, scale=ctx.scale)
            dq = dq + dq_prefix
            dk, dv = torch.cat((dk_prefix, dk_diag), dim=2), torch.cat((dv_prefix, dv_diag), dim=2)
        return dq[0].transpose(0, 1), dk[0].transpose(0, 1), dv[0].transpose(0, 1), None
