"""Named model sizes (flavors), model construction, and parameter counts."""

from __future__ import annotations

import torch
from torch import nn

from model.args import CocaArgs, DecoderArgs, ModelArgs, VisionArgs
from model.init import ParamInit
from model.moe import GroupedExperts
from model.vlm import KimiVL

__all__ = ["FLAVORS", "build_model", "count_parameters"]

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


def build_model(args: ModelArgs, device: torch.device | str = "cpu", seed: int | None = None) -> KimiVL:
    """The whole model on one device: built on ``meta``, materialized on ``device``, initialized.

    The single-process case of ``parallel.parallelize``: with the same ``seed`` every parameter gets the values a
    rank of any parallel layout gives it (model/init.py).

    Args:
        args: Model hyper-parameters (e.g. ``FLAVORS["debug"]``).
        device: Where the parameters live.
        seed: The run's seed; None draws one from torch's global generator (``torch.manual_seed`` first).

    Returns:
        The initialized model (fp32).
    """
    with torch.device("meta"):
        model = KimiVL(args)
    model.to_empty(device=device)
    model.init_weights(ParamInit(seed) if seed is not None else None)
    return model


def _routed_expert_numel(module: nn.Module) -> int:
    return sum(p.numel() for sub in module.modules() if isinstance(sub, GroupedExperts) for p in sub.parameters())


def count_parameters(args: ModelArgs) -> dict[str, dict[str, int]]:
    """Total and per-token activated parameter counts, computed on ``meta`` (no memory allocated).

    A token activates every parameter except the routed experts it is not sent to: ``k / E`` of the routed experts'
    parameters count as activated. Both embedding tables (input and untied output) count, as in the reports.

    Args:
        args: Model hyper-parameters.

    Returns:
        ``{part: {"total": n, "activated": n}}`` for ``vision``, ``projector``, ``decoder``, ``coca`` (the towers
        of the first stage only) and ``vlm`` (vision + projector + decoder, the deployed model).
    """
    with torch.device("meta"):
        model = KimiVL(args)
    inactive_share = 1.0 - args.decoder.num_experts_per_token / args.decoder.num_routed_experts
    counts = {}
    for name in ("vision", "projector", "decoder", "coca"):
        part = getattr(model, name)
        total = sum(p.numel() for p in part.parameters())
        activated = total - round(_routed_expert_numel(part) * inactive_share)
        counts[name] = {"total": total, "activated": activated}
    counts["vlm"] = {key: sum(counts[name][key] for name in ("vision", "projector", "decoder"))
                     for key in ("total", "activated")}
    return counts
