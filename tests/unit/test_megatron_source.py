"""Megatron indexed datasets as text sources (data/megatron.py): a corpus written by megatron-core's own builder feeds
the loader, and the ids packed into rows equal megatron-core's ``IndexedDataset`` reading exactly; the stream is
deterministic, resumes from counters and is the same at any data-parallel size; a vocabulary mismatch fails before
training; ``python -m data.prepare --format megatron`` writes one; S3 roots are read with ranged reads; and a run
trains on it through ``python -m train``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from config import MixtureConfig, load_config
from data.loader import StageLoader
from data.megatron import MegatronSource, VocabularyError, import_indexed_dataset
from data.mixture import epoch_permutation
from storage import LocalStorage
from tests.unit.test_loader import FOREGROUND, VISION, batches_equal

DOCUMENTS = 60
SOURCE = "mtext"


def _documents(tokenizer, count: int = DOCUMENTS, seed: int = 0) -> list[np.ndarray]:
    """Random token-id documents of the tokenizer's ordinary ids (2..300 tokens; every 7th ends with <eos>, as
    Megatron-LM's --append-eod writes them)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        ids = rng.integers(16, tokenizer.vocab_size, int(rng.integers(2, 300)))
        if i % 7 == 0:
            ids[-1] = tokenizer.eos_id
        docs.append(ids)
    return docs


def _root_with_corpus(tmp_path: Path, demo_root: Path, docs: list[np.ndarray], vocab_size: int) -> Path:
    """The demo root plus a Megatron source written by megatron-core's IndexedDatasetBuilder."""
    root = tmp_path / "root"
    shutil.copytree(demo_root, root)
    mod = import_indexed_dataset()
    (root / SOURCE).mkdir()
    prefix = str(root / SOURCE / "corpus")
    builder = mod.IndexedDatasetBuilder(prefix + ".bin", dtype=mod.DType.optimal_dtype(vocab_size))
    for ids in docs:
        builder.add_document(ids, [len(ids)])  # numpy ids: what the builder converts tensors to
    builder.finalize(prefix + ".idx")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["sources"][SOURCE] = {"format": "megatron", "prefix": f"{SOURCE}/corpus", "documents": len(docs),
                                   "vocab_size": vocab_size}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _stage(seq_len: int = 256, rows: int = 1):
    stage = load_config(["recipe=debug"]).curriculum.stages["text_pretrain"]
    stage.seq_len, stage.micro_batch_size = seq_len, rows
    stage.mixture = MixtureConfig(text_sources={SOURCE: 1.0})
    return stage


def _loader(root, tokenizer, rank=0, size=1, rows=1) -> StageLoader:
    return StageLoader("text_pretrain", _stage(rows=rows), FOREGROUND, LocalStorage(root), tokenizer, VISION, 3,
                       (rank, size))


@pytest.fixture
def corpus(tmp_path, demo_root, tokenizer):
    docs = _documents(tokenizer)
    return _root_with_corpus(tmp_path, demo_root, docs, tokenizer.vocab_size), docs


def test_rows_hold_exactly_the_ids_indexed_dataset_reads(corpus, tokenizer):
    root, docs = corpus
    dataset = import_indexed_dataset().IndexedDataset(str(root / SOURCE / "corpus"))
    assert len(dataset) == DOCUMENTS and all(np.array_equal(dataset[i], d) for i, d in enumerate(docs))
    loader = _loader(root, tokenizer)
    stream = []
    for _ in range(12):
        batch = loader.next_packed_batch(0.0)
        ids = batch.input_ids.view(-1)
        stream += ids[ids != tokenizer.pad_id].tolist()
    # The draws of the one slot visit the epoch's order; each renders to <bos> ids <eos> (one <eos> only).
    order = epoch_permutation(3, "text_pretrain", SOURCE, 0, DOCUMENTS)
    expected, k = [], 0
    while len(expected) < len(stream):
        ids = dataset[int(order[k])].tolist()
        expected += [tokenizer.bos_id, *ids] + ([] if ids[-1] == tokenizer.eos_id else [tokenizer.eos_id])
        k += 1
    assert k > 10 and stream == expected[:len(stream)]


def test_resume_and_any_data_parallel_size_give_the_same_stream(corpus, tokenizer):
    root, _ = corpus
    one = _loader(root, tokenizer, rows=4)
    two = [_loader(root, tokenizer, rank=r, size=2, rows=2) for r in range(2)]
    first = [one.next_packed_batch(0.0) for _ in range(3)]
    for step in range(3):
        both = [loader.next_packed_batch(0.0) for loader in two]
        assert torch.equal(torch.cat([b.input_ids for b in both]), first[step].input_ids)
    state = one.state_dict()
    after = [one.next_packed_batch(0.0) for _ in range(3)]
    resumed = _loader(root, tokenizer, rows=4)
    resumed.load_state_dict(state)
    assert all(batches_equal(resumed.next_packed_batch(0.0), want) for want in after)
    assert all(len(v) < 16 for v in state.values())  # a few counters per slot: O(1) resume


