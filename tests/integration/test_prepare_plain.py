"""Your own data: plain JSONL and img2dataset-style tars through ``python -m data.prepare`` (the table of rejections,
several processes, downscaling, near-blank counts), the root's tokenizer, and ``python -m data.stats --check``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data import prepare, stats
from data.tokenizer import TextTokenizer
from data.tokenizer import __main__ as tokenizer_cli
from storage import LocalStorage
from tests.integration.test_data_prepare import first_batch_texts

REPO = Path(__file__).resolve().parents[2]


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def plain_jsonl(folder: Path) -> Path:
    """Lines of every plain form, and lines that must be rejected (line numbers in the comments)."""
    (folder / "img").mkdir(parents=True)
    for i in range(4):
        picture((60 + 20 * i, 50), i).save(folder / "img" / f"{i}.png")
    picture((70, 40), 9).save(folder / "img" / "photo.jpg")
    lines = [
        {"image": "img/0.png", "text": "a noisy square zero"},                       # 1
        {"image": "img/1.png", "caption": "a noisy square one"},                     # 2
        {"images": ["img/2.png", "img/photo.jpg"], "text": "two pictures in a row"},  # 3
        {"text": "aardvark: a burrowing mammal of Africa"},                          # 4
        "{not json",                                                                  # 5
        {"image": "img/nowhere.png", "text": "its file is missing"},                 # 6
        ["a", "list"],                                                                # 7
        {"image": "img/3.png"},                                                       # 8: no text
        {"image": str(folder / "img" / "3.png"), "text": "an absolute path"},         # 9
    ]
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_plain_jsonl_is_prepared_with_a_table_of_rejections_the_same_with_any_number_of_processes(tmp_path, capsys):
    jsonl = plain_jsonl(tmp_path / "raw")
    one, two = tmp_path / "one", tmp_path / "two"
    assert prepare.main(["--input", str(jsonl), "--out", str(one), "--source", "mine", "--workers", "1",
                         "--samples-per-shard", "2"]) == 0
    capsys.readouterr()
    assert prepare.main(["--input", str(jsonl), "--out", str(two), "--source", "mine", "--workers", "2",
                         "--samples-per-shard", "2"]) == 0
    table = capsys.readouterr().out
    assert "accepted           5   (5 images, 0 near-blank)" in table
    assert "rejected           4" in table
    assert "malformed JSON: 2: line 5 (Expecting property name enclosed in double quotes at column 2); line 7 (a " \
           "line must be a JSON object, not list)" in table
    assert f"missing file: 1: line 6 ({tmp_path / 'raw' / 'img' / 'nowhere.png'})" in table
    assert "no text: 1: line 8 (an image needs its text or caption)" in table
    entry = json.loads((two / "manifest.json").read_text())["sources"]["mine"]
    assert entry["num_samples"] == 5 and entry["shard_samples"] == [2, 2, 1] and entry["kind"] == "mixed"
    assert entry["rejected"] == {"malformed JSON": 2, "missing file": 1, "no text": 1}
    for shard in entry["shards"]:  # workers change the speed, never the shards
        assert (one / shard).read_bytes() == (two / shard).read_bytes()
    # Plain lines became full samples the loader reads: captions with their images, text, interleaved.
    with tarfile.open(two / entry["shards"][1]) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert [m["kind"] for m in metas] == ["interleaved", "text"]
    assert metas[0]["segments"] == [{"image": "0.png"}, {"image": "1.jpg"}, {"text": "two pictures in a row"}]
    assert tokenizer_cli.main(["train", str(two)]) == 0
    tokenizer = TextTokenizer.from_file(two / "tokenizer.json")
    texts = set(first_batch_texts(two, tokenizer, "mine", batches=4))
    assert texts <= {"a noisy square zero", "a noisy square one", "two pictures in a row", "an absolute path"}
    assert len(texts) >= 3


def img2dataset_tar(path: Path, start: int, count: int, broken: int = -1) -> None:
    """A shard as img2dataset writes it: ``<key>.jpg``, ``<key>.txt`` and ``<key>.json`` (caption, url, status)."""
    with tarfile.open(path, "w") as tar:
        for index in range(start, start + count):
            key = f"{index:09d}"
            image = b"\xff\xd8 not a jpeg" if index == broken else encoded(picture((64, 48), index), "JPEG")
            members = {"jpg": image, "txt": f"photo number {index}".encode(),
                       "json": json.dumps({"key": key, "caption": f"photo number {index}", "url": "http://x",
                                           "status": "success"}).encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_img2dataset_tars_are_prepared_and_read(tmp_path, capsys):
    raw = tmp_path / "shards"
    raw.mkdir()
    img2dataset_tar(raw / "00000.tar", 0, 5, broken=3)
    img2dataset_tar(raw / "00001.tar", 5, 4)
    out = tmp_path / "out"
    assert prepare.main(["--input", str(raw), "--out", str(out), "--source", "web", "--workers", "2"]) == 0
    table = capsys.readouterr().out
    assert "accepted           8   (8 images" in table
    assert "undecodable image: 1: 00000.tar: key 000000003 (image '0.jpg': undecodable image:" in table
    entry = json.loads((out / "manifest.json").read_text())["sources"]["web"]
    assert entry["kind"] == "caption" and entry["image_stats"]["width"]["max"] == 64
    assert tokenizer_cli.main(["train", str(out)]) == 0
    texts = first_batch_texts(out, TextTokenizer.from_file(out / "tokenizer.json"), "web", batches=2)
    assert set(texts) <= {f"photo number {i}" for i in range(9) if i != 3} and len(set(texts)) >= 3


def test_nothing_valid_exits_non_zero_after_the_table_and_bad_arguments_exit_2(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"image": "gone.png", "text": "x"}\n{"oops"\n{"nothing": 1}\n')
    done = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(jsonl), "--out", str(tmp_path / "o"),
                           "--source", "s", "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "accepted           0" in done.stdout and "rejected           3" in done.stdout
    assert f"missing file: 1: line 1 ({tmp_path / 'gone.png'})" in done.stdout
    assert "malformed JSON: 1: line 2" in done.stdout and "no text: 1: line 3" in done.stdout
    assert "no valid training sample" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()
    done = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(tmp_path / "typo.jsonl"), "--out",
                           str(tmp_path / "o"), "--source", "s"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "typo.jsonl: no such file or folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_near_blank_images_are_counted_and_large_ones_stored_downscaled(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    clear = Image.new("RGBA", (80, 60), (0, 0, 0, 0))  # hidden pixels black: blank once composited
    clear.save(raw / "clear.png")
    picture((300, 150), 1).save(raw / "big.png")
    picture((400, 200), 2).save(raw / "big.jpg")
    lines = [{"image": "clear.png", "text": "a transparent sticker"}, {"image": "big.png", "text": "a big png"},
             {"image": "big.jpg", "text": "a big photo"}]
    (raw / "in.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    assert prepare.main(["--input", str(raw / "in.jsonl"), "--out", str(out), "--source", "art",
                         "--max-image-side", "100", "--workers", "1"]) == 0
    assert "(3 images, 1 near-blank, 2 downscaled)" in capsys.readouterr().out
    entry = json.loads((out / "manifest.json").read_text())["sources"]["art"]
    assert entry["num_near_blank"] == 1 and entry["image_stats"]["width"]["max"] == 100
    with tarfile.open(out / entry["shards"][0]) as tar:
        stored = {m.name: Image.open(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()
                  if not m.name.endswith(".json")}
    sizes = {name.split(".")[0]: (image.format, image.size) for name, image in stored.items()}
    assert sorted(sizes.values()) == [("JPEG", (100, 50)), ("PNG", (80, 60)), ("PNG", (100, 50))]
    (row,) = stats.summarize(LocalStorage(out))["sources"]
    assert (row["images"], row["near_blank"], row["rejected"]) == (3, 1, 0)


def test_the_tokenizer_does_not_depend_on_the_order_sources_were_prepared_in(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "captions.jsonl").write_text("".join(json.dumps({"text": f"caption about a red fox {i}"}) + "\n"
                                                for i in range(30)))
    (raw / "words.jsonl").write_text("".join(json.dumps({"text": f"lexicon entry: word{i} means thing {i}"}) + "\n"
                                             for i in range(30)))
    roots = {}
    for order in (("captions", "words"), ("words", "captions")):
        out = tmp_path / "-".join(order)
        for source in order:
            assert prepare.main(["--input", str(raw / f"{source}.jsonl"), "--out", str(out), "--source", source,
                                 "--workers", "1"]) == 0
        assert tokenizer_cli.main(["train", str(out), "--vocab-size", "320", "--recount"]) == 0
        roots[order] = out
    first, second = roots.values()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["tokenizer_trained_on"] == {"captions": 30, "words": 30}
    assert all(entry["tokens_tokenizer"] == manifest["tokenizer_id"] and entry["num_tokens"] > 0
               for entry in manifest["sources"].values())
    # A source prepared with the tokenizer counts with it; training another marks the earlier counts as stale.
    assert tokenizer_cli.main(["train", str(first), "--vocab-size", "300"]) == 0
    summary = stats.summarize(LocalStorage(first))
    assert all(row["tokens_stale"] for row in summary["sources"])


def test_stats_check_finds_every_missing_file_the_manifest_lists(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "in.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    assert prepare.main(["--input", str(raw / "in.jsonl"), "--out", str(out), "--source", "t", "--workers", "1",
                         "--samples-per-shard", "5", "--heldout-fraction", "0.3"]) == 0
    assert tokenizer_cli.main(["train", str(out)]) == 0
    assert stats.main([str(out), "--check"]) == 0
    entry = json.loads((out / "manifest.json").read_text())["sources"]["t"]
    (out / entry["heldout_shards"][0]).unlink()
    (out / (entry["shards"][1] + ".idx.json")).unlink()
    capsys.readouterr()
    assert stats.main([str(out), "--check"]) == 1
    report = capsys.readouterr().out
    assert f"missing: t: {entry['heldout_shards'][0]}" in report
    assert f"missing: t: {entry['shards'][1]}.idx.json" in report
    (out / "tokenizer.json").unlink()
    assert stats.main([str(out), "--check"]) == 1
    assert "missing: tokenizer tokenizer.json" in capsys.readouterr().out


def test_full_samples_with_unforeseen_fields_are_rejected_by_name_never_fatal(tmp_path, capsys):
    jsonl = tmp_path / "odd.jsonl"
    jsonl.write_text('{"segments": [{"image": 5}], "images": {"5": "odd.jsonl"}}\n'
                     '{"segments": [{"text": "ok"}], "objects": 3}\n{"segments": [{"text": "fine"}]}\n')
    assert prepare.main(["--input", str(jsonl), "--out", str(tmp_path / "o"), "--source", "s", "--workers", "1"]) == 0
    table = capsys.readouterr().out
    assert "accepted           1" in table and "missing field: 1: line 1 (missing field: image member '5')" in table
    assert "unexpected TypeError: 1: line 2" in table
