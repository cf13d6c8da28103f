"""Per-source losses of the CoCa stage: the caption and SigLIP objectives per data source, weighted back to the
step's own losses, and equal at dp=2 (forked gloo ranks) to one process on the same global batch."""

from __future__ import annotations

import os

import pytest

from tests.forked import run_ranks
from train.__main__ import main
from train.metrics import read_metrics
from train.steps import CAPTION_LOSS_WEIGHT

STAGE, STEPS, GLOBAL_PAIRS = "vit_coca", 3, 8


def coca_run(out, demo_root, per_rank: int) -> list[str]:
    prefix = f"curriculum.stages.{STAGE}"
    return ["recipe=debug", f"output_dir={out}", "run_name=run", f"data.root={demo_root}", "log.progress_bar=false",
            f"curriculum.order=[{STAGE}]", f"{prefix}.init_from.decoder=scratch", f"{prefix}.steps={STEPS}",
            f"{prefix}.micro_batch_size={per_rank}", f"{prefix}.grad_accum_steps=2", f"{prefix}.checkpoint_interval=0",
            "optim.muon_ns_dtype=float32"]


def _rank(rank: int, world: int, args: list[str]) -> list[dict]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    assert main(args) == 0
    return read_metrics(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")) + f"/run/{STAGE}"
                        "/metrics.jsonl")


def per_source(record: dict) -> dict:
    return {k: v for k, v in record.items() if "/" in k and k.split("/")[0] in
            ("loss", "caption_loss", "siglip_loss", "loss_tokens", "images")}


def test_coca_per_source_losses_weigh_back_to_the_step_and_equal_one_process(demo_root, tmp_path):
    one = run_ranks(_rank, 1, coca_run(tmp_path / "one", demo_root, GLOBAL_PAIRS), timeout=600)[0]
    two = run_ranks(_rank, 2, coca_run(tmp_path / "two", demo_root, GLOBAL_PAIRS // 2), timeout=600)[0]
    assert len(one) == len(two) == STEPS
    seen = set()
    for record in one:
        sources = [k.split("/", 1)[1] for k in record if k.startswith("images/") and record[k] > 0]
        seen.update(sources)
        images = {s: record[f"images/{s}"] for s in sources}
        tokens = {s: record[f"loss_tokens/{s}"] for s in sources}
        assert sum(images.values()) == 2 * GLOBAL_PAIRS  # every pair of both micro-batches, once
        siglip = sum(record[f"siglip_loss/{s}"] * images[s] for s in sources) / sum(images.values())
        caption = sum(record[f"caption_loss/{s}"] * tokens[s] for s in sources) / sum(tokens.values())
        assert siglip == pytest.approx(record["siglip_loss"], rel=1e-6)
        assert caption == pytest.approx(record["caption_loss"], rel=1e-6)
        for s in sources:
            assert record[f"loss/{s}"] == pytest.approx(
                record[f"siglip_loss/{s}"] + CAPTION_LOSS_WEIGHT * record[f"caption_loss/{s}"], rel=1e-6)
    assert len(seen) >= 2
    for got, want in zip(two, one, strict=True):  # the same pairs, every rank's texts as negatives
        assert per_source(got).keys() == per_source(want).keys()
        for key, value in per_source(want).items():
            assert per_source(got)[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
