"""The benchmarks' baseline checks: a failed one prints one line and exits 1; the padded MoonViT baseline computes the
packed tower's features."""

from __future__ import annotations

import pytest
import torch

from benchmarks._check import require_close, require_close_scaled, require_equal
from benchmarks.model_throughput import check_vit, padded_real, padded_vit_forward, vit_inputs
from model.registry import FLAVORS, build_model


def _fails(capsys, check, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        check(*args)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("baseline check failed: ")
    return lines[0]


def test_require_close_returns_the_largest_difference_and_fails_beyond_the_tolerance(capsys):
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert require_close("x", a + 1e-6, a, 1e-5, 0.0) == pytest.approx(1e-6, rel=0.01)
    line = _fails(capsys, require_close, "outputs", a + torch.tensor([0.0, 0.1, 0.0]), a, 1e-5, 1e-5)
    assert "outputs" in line and "1 of 3 elements" in line
    nan, one = torch.tensor([float("nan")]), torch.tensor([1.0])
    assert "nan against 1" in _fails(capsys, require_close, "y", nan, one, 1.0, 1.0)
    assert "shapes differ" in _fails(capsys, require_close, "shape", a[:2], a, 1.0, 1.0)


def test_scaled_and_exact_checks_name_the_tensor_that_differs(capsys):
    grads = {"small": torch.tensor([1e-9, 2e-9], dtype=torch.float64), "large": torch.tensor([1.0, -2.0])}
    nudged = {"small": grads["small"] * (1 + 1e-7), "large": grads["large"]}
    assert require_close_scaled("grads", nudged, grads, 1e-6) == pytest.approx(1e-7, rel=0.01)
    nudged["large"] = grads["large"] + 1e-3
    assert "grads[large]" in _fails(capsys, require_close_scaled, "grads", nudged, grads, 1e-6)
    require_equal("same", torch.arange(4), torch.arange(4))
    assert "1 of 4 elements differ" in _fails(capsys, require_equal, "ids", torch.tensor([0, 1, 2, 4]), torch.arange(4))
    assert "(8, 8) != (4, 4)" in _fails(capsys, require_equal, "calls", (8, 8), (4, 4))


def test_the_padded_moonvit_baseline_computes_the_packed_towers_features():
    torch.manual_seed(0)
    vit = build_model(FLAVORS["debug"]).vision
    grids = [(4, 6), (2, 2), (6, 4)]
    packed, padded = vit_inputs(grids, 3 * vit.patch_size**2)
    ours = vit(packed, torch.tensor(grids))
    theirs = padded_real(padded_vit_forward(vit, padded, grids), grids)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_the_vit_check_fails_on_the_former_pixel_layout(monkeypatch, capsys):
    """The benchmark's check itself, on the former baseline: patches fed to the Conv2d as (channel, y, x)."""
    import benchmarks.model_throughput as bench

    torch.manual_seed(0)
    vit = build_model(FLAVORS["debug"]).vision
    monkeypatch.setattr(bench, "VIT_GRIDS", [(4, 6), (2, 2), (6, 4)])
    monkeypatch.setattr(bench, "VIT_CHECK_GRIDS", [(2, 4), (4, 2)])
    packed, padded = vit_inputs(bench.VIT_GRIDS, 3 * vit.patch_size**2)
    assert check_vit(vit, packed, padded) < 1e-5
    p, padded_forward = vit.patch_size, bench.padded_vit_forward

    def former(tower, pixels, grids):
        with monkeypatch.context() as patch:
            patch.setattr(tower, "embed_patches", lambda x: tower.patch_embed(x.view(len(x), -1, p, p)).flatten(1))
            return padded_forward(tower, pixels, grids)

    monkeypatch.setattr(bench, "padded_vit_forward", former)
    assert "vit features, packed vs padded (fp32)" in _fails(capsys, check_vit, vit, packed, padded)
