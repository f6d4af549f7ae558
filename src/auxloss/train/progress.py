"""The Trainer's progress bar: one rich bar over the whole fit (steps, epoch, validation metric), or nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FitProgress"]


class FitProgress:
    """A rich progress bar over the whole fit, or nothing."""

    def __init__(self, enabled: bool, epochs: int, steps_per_epoch: int) -> None:
        self._bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                             TimeRemainingColumn(), transient=True)
        self._task = self._bar.add_task("train", total=epochs * steps_per_epoch, info="")
        self._bar.start()

    def step(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def epoch_done(self, record: Mapping[str, Any], main: str) -> None:
        if self._bar is not None:
            val = record.get(f"val/metric/{main}")
            info = f"epoch {record['epoch']}" + (f" val {val:.4f}" if isinstance(val, float) else "")
            self._bar.update(self._task, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
