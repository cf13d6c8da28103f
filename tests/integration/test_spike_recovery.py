"""Automatic spike recovery on a poisoned stream: detected, rolled back, the spiking step's data skipped, finished
close to a run whose stream never held the poison; the poisoned samples named in recovery.jsonl."""

from __future__ import annotations

import random

import pytest

from data.sample_reader import SampleReader
from train.__main__ import main
from train.inspect import inspect_step
from train.metrics import read_metrics
from train.recovery import read_recovery

STAGE, STEPS, POISONED_STEP, INTERVAL = "text_pretrain", 20, 13, 5
# The clean loss falls step after step here, so a small factor raises no false alarm (asserted below).
RECOVERY = ["recovery.loss_spike_factor=1.1", "recovery.window=4", "recovery.max_rollbacks_per_stage=2",
            "recovery.spike_window=2"]


def stage_run(out, demo_root, name: str, *extra: str) -> list[str]:
    prefix = f"curriculum.stages.{STAGE}"
    return ["recipe=debug", f"output_dir={out}", f"run_name={name}", f"data.root={demo_root}",
            "log.progress_bar=false", f"curriculum.order=[{STAGE}]", f"{prefix}.steps={STEPS}",
            f"{prefix}.checkpoint_interval={INTERVAL}", "checkpoint.keep_last=3", *RECOVERY, *extra]


def poison(monkeypatch, draws: set[int]) -> None:
    """The samples at global sample indices ``draws`` rendered as the same number of random tokens: the stream's
    layout is unchanged, the loss on them far above the model's."""
    read = SampleReader.read

    def poisoned(self, name, position, draw, cap):
        doc = read(self, name, position, draw, cap)
        if draw in draws:
            rng = random.Random(draw)
            doc.tokens = [rng.randrange(10, self.tokenizer.vocab_size) for _ in doc.tokens]
        return doc

    monkeypatch.setattr(SampleReader, "read", poisoned)


@pytest.fixture(scope="module")
def clean_run(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("spikes")
    assert main(stage_run(out, demo_root, "clean")) == 0
    return out


def only_in_step(run_dir, step: int) -> set[int]:
    """Global sample indices of the samples wholly inside ``step`` (none of their tokens in the steps around it)."""
    def draws(n):
        return {s["draw"] for row in inspect_step(run_dir, STAGE, n).rows for s in row["samples"]}
    return draws(step) - draws(step - 1) - draws(step + 1)


def test_a_poisoned_step_is_detected_rolled_back_skipped_and_the_run_finishes(clean_run, demo_root, monkeypatch):
    clean_dir = clean_run / "clean"
    assert not (clean_dir / STAGE / "recovery.jsonl").exists()  # no false alarm on the clean stream
    poisoned_draws = only_in_step(clean_dir, POISONED_STEP)
    assert len(poisoned_draws) >= 3
    poison(monkeypatch, poisoned_draws)
    assert main(stage_run(clean_run, demo_root, "poisoned")) == 0
    run_dir = clean_run / "poisoned"
    lines = read_recovery(run_dir / STAGE / "recovery.jsonl")
    assert [line["step"] for line in lines] == [POISONED_STEP]
    line = lines[0]
    assert line["trigger"] == "loss" and line["rolled_back_to"] == 10 and line["spike_step"] == POISONED_STEP
    named = {s["draw"] for s in line["samples"]}
    step_samples = {s["draw"] for row in inspect_step(clean_dir, STAGE, POISONED_STEP).rows for s in row["samples"]}
    assert poisoned_draws <= named == step_samples  # exactly the step's samples, the poisoned ones among them
    records = read_metrics(run_dir / STAGE / "metrics.jsonl")
    assert [r["step"] for r in records] == [s for s in range(1, STEPS + 1) if s != POISONED_STEP]
    clean = read_metrics(clean_dir / STAGE / "metrics.jsonl")
    assert [r["loss"] for r in records[:POISONED_STEP - 1]] == [r["loss"] for r in clean[:POISONED_STEP - 1]]
    assert records[-1]["loss"] == pytest.approx(clean[-1]["loss"], rel=0.02)
    assert (run_dir / STAGE / "loss.png").exists()


def test_the_decision_is_in_the_checkpoint_a_rerun_skips_the_same_step(clean_run, demo_root, monkeypatch):
    """Leave (checkpointed) after the rollback and before the skip, then rerun *without* the poison: the step is
    still skipped (the decision came from the checkpoint) and the run ends as the uninterrupted poisoned one."""
    with monkeypatch.context() as patch:
        poison(patch, only_in_step(clean_run / "clean", POISONED_STEP))
        # 12 steps, the spike at 13 rolls back to 10, steps 11 and 12 again: the 14th step trained leaves at 12.
        assert main(stage_run(clean_run, demo_root, "rerun", "exit_after_steps=14")) == 0
    run_dir = clean_run / "rerun"
    assert [r["step"] for r in read_metrics(run_dir / STAGE / "metrics.jsonl")] == list(range(1, 13))
    assert main(stage_run(clean_run, demo_root, "rerun")) == 0
    lines = read_recovery(run_dir / STAGE / "recovery.jsonl")
    assert [line["step"] for line in lines] == [POISONED_STEP]
    uninterrupted = read_metrics(clean_run / "poisoned" / STAGE / "metrics.jsonl")
    rerun = read_metrics(run_dir / STAGE / "metrics.jsonl")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in rerun] == [(r["step"], r["loss"], r["grad_norm"])
                                                                        for r in uninterrupted]


