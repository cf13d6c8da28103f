"""Evaluation (train/eval*.py): the metrics' machinery on hand-built models whose answers are known, then the CLI on
checkpoints of a short real run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from data.samples import render_document
from model.registry import FLAVORS, build_model
from storage import LocalStorage
from train.__main__ import main as train_main
from train.eval import heldout_loss, main, retrieval_recall
from train.eval_data import HeldOutData, batch_loss_sum, document_batch
from train.eval_niah import NeedleBench, length_buckets

VISION = FLAVORS["debug"].vision


class WindowedInduction(nn.Module):
    """A hand-built "model" that retrieves by copying: at each position it predicts the token that followed the
    most recent earlier occurrence of its last ``m`` tokens, if that occurrence is at most ``window`` tokens back
    (no prediction, i.e. uniform logits, otherwise). With an unbounded window it finds every needle the prompt
    really contains; with a bounded one exactly those within reach."""

    def __init__(self, vocab: int, window: int, m: int = 6):
        super().__init__()
        self.vocab, self.window, self.m = vocab, window, m

    def forward(self, input_ids, position_ids, cu_seqlens, *images):
        ids = input_ids[0].tolist()
        logits = torch.zeros(1, len(ids), self.vocab)
        last: dict[tuple[int, ...], int] = {}
        for t in range(self.m - 1, len(ids)):
            key = tuple(ids[t - self.m + 1: t + 1])
            j = last.get(key)
            if j is not None and t - j <= self.window:
                logits[0, t, ids[j + 1]] = 10.0
            last[key] = t
        return logits, None


@pytest.fixture(scope="module")
def bench(demo_root, tokenizer):
    # 16-patch frames (4 image tokens): even the shortest bucket of a 512-token context holds a few.
    return NeedleBench(HeldOutData(LocalStorage(demo_root), VISION, 64), tokenizer, VISION, seed=3, frame_patches=16)


def test_length_buckets_follow_the_report_up_to_the_context():
    assert length_buckets(131072) == [(0, 2048), (2048, 4096), (4096, 8192), (8192, 16384), (16384, 32768),
                                      (32768, 65536), (65536, 131072)]
    assert length_buckets(8192) == [(0, 2048), (2048, 4096), (4096, 8192)]
    assert length_buckets(512) == [(0, 128), (128, 256), (256, 512)]


@pytest.mark.parametrize("haystack", ["text", "image_caption"])
def test_recall_is_exactly_what_a_windowed_retriever_can_reach(bench, tokenizer, haystack):
    """A retriever that sees ``window`` tokens back hits exactly the trials whose needle lies within its window: the
    needle really is in the prompt, at the recorded place, and the question's answer is scored where it should
    be. The unbounded retriever finds every needle (recall 1 in every bucket); the bounded one makes both hits
    and misses, so neither outcome is built in."""
    buckets = length_buckets(512)
    full = bench.run(WindowedInduction(tokenizer.vocab_size, 10**9), haystack, buckets, 5)
    assert full["chance"] == pytest.approx(0.1)
    assert all(recall == 1.0 for recall in full["buckets"].values()), full["buckets"]
    window = 150
    bounded = bench.run(WindowedInduction(tokenizer.vocab_size, window), haystack, buckets, 5)
    reach = [t["length"] - 1 - (t["value_index"] - 1) <= window for t in bounded["trials"]]
    assert [t["hit"] for t in bounded["trials"]] == reach
    assert 0 < sum(reach) < len(reach)
    for trial in bounded["trials"]:  # lengths inside their bucket, up to the context
        low, high = (int(x) for x in trial["bucket"].strip("(]").split(","))
        assert low < trial["length"] <= high


def test_generate_mode_decodes_the_needle_greedily(bench, tokenizer):
    result = bench.run(WindowedInduction(tokenizer.vocab_size, 10**9), "text", [(256, 512)], 3, mode="generate")
    assert result["recall"] == 1.0
    assert [t["generated"].strip() for t in result["trials"]] == [t["value"] for t in result["trials"]]
    blind = bench.run(WindowedInduction(tokenizer.vocab_size, 0), "text", [(256, 512)], 3, mode="generate")
    assert blind["recall"] == 0.0


def test_needles_sit_at_their_depths_in_text_and_frame_haystacks(bench, tokenizer):
    rng = random.Random(0)
    depths = []
    for depth in (0.0, 0.5, 1.0):
        doc, trial, candidates = bench.build("text", 400, depth, rng)
        assert len(doc.tokens) == trial.length == 400
        assert doc.tokens[trial.value_index] == candidates[0][0]  # the needle's value, where the record says
        assert tokenizer.decode(candidates[0]).strip() == trial.value
        depths.append(trial.depth)
    assert depths[0] == 0 and abs(depths[1] - 0.5) < 0.2 and depths[2] > 0.9
    doc, trial, _ = bench.build("image_frame", 480, 0.5, rng)
    needle = bench._needle_frame(0, trial.value)  # same size as any needle frame
    spans = [i for i, (start, _) in enumerate(doc.spans) if start > trial.needle_index]
    first = doc.images[spans[0]]
    assert first.grid == needle.grid and 0.3 < trial.depth < 0.7
    assert len(doc.images) >= 3 and trial.value not in tokenizer.decode(doc.tokens)  # only the pixels tell
    batch = document_batch(doc, tokenizer, VISION)  # the prompt is a valid model input
    assert batch.image_token_positions.numel() == sum((h // 2) * (w // 2) for h, w in batch.image_grid_hw.tolist())


def test_retrieval_recall_counts_ranks_and_identical_captions():
    n = 4
    assert all(v == 1.0 for v in retrieval_recall(torch.eye(n), list("abcd"), (1,)).values())
    shifted = torch.eye(n).roll(1, dims=1) + 0.5 * torch.eye(n)  # each image prefers the next text; its own 2nd
    got = retrieval_recall(shifted, list("abcd"), (1, 2))
    assert got["image_to_text_r@1"] == 0.0 and got["image_to_text_r@2"] == 1.0
    assert got["text_to_image_r@1"] == 0.0 and got["text_to_image_r@2"] == 1.0
    # Images 0 and 1 share a caption: retrieving the other one of them is right.
    swapped = torch.eye(n)[[1, 0, 2, 3]]
    assert retrieval_recall(swapped, ["x", "x", "y", "z"], (1,))["image_to_text_r@1"] == 1.0
    assert retrieval_recall(swapped, list("wxyz"), (1,))["image_to_text_r@1"] == 0.5


def test_heldout_loss_is_the_token_mean_of_each_document_alone(demo_root, tokenizer):
    """Packing several documents per row changes nothing (document masks) and the mean is over supervised tokens."""
    torch.manual_seed(0)
    model = build_model(FLAVORS["debug"]).eval()
    data = HeldOutData(LocalStorage(demo_root), VISION, 64)
    packed = heldout_loss(model, data, tokenizer, 512, 4, ["caption", "text"])
    for source in ("caption", "text"):
        ce, count = 0.0, 0
        with torch.no_grad():
            for sample in data.samples(source, 4):
                doc = render_document(sample.meta, sample.images, tokenizer, VISION.merge_size, 512)
                doc_ce, doc_count = batch_loss_sum(model, document_batch(doc, tokenizer, VISION))
                ce, count = ce + doc_ce, count + doc_count
        assert packed[source]["tokens"] == count and packed[source]["samples"] == 4
        assert packed[source]["loss"] == pytest.approx(ce / count, rel=1e-5)
        assert abs(packed[source]["loss"] - math.log(4096)) < 0.5  # an untrained model is near uniform


@pytest.fixture(scope="module")
def short_run(demo_root, tmp_path_factory):
    """Two steps each of vit_coca, vit_align and joint_pretrain through the real entry point, and a separately
    generated (different seed) evaluation root."""
    from data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("eval_run")
    stages = ["vit_coca", "vit_align", "joint_pretrain"]
    args = ["recipe=debug", f"output_dir={out}", "run_name=run", f"data.root={demo_root}", "log.progress_bar=false",
            f"curriculum.order=[{','.join(stages)}]", "log.peak_tflops=1"]
    for name in stages:
        args += [f"curriculum.stages.{name}.steps=2", f"curriculum.stages.{name}.checkpoint_interval=0",
                 f"curriculum.stages.{name}.lr.warmup_steps=1"]
    assert train_main(args) == 0
    held = out / "heldout"
    generate_corpus(held, seed=1, scale=0.05)
    return out / "run", held


def test_cli_on_a_joint_pretrain_checkpoint(short_run, tmp_path, tokenizer):
    run_dir, held = short_run
    report_path = tmp_path / "report.json"
    assert main([str(run_dir / "joint_pretrain"), "--eval-root", str(held), "--niah-trials", "2",
                 "--niah-haystacks", "text,image_frame", "--samples-per-source", "3", "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["checkpoint"].endswith("joint_pretrain/checkpoints/step-00000002")
    assert report["stage"] == "joint_pretrain" and report["context"] == 512 and not report["eval_root_is_training_root"]
    losses = report["tasks"]["heldout_loss"]
    manifest = json.loads((held / "manifest.json").read_text())
    assert set(losses) == set(manifest["sources"]) | {"all"}
    assert all(math.isfinite(v["loss"]) and v["tokens"] > 0 for v in losses.values())
    niah = report["tasks"]["niah"]
    assert niah["buckets"] == ["(0, 128]", "(128, 256]", "(256, 512]"]
    for kind in ("text", "image_frame"):
        assert niah[kind]["chance"] == pytest.approx(0.1) and 0 <= niah[kind]["recall"] <= 1
        assert all(len(t["scores"]) == 10 and all(math.isfinite(s) for s in t["scores"]) for t in niah[kind]["trials"])
    # The checkpoint's weights were evaluated, not the seeded initialization (2 steps moved the loss).
    torch.manual_seed(0)
    init = heldout_loss(build_model(FLAVORS["debug"]).eval(), HeldOutData(LocalStorage(held), VISION, 64, False),
                        tokenizer, 512, 3)
    assert abs(init["all"]["loss"] - losses["all"]["loss"]) > 1e-3


def test_cli_retrieval_on_a_vit_coca_checkpoint(short_run, tmp_path, capsys):
    run_dir, held = short_run
    report_path = tmp_path / "coca.json"
    assert main([str(run_dir / "vit_coca" / "checkpoints" / "step-00000002"), "--eval-root", str(held),
                 "--out", str(report_path)]) == 0
    result = json.loads(report_path.read_text())["tasks"]
    assert list(result) == ["retrieval"]  # auto: a coca stage is evaluated by retrieval
    retrieval = result["retrieval"]
    manifest = json.loads((held / "manifest.json").read_text())
    assert retrieval["samples"] == manifest["sources"]["caption"]["num_samples"]
    for direction in ("image_to_text", "text_to_image"):
        assert 0 <= retrieval[f"{direction}_r@1"] <= retrieval[f"{direction}_r@5"] <= 1
    assert "retrieval (" in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere")]) == 2  # no checkpoint: a message, not a traceback
