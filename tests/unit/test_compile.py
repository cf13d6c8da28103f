"""Compiled blocks (parallel/compile.py) compute what eager blocks compute, under every checkpointing policy.

One compiled copy of the ``debug`` model serves every test of the module (Inductor compiles on the CPU: tens of
seconds cold, a few seconds from its on-disk cache): forward and backward of a packed batch with images, and of the
CoCa objective, against an eager copy with the same weights (fp32, 1e-5). Each comparison also proves the compiled
graphs ran (a silently skipped compile would pass an equality test), and that this proof fails when they do not.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.profiler import profile

from data.batch import PackedBatch
from model.coca import TextBlock
from model.decoder import DecoderLayer
from model.registry import FLAVORS, build_model
from model.vision import VisionBlock
from parallel.activation_checkpoint import ActivationCheckpointing
from parallel.compile import apply_compile, compiled_block_names
from tests.unit.test_model_vlm import PATCH_DIM, _image_text_batch, _packed_batch
from train.loss import caption_loss_sum, siglip_loss

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models():
    """``(eager, compiled, checkpointing of the compiled one)``, same weights."""
    torch.manual_seed(0)
    eager = build_model(FLAVORS["debug"])
    compiled = copy.deepcopy(eager)
    checkpointing = ActivationCheckpointing(compiled)  # hooks installed before the compile, as parallelize does
    assert apply_compile(compiled) == sum(isinstance(m, (DecoderLayer, VisionBlock, TextBlock))
                                          for m in compiled.modules())
    return eager, compiled, checkpointing


def lm_step(model, batch: PackedBatch | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hidden states and gradients of a packed batch with images (by default the same two-image batch every call)."""
    if batch is None:
        torch.manual_seed(1)
        batch = _packed_batch()
    model.zero_grad(set_to_none=True)
    hidden, aux = model.hidden_states(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.pixel_values,
                                      batch.image_grid_hw, batch.image_token_positions)
    (model.decoder.logits(hidden).logsumexp(-1).mean() + aux.expert_load.sum() * 0).backward()
    return hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def packed_batch(rows: int, seq: int, grids: list[tuple[int, int]], seed: int) -> PackedBatch:
    """``rows x seq`` tokens, two documents per row; image ``i`` (patch grid ``grids[i]``, 2x2 merge) sits at the
    start of row ``i``'s first document."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [seq // 2, seq - seq // 2] * rows
    input_ids = torch.randint(5, 4096, (rows, seq), generator=gen)
    positions = torch.cat([i * seq + 1 + torch.arange(h * w // 4) for i, (h, w) in enumerate(grids)])
    input_ids.view(-1)[positions] = 1  # the <|image|> placeholder id
    patches = sum(h * w for h, w in grids)
    return PackedBatch(input_ids=input_ids, labels=torch.roll(input_ids, -1, dims=1),
                       loss_mask=torch.ones(rows, seq, dtype=torch.bool),
                       position_ids=torch.cat([torch.arange(n) for n in lengths]).view(rows, seq),
                       cu_seqlens=torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),
                       pixel_values=torch.randn(patches, PATCH_DIM, generator=gen),
                       image_grid_hw=torch.tensor(grids), image_token_positions=positions)


def coca_step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ``vit_coca`` loss and gradients on three images of different grids with captions of different lengths."""
    torch.manual_seed(2)
    b = _image_text_batch()
    model.zero_grad(set_to_none=True)
    out = model.forward_coca(b.pixel_values, b.image_grid_hw, b.text_ids, b.text_mask)
    caption_sum, count = caption_loss_sum(out.caption_logits, b.text_ids, b.text_mask)
    loss = siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias) + 2 * caption_sum / count
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def compiled_region_calls(fn) -> int:
    """Compiled graphs entered while ``fn`` runs (the profiler's record of each call into Dynamo's code)."""
    with profile() as prof:
        fn()
    return sum(event.name.startswith("Torch-Compiled Region") for event in prof.events())


def matmul_calls(fn) -> int:
    """Matrix products run while ``fn`` runs: the blocks' projections, all inside compiled graphs."""
    with profile() as prof:
        fn()
    return sum(event.name in ("aten::mm", "aten::addmm") for event in prof.events())


def assert_same(got: tuple, want: tuple) -> None:
    (out, grads), (out_ref, grads_ref) = got, want
    assert float((out - out_ref).abs().max()) <= TOLERANCE * max(1.0, float(out_ref.abs().max()))
    assert set(grads) == set(grads_ref)
    for name, grad in grads.items():
        error = float((grad - grads_ref[name]).norm() / grads_ref[name].norm().clamp_min(1e-12))
        assert error <= TOLERANCE, f"gradient of {name} differs by {error:.2e} (relative)"


def test_every_block_is_compiled_and_names_do_not_change(models):
    eager, compiled, _ = models
    blocks = [n for n, m in compiled.named_modules() if isinstance(m, (DecoderLayer, VisionBlock, TextBlock))]
    assert compiled_block_names(compiled) == blocks and compiled_block_names(eager) == []
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_compiled_equals_eager_as_the_policy_changes_between_stages(models):
    """The policy changes without a recompile (the checkpoint hooks run eagerly around the compiled forward); each
    policy's step equals the eager model's."""
    eager, compiled, checkpointing = models
    want = lm_step(eager)
    graphs, matmuls = None, {}
    for policy in ("none", "selective", "full", "none", "selective"):
        checkpointing.set_policy(policy)
        got = lm_step(compiled)
        assert_same(got, want)
        if graphs is None:  # the first step compiled; later policies reuse its graphs
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, policy
        # Every block ran compiled code: at least one graph per vision block (forward and, recomputed or not, its
        # backward runs in Inductor's code) and per decoder layer.
        assert compiled_region_calls(lambda: lm_step(compiled)) >= 2 + 3, policy
        matmuls[policy] = matmul_calls(lambda: lm_step(compiled))
    # selective keeps what the compiled graphs saved (their matmuls are not run again); full recomputes them
    assert matmuls["selective"] == matmuls["none"] < matmuls["full"], matmuls
    checkpointing.set_policy("none")


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_new_shapes_compiled_during_a_checkpointed_step(models, policy):
    """Batches of new shapes compile new graphs in the middle of a checkpointed forward (the first decoder layer
    first, then the others); the backward's recompute of every block must run the graphs its forward ran, or the
    checkpoint would mismatch (selective: an unknown compiled region; full: other saved tensors)."""
    eager, compiled, checkpointing = models
    checkpointing.set_policy(policy)
    rows = {"selective": 1, "full": 3}[policy]  # a new row count per policy: new graphs under each
    for seq, grids, seed in ((48, [(4, 6)], 3), (64, [(2, 4), (4, 4), (6, 6)][:rows], 4)):
        batch = packed_batch(rows, seq, grids, seed)
        assert_same(lm_step(compiled, batch), lm_step(eager, batch))
    checkpointing.set_policy("none")


def test_the_compiled_check_fails_when_compilation_is_skipped(models):
    """The proof above is not vacuous: the same model run with Dynamo skipping every frame (what a silent fallback
    to eager would do) enters no compiled graph, and a skipped compile counts nothing."""
    _, compiled, _ = models
    with torch.compiler.set_stance("force_eager"):
        assert compiled_region_calls(lambda: lm_step(compiled)) == 0


def test_compiled_coca_towers_equal_eager(models):
    eager, compiled, _ = models
    want = coca_step(eager)
    assert_same(coca_step(compiled), want)
    assert compiled_region_calls(lambda: coca_step(compiled)) >= 2 + 3  # vision blocks, text and caption blocks
