"""The scale plan of distributed Muon (optim/plan.py): matrices cut into pieces homed on several ranks, Newton-Schulz
split into row blocks over several ranks, pieces moved to and from compute ranks. It equals one process at dp2 and
dp4, reshards across data-parallel sizes, and balances the real model at 256 ranks."""

from __future__ import annotations

import pytest
import torch

import optim.plan
from benchmarks.muon_distributed import plan_figures
from optim.plan import Plan, build_units
from tests.forked import run_ranks
from tests.dist.test_zero_optimizer import assert_resharded_resume_is_identical, mixed_model, single_process, train

# Pieces of 200 elements cut every test matrix into several pieces, so that homes, moves and row blocks all occur.
SMALL_PIECE = 200


@pytest.fixture
def small_pieces(monkeypatch):
    """Forked ranks inherit the patched module, so every rank plans with the same piece size."""
    monkeypatch.setattr(optim.plan, "PIECE", SMALL_PIECE)


@pytest.mark.parametrize("world,piece", [(2, SMALL_PIECE), (4, SMALL_PIECE), (4, optim.plan.PIECE)])
def test_split_plan_equals_single_process(monkeypatch, world, piece):
    monkeypatch.setattr(optim.plan, "PIECE", piece)  # forked ranks inherit it
    plan = Plan(build_units(mixed_model()), world)
    # The plan exercises what the scale needs: row-block tasks and moves into the compute layout; small pieces cut
    # matrices over several homes; whole-matrix pieces send results back to a home that computed nothing.
    assert plan.has_split and any(plan.row_moves()) and any(plan.update_moves())
    if piece == SMALL_PIECE:
        assert any(len(pieces) > 1 for unit, pieces in plan.pieces.items() if unit.is_muon)
    else:
        assert any(plan.result_moves())
    results = run_ranks(train, world, 20)
    reference = single_process(world, 20)
    for result in results:
        assert result["norms"] == pytest.approx(reference["norms"], rel=1e-9)
        for name, expected in reference["params"].items():
            error = (result["params"][name] - expected).norm() / expected.norm()
            assert error <= 1e-6, f"{name}: relative error {error:.2e}"
    assert sum(r["state_bytes"] for r in results) == reference["state_bytes"]


def test_split_state_saved_at_dp2_loads_at_dp4(small_pieces, tmp_path):
    assert_resharded_resume_is_identical(2, 4, str(tmp_path / "checkpoint"))


def test_kimi_vl_plan_balances_at_256_ranks():
    """The real model at 256 ranks, ep 8: before this plan, 2.03x the bytes, 2.17 FLOPs and 1.21 state imbalance."""
    figures = plan_figures("kimi_vl_a3b", 256, 8)
    assert figures["comm_bytes_ratio"] <= 1.05
    assert figures["comm_bytes_ratio_both_directions"] <= 1.05
    assert figures["ns_flops_imbalance"] <= 1.1
    assert figures["state_bytes_imbalance"] <= 1.1
    assert figures["split_matrices"] > 0  # balance came from splitting Newton-Schulz, not from an idle plan
