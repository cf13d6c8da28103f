"""The embedded demo corpus: a small, deterministic multimodal world rendered with Pillow.

``python -m data.synthetic --out demo_data [--seed 0] [--scale 1.0]`` writes webdataset tar shards for nine sources
(``caption``, ``ocr``, ``grounding``, ``interleaved``, ``text``, ``long_doc``, ``dialogue``: ChatML visual QA with
``role`` on each segment, ``video``: a shape moving over timestamped frames, ``agent``: screenshots of a toy app
with the clicks and typing that complete a task), a byte-level BPE tokenizer trained
on all their text, and ``manifest.json``. The same seed gives byte-identical files. Scenes are coloured shapes on a
plain background; objects never overlap, so a grounding box encloses exactly one object's pixels.

Sample format (see :mod:`data.samples`): ``<key>.json`` with ``kind``, ordered ``segments`` (``{"text": ...}`` or
``{"image": "<ext>"}``) and kind-specific fields (``caption``; grounding ``objects`` with pixel ``box`` [x0, y0,
x1, y1), x1/y1 exclusive, and ``point``; video ``frames``; agent ``steps``; see :mod:`data.formats`),
plus ``<key>.0.png``, ``<key>.1.png``, ...
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.shards import INDEX_SUFFIX, index_bytes
from data.tokenizer import train_tokenizer

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (140, 60, 180), "orange": (240, 130, 30), "black": (20, 20, 20), "pink": (240, 110, 180),
}
BACKGROUNDS = {"white": (255, 255, 255), "light gray": (215, 215, 215), "beige": (240, 228, 200),
               "pale blue": (205, 225, 245)}
SHAPES = ("circle", "square", "triangle", "diamond", "ellipse")
SIDES = tuple(range(56, 225, 28))  # image sides: multiples of 28 (patch 14 x merge 2)
SOURCE_SIZES = {"caption": 600, "ocr": 300, "grounding": 300, "interleaved": 200, "text": 800, "long_doc": 40,
                "dialogue": 200, "video": 60, "agent": 60}
SAMPLES_PER_SHARD = 100
# Size of each source's held-out split (manifest ``heldout_shards``) relative to its training shards.
HELDOUT_SHARE = 0.05
WORDS = ("river stone cloud garden lamp window paper music bridge forest tiger silver morning harbor candle "
         "valley letter planet engine market winter summer orchard ladder basket mirror signal island").split()


@dataclass
class SceneObject:
    shape: str
    color: str
    box: list[int]  # tight pixel box of the drawn pixels: x0, y0, x1, y1 (exclusive)

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle" or shape == "ellipse":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def render_scene(rng: random.Random) -> tuple[Image.Image, str, list[SceneObject]]:
    """An image of 1-4 non-overlapping shapes; returns it, its background name and the objects."""
    width, height = rng.choice(SIDES), rng.choice(SIDES)
    background = rng.choice(sorted(BACKGROUNDS))
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    objects: list[SceneObject] = []
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(rng.randint(1, 4) * 6):  # a few placement attempts per wanted object
        if len(objects) == 4:
            break
        side = rng.randint(12, max(13, min(width, height) // 2))
        w = side if rng.random() < 0.5 else max(8, int(side * rng.uniform(0.6, 1.0)))
        x0, y0 = rng.randint(1, width - w - 1), rng.randint(1, height - side - 1)
        frame = (x0, y0, x0 + w, y0 + side)
        if any(not (frame[2] + 2 < t[0] or t[2] + 2 < frame[0] or frame[3] + 2 < t[1] or t[3] + 2 < frame[1])
               for t in taken):
            continue
        shape = rng.choice(SHAPES)
        if shape in ("circle", "square"):
            frame = (x0, y0, x0 + side, y0 + side) if x0 + side < width - 1 else frame
        color = rng.choice(sorted(COLORS))
        mask = Image.new("L", (width, height), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, frame, 255)
        _draw_shape(draw, shape, frame, COLORS[color])
        ys, xs = np.nonzero(np.asarray(mask))
        taken.append(frame)
        objects.append(SceneObject(shape, color, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]))
        if len(objects) >= 1 and rng.random() < 0.3:
            break
    return image, background, objects


def _where(obj: SceneObject, width: int, height: int) -> str:
    cx, cy = (obj.box[0] + obj.box[2]) / 2 / width, (obj.box[1] + obj.box[3]) / 2 / height
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"{row} {col}".strip() or "center"


def _size_word(obj: SceneObject, width: int, height: int) -> str:
    area = (obj.box[2] - obj.box[0]) * (obj.box[3] - obj.box[1]) / (width * height)
    return "small" if area < 0.04 else "large" if area > 0.15 else "medium-sized"


def describe(image: Image.Image, background: str, objects: list[SceneObject], rng: random.Random) -> str:
    parts = [f"a {_size_word(o, *image.size)} {o.label} in the {_where(o, *image.size)}" for o in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    opening = rng.choice(["The image shows", "There is", "This picture contains", "We can see"])
    return f"{opening} {listed}, on a {background} background."


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def make_caption(rng: random.Random) -> tuple[dict, list[bytes]]:
    image, background, objects = render_scene(rng)
    caption = describe(image, background, objects, rng)
    return {"kind": "caption", "caption": caption, "segments": [{"image": "0.png"}, {"text": caption}]}, [_png(image)]


def make_grounding(rng: random.Random) -> tuple[dict, list[bytes]]:
    image, _, objects = render_scene(rng)
    listed = [{"label": o.label, "box": o.box, "point": [(o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3]) // 2]}
              for o in objects]
    return {"kind": "grounding", "segments": [{"image": "0.png"}], "objects": listed}, [_png(image)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def make_ocr(rng: random.Random) -> tuple[dict, list[bytes]]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.4:
        words.append(str(rng.randint(0, 9999)))
    font = _font(rng.choice([14, 18, 22]))
    # Keep the whole text legible inside the largest image side: drop words that would not fit.
    while len(words) > 1 and font.getbbox(" ".join(words))[2] > max(SIDES) - 16:
        words.pop()
    text = " ".join(words)
    left, top, right, bottom = font.getbbox(text)
    width = min(224, max(56, -(-(right - left + 16) // 28) * 28))
    height = min(224, max(56, -(-(bottom - top + 16) // 28) * 28))
    image = Image.new("RGB", (width, height), BACKGROUNDS[rng.choice(sorted(BACKGROUNDS))])
    ImageDraw.Draw(image).text((8 - left, (height - bottom - top) // 2), text, fill=(10, 10, 10), font=font)
    return {"kind": "ocr", "caption": text, "segments": [{"image": "0.png"}, {"text": text}]}, [_png(image)]


def paragraph(rng: random.Random) -> str:
    """A few sentences about the shapes world: facts, arithmetic and small stories."""
    sentences = []
    for _ in range(rng.randint(3, 8)):
        kind = rng.random()
        shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
        if kind < 0.3:
            sides = {"triangle": "three corners", "square": "four equal sides", "diamond": "four corners",
                     "circle": "no corners", "ellipse": "no corners"}[shape]
            sentences.append(f"A {shape} has {sides}.")
        elif kind < 0.55:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            sentences.append(rng.choice([f"{a} plus {b} equals {a + b}.", f"{a + b} minus {b} equals {a}."]))
        elif kind < 0.8:
            other = rng.choice(sorted(COLORS))
            sentences.append(f"The {color} {shape} met a {other} {rng.choice(SHAPES)} near the {rng.choice(WORDS)}.")
        else:
            sentences.append(f"In the {rng.choice(WORDS)} there were {rng.randint(2, 9)} {color} {shape}s.")
    return " ".join(sentences)


def make_text(rng: random.Random) -> tuple[dict, list[bytes]]:
    text = "\n".join(paragraph(rng) for _ in range(rng.randint(1, 4)))
    return {"kind": "text", "segments": [{"text": text}]}, []


def make_long_doc(rng: random.Random) -> tuple[dict, list[bytes]]:
    target, chapters, words = rng.randint(3000, 12000), [], 0
    while words < target:
        body = "\n".join(paragraph(rng) for _ in range(rng.randint(4, 10)))
        chapters.append(f"Chapter {len(chapters) + 1}: The {rng.choice(WORDS)} of the {rng.choice(SHAPES)}s\n{body}")
        words += len(body.split())
    return {"kind": "long_doc", "segments": [{"text": "\n\n".join(chapters)}]}, []


def make_interleaved(rng: random.Random) -> tuple[dict, list[bytes]]:
    segments, images = [{"text": paragraph(rng)}], []
    for _ in range(rng.randint(1, 3)):
        image, background, objects = render_scene(rng)
        segments.append({"image": f"{len(images)}.png"})
        images.append(_png(image))
        segments.append({"text": describe(image, background, objects, rng) + " " + paragraph(rng)})
    return {"kind": "interleaved", "segments": segments}, images


def _questions(image: Image.Image, objects: list[SceneObject], rng: random.Random) -> list[tuple[str, str]]:
    """Question-answer pairs about a scene, answerable from the picture alone."""
    target = rng.choice(objects)
    count = len(objects)
    pairs = [
        ("How many shapes are in the picture?", f"There {'is' if count == 1 else 'are'} {count}."),
        (f"What colour is the {target.shape}?", f"It is {target.color}."),
        (f"Where is the {target.label}?", f"It is in the {_where(target, *image.size)}."),
        (f"Is there a {target.label} in the image?", "Yes."),
    ]
    rng.shuffle(pairs)
    return pairs[: rng.randint(1, 3)]


def make_dialogue(rng: random.Random) -> tuple[dict, list[bytes]]:
    """ChatML-style visual QA: the user shows a scene and asks; only the assistant's turns are loss targets."""
    image, _, objects = render_scene(rng)
    segments = [{"role": "system", "text": "You answer questions about pictures briefly."},
                {"role": "user", "image": "0.png"}]
    for question, answer in _questions(image, objects, rng):
        segments += [{"role": "user", "text": question}, {"role": "assistant", "text": answer}]
    return {"kind": "dialogue", "segments": segments}, [_png(image)]


