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

    def __init__(self, directory: str | Path, *, tensorboard: bool = False,
                 history: list[dict[str, Any]] | None = None, last_step: int = 0) -> None:
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
        if history is not None:
            # The files are rewritten from the (checkpoint's) history, so an epoch logged after the checkpoint
            # was written (then lost to a kill) is neither duplicated nor missing, and a fresh start leaves no
            # stale lines of an earlier attempt.
            (self.directory / "epochs.jsonl").unlink(missing_ok=True)
            (self.directory / "epochs.csv").unlink(missing_ok=True)
            for record in history:
                self.log_epoch(record)
            steps = self.directory / "steps.jsonl"
            if steps.exists():
                kept = [line for line in steps.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= last_step]
                steps.write_text("".join(line + "\n" for line in kept))

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
