"""Shared fixtures: one small synthetic corpus per test session (real shards, real BPE tokenizer)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A generated demo corpus (smaller than the default, same format)."""
    from data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("demo_data")
    generate_corpus(root, seed=0, scale=0.3)
    return root


@pytest.fixture(scope="session")
def tokenizer(demo_root):
    from data.loader import read_manifest
    from data.storage import LocalStorage
    from data.tokenizer import TextTokenizer

    return TextTokenizer.from_file(demo_root / read_manifest(LocalStorage(demo_root))["tokenizer"])
