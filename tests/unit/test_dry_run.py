"""The dry run: the real-size model on meta under a simulated 256-rank layout, per-rank memory per stage."""

from __future__ import annotations

import functools
import json
from dataclasses import replace

import pytest

from config import load_config
from model.registry import FLAVORS
from parallel.memory import loss_head_peak_bytes
from tests.forked import run_ranks
from train.__main__ import main
from train.dry_run import image_patches, predict
from train.loss import linear_cross_entropy_sum

MOONLIGHT = "moonlight_dir=/ckpts/Moonlight-16B-A3B"  # validation does not read it; the trainer checks it


def test_kimi_vl_a3b_at_256_ranks(capsys):
    """pp2 x dp128 with ep8 (the language-model stages: CoCa cannot be pipelined): every stage and pipeline rank is
    reported; the parameters of the pipeline ranks add up to the whole model with routed experts divided by ep, in
    the recipe's bf16."""
    from model.registry import FLAVORS, count_parameters

    code = main(["recipe=kimi_vl_a3b", MOONLIGHT, "dry_run=true", "world_size=256", "parallel.pp_degree=2",
                 "parallel.ep_degree=8", "curriculum.order=[vit_align,joint_pretrain]",
                 "curriculum.stages.vit_align.init_from=scratch"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "'pp': 2, 'dp': 128, 'cp': 1" in out and "ep=8 (expert-data 16)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("joint_pretrain")]
    assert [int(r[1]) for r in rows] == [0, 1]
    args = FLAVORS["kimi_vl_a3b"]
    counts = count_parameters(args)
    decoder = args.decoder
    moe_layers = decoder.num_layers - decoder.num_dense_layers
    routed = moe_layers * decoder.num_routed_experts * 3 * decoder.hidden_size * decoder.moe_ffn_size
    total = sum(c["total"] for name, c in counts.items() if name != "vlm") - routed + routed // 8
    reported_gib = sum(float(r[3]) for r in rows)
    assert "parameters bfloat16" in out
    assert reported_gib == pytest.approx(total * 2 / 1024**3, abs=0.02)


def test_a_stated_device_memory_that_is_exceeded_fails_naming_stage_and_remedy(capsys):
    code = main(["recipe=debug", "dry_run=true", "world_size=4", "device_memory_gb=0.001"])
    assert code == 2
    err = capsys.readouterr().err
    assert "device_memory_gb=0.001" in err and "stage '" in err and "pp_degree" in err


def test_an_impossible_layout_fails_before_anything_is_built(capsys):
    code = main(["recipe=kimi_vl_a3b", MOONLIGHT, "dry_run=true", "world_size=256", "parallel.ep_degree=7"])
    assert code == 2
    assert "parallel.ep_degree=7" in capsys.readouterr().err


def dry_run_json(out: str) -> list[dict]:
    return [json.loads(line.removeprefix("dry_run ")) for line in out.splitlines() if line.startswith("dry_run {")]


def test_a_json_line_per_stage_whose_peak_is_the_larger_phase(capsys):
    assert main(["recipe=debug", "dry_run=true", "world_size=2"]) == 0
    records = dry_run_json(capsys.readouterr().out)
    assert [r["stage"] for r in records] == load_config(["recipe=debug"]).curriculum.order
    for r in records:
        static = r["params_gib"] + r["optimizer_gib"]
        # the optimizer phase holds every gradient and the step's buffers; the activation phase at most every one
        assert r["peak_gib"] >= static + r["grads_gib"] + r["step_buffers_gib"] - 0.002
        assert r["peak_gib"] <= static + r["grads_gib"] + max(r["activations_gib"], r["step_buffers_gib"]) + 0.002


def test_the_vision_share_follows_the_stage_mixture():
    cfg = load_config(["recipe=debug"])
    stage = cfg.curriculum.stages["joint_pretrain"]
    merge = cfg.model.vision.merge_size ** 2
    shares = []
    for start, end, long in ((0.0, 0.2, 0.0), (0.0, 0.8, 0.0), (0.8, 0.8, 0.5)):
        mix = replace(stage.mixture, multimodal_share_start=start, multimodal_share_end=end, long_share=long)
        shares.append(image_patches(replace(stage, mixture=mix), cfg.model) / (stage.seq_len * merge
                                                                                * stage.micro_batch_size))
    assert shares == pytest.approx([0.2, 0.8, 0.4])
    # and the dry run's first pipeline stage holds more when the mixture has more images
    peaks = []
    for share in (0.1, 0.9):
        run = load_config(["recipe=debug", "dry_run=true", "world_size=1", "curriculum.order=[joint_pretrain]",
                           "curriculum.stages.joint_pretrain.init_from=scratch", "parallel.activation_checkpoint=none",
                           f"curriculum.stages.joint_pretrain.mixture.multimodal_share_end={share}"])
        peaks.append(predict(run)[0])
    assert peaks[1].image_patches > 8 * peaks[0].image_patches
    assert peaks[1].activations > peaks[0].activations


def test_the_loss_head_grows_by_a_chunk_of_logits_per_chunk():
    """One more chunk row costs its fp32 logits row and logsumexp's shifted copy: 2 x vocab x 4 bytes."""
    args = FLAVORS["kimi_vl_a3b"].decoder
    small, large = (loss_head_peak_bytes(args, 8192, functools.partial(linear_cross_entropy_sum, chunk_tokens=chunk),
                                         accumulating=False) for chunk in (1024, 2048))
    assert large - small == pytest.approx((2048 - 1024) * args.vocab_size * 4 * 2, rel=0.02)
    # never the whole logits: at 8K tokens with 2K-token chunks, less than one T x V fp32 buffer (an unfused loss
    # holds about four)
    assert large < 8192 * args.vocab_size * 4


def test_the_dry_run_predicts_a_measured_step_within_10_percent(tmp_path):
    """A real step (small flavor with 2 decoder layers, 2048 tokens, 1 rank, no checkpointing, 2 micro-batches)
    measured with MemTracker against the dry run given the batch's image share."""
    from benchmarks.dry_run_accuracy import measure_rank, overrides, predicted_peaks
    from data.synthetic import generate_corpus

    root = tmp_path / "data"
    generate_corpus(root, seed=0, scale=0.1)
    args = overrides(root, tmp_path / "out", "1rank", "none", 2, seq=2048, layers=2, image_patches=256)
    measured = run_ranks(measure_rank, 1, args)[0]
    predicted = predicted_peaks(args, 1, measured["image_tokens"] / measured["tokens"])[0]
    assert abs(predicted - measured["peak"]) <= 0.10 * measured["peak"], (predicted, measured)
