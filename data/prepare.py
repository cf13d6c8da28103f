"""Build webdataset shards and their manifest entry from your own data, locally or on S3.

``python -m data.prepare --input PATH --source NAME --out DIR|s3://bucket/prefix [--workers N]
[--max-image-side N] [--heldout-fraction F] [--endpoint-url URL]``

``PATH`` is a JSONL file, a webdataset tar (img2dataset's output: ``<key>.jpg`` + ``<key>.txt``/``<key>.json``), or
a folder of either or of unpacked ``<key>.<ext>`` files; records are plain (``{"text"}``, ``{"image", "text"}``,
``{"images", "text"}``) or full samples (see :mod:`data.prepare_inputs`).

Records stream through ``--workers`` processes, which check every sample as the loader would read it (JSON, fields,
images decodable and under the pixel limit, boxes, points and actions on their image) and count its words,
tokens and near-blank images; shards are written as they fill, so memory does not grow with the corpus. Shards go
to ``<out>/<source>/shard-NNNNNN.tar`` (a share ``--heldout-fraction`` of the samples, by a hash of their key, to
``heldout-NNNNNN.tar``, which the loader never reads), each with its sidecar index ``.tar.idx.json``;
``<out>/manifest.json`` gets (or replaces) the source's entry. ``--max-image-side N`` stores larger images
downscaled to N pixels on their long side (samples with pixel coordinates, grounding or agent steps, keep theirs).

The run ends with a table: accepted, held out, rejected by reason with counts and the first records of each (line
numbers or keys; missing files by path). Exit status 1 when nothing was valid (after the table), 2 for bad
arguments. Tokens are counted with ``--tokenizer`` or the root's ``tokenizer.json``; without either they are
counted later by ``python -m data.tokenizer train ROOT`` (prepare never trains one).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data.images import RESIZE_REDUCING_GAP, WHITE, EncodedPng, background_rgb, is_near_blank, load_rgb
from data.prepare_inputs import Record, Rejected, read_records, to_members
from data.samples import RawSample, SampleError, load_meta, open_images
from data.shards import INDEX_SUFFIX, index_bytes
from data.synthetic import sample_texts
from data.tokenizer import TextTokenizer, tokenizer_id
from storage import S3Options, Storage, open_storage

# Records per task sent to a worker (spreads the per-task cost; a few decodes of large images each, so the last
# tasks do not leave a worker idle for long), and tasks in flight per worker: the bound on what the reader runs
# ahead of the writer.
RECORDS_PER_TASK = 8
TASKS_PER_WORKER = 4
# Records named per rejection reason in the table.
EXAMPLES_PER_REASON = 3
JPEG_QUALITY = 95


@dataclass
class Checked:
    """An accepted sample: its members as stored, and what the manifest counts of it."""

    key: str
    members: dict[str, bytes]
    kind: str
    sizes: list[tuple[int, int]]
    words: int
    tokens: int | None
    near_blank: int
    resized: int


class _Worker:
    """What each worker process keeps: the settings, and the tokenizer to count with (loaded once)."""

    background: tuple[int, int, int] = WHITE
    max_side: int = 0
    tokenizer: TextTokenizer | None = None


def _init_worker(background: tuple[int, int, int], max_side: int, tokenizer: bytes | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _Worker.background, _Worker.max_side = background, max_side
    _Worker.tokenizer = TextTokenizer.from_bytes(tokenizer) if tokenizer else None


def check_records(records: list[Record]) -> list[Checked | tuple[str, str, str]]:
    """Each record checked (:func:`check_sample`), or ``(where, reason, detail)`` if it is rejected."""
    outcomes: list[Checked | tuple[str, str, str]] = []
    for record in records:
        try:
            key, members = to_members(record)
            outcomes.append(check_sample(key, members, _Worker.background, _Worker.max_side, _Worker.tokenizer))
        except Rejected as rejected:
            outcomes.append((record.where, rejected.reason, rejected.detail))
        except SampleError as error:
            outcomes.append((record.where, _reason(str(error)), str(error)))
        except Exception as error:  # noqa: BLE001 (a record no check foresaw: rejected and named, never fatal)
            outcomes.append((record.where, f"unexpected {type(error).__name__}", str(error)[:200]))
    return outcomes


def _reason(message: str) -> str:
    """A sample error's message as a reason shared by its kind: the image member and every number dropped."""
    message = re.sub(r"^image '[^']*': ", "", message)
    return re.sub(r"\d+", "N", message.split(": ", 1)[0])[:60]


