"""The zig-zag layout of context parallelism and the split of images over context ranks (pure functions)."""

from __future__ import annotations

import pytest
import torch

from parallel.context import assign_images
from parallel.zigzag import ZigzagLayout


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_chunks_cover_every_token_once_and_balance_causal_work(cp):
    layout = ZigzagLayout(rows=3, seq_len=16, cp_degree=cp)
    indices = torch.cat([layout.local_indices(r) for r in range(cp)])
    assert sorted(indices.tolist()) == list(range(3 * 16))
    # Causal work of a token grows with its position in the row: every rank gets the same total.
    work = [int((layout.local_indices(r) % 16 + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1
    tensor = torch.arange(3 * 16).view(3, 16)
    assert torch.equal(layout.shard(tensor, cp - 1).reshape(-1), layout.local_indices(cp - 1))


def test_a_sequence_length_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="not divisible by 2 x cp_degree = 8"):
        ZigzagLayout(rows=1, seq_len=12, cp_degree=4)


def test_images_go_to_the_least_loaded_context_rank():
    owner = assign_images([64, 16, 16, 16, 16, 4], ranks=2)
    assert owner == [0, 1, 1, 1, 1, 0]  # 64 + 4 vs 64
    assert assign_images([], ranks=4) == []
    assert assign_images([8, 8, 8], ranks=4) == [0, 1, 2]
