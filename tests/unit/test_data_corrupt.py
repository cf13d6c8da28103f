"""Corrupt samples mixed into a shard: exactly the good ones arrive; every bad one is skipped, counted and logged
with its shard and key."""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from config import DataConfig, MixtureConfig
from data.loader import StageLoader
from model.registry import FLAVORS
from storage import LocalStorage
from tests.unit.test_loader import stage_of

VISION = FLAVORS["debug"].vision
SHARD = "mixed/shard-000000.tar"


def png(size=(56, 56), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (30, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def bomb(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims ``width x height`` pixels (as a decompression bomb's does)."""
    data = bytearray(png((1, 1)))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def caption(text: str, ext: str = "0.png") -> bytes:
    return json.dumps({"kind": "caption", "caption": text, "segments": [{"image": ext}, {"text": text}]}).encode()


def write_corpus(root, samples: dict[str, dict[str, bytes]]) -> None:
    (root / "mixed").mkdir()
    with tarfile.open(root / SHARD, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = {"version": 1, "tokenizer": "tokenizer.json",
                "sources": {"mixed": {"kind": "caption", "shards": [SHARD], "num_samples": len(samples)}}}
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("workers", [0, 2])
def test_only_good_samples_arrive_and_every_bad_one_is_named(tmp_path, tokenizer, caplog, workers):
    good = {f"good-{i}": {"json": caption(f"good sample number {i}"), "0.png": png()} for i in range(7)}
    good["good-jpeg"] = {"json": caption("good sample number 7", "0.jpg"), "0.jpg": jpeg()}
    bad = {
        "bad-jpeg": {"json": caption("x", "0.jpg"), "0.jpg": jpeg()[:40] + b"\x00garbage" * 8},
        "bad-empty-image": {"json": caption("x"), "0.png": b""},
        "bad-bomb-pil": {"json": caption("x"), "0.png": bomb(20_000, 20_000)},  # PIL's DecompressionBombError
        "bad-bomb-limit": {"json": caption("x"), "0.png": bomb(9_000, 9_000)},  # under PIL's, over our pixel limit
        "bad-box": {"json": json.dumps({"kind": "grounding", "segments": [{"image": "0.png"}],
                                        "objects": [{"label": "x", "box": [10, 10, 90, 90]}]}).encode(),
                    "0.png": png()},
        "bad-utf8": {"json": b'{"kind": "caption", "caption": "\xff\xfe", "segments": [{"text": "\xff"}]}',
                     "0.png": png()},
        "bad-no-json": {"0.png": png()},
        "bad-no-segments": {"json": json.dumps({"kind": "caption", "caption": "x"}).encode(), "0.png": png()},
        "bad-no-image-member": {"json": caption("x", "1.png"), "0.png": png()},
    }
    samples = dict(sorted({**good, **bad}.items(), key=lambda item: zlib.crc32(item[0].encode())))  # mixed up
    write_corpus(tmp_path, samples)
    stage = stage_of("vit_coca", micro_batch_size=1)
    stage.mixture = MixtureConfig(multimodal_sources={"mixed": 1.0}, multimodal_share_start=1.0,
                                  multimodal_share_end=1.0)
    # Read in the foreground, or ahead in worker processes (a bad sample's error travels back with its draw).
    data = DataConfig(prefetch_samples=3 if workers else 0, loader_workers=workers, max_corrupt_fraction=1.0)
    loader = StageLoader("vit_coca", stage, data, LocalStorage(tmp_path), tokenizer, VISION, 0, (0, 1))
    texts = []
    with caplog.at_level(logging.WARNING, logger="data.reader"):
        # One good sample per batch: the first len(good) batches are exactly the good samples of epoch 0.
        for _ in range(len(good)):
            batch = loader.next_image_text_batch(0.0)
            ids = batch.text_ids[0][batch.text_mask[0]].tolist()
            texts.append(tokenizer.decode(ids[1:-1]))
        skipped_in_epoch = loader.corrupt
        while loader.slots[0].draws < len(samples):  # finish the epoch: the bad ones drawn last are skipped too
            loader.next_image_text_batch(0.0)
    assert sorted(texts) == sorted(f"good sample number {i}" for i in range(8))
    records = [r.getMessage() for r in caplog.records if "skipped corrupt sample" in r.getMessage()]
    assert loader.corrupt == len(records) >= len(bad) >= skipped_in_epoch
    for key in bad:
        assert any(f"mixed/shard-000000.tar:{key}:" in message for message in records), key
    assert not any("good-" in message for message in records)
    reasons = " ".join(records)
    for reason in ("undecodable image", "empty image", "pixel limit", "outside the", "invalid UTF-8",
                   "no .json member", "'segments'", "image member '1.png'"):
        assert reason in reasons, reason
    loader.close()
