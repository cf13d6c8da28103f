"""``python -m data.prepare`` throughput and memory on captioned clip-art PNGs, against a floor of the same run.

Prints one JSON line:

- ``prepare_samples_per_s``: captioned PNGs of 256-1024 px a side (one in six with a transparent background)
  prepared from plain JSONL with ``--workers 2 --max-image-side 512``, timed inside the process (interpreter start
  excluded), on the 4x corpus (``prepare_1x_samples_per_s``: the 1x corpus, where starting the pool and the last
  tasks weigh more);
- ``decode_floor_samples_per_s``: one thread doing only the pixel work prepare must do for the same images: decode
  each (composited when it has alpha) and, for those over 512 px, downscale and encode it (the mean of three
  measurements: before, between and after the prepare runs, on a machine whose load drifts);
- ``prepare_vs_decode_floor``: the ratio (goal >= 1.4 with 2 processes);
- ``prepare_cores_used``: the CPU time the 4x run's processes got over its wall time (other work on the cores
  shows here);
- ``prepare_peak_rss_ratio``: peak RSS preparing 4x the corpus / 1x (goal <= 1.2), the larger of the main process's
  and a worker's ratios (both reported).

Before anything is timed, the floor is checked to do prepare's pixel work (``benchmarks/_check.py``: one line on
stderr and exit status 1 otherwise): ``prepare`` runs (as timed, in a subprocess) on a few of the images, opaque and
transparent ones over the size limit and some within it, and every image it stored must be, byte for byte, the one
the floor produces (its downscaled PNG) or, within the limit, the original file. The timed runs must prepare every
sample of their corpus.

``python benchmarks/prepare_throughput.py [--images 160] [--workers 2] [--max-image-side 512]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._check import require, require_equal  # noqa: E402
from data.images import composite_alpha, has_alpha  # noqa: E402
from data.prepare import downscaled, encode  # noqa: E402

RUN = """
import json, resource, sys, time
from data.prepare import prepare
def cpu():
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))
began, cpu_began = time.perf_counter(), cpu()
report, entry = prepare(sys.argv[1], sys.argv[2], "bench", samples_per_shard=50, workers=int(sys.argv[3]),
                        max_image_side=int(sys.argv[4]))
