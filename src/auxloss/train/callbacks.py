"""Callbacks: no-op hooks around the training loop, so later features and users plug in without editing it.

Override only what you need. The order of calls in one optimizer step is::

    on_train_batch_start -> on_before_backward -> on_after_backward -> on_before_optimizer_step
    -> on_train_batch_end

(with gradient accumulation, the first three run once per micro-batch and the last two once per step).
"""

from __future__ import annotations

from typing import Any

from auxloss.step import LossReport

# The trainer imports this module, so naming its class here (even under TYPE_CHECKING) would be an import cycle:
# hooks receive the running `auxloss.train.Trainer`, typed loosely.
Trainer = Any

__all__ = ["Callback"]


class Callback:
    """Base class: every hook is a no-op."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once, before the first epoch."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Called at the start of every epoch (1-based)."""

    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
        """Called before the forward pass of a training batch."""

    def on_before_backward(self, trainer: Trainer, report: LossReport) -> None:
        """Called with the step's loss report, before backward."""

    def on_after_backward(self, trainer: Trainer, report: LossReport) -> None:
        """Called after backward, with the gradients in place."""

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: Any) -> None:
        """Called after gradient clipping, right before ``optimizer.step()``."""

    def on_train_batch_end(self, trainer: Trainer, report: LossReport, batch_idx: int) -> None:
        """Called after the optimizer step."""

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Called after each epoch's evaluation, with every split's metrics."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        """Called with the epoch's record (what goes to the logs)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Called once after training, after the best checkpoint is restored."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
