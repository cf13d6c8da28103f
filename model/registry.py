"""Model construction and parameter counts (the flavors themselves are configuration: config/flavors.py)."""

from __future__ import annotations

import torch
from torch import nn

from config.flavors import FLAVORS
from config.model import ModelArgs
from model.init import ParamInit
from model.moe import GroupedExperts
from model.vlm import KimiVL

__all__ = ["FLAVORS", "build_model", "count_parameters"]



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
