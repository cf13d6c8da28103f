"""Build webdataset shards and their manifest from a folder or a JSONL file, locally or on S3.

``python -m data.prepare --input DIR|FILE.jsonl --source NAME --out DIR|s3://bucket/prefix [--endpoint-url URL]``

Input, either:

- a folder in webdataset layout, unpacked: ``<key>.json`` (the sample, see :mod:`data.samples`) next to its
  members ``<key>.<ext>`` (``<key>.0.png``, ...);
- a JSONL file, one sample per line, whose ``images`` maps member names to image files (relative to the JSONL's
  folder), e.g. ``{"kind": "caption", "caption": "...", "segments": [{"image": "0.jpg"}, {"text": "..."}],
  "images": {"0.jpg": "photos/1.jpg"}}``; an optional ``key``, else ``<source>-<line>``.

Every sample is validated as the loader would read it (JSON, fields, images decodable and under the pixel limit,
boxes, points and actions on their image); invalid ones are left out and reported by key. Shards go to
``<out>/<source>/shard-NNNNNN.tar`` (with ``--heldout-fraction F``, a share F of the samples, chosen by a hash of
their key, goes to ``heldout-NNNNNN.tar`` shards for evaluation, which the loader never reads), each with its
sidecar index ``.tar.idx.json`` (member offsets, so the loader starts without reading shards);
``<out>/manifest.json`` gets (or replaces) the source's entry: shards, samples per shard, samples, images, words,
text tokens and image-size statistics, which ``python -m data.stats`` summarizes.
Text tokens are counted with ``<out>/tokenizer.json``, ``--tokenizer``, or a byte-level BPE trained on the text
when neither exists.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from data.samples import RawSample, SampleError, load_images, load_meta
from data.shards import INDEX_SUFFIX, index_bytes
from data.storage import S3Options, Storage, open_storage
from data.synthetic import sample_texts
from data.tokenizer import TextTokenizer, train_tokenizer


def read_folder(folder: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    groups: dict[str, dict[str, Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key, _, ext = path.name.partition(".")
        groups.setdefault(str(path.parent.relative_to(folder) / key), {})[ext] = path
    for key, members in sorted(groups.items()):
        yield key.replace("/", "_"), {ext: path.read_bytes() for ext, path in members.items()}


def read_jsonl(path: Path, source: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            meta = json.loads(line)
            key = str(meta.pop("key", f"{source}-{number:06d}"))
            images = meta.pop("images", {}) or {}
            members = {"json": json.dumps(meta, sort_keys=True).encode("utf-8")}
            for ext, file in images.items():
                image_path = Path(file) if Path(file).is_absolute() else path.parent / file
                members[ext] = image_path.read_bytes() if image_path.exists() else b""
            yield key, members


def check_sample(source: str, key: str, members: dict[str, bytes]) -> tuple[dict, list[tuple[int, int]]]:
    """The sample's metadata and image sizes, as the loader would read them; raises :class:`SampleError`."""
    raw = RawSample(source, "", key, members)
    meta = load_meta(raw)
    # A tiny patch cap: decoding and validation are what matter here, not the patches.
    images = load_images(raw, meta, 14, 2, 4)
    return meta, [patches.size for patches in images.values()]


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0, "max": 0}
    return {"min": min(values), "mean": round(sum(values) / len(values), 2), "max": max(values)}


def _tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _tokenizer(storage: Storage, path: str, texts: list[str]) -> tuple[TextTokenizer, bool]:
    """The tokenizer to count with, and whether it must be written to the output."""
    if path:
        return TextTokenizer.from_file(path), not storage.exists("tokenizer.json")
    if storage.exists("tokenizer.json"):
        return TextTokenizer.from_bytes(storage.read("tokenizer.json")), False
    return TextTokenizer(train_tokenizer(texts)), True


