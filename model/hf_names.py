"""Name and layout rules between our state dict and the checkpoint formats of :mod:`model.hf`.

A :class:`Rule` ties a group of our tensors to a group of theirs with two exact (bit-preserving) transforms: renames,
fused q/k/v versus separate projections, stacked ``[E, out, in]`` experts versus one ``Linear`` per expert or
transformers' fused ``gate_up_proj``, and the q/k row permutation between rotary layouts.

Vision rotary layouts: ours (and Kimi-VL's, which multiplies ``view_as_complex`` pairs) rotates *interleaved* pairs
``(2j, 2j + 1)`` of each head; transformers' ``Kimi_K25`` tower rotates *halves* ``(j, j + d/2)`` with the same
angle per pair. The angles agree pair for pair (even pairs: width position, odd pairs: height position), so moving
q/k rows ``2j + c <-> c * d/2 + j`` within each head is all a conversion needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from config.model import DecoderArgs, ModelArgs, VisionArgs
from model.vision import interpolate_pos_table

__all__ = ["FORMATS", "FormatSpec", "Rule", "build_rules"]

Tensors = list[torch.Tensor]


def _same(tensors: Tensors) -> Tensors:
    return list(tensors)


@dataclass(frozen=True)
class Rule:
    """Our tensors ``ours`` correspond to their tensors ``theirs`` through ``to_ours`` / ``to_theirs``."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Callable[[Tensors], Tensors] = _same
    to_theirs: Callable[[Tensors], Tensors] = _same


def _renames(pairs: dict[str, str]) -> list[Rule]:
    return [Rule((ours,), (theirs,)) for ours, theirs in pairs.items()]


