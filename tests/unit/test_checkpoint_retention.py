"""Checkpoint retention for spike recovery: whatever step the next spike comes at, a checkpoint from before its
window is still there, and it is the newest one that was ever taken there (a rollback replays no more than needed)."""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch

from train.checkpoint import CheckpointManager, retained_steps


def rollback_violations(interval: int, keep_last: int, spike_window: int, steps: int, policy=retained_steps):
    """Commits every ``interval`` steps up to ``steps`` under ``policy``; after each commit, every step the next
    spike can come at (until the next commit) whose best rollback target (the newest checkpoint ever taken at or
    before ``spike - spike_window - 1``) is no longer kept. Also the most checkpoints held at once."""
    committed: list[int] = []
    violations, most = [], 0
    for t in range(interval, steps + 1, interval):
        committed = sorted(policy(committed + [t], t, keep_last, spike_window))
        most = max(most, len(committed))
        for spike in range(t + 1, t + interval + 1):
            ever = [c for c in range(interval, t + 1, interval) if c <= spike - spike_window - 1]
            if ever and ever[-1] not in committed:
                violations.append((t, spike, ever[-1]))
    return violations, most


@pytest.mark.parametrize("interval,keep_last,spike_window", list(product([1, 2, 5, 7], [1, 2, 3], [0, 1, 3, 10, 25])))
def test_a_checkpoint_before_the_spike_window_is_always_kept(interval, keep_last, spike_window):
    violations, most = rollback_violations(interval, keep_last, spike_window, steps=120)
    assert violations == []
    assert most <= max(keep_last, math.ceil(spike_window / interval)) + 1


def test_plain_keep_last_loses_it_when_the_window_spans_the_kept_checkpoints():
    """The negative control: keep-last-k alone (the policy with no window) fails the same check."""
    def keep_last_only(committed, newest, keep_last, spike_window):
        return retained_steps(committed, newest, keep_last, 0)

    violations, _ = rollback_violations(2, 2, 3, steps=40, policy=keep_last_only)
    assert violations  # e.g. after the commit at 12 a spike at 13 needs 8; keep-last-2 holds 10 and 12


def test_no_window_is_keep_last_k():
    assert retained_steps([2, 4, 6, 8], 8, 2, 0) == {6, 8}
    assert retained_steps([2, 4, 6, 8, 10, 12], 12, 2, 3) == {8, 10, 12}  # 8: a spike at 13 suspects 10..13
    assert retained_steps([5], 5, 2, 10) == {5}  # before any checkpoint precedes a window: the stage's start


def test_the_manager_keeps_them_on_disk_and_a_rollback_discards_the_window(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, spike_window=3)
    for step in range(2, 13, 2):
        manager.save(step, {"w": torch.full((3,), float(step))})
    assert manager.committed_steps() == [8, 10, 12]
    assert [manager.rollback_target(s) for s in (13, 12, 11, 4)] == [8, 8, 0, 0]  # 12: 8..12 suspect, 8 is not
    assert manager.discard_after(8) == [10, 12]
    assert manager.committed_steps() == [8]
    loaded = {"w": torch.zeros(3)}
    manager.load(8, loaded)
    assert torch.equal(loaded["w"], torch.full((3,), 8.0))
    for step in (10, 12, 14, 16):  # the replay writes them again; retention goes on from there
        manager.save(step, {"w": torch.full((3,), float(step))})
    assert manager.committed_steps() == [12, 14, 16]
