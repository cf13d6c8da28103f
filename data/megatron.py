"""Megatron indexed datasets (``.bin`` + ``.idx``) as text sources of the mixture, read with megatron-core.

Many teams hold their text corpora the way Megatron-LM's preprocessing writes them (Moonlight's text data came that
way): a ``.idx`` index of document and sequence boundaries and a ``.bin`` of token ids, written by
``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``. Such a corpus joins the mixture as a manifest
source::

    "text": {"format": "megatron", "prefix": "text/corpus", "documents": 1000000, "vocab_size": 163840}

``prefix`` is relative to the data root (local, ``file://`` or ``s3://``). Locally the ``.bin`` is memory-mapped;
on S3 the ``.idx`` is read once into a local file and each document is one ranged read of the ``.bin`` through the
run's storage (its retries, rate limit and cache). Reading is megatron-core's ``IndexedDataset``; only the byte
source differs.

A source is addressed by position like the tar sources (position = document index), so the loader's guarantees
hold unchanged: the stream is a pure function of ``(seed, stage, draw index)``, resumes from counters, and does not
depend on the data-parallel size. A document renders to ``<bos> ids <eos>`` (no second ``<eos>`` when Megatron's
``--append-eod`` already ended it), every id a target except ``<bos>``.

Token ids are the tokenizer's: the manifest's ``vocab_size`` must equal the tokenizer's, and a document holding an id
outside the vocabulary stops the run naming the source, document and id.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from config.schema import ConfigError
from data.samples import Document, SampleError
from data.shards import is_megatron
from data.tokenizer import TextTokenizer

__all__ = ["MegatronSource", "VocabularyError", "import_indexed_dataset", "is_megatron", "read_with_token_sources"]

# Documents whose ids are checked against the vocabulary when the source opens (all of them below this count).
OPEN_CHECK_DOCUMENTS = 4096


class VocabularyError(ConfigError):
    """A Megatron corpus whose token ids do not fit the run's tokenizer (``python -m train``: one line, exit 2)."""


