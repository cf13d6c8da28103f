"""Per-step metrics (JSON lines), the console progress bar, and the run summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsWriter:
    """Appends one JSON object per step to ``metrics.jsonl`` (rank 0 only).

    On resume at step ``s`` the lines of steps after ``s`` (written before the interruption, after the checkpoint)
    are dropped, so the file always reads as one uninterrupted history.
    """

    def __init__(self, path: Path, resume_step: int, enabled: bool, progress_bar: bool, total_steps: int, desc: str):
        self.path = Path(path)
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=resume_step, desc=desc, dynamic_ncols=True, leave=True)

    def rewind(self, step: int) -> None:
        """Drop the lines after ``step`` (a rollback to the checkpoint of ``step``)."""
        if self.enabled:
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in read_metrics(self.path) if r["step"] <= step))
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def drop_unseen_sources(values: dict[str, float]) -> dict[str, float]:
    """``values`` without the ``loss/<source>`` and ``loss_tokens/<source>`` of sources no token of the step came
    from (their loss is undefined)."""
    unseen = {key.split("/", 1)[1] for key, value in values.items() if key.startswith("loss_tokens/") and not value}
    return {key: value for key, value in values.items()
            if not (key.startswith(("loss/", "loss_tokens/")) and key.split("/", 1)[1] in unseen)}


def source_names(records: list[dict[str, Any]]) -> list[str]:
    """The data sources with a ``loss/<source>`` in any of ``records``, sorted."""
    return sorted({key.split("/", 1)[1] for record in records for key in record if key.startswith("loss/")})


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a last line cut short by a crash is dropped."""
    if not Path(path).exists():
        return []
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if index != len(lines) - 1:
                raise
    return records


def metrics_record(path: Path, step: int) -> dict[str, Any] | None:
    """The line of ``step`` in a metrics file (None if it has none), found by bisection over byte offsets: the
    file's steps increase line by line (:class:`MetricsWriter` keeps one uninterrupted history), so a lookup reads a
    few lines, not a run's million."""
    if not Path(path).exists():
        return None
    with Path(path).open("rb") as f:
        lo, hi = 0, f.seek(0, 2)  # the line of ``step``, if any, starts in [lo, hi)
        while lo < hi:
            mid = (lo + hi) // 2
            start, line = _line_from(f, mid)
            record = _parsed(line) if start < hi else None
            if record is None or record["step"] > step:  # no line starts in [mid, start): it starts before mid
                hi = mid
            elif record["step"] < step:
                lo = start + len(line)
            else:
                return record
    return None


def last_metrics_step(path: Path) -> int:
    """The step of a metrics file's last complete line (0 without one), read from the file's end."""
    if not Path(path).exists():
        return 0
    with Path(path).open("rb") as f:
        size = f.seek(0, 2)
        block = 1 << 16
        while True:
            f.seek(max(0, size - block))
            lines = f.read().splitlines()[1 if size > block else 0:]  # the block's first line may be a tail
            last = next((r for r in map(_parsed, reversed(lines)) if r is not None), None)
            if last is not None or block >= size:
                return last["step"] if last is not None else 0
            block *= 2


def _line_from(f, offset: int) -> tuple[int, bytes]:
    """The first line starting at or after byte ``offset``: ``(its offset, its bytes)`` (``b""`` past the end)."""
    f.seek(max(offset - 1, 0))
    if offset > 0:
        f.readline()  # to the end of the line holding offset - 1: the next line starts after it
    return f.tell(), f.readline()


def _parsed(line: bytes) -> dict[str, Any] | None:
    """One metrics line, or None for an empty one or the last line cut short by a crash."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a part (crash-safe)."""
    staging = Path(path).with_name(Path(path).name + ".tmp")
    staging.write_text(text)
    staging.replace(path)


def summarize_stage(path: Path) -> dict[str, Any]:
    """Steps, first and last loss and tokens of one stage, from its metrics file."""
    records = read_metrics(path)
    if not records:
        return {"steps": 0, "first_loss": None, "last_loss": None, "tokens": 0}
    return {
        "steps": records[-1]["step"],
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "tokens": records[-1]["tokens"],
    }


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'stage':<16}{'steps':>7}{'first loss':>12}{'last loss':>12}{'tokens':>12}"]
    for name, s in summary.items():
        first = f"{s['first_loss']:.4f}" if s["first_loss"] is not None else "-"
        last = f"{s['last_loss']:.4f}" if s["last_loss"] is not None else "-"
        lines.append(f"{name:<16}{s['steps']:>7}{first:>12}{last:>12}{s['tokens']:>12}")
    return "\n".join(lines)
