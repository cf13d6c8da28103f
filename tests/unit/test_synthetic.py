"""The embedded demo corpus: deterministic, well-formed, boxes that enclose their objects, a real BPE tokenizer."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data.synthetic import COLORS, generate_corpus
from data.tokenizer import SPECIAL_TOKENS, TextTokenizer


def file_hashes(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def samples_of(root, source):
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["sources"][source]["shards"]:
        with tarfile.open(root / shard) as tar:
            groups = {}
            for info in tar.getmembers():
                key, _, ext = info.name.partition(".")
                groups.setdefault(key, {})[ext] = tar.extractfile(info).read()
        yield from groups.items()


def test_same_seed_is_byte_identical_and_seeds_differ(tmp_path):
    generate_corpus(tmp_path / "a", seed=3, scale=0.05)
    generate_corpus(tmp_path / "b", seed=3, scale=0.05)
    generate_corpus(tmp_path / "c", seed=4, scale=0.05)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    assert file_hashes(tmp_path / "a") != file_hashes(tmp_path / "c")


def test_manifest_and_sample_format(demo_root):
    manifest = json.loads((demo_root / "manifest.json").read_text())
    assert set(manifest["sources"]) == {"caption", "ocr", "grounding", "interleaved", "text", "long_doc",
                                        "dialogue", "video", "agent"}
    for source, entry in manifest["sources"].items():
        count, images = 0, 0
        for key, members in samples_of(demo_root, source):
            meta = json.loads(members["json"].decode("utf-8"))
            assert meta["kind"] == source and key.startswith(source + "-")
            assert meta["segments"]
            screenshots = [step for step in meta.get("steps", []) if "image" in step]
            referenced = [*meta["segments"], *meta.get("frames", []), *screenshots]
            for segment in referenced:
                assert isinstance(segment.get("text"), str) or segment["image"] in members
                if "image" in segment:
                    image = Image.open(io.BytesIO(members[segment["image"]]))
                    assert image.mode == "RGB"
                    assert all(side % 28 == 0 and 56 <= side <= 224 for side in image.size)
                    images += 1
            if source in ("caption", "ocr"):
                assert meta["caption"] == meta["segments"][1]["text"]
            count += 1
        assert count == entry["num_samples"] and images == entry["num_images"]
        if source in ("caption", "ocr", "grounding", "interleaved", "dialogue", "video", "agent"):
            assert images > 0
        if entry["num_samples"] >= 200:
            assert len(entry["shards"]) >= 2


def test_grounding_boxes_enclose_exactly_their_object(demo_root):
    checked = 0
    for _, members in samples_of(demo_root, "grounding"):
        meta = json.loads(members["json"])
        pixels = np.asarray(Image.open(io.BytesIO(members["0.png"])), dtype=np.int16)
        height, width, _ = pixels.shape
        for obj in meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            color = np.array(COLORS[obj["label"].split()[0]])
            of_color = np.all(pixels == color, axis=-1)
            inside = of_color[y0:y1, x0:x1]
            # Tight: the object's colour touches every side of its box.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # Enclosing: other objects of the same colour aside, none of its pixels lies outside.
            same_colour = [o["box"] for o in meta["objects"] if o["label"].split()[0] == obj["label"].split()[0]]
            outside = of_color.copy()
            for bx0, by0, bx1, by1 in same_colour:
                outside[by0:by1, bx0:bx1] = False
            assert not outside.any()
            checked += 1
    assert checked > 50


def test_tokenizer_is_a_real_bpe(demo_root, tokenizer):
    assert [tokenizer.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.vocab_size <= 4096
    captions = [json.loads(m["json"])["caption"] for _, m in samples_of(demo_root, "caption")]
    for caption in captions[:50]:
        assert tokenizer.decode(tokenizer.encode(caption)) == caption
    words = sum(len(c.split()) for c in captions)
    tokens = sum(len(tokenizer.encode(c)) for c in captions)
    assert tokens / words < 2.0  # it merges: far fewer tokens than bytes
    assert tokenizer.encode("<|image|>") == [tokenizer.image_id]


def test_tokenizer_without_special_tokens_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.BPE())
    with pytest.raises(ValueError, match="for the special role 'pad'"):
        TextTokenizer(bare)


def test_long_documents_are_long(demo_root, tokenizer):
    lengths = [len(tokenizer.encode(json.loads(m["json"])["segments"][0]["text"]))
               for _, m in samples_of(demo_root, "long_doc")]
    assert lengths and min(lengths) >= 3000
    assert max(lengths) >= 8192  # fills a whole debug long-context row
