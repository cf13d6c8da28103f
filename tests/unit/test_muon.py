"""The single-process optimizer against external references: torch.optim.Muon and torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.moe import GroupedExperts
from model.registry import FLAVORS, build_model
from optim.build import ADAMW, MUON, route_parameters
from optim.distributed import ZeroOptimizer
from optim.muon import AdamWHParams, MuonHParams

LR, WD = 0.02, 0.1


def matrices_model() -> nn.Module:
    torch.manual_seed(0)
    # Tall, wide, square, odd shapes: Newton-Schulz transposes tall matrices.
    return nn.Sequential(nn.Linear(37, 23, bias=False), nn.Linear(23, 64, bias=False), nn.Linear(64, 64, bias=False))


def random_grads(model: nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def assert_same_trajectory(ours_model, ours, ref_model, ref, steps: int) -> None:
    """Both optimizers see the same gradients every step; the parameters must stay within 1e-6 relative."""
    for step in range(steps):
        random_grads(ours_model, step)
        random_grads(ref_model, step)
        ours.step()
        ref.step()
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        assert relative_error(a, b) <= 1e-6


def test_muon_equals_torch_muon_over_100_steps():
    ours_model, ref_model = matrices_model(), matrices_model()
    ours = ZeroOptimizer(ours_model, lr=LR, weight_decay=WD)
    ref = torch.optim.Muon(ref_model.parameters(), lr=LR, weight_decay=WD, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    assert_same_trajectory(ours_model, ours, ref_model, ref, steps=100)


def test_each_expert_is_its_own_muon_matrix():
    torch.manual_seed(0)
    experts = GroupedExperts(num_experts=3, dim=16, hidden_dim=24)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.02)
    singles = [nn.Parameter(experts.w_up[e].detach().clone()) for e in range(3)]
    ours = ZeroOptimizer(experts, lr=LR, weight_decay=WD)
    ref = torch.optim.Muon(singles, lr=LR, weight_decay=WD, adjust_lr_fn="match_rms_adamw")
    for step in range(20):
        random_grads(experts, step)
        for e, single in enumerate(singles):
            single.grad = experts.w_up.grad[e].clone()
        ours.step()
        ref.step()
    for e, single in enumerate(singles):
        assert relative_error(experts.w_up[e], single) <= 1e-6


def adamw_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16), nn.LayerNorm(16))


def test_adamw_equals_torch_adamw_over_100_steps():
    ours_model, ref_model = adamw_model(), adamw_model()
    ours = ZeroOptimizer(ours_model, lr=1e-2, weight_decay=WD, adamw=AdamWHParams(0.9, 0.95, 1e-8))
    decay = [ref_model[0].weight]
    no_decay = [ref_model[1].weight, ref_model[1].bias]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    assert_same_trajectory(ours_model, ours, ref_model, ref, steps=100)


def test_clipping_matches_clip_grad_norm():
    ours_model, ref_model = matrices_model(), matrices_model()
    ours = ZeroOptimizer(ours_model, lr=LR, weight_decay=WD, muon=MuonHParams(ns_dtype=torch.float32))
    reference = ZeroOptimizer(ref_model, lr=LR, weight_decay=WD, muon=MuonHParams(ns_dtype=torch.float32))
    random_grads(ours_model, 0)
    random_grads(ref_model, 0)
    expected_norm = float(torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), 0.5))
    norm = ours.step(max_grad_norm=0.5)
    reference.step()
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        assert relative_error(a, b) <= 1e-6


def test_routing_of_the_model_is_explicit():
    model = build_model(FLAVORS["debug"])
    routes = {r.name: r for r in route_parameters(model, trainable_only=False)}
    assert routes["decoder.embed_tokens.weight"].rule == ADAMW
    assert routes["decoder.output.weight"].rule == ADAMW
    assert routes["vision.pos_table"].rule == ADAMW
    assert routes["coca.logit_scale"].rule == ADAMW and not routes["coca.logit_scale"].weight_decay
    assert routes["decoder.layers.0.attention.q_proj.weight"].rule == MUON
    assert routes["decoder.layers.1.moe.experts.w_gate"].per_expert
    assert routes["vision.patch_embed.weight"].rule == MUON
    assert all(r.rule == ADAMW for n, r in routes.items() if len(r.shape) < 2)


def test_unroutable_parameter_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.cube = nn.Parameter(torch.zeros(2, 3, 4))

    with pytest.raises(ValueError, match="cube"):
        ZeroOptimizer(Odd(), lr=LR, weight_decay=WD)


def test_non_finite_gradient_is_named():
    model = matrices_model()
    optimizer = ZeroOptimizer(model, lr=LR, weight_decay=WD)
    random_grads(model, 0)
    model[1].weight.grad[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"1\.weight"):
        optimizer.step()


def test_state_of_another_model_is_rejected_with_the_name():
    optimizer = ZeroOptimizer(matrices_model(), lr=LR, weight_decay=WD)
    other_model = nn.Sequential(nn.Linear(37, 23, bias=False), nn.Linear(23, 65, bias=False),
                                nn.Linear(64, 64, bias=False))
    other = ZeroOptimizer(other_model, lr=LR, weight_decay=WD)
    with pytest.raises(ValueError, match=r"1\.weight"):
        optimizer.load_state_dict(other.state_dict())
    with pytest.raises(KeyError, match=r"2\.weight"):
        optimizer.load_state_dict({k: v for k, v in optimizer.state_dict().items() if not k.startswith("2.")})
