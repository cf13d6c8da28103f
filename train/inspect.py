"""Every sample of one global step of a run, computed from its recipe and its stream, not from logs.

``python -m train.inspect RUN --stage S --step N [--rank R] [--dump DIR]``

The stream is a pure function of ``(seed, stage, draw index)`` and the loader's counters (data/planner.py), so the
samples of step ``N`` follow from the loader state of the last checkpoint before it: the stage's loader is built
from the run's ``config.yaml``, covering every slot of the global batch at once (the stream of a slot does not
depend on which rank serves it), loaded from that checkpoint, and drawn forward to step ``N``. The time taken grows
with the distance from that checkpoint, not with ``N``.

For each sample: its source, shard and key, and where it landed: data-parallel rank, micro-batch, row, token span
(columns of the row; a document longer than the room left continues in the slot's next row), its images' sizes and
patch grids. Corrupt samples the step skipped are listed too. ``--dump`` writes each sample's raw members (texts,
image bytes) and the rendered rows (token ids, labels, loss mask, decoded text).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from config import ConfigError, RunConfig, StageConfig
from config.load import to_run_config
from data.formats import DataError
from data.loader import StageLoader
from data.packing import PackedRow
from train.builders import build_data
from train.metrics import last_metrics_step, metrics_record
from train.stages import checkpoints_of

__all__ = ["InspectError", "StepSamples", "inspect_step", "main", "open_run", "stage_loader", "start_checkpoint",
           "step_layout"]


class InspectError(ValueError):
    """A request that cannot be answered (no such run, stage or step), said in one line."""


@dataclass
class StepSamples:
    """The samples of one global step: ``rows`` (packed rows, or image-text pairs) and ``skipped`` (corrupt)."""

    stage: str
    step: int
    from_checkpoint: int  # the checkpoint step the loader state came from (0: the stage's start)
    data_parallel: int
    micro_batches: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def open_run(run_dir: str | Path) -> RunConfig:
    """The configuration a run was trained with (its ``config.yaml``), with the run directory where it is now."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.exists():
        raise InspectError(f"{run_dir} is not a run directory: it has no config.yaml")
    cfg = to_run_config(OmegaConf.load(path))
    cfg.output_dir, cfg.run_name = str(run_dir.parent), run_dir.name
    return cfg


def start_checkpoint(cfg: RunConfig, name: str, step: int) -> tuple[int, dict[str, Any]]:
    """The latest committed checkpoint of stage ``name`` taken before step ``step`` (its loader state is the one
    step ``step`` starts from drawing), and the ``checkpoint.json`` of a checkpoint of the stage (its layout):
    ``(0, info)`` when none precedes the step."""
    if name not in cfg.curriculum.order:
        raise InspectError(f"the run has no stage '{name}'; its stages: {list(cfg.curriculum.order)}")
    steps = cfg.curriculum.stages[name].steps
    if not 1 <= step <= steps:
        raise InspectError(f"stage '{name}' has steps 1..{steps}; step {step} is not one of them")
    manager = checkpoints_of(cfg, name)
    committed = manager.committed_steps()
    reached = max(max(committed, default=0), last_metrics_step(cfg.run_dir / name / "metrics.jsonl"))
    if step > reached:
        raise InspectError(f"stage '{name}' of {cfg.run_dir} reached step {reached}; step {step} was not trained")
    before = [c for c in committed if c < step]
    info = manager.info(before[-1] if before else committed[0]) if committed else {}
    return (before[-1] if before else 0), info


def step_layout(cfg: RunConfig, name: str, step: int, info: dict[str, Any]) -> dict[str, int]:
    """``{"world_size", "data_parallel", "micro_batch_size"}`` of the invocation that trained step ``step``, from its
    ``metrics.jsonl`` line (a resume may change the layout), else from a checkpoint's ``checkpoint.json`` (``info``)
    and the run's configuration; empty when neither says."""
    record = metrics_record(cfg.run_dir / name / "metrics.jsonl", step)
    if record is not None and "data_parallel" in record:
        return {k: int(record[k]) for k in ("world_size", "data_parallel", "micro_batch_size")}
    layout = info.get("layout", {})
    if not layout:
        return {}
    coca = cfg.curriculum.stages[name].objective == "coca"
    return {"world_size": layout["world_size"], "data_parallel": layout["dp"] * (layout["cp"] if coca else 1),
            "micro_batch_size": cfg.curriculum.stages[name].micro_batch_size}


