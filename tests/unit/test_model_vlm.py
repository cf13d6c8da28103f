"""The whole model: meta-device sizes of the real configuration, initialization, and forward/backward of both
objectives on tiny batches in the loader's formats."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from data.batch import ImageTextBatch, PackedBatch
from model.registry import FLAVORS, build_model, count_parameters
from model.vlm import KimiVL
from train.loss import caption_loss_sum, siglip_loss

DEBUG = FLAVORS["debug"]
PATCH_DIM = 3 * DEBUG.vision.patch_size**2


def test_kimi_vl_a3b_parameter_counts_on_meta():
    start = time.perf_counter()
    counts = count_parameters(FLAVORS["kimi_vl_a3b"])
    elapsed = time.perf_counter() - start
    print({part: {k: f"{v / 1e9:.3f}B" for k, v in c.items()} for part, c in counts.items()})
    decoder, vision = counts["decoder"], counts["vision"]
    assert abs(decoder["total"] / 16e9 - 1) < 0.05
    assert 2.8e9 <= decoder["activated"] <= 3.0e9
    assert 0.38e9 <= vision["total"] <= 0.45e9 and vision["activated"] == vision["total"]
    assert 10e6 <= counts["projector"]["total"] <= 50e6
    assert counts["vlm"]["total"] == vision["total"] + counts["projector"]["total"] + decoder["total"]
    assert elapsed < 20  # 16B parameters would take far longer (and ~64 GB) if anything were allocated
    with torch.device("meta"):
        model = KimiVL(FLAVORS["kimi_vl_a3b"])
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())


def test_build_model_is_deterministic_and_initialized():
    torch.manual_seed(3)
    first = build_model(DEBUG).state_dict()
    torch.manual_seed(3)
    second = build_model(DEBUG).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.isfinite(v).all() for v in first.values())
    assert torch.equal(first["decoder.layers.1.moe.expert_bias"], torch.zeros(8))
    assert torch.equal(first["decoder.norm.weight"], torch.ones(64))
    assert torch.equal(first["vision.blocks.0.qkv.bias"], torch.zeros(3 * 64))
    assert math.isclose(float(first["coca.logit_scale"]), math.log(10.0), rel_tol=1e-6)
    assert float(first["coca.logit_bias"]) == -10.0
    assert abs(float(first["vision.pos_table"].std()) - 0.02) < 0.002
    assert abs(float(first["decoder.output.weight"].std()) - DEBUG.decoder.init_std) < 0.002


def test_init_weights_overwrites_all_memory():
    with torch.device("meta"):
        model = KimiVL(DEBUG)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan"))
    model.init_weights()
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def _packed_batch() -> PackedBatch:
    """Two rows of 24 tokens, three documents; two images (4x6 and 2x4 patches -> 6 and 2 merged tokens)."""
    rows, seq = 2, 24
    input_ids = torch.randint(5, 4096, (rows, seq))
    lengths = [14, 10, 24]
    position_ids = torch.cat([torch.arange(n) for n in lengths]).view(rows, seq)
    cu_seqlens = torch.tensor([0, 14, 24, 48], dtype=torch.int32)
    grid = torch.tensor([[4, 6], [2, 4]])
    # Image 0 inside document 0 (row 0), image 1 inside document 2 (row 1).
    positions = torch.tensor([3, 4, 5, 6, 7, 8, 24 + 10, 24 + 11])
    input_ids.view(-1)[positions] = 1  # the <|image|> placeholder id
    labels = torch.roll(input_ids, -1, dims=1)
    return PackedBatch(input_ids=input_ids, labels=labels, loss_mask=torch.ones(rows, seq, dtype=torch.bool),
                       position_ids=position_ids, cu_seqlens=cu_seqlens, pixel_values=torch.randn(32, PATCH_DIM),
                       image_grid_hw=grid, image_token_positions=positions)


def _forward(model: KimiVL, b: PackedBatch) -> tuple[torch.Tensor, object]:
    return model(b.input_ids, b.position_ids, b.cu_seqlens, b.pixel_values, b.image_grid_hw, b.image_token_positions)


def test_kimi_vl_forward_backward_with_images():
    torch.manual_seed(0)
    model = build_model(DEBUG)
    batch = _packed_batch()
    logits, aux = _forward(model, batch)
    assert logits.shape == (2, 24, 4096) and aux.expert_load.shape == (2, 8)
    loss = F.cross_entropy(logits.view(-1, 4096), batch.labels.view(-1))
    loss.backward()
    for name in ("vision.patch_embed.weight", "vision.pos_table", "vision.blocks.1.fc2.weight",
                 "projector.linear_1.weight", "decoder.embed_tokens.weight", "decoder.layers.2.moe.experts.w_up",
                 "decoder.layers.0.attention.kv_b_proj.weight", "decoder.output.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name

    # The images land at their placeholders: changing image 1's pixels (document 2, from row 1 column 10 on)
    # changes nothing before its first placeholder, nor in the other documents (causal, per document).
    with torch.no_grad():
        other = PackedBatch(**{**batch.__dict__, "pixel_values": batch.pixel_values.clone()})
        other.pixel_values[24:] += 1.0
        changed = (_forward(model, other)[0] - logits).abs().amax(-1) > 1e-6
    assert not changed[0].any() and not changed[1, :10].any() and changed[1, 10:].all()


def test_kimi_vl_rejects_mismatched_placeholders():
    torch.manual_seed(0)
    model = build_model(DEBUG)
    batch = _packed_batch()
    with pytest.raises(ValueError, match="image_token_positions has 7 placeholders"):
        model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.pixel_values, batch.image_grid_hw,
              batch.image_token_positions[:7])


def test_kimi_vl_text_only_batch():
    torch.manual_seed(0)
    model = build_model(DEBUG)
    b = _packed_batch()
    logits, _ = model(b.input_ids, b.position_ids, b.cu_seqlens, torch.zeros(0, PATCH_DIM),
                      torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    torch.testing.assert_close(logits, model(b.input_ids, b.position_ids, b.cu_seqlens)[0])


def _image_text_batch() -> ImageTextBatch:
    grid = torch.tensor([[4, 6], [2, 4], [6, 2]])
    text_ids = torch.randint(5, 4096, (3, 7))
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)
    text_ids[~text_mask] = 0
    return ImageTextBatch(pixel_values=torch.randn(24 + 8 + 12, PATCH_DIM), image_grid_hw=grid, text_ids=text_ids,
                          text_mask=text_mask)


def test_coca_forward_losses_and_backward():
    torch.manual_seed(0)
    model = build_model(DEBUG)
    b = _image_text_batch()
    out = model.forward_coca(b.pixel_values, b.image_grid_hw, b.text_ids, b.text_mask)
    assert out.image_embeds.shape == out.text_embeds.shape == (3, 64)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    assert out.caption_logits.shape == (3, 7, 4096)

    siglip = siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
    scale, bias = math.exp(float(out.logit_scale.detach())), float(out.logit_bias.detach())
    images, texts = out.image_embeds.detach(), out.text_embeds.detach()
    naive = 0.0
    for i in range(3):
        for j in range(3):
            logit = scale * float(images[i] @ texts[j]) + bias
            naive -= F.logsigmoid(torch.tensor((1.0 if i == j else -1.0) * logit))
    torch.testing.assert_close(siglip, naive / 3)

    caption_sum, count = caption_loss_sum(out.caption_logits, b.text_ids, b.text_mask)
    assert int(count) == b.num_loss_tokens == 6 + 3 + 1
    naive_caption = sum(F.cross_entropy(out.caption_logits[i, t], b.text_ids[i, t + 1], reduction="sum")
                        for i in range(3) for t in range(6) if b.text_mask[i, t + 1])
    torch.testing.assert_close(caption_sum, naive_caption)

    (siglip + 2 * caption_sum / count).backward()
    for name in ("vision.blocks.0.qkv.weight", "coca.pool_query", "coca.text_blocks.1.fc1.weight",
                 "coca.caption_blocks.0.cross_attn.kv_proj.weight", "coca.logit_scale", "coca.logit_bias"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.decoder.output.weight.grad is None


def test_coca_packed_images_equal_each_alone():
    torch.manual_seed(0)
    model = build_model(DEBUG)
    b = _image_text_batch()
    with torch.no_grad():
        packed = model.forward_coca(b.pixel_values, b.image_grid_hw, b.text_ids, b.text_mask)
        offsets = [0, 24, 32, 44]
        for i in range(3):
            alone = model.forward_coca(b.pixel_values[offsets[i] : offsets[i + 1]], b.image_grid_hw[i : i + 1],
                                       b.text_ids[i : i + 1], b.text_mask[i : i + 1])
            torch.testing.assert_close(alone.image_embeds[0], packed.image_embeds[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.text_embeds[0], packed.text_embeds[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.caption_logits[0], packed.caption_logits[i], atol=1e-5, rtol=0)
