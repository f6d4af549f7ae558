"""What one training step carries between the loop, the objective and the weighting.

- :class:`LossReport`: what the :class:`~auxloss.Objective` computed for a batch (the total, each task's loss,
  weight and metric, the weighting's telemetry).
- :class:`StepContext`: what the training loop knows about the coming step (the learning rate, the model, the
  gradient-accumulation scale, the GradScaler, whether DDP wraps the model). Frozen: built once per step.
- :class:`StepPlan`: what the weighting asks of the loop for that step (today: whether DDP's own gradient
  synchronisation stays on).

The protocol, per optimizer step (micro-batch, under gradient accumulation)::

    plan = objective.before_step(ctx)                  # the weighting prepares (taps, learning rate, ...)
    with ddp.no_sync() if not plan.sync_gradients else nullcontext():
        report = objective(model(objective.inputs(batch)), batch)
        objective.backward(report, ctx)                # the configured method writes p.grad
    optimizer.step(); objective.advance()

This module imports nothing else of auxloss but the error class, so the objective, the weightings and the loops
all use it without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from auxloss.errors import AuxLossError

__all__ = ["LossReport", "StepContext", "StepPlan", "plain_backward"]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the training loop knows about the coming step. Every field has a default, so a loop of your own
    passes only what it has (``StepContext(model=model, lr=opt.param_groups[0]["lr"])``).

    Attributes:
        step, epoch: the objective's counters; ``None`` = filled in by the objective from its own.
        lr: the optimizer's current learning rate (OL-AUX's look-ahead needs it); ``None`` = unknown.
        model: the model being trained, not wrapped by DDP or compile. An :class:`~auxloss.AuxModel` lets an
            amortized gradient-aware step put each task's multiplier on its tap's gradient into the trunk.
        own_taps: auxiliary task name -> the tap only that task reads (filled in by the objective); a tap read by
            several tasks cannot carry one task's multiplier.
        task_sources: every task's name, the main one included -> the output it reads: ``"main"``, a tap name, or
            ``"loss:<name>"`` for an emitted loss (filled in by the objective). A representation-level weighting
            finds each task's tap there.
        scale: the factor on this micro-batch's gradients (``1/accumulate`` under gradient accumulation).
        scaler: the ``torch.amp.GradScaler``, or ``None``.
        distributed: whether DDP wraps the model (then the plan says whether to switch its sync off).
        validation: an endless iterator over batches of the *validation* split (on the training device), for the
            strategies that learn their weights from the main task's held-out loss (Auto-Lambda, AuxiLearn:
            ``needs_validation``). The Trainer and the Lightning module fill it from the validation loader; it is
            never the test split.
        main_loss: ``main_loss(forward, batch)``: the main task's loss of ``forward(inputs of batch)`` (filled in by
            the objective), so that a strategy can score the main task on a validation batch, with parameters of its
            choosing, without importing the objective.
    """

    step: int | None = None
    epoch: int | None = None
    lr: float | None = None
    model: nn.Module | None = None
    own_taps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    task_sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
    scale: float = 1.0
    scaler: Any = None
    distributed: bool = False
    validation: Iterator[Any] | None = None
    main_loss: Callable[[Callable[[Any], Any], Any], Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the weighting asks of the loop for the coming step.

    ``sync_gradients=False``: run the forward and backward under DDP's ``no_sync()``, because the weighting takes
    per-task gradients with ``torch.autograd.grad`` (which DDP's hooks never see) and all-reduces them itself.
    """

    sync_gradients: bool = True


class _BackwardGuard:
    """Armed on the total of a report whose weighting takes over the backward pass: back-propagating that total
    directly would silently train with the fixed weights, so it raises instead (see :class:`_GuardedTotal`)."""

    def __init__(self, weighting: str) -> None:
        self.weighting = weighting
        self.armed = True


class _GuardedTotal(torch.autograd.Function):
    """The identity on the total; its backward raises while the guard is armed (``report.total.backward()`` in a
    user's loop), and passes the gradient through inside :meth:`Objective.backward`."""

    @staticmethod
    def forward(ctx: Any, total: Tensor, guard: _BackwardGuard) -> Tensor:  # type: ignore[override]
        ctx.guard = guard
        return total.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        guard: _BackwardGuard = ctx.guard
        if guard.armed:
            raise AuxLossError(
                f"{guard.weighting} is gradient-aware: it builds the update from each task's own gradient, which "
                "report.total.backward() cannot do (it would train with the fixed weights). Call "
                "objective.backward(report) instead (scale=1/accumulate for gradient accumulation, scaler= for a "
                "GradScaler); see docs/weighting.md, 'Your own training loop'."
            )
        return grad, None


def guard_total(total: Tensor, weighting: str) -> tuple[Tensor, _BackwardGuard]:
    """``total`` (same value) whose direct backward raises, and the guard that :meth:`Objective.backward` disarms."""
    guard = _BackwardGuard(weighting)
    return _GuardedTotal.apply(total, guard), guard


@dataclasses.dataclass
class LossReport:
    """One step of the objective.

    ``total`` carries the autograd graph; ``losses`` too (gradient-aware weightings need them). ``weights`` are the
    λ in force this step (the main task's is 1): floats, or detached tensors where a strategy's multiplier is a
    tensor (reading it would cost a device sync). ``metrics`` and the weighting's telemetry in ``extras`` are
    detached tensors too, so building a report costs no device sync; :meth:`as_dict` turns everything into floats
    for logging.
    """

    total: Tensor
    losses: dict[str, Tensor]
    weights: dict[str, float | Tensor]
    metrics: dict[str, Tensor]
    step: int
    batch_size: int
    finite: bool = True
    extras: dict[str, float | Tensor] = dataclasses.field(default_factory=dict)
    backward_guard: _BackwardGuard | None = dataclasses.field(default=None, repr=False, compare=False)

    def detached(self) -> dict[str, Any]:
        """Like :meth:`as_dict`, but tensors stay detached tensors on their device: no device sync, for the
        training loop's running sums (converted to floats once per epoch or log step)."""
        out: dict[str, Any] = {"loss": self.total.detach()}
        for name, value in self.losses.items():
            out[f"loss/{name}"] = value.detach()
        for name, w in self.weights.items():
            out[f"weight/{name}"] = w.detach() if isinstance(w, Tensor) else float(w)
        for name, value in self.metrics.items():
            out[f"metric/{name}"] = value
        for name, value in self.extras.items():
            out[name] = value.detach() if isinstance(value, Tensor) else value
        return out

    def as_dict(self) -> dict[str, float]:
        """Flat floats: ``loss``, ``loss/<task>``, ``weight/<task>``, ``metric/<task>``, and any extras."""
        return {k: float(v) for k, v in self.detached().items()}


def plain_backward(report: LossReport, ctx: StepContext) -> None:
    """``report.total`` times ``ctx.scale`` back-propagated, through ``ctx.scaler`` when there is one."""
    total = report.total * ctx.scale if ctx.scale != 1.0 else report.total
    if ctx.scaler is not None:
        total = ctx.scaler.scale(total)
    total.backward()
