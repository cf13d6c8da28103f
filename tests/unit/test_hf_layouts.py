"""Published checkpoints as they are on disk: ModelArgs from their config.json, sharded reading through
``*.index.json``, the Kimi_K25 hub layout, Kimi-VL's remote-code layout, a complete config.json on export, and the
``import --hf DIR`` command without a flavor. References: tiny random transformers models written by
``save_pretrained`` (DeepseekV3ForCausalLM, SiglipVisionModel, SiglipModel) or, for Kimi_K25, files that transformers'
own ``from_pretrained`` maps onto the reference's in-memory weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from config.hf_config import HFConfigError, args_from_hf, detect_format, read_hf_config
from config.model import ModelArgs
from model.hf import export_state_dict, hf_config, import_state_dict, save_safetensors
from model.hf_files import SafetensorsCheckpoint
from model.registry import FLAVORS, build_model
from tests.unit.test_model_hf import ARGS, DECODER, IMAGE_TOKEN, VISION, _k25_reference, _perturb_norms
from train.hf_convert import main as hf_main
from train.hf_convert import read_our_checkpoint


def _moonlight(tmp_path: Path, shard: str = "30KB"):
    """A tiny DeepseekV3ForCausalLM with Moonlight's choices (no query LoRA, one group, sigmoid router), saved in
    several shards with an index, plus a stray consolidated file that must not be read."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**{k: v for k, v in hf_config("deepseek_v3", ARGS).items() if k != "architectures"})
    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM(config).eval()
    _perturb_norms(reference)
    reference.save_pretrained(tmp_path, max_shard_size=shard)
    save_file({"garbage": torch.zeros(3)}, tmp_path / "consolidated.safetensors")
    return reference


def test_deepseek_v3_sharded_checkpoint_imports_without_a_flavor(tmp_path: Path):
    hf_dir = tmp_path / "moonlight"
    reference = _moonlight(hf_dir)
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1 and (hf_dir / "model.safetensors.index.json").exists()
    config = read_hf_config(hf_dir)
    assert detect_format(config) == "deepseek_v3"
    args = args_from_hf(config, ARGS)
    assert args.decoder == dataclasses.replace(DECODER, init_std=ARGS.decoder.init_std)
    ckpt = SafetensorsCheckpoint(hf_dir)
    weight_map = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "garbage" not in ckpt and sorted(ckpt.keys()) == sorted(weight_map)
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in ckpt  # on disk: one Linear per expert
    out = tmp_path / "ours"
    hf_main(["import", "--hf", str(hf_dir), "--out", str(out)])
    state = read_our_checkpoint(out)
    assert state and all(name.startswith("decoder.") for name in state)  # only what the directory holds
    model = build_model(args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [n for n in missing if n.startswith("decoder.")]
    ids = torch.randint(0, DECODER.vocab_size, (2, 11))
    with torch.no_grad():
        error = float((model.decoder.logits(model.decoder(ids)[0]) - reference(ids).logits).abs().max())
    print(f"deepseek_v3 (sharded, no flavor) logits max abs error {error:.2e}")
    assert error <= 1e-4


def test_moonlight_hub_config_reads():
    # Moonlight-16B-A3B's config.json fields (remote-code era: rope_theta at the top, topk_method, auto_map).
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 163840,
              "hidden_size": 2048, "intermediate_size": 11264, "moe_intermediate_size": 1408,
              "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2,
              "n_routed_experts": 64, "routed_scaling_factor": 2.446, "kv_lora_rank": 512, "q_lora_rank": None,
              "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
              "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
              "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "rope_theta": 50000.0,
              "rope_scaling": None, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
              "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}}
    args = args_from_hf(config, FLAVORS["debug"])
    assert args.decoder == FLAVORS["kimi_vl_a3b"].decoder  # our kimi_vl_a3b decoder is Moonlight's
    assert args.vision == FLAVORS["debug"].vision  # the parts a text config does not describe: from the base
    for key, value, word in (("q_lora_rank", 1536, "q_lora_rank"), ("n_group", 8, "n_group"),
                             ("rope_scaling", {"type": "yarn", "factor": 4}, "rope type"),
                             ("tie_word_embeddings", True, "tie_word_embeddings")):
        with pytest.raises(HFConfigError, match=word):
            args_from_hf({**config, key: value}, FLAVORS["debug"])


def test_siglip_checkpoints_give_vision_args_and_features(tmp_path: Path):
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=24,
                  patch_size=4, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(**vision, attn_implementation="eager")).eval()
    _perturb_norms(tower)
    full = SiglipModel(SiglipConfig(vision_config=vision, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)))
    full.vision_model.load_state_dict(tower.state_dict())
    images = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        want = tower(pixel_values=images).last_hidden_state.reshape(-1, 32)
    patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(2 * 36, 48)
    for name, model in (("tower", tower), ("full", full)):
        hf_dir = tmp_path / name
        model.save_pretrained(hf_dir)
        config = read_hf_config(hf_dir)
        args = args_from_hf(config, ARGS)
        assert detect_format(config) == "siglip" and args.vision.pos_table_size == 6 and not args.vision.use_rope
        out = tmp_path / f"{name}.pt"
        hf_main(["import", "--hf", str(hf_dir), "--out", str(out)])
        vit = build_model(args).vision
        vit.load_state_dict({n.removeprefix("vision."): t for n, t in read_our_checkpoint(out).items()})
        with torch.no_grad():
            error = float((vit.eval()(patches, torch.tensor([[6, 6]] * 2)) - want).abs().max())
        print(f"siglip {name} features max abs error {error:.2e}")
        assert error <= 1e-5