seconds = time.perf_counter() - began
print(json.dumps({"samples": report.accepted + report.heldout, "seconds": seconds,
                  "cores": (cpu() - cpu_began) / seconds,
                  "main_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "worker_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def clip_art(rng: random.Random) -> Image.Image:
    """A drawing of flat shapes, 256-1024 px a side; one in six on a transparent background."""
    size = (rng.randint(256, 1024), rng.randint(256, 1024))
    transparent = rng.random() < 1 / 6
    image = Image.new("RGBA" if transparent else "RGB", size,
                      (0, 0, 0, 0) if transparent else tuple(rng.randint(180, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 12)):
        x0, y0 = rng.randint(0, size[0] - 20), rng.randint(0, size[1] - 20)
        box = (x0, y0, rng.randint(x0 + 10, size[0]), rng.randint(y0 + 10, size[1]))
        colour = tuple(rng.randint(0, 255) for _ in range(3)) + ((255,) if transparent else ())
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour, outline=(0, 0, 0))
    return image


def make_corpus(folder: Path, images: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(images):
        path = folder / f"{index:05d}.png"
        clip_art(rng).save(path)
        paths.append(path)
    return paths


def write_jsonl(path: Path, images: list[Path], repeat: int) -> None:
    with path.open("w") as out:
        for copy in range(repeat):
            for index, image in enumerate(images):
                out.write(json.dumps({"image": str(image), "text": f"clip art {index} copy {copy}: shapes"}) + "\n")


def floor_work(path: Path, max_side: int) -> bytes | None:
    """The floor's work on one image: decode (and composite, when it has alpha); over ``max_side``, downscale and
    encode. Returns the encoded bytes, or None for an image kept as it is."""
    image = Image.open(io.BytesIO(path.read_bytes()))
    if has_alpha(image):
        image.load()
        pixels = image.convert("RGBA")
        composite_alpha(pixels)
    else:
        pixels = image.convert("RGB")
    if max(pixels.size) > max_side:
        return encode(downscaled(pixels, max_side), "PNG")
    return None


def decode_floor(paths: list[Path], max_side: int) -> float:
    """Samples per second of one thread decoding every image and downscaling and encoding those over ``max_side``."""
    began = time.perf_counter()
    for path in paths:
        floor_work(path, max_side)
    return len(paths) / (time.perf_counter() - began)


def check_floor(work: Path, paths: list[Path], workers: int, max_side: int, per_kind: int = 2) -> None:
    """Prepare a few images of each kind (transparent or opaque over ``max_side``, within it) and require every
    stored image to be the floor's output byte for byte (see the module docstring)."""
    kinds: dict[tuple[bool, bool], list[int]] = {}
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            kind = (has_alpha(image), max(image.size) > max_side)
        if len(kinds.setdefault(kind, [])) < per_kind:
            kinds[kind].append(index)
    chosen = sorted(i for indices in kinds.values() for i in indices)
    with (work / "check.jsonl").open("w") as out:
        for index in chosen:
            out.write(json.dumps({"image": str(paths[index]), "text": f"clip art {index} copy 0: shapes"}) + "\n")
    run_prepare(work / "check.jsonl", work / "check", workers, max_side)
    stored = {}
    for shard in sorted((work / "check").rglob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                index = int(re.match(r"clip art (\d+) ", json.loads(data)["caption"]).group(1))
                stored[index] = members[name.removesuffix(".json") + ".0.png"]
    require_equal("samples prepared for the floor check", sorted(stored), chosen)
    for index in chosen:
        expected = floor_work(paths[index], max_side) or paths[index].read_bytes()
        require(f"image {paths[index].name} as prepared vs the floor's", stored[index] == expected,
                f"{len(stored[index])} bytes stored, {len(expected)} from the floor, and they differ")


def run_prepare(jsonl: Path, out: Path, workers: int, max_side: int) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, str(jsonl), str(out), str(workers), str(max_side)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-image-side", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as work:
        work = Path(work)
        paths = make_corpus(work / "images", args.images)
        for repeat in (1, 4):
            write_jsonl(work / f"x{repeat}.jsonl", paths, repeat)
        check_floor(work, paths, args.workers, args.max_image_side)
        decode_floor(paths[:8], args.max_image_side)  # warm the page cache and the code
        floor_before = decode_floor(paths, args.max_image_side)
        one = run_prepare(work / "x1.jsonl", work / "out1", args.workers, args.max_image_side)
        floor_between = decode_floor(paths, args.max_image_side)
        four = run_prepare(work / "x4.jsonl", work / "out4", args.workers, args.max_image_side)
        floor_after = decode_floor(paths, args.max_image_side)
    require_equal("samples prepared (1x, 4x)", (one["samples"], four["samples"]), (args.images, 4 * args.images))
    floors = [floor_before, floor_between, floor_after]
    floor = sum(floors) / 3
    rate = four["samples"] / four["seconds"]
    main_ratio = four["main_rss_kb"] / one["main_rss_kb"]
    worker_ratio = four["worker_rss_kb"] / one["worker_rss_kb"]
    print(json.dumps({
        "images": args.images, "workers": args.workers, "max_image_side": args.max_image_side,
        "prepare_samples_per_s": round(rate, 1),
        "prepare_1x_samples_per_s": round(one["samples"] / one["seconds"], 1),
        "decode_floor_samples_per_s": round(floor, 1), "decode_floors": [round(f, 1) for f in floors],
        "prepare_vs_decode_floor": round(rate / floor, 3),
        # CPU seconds per second the 4x run got (its processes' user + system time over its wall time): below ~1.8
        # other work held a core, and the ratio says more about the machine than about prepare.
        "prepare_cores_used": round(four["cores"], 2),
        "prepare_peak_rss_ratio": round(max(main_ratio, worker_ratio), 3),
        "main_rss_mb_1x_4x": [round(one["main_rss_kb"] / 1024), round(four["main_rss_kb"] / 1024)],
        "worker_rss_mb_1x_4x": [round(one["worker_rss_kb"] / 1024), round(four["worker_rss_kb"] / 1024)],
    }))


if __name__ == "__main__":
    main()
