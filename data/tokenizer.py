"""A real byte-level BPE tokenizer (the ``tokenizers`` library) with the framework's special tokens."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.shards import is_megatron

# Their order fixes their ids (0..9): changing it invalidates every trained tokenizer.
SPECIAL_TOKENS = (
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|image_start|>",
    "<|image|>",
    "<|image_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|im_start|>",
    "<|im_end|>",
)
_ATTRIBUTES = ("pad_id", "bos_id", "eos_id", "image_start_id", "image_id", "image_end_id", "box_start_id",
               "box_end_id", "im_start_id", "im_end_id")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the special tokens come first, with ids 0..9."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


class TextTokenizer:
    """Encoding and decoding plus the ids of the special tokens the loader and the model rely on."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        for token, attribute in zip(SPECIAL_TOKENS, _ATTRIBUTES):
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"the tokenizer has no special token {token}: train it with data.tokenizer")
            setattr(self, attribute, token_id)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        if not Path(path).exists():
            raise FileNotFoundError(f"no tokenizer at {path}")
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_bytes(cls, data: bytes) -> TextTokenizer:
        """A tokenizer from the contents of a ``tokenizer.json`` (e.g. read from object storage)."""
        return cls(Tokenizer.from_str(data.decode("utf-8")))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special token is added (special-token strings in the text are recognized)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of each text, in one call into the tokenizer (without offsets: ~15% less per caption).
        Runs on the library's thread pool unless ``TOKENIZERS_PARALLELISM=false`` (loader workers set it: they are
        the parallelism); a single text is encoded as by :meth:`encode`, starting no pool."""
        if len(texts) == 1:
            return [self.encode(texts[0])]
        return [encoding.ids for encoding in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


# ----- python -m data.tokenizer train ROOT --------------------------------------------------------------------------

USAGE = "python -m data.tokenizer train ROOT [--vocab-size N] [--samples-per-source N] [--recount] [--endpoint-url URL]"


def source_texts(storage, entry: dict, limit: int) -> tuple[list[str], int]:
    """The texts of the first ``limit`` samples of a source's training shards (read in order), and how many samples
    that was."""
    import json

    from data.samples import RawSample, SampleError, load_meta
    from data.shards import shard_members
    from data.synthetic import sample_texts

    texts, samples = [], 0
    for shard in entry["shards"]:
        data = storage.read(shard)
        for key, members in shard_members(data):
            if samples >= limit:
                return texts, samples
            raw = RawSample("", shard, key, {ext: data[start:start + size] for ext, (start, size) in members.items()
                                             if ext == "json"})
            try:
                texts += sample_texts(load_meta(_without_images(raw)))
            except (SampleError, json.JSONDecodeError, KeyError, TypeError):
                continue  # counted as rejected when it was prepared; nothing to learn from here
            samples += 1
    return texts, samples


def _without_images(raw):
    """A sample whose image members are not read: their names are all the checks need."""
    import json

    meta = json.loads(raw.members["json"].decode("utf-8"))
    names = {s["image"] for s in meta.get("segments", []) if isinstance(s, dict) and "image" in s}
    names |= {f["image"] for f in meta.get("frames", []) if isinstance(f, dict) and "image" in f}
    names |= {s["image"] for s in meta.get("steps", []) if isinstance(s, dict) and "image" in s}
    raw.members.update({name: b"" for name in names if isinstance(name, str)})
    return raw


def train_root_tokenizer(storage, vocab_size: int = 4096, samples_per_source: int = 20000,
                         recount: bool = False) -> dict:
    """Train a byte-level BPE on up to ``samples_per_source`` samples of every source of a root (each source gets
    the same say whatever order it was prepared in), write it as the root's ``tokenizer.json`` and record it in the
    manifest (``tokenizer_id``, ``tokenizer_trained_on``). With ``recount``, every source's text tokens are counted
    again with it (reading every shard); otherwise each keeps the counts of the tokenizer it names
    (``tokens_tokenizer``). Returns the manifest."""
    import json

    from data.prepare import tokenizer_id

    manifest = json.loads(storage.read("manifest.json"))
    texts, trained_on = [], {}
    # A Megatron corpus holds ids of the tokenizer it was made with, no texts to train on.
    text_sources = {name: entry for name, entry in manifest["sources"].items() if not is_megatron(entry)}
    for name, entry in sorted(text_sources.items()):
        source, count = source_texts(storage, entry, samples_per_source)
        texts += source
        trained_on[name] = count
    if not texts:
        raise ValueError(f"no text in the sources of {storage.url}: nothing to train a tokenizer on")
    data = train_tokenizer(texts, vocab_size).to_str().encode("utf-8")
    storage.write("tokenizer.json", data)
    manifest.update(tokenizer="tokenizer.json", tokenizer_id=tokenizer_id(data), tokenizer_trained_on=trained_on)
    if recount:
        tokenizer = TextTokenizer.from_bytes(data)
        for entry in text_sources.values():
            source, _ = source_texts(storage, entry, entry.get("num_samples", 0) or 2**62)
            entry["num_tokens"] = sum(len(ids) for ids in tokenizer.encode_many(source)) if source else 0
            entry["tokens_tokenizer"] = manifest["tokenizer_id"]
    storage.write("manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from data.storage import S3Options, open_storage

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
    raise SystemExit(main())
