"""The dry run: the real-size model on meta under a simulated 256-rank layout, per-rank memory per stage."""

from __future__ import annotations

import pytest

from train.__main__ import main

MOONLIGHT = "moonlight_dir=/ckpts/Moonlight-16B-A3B"  # validation does not read it; the trainer checks it


def test_kimi_vl_a3b_at_256_ranks(capsys):
    """pp4 x dp64 with ep8: every stage and pipeline rank is reported; the parameters of the pipeline ranks add up
    to the whole model with routed experts divided by ep."""
    from model.registry import FLAVORS, count_parameters

    code = main(["recipe=kimi_vl_a3b", MOONLIGHT, "dry_run=true", "world_size=256", "parallel.pp_degree=4",
                 "parallel.ep_degree=8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "'pp': 4, 'dp': 64, 'cp': 1" in out and "ep=8 (expert-data 8)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("joint_pretrain")]
    assert [int(r[1]) for r in rows] == [0, 1, 2, 3]
    args = FLAVORS["kimi_vl_a3b"]
    counts = count_parameters(args)
    decoder = args.decoder
    moe_layers = decoder.num_layers - decoder.num_dense_layers
    routed = moe_layers * decoder.num_routed_experts * 3 * decoder.hidden_size * decoder.moe_ffn_size
    total = sum(c["total"] for name, c in counts.items() if name != "vlm") - routed + routed // 8
    reported_gib = sum(float(r[3]) for r in rows)
    assert reported_gib == pytest.approx(total * 4 / 1024**3, abs=0.02)


def test_a_stated_device_memory_that_is_exceeded_fails_naming_stage_and_remedy(capsys):
    code = main(["recipe=debug", "dry_run=true", "world_size=4", "device_memory_gb=0.001"])
    assert code == 2
    err = capsys.readouterr().err
    assert "device_memory_gb=0.001" in err and "stage '" in err and "pp_degree" in err


def test_an_impossible_layout_fails_before_anything_is_built(capsys):
    code = main(["recipe=kimi_vl_a3b", MOONLIGHT, "dry_run=true", "world_size=256", "parallel.ep_degree=7"])
    assert code == 2
    assert "parallel.ep_degree=7" in capsys.readouterr().err
