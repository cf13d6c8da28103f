"""Model hyper-parameters: plain dataclasses, no parallel fields.

The defaults are the real ``kimi_vl_a3b`` sizes (Kimi-VL-A3B: MoonViT-SO400M-style encoder, 2x2 pixel-shuffle MLP
projector, Moonlight / DeepSeek-V3-style MLA + MoE decoder). Smaller flavors live in :mod:`model.registry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class VisionArgs:
    """MoonViT: native-resolution ViT over packed patch sequences."""

    patch_size: int = 14
    in_channels: int = 3
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    mlp_hidden_size: int = 4304
    # Learnable (pos_table_size x pos_table_size x hidden) absolute position table (SigLIP's), bicubically
    # interpolated to each image's patch grid.
    pos_table_size: int = 64
    # 2D RoPE on q/k (height/width); switchable so the tower can be compared with a plain SigLIP ViT.
    use_rope: bool = True
    rope_theta: float = 10000.0
    # Kimi-VL's MoonViT blocks, final norm and projector pre-norm use LayerNorm's default 1e-5 (SigLIP: 1e-6).
    layer_norm_eps: float = 1e-5
    # Side of the square patch block merged into one LLM token by the projector (pixel shuffle).
    merge_size: int = 2


@dataclass
class DecoderArgs:
    """DeepSeek-V3 / Moonlight-style decoder: MLA attention, first layers dense, the rest MoE."""

    vocab_size: int = 163840
    hidden_size: int = 2048
    num_layers: int = 27
    num_dense_layers: int = 1
    dense_ffn_size: int = 11264
    num_heads: int = 16
    # Multi-head latent attention (no query LoRA in Moonlight).
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # Mixture of experts.
    num_routed_experts: int = 64
    num_shared_experts: int = 2
    num_experts_per_token: int = 6
    moe_ffn_size: int = 1408
    routed_scaling_factor: float = 2.446
    norm_topk_prob: bool = True
    # Aux-loss-free balancing: per-expert selection bias nudged by this rate towards uniform load after each step.
    bias_update_rate: float = 1e-3
    # Optional sequence-level auxiliary balance loss (0 disables it).
    aux_loss_coef: float = 0.0
    rope_theta: float = 50000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class CocaArgs:
    """CoCa towers used only by the ``vit_coca`` stage (SigLIP loss + caption loss)."""

    embed_dim: int = 1152
    text_hidden_size: int = 1152
    text_num_layers: int = 12
    text_num_heads: int = 16
    text_max_len: int = 64
    caption_num_layers: int = 2
    caption_num_heads: int = 16
    # SigLIP's initialisation: temperature exp(log 10), bias -10.
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0


@dataclass
class ModelArgs:
    """The whole vision-language model."""

    flavor: str = "kimi_vl_a3b"
    vision: VisionArgs = field(default_factory=VisionArgs)
    decoder: DecoderArgs = field(default_factory=DecoderArgs)
    coca: CocaArgs = field(default_factory=CocaArgs)
