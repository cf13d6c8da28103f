"""Named model sizes (flavors): the presets ``model.flavor`` picks."""

from __future__ import annotations

from config.model import CocaArgs, DecoderArgs, ModelArgs, VisionArgs

__all__ = ["FLAVORS"]

FLAVORS: dict[str, ModelArgs] = {
    # The released Kimi-VL-A3B sizes: ~0.4B MoonViT, 16B-total / ~3B-activated decoder.
    "kimi_vl_a3b": ModelArgs(flavor="kimi_vl_a3b"),
    # CPU benchmarks: every mechanism at a size where a step takes seconds.
    "small": ModelArgs(
        flavor="small",
        vision=VisionArgs(hidden_size=256, num_layers=4, num_heads=4, mlp_hidden_size=1024, pos_table_size=32),
        decoder=DecoderArgs(
            vocab_size=32768, hidden_size=512, num_layers=6, num_dense_layers=1, dense_ffn_size=1536, num_heads=8,
            kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, num_routed_experts=16,
            num_shared_experts=2, num_experts_per_token=4, moe_ffn_size=256),
        coca=CocaArgs(embed_dim=256, text_hidden_size=256, text_num_layers=4, text_num_heads=4, text_max_len=64,
                      caption_num_layers=2, caption_num_heads=4),
    ),
    # Tiny: runs a whole curriculum on CPU in minutes. Vision head dim 16 (divisible by 4 for 2D RoPE).
    "debug": ModelArgs(
        flavor="debug",
        vision=VisionArgs(patch_size=14, hidden_size=64, num_layers=2, num_heads=4, mlp_hidden_size=128,
                          pos_table_size=16),
        decoder=DecoderArgs(
            vocab_size=4096, hidden_size=64, num_layers=3, num_dense_layers=1, dense_ffn_size=128, num_heads=4,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_routed_experts=8,
            num_shared_experts=1, num_experts_per_token=2, moe_ffn_size=32),
        coca=CocaArgs(embed_dim=64, text_hidden_size=64, text_num_layers=2, text_num_heads=4, text_max_len=64,
                      caption_num_layers=1, caption_num_heads=4),
    ),
}
