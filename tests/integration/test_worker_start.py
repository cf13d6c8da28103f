"""Loader workers never hang at start: a script without a main guard, whose workers die before reading a payload
larger than a pipe's buffer, fails within seconds with a WorkerError naming the cause; with the guard it reads."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.tokenizer import TextTokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from data.loader import StageLoader
from data.tokenizer import TextTokenizer
from model.registry import FLAVORS
from config import DataConfig, load_config
from storage import open_storage

def read_a_batch():
    tokenizer = TextTokenizer.from_file({tokenizer!r})
    stage = load_config(["recipe=debug"]).curriculum.stages["vit_coca"]
    loader = StageLoader("vit_coca", stage, DataConfig(prefetch_samples=2, loader_workers=2),
                         open_storage({root!r}), tokenizer, FLAVORS["debug"].vision, 0, (0, 1))
    batch = loader.next_image_text_batch(0.0)
    loader.close()
    print("read", len(batch.image_grid_hw), "images")
"""


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory) -> Path:
    """A real BPE whose pickled reader payload is well over a pipe's 64 KiB."""
    words = [f"w{i}x{i * 7 % 13}" for i in range(6000)]
    tokenizer = train_tokenizer([" ".join(words[i:i + 40]) for i in range(0, 6000, 3)], vocab_size=6000)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    assert len(pickle.dumps(TextTokenizer.from_file(path))) > 2 * 65536
    return path


@pytest.mark.parametrize("guarded", [False, True])
def test_workers_fail_fast_without_a_main_guard_and_read_with_one(demo_root, big_tokenizer, tmp_path, guarded):
    body = SCRIPT.format(repo=str(REPO), tokenizer=str(big_tokenizer), root=str(demo_root))
    body += "\nif __name__ == '__main__':\n    read_a_batch()\n" if guarded else "\nread_a_batch()\n"
    script = tmp_path / "script.py"
    script.write_text(body)
    began = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - began
    if guarded:
        assert done.returncode == 0, done.stderr[-2000:]
        assert "read 16 images" in done.stdout
        return
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()
    # The parent's error comes last (its worker's own, printed by the worker, comes before it).
    error = [line for line in last if line.startswith("data.workers.WorkerError")][-1]
    assert "before it started" in error and "has no `if __name__ == \"__main__\":` guard" in error
    assert str(script) in error
    assert elapsed < 90, elapsed  # seconds: spawning, importing torch, failing; never the old endless wait
