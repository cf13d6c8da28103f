"""HF interop: parity with transformers' SigLIP and Kimi_K25 models through the importer, bit-exact round trips,
released-checkpoint names, errors that name the tensor, and the conversion CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config.model import CocaArgs, DecoderArgs, ModelArgs, VisionArgs
from model.hf import FORMATS, export_state_dict, import_state_dict, load_safetensors, save_safetensors
from model.init import ParamInit
from model.registry import FLAVORS, build_model
from model.vision import MoonViT, interpolate_pos_table
from model.vlm import KimiVL
from train.hf_convert import main as hf_main

VISION = VisionArgs(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_hidden_size=64, pos_table_size=6)
DECODER = DecoderArgs(vocab_size=97, hidden_size=32, num_layers=3, num_dense_layers=1, dense_ffn_size=48, num_heads=4,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, num_routed_experts=8,
                      num_shared_experts=2, num_experts_per_token=3, moe_ffn_size=12, rope_theta=500.0, init_std=0.1)
COCA = CocaArgs(embed_dim=32, text_hidden_size=32, text_num_layers=1, text_num_heads=2, text_max_len=16,
                caption_num_layers=1, caption_num_heads=2)
ARGS = ModelArgs(flavor="tiny", vision=VISION, decoder=DECODER, coca=COCA)
IMAGE_TOKEN = 1


def _perturb_norms(module: torch.nn.Module) -> None:
    """Non-trivial norm scales/shifts and balancing biases, so a wrong mapping cannot hide behind ones and zeros."""
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if "norm" in name:
                tensor.add_(torch.randn_like(tensor) * 0.1)
        for name, buffer in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.02)


def _random_ours(args: ModelArgs = ARGS, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(args)
    _perturb_norms(model)
    with torch.no_grad():
        for layer in model.decoder.layers.values():
            if layer.moe is not None:
                layer.moe.expert_bias.copy_(torch.randn_like(layer.moe.expert_bias))
    return model.state_dict()


# --- SigLIP -----------------------------------------------------------------------------------------------------------


def test_vision_tower_matches_siglip_without_rope():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=24, patch_size=4, layer_norm_eps=1e-6, attn_implementation="eager")
    torch.manual_seed(0)
    reference = SiglipVisionModel(config).eval()
    _perturb_norms(reference)
    args = ModelArgs(vision=VisionArgs(**{**VISION.__dict__, "use_rope": False, "layer_norm_eps": 1e-6}),
                     decoder=DECODER, coca=COCA)
    imported = import_state_dict(reference.state_dict(), "siglip", args)
    assert all(name.startswith("vision.") for name in imported)
    vit = MoonViT(args.vision)
    vit.load_state_dict({name.removeprefix("vision."): t for name, t in imported.items()})
    # The importer moved the weights: fused qkv rows are SigLIP's q, k, v; the table is SigLIP's, as a grid.
    attn = reference.state_dict()
    torch.testing.assert_close(vit.blocks[1].qkv.weight[32:64], attn["encoder.layers.1.self_attn.k_proj.weight"],
                               atol=0, rtol=0)
    torch.testing.assert_close(vit.pos_table[2, 3], attn["embeddings.position_embedding.weight"][2 * 6 + 3],
                               atol=0, rtol=0)
    images = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        want = reference(pixel_values=images).last_hidden_state  # [3, 36, 32]
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(3 * 36, 48)
        got = vit(patches, torch.tensor([[6, 6]] * 3))
    error = float((got - want.reshape(-1, 32)).abs().max())
    print(f"siglip max abs error {error:.2e}")
    assert error <= 1e-5


def test_import_siglip_so400m_names_resamples_position_table():
    # SigLIP-SO400M's hub layout (SiglipModel): vision_model.*, plus a text tower, the pooling head and the loss
    # scalars, which MoonViT has no use for. Tiny shapes; a 5 x 5 table resampled to our 6 x 6.
    state = {}
    hidden, mlp = VISION.hidden_size, VISION.mlp_hidden_size
    v = "vision_model."
    state[v + "embeddings.patch_embedding.weight"] = torch.randn(hidden, 3, 4, 4)
    state[v + "embeddings.patch_embedding.bias"] = torch.randn(hidden)
    state[v + "embeddings.position_embedding.weight"] = torch.randn(25, hidden)
    for i in range(VISION.num_layers):
        block = f"{v}encoder.layers.{i}."
        for name, shape in (("layer_norm1", (hidden,)), ("layer_norm2", (hidden,)), ("self_attn.q_proj", None),
                            ("self_attn.k_proj", None), ("self_attn.v_proj", None), ("self_attn.out_proj", None),
                            ("mlp.fc1", (mlp, hidden)), ("mlp.fc2", (hidden, mlp))):
            weight_shape = shape or (hidden, hidden)
            state[f"{block}{name}.weight"] = torch.randn(weight_shape)
            state[f"{block}{name}.bias"] = torch.randn(weight_shape[0])
    state[v + "post_layernorm.weight"], state[v + "post_layernorm.bias"] = torch.randn(hidden), torch.randn(hidden)
    state[v + "head.probe"] = torch.randn(1, 1, hidden)
    state["text_model.embeddings.token_embedding.weight"] = torch.randn(50, hidden)
    state["logit_scale"], state["logit_bias"] = torch.randn(1), torch.randn(1)
    imported = import_state_dict(state, "siglip", ARGS)
    table = state[v + "embeddings.position_embedding.weight"].view(5, 5, hidden)
    torch.testing.assert_close(imported["vision.pos_table"], interpolate_pos_table(table, 6, 6).view(6, 6, hidden))
    q, k, vv = (state[f"{v}encoder.layers.1.self_attn.{n}_proj.bias"] for n in "qkv")
    assert torch.equal(imported["vision.blocks.1.qkv.bias"], torch.cat((q, k, vv)))
    assert torch.equal(imported["vision.blocks.0.fc2.weight"], state[v + "encoder.layers.0.mlp.fc2.weight"])


# --- Kimi_K25 ---------------------------------------------------------------------------------------------------------


def _k25_reference(seed: int = 0):
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    d = DECODER
    text = dict(model_type="deepseek_v3", vocab_size=d.vocab_size, hidden_size=d.hidden_size,
                intermediate_size=d.dense_ffn_size, moe_intermediate_size=d.moe_ffn_size,
                num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads, num_key_value_heads=d.num_heads,
                n_shared_experts=d.num_shared_experts, n_routed_experts=d.num_routed_experts,
                routed_scaling_factor=d.routed_scaling_factor, kv_lora_rank=d.kv_lora_rank, q_lora_rank=None,
                qk_rope_head_dim=d.qk_rope_head_dim, v_head_dim=d.v_head_dim, qk_nope_head_dim=d.qk_nope_head_dim,
                n_group=1, topk_group=1, num_experts_per_tok=d.num_experts_per_token,
                first_k_dense_replace=d.num_dense_layers, norm_topk_prob=True, rms_norm_eps=d.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta}, rope_interleave=True,
                tie_word_embeddings=False, initializer_range=0.1)
    vision = dict(patch_size=VISION.patch_size, pos_emb_height=VISION.pos_table_size,
                  pos_emb_width=VISION.pos_table_size, num_attention_heads=VISION.num_heads,
                  num_hidden_layers=VISION.num_layers, hidden_size=VISION.hidden_size,
                  intermediate_size=VISION.mlp_hidden_size, rope_parameters={"rope_type": "axial",
                                                                              "rope_theta": VISION.rope_theta})
    config = Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=VISION.hidden_size,
                            tie_word_embeddings=False, image_token_id=IMAGE_TOKEN, attn_implementation="eager")
    torch.manual_seed(seed)
    reference = Kimi_K25ForConditionalGeneration(config).eval()
    _perturb_norms(reference)
    with torch.no_grad():  # the default init leaves the position table at zero
        reference.model.vision_tower.patch_embed.pos_emb.position_embeddings.normal_(0, 0.5)
    return reference


def _ours_from(reference) -> torch.nn.Module:
    torch.manual_seed(1)
    model = build_model(ARGS)
    imported = import_state_dict(reference.state_dict(), "kimi_k25", ARGS)
    missing, unexpected = model.load_state_dict(imported, strict=False)
    assert not unexpected and all(name.startswith("coca.") for name in missing)
    return model.eval()


GRIDS = [[6, 6], [4, 8], [2, 2], [8, 4]]  # the table's own size (no interpolation), wide, tiny, tall


def test_vision_and_projector_match_kimi_k25():
    reference = _k25_reference()
    ours = _ours_from(reference)
    grids = torch.tensor(GRIDS)
    pixels = torch.randn(int(grids.prod(-1).sum()), 3, 4, 4)
    thw = torch.cat((torch.ones(len(GRIDS), 1, dtype=torch.long), grids), dim=1)
    with torch.no_grad():
        want = torch.cat(reference.get_image_features(pixels, thw).pooler_output)
        got = ours.embed_images(pixels.permute(0, 2, 3, 1).flatten(1), grids)
        cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).min()
    error = float((got - want).abs().max())
    print(f"kimi_k25 vision+projector max abs error {error:.2e}, min cosine {float(cosine):.7f}")
    assert got.shape == (sum(h * w // 4 for h, w in GRIDS), DECODER.hidden_size)
    assert error <= 1e-5


def test_whole_vlm_matches_kimi_k25_logits():
    reference = _k25_reference(seed=2)
    ours = _ours_from(reference)
    grids = torch.tensor([[4, 6], [2, 4]])  # 6 and 2 image tokens
    rows, seq = 2, 14
    input_ids = torch.randint(2, DECODER.vocab_size, (rows, seq))
    input_ids[0, 3:9] = IMAGE_TOKEN
    input_ids[1, 5:7] = IMAGE_TOKEN
    pixels = torch.randn(24 + 8, 3, 4, 4)
    thw = torch.cat((torch.ones(2, 1, dtype=torch.long), grids), dim=1)
    with torch.no_grad():
        want = reference(input_ids=input_ids, pixel_values=pixels, image_grid_thw=thw).logits
        cu_seqlens = torch.tensor([0, seq, 2 * seq], dtype=torch.int32)
        got, _ = ours(input_ids, torch.arange(seq).expand(rows, seq), cu_seqlens,
                      pixel_values=pixels.permute(0, 2, 3, 1).flatten(1), image_grid_hw=grids,
                      image_token_positions=(input_ids.view(-1) == IMAGE_TOKEN).nonzero()[:, 0])
    error = float((got - want).abs().max())
    print(f"kimi_k25 whole-VLM logits max abs error {error:.2e}")
    assert error <= 1e-4


# --- round trips, released names, errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "fused"), [("kimi_vl", None), ("kimi_k25", None), ("kimi_k25_hub", None),
                                            ("deepseek_v3", False),
                                            ("deepseek_v3", True), ("siglip", None)])
def test_round_trips_are_bit_exact(fmt, fused):
    ours = _random_ours()
    theirs = export_state_dict(ours, fmt, ARGS, fused_experts=fused)
    back = import_state_dict(theirs, fmt, ARGS)
    assert back and all(torch.equal(t, ours[name]) and t.dtype == ours[name].dtype for name, t in back.items())
    assert {name.split(".")[0] for name in back} == {
        "kimi_vl": {"vision", "projector", "decoder"}, "kimi_k25": {"vision", "projector", "decoder"},
        "kimi_k25_hub": {"vision", "projector", "decoder"},
        "deepseek_v3": {"decoder"}, "siglip": {"vision"}}[fmt]
    again = export_state_dict(back, fmt, ARGS, fused_experts=fused)
    assert again.keys() == theirs.keys() and all(torch.equal(again[n], theirs[n]) for n in theirs)


def _kimi_vl_a3b_names(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The released Kimi-VL-A3B tensor names (modeling_kimi_vl.py / vLLM kimi_vl.py + moonvit.py), tiny shapes."""
    v, d = args.vision, args.decoder
    h, m = v.hidden_size, v.mlp_hidden_size
    names = {"vision_tower.patch_embed.proj.weight": (h, 3, v.patch_size, v.patch_size),
             "vision_tower.patch_embed.proj.bias": (h,),
             "vision_tower.patch_embed.pos_emb.weight": (v.pos_table_size, v.pos_table_size, h),
             "vision_tower.encoder.final_layernorm.weight": (h,), "vision_tower.encoder.final_layernorm.bias": (h,)}
    for i in range(v.num_layers):
        b = f"vision_tower.encoder.blocks.{i}."
        names.update({b + "norm0.weight": (h,), b + "norm0.bias": (h,), b + "norm1.weight": (h,),
                      b + "norm1.bias": (h,), b + "wqkv.weight": (3 * h, h), b + "wqkv.bias": (3 * h,),
                      b + "wo.weight": (h, h), b + "wo.bias": (h,), b + "mlp.fc0.weight": (m, h),
                      b + "mlp.fc0.bias": (m,), b + "mlp.fc1.weight": (h, m), b + "mlp.fc1.bias": (h,)})
    merged = 4 * h
    names.update({"multi_modal_projector.pre_norm.weight": (h,), "multi_modal_projector.pre_norm.bias": (h,),
                  "multi_modal_projector.linear_1.weight": (merged, merged),
                  "multi_modal_projector.linear_1.bias": (merged,),
                  "multi_modal_projector.linear_2.weight": (d.hidden_size, merged),
                  "multi_modal_projector.linear_2.bias": (d.hidden_size,),
                  "language_model.model.embed_tokens.weight": (d.vocab_size, d.hidden_size),
                  "language_model.model.norm.weight": (d.hidden_size,),
                  "language_model.lm_head.weight": (d.vocab_size, d.hidden_size)})
    qk = d.qk_nope_head_dim + d.qk_rope_head_dim
    for i in range(d.num_layers):
        p = f"language_model.model.layers.{i}."
        names.update({p + "input_layernorm.weight": (d.hidden_size,),
                      p + "post_attention_layernorm.weight": (d.hidden_size,),
                      p + "self_attn.q_proj.weight": (d.num_heads * qk, d.hidden_size),
                      p + "self_attn.kv_a_proj_with_mqa.weight": (d.kv_lora_rank + d.qk_rope_head_dim, d.hidden_size),
                      p + "self_attn.kv_a_layernorm.weight": (d.kv_lora_rank,),
                      p + "self_attn.kv_b_proj.weight": (d.num_heads * (d.qk_nope_head_dim + d.v_head_dim),
                                                         d.kv_lora_rank),
                      p + "self_attn.o_proj.weight": (d.hidden_size, d.num_heads * d.v_head_dim)})
        ffn, mlp = (d.dense_ffn_size, p + "mlp.") if i < d.num_dense_layers else (
            d.moe_ffn_size * d.num_shared_experts, p + "mlp.shared_experts.")
        names.update({mlp + "gate_proj.weight": (ffn, d.hidden_size), mlp + "up_proj.weight": (ffn, d.hidden_size),
                      mlp + "down_proj.weight": (d.hidden_size, ffn)})
        if i >= d.num_dense_layers:
            names.update({p + "mlp.gate.weight": (d.num_routed_experts, d.hidden_size),
                          p + "mlp.gate.e_score_correction_bias": (d.num_routed_experts,)})
            for e in range(d.num_routed_experts):
                x = f"{p}mlp.experts.{e}."
                names.update({x + "gate_proj.weight": (d.moe_ffn_size, d.hidden_size),
                              x + "up_proj.weight": (d.moe_ffn_size, d.hidden_size),
                              x + "down_proj.weight": (d.hidden_size, d.moe_ffn_size)})
    return names


