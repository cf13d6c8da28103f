"""The stage loader: packed batch invariants, determinism, resume, mixture ramp, corrupt samples."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from config import DataConfig, MixtureConfig, StageConfig, load_config
from data.loader import DataError, StageLoader
from data.mixture import DrawRandom, MixtureSampler, draw_uniforms
from model.registry import FLAVORS
from storage import LocalStorage

VISION = FLAVORS["debug"].vision
FOREGROUND = DataConfig(prefetch_samples=0)  # no read-ahead


def stage_of(name: str, **changes) -> StageConfig:
    stage = load_config(["recipe=debug"]).curriculum.stages[name]
    for key, value in changes.items():
        setattr(stage, key, value)
    return stage


def make_loader(root, tokenizer, name="joint_cooldown", rank=0, size=1, **changes) -> StageLoader:
    stage = stage_of(name, **changes)
    return StageLoader(name, stage, FOREGROUND, LocalStorage(root), tokenizer, VISION, 0, (rank, size))


def batches_equal(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


def test_packed_batch_invariants(demo_root, tokenizer):
    loader = make_loader(demo_root, tokenizer, micro_batch_size=3)
    seen_images = 0
    for _ in range(4):
        batch = loader.next_packed_batch(progress=0.5)
        rows, seq_len = batch.input_ids.shape
        assert (rows, seq_len) == (3, 512)
        cu = batch.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == rows * seq_len
        # No document crosses a row boundary.
        assert all(r * seq_len in cu for r in range(rows + 1))
        flat_ids, flat_labels = batch.input_ids.view(-1), batch.labels.view(-1)
        flat_mask, flat_pos = batch.loss_mask.view(-1), batch.position_ids.view(-1)
        for start, end in zip(cu[:-1], cu[1:]):
            assert flat_pos[start:end].tolist() == list(range(end - start))
            # Labels are the next token of the same document; the last position of a document has no loss.
            assert torch.equal(flat_labels[start : end - 1], flat_ids[start + 1 : end])
            assert not flat_mask[end - 1]
        # Placeholders are never targets, and their count matches the merged image grids.
        assert not flat_mask[(flat_labels == tokenizer.image_id)].any()
        merged = (batch.image_grid_hw // VISION.merge_size).prod(-1).sum()
        assert batch.image_token_positions.numel() == int(merged)
        assert (flat_ids[batch.image_token_positions] == tokenizer.image_id).all()
        assert batch.pixel_values.shape == (int(batch.image_grid_hw.prod(-1).sum()), 3 * 14 * 14)
        assert batch.image_grid_hw.prod(-1).max() <= 64  # the stage's pixel cap
        seen_images += batch.image_grid_hw.shape[0]
    assert seen_images > 0


def test_same_seed_same_stream_and_ranks_differ(demo_root, tokenizer):
    a, b = make_loader(demo_root, tokenizer), make_loader(demo_root, tokenizer)
    other_rank = make_loader(demo_root, tokenizer, rank=1, size=2)
    for _ in range(3):
        first = a.next_packed_batch(0.3)
        assert batches_equal(first, b.next_packed_batch(0.3))
        assert not torch.equal(first.input_ids, other_rank.next_packed_batch(0.3).input_ids)


@pytest.mark.parametrize("name", ["vit_coca", "joint_pretrain", "long_ctx_128k"])
def test_resume_gives_the_identical_stream(demo_root, tokenizer, name):
    changes = {"seq_len": 1024} if name == "long_ctx_128k" else {}
    uninterrupted = make_loader(demo_root, tokenizer, name, **changes)
    next_batch = "next_image_text_batch" if name == "vit_coca" else "next_packed_batch"
    expected, state = [], None
    for step in range(5):
        if step == 2:
            state = json.loads(json.dumps(uninterrupted.state_dict()))  # survives serialization
        expected.append(getattr(uninterrupted, next_batch)(step / 5))
    resumed = make_loader(demo_root, tokenizer, name, **changes)
    resumed.load_state_dict(state)
    for step in range(2, 5):
        assert batches_equal(getattr(resumed, next_batch)(step / 5), expected[step])


def test_image_text_batch(demo_root, tokenizer):
    batch = make_loader(demo_root, tokenizer, "vit_coca").next_image_text_batch(0.0)
    n = batch.image_grid_hw.shape[0]
    assert n == 16 and batch.text_ids.shape[0] == n
    assert (batch.text_ids[:, 0] == tokenizer.bos_id).all()
    lengths = batch.text_mask.sum(1)
    assert (batch.text_ids[torch.arange(n), lengths - 1] == tokenizer.eos_id).all()
    assert batch.text_ids.shape[1] <= 48


def test_a_batch_of_the_other_objective_is_a_named_error(demo_root, tokenizer):
    """Workers tokenize for the stage's objective (captions for CoCa, documents otherwise): asking a stage for the
    other kind of batch names the stage and its objective instead of handing out the wrong thing."""
    with pytest.raises(DataError, match="stage 'vit_coca' has the 'coca' objective.*packed rows"):
        make_loader(demo_root, tokenizer, "vit_coca").next_packed_batch(0.0)
    with pytest.raises(DataError, match="stage 'joint_pretrain' has the 'lm' objective.*image-text pairs"):
        make_loader(demo_root, tokenizer, "joint_pretrain").next_image_text_batch(0.0)


def test_mixture_ramp_and_long_share():
    mix = MixtureConfig(text_sources={"text": 1.0}, multimodal_sources={"caption": 1.0, "ocr": 1.0},
                        multimodal_share_start=0.0, multimodal_share_end=0.6)
    sampler = MixtureSampler(mix, seed=0, stage="s")
    at_start = [sampler.choose(i, 0.0) for i in range(4000)]
    at_end = [sampler.choose(i, 1.0) for i in range(4000)]
    assert set(at_start) == {"text"}
    assert abs(np.mean([s != "text" for s in at_end]) - 0.6) < 0.03
    long_mix = MixtureConfig(text_sources={"text": 1.0}, multimodal_sources={"caption": 1.0},
                             multimodal_share_start=0.5, multimodal_share_end=0.5,
                             long_sources={"long_doc": 1.0}, long_share=0.25)
    draws = [MixtureSampler(long_mix, 0, "l").choose(i, 0.5) for i in range(8000)]
    assert abs(np.mean([d == "long_doc" for d in draws]) - 0.25) < 0.02
    replay = [d for d in draws if d != "long_doc"]
    assert abs(np.mean([d == "caption" for d in replay]) - 0.5) < 0.03


def test_draw_uniforms_are_uniform_independent_and_keyed():
    pairs = np.array([draw_uniforms(0, "s", i, "mixture") for i in range(20000)])
    assert pairs.min() >= 0.0 and pairs.max() < 1.0
    # Each uniform: the deciles hold a tenth each (within 4 standard errors); the two of a draw are uncorrelated.
    for column in pairs.T:
        counts = np.bincount((column * 10).astype(int), minlength=10)
        assert np.abs(counts - 2000).max() < 4 * np.sqrt(2000 * 0.9)
    assert abs(np.corrcoef(pairs.T)[0, 1]) < 0.03
    assert draw_uniforms(0, "s", 5, "mixture") == draw_uniforms(0, "s", 5, "mixture")
    others = {draw_uniforms(1, "s", 5, "mixture"), draw_uniforms(0, "t", 5, "mixture"),
              draw_uniforms(0, "s", 6, "mixture"), draw_uniforms(0, "s", 5, "other")}
    assert len(others) == 4 and draw_uniforms(0, "s", 5, "mixture") not in others


def test_draw_random_streams_are_uniform_keyed_and_reproducible():
    # Twelve numbers per draw cross a block boundary (eight per block); over 3000 draws every position's deciles hold
    # a tenth each (within 4 standard errors) and neighbouring positions are uncorrelated.
    again = DrawRandom(0, "s", 0, "augment")
    first = [again.random() for _ in range(12)]
    streams = np.array([[rng.random() for _ in range(12)] for rng in (DrawRandom(0, "s", i, "augment")
                                                                      for i in range(3000))])
    assert streams.min() >= 0.0 and streams.max() < 1.0
    for column in streams.T:
        counts = np.bincount((column * 10).astype(int), minlength=10)
        assert np.abs(counts - 300).max() < 4 * np.sqrt(300 * 0.9)
    assert np.abs(np.corrcoef(streams.T) - np.eye(12)).max() < 0.08
    assert first == streams[0].tolist()  # the same key gives the same stream
    assert DrawRandom(0, "s", 0, "other").random() != streams[0, 0] != DrawRandom(1, "s", 0, "augment").random()
    rng = DrawRandom(0, "s", 7, "augment")
    assert {rng.integers(3, 6) for _ in range(200)} == {3, 4, 5}
    assert all(-1.0 <= rng.uniform(-1, 1) < 1.0 for _ in range(200))


def _png(size=(56, 56)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shard(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_counted_and_named(tmp_path, tokenizer, caplog):
    def caption(text):
        return json.dumps({"kind": "caption", "caption": text, "segments": [{"image": "0.png"}, {"text": text}]})

    good = {f"good-{i}": {"json": caption(f"a red square {i}").encode(), "0.png": _png()} for i in range(6)}
    bad = {
        "bad-jpeg": {"json": caption("x").encode(), "0.png": b"\x89PNG not really"},
        "bad-empty": {"json": caption("x").encode(), "0.png": b""},
        "bad-utf8": {"json": b'{"kind": "caption", "segments": [{"text": "\xff\xfe"}]}', "0.png": _png()},
        "bad-missing": {"json": json.dumps({"kind": "caption"}).encode()},
        "bad-box": {"json": json.dumps({"kind": "grounding", "segments": [{"image": "0.png"}],
                                        "objects": [{"label": "x", "box": [10, 10, 90, 90]}]}).encode(),
                    "0.png": _png()},
    }
    (tmp_path / "mixed").mkdir()
    _write_shard(tmp_path / "mixed" / "shard-000000.tar", {**good, **bad})
    manifest = {"version": 1, "tokenizer": "tokenizer.json",
                "sources": {"mixed": {"kind": "caption", "shards": ["mixed/shard-000000.tar"], "num_samples": 11}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    stage = stage_of("vit_align", micro_batch_size=1)
    stage.mixture = MixtureConfig(multimodal_sources={"mixed": 1.0}, multimodal_share_start=1.0,
                                  multimodal_share_end=1.0)
    lenient = DataConfig(prefetch_samples=0, max_corrupt_fraction=1.0)
    loader = StageLoader("s", stage, lenient, LocalStorage(tmp_path), tokenizer, VISION, 0, (0, 1))
    with caplog.at_level(logging.WARNING, logger="data.reader"):
        for _ in range(8):
            loader.next_packed_batch(0.0)
    assert loader.corrupt >= len(bad)  # one epoch of 11 samples has certainly been drawn
    logged = caplog.text
    for key in bad:
        assert key in logged
    assert "good-" not in logged
    no_corrupt = DataConfig(prefetch_samples=0, max_corrupt_fraction=0.0)
    strict = StageLoader("s", stage, no_corrupt, LocalStorage(tmp_path), tokenizer, VISION, 0, (0, 1))
    with pytest.raises(DataError, match="corrupt"):
        for _ in range(200):
            strict.next_packed_batch(0.0)


def test_unknown_source_is_a_clear_error(demo_root, tokenizer):
    stage = stage_of("joint_pretrain")
    stage.mixture.text_sources = {"wiki": 1.0}
    with pytest.raises(DataError, match="wiki"):
        StageLoader("joint_pretrain", stage, FOREGROUND, LocalStorage(demo_root), tokenizer, VISION, 0, (0, 1))


def test_the_planner_is_pure_and_its_state_is_the_counters(demo_root, tokenizer):
    """Planning does not advance a slot, the draws are the plan, and a planner given only the counters (no read
    made) plans the same draws next."""
    planner = make_loader(demo_root, tokenizer, "joint_pretrain", micro_batch_size=2).planner
    stream = planner.slots[1]
    planned = planner.plan(stream, 0.3, 24)[0]
    assert planner.plan(stream, 0.3, 24)[0] == planned and stream.draws == 0
    assert [planner.draw(stream, 0.3) for _ in range(12)] == planned[:12]
    again = make_loader(demo_root, tokenizer, "joint_pretrain", micro_batch_size=2).planner
    again.load_state_dict(json.loads(json.dumps(planner.state_dict())))
    assert again.plan(again.slots[1], 0.3, 12)[0] == planned[12:]


def test_same_global_stream_at_any_data_parallel_size_and_resharded_resume(demo_root, tokenizer, tmp_path):
    """4 slots split as dp=1 x 4 rows, dp=2 x 2 rows or dp=4 x 1 row give the same global rows; a checkpoint of
    the dp=2 loaders (torch.distributed.checkpoint, fresh loaders as templates) resumes at dp=4."""
    import torch.distributed.checkpoint as dcp

    def loaders(dp):
        return [make_loader(demo_root, tokenizer, "joint_pretrain", rank=r, size=dp, micro_batch_size=4 // dp)
                for r in range(dp)]

    def global_rows(group, progress):
        batches = [loader.next_packed_batch(progress) for loader in group]
        return torch.cat([b.input_ids for b in batches]), torch.cat([b.pixel_values for b in batches])

    one, two, four = loaders(1), loaders(2), loaders(4)
    for step in range(3):
        expected = global_rows(one, step / 6)
        for group in (two, four):
            ids, pixels = global_rows(group, step / 6)
            assert torch.equal(ids, expected[0]) and torch.equal(pixels, expected[1])
    merged = {key: value for loader in two for key, value in loader.state_dict().items()}
    dcp.save({"loader": merged}, checkpoint_id=tmp_path / "ckpt")
    resumed = loaders(4)
    for loader in resumed:
        dcp.load({"loader": loader}, checkpoint_id=tmp_path / "ckpt")
    for step in range(3, 6):
        expected = global_rows(one, step / 6)
        assert torch.equal(global_rows(resumed, step / 6)[0], expected[0])


def test_augmentation_changes_grounding_documents_and_is_reproducible(demo_root, tokenizer):
    from data.augment import AugmentConfig

    def grounding_loader(enabled):
        grounding_only = MixtureConfig(multimodal_sources={"grounding": 1.0}, multimodal_share_start=1.0,
                                       multimodal_share_end=1.0)
        return make_loader(demo_root, tokenizer, "vit_align", micro_batch_size=1, mixture=grounding_only,
                           augment=AugmentConfig(enabled=enabled))

    plain, first, second = grounding_loader(False), grounding_loader(True), grounding_loader(True)
    differ = 0
    for _ in range(4):
        a, b, c = (loader.next_packed_batch(0.0) for loader in (plain, first, second))
        assert torch.equal(b.input_ids, c.input_ids) and torch.equal(b.pixel_values, c.pixel_values)
        differ += not torch.equal(a.input_ids, b.input_ids) or a.pixel_values.shape != b.pixel_values.shape \
            or not torch.equal(a.pixel_values, b.pixel_values)
    assert differ > 0


def test_progressive_resolution_raises_the_patch_cap_over_the_stage(demo_root, tokenizer):
    loader = make_loader(demo_root, tokenizer, "vit_coca", min_image_patches=16, max_image_patches=64)
    assert [loader.image_patch_cap(p) for p in (0.0, 0.5, 1.0)] == [16, 40, 64]
    early = loader.next_image_text_batch(0.0).image_grid_hw.prod(-1)
    late = loader.next_image_text_batch(1.0).image_grid_hw.prod(-1)
    assert early.max() <= 16 and late.max() <= 64 and late.float().mean() > early.float().mean()


def test_dialogue_supervises_assistant_turns_only(demo_root, tokenizer):
    from data.samples import ShardSource, load_images, load_meta, render_document
    from tests.unit.test_synthetic import samples_of

    manifest = json.loads((demo_root / "manifest.json").read_text())
    source = ShardSource("dialogue", LocalStorage(demo_root), manifest["sources"]["dialogue"]["shards"])
    raw = source.read(0)
    meta = load_meta(raw)
    images = load_images(raw, meta, 14, 2, 64)
    doc = render_document(meta, images, tokenizer, 2, 512)
    supervised = tokenizer.decode([t for t, s in zip(doc.tokens, doc.supervised) if s])
    answers = [s["text"] for s in meta["segments"] if s.get("role") == "assistant"]
    questions = [s["text"] for s in meta["segments"] if s.get("role") == "user" and "text" in s]
    # The conversation ends with an assistant turn, so the end of the document is a target too.
    assert supervised == "".join(answer + "<|im_end|>" for answer in answers) + "<|eos|>"
    assert all(q not in supervised for q in questions)
    text = tokenizer.decode(doc.tokens)
    assert text.startswith("<|bos|><|im_start|>system\n") and "<|im_start|>assistant\n" in text
    assert doc.tokens.count(tokenizer.image_id) == (images["0.png"].grid[0] // 2) * (images["0.png"].grid[1] // 2)
    assert len(list(samples_of(demo_root, "dialogue"))) == manifest["sources"]["dialogue"]["num_samples"]


def test_documents_continue_across_rows_and_rows_are_nearly_full(demo_root, tokenizer):
    loader = make_loader(demo_root, tokenizer, "long_ctx_32k", seq_len=2048, micro_batch_size=1)
    rows = [loader.next_packed_batch(0.5) for _ in range(12)]
    filled = sum(int((b.input_ids != tokenizer.pad_id).sum()) for b in rows) / sum(b.input_ids.numel() for b in rows)
    assert filled > 0.99
    continued = 0
    for before, after in zip(rows, rows[1:]):
        # A row that ends inside a document hands the rest to the next row: its last document is cut (no eos) and
        # the next row starts mid-document (no bos), positions restarting at 0.
        last_doc_end = before.input_ids[0, -1].item()
        if last_doc_end not in (tokenizer.eos_id, tokenizer.pad_id):
            assert after.input_ids[0, 0].item() != tokenizer.bos_id
            assert after.position_ids[0, 0].item() == 0
            assert not before.loss_mask[0, -1]  # its successor is in the next row: no target
            continued += 1
    assert continued >= 3