def import_indexed_dataset():
    """megatron-core's ``indexed_dataset`` module, imported without its warnings about Transformer Engine and Apex
    (absent on CPU; the datasets package does not use them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
        warnings.filterwarnings("ignore", message=".*Apex.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _storage_dataset(storage, prefix: str, cache_dir: str):
    """An ``IndexedDataset`` whose ``.bin`` bytes come from ``storage.read_range`` (S3 and other remote roots)."""
    mod = import_indexed_dataset()

    class StorageBinReader(mod._BinReader):
        def read(self, dtype, count: int, offset: int) -> np.ndarray:
            data = storage.read_range(f"{prefix}.bin", offset, count * np.dtype(dtype).itemsize)
            return np.frombuffer(data, dtype=dtype, count=count)

    class StorageIndexedDataset(mod.IndexedDataset):
        def initialize(self, path_prefix, multimodal, mmap, object_storage_config, fast_cache_load=False,
                       sequences_per_dataset=None, dtype_code=None):
            self.path_prefix, self.multimodal, self.mmap = path_prefix, multimodal, False
            self.object_storage_config, self.fast_cache_load = None, False
            self.sequences_per_dataset, self.dtype_code = None, None
            self.bin_reader = StorageBinReader()
            self.index = mod._IndexReader(_cached_index(storage, prefix, cache_dir), multimodal)

    return StorageIndexedDataset(f"{storage.url}/{prefix}", mmap=False)


def _cached_index(storage, prefix: str, cache_dir: str) -> str:
    """The ``.idx`` in a local file (megatron-core memory-maps it), fetched once per node and content-addressed."""
    directory = Path(cache_dir or tempfile.gettempdir()) / "megatron-idx"
    directory.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(f"{storage.url}/{prefix}".encode()).hexdigest()[:24] + ".idx"
    path = directory / name
    size = storage.size(f"{prefix}.idx")
    if not path.exists() or path.stat().st_size != size:
        staging = directory / f"{name}.{os.getpid()}.tmp"
        staging.write_bytes(storage.read(f"{prefix}.idx"))
        staging.replace(path)
    return str(path)


class MegatronSource:
    """A Megatron indexed dataset as a source of the mixture: document ``position`` of the corpus.

    Args:
        name: Source name.
        storage: The data root.
        entry: Its manifest entry (``prefix``, optional ``documents`` and ``vocab_size``).
        vocab_size: The run tokenizer's vocabulary size.
        cache_dir: Where an S3 corpus's ``.idx`` is kept ("" : the system's temporary directory).
    """

    token_source = True

    def __init__(self, name: str, storage, entry: dict[str, Any], vocab_size: int, cache_dir: str = ""):
        self.name, self.storage, self.prefix = name, storage, str(entry["prefix"])
        self.vocab_size, self.cache_dir = vocab_size, cache_dir
        self.missing_shards: list[str] = []
        declared = entry.get("vocab_size")
        if declared is not None and int(declared) != vocab_size:
            raise VocabularyError(f"source '{name}' ({self.url}) was tokenized with a vocabulary of {declared} ids; "
                                  f"the run's tokenizer has {vocab_size}: use the tokenizer the corpus was made with")
        for suffix in (".idx", ".bin"):
            if not storage.exists(self.prefix + suffix):
                raise FileNotFoundError(f"source '{name}': {self.url}{suffix} does not exist")
        self._dataset = None
        size = len(self.dataset)
        if entry.get("documents") is not None and int(entry["documents"]) != size:
            raise VocabularyError(f"source '{name}': the manifest says {entry['documents']} documents, "
                                  f"{self.url}.idx holds {size}")
        self._check_ids(range(min(size, OPEN_CHECK_DOCUMENTS)))

    @property
    def url(self) -> str:
        return f"{self.storage.url}/{self.prefix}"

    @property
    def dataset(self):
        """megatron-core's ``IndexedDataset`` (opened on first use, in each process that reads)."""
        if self._dataset is None:
            root = getattr(self.storage, "root", None)
            if root is not None and Path(root, self.prefix + ".bin").exists():
                self._dataset = import_indexed_dataset().IndexedDataset(str(Path(root) / self.prefix), mmap=True)
            else:
                self._dataset = _storage_dataset(self.storage, self.prefix, self.cache_dir)
        return self._dataset

    def __getstate__(self) -> dict[str, Any]:  # worker processes open their own
        return {**self.__dict__, "_dataset": None}

    def __len__(self) -> int:
        return len(self.dataset)

    def locate(self, position: int) -> str:
        return f"{self.url}:document {position}"

    def unindexed_shards(self, positions) -> list[int]:
        return []  # the .idx is the index, read when the source opens

    def load_index(self, shard: int) -> None:
        return None

    def _check_ids(self, documents) -> None:
        for position in documents:
            self.ids(position)

    def ids(self, position: int) -> np.ndarray:
        """The token ids of sequence ``position`` as megatron-core reads them (``IndexedDataset[position]``): a
        document of a corpus written one sequence per document, as Megatron-LM's preprocessing does without
        ``--split-sentences``."""
        if not 0 <= position < len(self):
            raise SampleError(f"document {position} outside {self.url} ({len(self)} documents)")
        ids = self.dataset[position]
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())
            raise VocabularyError(f"source '{self.name}': document {position} of {self.url} holds token id {bad}, "
                                  f"outside the tokenizer's {self.vocab_size} ids")
        return ids

    def document(self, position: int, tokenizer: TextTokenizer, max_tokens: int) -> Document:
        """Document ``position`` rendered for the language-model objective, at most ``max_tokens`` long."""
        ids = self.ids(position).tolist()
        if not ids:
            raise SampleError(f"document {position} of {self.url} is empty")
        tokens = [tokenizer.bos_id, *ids] + ([] if ids[-1] == tokenizer.eos_id else [tokenizer.eos_id])
        tokens = tokens[:max_tokens] if max_tokens else tokens
        return Document(tokens, [False] + [True] * (len(tokens) - 1))