def check_sample(key: str, members: dict[str, bytes], background: tuple[int, int, int] = WHITE, max_side: int = 0,
                 tokenizer: TextTokenizer | None = None) -> Checked:
    """Check a sample as the loader reads it, decoding every image (transparency composited onto ``background``);
    images longer than ``max_side`` are stored downscaled. Raises :class:`SampleError` for an invalid sample."""
    raw = RawSample("", "", key, members)
    meta = load_meta(raw)
    opened = open_images(raw, meta, background=background)
    has_coordinates = bool(meta.get("objects")) or meta.get("kind") == "agent"
    sizes, near_blank, resized = [], 0, 0
    for ext, image in opened.items():
        source = image.image.pil() if isinstance(image.image, EncodedPng) else image.image
        # An image with transparency was decoded and composited when opened (it has no format of its own then).
        composited = source.format is None
        try:
            rgb = source if composited else load_rgb(source)[0]
        except Exception as error:  # noqa: BLE001 (data.images.ImageError, and what Pillow raises on bad data)
            raise SampleError(f"image '{ext}': {error}") from None
        near_blank += is_near_blank(rgb)
        if max_side and max(rgb.size) > max_side and not has_coordinates:
            # Stored with its alpha (the loader composites onto the run's background), decoded once otherwise.
            pixels = Image.open(io.BytesIO(members[ext])).convert("RGBA") if composited else rgb
            rgb = downscaled(pixels, max_side)
            members = {**members, ext: encode(rgb, "JPEG" if source.format == "JPEG" else "PNG")}
            resized += 1
        sizes.append(rgb.size)
    texts = sample_texts(meta)
    tokens = sum(len(ids) for ids in tokenizer.encode_many(texts)) if tokenizer is not None and texts else None
    return Checked(key, members, meta.get("kind", "mixed"), sizes, sum(len(t.split()) for t in texts),
                   tokens if tokenizer is not None else None, near_blank, resized)


