"""The spike detector's decisions and their checkpoint state (one gloo rank: the decision is all-reduced)."""

from __future__ import annotations

import math

import torch

from config.schema import RecoveryConfig
from tests.forked import run_ranks
from train.recovery import RecoveryState


def _detect(rank: int, world: int) -> dict:
    cfg = RecoveryConfig(loss_spike_factor=1.5, grad_spike_factor=3.0, window=3)
    state = RecoveryState(cfg)
    cpu = torch.device("cpu")
    seen = [state.spike(loss, grad, cpu) for loss, grad in [(4.0, 1.0), (9.0, 1.0), (4.0, 1.0), (4.0, 1.0)]]
    full = [state.spike(loss, grad, cpu) for loss, grad in [(9.0, 1.0), (5.0, 1.0), (5.0, 9.0), (math.nan, 1.0),
                                                            (5.0, math.inf)]]
    windows = (list(state.losses), list(state.grad_norms))
    state.decide(12, "loss", 8.0, 1.0, 10)
    saved = state.state_dict()
    older = RecoveryState(cfg)
    older.decide(5, "grad_norm", 3.0, 9.0, 0)
    older_state = older.state_dict()
    state.load_state_dict(older_state)  # a rollback to an older checkpoint keeps the newer decision
    return {"seen": seen, "full": full, "windows": windows, "saved": saved, "skip": sorted(state.skip),
            "spikes": state.spike_steps(), "rollbacks": state.rollbacks, "losses_after_load": state.losses}


def test_spikes_need_a_full_window_nonfinite_always_and_decisions_merge_on_load():
    result = run_ranks(_detect, 1)[0]
    assert result["seen"] == ["", "", "", ""]  # the window fills first (9.0 is no spike yet)
    # 9 > 1.5 x mean(9, 4, 4) = 8.5; 5 is not; a gradient norm of 9 > 3 x 1; NaN and inf always.
    assert result["full"] == ["loss", "", "grad_norm", "nonfinite", "nonfinite"]
    assert result["windows"] == ([4.0, 4.0, 5.0], [1.0, 1.0, 1.0])  # spikes never join the windows
    assert result["saved"]["skip"] == [12]
    assert result["skip"] == [5, 12] and result["spikes"] == [5, 12] and result["rollbacks"] == 1
    assert result["losses_after_load"] == []  # the windows are the loaded checkpoint's