def stage_loader(cfg: RunConfig, name: str, data_parallel: int) -> StageLoader:
    """One loader serving every slot of stage ``name``'s global batch (``data_parallel`` ranks' worth), reading in
    the foreground (read-ahead changes timing only) and never stopping for corrupt samples."""
    stage: StageConfig = copy.deepcopy(cfg.curriculum.stages[name])
    stage.micro_batch_size *= data_parallel
    options = copy.deepcopy(cfg.data)
    options.prefetch_samples, options.loader_workers, options.max_corrupt_fraction = 0, 0, 1.0
    data = build_data(cfg)
    return StageLoader(name, stage, options, data.storage, data.tokenizer, cfg.model.vision, cfg.seed, (0, 1))


def _shard_and_key(loader: StageLoader, source: str, position: int) -> tuple[str, str]:
    shard, _, key = loader.reader.sources[source].locate(position).rpartition(":")
    return shard, key


def _describe_piece(loader: StageLoader, piece: tuple) -> dict[str, Any]:
    (source, position, draw, cap), start, stop, column, images = piece
    shard, key = _shard_and_key(loader, source, position)
    return {"source": source, "position": position, "draw": draw, "shard": shard, "key": key,
            "doc_tokens": [start, stop], "columns": [column, column + stop - start],
            "images": [{"size": list(size), "grid": list(grid)} for size, grid in images]}


class _Recorder:
    """The loader's observer: what the step drew, placed by slot (rank = slot // per-rank slots)."""

    def __init__(self, loader: StageLoader, per_rank: int):
        self.loader, self.per_rank = loader, per_rank
        self.micro_batch = 0
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.rendered: list[PackedRow | tuple] = []

    def _where(self, slot: int) -> dict[str, int]:
        return {"rank": slot // self.per_rank, "micro_batch": self.micro_batch, "row": slot % self.per_rank,
                "slot": slot}

    def __call__(self, kind: str, slot: int, *event: Any) -> None:
        if kind == "row":
            row: PackedRow = event[0]
            self.rows.append({**self._where(slot), "samples": [_describe_piece(self.loader, p) for p in row.pieces]})
            self.rendered.append(row)
        elif kind == "pair":
            key, (image, caption) = event
            piece = (key, 0, len(caption), 0, [(image.size, image.grid)])
            self.rows.append({**self._where(slot), "samples": [_describe_piece(self.loader, piece)]})
            self.rendered.append(caption)
        else:
            (source, position, draw, _), error = event
            shard, key = _shard_and_key(self.loader, source, position)
            self.skipped.append({**self._where(slot), "source": source, "position": position, "draw": draw,
                                 "shard": shard, "key": key, "error": str(error)})


def _draw_step(loader: StageLoader, stage: StageConfig, step: int) -> None:
    """Draw the micro-batches of (1-based) ``step`` as the trainer does, at its progress."""
    progress = (step - 1) / stage.steps
    for _ in range(stage.grad_accum_steps):
        if stage.objective == "coca":
            loader.next_image_text_batch(progress)
        else:
            loader.next_packed_batch(progress)
        if isinstance(loader.packer.observer, _Recorder):
            loader.packer.observer.micro_batch += 1


