"""Hugging Face interop: state-dict import/export, safetensors I/O, and a checkpoint conversion CLI.

Formats (the rules live in :mod:`model.hf_names`):

* ``kimi_vl``: the released Kimi-VL-A3B checkpoint names (``vision_tower.*``, ``multi_modal_projector.*``,
  ``language_model.*``, one ``Linear`` per expert), as read by its ``modeling_kimi_vl.py`` and vLLM.
* ``kimi_k25``: transformers' ``Kimi_K25ForConditionalGeneration`` in memory (rotate-half vision q/k rows, fused
  experts).
* ``kimi_k25_hub``: the files of a Kimi_K25 checkpoint as on the hub (``vision_tower.encoder.blocks.N.wqkv``,
  ``mm_projector.proj.0/2``, ``language_model.model.*``, one ``Linear`` per expert); ``from_pretrained`` maps them.
* ``deepseek_v3``: a DeepSeek-V3 / Moonlight text checkpoint (``DeepseekV3ForCausalLM``); the decoder only.
* ``siglip``: a SigLIP vision tower (SigLIP-SO400M: ``vision_model.*``); MoonViT only. Its position table is
  resampled to ``pos_table_size``; SigLIP has no 2D RoPE, so features equal SigLIP's only with ``use_rope=False``.

Import checks every name and shape against the target flavor and says which tensor is wrong; experts may come in
either layout. Every transform is a rename, concatenation, split or row permutation, so import -> export -> import is
bit-exact (a resampled position table is the one exception). The CoCa towers belong to no released format: import
initializes them (and any part the format does not carry) from the seed, export drops them.

CLI (our side is a ``torch.distributed.checkpoint`` directory as written by ``train/checkpoint.py``, model state
under ``model.``, or a plain ``.pt`` / ``.safetensors`` state dict)::

    python -m train.hf_convert import --format kimi_vl --flavor kimi_vl_a3b HF_DIR OUT_DCP_DIR
    python -m train.hf_convert export --format deepseek_v3 --flavor small CKPT_DIR HF_DIR
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from config.hf_config import export_config as hf_config
from config.model import DecoderArgs, ModelArgs
from model.hf_files import SafetensorsCheckpoint
from model.hf_names import FORMATS, Rule, build_rules
from model.vlm import KimiVL

__all__ = ["FORMATS", "export_state_dict", "hf_config", "import_state_dict", "load_safetensors", "save_safetensors"]

SHARD_BYTES = 5 * 1024**3
_SHOWN = 5  # names quoted in an error message


def _spec(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {sorted(FORMATS)}.")
    return FORMATS[fmt]


def _our_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # no memory, even for the 16B flavor
        model = KimiVL(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _normalize(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    # transformers' SiglipVisionModel has no ``vision_model.`` level in its own state dict; hub checkpoints do.
    if fmt == "siglip" and not any(name.startswith("vision_model.") for name in state):
        return {"vision_model." + name: t for name, t in state.items()}
    return state


def _detect_fused(state: dict[str, torch.Tensor], fmt: str, decoder: DecoderArgs) -> bool:
    spec = _spec(fmt)
    if spec.decoder is None or decoder.num_layers <= decoder.num_dense_layers:
        return spec.fused_experts
    return f"{spec.decoder[0]}layers.{decoder.num_dense_layers}.mlp.experts.gate_up_proj" in state


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


def _apply(rule: Rule, tensors: list[torch.Tensor], to_ours: bool) -> list[torch.Tensor]:
    try:
        return rule.to_ours(tensors) if to_ours else rule.to_theirs(tensors)
    except RuntimeError as error:  # e.g. experts of different shapes cannot be stacked
        names = rule.theirs if to_ours else rule.ours
        shapes = {n: tuple(t.shape) for n, t in zip(names[:_SHOWN], tensors, strict=False)}
        raise ValueError(f"cannot convert {shapes}: {error}") from None


def import_state_dict(state: dict[str, torch.Tensor], fmt: str, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Convert a checkpoint of format ``fmt`` to our names (``vision.*``, ``projector.*``, ``decoder.*``).

    Args:
        state: Their tensors by name.
        fmt: One of :data:`FORMATS`.
        args: The flavor receiving the weights: fixes the expected names (layer and expert counts) and shapes.

    Returns:
        Our tensors for the parts the format carries (dtypes kept).

    Raises:
        ValueError: Naming the tensors that are missing, unexpected, or of the wrong shape.
    """
    spec = _spec(fmt)
    state = _normalize(state, fmt)
    rules = build_rules(fmt, args, _detect_fused(state, fmt, args.decoder))
    consumed = {name for rule in rules for name in rule.theirs}
    missing = [name for rule in rules for name in rule.theirs if name not in state]
    unexpected = [n for n in state if n not in consumed and not any(part in n for part in spec.ignored)]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing: {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors with no counterpart: {_listing(unexpected)}")
        raise ValueError(f"not a {spec.description} checkpoint for flavor {args.flavor!r}: {'; '.join(problems)}. "
                         "Check --format and --flavor (layer, expert and head counts must match).")
    expected = _our_shapes(args)
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        sources = [state[name] for name in rule.theirs]
        for name, tensor in zip(rule.ours, _apply(rule, sources, to_ours=True), strict=True):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"tensor {rule.theirs[0]!r} of shape {tuple(sources[0].shape)} gives our {name!r} "
                                 f"the shape {tuple(tensor.shape)}, but flavor {args.flavor!r} expects "
                                 f"{expected[name]}: wrong flavor or not a {spec.description} checkpoint.")
            out[name] = tensor
    return out


def export_state_dict(
    state: dict[str, torch.Tensor], fmt: str, args: ModelArgs, fused_experts: bool | None = None
) -> dict[str, torch.Tensor]:
    """Convert our state dict to format ``fmt`` (parts the format does not carry, e.g. CoCa, are dropped).

    Args:
        state: Our tensors by name (a :class:`~model.vlm.KimiVL` state dict).
        fmt: One of :data:`FORMATS`.
        args: The flavor of ``state``.
        fused_experts: Write transformers' fused ``gate_up_proj`` (True) or one ``Linear`` per expert (False, as
            released checkpoints and ``from_pretrained`` expect); the format's default when None.

    Returns:
        Their tensors by name.
    """
    spec = _spec(fmt)
    rules = build_rules(fmt, args, spec.fused_experts if fused_experts is None else fused_experts)
    missing = [name for rule in rules for name in rule.ours if name not in state]
    if missing:
        raise ValueError(f"cannot export to {spec.description}: our state dict lacks {_listing(missing)} "
                         f"(is it a {args.flavor!r} model?).")
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        out.update(zip(rule.theirs, _apply(rule, [state[name] for name in rule.ours], to_ours=False), strict=True))
    return out


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file or checkpoint directory: the shards its ``*.index.json`` names (other
    ``.safetensors`` files there are ignored), else its single safetensors file (model/hf_files.py)."""
    return SafetensorsCheckpoint(path).load_all()


def save_safetensors(state: dict[str, torch.Tensor], directory: str | Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Write ``state`` as Hugging Face safetensors shards plus ``model.safetensors.index.json`` when sharded."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
