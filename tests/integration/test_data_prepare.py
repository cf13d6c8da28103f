"""Dataset tooling: ``python -m data.prepare`` from a folder and from JSONL (uploaded to moto's S3 server), then
``python -m data.stats`` on the result, then the stage loader reading it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from config import MixtureConfig
from data import prepare, stats
from data.loader import StageLoader
from data.tokenizer import TextTokenizer
from data.tokenizer import __main__ as tokenizer_cli
from model.registry import FLAVORS
from storage import S3Options, S3Storage, Storage, open_storage
from tests.integration.test_s3_loader import BUCKET, s3_corpus  # noqa: F401  (the module-scoped S3 server)
from tests.unit.test_loader import FOREGROUND, stage_of

REPO = Path(__file__).resolve().parents[2]
VISION = FLAVORS["debug"].vision


def image_bytes(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40 + size[0] % 200, 90, 160)).save(buffer, format=fmt)
    return buffer.getvalue()


def first_batch_texts(root: Path | Storage, tokenizer: TextTokenizer, source: str, batches: int = 2) -> list[str]:
    stage = stage_of("vit_coca", micro_batch_size=2)
    stage.mixture = MixtureConfig(multimodal_sources={source: 1.0}, multimodal_share_start=1.0,
                                  multimodal_share_end=1.0)
    storage = open_storage(root) if isinstance(root, Path) else root
    loader = StageLoader("vit_coca", stage, FOREGROUND, storage, tokenizer, VISION, 0, (0, 1))
    texts = []
    for _ in range(batches):
        batch = loader.next_image_text_batch(0.0)
        texts += [tokenizer.decode(ids[mask].tolist()[1:-1]) for ids, mask in zip(batch.text_ids, batch.text_mask)]
    return texts


def caption_folder(folder, samples: list[tuple[str, str, tuple[int, int]]]):
    """A folder of caption samples, one ``(key, caption, image size)`` each: ``<key>.json`` and ``<key>.0.png``."""
    folder.mkdir()
    for key, text, size in samples:
        meta = {"kind": "caption", "caption": text, "segments": [{"image": "0.png"}, {"text": text}]}
        (folder / f"{key}.json").write_text(json.dumps(meta))
        (folder / f"{key}.0.png").write_bytes(image_bytes(size))
    return folder


def test_prepare_a_folder_then_stats_then_load(tmp_path, capsys):
    folder = caption_folder(tmp_path / "raw", [(f"card{i}", f"a blue card number {i}", (56 + 28 * (i % 3), 84))
                                               for i in range(9)])
    grounding = {"kind": "grounding", "segments": [{"image": "0.png"}],
                 "objects": [{"label": "card", "box": [2, 2, 30, 30], "point": [10, 10]}]}
    (folder / "ground.json").write_text(json.dumps(grounding))
    (folder / "ground.0.png").write_bytes(image_bytes((56, 56)))
    outside = {**grounding, "objects": [{"label": "card", "box": [2, 2, 300, 30]}]}
    (folder / "zbad.json").write_text(json.dumps(outside))
    (folder / "zbad.0.png").write_bytes(image_bytes((56, 56)))
    out = tmp_path / "out"
    assert prepare.main(["--input", str(folder), "--out", str(out), "--source", "cards",
                         "--samples-per-shard", "4"]) == 0
    captured = capsys.readouterr()
    assert ("box [N, N, N, N] outside the NxN image: 1: key zbad (box [2, 2, 300, 30] outside the 56x56 image)"
            in captured.out)
    entry = json.loads((out / "manifest.json").read_text())["sources"]["cards"]
    assert entry["shards"] == [f"cards/shard-00000{i}.tar" for i in range(3)]
    assert (entry["num_samples"], entry["num_images"], entry["num_rejected"]) == (10, 10, 1)
    assert entry["image_stats"]["width"] == {"min": 56, "mean": 81.2, "max": 112}
    # No tokenizer yet: prepare does not train one; the root's is trained on every source at once.
    assert entry["num_tokens"] is None and not (out / "tokenizer.json").exists()
    assert tokenizer_cli.main(["train", str(out), "--recount"]) == 0
    entry = json.loads((out / "manifest.json").read_text())["sources"]["cards"]
    assert entry["num_tokens"] >= entry["num_words"] > 0
    assert stats.main([str(out), "--check"]) == 0
    table = capsys.readouterr().out
    assert "cards" in table and "total" in table and "81x81" in table
    tokenizer = TextTokenizer.from_file(out / "tokenizer.json")
    texts = first_batch_texts(out, tokenizer, "cards", batches=3)
    assert all(t.startswith("a blue card number") or t == "card" for t in texts) and len(texts) == 6


@pytest.fixture
def jsonl(tmp_path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    lines = []
    for i in range(7):
        (photos / f"{i}.jpg").write_bytes(image_bytes((70 + 10 * i, 60), "JPEG"))
        text = f"photo of a lake number {i}"
        lines.append({"kind": "caption", "caption": text, "segments": [{"image": "0.jpg"}, {"text": text}],
                      "images": {"0.jpg": f"photos/{i}.jpg"}})
    lines.append({"kind": "caption", "caption": "gone", "segments": [{"image": "0.jpg"}, {"text": "gone"}],
                  "images": {"0.jpg": "photos/missing.jpg"}, "key": "lost"})
    lines.append({"kind": "text", "segments": [{"text": "Plain text lines are samples too."}]})
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_prepare_jsonl_uploaded_to_s3_then_stats_then_load(s3_corpus, jsonl, tokenizer):  # noqa: F811
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = f"s3://{BUCKET}/prepared"
    done = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(jsonl), "--out", root, "--source",
                           "photos", "--endpoint-url", s3_corpus, "--json", "--workers", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"missing file: 1: line 8 ({jsonl.parent / 'photos' / 'missing.jpg'})" in done.stdout
    assert json.loads(done.stdout.splitlines()[0])["num_samples"] == 8
    done = subprocess.run([sys.executable, "-m", "data.tokenizer", "train", root, "--endpoint-url", s3_corpus],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "data.stats", root, "--endpoint-url", s3_corpus, "--json",
                           "--check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["totals"]["samples"] == 8 and summary["totals"]["images"] == 7 and summary["totals"]["missing"] == 0
    (row,) = summary["sources"]
    assert row["source"] == "photos" and row["kind"] == "mixed" and row["mean_width"] == 100.0
    storage = S3Storage(root, S3Options(endpoint_url=s3_corpus))
    prepared_tokenizer = TextTokenizer.from_bytes(storage.read("tokenizer.json"))
    texts = first_batch_texts(storage, prepared_tokenizer, "photos", batches=4)
    # vit_coca takes image samples only: the text line is skipped (counted as unusable for the objective).
    assert set(texts) <= {f"photo of a lake number {i}" for i in range(7)} and len(set(texts)) >= 5


def test_a_heldout_split_is_chosen_by_key_kept_from_training_and_read_by_evaluation(tmp_path):
    """``--heldout-fraction``: samples go to held-out shards by a hash of their key (so preparing a grown dataset
    again keeps every sample on its side), the loader never draws them, evaluation reads only them."""
    from train.eval_data import HeldOutData

    folder = caption_folder(tmp_path / "raw", [(f"tile{i:02d}", f"a red tile number {i}", (56, 56))
                                               for i in range(40)])
    out = tmp_path / "out"
    assert prepare.main(["--input", str(folder), "--out", str(out), "--source", "tiles", "--samples-per-shard", "8",
                         "--heldout-fraction", "0.25"]) == 0
    assert tokenizer_cli.main(["train", str(out)]) == 0
    entry = json.loads((out / "manifest.json").read_text())["sources"]["tiles"]
    expected = {f"tile{i:02d}" for i in range(40) if prepare.is_heldout(f"tile{i:02d}", 0.25)}
    assert 4 <= len(expected) <= 16  # a quarter, give or take the hash
    assert entry["heldout_samples"] == len(expected) and entry["num_samples"] == 40 - len(expected)
    assert all(shard.startswith("tiles/heldout-") for shard in entry["heldout_shards"])
    tokenizer = TextTokenizer.from_file(out / "tokenizer.json")
    trained_on = first_batch_texts(out, tokenizer, "tiles", batches=20)  # 40 draws: every training sample
    assert {f"tile{int(t.rsplit(' ', 1)[1]):02d}" for t in trained_on}.isdisjoint(expected)
    data = HeldOutData(open_storage(out), VISION, 64)
    assert data.has_heldout_split("tiles")
    assert {sample.key for sample in data.samples("tiles", 100)} == expected
    # Preparing again with more samples keeps each earlier sample on its side of the split.
    for i in range(40, 60):
        meta = {"kind": "caption", "caption": "more", "segments": [{"image": "0.png"}, {"text": "more"}]}
        (folder / f"tile{i:02d}.json").write_text(json.dumps(meta))
        (folder / f"tile{i:02d}.0.png").write_bytes(image_bytes((56, 56)))
    assert prepare.main(["--input", str(folder), "--out", str(out), "--source", "tiles", "--samples-per-shard", "8",
                         "--heldout-fraction", "0.25"]) == 0
    grown = {sample.key for sample in HeldOutData(open_storage(out), VISION, 64).samples("tiles", 100)}
    assert expected <= grown and all(key in expected or int(key[4:]) >= 40 for key in grown)