def test_import_kimi_vl_a3b_names():
    torch.manual_seed(0)
    state = {name: torch.randn(shape).to(torch.bfloat16) for name, shape in _kimi_vl_a3b_names(ARGS).items()}
    imported = import_state_dict(state, "kimi_vl", ARGS)
    model = build_model(ARGS)
    missing, unexpected = model.load_state_dict(imported, strict=False)
    assert not unexpected and missing and all(name.startswith("coca.") for name in missing)
    assert imported["decoder.layers.2.moe.experts.w_up"].dtype == torch.bfloat16  # dtypes kept
    assert torch.equal(imported["decoder.layers.2.moe.experts.w_up"][5],
                       state["language_model.model.layers.2.mlp.experts.5.up_proj.weight"])
    assert torch.equal(imported["vision.blocks.1.qkv.weight"], state["vision_tower.encoder.blocks.1.wqkv.weight"])
    assert torch.equal(imported["vision.blocks.0.fc1.bias"], state["vision_tower.encoder.blocks.0.mlp.fc0.bias"])
    assert torch.equal(imported["decoder.layers.1.moe.expert_bias"],
                       state["language_model.model.layers.1.mlp.gate.e_score_correction_bias"])
    # Our exporter writes exactly the released names.
    assert export_state_dict(imported, "kimi_vl", ARGS).keys() == state.keys()