def test_vocabulary_mismatch_fails_before_training(tmp_path, demo_root, tokenizer):
    docs = _documents(tokenizer)
    root = _root_with_corpus(tmp_path / "a", demo_root, docs, tokenizer.vocab_size + 1000)
    with pytest.raises(VocabularyError, match=rf"vocabulary of {tokenizer.vocab_size + 1000} ids.*has "
                                              rf"{tokenizer.vocab_size}"):
        _loader(root, tokenizer)
    from train.__main__ import main

    stage = "curriculum.stages.text_pretrain"
    assert main(["recipe=debug", f"output_dir={tmp_path}", f"data.root={root}", "log.progress_bar=false",
                 "log.peak_tflops=1", "curriculum.order=[text_pretrain]", f"{stage}.mixture.text_sources.text=0",
                 f"+{stage}.mixture.text_sources.{SOURCE}=1.0"]) == 2  # one line, before any step
    docs[5][3] = tokenizer.vocab_size + 17  # an id the tokenizer does not have, in a corpus that claims it fits
    root = _root_with_corpus(tmp_path / "b", demo_root, docs, tokenizer.vocab_size + 1000)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["sources"][SOURCE]["vocab_size"] = tokenizer.vocab_size
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VocabularyError, match=rf"document 5 .* token id {tokenizer.vocab_size + 17}"):
        _loader(root, tokenizer)


def test_prepare_format_megatron_writes_a_corpus_the_loader_reads(tmp_path, demo_root, tokenizer):
    from data.prepare import main as prepare_main

    texts = [f"document number {i}: " + "lorem ipsum dolor " * (i % 5 + 1) for i in range(30)]
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    root = tmp_path / "root"
    shutil.copytree(demo_root, root)
    assert prepare_main(["--input", str(jsonl), "--out", str(root), "--source", SOURCE, "--format", "megatron"]) == 0
    entry = json.loads((root / "manifest.json").read_text())["sources"][SOURCE]
    assert entry["documents"] == 30 and entry["vocab_size"] == tokenizer.vocab_size
    dataset = import_indexed_dataset().IndexedDataset(str(root / entry["prefix"]))
    assert [dataset[i].tolist() for i in range(30)] == [tokenizer.encode(t) for t in texts]
    assert _loader(root, tokenizer).next_packed_batch(0.0).num_loss_tokens > 0


def test_s3_root_reads_ranged(corpus, tokenizer, s3_endpoint, tmp_path):
    import boto3

    from storage import S3Options, open_storage

    root, _ = corpus
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="megatron-corpus")
    for path in root.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "megatron-corpus", f"data/{path.relative_to(root)}")
    storage = open_storage("s3://megatron-corpus/data", S3Options(endpoint_url=s3_endpoint))
    entry = json.loads((root / "manifest.json").read_text())["sources"][SOURCE]
    remote = MegatronSource(SOURCE, storage, entry, tokenizer.vocab_size, str(tmp_path / "cache"))
    local = MegatronSource(SOURCE, LocalStorage(root), entry, tokenizer.vocab_size)
    assert len(remote) == len(local) == DOCUMENTS
    assert all(np.array_equal(remote.ids(i), local.ids(i)) for i in range(DOCUMENTS))
    want = [_loader(root, tokenizer).next_packed_batch(0.0) for _ in range(1)]
    got = StageLoader("text_pretrain", _stage(), FOREGROUND, storage, tokenizer, VISION, 3, (0, 1))
    assert batches_equal(got.next_packed_batch(0.0), want[0])


def test_a_run_trains_on_a_megatron_corpus(corpus, tmp_path):
    from train.__main__ import main
    from train.metrics import read_metrics

    root, _ = corpus
    stage = "curriculum.stages.text_pretrain"
    assert main(["recipe=debug", f"output_dir={tmp_path}", "run_name=m", f"data.root={root}", "log.progress_bar=false",
                 "log.peak_tflops=1", "curriculum.order=[text_pretrain]", f"{stage}.steps=3", f"{stage}.seq_len=128",
                 f"{stage}.micro_batch_size=2", f"{stage}.mixture.text_sources.text=0",
                 f"+{stage}.mixture.text_sources.{SOURCE}=1.0", f"{stage}.checkpoint_interval=0"]) == 0
    records = read_metrics(tmp_path / "m" / "text_pretrain" / "metrics.jsonl")
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
