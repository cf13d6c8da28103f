"""Per-source loss: the fused cross-entropy's per-source sums, and the per-position source ids of packed rows."""

from __future__ import annotations

import torch

from data.loader import StageLoader
from data.mixture import mixture_sources
from tests.unit.test_loader import make_loader
from train.loss import linear_cross_entropy_by_group, linear_cross_entropy_sum, reference_cross_entropy_sum


def test_per_group_sums_are_each_groups_cross_entropy_and_the_total_is_unchanged():
    torch.manual_seed(0)
    hidden = torch.randn(70, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (70,))
    targets[::7] = -100
    groups = torch.randint(-1, 3, (70,), dtype=torch.int16)
    total, by_group = linear_cross_entropy_by_group(hidden, weight, targets, groups, 3, chunk_tokens=16)
    assert torch.equal(total, linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=16))  # bit-identical
    for g in range(3):
        only = torch.where(groups == g, targets, torch.full_like(targets, -100))
        assert torch.allclose(by_group[g], reference_cross_entropy_sum(hidden, weight, only), rtol=1e-5)
    total.backward()  # the per-group sums carry no gradient; the total's is the usual one
    assert hidden.grad is not None and not by_group.requires_grad


def test_each_position_carries_the_source_of_its_document(demo_root, tokenizer):
    loader: StageLoader = make_loader(demo_root, tokenizer, "joint_cooldown")
    rows = []
    loader.observe(lambda kind, slot, *event: rows.append(event[0]) if kind == "row" else None)
    batch = loader.next_packed_batch(0.5)
    names = mixture_sources(loader.stage.mixture)
    assert names == loader.planner.sampler.sources() and len(names) > 1
    seen = set()
    for index, row in enumerate(rows):
        ids = batch.source_ids[index].tolist()
        covered = 0
        for (source, *_), start, stop, column, _ in row.pieces:
            assert set(ids[column:column + stop - start]) == {names.index(source)}
            covered += stop - start
            seen.add(source)
        assert ids[covered:] == [-1] * (len(ids) - covered)  # the padding document has no source
        assert torch.equal(batch.input_ids[index], torch.tensor(row.tokens))
    assert len(seen) > 1


def test_caption_and_siglip_per_group_come_from_the_same_terms_as_the_loss():
    from train.loss import caption_loss_by_group, caption_loss_sum, siglip_loss

    torch.manual_seed(0)
    logits = torch.randn(5, 7, 30, requires_grad=True)
    ids = torch.randint(0, 30, (5, 7))
    mask = torch.arange(7) < torch.tensor([7, 3, 5, 2, 6])[:, None]
    groups = torch.tensor([0, 2, 0, -1, 2], dtype=torch.int16)
    total, sums, counts = caption_loss_by_group(logits, ids, mask, groups, 3)
    reference, count = caption_loss_sum(logits, ids, mask)
    torch.testing.assert_close(total, reference)
    (grad,) = torch.autograd.grad(total, logits)
    torch.testing.assert_close(grad, torch.autograd.grad(reference, logits)[0])
    for g in range(3):
        rows = groups == g
        want = caption_loss_sum(logits[rows], ids[rows], mask[rows]) if rows.any() else (torch.tensor(0.0), 0)
        torch.testing.assert_close(sums[g], want[0].detach())
        assert counts[g] == float(want[1])
    images, texts = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    scale, bias = torch.tensor(2.0), torch.tensor(-1.0)
    loss, by_group = siglip_loss(images, texts, scale, bias, image_groups=groups, num_groups=3)
    torch.testing.assert_close(loss, siglip_loss(images, texts, scale, bias))
    assert by_group[1] == 0 and by_group.sum() < loss * 5  # the ungrouped image's terms are left out
    logits_matrix = scale.exp() * images @ texts.t() + bias
    terms = -torch.nn.functional.logsigmoid((2 * torch.eye(5) - 1) * logits_matrix).sum(1)
    torch.testing.assert_close(by_group, torch.stack([terms[groups == g].sum() for g in range(3)]))