def _k25_hub_dir(tmp_path: Path, reference) -> Path:
    """``reference``'s weights in the Kimi_K25 hub layout, with a complete config.json."""
    hub = tmp_path / "k25_hub"
    ours = import_state_dict(reference.state_dict(), "kimi_k25", ARGS)
    save_safetensors(export_state_dict(ours, "kimi_k25_hub", ARGS), hub, shard_bytes=40_000)
    (hub / "config.json").write_text(json.dumps(hf_config("kimi_k25", ARGS, image_token_id=IMAGE_TOKEN)))
    return hub


def test_kimi_k25_hub_layout_is_what_transformers_reads_and_imports_without_a_flavor(tmp_path: Path):
    from transformers import Kimi_K25ForConditionalGeneration

    reference = _k25_reference(seed=3)
    hub = _k25_hub_dir(tmp_path, reference)
    names = SafetensorsCheckpoint(hub).keys()
    assert "mm_projector.proj.0.weight" in names and "vision_tower.encoder.blocks.1.wqkv.weight" in names
    assert "language_model.model.layers.2.mlp.experts.7.down_proj.weight" in names
    # transformers' own loader maps these files onto exactly the reference's in-memory weights.
    loaded, info = Kimi_K25ForConditionalGeneration.from_pretrained(hub, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    want = reference.state_dict()
    assert all(torch.equal(t, want[n]) for n, t in loaded.state_dict().items())
    assert loaded.config.image_token_id == IMAGE_TOKEN and loaded.config.video_token_id == IMAGE_TOKEN
    # Our import of the same files, sizes from config.json: the VLM's logits equal the reference's.
    out = tmp_path / "ours.pt"
    hf_main(["import", "--hf", str(hub), "--out", str(out)])
    args = args_from_hf(read_hf_config(hub), ARGS)
    assert detect_format(read_hf_config(hub), names) == "kimi_k25_hub"
    assert (args.vision, args.decoder) == (dataclasses.replace(VISION, layer_norm_eps=1e-5),
                                           dataclasses.replace(DECODER, init_std=ARGS.decoder.init_std))
    model = build_model(args)
    model.load_state_dict(read_our_checkpoint(out), strict=False)
    grids = torch.tensor([[4, 6], [2, 4]])
    input_ids = torch.randint(2, DECODER.vocab_size, (2, 14))
    input_ids[0, 3:9], input_ids[1, 5:7] = IMAGE_TOKEN, IMAGE_TOKEN
    pixels = torch.randn(32, 3, 4, 4)
    thw = torch.cat((torch.ones(2, 1, dtype=torch.long), grids), dim=1)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixels, image_grid_thw=thw).logits
        got, _ = model.eval()(input_ids, torch.arange(14).expand(2, 14), torch.tensor([0, 14, 28], dtype=torch.int32),
                              pixel_values=pixels.permute(0, 2, 3, 1).flatten(1), image_grid_hw=grids,
                              image_token_positions=(input_ids.view(-1) == IMAGE_TOKEN).nonzero()[:, 0])
        vision_error = float((model.embed_images(pixels.permute(0, 2, 3, 1).flatten(1), grids) - torch.cat(
            reference.get_image_features(pixels, thw).pooler_output)).abs().max())
    error = float((got - expected).abs().max())
    print(f"kimi_k25 hub layout: logits max abs error {error:.2e}, vision+projector {vision_error:.2e}")
    assert error <= 1e-4 and vision_error <= 1e-5


