"""Summarize a data root's manifest: ``python -m data.stats ROOT [--endpoint-url URL] [--check] [--json]``.

One row per source (kind, shards, samples, images, near-blank images, rejected records, text tokens, mean image
size) and the totals; token counts made with another tokenizer than the root's are marked ``*``. ``--check`` also
asks the storage for every file the manifest lists (training shards, their sidecar indexes, held-out shards and
theirs, the tokenizer) and reports the missing ones (exit status 1 if any).
"""

from __future__ import annotations

import argparse
import json
import sys

from data.shards import is_megatron, source_files
from storage import S3Options, Storage, open_storage

COLUMNS = ("source", "kind", "shards", "samples", "images", "near-blank", "rejected", "tokens", "mean image")


def summarize(storage: Storage, check: bool = False) -> dict:
    """Per-source figures and totals of ``storage``'s manifest (``missing``: shards not found, with ``check``)."""
    manifest = json.loads(storage.read("manifest.json"))
    current = manifest.get("tokenizer_id")
    rows = []
    for name, entry in sorted(manifest["sources"].items()):
        stats = entry.get("image_stats", {})
        counted_with = entry.get("tokens_tokenizer")
        rows.append({
            "source": name, "kind": entry.get("kind", "megatron" if is_megatron(entry) else ""),
            "shards": len(source_files(entry)),
            "samples": entry.get("num_samples", 0), "images": entry.get("num_images", 0),
            "near_blank": entry.get("num_near_blank"), "rejected": entry.get("num_rejected", entry.get("num_skipped")),
            "rejected_reasons": entry.get("rejected", {}), "heldout": entry.get("heldout_samples", 0),
            "tokens": entry.get("num_tokens"), "words": entry.get("num_words", 0),
            # Counted with a tokenizer the root no longer uses (train.tokenizer train --recount counts again).
            "tokens_stale": counted_with is not None and current is not None and counted_with != current,
            "mean_width": stats.get("width", {}).get("mean"), "mean_height": stats.get("height", {}).get("mean"),
            "missing": _missing(storage, entry) if check else [],
        })
    totals = {key: sum(row[key] or 0 for row in rows)
              for key in ("shards", "samples", "images", "near_blank", "rejected", "heldout", "tokens", "words")}
    missing_tokenizer = check and not storage.exists(manifest.get("tokenizer") or "tokenizer.json")
    totals["missing"] = sum(len(row["missing"]) for row in rows) + missing_tokenizer
    return {"root": storage.url, "tokenizer": manifest.get("tokenizer"), "tokenizer_id": current,
            "missing_tokenizer": missing_tokenizer, "sources": rows, "totals": totals}


def _missing(storage: Storage, entry: dict) -> list[str]:
    """Every file of a source's entry that storage does not have: shards and held-out shards, and their indexes."""
    suffix = entry.get("index_suffix", "")
    shards = source_files(entry) + list(entry.get("heldout_shards", []))
    files = shards + ([shard + suffix for shard in shards] if suffix else [])
    present = set(storage.list(_common_folder(files))) if files else set()
    return [name for name in files if name not in present]


def _common_folder(names: list[str]) -> str:
    """The longest folder prefix (ending in ``/``) of every name: one listing instead of a request per file."""
    prefix = names[0].rsplit("/", 1)[0] + "/" if "/" in names[0] else ""
    while prefix and not all(name.startswith(prefix) for name in names):
        prefix = prefix[:-1].rsplit("/", 1)[0] + "/" if "/" in prefix[:-1] else ""
    return prefix


def _table(summary: dict) -> str:
    def cells(row: dict) -> list[str]:
        size = f"{row['mean_width']:.0f}x{row['mean_height']:.0f}" if row.get("mean_width") else "-"
        tokens = "-" if row.get("tokens") is None else str(row["tokens"]) + ("*" if row.get("tokens_stale") else "")
        return [row["source"], row["kind"], str(row["shards"]), str(row["samples"]), str(row["images"]),
                _or_dash(row.get("near_blank")), _or_dash(row.get("rejected")), tokens, size]

    lines = [list(COLUMNS), *map(cells, summary["sources"])]
    total = summary["totals"]
    lines.append(["total", "", str(total["shards"]), str(total["samples"]), str(total["images"]),
                  str(total["near_blank"]), str(total["rejected"]), str(total["tokens"]), ""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = [f"{summary['root']} (tokenizer: {summary['tokenizer']})"]
    text += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    for row in summary["sources"]:
        reasons = ", ".join(f"{reason} {count}" for reason, count in row["rejected_reasons"].items())
        text += [f"rejected in {row['source']}: {reasons}"] if reasons else []
    if any(row["tokens_stale"] for row in summary["sources"]):
        text.append("* counted with an earlier tokenizer: python -m data.tokenizer train ROOT --recount")
    for row in summary["sources"]:
        text += [f"missing: {row['source']}: {name}" for name in row["missing"]]
    if summary.get("missing_tokenizer"):
        text.append(f"missing: tokenizer {summary['tokenizer']}")
    return "\n".join(text)


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a folder or s3://bucket/prefix holding manifest.json")
    parser.add_argument("--endpoint-url", default="")
    parser.add_argument("--region", default="")
    parser.add_argument("--check", action="store_true",
                        help="verify that every shard, index file, held-out shard and the tokenizer exist")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    storage = open_storage(args.root, S3Options(endpoint_url=args.endpoint_url, region=args.region))
    summary = summarize(storage, args.check)
    print(json.dumps(summary, sort_keys=True) if args.json else _table(summary))
    return 1 if summary["totals"]["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
