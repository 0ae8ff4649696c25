"""Metric sinks: every record goes to <run dir>/metrics.jsonl (what pipelines/report.py reads)
and to wandb (offline unless configured online). Names follow the dashboard's: tokens/data,
eval/bpb, timing_s/train, ..."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: str | Path, config: dict[str, Any] | None = None, wandb_mode: str = "offline",
                 project: str = "ponder", entity: str = "", run_name: str | None = None,
                 resume_step: int | None = None):
        """`resume_step`: continue a run from that step's checkpoint, dropping any records the
        killed run wrote after it (they are about to be written again)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = records_until(self.path, resume_step) if resume_step is not None else []
        self._file = open(self.path, "w", buffering=1)
        for record in kept:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._wandb = None
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            # A resumed run continues the wandb run it started (its id is kept beside the metrics).
            id_file = Path(run_dir) / "wandb_run_id"
            run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
            self._wandb = wandb.init(
                project=project, entity=entity or None, name=run_name, dir=str(run_dir), mode=wandb_mode,
                config=config, id=run_id, resume="allow" if run_id else None,
            )
            id_file.write_text(self._wandb.id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            flat = {}
            for k, v in clean.items():  # lists (eval/loss_by_position) as one key per entry
                flat.update({f"{k}/{i}": x for i, x in enumerate(v)} if isinstance(v, list) else {k: v})
            self._wandb.log(flat, step=step)

    def sync(self) -> None:
        """Make every record logged so far durable (called before a checkpoint is written, so a
        checkpoint never exists without its step's record)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a .jsonl file; a last line cut short (its writer killed mid-line) is left out."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return records


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """A finished run as its metrics.jsonl tells it: every metric's last logged value, and
    bpb_start, the first held-out bpb."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    summary: dict[str, Any] = {}
    for record in records:
        summary.update(record)
    start = first_bpb(records)
    if start is not None:
        summary["bpb_start"] = start
    return summary


def first_bpb(records: list[dict[str, Any]]) -> float | None:
    """The first held-out bpb logged: a resumed run's start is its step 0, not where it resumed."""
    return next((r["eval/bpb"] for r in records if "eval/bpb" in r), None)


def records_until(path: Path, step: int) -> list[dict[str, Any]]:
    """The records of `path` up to and including `step` (none if there is no file)."""
    return [r for r in read_metrics(path) if r["step"] <= step] if path.exists() else []


def trim_records(path: Path, step: int) -> None:
    """Drop the records of `path` past `step`, which a resumed run is about to write again."""
    if path.exists():
        replace_text(path, "".join(json.dumps(r) + "\n" for r in records_until(path, step)))


def replace_text(path: Path, text: str) -> None:
    """Write `path` beside itself and rename it into place: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def base_counters(base: str | Path) -> dict[str, float]:
    """Data tokens and FLOPs a base model cost, when the run that made it is readable: a model
    saved inside a run directory (<run>/model, or a conversion of it, <run>/converted) beside the
    run's metrics.jsonl. A run from that base counts on from there, so its curves start where the
    base's ended."""
    metrics = Path(base).parent / "metrics.jsonl"
    if not metrics.is_file():
        return {}
    last = read_metrics(metrics)[-1]
    return {k: last[k] for k in ("tokens/data", "flops/total") if k in last}
