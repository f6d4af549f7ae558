"""Run logs: JSONL (every record, all keys) and CSV (one row per epoch), and TensorBoard where installed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["RunLogger"]


class RunLogger:
    """Writes per-step and per-epoch records under ``directory``.

    - ``steps.jsonl``: one line per logged optimizer step;
    - ``epochs.jsonl`` and ``epochs.csv``: one line per epoch (the CSV's columns are the first epoch's keys plus
      any that appear later; a rewrite keeps it rectangular);
    - TensorBoard event files under ``tensorboard/`` when ``tensorboard=True`` and the package is installed.
    """

    def __init__(self, directory: str | Path, *, tensorboard: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._epochs: list[dict[str, Any]] = []
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra: logs still go to JSONL/CSV
                self._tb = None
            else:
                self._tb = SummaryWriter(str(self.directory / "tensorboard"))

    def log_step(self, step: int, values: dict[str, float]) -> None:
        with open(self.directory / "steps.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **_clean(values)}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"step/{key}", value, step)

    def log_epoch(self, record: dict[str, Any]) -> None:
        record = _clean(record)
        self._epochs.append(record)
        with open(self.directory / "epochs.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        columns: list[str] = []
        for r in self._epochs:
            columns += [k for k in r if k not in columns]
        with open(self.directory / "epochs.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self._epochs)
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tb.add_scalar(key, value, record.get("epoch", 0))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN: write null so that other tools can read the logs.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