def test_past_max_rollbacks_the_run_stops_naming_the_spike(clean_run, demo_root, monkeypatch, capsys):
    poison(monkeypatch, only_in_step(clean_run / "clean", POISONED_STEP))
    code = main(stage_run(clean_run, demo_root, "stops", "recovery.max_rollbacks_per_stage=0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert f"at steps {POISONED_STEP}" in err[-1] and "max_rollbacks_per_stage=0" in err[-1]


def _poisoned_rank(rank: int, world: int, draws: set[int], args: list[str]) -> int:
    """A forked rank of a poisoned run (the poison patched in this process only)."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    with pytest.MonkeyPatch.context() as patch:
        poison(patch, draws)
        return main(args)


def test_two_ranks_agree_roll_back_together_and_name_both_ranks_samples(clean_run, demo_root):
    """dp=2 with 2 rows per rank is the same global batch as one process with 4 rows: the same step spikes, both
    ranks roll back and skip it, and recovery.jsonl names the samples of every rank's rows."""
    from tests.forked import run_ranks

    draws = only_in_step(clean_run / "clean", POISONED_STEP)
    args = stage_run(clean_run, demo_root, "dp2", f"curriculum.stages.{STAGE}.micro_batch_size=2",
                     "optim.muon_ns_dtype=float32")
    assert run_ranks(_poisoned_rank, 2, draws, args, timeout=600) == [0, 0]
    lines = read_recovery(clean_run / "dp2" / STAGE / "recovery.jsonl")
    assert [line["step"] for line in lines] == [POISONED_STEP]
    assert {s["slot"] for s in lines[0]["samples"]} == {0, 1, 2, 3}  # both ranks' rows
    assert draws <= {s["draw"] for s in lines[0]["samples"]}
    records = read_metrics(clean_run / "dp2" / STAGE / "metrics.jsonl")
    assert [r["step"] for r in records] == [s for s in range(1, STEPS + 1) if s != POISONED_STEP]


# Checkpoints every 2 steps, the last 2 kept, the 3 steps before a spike suspect: the spike at 13 must roll back to
# the checkpoint at 8 (10 and 12 were taken inside its window), which plain keep-last-2 would have deleted.
WINDOW = [f"curriculum.stages.{STAGE}.checkpoint_interval=2", "checkpoint.keep_last=2", "recovery.spike_window=3"]


def _final_state(run_dir) -> dict:
    """Every tensor of the stage's last checkpoint (model, optimizer, loader counters, RNG)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = run_dir / "final.pt"
    dcp_to_torch_save(run_dir / STAGE / "checkpoints" / f"step-{STEPS:08d}", flat)
    return torch.load(flat, weights_only=False)


def _assert_same_state(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def window_run(clean_run, demo_root):
    with pytest.MonkeyPatch.context() as patch:
        poison(patch, only_in_step(clean_run / "clean", POISONED_STEP))
        assert main(stage_run(clean_run, demo_root, "window", *WINDOW)) == 0
    return clean_run / "window"


def test_the_rollback_lands_before_the_spike_window(clean_run, window_run):
    lines = read_recovery(window_run / STAGE / "recovery.jsonl")
    assert [(line["step"], line["rolled_back_to"]) for line in lines] == [(POISONED_STEP, 8)]
    # Replaying 9..12 from 8 is the same arithmetic: the run equals the one that rolled back to 10.
    steps = read_metrics(window_run / STAGE / "metrics.jsonl")
    reference = read_metrics(clean_run / "poisoned" / STAGE / "metrics.jsonl")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in steps] == [(r["step"], r["loss"], r["grad_norm"])
                                                                       for r in reference]
    # Retention at the end (step 20): the last 2 and the one before a spike at 21's window.
    checkpoints = sorted(p.name for p in (window_run / STAGE / "checkpoints").iterdir())
    assert checkpoints == ["step-00000016", "step-00000018", "step-00000020"]


def _killed_during_recovery(args: list[str], draws: set[int], where: str) -> None:
    """A forked process running the poisoned stage that SIGKILLs itself at ``where``: right after the rollback is
    decided (nothing of it saved yet), or at the first skipped step (the replay has saved checkpoints holding it)."""
    import os
    import signal

    from train.recovery import RecoveryState
    from train.trainer import Trainer

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.MonkeyPatch.context() as patch:
        poison(patch, draws)
        if where == "decided":
            decide = RecoveryState.decide
            patch.setattr(RecoveryState, "decide", lambda self, *a: (decide(self, *a), kill()))
        else:
            patch.setattr(Trainer, "_skip_step", lambda self, *a: kill())
        main(args)
    os._exit(0)  # not reached: the kill comes first


@pytest.mark.parametrize("where", ["decided", "skipping"])
def test_a_sigkill_during_recovery_then_a_rerun_gives_the_same_final_state(clean_run, demo_root, window_run, where):
    import multiprocessing as mp
    import signal

    draws = only_in_step(clean_run / "clean", POISONED_STEP)
    name = f"killed_{where}"
    args = stage_run(clean_run, demo_root, name, *WINDOW)
    child = mp.get_context("fork").Process(target=_killed_during_recovery, args=(args, draws, where))
    child.start()
    child.join(600)
    assert child.exitcode == -signal.SIGKILL
    run_dir = clean_run / name
    assert not (run_dir / STAGE / "DONE.json").exists()
    with pytest.MonkeyPatch.context() as patch:  # the same command again, the poisoned stream unchanged
        poison(patch, draws)
        assert main(args) == 0
    lines = read_recovery(run_dir / STAGE / "recovery.jsonl")
    assert [(line["step"], line["rolled_back_to"]) for line in lines] == [(POISONED_STEP, 8)]
    steps = read_metrics(run_dir / STAGE / "metrics.jsonl")
    assert [r["step"] for r in steps] == [s for s in range(1, STEPS + 1) if s != POISONED_STEP]
    _assert_same_state(_final_state(run_dir), _final_state(window_run))


def test_a_non_finite_step_rolls_back_and_its_data_is_skipped(clean_run, demo_root, monkeypatch):
    """A transient fault turns a weight NaN before step 13: the step's loss is not finite (its update skipped), every
    rank rolls back to the checkpoint before the window, which restores the weights, skips the step's data and
    finishes close to the clean run."""
    import torch

    from train.trainer import Trainer

    train_step, injected = Trainer.train_step, []

    def faulty(self, name, stage, optimizer, feed, train, *rest):
        if train.step + 1 == POISONED_STEP and not injected:
            injected.append(train.step + 1)
            with torch.no_grad():
                self.model.decoder.norm.weight.fill_(float("nan"))
        return train_step(self, name, stage, optimizer, feed, train, *rest)

    monkeypatch.setattr(Trainer, "train_step", faulty)
    assert main(stage_run(clean_run, demo_root, "fault")) == 0
    assert injected == [POISONED_STEP]
    lines = read_recovery(clean_run / "fault" / STAGE / "recovery.jsonl")
    assert [(line["step"], line["trigger"], line["rolled_back_to"]) for line in lines] == [
        (POISONED_STEP, "nonfinite", 10)]
    records = read_metrics(clean_run / "fault" / STAGE / "metrics.jsonl")
    assert [r["step"] for r in records] == [s for s in range(1, STEPS + 1) if s != POISONED_STEP]
    clean = read_metrics(clean_run / "clean" / STAGE / "metrics.jsonl")
    assert [r["loss"] for r in records[:POISONED_STEP - 1]] == [r["loss"] for r in clean[:POISONED_STEP - 1]]
    assert all(r["skipped_steps"] == 0 for r in records)  # the NaN step's line belongs to the discarded branch
    assert records[-1]["loss"] == pytest.approx(clean[-1]["loss"], rel=0.02)
