"""Metric writers: JSON lines in the workdir plus TensorBoard event files, on process 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax


def _plain(value: Any) -> Any:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return value
    return value if math.isfinite(value) else None


class MetricWriter:
    """``write(step, metrics)`` appends one JSON line and scalar events; no-op off process 0."""

    def __init__(self, workdir: Path, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.active and tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(Path(workdir) / "tb"))
            except ImportError:  # optional: the JSON lines are the record
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

