"""Kimi-VL model code: single-device math, built on ``meta`` and parallelized from :mod:`parallel`."""

from config.model import CocaArgs, DecoderArgs, ModelArgs, VisionArgs
from model.attention import apply_rotary, rope_angles_1d, rope_angles_2d, varlen_attention
from model.coca import CocaOutput, CocaTowers
from model.decoder import MoEAux, MoEDecoder
from model.moe import MoE
from model.projector import PatchMergerProjector
from model.registry import FLAVORS, build_model, count_parameters
from model.vision import MoonViT
from model.vlm import KimiVL

__all__ = [
    "FLAVORS",
    "CocaArgs",
    "CocaOutput",
    "CocaTowers",
    "DecoderArgs",
    "KimiVL",
    "ModelArgs",
    "MoE",
    "MoEAux",
    "MoEDecoder",
    "MoonViT",
    "PatchMergerProjector",
    "VisionArgs",
    "apply_rotary",
    "build_model",
    "count_parameters",
    "rope_angles_1d",
    "rope_angles_2d",
    "varlen_attention",
]