def test_kimi_vl_remote_code_layout_round_trips_with_its_config(tmp_path: Path):
    from tests.unit.test_model_hf import _kimi_vl_a3b_names, _random_ours

    ours = _random_ours()
    hf_dir = tmp_path / "kimi_vl"
    theirs = export_state_dict(ours, "kimi_vl", ARGS)
    # Name and shape coverage of every tensor of the released layout (names from modeling_kimi_vl.py / vLLM).
    assert {n: tuple(t.shape) for n, t in theirs.items()} == _kimi_vl_a3b_names(ARGS)
    save_safetensors(theirs, hf_dir, shard_bytes=50_000)
    config = hf_config("kimi_vl", ARGS, image_token_id=IMAGE_TOKEN)
    assert config["media_placeholder_token_id"] == IMAGE_TOKEN and config["vision_config"]["merge_kernel_size"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    args = args_from_hf(read_hf_config(hf_dir), ARGS)
    assert args.vision == dataclasses.replace(VISION, layer_norm_eps=ARGS.vision.layer_norm_eps)
    assert args.decoder == DECODER
    out = tmp_path / "ours.pt"
    hf_main(["import", "--hf", str(hf_dir), "--out", str(out)])
    back = read_our_checkpoint(out)
    assert back.keys() == {n for n in ours if not n.startswith("coca.")}
    assert all(torch.equal(t, ours[n]) for n, t in back.items())


def test_export_writes_a_complete_config_transformers_loads(tmp_path: Path, tokenizer):
    from transformers import AutoConfig, SiglipVisionModel

    from train.checkpoint import CheckpointManager, ModelState

    args = FLAVORS["debug"]
    model = build_model(args, seed=0)
    saved = CheckpointManager(tmp_path / "run", keep_last=1).save(1, {"model": ModelState(model)})
    tok = tmp_path / "tokenizer.json"
    tokenizer.tokenizer.save(str(tok))
    for fmt in ("deepseek_v3", "kimi_k25_hub", "siglip", "kimi_vl"):
        out = tmp_path / fmt
        hf_main(["export", "--format", fmt, "--flavor", "debug", "--tokenizer", str(tok), str(saved), str(out)])
        config = json.loads((out / "config.json").read_text())
        assert args_from_hf(config, args).vision == (args.vision if fmt != "siglip" else
                                                     dataclasses.replace(args.vision, use_rope=False, layer_norm_eps=
                                                                         args.vision.layer_norm_eps))
        if fmt in ("deepseek_v3", "kimi_k25_hub"):
            assert args_from_hf(config, args).decoder == args.decoder
        if fmt == "kimi_k25_hub":
            loaded = AutoConfig.from_pretrained(out)
            assert (loaded.image_token_id, loaded.video_token_id) == (tokenizer.image_id, tokenizer.image_id)
            assert loaded.text_config.eos_token_id == tokenizer.eos_id
        if fmt == "deepseek_v3":
            assert AutoConfig.from_pretrained(out).bos_token_id == tokenizer.bos_id
        if fmt == "siglip":
            tower, info = SiglipVisionModel.from_pretrained(out, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"]
    with pytest.raises(HFConfigError, match="image token id"):
        hf_config("kimi_k25", args)


def test_index_json_decides_which_files_are_read(tmp_path: Path):
    state = {f"t{i}": torch.full((50,), float(i)) for i in range(6)}
    save_safetensors(state, tmp_path, shard_bytes=450)
    save_file({"t0": torch.zeros(50), "extra": torch.ones(1)}, tmp_path / "old-copy.safetensors")
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert sorted(ckpt.keys()) == sorted(state) and torch.equal(ckpt.get("t0"), state["t0"])
    assert torch.equal(ckpt.get_rows("t3", 10, 20), state["t3"][10:20]) and ckpt.shape("t5") == (50,)
    index = tmp_path / "model.safetensors.index.json"
    good = index.read_text()
    stale = json.loads(good)
    assert stale["weight_map"]["t0"] != stale["weight_map"]["t5"]
    stale["weight_map"]["t0"] = stale["weight_map"]["t5"]  # an index naming the wrong shard fails before loading
    index.write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="'t0'"):
        SafetensorsCheckpoint(tmp_path)
    index.unlink()
    with pytest.raises(ValueError, match="no model.safetensors.index.json"):
        SafetensorsCheckpoint(tmp_path)


def test_args_from_hf_keeps_the_base_for_parts_not_asked(tmp_path: Path):
    config = hf_config("kimi_vl", ARGS, image_token_id=IMAGE_TOKEN)
    base = FLAVORS["debug"]
    only_decoder = args_from_hf(config, base, parts=("decoder",))
    assert only_decoder.decoder == dataclasses.replace(DECODER, init_std=base.decoder.init_std)
    assert only_decoder.vision == base.vision and isinstance(only_decoder, ModelArgs)
    with pytest.raises(HFConfigError, match="not vision"):
        args_from_hf(hf_config("deepseek_v3", ARGS), base, parts=("vision",))
