"""The two kinds of weighting strategy, and the step protocol between them, the objective and the training loop.

An auxiliary task's effective weight is ``λ_k(t) · m_k``: its schedule (fixed or curriculum, from the task)
times the strategy's multiplier. The main task's weight is always 1: no strategy may scale it down.

- :class:`LossWeighting` strategies see only the losses. Each step :meth:`Weighting.multipliers` returns
  ``m_k`` per auxiliary task (a float or a tensor, possibly carrying a graph for learnable weights), and
  :meth:`Weighting.extra_loss` may add a regulariser (uncertainty weighting's ``s/2``).
- :class:`GradientWeighting` strategies act on the gradients of the *shared* parameters (those both the main task
  and that auxiliary task reach). They take over the backward pass (``custom_backward = True``).

**The step protocol.** Per micro-batch the loop makes two calls on the objective, which forwards them here:

1. ``plan = objective.before_step(ctx)`` before the forward -> :meth:`Weighting.before_step` with a frozen
   :class:`~auxloss.step.StepContext` (step, epoch, learning rate, the model, the taps each task reads alone,
   accumulation scale, GradScaler, DDP or not). It returns a :class:`~auxloss.step.StepPlan` (whether DDP's own
   gradient sync stays on). A strategy prepares here (an amortized step sets its multipliers at the taps).
2. ``objective.backward(report, ctx)`` after it -> :meth:`Weighting.backward`, which writes ``p.grad``: the plain
   ``scale·total`` backward by default, each strategy's own method for gradient-aware ones.

Events: :meth:`Weighting.on_epoch_end` after each training epoch and :meth:`Weighting.on_validation_end` after
each evaluation. :meth:`Weighting.telemetry` returns detached tensors (never floats: reading a device value costs
a sync), converted where the logs are written.

Both kinds are ``nn.Module``: learnable weights are parameters (so the trainer's optimizer, ``.to()``,
``state_dict`` and DDP see them) and running statistics are buffers or extra state, so a checkpoint resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

from torch import Tensor, nn

from auxloss.errors import AuxLossError
from auxloss.step import LossReport, StepContext, StepPlan, plain_backward

__all__ = ["GradientWeighting", "LossWeighting", "Weighting"]


class Weighting(nn.Module):
    """Base of every strategy. :meth:`bind` tells it the task names once the objective is built."""

    #: Whether :meth:`backward` does more than back-propagate ``report.total`` (gradient-aware strategies). The
    #: objective then guards ``report.total`` so that a direct ``report.total.backward()`` raises.
    custom_backward: ClassVar[bool] = False
    #: The constructor argument that a config's ``layer`` key fills with the named layers' parameters (``None``:
    #: the strategy takes no layer), and whether a config must give it (see :mod:`auxloss.weighting.registry`).
    layer_argument: ClassVar[str | None] = None
    layer_required: ClassVar[bool] = False
    #: Config keys that name a constructor argument of another name (``{"params": "aggregator_params"}`` for the
    #: TorchJD bridge, whose ``params`` is the engine's parameter list), applied by the registry.
    config_aliases: ClassVar[Mapping[str, str]] = MappingProxyType({})
    #: Whether the strategy weights the main task like any other (the symmetric controls RLW and FAMO): its
    #: :meth:`multipliers` then also returns the main task's multiplier, which the objective applies to ``L_main``.
    #: Every other strategy keeps the main task's weight at exactly 1.
    symmetric: ClassVar[bool] = False
    #: Whether the strategy learns from the main task's loss on validation batches (``ctx.validation``): the
    #: Trainer then requires a validation loader and hands the strategy an endless stream of its batches.
    needs_validation: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.main_name: str = ""  # set by bind(): the main task's name, whatever the user called it
        self.aux_names: list[str] = []

    def bind(self, main: str, aux: list[str]) -> None:
        """Called by :meth:`Objective.set_weighting` with the task names (main first). Create per-task state here."""
        if not aux:
            raise AuxLossError(f"{type(self).__name__} needs at least one auxiliary task to weight.")
        self.main_name, self.aux_names = main, list(aux)

    # -- loss side (identity by default) -----------------------------------------------------------------------
    def multipliers(self, losses: dict[str, Tensor], *, step: int, epoch: int) -> dict[str, Tensor | float]:
        """``m_k`` per auxiliary task for this step (1.0 by default); a :attr:`symmetric` strategy also gives the
        main task's."""
        return {name: 1.0 for name in self.aux_names}

    def extra_loss(self, losses: dict[str, Tensor]) -> Tensor | None:
        """A term added to the total (a regulariser of learnable weights), or ``None``."""
        return None

    # -- the step protocol ---------------------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> StepPlan:
        """Before the forward of a training micro-batch; returns what the loop must do for it."""
        return StepPlan()

    def backward(self, report: LossReport, ctx: StepContext) -> None:
        """Write this micro-batch's update times ``ctx.scale`` into ``p.grad`` (accumulating): here the plain
        backward of ``report.total``, through ``ctx.scaler`` when there is one."""
        plain_backward(report, ctx)

    # -- events from the loop ------------------------------------------------------------------------------------
    def on_validation_end(self, metrics: dict[str, float], *, higher_is_better: bool) -> None:
        """After each epoch's evaluation (``val/metric/<main task>`` etc.)."""

    def on_epoch_end(self, epoch: int) -> None:
        """After each training epoch (1-based)."""

    def telemetry(self) -> dict[str, Tensor]:
        """Detached tensors to log with the step (cosines, norm ratios, effective weights...)."""
        return {}


class LossWeighting(Weighting):
    """A strategy that sees only the losses: override :meth:`multipliers` (and maybe :meth:`extra_loss`)."""


class GradientWeighting(Weighting):
    """A strategy on per-task gradients of the shared parameters. Subclasses implement :meth:`backward`.

    ``backward(report, ctx)`` must leave in every parameter's ``.grad`` (accumulating into what is there, for
    gradient accumulation) the update direction times ``ctx.scale``; losses go through ``ctx.scaler.scale`` when a
    GradScaler is given, and ``report.weights`` hold each task's λ from its schedule.
    """

    custom_backward: ClassVar[bool] = True

    def backward(self, report: LossReport, ctx: StepContext) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement backward(report, ctx).")
