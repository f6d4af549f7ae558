"""The two kinds of weighting strategy, and the contract between them and the :class:`~auxloss.Objective`.

An auxiliary task's effective weight is ``λ_k(t) · m_k``: its schedule (fixed or curriculum, from the task)
times the strategy's multiplier. The main task's weight is always 1: no strategy may scale it down.

- :class:`LossWeighting` strategies see only the losses. Each step :meth:`LossWeighting.multipliers` returns
  ``m_k`` per auxiliary task (a float or a tensor, possibly carrying a graph for learnable weights), and
  :meth:`LossWeighting.extra_loss` may add a regulariser (uncertainty weighting's ``s/2``).
- :class:`GradientWeighting` strategies act on the gradients of the *shared* parameters (those both the main task
  and that auxiliary task reach). They take over the backward pass: :meth:`GradientWeighting.backward` is called
  by :meth:`Objective.backward` instead of ``total.backward()``.

Both are ``nn.Module``: learnable weights are parameters (so the trainer's optimizer, ``.to()``, ``state_dict``
and DDP see them) and running statistics are buffers or extra state, so a checkpoint resumes exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from auxloss.errors import AuxLossError

if TYPE_CHECKING:
    from auxloss.objective import LossReport, Objective

__all__ = ["GradientWeighting", "LossWeighting", "Weighting"]


class Weighting(nn.Module):
    """Base of every strategy. :meth:`bind` tells it the task names once the objective is built."""

    def __init__(self) -> None:
        super().__init__()
        self.main_name: str = "main"
        self.aux_names: list[str] = []

    def bind(self, main: str, aux: list[str]) -> None:
        """Called by :meth:`Objective.set_weighting` with the task names (main first). Create per-task state here."""
        if not aux:
            raise AuxLossError(f"{type(self).__name__} needs at least one auxiliary task to weight.")
        self.main_name, self.aux_names = main, list(aux)

    # -- loss side (identity by default) -----------------------------------------------------------------------
    def multipliers(self, losses: dict[str, Tensor], *, step: int, epoch: int) -> dict[str, Tensor | float]:
        """``m_k`` per auxiliary task for this step (1.0 by default)."""
        return {name: 1.0 for name in self.aux_names}

    def extra_loss(self, losses: dict[str, Tensor]) -> Tensor | None:
        """A term added to the total (a regulariser of learnable weights), or ``None``."""
        return None

    # -- events from the trainer ---------------------------------------------------------------------------------
    def on_validation_end(self, metrics: dict[str, float], *, higher_is_better: bool) -> None:
        """After each epoch's evaluation (``val/metric/main`` etc.)."""

    def on_epoch_end(self, epoch: int) -> None:
        """After each training epoch (1-based)."""

    def telemetry(self) -> dict[str, float]:
        """Numbers to log with the step (cosines, norm ratios, effective weights...)."""
        return {}


class LossWeighting(Weighting):
    """A strategy that sees only the losses: override :meth:`multipliers` (and maybe :meth:`extra_loss`)."""


class GradientWeighting(Weighting):
    """A strategy on per-task gradients of the shared parameters. Subclasses implement :meth:`backward`.

    ``backward`` must leave in every parameter's ``.grad`` (accumulating into what is there, for gradient
    accumulation) the update direction times ``scale``; losses go through ``scaler.scale`` when a GradScaler is
    given, and the objective's ``report.weights`` hold each task's λ from its schedule.
    """

    def backward(self, objective: Objective, report: LossReport, *, scale: float = 1.0, scaler: Any = None) -> None:
        raise NotImplementedError
