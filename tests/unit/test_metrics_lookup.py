"""Finding one step's line in a metrics file by bisection (train.inspect and train.replay of step 1,000,000 must not
read a million lines): equal to a full read, for files with gaps (steps skipped by spike recovery), lines of
different lengths and a last line cut short by a crash."""

from __future__ import annotations

import json
import random

from train.metrics import last_metrics_step, metrics_record, read_metrics


def test_bisection_finds_exactly_the_lines_a_full_read_finds(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for trial in range(200):
        rng = random.Random(trial)
        steps = sorted(rng.sample(range(1, 120), rng.randint(0, 30)))
        text = "".join(json.dumps({"step": s, "loss": rng.random(), "pad": "x" * rng.randint(0, 80)}) + "\n"
                       for s in steps)
        if steps and rng.random() < 0.3:
            text += '{"step": 119, "lo'  # a crash cut the last line short
        path.write_text(text)
        full = {r["step"]: r for r in read_metrics(path)}
        for step in range(0, 122):
            assert metrics_record(path, step) == full.get(step), (trial, step)
        assert last_metrics_step(path) == max(full, default=0)
    assert metrics_record(tmp_path / "missing.jsonl", 1) is None and last_metrics_step(tmp_path / "missing") == 0


def test_a_lookup_reads_a_few_lines_of_a_long_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 200_001)))
    parsed = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda text, *a, **k: parsed.append(1) or real(text, *a, **k))
    assert metrics_record(path, 123_456)["step"] == 123_456 and last_metrics_step(path) == 200_000
    assert len(parsed) < 100  # log2 of 200,000 lines per lookup, and the last block's lines
