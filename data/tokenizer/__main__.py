"""``python -m data.tokenizer train ROOT [--vocab-size N] [--samples-per-source N] [--recount]``: train the root's
tokenizer on every source of its manifest (data/tokenizer/root.py) and record it there."""

from __future__ import annotations

import argparse
import sys

from data.tokenizer import SPECIAL_TOKENS, TextTokenizer
from data.tokenizer.root import train_root_tokenizer
from storage import S3Options, open_storage

USAGE = "python -m data.tokenizer train ROOT [--vocab-size N] [--samples-per-source N] [--recount] [--endpoint-url URL]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.tokenizer", usage=USAGE,
                                     description="Train the root's tokenizer on every source of its manifest.")
    parser.add_argument("command", choices=["train"])
    parser.add_argument("root", help="a folder or s3://bucket/prefix holding manifest.json")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--samples-per-source", type=int, default=20000)
    parser.add_argument("--recount", action="store_true", help="count every source's tokens with it (reads all)")
    parser.add_argument("--endpoint-url", default="")
    parser.add_argument("--region", default="")
    args = parser.parse_args(argv)
    if args.vocab_size < len(SPECIAL_TOKENS) + 256 or args.samples_per_source < 1:
        print(f"error: --vocab-size must be >= {len(SPECIAL_TOKENS) + 256} (special tokens and bytes), "
              "--samples-per-source >= 1", file=sys.stderr)
        return 2
    storage = open_storage(args.root, S3Options(endpoint_url=args.endpoint_url, region=args.region))
    if not storage.exists("manifest.json"):
        print(f"error: no manifest.json in {storage.url}: prepare a source first (python -m data.prepare)",
              file=sys.stderr)
        return 2
    try:
        manifest = train_root_tokenizer(storage, args.vocab_size, args.samples_per_source, args.recount)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokenizer = TextTokenizer.from_bytes(storage.read("tokenizer.json"))
    trained = ", ".join(f"{name} {count}" for name, count in manifest["tokenizer_trained_on"].items())
    print(f"wrote {storage.url}/tokenizer.json ({tokenizer.vocab_size} tokens, id {manifest['tokenizer_id']}); "
          f"samples per source: {trained}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
