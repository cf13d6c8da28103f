"""Learning-rate schedules: warmup, decays to a floor, warmup-stable-decay, and continuation across stages."""

from __future__ import annotations

import math

import pytest

from config import ConfigError, LRScheduleConfig, load_config
from optim.schedules import final_lr, lr_at
from train.stages import previous_final_lrs


def test_warmup_then_cosine_to_the_floor():
    schedule = LRScheduleConfig(peak_lr=1.0, warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(schedule, s, 24) for s in range(24)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[14] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 10 / 19)))


def test_linear_and_constant():
    linear = LRScheduleConfig(peak_lr=2.0, decay="linear", min_lr_ratio=0.5)
    assert [lr_at(linear, s, 5) for s in range(5)] == [2.0, 1.75, 1.5, 1.25, 1.0]
    constant = LRScheduleConfig(peak_lr=2.0, decay="constant")
    assert {lr_at(constant, s, 7) for s in range(7)} == {2.0}


def test_warmup_stable_decay():
    schedule = LRScheduleConfig(peak_lr=1.0, warmup_steps=2, decay="wsd", decay_fraction=0.25, min_lr_ratio=0.0)
    lrs = [lr_at(schedule, s, 42) for s in range(42)]
    assert lrs[:2] == [0.5, 1.0]
    stable = [lr for lr in lrs[2:] if lr == 1.0]
    assert len(stable) == 30  # steps 2..31: progress (s - 2) / 39 <= 0.75
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs[32:], lrs[33:]))


def test_continue_previous_starts_where_the_previous_stage_ended():
    schedule = LRScheduleConfig(peak_lr=123.0, warmup_steps=5, decay="linear", min_lr_ratio=0.1,
                                continue_previous=True)
    assert lr_at(schedule, 0, 10, previous_final_lr=0.5) == 0.5  # no warmup, peak_lr unused
    assert lr_at(schedule, 9, 10, previous_final_lr=0.5) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="previous"):
        lr_at(schedule, 0, 10)


def test_debug_curriculum_cooldown_continues_joint_pretraining():
    cfg = load_config(["recipe=debug"])
    starts = previous_final_lrs(cfg)
    stages = cfg.curriculum.stages
    assert starts["text_pretrain"] is None
    pretrain_end = final_lr(stages["joint_pretrain"].lr, stages["joint_pretrain"].steps, starts["joint_pretrain"])
    assert starts["joint_cooldown"] == pretrain_end
    cooldown = stages["joint_cooldown"]
    assert lr_at(cooldown.lr, 0, cooldown.steps, starts["joint_cooldown"]) == pretrain_end
    assert final_lr(cooldown.lr, cooldown.steps, pretrain_end) == pytest.approx(0.1 * pretrain_end)


def test_first_stage_cannot_continue():
    with pytest.raises(ConfigError, match="continue_previous"):
        load_config(["recipe=debug", "curriculum.stages.text_pretrain.lr.continue_previous=true"])
