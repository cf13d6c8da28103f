"""The real-size recipe against the Kimi-VL report's numbers (Table 1, section 2.3) and its 256-rank layout."""

from __future__ import annotations

import pytest

from config import load_config
from train.__main__ import main

MOONLIGHT = "moonlight_dir=/ckpts/Moonlight-16B-A3B"  # validation does not read it; the trainer checks it
STAGES = ["vit_coca", "vit_align", "joint_pretrain", "joint_cooldown", "long_ctx_32k", "long_ctx_128k"]
# Report: ViT training 2.0T (CoCa) + 0.1T (alignment), joint pretraining 1.4T, joint cooldown 0.6T, long-context
# activation 0.3T (here split evenly over the 32K and 128K stages).
BUDGET_TOKENS = {"vit_coca": 2.0e12, "vit_align": 0.1e12, "joint_pretrain": 1.4e12, "joint_cooldown": 0.6e12,
                 "long_ctx_32k": 0.15e12, "long_ctx_128k": 0.15e12}
# The CoCa stage counts an image-text pair as ~512 tokens (image tokens after the 2 x 2 merge plus its caption).
TOKENS_PER_PAIR = 512


@pytest.fixture(scope="module")
def cfg():
    return load_config(["recipe=kimi_vl_a3b", MOONLIGHT])


def tokens_per_step(cfg, name: str) -> int:
    stage = cfg.curriculum.stages[name]
    world, par = cfg.world_size, cfg.parallel
    data_ranks = world // (par.pp_degree * (stage.cp_degree or par.cp_degree))
    if stage.objective == "coca":  # context ranks serve pairs of their own in the CoCa stage
        return stage.micro_batch_size * stage.grad_accum_steps * world // par.pp_degree * TOKENS_PER_PAIR
    return stage.micro_batch_size * stage.grad_accum_steps * data_ranks * stage.seq_len


def test_token_budgets_become_steps_of_4m_token_global_batches(cfg):
    assert cfg.world_size == 256
    for name in STAGES:
        per_step = tokens_per_step(cfg, name)
        assert per_step == 2**22, f"{name}: {per_step} tokens per step"
        trained = cfg.curriculum.stages[name].steps * per_step
        assert trained == pytest.approx(BUDGET_TOKENS[name], rel=1e-5), name


def test_stage_shapes_follow_the_report(cfg):
    stages = cfg.curriculum.stages
    assert cfg.curriculum.order == STAGES
    assert [stages[n].seq_len for n in STAGES] == [8192] * 4 + [32768, 131072]
    assert [stages[n].rope_theta for n in STAGES[1:]] == [50000.0] * 3 + [800000.0] * 2
    assert sorted(stages["vit_coca"].trainable) == ["coca", "vision"] and stages["vit_coca"].objective == "coca"
    assert sorted(stages["vit_align"].trainable) == ["projector", "vision"]
    assert all(sorted(stages[n].trainable) == ["decoder", "projector", "vision"] for n in STAGES[2:])
    ramp = stages["joint_pretrain"].mixture
    assert ramp.multimodal_share_start == 0.0 < ramp.multimodal_share_end
    assert all(stages[n].mixture.long_share == 0.25 for n in ("long_ctx_32k", "long_ctx_128k"))
    assert stages["joint_cooldown"].lr.continue_previous
    # progressive resolution in the CoCa stage
    assert 0 < stages["vit_coca"].min_image_patches < stages["vit_coca"].max_image_patches


def test_layout_per_stage(cfg):
    par, stages = cfg.parallel, cfg.curriculum.stages
    assert (par.pp_degree, par.ep_degree, par.activation_checkpoint) == (1, 8, "full")
    assert [stages[n].cp_degree or par.cp_degree for n in STAGES] == [1, 1, 1, 1, 4, 16]
    assert cfg.model.decoder.num_routed_experts % par.ep_degree == 0


def test_the_real_recipe_fits_80_gb_devices_in_the_dry_run(capsys):
    assert main(["recipe=kimi_vl_a3b", MOONLIGHT, "dry_run=true", "device_memory_gb=80"]) == 0
    out = capsys.readouterr().out
    totals = [float(line.split()[8]) for line in out.splitlines() if line.split()[:1] and line.split()[0] in STAGES]
    assert len(totals) == len(STAGES) and max(totals) <= 80


def test_the_debug_curriculum_mirrors_the_real_one(cfg):
    debug = load_config(["recipe=debug"])
    # The debug recipe first trains the stand-in for Moonlight the real recipe reads (moonlight_dir).
    assert debug.curriculum.order == ["text_pretrain", *cfg.curriculum.order]
    assert cfg.curriculum.stages["vit_align"].init_from["decoder"] == "hf:/ckpts/Moonlight-16B-A3B"
    assert debug.curriculum.stages["vit_align"].init_from["decoder"] == "text_pretrain"
    for name in STAGES:
        real, small = cfg.curriculum.stages[name], debug.curriculum.stages[name]
        assert (small.objective, sorted(small.trainable), small.rope_theta) == \
            (real.objective, sorted(real.trainable), real.rope_theta), name
        assert small.mixture.long_share == real.mixture.long_share
        assert small.lr.continue_previous == real.lr.continue_previous
    ratios = [cfg.curriculum.stages[n].seq_len // debug.curriculum.stages[n].seq_len for n in STAGES[1:]]
    assert len(set(ratios)) == 1  # the same x4, x4 growth at a smaller base length
