"""Recipe composition and validation: every recipe composes; bad keys and values fail naming the key."""

from __future__ import annotations

import pytest

from config import ConfigError, available_recipes, load_config
from train.__main__ import main

STAGES = ["vit_coca", "vit_align", "joint_pretrain", "joint_cooldown", "long_ctx_32k", "long_ctx_128k"]


MOONLIGHT = "moonlight_dir=/ckpts/Moonlight-16B-A3B"  # validation does not read it; the trainer checks it


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_composes_and_validates(recipe):
    cfg = load_config([f"recipe={recipe}", MOONLIGHT])
    assert cfg.recipe == recipe
    # The debug recipe trains its own stand-in for Moonlight first.
    assert cfg.curriculum.order == (["text_pretrain"] if recipe == "debug" else []) + STAGES
    assert cfg.model.flavor in ("debug", "kimi_vl_a3b")


def test_recipes_exist():
    assert {"debug", "kimi_vl_a3b"} <= set(available_recipes())


@pytest.mark.parametrize("recipe", ["debug", "kimi_vl_a3b"])
def test_curriculum_mechanisms(recipe):
    stages = load_config([f"recipe={recipe}", MOONLIGHT]).curriculum.stages
    assert stages["vit_coca"].objective == "coca"
    assert sorted(stages["vit_coca"].trainable) == ["coca", "vision"]
    assert sorted(stages["vit_align"].trainable) == ["projector", "vision"]
    for name in STAGES[2:]:
        assert sorted(stages[name].trainable) == ["decoder", "projector", "vision"]
    # Multimodal share ramps up from zero in joint pretraining.
    mix = stages["joint_pretrain"].mixture
    assert mix.multimodal_share_start == 0.0 and mix.multimodal_share_end > 0.0
    # Sequence length x4 twice, RoPE base reset 50,000 -> 800,000, 25% long / 75% replay.
    base = stages["joint_cooldown"].seq_len
    assert stages["long_ctx_32k"].seq_len == 4 * base
    assert stages["long_ctx_128k"].seq_len == 16 * base
    assert [stages[n].rope_theta for n in STAGES[1:]] == [50000.0] * 3 + [800000.0] * 2
    assert stages["long_ctx_32k"].mixture.long_share == stages["long_ctx_128k"].mixture.long_share == 0.25


def test_real_recipe_sequence_lengths():
    stages = load_config(["recipe=kimi_vl_a3b", MOONLIGHT]).curriculum.stages
    assert [stages[n].seq_len for n in STAGES] == [8192] * 4 + [32768, 131072]
    assert load_config(["recipe=kimi_vl_a3b", MOONLIGHT]).model.decoder.num_routed_experts == 64


def test_overrides_apply():
    cfg = load_config(["recipe=debug", "curriculum.stages.joint_pretrain.steps=7", "model.decoder.num_layers=5"])
    assert cfg.curriculum.stages["joint_pretrain"].steps == 7
    assert cfg.model.decoder.num_layers == 5
    assert cfg.model.decoder.hidden_size == 64  # the rest of the debug flavor stays


def test_unknown_key_names_the_key_and_allowed_keys():
    with pytest.raises(ConfigError) as error:
        load_config(["recipe=debug", "+curriculum.stages.vit_align.stepz=3"])
    message = str(error.value)
    assert "stepz" in message and "steps" in message and "micro_batch_size" in message


def test_unknown_model_key():
    with pytest.raises(ConfigError, match=r"model\.decoder\.num_layerz"):
        load_config(["recipe=debug", "+model.decoder.num_layerz=3"])


def test_wrong_type():
    with pytest.raises(ConfigError, match="steps"):
        load_config(["recipe=debug", "curriculum.stages.vit_align.steps=many"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("curriculum.stages.vit_align.objective=mlm", "objective"),
        ("curriculum.stages.vit_align.steps=0", "steps"),
        ("curriculum.stages.joint_pretrain.trainable=[vision,llm]", "trainable"),
        ("curriculum.stages.vit_coca.trainable=[vision,decoder]", "trainable"),
        ("curriculum.stages.text_pretrain.init_from=previous", "init_from"),
            ("curriculum.stages.vit_align.init_from={vision: joint_pretrain}", "does not come before"),
            ("curriculum.stages.vit_align.init_from={visio: previous}", "unknown parts"),
        ("curriculum.stages.joint_pretrain.lr.decay=exp", "decay"),
        ("curriculum.stages.joint_pretrain.lr.warmup_steps=1000", "warmup_steps"),
        ("curriculum.stages.long_ctx_32k.mixture.long_share=1.5", "long_share"),
        ("curriculum.stages.long_ctx_32k.mixture.long_sources.long_doc=0", "long_sources"),
        ("curriculum.order=[vit_coca,nope]", "curriculum.order"),
        ("model.flavor=huge", "model.flavor"),
        ("model.vision.num_heads=3", "num_heads"),
        ("parallel.dp_degree=0", "dp_degree"),
        ("checkpoint.url=gs://bucket/ckpt", "checkpoint.url"),
        ("checkpoint.url=s3://", "checkpoint.url"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("parallel.pp_schedule=bogus", "parallel.pp_schedule"),
        ("data.request_burst=0", "data.request_burst"),
    ],
)
def test_impossible_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(["recipe=debug", override])
    assert fragment in str(error.value)


def test_unknown_recipe_lists_recipes():
    with pytest.raises(ConfigError) as error:
        load_config(["recipe=nosuch"])
    assert "debug" in str(error.value) and "kimi_vl_a3b" in str(error.value)


def test_a_configuration_stored_with_a_retired_key_still_loads():
    """Checkpoints written before the demo corpus became an explicit step carry data.generate_if_missing."""
    from omegaconf import OmegaConf

    from config import to_run_config

    stored = OmegaConf.to_container(OmegaConf.structured(load_config(["recipe=debug"])))
    stored["data"]["generate_if_missing"] = True
    assert to_run_config(OmegaConf.create(stored)).data.root == "demo_data"


def test_entry_point_rejects_bad_config_before_anything_starts(capsys, tmp_path):
    status = main(["recipe=debug", f"output_dir={tmp_path}", "curriculum.stages.vit_align.steps=-1"])
    assert status == 2
    assert "curriculum.stages.vit_align.steps" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_print_config(capsys):
    assert main(["recipe=debug", "--print-config"]) == 0
    assert "long_ctx_128k" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "fragment"), [
    ("parallel.pp_schedule=bogus", "parallel.pp_schedule='bogus': allowed is one of"),
    ("parallel.pp_schedule=interleaved_1f1b parallel.pp_virtual_stages=1", "parallel.pp_virtual_stages=1"),
    # Checked at the recipe's world size before any process group: 3 decoder layers cannot make 2 x 2 stages.
    ("parallel.pp_degree=2 parallel.pp_schedule=interleaved_1f1b world_size=2", "decoder has 3 layers"),
    # Compiled blocks under a schedule that splits the backward into input and weight gradients.
    ("compile=true parallel.pp_degree=2 parallel.pp_schedule=zero_bubble world_size=2",
     "compile=true with parallel.pp_schedule=zero_bubble (pp_degree=2) is not supported"),
    ("compile=true parallel.pp_degree=2 parallel.pp_schedule=interleaved_zero_bubble world_size=4",
     "compile=true with parallel.pp_schedule=interleaved_zero_bubble (pp_degree=2) is not supported"),
])
def test_print_config_rejects_what_a_launched_run_would(capsys, override, fragment):
    assert main(["recipe=debug", *override.split(), "--print-config"]) == 2
    error = capsys.readouterr().err
    assert fragment in error and "Traceback" not in error