def test_import_errors_name_the_tensor():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    other = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=24, patch_size=4)).state_dict()
    with pytest.raises(ValueError, match=r"no counterpart: 'embeddings\.patch_embedding\.weight'"):
        import_state_dict(other, "kimi_vl", ARGS)
    with pytest.raises(ValueError, match=r"missing: 'encoder\.layers\.1\.|missing: 'vision_model\.encoder\.layers\.1"):
        import_state_dict(other, "siglip", ARGS)  # one layer where the flavor has two
    state = {name: torch.zeros(shape) for name, shape in _kimi_vl_a3b_names(ARGS).items()}
    state["language_model.model.layers.0.self_attn.o_proj.weight"] = torch.zeros(32, 7)
    with pytest.raises(ValueError, match=r"'language_model\.model\.layers\.0\.self_attn\.o_proj\.weight' of shape"):
        import_state_dict(state, "kimi_vl", ARGS)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        import_state_dict(state, "llama", ARGS)
    assert set(FORMATS) == {"kimi_vl", "kimi_k25", "kimi_k25_hub", "deepseek_v3", "siglip"}


def test_safetensors_shards_round_trip(tmp_path: Path):
    ours = _random_ours()
    save_safetensors(ours, tmp_path, shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = load_safetensors(tmp_path)
    assert back.keys() == ours.keys() and all(torch.equal(back[n], ours[n]) for n in ours)


# --- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_round_trip_through_a_trainer_checkpoint(tmp_path: Path):
    from transformers import DeepseekV3ForCausalLM

    from train.checkpoint import CheckpointManager, ModelState, load_checkpoint

    args = FLAVORS["debug"]
    torch.manual_seed(0)
    model = build_model(args)
    _perturb_norms(model)
    saved = CheckpointManager(tmp_path / "run", keep_last=1).save(3, {"model": ModelState(model)})
    hf_dir = tmp_path / "hf"
    hf_main(["export", "--format", "deepseek_v3", "--flavor", "debug", str(saved), str(hf_dir)])
    # transformers loads the export on its own (config.json + per-expert safetensors) and computes our logits.
    reference = DeepseekV3ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = torch.randint(0, args.decoder.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, model.decoder.logits(model.decoder(ids)[0]),
                                   atol=1e-4, rtol=0)
    vlm_dir = tmp_path / "kimi_vl"
    subprocess.run([sys.executable, "-m", "train.hf_convert", "export", "--format", "kimi_vl", "--flavor", "debug",
                    "--image-token-id", "4", str(saved), str(vlm_dir)], check=True, cwd=Path(__file__).parents[2],
                   capture_output=True)
    imported_dir = tmp_path / "imported"
    hf_main(["import", "--format", "kimi_vl", "--flavor", "debug", "--seed", "5", str(vlm_dir), str(imported_dir)])
    torch.manual_seed(1)
    restored = build_model(args)
    load_checkpoint(imported_dir, {"model": ModelState(restored)})
    original, back = model.state_dict(), restored.state_dict()
    assert all(torch.equal(back[n], original[n]) for n in original if not n.startswith("coca."))
    with torch.device("meta"):  # CoCa is not in Kimi-VL: the import initialized it from --seed
        fresh = KimiVL(args)
    fresh.coca.to_empty(device="cpu")
    fresh.coca.init_weights(ParamInit(5).child("coca"), std=args.decoder.init_std)
    assert all(torch.equal(back["coca." + n], t) for n, t in fresh.coca.state_dict().items())


def test_kimi_k25_export_loads_with_from_pretrained(tmp_path: Path):
    from transformers import Kimi_K25ForConditionalGeneration

    from model.hf import hf_config

    ours = _random_ours()
    exported = export_state_dict(ours, "kimi_k25", ARGS)
    save_safetensors(exported, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config("kimi_k25", ARGS, image_token_id=IMAGE_TOKEN)))
    loaded = Kimi_K25ForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    assert loaded.keys() == exported.keys() and all(torch.equal(loaded[n], t) for n, t in exported.items())
