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
    from data.tokenizer import TextTokenizer
    from storage import LocalStorage

    return TextTokenizer.from_file(demo_root / read_manifest(LocalStorage(demo_root))["tokenizer"])


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP server (moto's) on 127.0.0.1 for the session, with dummy credentials in the environment
    (inherited by forked ranks and subprocesses). Tests create their own buckets."""
    import socket

    from moto.server import ThreadedMotoServer

    monkey = pytest.MonkeyPatch()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkey.setenv(name, value)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    monkey.undo()