def downscaled(image: Image.Image, max_side: int) -> Image.Image:
    """A decoded image with its long side at ``max_side`` pixels (aspect kept; Pillow's bicubic with a box
    pre-reduction, as the loader resizes)."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=RESIZE_REDUCING_GAP)


def encode(image: Image.Image, fmt: str) -> bytes:
    """``fmt`` bytes of a decoded image: JPEG at quality 95 (img2dataset's default), else PNG."""
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return out.getvalue()


def is_heldout(key: str, fraction: float) -> bool:
    """Whether a sample belongs to the held-out split: a pure function of its key, so preparing a grown dataset
    again keeps every earlier sample on its side."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") < fraction * 2**64


class ShardWriter:
    """Writes a split's shards as they fill (one shard in memory at a time), each with its sidecar index."""

    def __init__(self, storage: Storage, source: str, split: str, samples_per_shard: int):
        self.storage, self.source, self.split, self.per_shard = storage, source, split, samples_per_shard
        self.shards: list[str] = []
        self.counts: list[int] = []
        self._buffer: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is None:
            self._buffer = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.USTAR_FORMAT)
        for ext, data in sorted(members.items()):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count == self.per_shard:
            self.flush()

    def flush(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        data = self._buffer.getvalue()
        shard = f"{self.source}/{self.split}-{len(self.shards):06d}.tar"
        self.storage.write(shard, data)
        self.storage.write(shard + INDEX_SUFFIX, index_bytes(data))  # the loader starts without reading shards
        self.shards.append(shard)
        self.counts.append(self._count)
        self._buffer, self._tar, self._count = None, None, 0


@dataclass
class Report:
    """What a run accepted, held out and rejected (by reason: count and the first records)."""

    source: str
    out: str
    accepted: int = 0
    heldout: int = 0
    images: int = 0
    near_blank: int = 0
    resized: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def reject(self, where: str, reason: str, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{where} ({detail})" if detail else where)

    def table(self) -> str:
        rows = [f"prepare {self.source} -> {self.out}",
                f"  accepted   {self.accepted:>9}   ({self.images} images, {self.near_blank} near-blank"
                + (f", {self.resized} downscaled" if self.resized else "") + ")",
                f"  held out   {self.heldout:>9}",
                f"  rejected   {sum(self.rejected.values()):>9}"]
        for reason, count in sorted(self.rejected.items(), key=lambda item: -item[1]):
            more = ", ..." if count > len(self.examples[reason]) else ""
            rows.append(f"    {reason}: {count}: {'; '.join(self.examples[reason])}{more}")
        return "\n".join(rows)


class _Stats:
    """Running min, mean and max (the manifest's image statistics), without keeping the values."""

    def __init__(self) -> None:
        self.count, self.total, self.low, self.high = 0, 0, None, None

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {"min": 0, "mean": 0, "max": 0}
        return {"min": self.low, "mean": round(self.total / self.count, 2), "max": self.high}


def _tasks(records: Iterable[Record], window: threading.Semaphore) -> Iterator[list[Record]]:
    """Records in tasks of :data:`RECORDS_PER_TASK`, each waiting for a place in the window: a pool's task feeder
    would otherwise read the whole input ahead."""
    task: list[Record] = []
    for record in records:
        task.append(record)
        if len(task) == RECORDS_PER_TASK:
            window.acquire()
            yield task
            task = []
    if task:
        window.acquire()
        yield task


def _checked(records: Iterable[Record], workers: int, settings: tuple) -> Iterator[Checked | tuple[str, str, str]]:
    """Every record's outcome, in input order, checked in ``workers`` processes (in this one for 1)."""
    if workers <= 1:
        _init_worker(*settings)
        for record in records:
            yield from check_records([record])
        return
    window = threading.Semaphore(workers * TASKS_PER_WORKER)
    methods = multiprocessing.get_all_start_methods()
    # Forked workers start in milliseconds; this process has started no thread a fork could break.
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=settings) as pool:
        for outcomes in pool.imap(check_records, _tasks(records, window)):
            window.release()
            yield from outcomes


def _tokenizer_bytes(storage: Storage, path: str) -> bytes | None:
    if path:
        return Path(path).read_bytes()
    return storage.read("tokenizer.json") if storage.exists("tokenizer.json") else None


def prepare(input_path: str | Path, out: str, source: str, samples_per_shard: int = 1000, tokenizer: str = "",
            options: S3Options | None = None, heldout_fraction: float = 0.0, workers: int = 1,
            max_image_side: int = 0, alpha_background: str = "white") -> tuple[Report, dict | None]:
    """Check, shard and write one source and its manifest entry.

    Args:
        input_path: A JSONL file, a tar, or a folder (see :func:`data.prepare_inputs.read_records`).
        out: Output root: a folder or ``s3://bucket/prefix``.
        source: Source name (the mixture key in recipes).
        samples_per_shard: Samples per tar shard.
        tokenizer: A ``tokenizer.json`` to count tokens with (default: the root's, if it has one).
        options: S3 endpoint and retries.
        heldout_fraction: Share of samples (chosen by a hash of their key) written to ``heldout-NNNNNN.tar``
            shards instead, listed as the entry's ``heldout_shards``: evaluation reads them, the loader never does.
        workers: Processes checking samples.
        max_image_side: Store images longer than this downscaled to it (0: as they are).
        alpha_background: What transparent pixels are composited onto for the near-blank count.

    Returns:
        The report, and the manifest entry written (None when no sample was valid: nothing is written then).
    """
    storage = open_storage(out, options)
    tokenizer_data = _tokenizer_bytes(storage, tokenizer)
    settings = (background_rgb(alpha_background), max_image_side, tokenizer_data)
    report = Report(source, storage.url)
    writers = {split: ShardWriter(storage, source, split, samples_per_shard) for split in ("shard", "heldout")}
    widths, heights, pixels = _Stats(), _Stats(), _Stats()
    kinds, words, tokens = set(), 0, 0
    for outcome in _checked(read_records(Path(input_path), source), workers, settings):
        if not isinstance(outcome, Checked):
            report.reject(*outcome)
            continue
        if is_heldout(outcome.key, heldout_fraction):  # kept out of the statistics too
            writers["heldout"].add(outcome.key, outcome.members)
            report.heldout += 1
            continue
        writers["shard"].add(outcome.key, outcome.members)
        report.accepted += 1
        report.images += len(outcome.sizes)
        report.near_blank += outcome.near_blank
        report.resized += outcome.resized
        for width, height in outcome.sizes:
            widths.add(width)
            heights.add(height)
            pixels.add(width * height)
        kinds.add(outcome.kind)
        words += outcome.words
        tokens += outcome.tokens or 0
    for writer in writers.values():
        writer.flush()
    if not report.accepted:
        return report, None
    entry = {
        "kind": kinds.pop() if len(kinds) == 1 else "mixed", "shards": writers["shard"].shards,
        "shard_samples": writers["shard"].counts, "index_suffix": INDEX_SUFFIX, "num_samples": report.accepted,
        "num_images": report.images, "num_words": words, "num_near_blank": report.near_blank,
        "num_tokens": tokens if tokenizer_data else None,
        # Which tokenizer the counts come from (None: not counted; python -m data.tokenizer train counts them).
        "tokens_tokenizer": tokenizer_id(tokenizer_data) if tokenizer_data else None,
        "num_rejected": sum(report.rejected.values()), "rejected": dict(report.rejected),
        "image_stats": {"width": widths.summary(), "height": heights.summary(), "pixels": pixels.summary()},
    }
    if report.heldout:
        entry.update(heldout_shards=writers["heldout"].shards, heldout_shard_samples=writers["heldout"].counts,
                     heldout_samples=report.heldout)
    manifest = json.loads(storage.read("manifest.json")) if storage.exists("manifest.json") else {"version": 1}
    manifest.setdefault("sources", {})[source] = entry
    if tokenizer and not storage.exists("tokenizer.json"):  # a tokenizer named on purpose becomes the root's
        storage.write("tokenizer.json", tokenizer_data)
        manifest["tokenizer"] = "tokenizer.json"
        manifest["tokenizer_id"] = tokenizer_id(tokenizer_data)
    storage.write("manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return report, entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a .jsonl file, a .tar, or a folder of them or of files")
    parser.add_argument("--out", required=True, help="output root: a folder or s3://bucket/prefix")
    parser.add_argument("--source", required=True, help="source name, as recipes' mixtures refer to it")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="processes checking samples (default: the cores, at most 8)")
    parser.add_argument("--max-image-side", type=int, default=0,
                        help="store images longer than this many pixels downscaled to it (0: keep them)")
    parser.add_argument("--alpha-background", default="white", help="colour transparency is composited onto")
    parser.add_argument("--tokenizer", default="", help="tokenizer.json to count tokens with")
    parser.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (credentials: boto3's chain)")
    parser.add_argument("--region", default="")
    parser.add_argument("--heldout-fraction", type=float, default=0.0,
                        help="share of samples (by a hash of their key) kept out of training for evaluation")
    parser.add_argument("--json", action="store_true", help="also print the manifest entry as JSON")
    parser.add_argument("--format", choices=("webdataset", "megatron"), default="webdataset",
                        help="megatron: a JSONL of texts -> a Megatron indexed dataset (.bin/.idx), data/megatron.py")
    args = parser.parse_args(argv)
    problems = [f"--heldout-fraction {args.heldout_fraction}: allowed is a fraction in [0, 1)"
                if not 0 <= args.heldout_fraction < 1 else "",
                f"--samples-per-shard {args.samples_per_shard}: allowed is >= 1" if args.samples_per_shard < 1 else "",
                f"--workers {args.workers}: allowed is >= 1" if args.workers < 1 else "",
                f"--max-image-side {args.max_image_side}: allowed is 0 or >= 16"
                if 0 < args.max_image_side < 16 or args.max_image_side < 0 else "",
                f"--tokenizer {args.tokenizer}: no such file" if args.tokenizer and not Path(args.tokenizer).is_file()
                else ""]
    try:
        background_rgb(args.alpha_background)
    except ValueError as error:
        problems.append(f"--alpha-background: {error}")
    if not Path(args.input).exists():
        problems.append(f"--input {args.input}: no such file or folder")
    if any(problems):
        print("\n".join(f"error: {p}" for p in problems if p), file=sys.stderr)
        return 2
    if args.format == "megatron":
        from data.megatron import prepare_megatron

        try:
            entry = prepare_megatron(args.input, args.out, args.source, args.tokenizer,
                                     S3Options(endpoint_url=args.endpoint_url, region=args.region))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(json.dumps({"source": args.source, **entry}, sort_keys=True))
        return 0
    report, entry = prepare(args.input, args.out, args.source, args.samples_per_shard, args.tokenizer,
                            S3Options(endpoint_url=args.endpoint_url, region=args.region), args.heldout_fraction,
                            args.workers, args.max_image_side, args.alpha_background)
    if args.json and entry is not None:
        print(json.dumps({"source": args.source, **entry}, sort_keys=True))
    print(report.table())
    if entry is None:
        print(f"error: no valid training sample in {args.input}: nothing written", file=sys.stderr)
        return 1
    if entry["tokens_tokenizer"] is None:
        print(f"note: tokens not counted (no tokenizer yet): python -m data.tokenizer train {args.out}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
