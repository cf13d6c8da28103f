"""Forensics on a real run: per-source loss in the metrics, and train.inspect listing exactly the samples each rank
consumed (recorded by a test-only loader hook during the run), before and after a resume, at dp=2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data import loader as loader_module
from tests.forked import run_ranks
from train.__main__ import main
from train.inspect import InspectError, inspect_step
from train.inspect import main as inspect_main
from train.metrics import read_metrics
from train.replay import replay_step

STAGE, NEXT = "joint_pretrain", "joint_cooldown"
STEPS, EXIT_AFTER, ACCUM, PER_RANK, NEXT_STEPS = 6, 3, 2, 2, 3


def stage_run(out: Path, demo_root: Path, steps: int = STEPS, extra: tuple[str, ...] = (),
              per_rank: int = PER_RANK) -> list[str]:
    """The joint_pretrain stage of the debug recipe, a few steps, 2 micro-batches of 2 rows per rank, then a few
    steps of joint_cooldown."""
    prefix = f"curriculum.stages.{STAGE}"
    return ["recipe=debug", f"output_dir={out}", "run_name=run", f"data.root={demo_root}", "log.progress_bar=false",
            f"curriculum.order=[{STAGE},{NEXT}]", f"curriculum.stages.{NEXT}.steps={NEXT_STEPS}",
            f"curriculum.stages.{NEXT}.checkpoint_interval=2", f"{prefix}.init_from=scratch", f"{prefix}.steps={steps}",
            f"{prefix}.checkpoint_interval=2", f"{prefix}.grad_accum_steps={ACCUM}",
            f"{prefix}.micro_batch_size={per_rank}", f"{prefix}.lr.warmup_steps=1", "checkpoint.keep_last=10",
            *extra]


def _train_recording(rank: int, world: int, args: list[str]) -> tuple[int, list]:
    """Train on a forked rank, recording every row and skipped sample its loader handed out (the test hook)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    events = []

    def hook(loader, kind, slot, *event):
        if kind == "row":
            events.append(("row", loader.stage_name, slot, [piece[:4] for piece in event[0].pieces]))
        elif kind == "skip":
            events.append(("skip", loader.stage_name, slot, event[0]))

    loader_module.TEST_OBSERVERS.append(hook)
    return main(args), events


