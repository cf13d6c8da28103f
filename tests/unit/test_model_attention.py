"""Packed-document attention and rotary embeddings against explicit references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.attention import apply_rotary, prefix_causal_attention, rope_angles_1d, rope_angles_2d, varlen_attention
from model.vision import interpolate_pos_table


def _block_diagonal_mask(lengths: list[int], causal: bool) -> torch.Tensor:
    total = sum(lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= torch.ones(total, total, dtype=torch.bool).tril()
    return mask


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_equals_block_diagonal_sdpa(causal):
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    total, heads = sum(lengths), 3
    q, k = (torch.randn(total, heads, 12, requires_grad=True) for _ in range(2))
    v = torch.randn(total, heads, 8, requires_grad=True)  # Dv != Dqk, as in MLA
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu_seqlens, causal=causal, scale=0.3)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    mask = _block_diagonal_mask(lengths, causal)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=0.3).transpose(0, 1)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert out.shape == (total, heads, 8)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_varlen_attention_rejects_mismatched_cu_seqlens():
    q = torch.randn(4, 1, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, q, q, torch.tensor([0, 3], dtype=torch.int32), causal=True)


def test_rope_1d_logits_depend_on_offset_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 16), torch.randn(1, 2, 16)

    def logit(pq: int, pk: int) -> torch.Tensor:
        aq = rope_angles_1d(torch.tensor([pq]), 16, 10000.0)
        ak = rope_angles_1d(torch.tensor([pk]), 16, 10000.0)
        return (apply_rotary(q, aq) * apply_rotary(k, ak)).sum(-1)

    torch.testing.assert_close(logit(3, 1), logit(10, 8), atol=1e-5, rtol=0)
    assert not torch.allclose(logit(3, 1), logit(3, 2), atol=1e-3)


def test_rope_2d_logits_depend_on_relative_offset_only():
    torch.manual_seed(0)
    dim = 16
    q, k = torch.randn(1, 4, dim, dtype=torch.float64), torch.randn(1, 4, dim, dtype=torch.float64)

    def logit(pq: tuple[int, int], pk: tuple[int, int]) -> torch.Tensor:
        aq = rope_angles_2d(torch.tensor([pq[0]]), torch.tensor([pq[1]]), dim, 100.0).double()
        ak = rope_angles_2d(torch.tensor([pk[0]]), torch.tensor([pk[1]]), dim, 100.0).double()
        return (apply_rotary(q, aq) * apply_rotary(k, ak)).sum(-1)

    base = logit((2, 5), (1, 3))
    for shift in [(0, 4), (7, 0), (3, 11)]:
        shifted = logit((2 + shift[0], 5 + shift[1]), (1 + shift[0], 3 + shift[1]))
        torch.testing.assert_close(shifted, base, atol=1e-5, rtol=0)
    # Row and column offsets are distinguished (swapping them changes the logit) ...
    assert not torch.allclose(logit((0, 0), (1, 2)), logit((0, 0), (2, 1)), atol=1e-3)
    # ... and width/height use the interleaved pair layout: pair 2i follows the column, pair 2i+1 the row.
    angles = rope_angles_2d(torch.tensor([3]), torch.tensor([5]), dim, 100.0)[0]
    freqs = 100.0 ** (-4 * torch.arange(dim // 4) / dim)
    torch.testing.assert_close(angles[0::2], 5 * freqs)
    torch.testing.assert_close(angles[1::2], 3 * freqs)


def test_rope_2d_rejects_head_dim_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_angles_2d(torch.zeros(1), torch.zeros(1), 6, 10000.0)


def test_position_table_interpolation():
    torch.manual_seed(0)
    table = torch.randn(8, 8, 5)
    torch.testing.assert_close(interpolate_pos_table(table, 8, 8), table.reshape(64, 5), atol=0, rtol=0)
    resized = interpolate_pos_table(table, 4, 6)
    ref = F.interpolate(table.permute(2, 0, 1)[None], size=(4, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized, ref[0].permute(1, 2, 0).reshape(24, 5))
    # Row-major flattening: entry r * w + c is grid cell (r, c).
    torch.testing.assert_close(resized[1 * 6 + 4], ref[0, :, 1, 4])


@pytest.mark.parametrize("prefix", [0, 1, 9, 40])
def test_prefix_causal_attention_equals_a_bottom_right_causal_mask(prefix):
    generator = torch.Generator().manual_seed(prefix)
    tq, heads, dim = 11, 3, 16
    q, k, v = (torch.randn(n, heads, dim, generator=generator).requires_grad_() for n in (tq, prefix + tq, prefix + tq))
    out = prefix_causal_attention(q, k, v, scale=0.3)
    grad = torch.randn(out.shape, generator=generator)
    got = torch.autograd.grad(out, (q, k, v), grad)
    positions = torch.arange(prefix + tq)
    mask = positions[prefix:, None] >= positions[None, :]
    reference = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask,
                                               scale=0.3)[0].transpose(0, 1)
    expected = torch.autograd.grad(reference, (q, k, v), grad)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=2e-6)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_prefix_causal_attention_never_holds_query_by_key_scores():
    from torch.distributed._tools.mem_tracker import MemTracker

    tq, tk, heads, dim = 4096, 16384, 4, 64
    q, k, v = (torch.empty(n, heads, dim, device="meta", requires_grad=True) for n in (tq, tk, tk))
    tracker = MemTracker()
    with tracker:
        prefix_causal_attention(q, k, v).sum().backward()
    peak = sum(by_type["Total"] for by_type in tracker.get_tracker_snapshot("peak").values())
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v))
    scores = tq * tk * heads * 4
    assert peak < 6 * inputs < scores / 4  # linear in the tokens, far below one fp32 score matrix
