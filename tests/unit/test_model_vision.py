"""MoonViT packing invariance and the projector's pixel-shuffle order."""

from __future__ import annotations

import pytest
import torch

from config.model import VisionArgs
from model.projector import PatchMergerProjector, merge_patches
from model.vision import MoonViT

ARGS = VisionArgs(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_hidden_size=64, pos_table_size=6)


def _build_vit(args: VisionArgs = ARGS) -> MoonViT:
    torch.manual_seed(0)
    with torch.device("meta"):
        vit = MoonViT(args)
    vit.to_empty(device="cpu")
    vit.init_weights()
    return vit


def test_moonvit_packed_equals_each_image_alone():
    vit = _build_vit()
    grids = torch.tensor([[6, 6], [2, 8], [5, 3]])  # the table size, a wide and an odd grid
    pixels = [torch.randn(h * w, 3 * 4 * 4) for h, w in grids.tolist()]
    packed = vit(torch.cat(pixels), grids)
    assert packed.shape == (36 + 16 + 15, 32)
    alone = torch.cat([vit(p, grids[i : i + 1]) for i, p in enumerate(pixels)])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_moonvit_rope_changes_output_and_gradients_flow():
    vit = _build_vit()
    no_rope = _build_vit(VisionArgs(**{**ARGS.__dict__, "use_rope": False}))
    grids = torch.tensor([[4, 4]])
    pixels = torch.randn(16, 48)
    out = vit(pixels, grids)
    assert not torch.allclose(out, no_rope(pixels, grids), atol=1e-4)
    out.square().sum().backward()
    assert vit.pos_table.grad.abs().sum() > 0 and vit.patch_embed.weight.grad.abs().sum() > 0


def test_uint8_patches_are_normalized_and_embedded_like_a_conv_over_the_image():
    # The loader's raw RGB bytes, (y, x, channel) per patch, against SigLIP's normalization and a Conv2d over the
    # (channel, y, x) image: the tower sees the same embeddings.
    vit = _build_vit()
    image = torch.randint(0, 256, (8, 12, 3), dtype=torch.uint8)  # a 2 x 3 grid of 4 x 4 patches
    patches = image.view(2, 4, 3, 4, 3).permute(0, 2, 1, 3, 4).reshape(6, 48)
    normalized = (image.permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        expected = vit.patch_embed(normalized[None])[0].flatten(1).t()  # [6, hidden], row-major over the grid
        torch.testing.assert_close(vit.embed_patches(patches), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vit(patches, torch.tensor([[2, 3]])),
                                   vit(patches.float() / 127.5 - 1.0, torch.tensor([[2, 3]])), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"expected \[patches, 48\]"):
        vit.embed_patches(patches[:, :47])


def test_moonvit_rejects_wrong_patch_count():
    vit = _build_vit()
    with pytest.raises(ValueError, match="patches"):
        vit(torch.randn(10, 48), torch.tensor([[3, 3]]))


def test_projector_merge_order():
    m = 2
    grids = torch.tensor([[4, 6], [2, 2]])
    # Feature channels encode (image, row, col) of their patch.
    rows = []
    for image, (h, w) in enumerate(grids.tolist()):
        for r in range(h):
            for c in range(w):
                rows.append([image, r, c])
    features = torch.tensor(rows, dtype=torch.float32)
    merged = merge_patches(features, grids, m)
    assert merged.shape == (6 + 1, 4 * 3)
    expected = []
    for image, (h, w) in enumerate(grids.tolist()):
        for br in range(h // m):  # blocks row-major over the merged grid
            for bc in range(w // m):
                expected.append([v for dr in range(m) for dc in range(m) for v in (image, br * m + dr, bc * m + dc)])
    torch.testing.assert_close(merged, torch.tensor(expected, dtype=torch.float32), atol=0, rtol=0)


def test_projector_forward_shape_and_bad_grid():
    torch.manual_seed(0)
    projector = PatchMergerProjector(8, 2, 24, 1e-6)
    projector.init_weights()
    out = projector(torch.randn(4 * 6 + 4, 8), torch.tensor([[4, 6], [2, 2]]))
    assert out.shape == (7, 24)
    with pytest.raises(ValueError, match="not divisible by the merge size 2"):
        projector(torch.randn(3 * 4, 8), torch.tensor([[3, 4]]))
