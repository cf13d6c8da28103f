"""Model hyper-parameters from Hugging Face ``config.json`` files, the checkpoint format a directory holds, and the
complete ``config.json`` written on export.

Readable configs: DeepSeek-V3 / Moonlight (``model_type: deepseek_v3``), SigLIP (``siglip`` or
``siglip_vision_model``), transformers' Kimi_K25 (``kimi_k25``) and Moonshot's Kimi-VL remote code (``kimi_vl``: a
``MoonViTConfig`` and a DeepSeek text config, field names as in its ``configuration_kimi_vl.py``, mirrored by vLLM's
``transformers_utils/configs/kimi_vl.py`` and ``moonvit.py``). A config feature our model does not implement (query
LoRA, group-limited routing, RoPE scaling, tied embeddings, another activation) is refused by name rather than
silently dropped, because the weights would load and compute something else.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from config.model import DecoderArgs, ModelArgs, VisionArgs

__all__ = ["PARTS_OF_FORMAT", "HFConfigError", "args_from_hf", "detect_format", "export_config", "read_hf_config"]

# The parts of our model each checkpoint format carries.
PARTS_OF_FORMAT = {"kimi_vl": ("vision", "projector", "decoder"), "kimi_k25": ("vision", "projector", "decoder"),
                   "kimi_k25_hub": ("vision", "projector", "decoder"), "deepseek_v3": ("decoder",),
                   "siglip": ("vision",)}
_MODEL_TYPES = {"deepseek_v3": "deepseek_v3", "deepseek_v2": "deepseek_v3", "kimi_vl": "kimi_vl",
                "kimi_k25": "kimi_k25", "siglip": "siglip", "siglip_vision_model": "siglip"}


class HFConfigError(ValueError):
    """A config.json this framework cannot express (the message names the field and the value)."""


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face checkpoint directory."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no config.json (not a Hugging Face checkpoint directory)")
    return json.loads(path.read_text())


def detect_format(config: dict[str, Any], names: list[str] | None = None) -> str:
    """The checkpoint format (a key of ``model.hf.FORMATS``) of a directory with this config and tensor names.

    Kimi_K25 checkpoints come in two layouts: the files on the hub (``mm_projector.proj.0``, fused ``wqkv``) and
    transformers' in-memory names (``model.mm_projector.in_proj``); the tensor names decide.
    """
    model_type = config.get("model_type", "")
    if model_type not in _MODEL_TYPES:
        raise HFConfigError(f"config.json has model_type={model_type!r}; readable: {sorted(_MODEL_TYPES)}")
    fmt = _MODEL_TYPES[model_type]
    if fmt == "kimi_k25" and names is not None and any(n.startswith("mm_projector.") for n in names):
        return "kimi_k25_hub"
    return fmt


def _need(config: dict[str, Any], key: str, where: str) -> Any:
    if key not in config:
        raise HFConfigError(f"{where} has no {key!r}")
    return config[key]


def _refuse(ok: bool, where: str, key: str, value: Any, why: str) -> None:
    if not ok:
        raise HFConfigError(f"{where}: {key}={value!r} is not supported ({why})")


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("type", scaling.get("rope_type", "default")))
    _refuse(kind == "default", "text config", "rope type", kind, "only plain RoPE is implemented")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def decoder_args_from_hf(text: dict[str, Any], base: DecoderArgs, where: str = "text config") -> DecoderArgs:
    """A DeepSeek-V3 / Moonlight text config as :class:`DecoderArgs` (``init_std`` and balancing rates from
    ``base``)."""
    def need(key: str) -> Any:
        return _need(text, key, where)

    _refuse(text.get("q_lora_rank") is None, where, "q_lora_rank", text.get("q_lora_rank"),
            "the decoder has no query LoRA, as Moonlight")
    _refuse(text.get("n_group", 1) in (1, None) and text.get("topk_group", 1) in (1, None), where, "n_group",
            text.get("n_group"), "group-limited routing is not implemented")
    _refuse(text.get("scoring_func", "sigmoid") == "sigmoid", where, "scoring_func", text.get("scoring_func"),
            "the router scores with a sigmoid")
    _refuse(text.get("hidden_act", "silu") == "silu", where, "hidden_act", text.get("hidden_act"), "SwiGLU")
    _refuse(not text.get("tie_word_embeddings", False), where, "tie_word_embeddings", True,
            "the output head is a separate matrix")
    heads = need("num_attention_heads")
    _refuse(text.get("num_key_value_heads", heads) == heads, where, "num_key_value_heads",
            text.get("num_key_value_heads"), "MLA has one key/value head per query head")
    layers = need("num_hidden_layers")
    return dataclasses.replace(
        base, vocab_size=need("vocab_size"), hidden_size=need("hidden_size"), num_layers=layers,
        num_dense_layers=min(text.get("first_k_dense_replace", 0), layers), dense_ffn_size=need("intermediate_size"),
        num_heads=heads, kv_lora_rank=need("kv_lora_rank"), qk_nope_head_dim=need("qk_nope_head_dim"),
        qk_rope_head_dim=need("qk_rope_head_dim"), v_head_dim=need("v_head_dim"),
        num_routed_experts=need("n_routed_experts"), num_shared_experts=text.get("n_shared_experts") or 0,
        num_experts_per_token=need("num_experts_per_tok"), moe_ffn_size=need("moe_intermediate_size"),
        routed_scaling_factor=float(text.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(text.get("norm_topk_prob", False)), rope_theta=_rope_theta(text),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)))


def _merge(config: dict[str, Any], where: str) -> int:
    kernel = config.get("merge_kernel_size", [2, 2])
    kernel = [kernel, kernel] if isinstance(kernel, int) else list(kernel)
    _refuse(kernel[0] == kernel[1], where, "merge_kernel_size", kernel, "the projector merges square blocks")
    return int(kernel[0])


def vision_args_from_hf(vision: dict[str, Any], kind: str, base: VisionArgs) -> VisionArgs:
    """A MoonViT (Kimi-VL), Kimi_K25 or SigLIP vision config as :class:`VisionArgs`.

    A SigLIP tower becomes MoonViT without 2D RoPE (``use_rope=False``), so its features equal SigLIP's; the report
    adds RoPE on top of SigLIP-SO400M: override ``model.vision.use_rope=true`` for that.
    """
    where = f"{kind} vision config"

    def need(key: str) -> Any:
        return _need(vision, key, where)

    common = dict(patch_size=need("patch_size"), hidden_size=need("hidden_size"),
                  num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
                  mlp_hidden_size=need("intermediate_size"))
    if kind == "siglip":
        return dataclasses.replace(base, **common, pos_table_size=need("image_size") // common["patch_size"],
                                   use_rope=False, layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)))
    height, width = ((need("init_pos_emb_height"), need("init_pos_emb_width")) if kind == "kimi_vl"
                     else (need("pos_emb_height"), need("pos_emb_width")))
    _refuse(height == width, where, "position table", (height, width), "the table is square")
    theta = float((vision.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return dataclasses.replace(base, **common, pos_table_size=height, use_rope=True, rope_theta=theta,
                               merge_size=_merge(vision, where))


def args_from_hf(config: dict[str, Any], base: ModelArgs, parts: tuple[str, ...] | None = None) -> ModelArgs:
    """``base`` with the hyper-parameters of the parts ``config`` describes (or only ``parts`` of them).

    Args:
        config: A parsed ``config.json``.
        base: Supplies everything the config does not (e.g. the vision tower and CoCa for a Moonlight config).
        parts: Restrict to these of ``vision`` / ``decoder`` (the projector has no hyper-parameters of its own).

    Returns:
        The new :class:`ModelArgs` (``flavor`` names the source: ``hf:<model_type>``).
    """
    fmt = detect_format(config)
    carried = PARTS_OF_FORMAT[fmt]
    wanted = carried if parts is None else parts
    absent = [p for p in wanted if p not in carried]
    if absent:
        raise HFConfigError(f"a {config.get('model_type')} config describes {', '.join(carried)}, not "
                            f"{', '.join(absent)}")
    vision, decoder = base.vision, base.decoder
    if fmt == "deepseek_v3":
        decoder = decoder_args_from_hf(config, decoder) if "decoder" in wanted else decoder
    elif fmt == "siglip":
        section = config.get("vision_config", config) if config.get("model_type") == "siglip" else config
        vision = vision_args_from_hf(section, "siglip", vision) if "vision" in wanted else vision
    else:
        if "decoder" in wanted:
            decoder = decoder_args_from_hf(_need(config, "text_config", fmt), decoder, f"{fmt} text_config")
        if "vision" in wanted:
            vision = vision_args_from_hf(_need(config, "vision_config", fmt), fmt, vision)
        if fmt == "kimi_k25" and "projection_layer_norm_eps" in config:
            # One LayerNorm epsilon serves MoonViT and the projector's pre-norm (Kimi-VL: 1e-5 for both).
            vision = dataclasses.replace(vision, layer_norm_eps=float(config["projection_layer_norm_eps"]))
    return dataclasses.replace(base, flavor=f"hf:{config.get('model_type')}", vision=vision, decoder=decoder)


# --- export -----------------------------------------------------------------------------------------------------------


def _deepseek_v3_config(d: DecoderArgs) -> dict[str, Any]:
    return {
        "model_type": "deepseek_v3", "vocab_size": d.vocab_size, "hidden_size": d.hidden_size,
        "intermediate_size": d.dense_ffn_size, "moe_intermediate_size": d.moe_ffn_size,
        "num_hidden_layers": d.num_layers, "num_attention_heads": d.num_heads, "num_key_value_heads": d.num_heads,
        "n_shared_experts": d.num_shared_experts, "n_routed_experts": d.num_routed_experts,
        "routed_scaling_factor": d.routed_scaling_factor, "kv_lora_rank": d.kv_lora_rank, "q_lora_rank": None,
        "qk_rope_head_dim": d.qk_rope_head_dim, "v_head_dim": d.v_head_dim, "qk_nope_head_dim": d.qk_nope_head_dim,
        "n_group": 1, "topk_group": 1, "num_experts_per_tok": d.num_experts_per_token,
        "first_k_dense_replace": d.num_dense_layers, "norm_topk_prob": d.norm_topk_prob, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "rms_norm_eps": d.rms_norm_eps, "hidden_act": "silu", "rope_interleave": True,
        "rope_theta": d.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": d.rope_theta},
        "tie_word_embeddings": False, "initializer_range": d.init_std,
    }


def _token_ids(tokens: dict[str, int | None]) -> dict[str, int]:
    return {key: value for key, value in tokens.items() if value is not None}


def export_config(fmt: str, args: ModelArgs, image_token_id: int | None = None, video_token_id: int | None = None,
                  bos_token_id: int | None = None, eos_token_id: int | None = None,
                  pad_token_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of an export in format ``fmt``: every hyper-parameter and the special token ids.

    ``deepseek_v3``, ``kimi_k25`` / ``kimi_k25_hub`` and ``siglip`` load with transformers' own classes;
    ``kimi_vl`` is the released remote-code config (``KimiVLConfig``), read back by :func:`args_from_hf`.

    Raises:
        HFConfigError: A multimodal format without ``image_token_id`` (the placeholder the model replaces).
    """
    if fmt not in PARTS_OF_FORMAT:
        raise HFConfigError(f"unknown checkpoint format {fmt!r}; choose one of {sorted(PARTS_OF_FORMAT)}")
    text_ids = _token_ids({"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id})
    if "projector" in PARTS_OF_FORMAT[fmt] and image_token_id is None:
        raise HFConfigError(f"exporting {fmt} needs the image token id (--tokenizer or --image-token-id): "
                            "config.json must say which token the image features replace")
    video_token_id = image_token_id if video_token_id is None else video_token_id
    v, d = args.vision, args.decoder
    if fmt == "deepseek_v3":
        return {"architectures": ["DeepseekV3ForCausalLM"], **_deepseek_v3_config(d), **text_ids}
    if fmt == "siglip":
        return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
                "hidden_size": v.hidden_size, "intermediate_size": v.mlp_hidden_size,
                "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "num_channels": v.in_channels,
                "patch_size": v.patch_size, "image_size": v.patch_size * v.pos_table_size,
                "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}
    merge = [v.merge_size, v.merge_size]
    if fmt == "kimi_vl":
        vision = {"model_type": "moonvit", "patch_size": v.patch_size, "init_pos_emb_height": v.pos_table_size,
                  "init_pos_emb_width": v.pos_table_size, "num_attention_heads": v.num_heads,
                  "num_hidden_layers": v.num_layers, "hidden_size": v.hidden_size,
                  "intermediate_size": v.mlp_hidden_size, "merge_kernel_size": merge}
        return {"architectures": ["KimiVLForConditionalGeneration"], "model_type": "kimi_vl",
                "auto_map": {"AutoConfig": "configuration_kimi_vl.KimiVLConfig",
                             "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
                             "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration"},
                "vision_config": vision, "text_config": {**_deepseek_v3_config(d), **text_ids},
                "media_placeholder_token_id": image_token_id, "ignore_index": -100,
                "pad_token_id": pad_token_id or 0}
    vision = {"model_type": "kimi_k25_vision", "patch_size": v.patch_size, "pos_emb_height": v.pos_table_size,
              "pos_emb_width": v.pos_table_size, "num_attention_heads": v.num_heads,
              "num_hidden_layers": v.num_layers, "hidden_size": v.hidden_size, "intermediate_size": v.mlp_hidden_size,
              "merge_kernel_size": merge, "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
    return {"architectures": ["Kimi_K25ForConditionalGeneration"], "model_type": "kimi_k25",
            "text_config": {**_deepseek_v3_config(d), **text_ids}, "vision_config": vision,
            "projection_hidden_size": v.hidden_size, "projection_layer_norm_eps": v.layer_norm_eps,
            "image_token_id": image_token_id, "video_token_id": video_token_id, "tie_word_embeddings": False}


# --- recipes ----------------------------------------------------------------------------------------------------------

HF_PREFIX = "hf:"


def model_args_from_recipe(raw: dict[str, Any], flavors: dict[str, ModelArgs]) -> tuple[ModelArgs, dict[str, Any]]:
    """The base :class:`ModelArgs` of a recipe's ``model`` section, and the overrides left to apply on top.

    ``flavor: hf:DIR`` takes every part ``DIR/config.json`` describes (the rest from ``kimi_vl_a3b``);
    ``decoder: hf:DIR`` / ``vision: hf:DIR`` take that part from the config over the flavor's.

    Raises:
        HFConfigError: An unknown flavor, an unreadable config, or a part the config does not describe.
    """
    raw = dict(raw)
    flavor = str(raw.get("flavor", "kimi_vl_a3b"))
    if flavor.startswith(HF_PREFIX):
        base = dataclasses.replace(args_from_hf(_read(flavor, "model.flavor"), flavors["kimi_vl_a3b"]),
                                   flavor=flavor)
    elif flavor in flavors:
        base = flavors[flavor]
    else:
        raise HFConfigError(f"model.flavor='{flavor}' is unknown; allowed: {', '.join(sorted(flavors))} or "
                            "hf:<directory with a config.json>")
    for part in ("vision", "decoder"):
        value = raw.get(part)
        if isinstance(value, str):
            if not value.startswith(HF_PREFIX):
                raise HFConfigError(f"model.{part}='{value}': a part given as a string must be hf:<directory>")
            base = args_from_hf(_read(value, f"model.{part}"), base, parts=(part,))
            raw.pop(part)
    raw.pop("flavor", None)
    return dataclasses.replace(base, flavor=flavor), raw


def _read(source: str, key: str) -> dict[str, Any]:
    directory = source[len(HF_PREFIX):]
    try:
        return read_hf_config(directory)
    except FileNotFoundError as error:
        raise HFConfigError(f"{key}='{source}': {error}") from None
