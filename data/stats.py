"""Summarize a data root's manifest: ``python -m data.stats ROOT [--endpoint-url URL] [--check] [--json]``.

One row per source (kind, shards, samples, images, text tokens, mean image size) and the totals; ``--check`` also
asks the storage for every shard and reports the missing ones (exit status 1 if any).
"""

from __future__ import annotations

import argparse
import json
import sys

from data.storage import S3Options, Storage, open_storage

COLUMNS = ("source", "kind", "shards", "samples", "images", "tokens", "mean image")


def summarize(storage: Storage, check: bool = False) -> dict:
    """Per-source figures and totals of ``storage``'s manifest (``missing``: shards not found, with ``check``)."""
    manifest = json.loads(storage.read("manifest.json"))
    rows = []
    for name, entry in sorted(manifest["sources"].items()):
        stats = entry.get("image_stats", {})
        rows.append({
            "source": name, "kind": entry.get("kind", ""), "shards": len(entry["shards"]),
            "samples": entry.get("num_samples", 0), "images": entry.get("num_images", 0),
            "tokens": entry.get("num_tokens"), "words": entry.get("num_words", 0),
            "mean_width": stats.get("width", {}).get("mean"), "mean_height": stats.get("height", {}).get("mean"),
            "missing": [s for s in entry["shards"] if not storage.exists(s)] if check else [],
        })
    totals = {key: sum(row[key] or 0 for row in rows) for key in ("shards", "samples", "images", "tokens", "words")}
    totals["missing"] = sum(len(row["missing"]) for row in rows)
    return {"root": storage.url, "tokenizer": manifest.get("tokenizer"), "sources": rows, "totals": totals}


def _table(summary: dict) -> str:
    def cells(row: dict) -> list[str]:
        size = f"{row['mean_width']:.0f}x{row['mean_height']:.0f}" if row.get("mean_width") else "-"
        tokens = "-" if row.get("tokens") is None else str(row["tokens"])
        return [row["source"], row["kind"], str(row["shards"]), str(row["samples"]), str(row["images"]), tokens,
                size]

    lines = [list(COLUMNS), *map(cells, summary["sources"])]
    total = summary["totals"]
    lines.append(["total", "", str(total["shards"]), str(total["samples"]), str(total["images"]),
                  str(total["tokens"]), ""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = [f"{summary['root']} (tokenizer: {summary['tokenizer']})"]
    text += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    for row in summary["sources"]:
        text += [f"missing shard: {row['source']}: {shard}" for shard in row["missing"]]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a folder or s3://bucket/prefix holding manifest.json")
    parser.add_argument("--endpoint-url", default="")
    parser.add_argument("--region", default="")
    parser.add_argument("--check", action="store_true", help="verify that every shard exists")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    storage = open_storage(args.root, S3Options(endpoint_url=args.endpoint_url, region=args.region))
    summary = summarize(storage, args.check)
    print(json.dumps(summary, sort_keys=True) if args.json else _table(summary))
    return 1 if summary["totals"]["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