def read_with_token_sources(reader, keys: list[tuple[str, int, int, int]], patch_buffer=None) -> list:
    """``SampleReader.read_many`` over keys some of which draw from Megatron sources: those render straight from
    their token ids, the others go through the reader's own steps; outcomes in the order of ``keys``."""
    outcomes: list = [None] * len(keys)
    others = []
    for index, key in enumerate(keys):
        source = reader.sources[key[0]]
        if getattr(source, "token_source", False):
            try:
                if reader.image_text:
                    raise SampleError(f"source '{key[0]}' holds text only (no image for the image-text objective)")
                outcomes[index] = source.document(key[1], reader.tokenizer, reader.max_tokens)
            except SampleError as error:
                outcomes[index] = error
        else:
            others.append(index)
    if others:
        for index, outcome in zip(others, reader.read_many([keys[i] for i in others], patch_buffer), strict=True):
            outcomes[index] = outcome
    return outcomes


# --- writing ----------------------------------------------------------------------------------------------------------


def _texts(input_path: Path):
    """Texts of a JSONL file: ``{"text": ...}`` per line (Megatron-LM's ``--json-keys text``) or a sample of
    :mod:`data.samples` whose text segments are joined."""
    import json

    with input_path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            text = record.get("text")
            if not isinstance(text, str):
                text = "\n".join(s["text"] for s in record.get("segments", []) if isinstance(s.get("text"), str))
            if not text:
                raise ValueError(f"{input_path}:{number}: no 'text' (nor text segments)")
            yield text


def write_indexed_dataset(documents, prefix: str | Path, vocab_size: int) -> int:
    """Write token-id documents with megatron-core's ``IndexedDatasetBuilder`` (one sequence per document, the
    smallest dtype that holds the vocabulary, as Megatron-LM's preprocessing picks); returns the count."""
    mod = import_indexed_dataset()
    dtype = mod.DType.optimal_dtype(vocab_size)
    builder = mod.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    count = 0
    for ids in documents:
        builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])  # converted with numpy.array
        count += 1
    builder.finalize(f"{prefix}.idx")
    return count


def prepare_megatron(input_path: str | Path, out: str, source: str, tokenizer: str = "",
                     s3_options=None) -> dict[str, Any]:
    """``python -m data.prepare --format megatron``: tokenize a JSONL of texts into a Megatron indexed dataset at
    ``<out>/<source>/corpus.{bin,idx}`` and add the source to ``<out>/manifest.json``; returns the entry.

    Token ids are the format, so the tokenizer must exist first: ``tokenizer`` (a tokenizer.json), else the
    output's (``python -m data.tokenizer train ROOT``). None is trained here: a tokenizer never depends on which
    source was prepared first.

    Raises:
        ValueError: Neither exists.
    """
    import json

    from storage import open_storage

    storage = open_storage(out, s3_options) if s3_options is not None else open_storage(out)
    texts = list(_texts(Path(input_path)))
    if tokenizer:
        tok = TextTokenizer.from_file(tokenizer)
    elif storage.exists("tokenizer.json"):
        tok = TextTokenizer.from_bytes(storage.read("tokenizer.json"))
    else:
        raise ValueError(f"a Megatron corpus holds token ids, so it needs a tokenizer: pass --tokenizer FILE, or "
                         f"prepare a text source into {out} and train one there first (python -m data.tokenizer "
                         f"train {out})")
    if not storage.exists("tokenizer.json"):
        storage.write("tokenizer.json", tok.tokenizer.to_str().encode("utf-8"))
    prefix = f"{source}/corpus"
    with tempfile.TemporaryDirectory() as staging:
        local = Path(staging) / "corpus"
        count = write_indexed_dataset((tok.encode(t) for t in texts), local, tok.vocab_size)
        for suffix in (".bin", ".idx"):
            storage.write(prefix + suffix, (local.parent / f"corpus{suffix}").read_bytes())
    tokens = sum(len(t) for t in map(tok.encode, texts))
    entry = {"format": "megatron", "prefix": prefix, "documents": count, "vocab_size": tok.vocab_size,
             "text_tokens": tokens}
    manifest = json.loads(storage.read("manifest.json")) if storage.exists("manifest.json") else {"version": 1}
    manifest.setdefault("sources", {})[source] = entry
    manifest["tokenizer"] = "tokenizer.json"
    storage.write("manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return entry
