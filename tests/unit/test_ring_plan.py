"""The ring's host plan (pure functions): every visible key is attended exactly once, past blocks without a mask, the
diagonal causally, and blocks sharing no document with the queries are skipped."""

from __future__ import annotations

from dataclasses import astuple

import pytest
import torch

from parallel.ring_attention import plan_ring
from parallel.zigzag import ZigzagLayout

ROWS, SEQ = 2, 24
# Row 0: 5 | 9 (crosses chunk boundaries) | 1 | 9; row 1: 3 | 21.
BOUNDS = (0, 5, 14, 15, 24, 27, 48)


def visited(layout: ZigzagLayout, bounds: tuple[int, ...], causal: bool) -> torch.Tensor:
    """``[tokens, tokens]``: how often each (query, key) pair of global positions is attended over the whole ring."""
    tokens = layout.rows * layout.seq_len
    counts = torch.zeros(tokens, tokens, dtype=torch.int64)
    for rank in range(layout.cp_degree):
        queries = layout.local_indices(rank)
        for step, segments in enumerate(plan_ring(layout, rank, bounds, causal)):
            keys = layout.local_indices((rank - step) % layout.cp_degree)
            for s in segments:
                q, k = queries[s.q_start : s.q_end], keys[s.k_start : s.k_end]
                mask = torch.ones(len(q), len(k), dtype=torch.int64)
                if s.causal:  # only on the rank's own block, over the same positions
                    assert step == 0 and torch.equal(q, k)
                    mask = mask.tril()
                else:  # unmasked keys all lie in the past (or, bidirectional, anywhere in the document)
                    assert not causal or int(k.max()) < int(q.min())
                counts[q[:, None], k[None, :]] += mask
    return counts


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_the_ring_attends_every_visible_key_exactly_once(cp, causal):
    layout = ZigzagLayout(ROWS, SEQ, cp)
    positions = torch.arange(ROWS * SEQ)
    document = torch.bucketize(positions, torch.tensor(BOUNDS[1:]), right=True)
    expected = document[:, None] == document[None, :]
    if causal:
        expected &= positions[None, :] <= positions[:, None]
    assert torch.equal(visited(layout, BOUNDS, causal), expected.long())


def test_blocks_that_share_no_document_with_the_queries_are_skipped():
    # Documents of one chunk each: only the rank's own block has anything to attend.
    layout = ZigzagLayout(rows=1, seq_len=16, cp_degree=2)
    bounds = tuple(range(0, 17, 4))
    for rank in range(2):
        own, remote = plan_ring(layout, rank, bounds, True)
        assert remote == []
        assert [s.causal for s in own] == [True, True]
    # One document over the row. Rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2: rank 0's late chunk sees both
    # of rank 1's chunks unmasked in one call, its early chunk nothing of them; each of rank 1's chunks sees rank 0's
    # first chunk unmasked and nothing of its last.
    (_, remote_of_0), (_, remote_of_1) = (plan_ring(layout, rank, (0, 16), True) for rank in range(2))
    assert [astuple(s) for s in remote_of_0] == [(4, 8, 0, 8, False)]
    assert [astuple(s) for s in remote_of_1] == [(0, 4, 0, 4, False), (4, 8, 0, 4, False)]
