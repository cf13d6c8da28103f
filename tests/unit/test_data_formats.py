"""Video, agent and point-grounding samples: rendered with timestamps, actions and coordinates, validated, mixed."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from config import MixtureConfig
from data.formats import BOX_END, BOX_START
from data.loader import StageLoader
from data.samples import RawSample, SampleError, ShardSource, load_images, load_meta, render_document
from model.registry import FLAVORS
from storage import LocalStorage
from tests.unit.test_loader import FOREGROUND, stage_of

VISION = FLAVORS["debug"].vision


def documents(root, tokenizer, source: str):
    manifest = json.loads((root / "manifest.json").read_text())
    shards = ShardSource(source, LocalStorage(root), manifest["sources"][source]["shards"])
    for position in range(len(shards)):
        raw = shards.read(position)
        meta = load_meta(raw)
        images = load_images(raw, meta, VISION.patch_size, VISION.merge_size, 64)
        yield raw, meta, render_document(meta, images, tokenizer, VISION.merge_size, 100_000)


def test_video_frames_come_in_order_each_after_its_timestamp(demo_root, tokenizer):
    checked = 0
    for raw, meta, doc in documents(demo_root, tokenizer, "video"):
        frames = json.loads(raw.members["json"])["frames"]
        assert len(doc.spans) == len(doc.images) == len(frames) >= 3
        previous = 0
        for frame, (start, end) in zip(frames, doc.spans):
            before = tokenizer.decode(doc.tokens[previous:start])
            assert before.endswith(f"<t={frame['time']:.1f}s>"), before
            previous = end
        assert meta["caption"] in tokenizer.decode(doc.tokens[previous:])
        checked += 1
    assert checked >= 10


def test_agent_actions_carry_coordinates_on_their_screenshot(demo_root, tokenizer):
    checked = 0
    for raw, _, doc in documents(demo_root, tokenizer, "agent"):
        steps = json.loads(raw.members["json"])["steps"]
        text = tokenizer.decode(doc.tokens)
        clicks = re.findall(r"Action: click <\|box_start\|>\((\d+),(\d+)\)<\|box_end\|>", text)
        assert len(clicks) == sum(s["action"] == "click" for s in steps) == 2
        first = steps[0]
        screen = Image.open(io.BytesIO(raw.members[first["image"]])).convert("RGB")
        x, y = (round((v + 0.5) * 1000 / side) for v, side in zip(first["point"], screen.size))
        assert clicks[0] == (str(x), str(y))
        # The first click lands on a button, not on the window's background.
        assert screen.getpixel(tuple(first["point"])) != (245, 245, 245)
        typed = next(s["text"] for s in steps if s["action"] == "type")
        assert f'Action: type "{typed}"' in text and text.endswith("Action: done\n<|eos|>")
        # Screenshots come before the actions taken on them.
        assert text.index("<|image_end|>") < text.index("Action: click")
        checked += 1
    assert checked >= 10


def _png(size=(56, 56)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def raw(meta: dict, images: int = 1) -> RawSample:
    members = {"json": json.dumps(meta).encode(), **{f"{i}.png": _png() for i in range(images)}}
    return RawSample("s", "shard", "key", members)


@pytest.mark.parametrize("meta, images, message", [
    ({"kind": "video", "segments": [{"text": "x"}], "frames": [{"image": "0.png", "time": 1.0},
                                                               {"image": "1.png", "time": 0.5}]}, 2, "non-decreasing"),
    ({"kind": "video", "segments": [{"text": "x"}], "frames": [{"image": "7.png", "time": 0}]}, 1, "7.png"),
    ({"kind": "agent", "segments": [{"text": "t"}], "steps": [{"action": "fly"}]}, 0, "fly"),
    ({"kind": "agent", "segments": [{"text": "t"}], "steps": [{"image": "0.png", "action": "click",
                                                               "point": [56, 3]}]}, 1, "outside"),
    ({"kind": "agent", "segments": [{"text": "t"}], "steps": [{"action": "click", "point": [5, 3]}]}, 0,
     "no screenshot"),
    ({"kind": "grounding", "segments": [{"image": "0.png"}], "objects": [{"label": "x", "point": [10, 60]}]}, 1,
     "outside"),
    ({"kind": "grounding", "segments": [{"image": "0.png"}], "objects": [{"label": "x"}]}, 1, "box"),
])
def test_malformed_structured_samples_are_sample_errors(meta, images, message):
    sample = raw(meta, images)
    with pytest.raises(SampleError, match=message):
        load_images(sample, load_meta(sample), 14, 2, 64)


def test_points_render_on_the_grid_of_their_image(tokenizer):
    sample = raw({"kind": "grounding", "segments": [{"image": "0.png"}],
                  "objects": [{"label": "dot", "point": [27, 0]}, {"label": "sq", "box": [0, 0, 28, 56]}]})
    meta = load_meta(sample)
    doc = render_document(meta, load_images(sample, meta, 14, 2, 64), tokenizer, 2, 1000)
    text = tokenizer.decode(doc.tokens)
    assert f"dot {BOX_START}(491,9){BOX_END} sq {BOX_START}(0,0),(500,1000){BOX_END}" in text


def test_video_and_agent_sources_mix_into_packed_rows(demo_root, tokenizer):
    stage = stage_of("joint_pretrain", micro_batch_size=2)
    stage.mixture = MixtureConfig(multimodal_sources={"video": 1.0, "agent": 1.0}, multimodal_share_start=1.0,
                                  multimodal_share_end=1.0)
    loader = StageLoader("joint_pretrain", stage, FOREGROUND, LocalStorage(demo_root), tokenizer, VISION, 0, (0, 1))
    images = 0
    for step in range(3):
        batch = loader.next_packed_batch(step / 3)
        images += batch.image_grid_hw.shape[0]
        assert int((batch.image_grid_hw // 2).prod(-1).sum()) == batch.image_token_positions.numel()
    assert images >= 6 and loader.corrupt == 0
    assert np.mean([d > 0 for d in loader.slots[0].source_draws.values()]) == 1.0


def test_a_jpeg_decoded_at_a_reduced_scale_keeps_its_stored_size_as_its_frame(tokenizer):
    # Its 4-patch grid needs 1/8 of the resolution: PIL decodes it reduced (draft), which resizes the image object;
    # boxes and points live in the stored frame.
    buffer = io.BytesIO()
    Image.new("RGB", (448, 336), (200, 40, 40)).save(buffer, format="JPEG")
    sample = RawSample("s", "shard", "k", {"json": json.dumps({
        "kind": "grounding", "segments": [{"image": "0.jpg"}],
        "objects": [{"label": "all", "box": [0, 0, 448, 336]}]}).encode(), "0.jpg": buffer.getvalue()})
    meta = load_meta(sample)
    images = load_images(sample, meta, 14, 2, 4)
    assert images["0.jpg"].size == (448, 336) and images["0.jpg"].grid == (2, 2)
    text = tokenizer.decode(render_document(meta, images, tokenizer, 2, 1000).tokens)
    assert f"all {BOX_START}(0,0),(1000,1000){BOX_END}" in text
