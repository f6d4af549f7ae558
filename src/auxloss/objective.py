"""The objective: ``L_total = L_main + Σ_i λ_i(t) · L_i``, with an itemised report every step.

An :class:`Objective` holds one main task and any number of auxiliary tasks. Called on a model's
:class:`~auxloss.taps.Outputs` and the batch, it returns a :class:`LossReport`: the total to back-propagate and
each task's loss, weight and metric, ready to log.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from auxloss.errors import AuxLossError
from auxloss.step import LossReport, StepContext, StepPlan, guard_total, plain_backward
from auxloss.taps import Outputs
from auxloss.tasks import Task, batch_as_dict
from auxloss.weighting.base import Weighting

__all__ = ["LossReport", "Objective", "StepContext", "StepPlan"]


class Objective(nn.Module):
    """The main task plus auxiliary tasks, weighted by fixed values or schedules.

    Args:
        main: the main task; by default cross entropy of the main output against the batch key ``"target"``.
        aux: auxiliary tasks. Each one's ``weight`` is a float or a schedule of the step or epoch.
        batch_keys: names of the positions of a tuple batch, ``("input", "target")`` by default, so that a plain
            ``(x, y)`` loader works. Dict batches are used as they are.
        input_key: the batch key holding the model input (see :meth:`inputs`).
        nonfinite: ``"raise"`` stops on a NaN/Inf loss with an error naming the task and step; ``"skip"`` marks the
            report as not finite (the trainer then skips the update) and counts it in ``skipped_steps``.

    It is an ``nn.Module`` so that weightings with learnable state (uncertainty weights) and the step counter move
    with ``.to()`` and live in ``state_dict``.
    """

    def __init__(
        self,
        main: Task | None = None,
        aux: Sequence[Task] = (),
        *,
        batch_keys: Sequence[str] = ("input", "target"),
        input_key: str = "input",
        nonfinite: Literal["raise", "skip"] = "raise",
        weighting: Weighting | None = None,
    ) -> None:
        super().__init__()
        main = main if main is not None else Task("main", target="target")
        if isinstance(main, Task) and main.target is None:
            # A copy: the user's Task object is never changed behind their back.
            main = dataclasses.replace(main, target="target")
        self.main = main
        if not isinstance(self.main.target, str) and not callable(self.main.target):
            raise AuxLossError("the main task's target must be a batch key or a function of the batch.")
        self.aux_tasks: list[Task] = list(aux)
        names = [self.main.name] + [t.name for t in self.aux_tasks]
        seen: set[str] = set()
        for task, name in zip([self.main, *self.aux_tasks], names):
            if not isinstance(task, Task):
                raise AuxLossError(f"tasks must be auxloss.Task objects, got {type(task).__name__}.")
            if name in seen:
                raise AuxLossError(f"duplicate task name {name!r}: every task needs its own name.")
            seen.add(name)
        if nonfinite not in ("raise", "skip"):
            raise AuxLossError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}.")
        self.nonfinite = nonfinite
        self.batch_keys = tuple(batch_keys)
        self.input_key = input_key
        self.step = 0  # advanced by `advance()` once per optimizer step; saved with the state
        self.epoch = 0
        self.skipped_steps = 0
        self.weighting: Weighting | None = None
        if weighting is not None:
            self.set_weighting(weighting)

    # -- conveniences ----------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[Task]:
        """All tasks, main first."""
        return [self.main, *self.aux_tasks]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def inputs(self, batch: Any) -> Any:
        """The model input of a batch (``batch[input_key]``, or the first item of a tuple batch)."""
        named = batch_as_dict(batch, self.batch_keys)
        if self.input_key not in named:
            raise AuxLossError(
                f"the batch has no input key {self.input_key!r}; the keys present are {sorted(map(str, named))}. "
                "Pass input_key= to the Objective."
            )
        return named[self.input_key]

    def weights(self, step: int | None = None, epoch: int | None = None) -> dict[str, float]:
        """λ of every auxiliary task at ``step``/``epoch`` (defaults: the objective's own counters)."""
        step = self.step if step is None else step
        epoch = self.epoch if epoch is None else epoch
        out = {}
        for task in self.aux_tasks:
            w = task.schedule.value(step=step, epoch=epoch)
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise AuxLossError(
                    f"task {task.name!r}: its weight at step {step} (epoch {epoch}) is {w!r}; weights must be finite "
                    "and non-negative. Check its schedule."
                )
            out[task.name] = float(w)
        return out

    def set_weighting(self, weighting: Weighting | None) -> None:
        """Use an adaptive or gradient-aware strategy on top of the tasks' scheduled weights."""
        if weighting is not None:
            if not isinstance(weighting, Weighting):
                raise AuxLossError(f"weighting must be an auxloss.weighting strategy, got {type(weighting).__name__}.")
            weighting.bind(self.main.name, [t.name for t in self.aux_tasks])
        self.weighting = weighting

    def on_validation_end(self, metrics: dict[str, float]) -> None:
        """Forwarded by the trainer after each evaluation (strategies that follow the main task's progress)."""
        if self.weighting is not None:
            self.weighting.on_validation_end(metrics, higher_is_better=self.main.higher_is_better)

    def on_epoch_end(self, epoch: int) -> None:
        if self.weighting is not None:
            self.weighting.on_epoch_end(epoch)

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` optimizer steps (schedules read this counter)."""
        self.step += steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- the objective ---------------------------------------------------------------------------------------
    def forward(
        self, outputs: Outputs, batch: Any, *, step: int | None = None, epoch: int | None = None
    ) -> LossReport:
        """Compute every task's loss and metric and the weighted total."""
        if not isinstance(outputs, Outputs):
            outputs = Outputs(main=outputs)  # a plain model: only the main task can be scored
        step = self.step if step is None else int(step)
        named = batch_as_dict(batch, self.batch_keys)
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        batch_size = 0
        for task in self.tasks:
            pred = task.prediction(outputs)
            if task.is_emitted:  # the model computed this loss itself: no target, no metric
                losses[task.name] = pred.mean() if pred.dim() else pred
                continue
            target = task.resolve_target(named, self.main.target)
            losses[task.name] = task.loss_value(pred, target)
            metric = task.metric_value(pred, target)
            if metric is not None:
                metrics[task.name] = metric
            if task is self.main:
                batch_size = int(pred.shape[0])
        weights: dict[str, Any] = self.weights(step=step, epoch=epoch)
        extras: dict[str, float | Tensor] = {}
        main_weight: float | Tensor = 1.0
        if self.weighting is not None:
            mult = self.weighting.multipliers(losses, step=step, epoch=self.epoch if epoch is None else epoch)
            weights = {name: w * mult[name] for name, w in weights.items()}
            if self.weighting.symmetric:  # a symmetric control (RLW, FAMO) weights the main task too
                main_weight = mult[self.main.name]
        total = self._combine(losses, weights, main_weight)
        if self.weighting is not None:
            extra = self.weighting.extra_loss(losses)
            if extra is not None:
                total = total + extra
            extras.update(self.weighting.telemetry())
        guard = None
        if self.weighting is not None and self.weighting.custom_backward:
            total, guard = guard_total(total, type(self.weighting).__name__)
        report = LossReport(
            total=total,
            losses=losses,
            # a tensor multiplier stays a detached tensor: reading it here would cost a device sync every step
            weights={self.main.name: main_weight.detach() if isinstance(main_weight, Tensor) else float(main_weight),
                     **{k: w.detach() if isinstance(w, Tensor) else float(w)
                                            for k, w in weights.items()}},
            metrics=metrics,
            step=step,
            batch_size=batch_size,
            extras=extras,
            backward_guard=guard,
        )
        self._check_finite(report, named)
        return report

    @property
    def custom_backward(self) -> bool:
        """Whether the weighting takes over the backward pass (gradient-aware): then only
        :meth:`backward` applies it, and ``report.total.backward()`` raises."""
        return self.weighting is not None and self.weighting.custom_backward

    def before_step(self, ctx: StepContext | None = None) -> StepPlan:
        """Before the forward of a training micro-batch: the weighting prepares, and says what the loop must do.

        ``ctx`` is what the loop knows (learning rate, model, scale, scaler, DDP); the objective fills in its own
        step and epoch and which tap each auxiliary task reads alone. Without a weighting nothing happens.
        """
        if self.weighting is None:
            return StepPlan()
        return self.weighting.before_step(self._complete(ctx))

    def backward(self, report: LossReport, ctx: StepContext | None = None, *, scale: float = 1.0,
                 scaler: Any = None) -> None:
        """Back-propagate the step with the configured method: the plain ``total`` times the scale, or the
        gradient-aware weighting's own update.

        Give the step's ``ctx`` (as passed to :meth:`before_step`), or for a simple loop ``scale`` (``1/accumulate``
        for gradient accumulation) and ``scaler`` (a GradScaler) alone.
        """
        if ctx is None:
            ctx = StepContext(scale=scale, scaler=scaler)
        elif scale != 1.0 or scaler is not None:
            raise AuxLossError("give the scale and scaler either in the StepContext or as arguments, not both.")
        ctx = self._complete(ctx)
        if self.weighting is None:
            plain_backward(report, ctx)
            return
        guard = report.backward_guard
        if guard is not None:
            guard.armed = False  # the weighting may back-propagate the total itself
        try:
            self.weighting.backward(report, ctx)
        finally:
            if guard is not None:
                guard.armed = True

    def main_loss(self, forward: Any, batch: Any) -> Tensor:
        """The main task's loss of ``forward(inputs of batch)`` (``forward`` is the model, or a functional call of it
        with other parameters): what look-ahead strategies score on a validation batch (``StepContext.main_loss``)."""
        named = batch_as_dict(batch, self.batch_keys)
        outputs = forward(self.inputs(batch))
        if not isinstance(outputs, Outputs):
            outputs = Outputs(main=outputs)
        pred = self.main.prediction(outputs)
        if self.main.is_emitted:
            return pred.mean() if pred.dim() else pred
        return self.main.loss_value(pred, self.main.resolve_target(named, self.main.target))

    def _complete(self, ctx: StepContext | None) -> StepContext:
        """``ctx`` with the objective's own counters, the taps each auxiliary task reads alone, every task's source,
        and :meth:`main_loss`."""
        ctx = ctx if ctx is not None else StepContext()
        readers: dict[str, int] = {}
        for task in self.tasks:
            readers[task.source] = readers.get(task.source, 0) + 1
        own_taps = {t.name: t.source for t in self.aux_tasks
                    if readers[t.source] == 1 and t.source != "main" and not t.is_emitted}
        return dataclasses.replace(
            ctx, step=self.step if ctx.step is None else ctx.step,
            epoch=self.epoch if ctx.epoch is None else ctx.epoch, own_taps=own_taps,
            task_sources={t.name: t.source for t in self.tasks},
            main_loss=self.main_loss if ctx.main_loss is None else ctx.main_loss)

    def _combine(self, losses: Mapping[str, Tensor], weights: Mapping[str, Any], main_weight: Any = 1.0) -> Tensor:
        # Summed left to right in task order, so that fixed weights give exactly the hand-written formula
        # L + 0.3·L1 + 0.3·L2. A task at weight 0 still enters as 0·L: its head stays in the graph, so DDP never
        # sees an unused parameter while a curriculum has the task switched off.
        total = losses[self.main.name]
        if not (isinstance(main_weight, float) and main_weight == 1.0):  # only symmetric controls scale it
            total = main_weight * total
        for task in self.aux_tasks:
            total = total + weights[task.name] * losses[task.name]
        return total

    def _check_finite(self, report: LossReport, batch: Mapping[str, Any] | None = None) -> None:
        if bool(torch.isfinite(report.total.detach())):
            return
        bad = [n for n, v in report.losses.items() if not bool(torch.isfinite(v.detach()))]
        if self.nonfinite == "skip":
            report.finite = False
            if torch.is_grad_enabled():  # evaluation batches (no_grad) are not training steps
                self.skipped_steps += 1
            return
        detail = ", ".join(f"{n}={float(report.losses[n].detach())}" for n in bad) or "the weighted sum overflowed"
        # Only on this failure path (no cost otherwise): name the batch keys holding NaN/Inf, the usual culprit.
        dirty = sorted(str(k) for k, v in (batch or {}).items()
                       if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()))
        if dirty:
            raise AuxLossError(
                f"non-finite loss at step {report.step} in task(s) {bad or ['total']} ({detail}): this batch's "
                f"{dirty} hold NaN or Inf values. Clean the data (drop or impute those samples, e.g. with "
                "torch.nan_to_num), or use nonfinite='skip' to skip such batches and count them."
            )
        raise AuxLossError(
            f"non-finite loss at step {report.step} in task(s) {bad or ['total']} ({detail}). Lower the learning "
            "rate or that task's weight, check its inputs and targets for NaN, or use nonfinite='skip'."
        )

    # -- checkpointing ---------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "skipped_steps": self.skipped_steps,
            "schedules": {t.name: t.schedule.state_dict() for t in self.aux_tasks},
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        schedules = state.get("schedules", {})
        for task in self.aux_tasks:
            if task.name in schedules:
                task.schedule.load_state_dict(schedules[task.name])

    def extra_repr(self) -> str:
        parts = [f"main={self.main.name}<-{self.main.source}"]
        for t in self.aux_tasks:
            parts.append(f"{t.name}<-{t.source} λ={t.schedule!r}")
        return ", ".join(parts)