def consumed_by_step(phases: list[tuple[int, list]]) -> dict[int, dict]:
    """``{step: {"rows": {(slot, micro-batch): pieces}, "skipped": {(slot, micro-batch): [draw keys]}}}`` from each
    phase's recorded events (phase = (first step - 1, events of every rank)): a slot's t-th row is micro-batch
    ``t % ACCUM`` of step ``start + t // ACCUM + 1``; skips belong to the row drawn next."""
    steps: dict[int, dict] = {}
    for start, events in phases:
        rows_seen: dict[int, int] = {}
        pending: dict[int, list] = {}
        for kind, stage, slot, payload in events:
            if stage != STAGE:
                continue
            if kind == "skip":
                pending.setdefault(slot, []).append(payload)
                continue
            t = rows_seen.get(slot, 0)
            rows_seen[slot] = t + 1
            entry = steps.setdefault(start + t // ACCUM + 1, {"rows": {}, "skipped": {}})
            entry["rows"][(slot, t % ACCUM)] = payload
            entry["skipped"][(slot, t % ACCUM)] = pending.pop(slot, [])
    return steps


@pytest.fixture(scope="module")
def recorded_run(demo_root, tmp_path_factory):
    """dp=2 on forked gloo ranks: 3 steps, leave (checkpointed), then resume to the end with a loader worker
    process per rank; every rank's loader recorded."""
    out = tmp_path_factory.mktemp("forensics")
    phases = []
    # The resumed half reads in a loader worker process (read-ahead changes timing only, never the stream).
    for start, extra in ((0, (f"exit_after_steps={EXIT_AFTER}",)), (EXIT_AFTER, ("data.loader_workers=1",))):
        results = run_ranks(_train_recording, 2, stage_run(out, demo_root, extra=extra), timeout=600)
        assert [code for code, _ in results] == [0, 0]
        phases.append((start, [event for _, events in results for event in events]))
    return out / "run", consumed_by_step(phases)


def test_per_source_losses_weighted_by_tokens_equal_the_step_loss(recorded_run):
    run_dir, _ = recorded_run
    records = read_metrics(run_dir / STAGE / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    sources_seen = set()
    for record in records:
        sources = [k.split("/", 1)[1] for k in record if k.startswith("loss/")]
        assert sources, record
        sources_seen.update(sources)
        tokens = {s: record[f"loss_tokens/{s}"] for s in sources}
        assert all(n > 0 for n in tokens.values())
        weighted = sum(record[f"loss/{s}"] * tokens[s] for s in sources) / sum(tokens.values())
        assert weighted == pytest.approx(record["lm_loss"], rel=1e-6, abs=0)
    assert "text" in sources_seen and len(sources_seen) >= 3
    assert (run_dir / STAGE / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("step", [1, 3, 4, 6])  # from the start; from a checkpoint; right after the resume; last
def test_inspect_lists_exactly_the_samples_each_rank_consumed(recorded_run, step):
    run_dir, consumed = recorded_run
    result = inspect_step(run_dir, STAGE, step)
    assert result.data_parallel == 2 and result.micro_batches == ACCUM
    assert result.from_checkpoint == {1: 0, 3: 2, 4: 3, 6: 4}[step]  # the nearest checkpoint before the step
    listed = {(row["slot"], row["micro_batch"]): [((s["source"], s["position"], s["draw"]), *s["doc_tokens"],
                                                   s["columns"][0]) for s in row["samples"]]
              for row in result.rows}
    assert {(row["slot"], row["rank"], row["row"]) for row in result.rows} == {
        (slot, slot // PER_RANK, slot % PER_RANK) for slot in range(2 * PER_RANK)}
    assert listed == {key: [(tuple(k[:3]), a, b, c) for k, a, b, c in pieces]
                      for key, pieces in consumed[step]["rows"].items()}
    skipped = {}
    for s in result.skipped:
        skipped.setdefault((s["slot"], s["micro_batch"]), []).append((s["source"], s["position"], s["draw"]))
    assert skipped == {key: [tuple(k[:3]) for k in keys] for key, keys in consumed[step]["skipped"].items() if keys}


def test_inspect_dump_and_bad_requests(recorded_run, tmp_path, capsys):
    run_dir, _ = recorded_run
    assert inspect_main([str(run_dir), "--stage", STAGE, "--step", "5", "--rank", "1", "--dump", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "replayed from checkpoint step 4" in lines[0]
    assert lines[1:] and all(line.startswith("rank 1 ") for line in lines[1:])
    assert (tmp_path / "rows.json").exists() and any(p.suffix == ".json" and "-text-" in p.name
                                                       for p in tmp_path.iterdir())
    for args, message in (([str(run_dir), "--stage", STAGE, "--step", "7"], "steps 1..6"),
                          ([str(run_dir / "nope"), "--stage", STAGE, "--step", "1"], "no config.yaml"),
                          ([str(run_dir), "--stage", "vit_coca", "--step", "1"], "vit_coca")):
        assert inspect_main(args) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(InspectError, match="reached step"):
        unfinished = run_dir.parent / "unfinished"
        inspect_step(_copy_unfinished(run_dir, unfinished), STAGE, 6)


def _copy_unfinished(run_dir: Path, target: Path) -> Path:
    """The run as it was at step 3: its config, its checkpoints up to 3, its first 3 metrics lines."""
    import shutil

    shutil.copytree(run_dir, target, ignore=lambda d, names: [n for n in names if n.startswith("step-0000000")
                                                               and int(n[5:]) > EXIT_AFTER])
    metrics = target / STAGE / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:EXIT_AFTER]))
    return target


def _replay(rank: int, world: int, run_dir: Path, requests: list[tuple[str, int, list[str]]]) -> list[dict]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    return [replay_step(run_dir, name, step, overrides) for name, step, overrides in requests]


def test_replay_is_bit_identical_in_two_stages_and_right_after_a_resume(recorded_run):
    run_dir, _ = recorded_run
    requests = [(STAGE, 4, []),  # the first step after the resume (from the checkpoint taken when leaving)
                (STAGE, 6, []),  # from a periodic checkpoint, one step forward
                (NEXT, 2, []),  # the next stage, from its start weights (the previous stage's final checkpoint)
                (STAGE, 4, ["precision.param_dtype=bfloat16"])]  # another precision: said, and the difference given
    results = run_ranks(_replay, 2, run_dir, requests, timeout=600)[0]
    for result, start in zip(results[:3], (3, 4, 0), strict=True):
        assert result["from_checkpoint"] == start and result["expect_identical"]
        assert result["differences"] == {}, result["differences"]
        assert {"loss", "grad_norm", "lm_loss"} <= set(result["replayed"])
        assert any(k.startswith("loss/") for k in result["replayed"])
    other = results[3]
    assert not other["expect_identical"] and "precision.param_dtype=bfloat16" in other["reasons"][0]
    assert "loss" in other["differences"] and "grad_norm" in other["differences"]


def test_replay_in_one_process_of_a_two_rank_run_says_the_layout_differs(recorded_run):
    run_dir, _ = recorded_run
    result = run_ranks(_replay, 1, run_dir, [(STAGE, 4, [])], timeout=600)[0][0]
    assert not result["expect_identical"] and "world size 1, the run had 2" in result["reasons"][0]


@pytest.fixture(scope="module")
def relaid_run(demo_root, tmp_path_factory):
    """dp=2 for 3 steps (left, checkpointed), then resumed in one process serving both ranks' rows (the same global
    batch, another layout); every loader recorded."""
    out = tmp_path_factory.mktemp("relaid")
    phases = []
    for start, world, extra in ((0, 2, (f"exit_after_steps={EXIT_AFTER}",)), (EXIT_AFTER, 1, ())):
        args = stage_run(out, demo_root, extra=extra, per_rank=2 * PER_RANK // world)
        results = run_ranks(_train_recording, world, args, timeout=600)
        assert [code for code, _ in results] == [0] * world
        phases.append((start, [event for _, events in results for event in events]))
    return out / "run", consumed_by_step(phases)


def test_inspect_and_replay_use_the_layout_that_trained_the_step(relaid_run):
    """Steps 1-3 ran at dp=2, steps 4-6 in one process: inspect attributes each step's rows to the ranks that had
    them, and replaying step 4 in one process (from the dp=2 run's checkpoint) is expected to be, and is,
    bit-identical, while replaying step 2 in one process says the world size differs."""
    run_dir, consumed = relaid_run
    for step, ranks in ((2, 2), (4, 1), (5, 1)):  # 4: from the checkpoint the dp=2 run left
        result = inspect_step(run_dir, STAGE, step)
        per_rank = 2 * PER_RANK // ranks
        assert result.data_parallel == ranks
        assert {(row["slot"], row["rank"], row["row"]) for row in result.rows} == {
            (slot, slot // per_rank, slot % per_rank) for slot in range(2 * PER_RANK)}
        listed = {(row["slot"], row["micro_batch"]): [((s["source"], s["position"], s["draw"]), *s["doc_tokens"],
                                                       s["columns"][0]) for s in row["samples"]]
                  for row in result.rows}
        assert listed == {key: [(tuple(k[:3]), a, b, c) for k, a, b, c in pieces]
                          for key, pieces in consumed[step]["rows"].items()}
    after, before = run_ranks(_replay, 1, run_dir, [(STAGE, 4, []), (STAGE, 2, [])], timeout=600)[0]
    assert after["from_checkpoint"] == 3 and after["expect_identical"] and after["differences"] == {}
    assert not before["expect_identical"] and "world size 1, the run had 2 at that step" in before["reasons"][0]