def _affine(ours: str, theirs: str) -> dict[str, str]:
    """Weight and bias of a Linear / LayerNorm / Conv2d."""
    return {f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"}


# --- vision ---------------------------------------------------------------------------------------------------------


class VisionNames(NamedTuple):
    """Where a vision-tower format keeps each tensor (relative to its prefix; ``{i}`` is the block index)."""

    patch: str
    pos: str
    block: str
    norm1: str
    norm2: str
    qkv: str | tuple[str, str, str]  # one fused projection, or separate q, k, v
    proj: str
    fc1: str
    fc2: str
    final: str
    rope_halves: bool = False  # q/k rows in transformers' rotate-half layout
    flat_pos: bool = False  # position table stored as [P * P, D] (SigLIP's nn.Embedding)


KIMI_VL_VISION = VisionNames(
    patch="patch_embed.proj", pos="patch_embed.pos_emb.weight", block="encoder.blocks.{i}.", norm1="norm0",
    norm2="norm1", qkv="wqkv", proj="wo", fc1="mlp.fc0", fc2="mlp.fc1", final="encoder.final_layernorm")
KIMI_K25_VISION = VisionNames(
    patch="patch_embed.proj", pos="patch_embed.pos_emb.position_embeddings", block="layers.{i}.", norm1="norm1",
    norm2="norm2", qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"), proj="attn.proj", fc1="mlp.fc1",
    fc2="mlp.fc2", final="final_layernorm", rope_halves=True)
SIGLIP_VISION = VisionNames(
    patch="embeddings.patch_embedding", pos="embeddings.position_embedding.weight", block="encoder.layers.{i}.",
    norm1="layer_norm1", norm2="layer_norm2", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    proj="self_attn.out_proj", fc1="mlp.fc1", fc2="mlp.fc2", final="post_layernorm", flat_pos=True)


def interleaved_to_halves(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k output rows (weight or bias) of every head from interleaved pairs to rotate-half halves."""
    d = rows.shape[0] // heads
    return rows.reshape(heads, d // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def halves_to_interleaved(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_halves`."""
    d = rows.shape[0] // heads
    return rows.reshape(heads, 2, d // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _qkv_rule(ours: str, theirs: tuple[str, str, str], heads: int, halves: bool) -> Rule:
    def to_ours(tensors: Tensors) -> Tensors:
        q, k, v = tensors
        if halves:
            q, k = halves_to_interleaved(q, heads), halves_to_interleaved(k, heads)
        return [torch.cat((q, k, v))]  # our fused layout: [3, heads, head_dim] rows, as Kimi-VL's wqkv

    def to_theirs(tensors: Tensors) -> Tensors:
        q, k, v = (t.clone() for t in tensors[0].chunk(3))  # clones: safetensors refuses tensors sharing memory
        if halves:
            q, k = interleaved_to_halves(q, heads), interleaved_to_halves(k, heads)
        return [q, k, v]

    return Rule((ours,), theirs, to_ours, to_theirs)


def _pos_rule(ours: str, theirs: str, args: VisionArgs, flat: bool) -> Rule:
    side = args.pos_table_size

    def to_ours(tensors: Tensors) -> Tensors:
        table = tensors[0]
        if flat:  # SigLIP: [P * P, D], row-major over the P x P grid
            table = table.reshape(math.isqrt(table.shape[0]), -1, table.shape[-1])
        if table.shape[0] != side or table.shape[1] != side:
            # Another table size (e.g. SigLIP-SO400M's 27 x 27 -> MoonViT's 64 x 64): resample it bicubically, the
            # same interpolation the tower applies per image, so positions keep their meaning.
            with torch.no_grad():
                table = interpolate_pos_table(table.float(), side, side).reshape(side, side, -1).to(tensors[0].dtype)
        return [table]

    def to_theirs(tensors: Tensors) -> Tensors:
        return [tensors[0].flatten(0, 1) if flat else tensors[0]]

    return Rule((ours,), (theirs,), to_ours, to_theirs)


def vision_rules(args: VisionArgs, names: VisionNames, prefix: str) -> list[Rule]:
    """Rules of the vision tower (our prefix ``vision.``)."""
    p = prefix
    rules = _renames({**_affine("vision.patch_embed", p + names.patch), **_affine("vision.norm", p + names.final)})
    rules.append(_pos_rule("vision.pos_table", p + names.pos, args, names.flat_pos))
    for i in range(args.num_layers):
        ours, theirs = f"vision.blocks.{i}.", p + names.block.format(i=i)
        rules += _renames({**_affine(ours + "norm1", theirs + names.norm1),
                           **_affine(ours + "norm2", theirs + names.norm2),
                           **_affine(ours + "proj", theirs + names.proj),
                           **_affine(ours + "fc1", theirs + names.fc1), **_affine(ours + "fc2", theirs + names.fc2)})
        if isinstance(names.qkv, str):
            rules += _renames(_affine(ours + "qkv", theirs + names.qkv))
        else:
            for kind in ("weight", "bias"):
                separate = tuple(f"{theirs}{name}.{kind}" for name in names.qkv)
                rules.append(_qkv_rule(f"{ours}qkv.{kind}", separate, args.num_heads, names.rope_halves))
    return rules


# --- projector ------------------------------------------------------------------------------------------------------


def projector_rules(prefix: str, names: tuple[str, str, str]) -> list[Rule]:
    """Rules of the projector: (pre-norm, first linear, second linear) names under ``prefix``."""
    ours = ("projector.pre_norm", "projector.linear_1", "projector.linear_2")
    pairs: dict[str, str] = {}
    for mine, theirs in zip(ours, names, strict=True):
        pairs.update(_affine(mine, prefix + theirs))
    return _renames(pairs)


# --- decoder --------------------------------------------------------------------------------------------------------


def _experts_rule(ours: str, theirs: str, num_experts: int, fused: bool) -> Rule:
    mine = (ours + "w_gate", ours + "w_up", ours + "w_down")
    if fused:  # transformers' modules: gate_up_proj [E, 2F, H] (gate rows first), down_proj [E, H, F]
        def to_ours(tensors: Tensors) -> Tensors:
            gate, up = tensors[0].chunk(2, dim=1)
            return [gate.contiguous(), up.contiguous(), tensors[1]]

        def to_theirs(tensors: Tensors) -> Tensors:
            return [torch.cat(tensors[:2], dim=1), tensors[2]]

        return Rule(mine, (theirs + "gate_up_proj", theirs + "down_proj"), to_ours, to_theirs)

    # Released checkpoints (Moonlight, Kimi-VL, DeepSeek-V3): one Linear per expert.
    names = tuple(f"{theirs}{e}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")
                  for e in range(num_experts))

    def stack(tensors: Tensors) -> Tensors:
        return [torch.stack(tensors[j * num_experts:(j + 1) * num_experts]) for j in range(3)]

    def unstack(tensors: Tensors) -> Tensors:
        return [expert.clone() for stacked in tensors for expert in stacked.unbind(0)]

    return Rule(mine, names, stack, unstack)


def decoder_rules(args: DecoderArgs, prefix: str, head: str, fused_experts: bool) -> list[Rule]:
    """Rules of the decoder (our prefix ``decoder.``) for DeepSeek-V3 names under ``prefix``.

    MLA's decoupled rotary rows need no permutation: DeepSeek-V3 checkpoints keep them interleaved
    (transformers' ``rope_interleave=True``), which is our layout.
    """
    rules = _renames({"decoder.embed_tokens.weight": prefix + "embed_tokens.weight",
                      "decoder.norm.weight": prefix + "norm.weight", "decoder.output.weight": head})
    for i in range(args.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"{prefix}layers.{i}."
        pairs = {"attention_norm.weight": "input_layernorm.weight",
                 "ffn_norm.weight": "post_attention_layernorm.weight",
                 "attention.q_proj.weight": "self_attn.q_proj.weight",
                 "attention.kv_a_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
                 "attention.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
                 "attention.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
                 "attention.o_proj.weight": "self_attn.o_proj.weight"}
        swiglu = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
        if i < args.num_dense_layers:
            pairs.update({f"mlp.{name}": f"mlp.{name}" for name in swiglu})
        else:
            pairs.update({"moe.router.weight": "mlp.gate.weight",
                          "moe.expert_bias": "mlp.gate.e_score_correction_bias"})
            pairs.update({f"moe.shared_experts.{name}": f"mlp.shared_experts.{name}" for name in swiglu})
            rules.append(_experts_rule(ours + "moe.experts.", theirs + "mlp.experts.", args.num_routed_experts,
                                       fused_experts))
        rules += _renames({ours + mine: theirs + other for mine, other in pairs.items()})
    return rules


# --- formats --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatSpec:
    """Where one checkpoint format keeps each part; None for parts it does not carry.

    Attributes:
        vision: ``(prefix, names)`` of the vision tower.
        projector: ``(prefix, (pre_norm, linear_1, linear_2))``.
        decoder: ``(prefix, lm_head name)``.
        fused_experts: Default expert layout written on export (import detects it).
        ignored: Name fragments of their tensors that have no counterpart here and are skipped on import.
        description: What the format is, for messages.
    """

    vision: tuple[str, VisionNames] | None
    projector: tuple[str, tuple[str, str, str]] | None
    decoder: tuple[str, str] | None
    fused_experts: bool
    ignored: tuple[str, ...]
    description: str


FORMATS: dict[str, FormatSpec] = {
    "kimi_vl": FormatSpec(
        vision=("vision_tower.", KIMI_VL_VISION),
        projector=("multi_modal_projector.", ("pre_norm", "linear_1", "linear_2")),
        decoder=("language_model.model.", "language_model.lm_head.weight"), fused_experts=False,
        ignored=("rotary_emb.inv_freq",), description="released Kimi-VL-A3B checkpoint (modeling_kimi_vl.py names)"),
    "kimi_k25": FormatSpec(
        vision=("model.vision_tower.", KIMI_K25_VISION),
        projector=("model.mm_projector.", ("pre_norm", "in_proj", "out_proj")),
        decoder=("model.language_model.", "lm_head.weight"), fused_experts=True,
        ignored=(), description="transformers Kimi_K25ForConditionalGeneration"),
    # The files of a Kimi_K25 checkpoint (what the hub holds; transformers renames them on load, see its
    # conversion_mapping.py "kimi_k25"): Kimi-VL's vision and decoder names, fused interleaved wqkv, one Linear per
    # expert, and the projector as an nn.Sequential (proj.0 / proj.2).
    "kimi_k25_hub": FormatSpec(
        vision=("vision_tower.", KIMI_VL_VISION),
        projector=("mm_projector.", ("pre_norm", "proj.0", "proj.2")),
        decoder=("language_model.model.", "language_model.lm_head.weight"), fused_experts=False,
        ignored=("rotary_emb.inv_freq",), description="Kimi_K25 checkpoint files (on-disk names)"),
    "deepseek_v3": FormatSpec(
        vision=None, projector=None, decoder=("model.", "lm_head.weight"), fused_experts=False,
        ignored=("rotary_emb.inv_freq",), description="DeepSeek-V3 / Moonlight decoder (DeepseekV3ForCausalLM)"),
    "siglip": FormatSpec(
        vision=("vision_model.", SIGLIP_VISION), projector=None, decoder=None, fused_experts=False,
        # SigLIP's attention-pooling head, its text tower and its loss scalars have no MoonViT counterpart.
        ignored=("vision_model.head.", "text_model.", "logit_scale", "logit_bias"),
        description="SigLIP vision tower (SiglipVisionModel / SiglipModel's vision_model)"),
}


def build_rules(fmt: str, args: ModelArgs, fused_experts: bool) -> list[Rule]:
    """Every rule of format ``fmt`` for a model of ``args``."""
    spec = FORMATS[fmt]
    rules: list[Rule] = []
    if spec.vision is not None:
        rules += vision_rules(args.vision, spec.vision[1], spec.vision[0])
    if spec.projector is not None:
        rules += projector_rules(*spec.projector)
    if spec.decoder is not None:
        rules += decoder_rules(args.decoder, spec.decoder[0], spec.decoder[1], fused_experts)
    return rules
