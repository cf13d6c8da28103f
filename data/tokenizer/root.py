"""The root's tokenizer: trained on a sample of every source of a data root's manifest (``python -m data.tokenizer
train ROOT``), so it never depends on the order the sources were prepared in."""

from __future__ import annotations

import json

from data.samples import RawSample, SampleError, load_meta
from data.shards import is_megatron, shard_members
from data.synthetic import sample_texts
from data.tokenizer import TextTokenizer, tokenizer_id, train_tokenizer

__all__ = ["source_texts", "train_root_tokenizer"]


def source_texts(storage, entry: dict, limit: int) -> tuple[list[str], int]:
    """The texts of the first ``limit`` samples of a source's training shards (read in order), and how many samples
    that was."""
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