def is_heldout(key: str, fraction: float) -> bool:
    """Whether a sample belongs to the held-out split: a pure function of its key, so preparing a grown dataset
    again keeps every earlier sample on its side."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") < fraction * 2**64


def _write_shards(storage: Storage, source: str, split: str, samples: list[tuple[str, dict[str, bytes]]],
                  samples_per_shard: int) -> tuple[list[str], list[int]]:
    shards, counts = [], []
    for start in range(0, len(samples), samples_per_shard):
        shard = f"{source}/{split}-{len(shards):06d}.tar"
        data = _tar(samples[start:start + samples_per_shard])
        storage.write(shard, data)
        storage.write(shard + INDEX_SUFFIX, index_bytes(data))  # the loader starts without reading shards
        shards.append(shard)
        counts.append(len(samples[start:start + samples_per_shard]))
    return shards, counts


def prepare(input_path: str | Path, out: str, source: str, samples_per_shard: int = 1000, tokenizer: str = "",
            options: S3Options | None = None, heldout_fraction: float = 0.0) -> dict:
    """Validate, shard and write one source and its manifest entry; returns the entry.

    Args:
        input_path: A folder (webdataset layout) or a ``.jsonl`` file.
        out: Output root: a folder or ``s3://bucket/prefix``.
        source: Source name (the mixture key in recipes).
        samples_per_shard: Samples per tar shard.
        tokenizer: A ``tokenizer.json`` to count tokens with (default: the output's, else a new one).
        options: S3 endpoint and retries.
        heldout_fraction: Share of samples (chosen by a hash of their key) written to ``heldout-NNNNNN.tar``
            shards instead, listed as the entry's ``heldout_shards``: evaluation reads them, the loader never does.
    """
    if not 0 <= heldout_fraction < 1:
        raise SystemExit(f"--heldout-fraction {heldout_fraction}: allowed is a fraction in [0, 1)")
    input_path = Path(input_path)
    reader = read_jsonl(input_path, source) if input_path.is_file() else read_folder(input_path)
    kept, heldout, skipped, texts, widths, heights, kinds = [], [], {}, [], [], [], set()
    for key, members in reader:
        try:
            meta, sizes = check_sample(source, key, members)
        except SampleError as error:
            skipped[key] = str(error)
            continue
        if is_heldout(key, heldout_fraction):  # kept out of the statistics and the tokenizer too
            heldout.append((key, members))
            continue
        kept.append((key, members))
        texts += sample_texts(meta)
        widths += [w for w, _ in sizes]
        heights += [h for _, h in sizes]
        kinds.add(meta.get("kind", source))
    if not kept:
        raise SystemExit(f"no valid training sample in {input_path} ({len(skipped)} invalid, {len(heldout)} held "
                         "out)")
    storage = open_storage(out, options)
    tok, write_tokenizer = _tokenizer(storage, tokenizer, texts)
    if write_tokenizer:
        storage.write("tokenizer.json", tok.tokenizer.to_str().encode("utf-8"))
    shards, counts = _write_shards(storage, source, "shard", kept, samples_per_shard)
    entry = {
        "kind": kinds.pop() if len(kinds) == 1 else "mixed", "shards": shards, "shard_samples": counts,
        "index_suffix": INDEX_SUFFIX, "num_samples": len(kept),
        "num_images": len(widths), "num_words": sum(len(t.split()) for t in texts),
        "num_tokens": sum(len(tok.encode(t)) for t in texts), "num_skipped": len(skipped),
        "image_stats": {"width": _stats(widths), "height": _stats(heights),
                        "pixels": _stats([w * h for w, h in zip(widths, heights)])},
    }
    if heldout:
        shards, counts = _write_shards(storage, source, "heldout", heldout, samples_per_shard)
        entry.update(heldout_shards=shards, heldout_shard_samples=counts, heldout_samples=len(heldout))
    manifest = json.loads(storage.read("manifest.json")) if storage.exists("manifest.json") else {"version": 1}
    manifest.setdefault("sources", {})[source] = entry
    manifest["tokenizer"] = "tokenizer.json"
    storage.write("manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    for key, reason in skipped.items():
        print(f"skipped {key}: {reason}", file=sys.stderr)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder (webdataset layout) or a .jsonl file")
    parser.add_argument("--out", required=True, help="output root: a folder or s3://bucket/prefix")
    parser.add_argument("--source", required=True, help="source name, as recipes' mixtures refer to it")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--tokenizer", default="", help="tokenizer.json to count tokens with")
    parser.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (credentials: boto3's chain)")
    parser.add_argument("--region", default="")
    parser.add_argument("--heldout-fraction", type=float, default=0.0,
                        help="share of samples (by a hash of their key) kept out of training for evaluation")
    parser.add_argument("--format", choices=("webdataset", "megatron"), default="webdataset",
                        help="megatron: a JSONL of texts -> a Megatron indexed dataset (.bin/.idx), data/megatron.py")
    args = parser.parse_args(argv)
    options = S3Options(endpoint_url=args.endpoint_url, region=args.region)
    if args.format == "megatron":
        from data.megatron import prepare_megatron

        entry = prepare_megatron(args.input, args.out, args.source, args.tokenizer, options)
        print(json.dumps({"source": args.source, **entry}, sort_keys=True))
        return 0
    entry = prepare(args.input, args.out, args.source, args.samples_per_shard, args.tokenizer, options,
                    args.heldout_fraction)
    print(json.dumps({"source": args.source, **entry}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
