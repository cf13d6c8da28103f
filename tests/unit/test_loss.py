"""The losses of train/loss.py: the fused, chunked next-token loss equals the unfused one (loss and gradients), and
the SigLIP loss over ranks equals one process holding every rank's pairs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.forked import run_ranks
from train.loss import IGNORE_INDEX, linear_cross_entropy_sum, reference_cross_entropy_sum, siglip_loss

TOKENS, HIDDEN, VOCAB = 37, 16, 101


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, TOKENS, HIDDEN, generator=generator).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.3).requires_grad_()
    targets = torch.randint(0, VOCAB, (2, TOKENS), generator=generator)
    targets[torch.rand(2, TOKENS, generator=generator) < 0.3] = IGNORE_INDEX
    return hidden, weight, targets


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("chunk_tokens", [1, 5, 16, 2 * TOKENS, 1000])
def test_the_chunked_loss_and_its_gradients_equal_the_unfused_ones(chunk_tokens: int):
    hidden, weight, targets = inputs()
    reference = reference_cross_entropy_sum(hidden, weight, targets)
    (2.5 * reference).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens)
    (2.5 * loss).backward()
    assert abs(loss.item() - reference.item()) <= 1e-6 * abs(reference.item())
    assert relative(hidden.grad, expected[0]) <= 1e-6
    assert relative(weight.grad, expected[1]) <= 1e-6
    assert torch.all(hidden.grad.view(-1, HIDDEN)[targets.view(-1) == IGNORE_INDEX] == 0)


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, targets = inputs(1)
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, targets, 8)
    assert not loss.requires_grad
    reference = reference_cross_entropy_sum(hidden, weight, targets).item()
    assert abs(float(loss) - reference) <= 1e-6 * reference


def test_a_frozen_projection_gets_no_gradient_and_the_hidden_states_do():
    hidden, weight, targets = inputs(2)
    weight.requires_grad_(False)
    linear_cross_entropy_sum(hidden, weight, targets, 8).backward()
    assert weight.grad is None and hidden.grad is not None


def test_every_position_ignored_gives_zero():
    hidden, weight, targets = inputs(3)
    loss = linear_cross_entropy_sum(hidden, weight, torch.full_like(targets, IGNORE_INDEX), 8)
    loss.backward()
    assert float(loss) == 0.0 and float(hidden.grad.abs().sum()) == 0.0


def siglip_inputs(pairs: int = 6, dim: int = 8):
    generator = torch.Generator().manual_seed(4)
    images = torch.nn.functional.normalize(torch.randn(pairs, dim, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(pairs, dim, generator=generator), dim=-1)
    return images, texts, torch.tensor(2.3), torch.tensor(-10.0)


def siglip_rank(rank: int, world: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    images, texts, scale, bias = siglip_inputs()
    share = images.shape[0] // world
    mine = slice(rank * share, (rank + 1) * share)
    image, text = images[mine].clone().requires_grad_(), texts[mine].clone().requires_grad_()
    loss = siglip_loss(image, text, scale, bias)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total), image.grad, text.grad


def test_the_siglip_loss_over_ranks_equals_one_process_with_every_pair():
    images, texts, scale, bias = siglip_inputs()
    images.requires_grad_()
    texts.requires_grad_()
    reference = siglip_loss(images, texts, scale, bias)  # no process group: the local loss
    reference.backward()
    labels = 2 * torch.eye(6) - 1
    naive = -torch.nn.functional.logsigmoid(labels * (scale.exp() * images @ texts.t() + bias)).sum() / 6
    torch.testing.assert_close(reference, naive)
    ranks = run_ranks(siglip_rank, 2)
    for rank, (total, image_grad, text_grad) in enumerate(ranks):
        assert abs(total - reference.item()) <= 1e-6 * abs(reference.item())
        # Each text's gradient is the sum of every rank's part of it: gathered with autograd, returned to its rank.
        torch.testing.assert_close(image_grad, images.grad[rank * 3:(rank + 1) * 3])
        torch.testing.assert_close(text_grad, texts.grad[rank * 3:(rank + 1) * 3])