def make_video(rng: random.Random) -> tuple[dict, list[bytes]]:
    """A shape moving in a straight line over 3-6 frames at 1 or 2 frames per second."""
    width, height = rng.choice(SIDES[:5]), rng.choice(SIDES[:5])
    background, shape, color = rng.choice(sorted(BACKGROUNDS)), rng.choice(SHAPES), rng.choice(sorted(COLORS))
    side = rng.randint(12, min(width, height) // 3)
    start = (rng.randint(1, width - side - 1), rng.randint(1, height - side - 1))
    end = (rng.randint(1, width - side - 1), rng.randint(1, height - side - 1))
    count, fps = rng.randint(3, 6), rng.choice([1, 2])
    frames, pngs, boxes = [], [], []
    for i in range(count):
        x = round(start[0] + (end[0] - start[0]) * i / (count - 1))
        y = round(start[1] + (end[1] - start[1]) * i / (count - 1))
        image = Image.new("RGB", (width, height), BACKGROUNDS[background])
        _draw_shape(ImageDraw.Draw(image), shape, (x, y, x + side, y + side), COLORS[color])
        frames.append({"image": f"{i}.png", "time": i / fps})
        pngs.append(_png(image))
        boxes.append(SceneObject(shape, color, [x, y, x + side, y + side]))
    where = [_where(box, width, height) for box in (boxes[0], boxes[-1])]
    motion = f"moves from the {where[0]} to the {where[1]}" if where[0] != where[1] else f"stays in the {where[0]}"
    caption = f"A {color} {shape} {motion} on a {background} background, over {(count - 1) / fps:.1f} seconds."
    return {"kind": "video", "caption": caption, "frames": frames, "segments": [{"text": caption}]}, pngs


def _screen(buttons: list[tuple[str, tuple[int, int, int, int]]], height: int, field: bool) -> Image.Image:
    """A toy app window: a title bar, labelled buttons and optionally a text field."""
    image = Image.new("RGB", (224, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 223, 15), fill=(60, 90, 160))
    font = _font(12)
    for label, box in buttons:
        draw.rectangle(box, fill=(220, 220, 235), outline=(90, 90, 90))
        draw.text((box[0] + 4, box[1] + 4), label, fill=(10, 10, 10), font=font)
    if field:
        draw.rectangle((12, height - 40, 211, height - 16), fill=(255, 255, 255), outline=(40, 40, 40))
    return image


def make_agent(rng: random.Random) -> tuple[dict, list[bytes]]:
    """A GUI trajectory: click the named button, click the search field that opens, type a word, done."""
    height = rng.choice([112, 140, 168])
    labels = rng.sample(WORDS, rng.randint(2, 4))
    buttons = [(label, (8 + 54 * i, 24, 58 + 54 * i, 48)) for i, label in enumerate(labels)]
    target, query = rng.choice(labels), rng.choice(WORDS)
    box = dict(buttons)[target]
    steps = [
        {"image": "0.png", "action": "click", "point": [(box[0] + box[2]) // 2, (box[1] + box[3]) // 2]},
        {"image": "1.png", "action": "click", "point": [rng.randint(20, 200), height - 28]},
        {"action": "type", "text": query},
    ]
    if rng.random() < 0.3:
        steps.append({"action": "scroll", "direction": rng.choice(["up", "down"])})
    steps.append({"action": "done"})
    pngs = [_png(_screen(buttons, height, False)), _png(_screen(buttons, height, True))]
    task = f"Task: open {target} and search for {query}."
    return {"kind": "agent", "segments": [{"text": task}], "steps": steps}, pngs


MAKERS = {"caption": make_caption, "ocr": make_ocr, "grounding": make_grounding, "interleaved": make_interleaved,
          "text": make_text, "long_doc": make_long_doc, "dialogue": make_dialogue, "video": make_video,
          "agent": make_agent}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def sample_texts(meta: dict) -> list[str]:
    """The text a sample renders to (without coordinates), for training the tokenizer."""
    texts = [s["text"] for s in meta["segments"] if "text" in s]
    texts += [f"<t={frame['time']:.1f}s>" for frame in meta.get("frames", [])]
    texts += [f"Action: {step['action']} {step.get('text', step.get('direction', ''))}" for step in
              meta.get("steps", [])]
    return texts + [o["label"] for o in meta.get("objects", [])]


def write_source(out: Path, name: str, count: int, seed: int, split: str = "shard") -> tuple[dict, list[str]]:
    """Write one source's shards (``split``: ``shard`` for training, ``heldout`` for evaluation, drawn from a random
    stream of its own); returns its manifest entry and all its text (for the tokenizer)."""
    stream = f"{seed}/{name}" if split == "shard" else f"{seed}/{name}/{split}"
    rng = random.Random(zlib.crc32(stream.encode()))
    (out / name).mkdir(parents=True, exist_ok=True)
    shards, counts, texts, images = [], [], [], 0
    for start in range(0, count, SAMPLES_PER_SHARD):
        shard = f"{name}/{split}-{len(shards):06d}.tar"
        with tarfile.open(out / shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, min(count, start + SAMPLES_PER_SHARD)):
                meta, pngs = MAKERS[name](rng)
                key = f"{name}-{index:06d}" if split == "shard" else f"{name}-{split}-{index:06d}"
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                for i, png in enumerate(pngs):
                    _add(tar, f"{key}.{i}.png", png)
                texts += sample_texts(meta)
                images += len(pngs)
        # The sidecar index lets the loader start without reading the shards (data/shards.py).
        (out / (shard + INDEX_SUFFIX)).write_bytes(index_bytes((out / shard).read_bytes()))
        shards.append(shard)
        counts.append(min(count, start + SAMPLES_PER_SHARD) - start)
    words = sum(len(t.split()) for t in texts)
    entry = {"kind": name, "shards": shards, "shard_samples": counts, "index_suffix": INDEX_SUFFIX,
             "num_samples": count, "num_images": images, "num_words": words}
    return entry, texts


def generate_corpus(out_dir: str | Path, seed: int = 0, scale: float = 1.0) -> dict:
    """Generate the demo corpus into ``out_dir`` and return its manifest.

    Args:
        out_dir: Destination folder (created).
        seed: Everything generated is a function of it.
        scale: Multiplies the number of samples per source (documents keep their lengths); at least 2 each.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources, all_texts = {}, []
    for name, size in SOURCE_SIZES.items():
        sources[name], texts = write_source(out, name, max(2, round(size * scale)), seed)
        all_texts += texts
        # A held-out split for evaluation: never drawn by the loader, and not seen by the tokenizer either.
        heldout, _ = write_source(out, name, max(2, round(size * scale * HELDOUT_SHARE)), seed, "heldout")
        sources[name].update(heldout_shards=heldout["shards"], heldout_shard_samples=heldout["shard_samples"],
                             heldout_samples=heldout["num_samples"])
    train_tokenizer(all_texts).save(str(out / "tokenizer.json"))
    manifest = {"version": 1, "seed": seed, "scale": scale, "tokenizer": "tokenizer.json", "sources": sources}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    manifest = generate_corpus(args.out, args.seed, args.scale)
    for name, entry in manifest["sources"].items():
        print(f"{name:<12} {entry['num_samples']:>5} samples {entry['num_images']:>5} images "
              f"{entry['num_words']:>8} words")
    print(f"wrote {args.out}/manifest.json")


if __name__ == "__main__":
    main()