def inspect_step(run_dir: str | Path, name: str, step: int, data_parallel: int | None = None,
                 dump: str | Path | None = None) -> StepSamples:
    """Every sample of global step ``step`` of stage ``name`` of the run in ``run_dir``.

    Args:
        run_dir: The run directory (``<output_dir>/<run_name>``).
        name: The stage.
        step: The step, as ``metrics.jsonl`` numbers it (1 is the first).
        data_parallel: Data-parallel ranks of the stage (default: the layout its checkpoints record).
        dump: Write the raw samples and the rendered rows under this directory.
    """
    cfg = open_run(run_dir)
    start, info = start_checkpoint(cfg, name, step)
    layout = step_layout(cfg, name, step, info)
    if layout:  # the rows per rank of the invocation that trained the step
        cfg.curriculum.stages[name].micro_batch_size = layout["micro_batch_size"]
    stage = cfg.curriculum.stages[name]
    if data_parallel is None:
        if not layout:
            raise InspectError(f"stage '{name}' has no metrics or checkpoint recording its layout: pass "
                               "--data-parallel")
        data_parallel = layout["data_parallel"]
    loader = stage_loader(cfg, name, data_parallel)
    try:
        if start:
            with warnings.catch_warnings():  # "loading in a single process": the intent, every slot's state at once
                warnings.simplefilter("ignore", UserWarning)
                checkpoints_of(cfg, name).load(start, {"loader": loader})
        for earlier in range(start + 1, step):
            _draw_step(loader, stage, earlier)
        recorder = _Recorder(loader, stage.micro_batch_size)
        loader.observe(recorder)
        _draw_step(loader, stage, step)
        result = StepSamples(name, step, start, data_parallel, stage.grad_accum_steps, recorder.rows,
                             recorder.skipped)
        if dump is not None:
            _dump(loader, recorder, result, Path(dump))
        return result
    finally:
        loader.close()


def _dump(loader: StageLoader, recorder: _Recorder, result: StepSamples, out: Path) -> None:
    """Each sample's raw members and each rendered row (ids, labels, loss mask, text) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = loader.reader.sample_reader.tokenizer
    rendered = []
    for row, made in zip(result.rows, recorder.rendered, strict=True):
        where = f"r{row['rank']}-mb{row['micro_batch']}-row{row['row']}"
        for index, sample in enumerate(row["samples"]):
            raw = loader.reader.sources[sample["source"]].read(sample["position"])
            for member, payload in getattr(raw, "members", {}).items():
                name = f"{where}-{index}-{sample['source']}-{sample['key']}.{member}".replace("/", "_")
                (out / name).write_bytes(payload)
        ids = made.tokens if isinstance(made, PackedRow) else list(made)
        entry = {**{k: row[k] for k in ("rank", "micro_batch", "row", "slot")}, "input_ids": ids,
                 "text": tokenizer.decode(ids)}
        if isinstance(made, PackedRow):
            entry.update(labels=made.labels, loss_mask=made.loss_mask)
        rendered.append(entry)
    (out / "rows.json").write_text(json.dumps(rendered) + "\n")


def format_samples(result: StepSamples, rank: int | None = None) -> str:
    """The step's samples, one line each (``rank``: only that data-parallel rank's)."""
    lines = [f"stage {result.stage} step {result.step}: {result.data_parallel} data-parallel rank(s), "
             f"{result.micro_batches} micro-batch(es); stream replayed from "
             + (f"checkpoint step {result.from_checkpoint}" if result.from_checkpoint else "the stage's start")]
    for row in result.rows:
        if rank is not None and row["rank"] != rank:
            continue
        for s in row["samples"]:
            images = " ".join(f"{i['size'][0]}x{i['size'][1]}px/grid{i['grid'][0]}x{i['grid'][1]}" for i in s["images"])
            lines.append(f"rank {row['rank']} mb {row['micro_batch']} row {row['row']} cols {s['columns'][0]}:"
                         f"{s['columns'][1]}  {s['source']} {s['shard']}:{s['key']} tokens {s['doc_tokens'][0]}:"
                         f"{s['doc_tokens'][1]} {images}".rstrip())
    for s in result.skipped:
        if rank is None or s["rank"] == rank:
            lines.append(f"rank {s['rank']} mb {s['micro_batch']} row {s['row']}  SKIPPED corrupt {s['source']} "
                         f"{s['shard']}:{s['key']}: {s['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run directory (<output_dir>/<run_name>)")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--step", type=int, required=True, help="as metrics.jsonl numbers it (1 is the first)")
    parser.add_argument("--rank", type=int, help="only this data-parallel rank's samples")
    parser.add_argument("--data-parallel", type=int, help="data-parallel ranks (default: from the checkpoints)")
    parser.add_argument("--dump", help="write raw samples and rendered rows to this directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = parser.parse_args(argv)
    try:
        result = inspect_step(args.run, args.stage, args.step, args.data_parallel, args.dump)
    except (InspectError, ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.__dict__, indent=1) if args.json else format_samples(result, args.rank))
    return 0


if __name__ == "__main__":
    sys.exit(main())
