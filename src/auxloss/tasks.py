"""Tasks: where a prediction comes from, what its target is, how it is scored.

There is one main task and any number of auxiliary tasks. A target is a key of the batch, the main task's
label (``target=None`` on an auxiliary task: deep supervision), or a function of the batch that computes it
(for example the dominant colour of an image as a colour class).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from auxloss.errors import AuxLossError
from auxloss.schedules import Schedule, as_schedule
from auxloss.taps import Outputs, Selector, select

__all__ = ["LOSSES", "METRICS", "Task", "batch_as_dict"]

LossFn = Callable[[Tensor, Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor], Tensor | float]
Target = str | Callable[[Mapping[str, Any]], Tensor] | None


def _identity(pred: Tensor, target: Any = None) -> Tensor:
    return pred.mean() if pred.dim() else pred


def _cross_entropy(pred: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(pred, target)


def _bce(pred: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred, target.to(pred.dtype))


def _l1(pred: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(pred, target.to(pred.dtype))


def _smooth_l1(pred: Tensor, target: Tensor) -> Tensor:
    return F.smooth_l1_loss(pred, target.to(pred.dtype))


#: Built-in losses by name. ``bce`` takes logits (it is ``binary_cross_entropy_with_logits``).
LOSSES: dict[str, LossFn] = {
    "cross_entropy": _cross_entropy,
    "ce": _cross_entropy,
    "bce": _bce,
    "mse": _mse,
    "l1": _l1,
    "smooth_l1": _smooth_l1,
}


def _accuracy(pred: Tensor, target: Tensor) -> Tensor:
    if target.dtype.is_floating_point and target.shape == pred.shape:  # soft labels
        target = target.argmax(dim=1)
    return (pred.argmax(dim=1) == target).float().mean()


def _binary_accuracy(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred > 0) == (target > 0.5)).float().mean()


def _mse_metric(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred.float(), target.float())


def _mae_metric(pred: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(pred.float(), target.float())


#: Built-in metrics by name, with whether higher is better.
METRICS: dict[str, tuple[MetricFn, bool]] = {
    "accuracy": (_accuracy, True),
    "binary_accuracy": (_binary_accuracy, True),
    "mse": (_mse_metric, False),
    "mae": (_mae_metric, False),
}

_DEFAULT_METRIC = {"cross_entropy": "accuracy", "ce": "accuracy", "bce": "binary_accuracy",
                   "mse": "mse", "l1": "mae", "smooth_l1": "mae"}


@dataclasses.dataclass
class Task:
    """One task of the objective.

    Args:
        name: unique name, used in logs and reports.
        source: ``"main"`` for the model's main output, or the name of a tap.
        target: a batch key; ``None`` means the main task's target (for auxiliary tasks: deep supervision); or a
            callable ``f(batch) -> Tensor`` computing it from the batch (a dict, tuple batches are named first).
        loss: ``"cross_entropy"``, ``"bce"``, ``"mse"``, ``"l1"``, ``"smooth_l1"``, or ``f(pred, target)``.
        metric: a name from :data:`METRICS`, ``"auto"`` (follows the loss), a callable ``f(pred, target)`` or
            ``None``.
        weight: λ for an auxiliary task: a float or a :class:`~auxloss.schedules.Schedule`. Ignored for the main
            task, whose weight is always 1.
        higher_is_better: direction of a callable metric (``None``: higher is better). A built-in metric knows
            its own direction and sets it; giving the opposite one is an error, never silently overridden.
        select: picks a tensor out of a structured output (see :func:`auxloss.taps.select`).
    """

    name: str
    source: str = "main"
    target: Target = None
    loss: str | LossFn = "cross_entropy"
    metric: str | MetricFn | None = "auto"
    weight: float | Schedule = 1.0
    higher_is_better: bool | None = None
    select: Selector = None

    @classmethod
    def emitted(cls, name: str, *, weight: float | Schedule = 1.0, loss_name: str | None = None) -> Task:
        """A task for a loss the model computes itself (:func:`auxloss.emit`, or a Hugging Face ``aux_loss``).

        Its "prediction" is the emitted loss (averaged if not a scalar); it has no target and no metric.
        """
        return cls(name, source=f"loss:{loss_name or name}", loss=_identity, metric=None, weight=weight)

    @property
    def is_emitted(self) -> bool:
        return self.source.startswith("loss:")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise AuxLossError(f"task name must be a non-empty string without '/', got {self.name!r}.")
        if isinstance(self.loss, str):
            if self.loss not in LOSSES:
                raise AuxLossError(
                    f"task {self.name!r}: unknown loss {self.loss!r}; use one of {sorted(LOSSES)} or a callable."
                )
            self._loss_fn: LossFn = LOSSES[self.loss]
        elif callable(self.loss):
            self._loss_fn = self.loss
        else:
            raise AuxLossError(f"task {self.name!r}: loss must be a name or a callable, got {self.loss!r}.")
        metric = self.metric
        if metric == "auto":
            metric = _DEFAULT_METRIC.get(self.loss) if isinstance(self.loss, str) else None
        self._metric_fn: MetricFn | None
        if metric is None:
            self._metric_fn, self.metric_name = None, None
        elif isinstance(metric, str):
            if metric not in METRICS:
                raise AuxLossError(
                    f"task {self.name!r}: unknown metric {metric!r}; use one of {sorted(METRICS)} or a callable."
                )
            self._metric_fn, own = METRICS[metric]
            if self.higher_is_better is not None and bool(self.higher_is_better) != own:
                raise AuxLossError(
                    f"task {self.name!r}: metric {metric!r} is {'higher' if own else 'lower'} is better, but "
                    f"higher_is_better={self.higher_is_better!r} was given; drop higher_is_better (built-in metrics "
                    "know their direction), or pass your own metric function with the direction you mean."
                )
            self.higher_is_better = own
            self.metric_name = metric
        elif callable(metric):
            self._metric_fn, self.metric_name = metric, getattr(metric, "__name__", "metric")
        else:
            raise AuxLossError(f"task {self.name!r}: metric must be a name, a callable or None, got {metric!r}.")
        if self.higher_is_better is None:
            self.higher_is_better = True  # a callable metric's (or no metric's) documented default
        try:
            self.schedule: Schedule = as_schedule(self.weight)
        except AuxLossError as exc:
            raise AuxLossError(f"task {self.name!r}: {exc}") from None
        self._checks_left = 20  # thorough target checks on the first batches of an accelerator run

    # -- prediction and target -------------------------------------------------------------------------------
    def prediction(self, outputs: Outputs) -> Tensor:
        """This task's prediction out of the model's outputs (for an emitted loss: the loss itself)."""
        if self.is_emitted:
            key = self.source[len("loss:"):]
            if key not in outputs.losses:
                raise AuxLossError(
                    f"task {self.name!r}: the model emitted no loss named {key!r} in this forward; it emitted "
                    f"{sorted(outputs.losses)}. Call auxloss.emit({key!r}, loss) inside a module's forward, or fix the "
                    "name."
                )
            return outputs.losses[key]
        if self.source != "main" and self.source not in outputs.aux:
            raise AuxLossError(
                f"task {self.name!r}: source {self.source!r} is neither 'main' nor a tap; the taps are "
                f"{sorted(outputs.aux)}. Set `source` to one of them."
            )
        return select(outputs[self.source], self.select)

    def resolve_target(self, batch: Mapping[str, Any], main_target: Target) -> Tensor:
        """The target for this task out of a dict batch; ``main_target`` stands in when ``target`` is None."""
        target = self.target if self.target is not None else main_target
        if callable(target):
            try:
                value = target(batch)
            except AuxLossError:
                raise
            except Exception as exc:
                raise AuxLossError(
                    f"task {self.name!r}: its target function {getattr(target, '__name__', target)!r} failed on "
                    f"the batch (keys {sorted(batch)}): {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(value, Tensor):
                raise AuxLossError(
                    f"task {self.name!r}: its target function must return a tensor, got {type(value).__name__}."
                )
            return value
        if target not in batch:
            raise AuxLossError(
                f"task {self.name!r}: the batch has no target key {target!r}; the keys present are "
                f"{sorted(map(str, batch))}. Set the task's `target` to one of them, or give a function of the batch."
            )
        return batch[target]

    # -- loss and metric -------------------------------------------------------------------------------------
    def loss_value(self, pred: Any, target: Any) -> Tensor:
        """The loss, after checking that the prediction's shape fits the target.

        A callable loss gets the prediction and target as they are (any structure: a head may return a tuple),
        and checks them itself; built-in losses get them checked and fitted.
        """
        if callable(self.loss):
            try:
                return self._loss_fn(pred, target)
            except AuxLossError:
                raise
            except (RuntimeError, IndexError, ValueError, TypeError) as exc:
                raise AuxLossError(f"task {self.name!r}: its loss function failed: {type(exc).__name__}: {exc}") \
                    from exc
        pred, target = self._fit(pred, target)
        try:
            return self._loss_fn(pred, target)
        except AuxLossError:
            raise
        except (RuntimeError, IndexError, ValueError) as exc:
            raise AuxLossError(
                f"task {self.name!r}: its loss failed on prediction {tuple(pred.shape)} {pred.dtype} and target "
                f"{tuple(target.shape)} {target.dtype}: {exc}"
            ) from exc

    def metric_value(self, pred: Any, target: Any) -> Tensor | None:
        if self._metric_fn is None:
            return None
        if not callable(self.loss):
            pred, target = self._fit(pred, target)
        with torch.no_grad():
            value = self._metric_fn(pred.detach(), target)
        return value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))

    def _fit(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(pred, Tensor):
            raise AuxLossError(
                f"task {self.name!r}: its prediction is a {type(pred).__name__}, not a tensor; give the task a "
                "`select` that picks the tensor out of it."
            )
        if not isinstance(target, Tensor):
            target = torch.as_tensor(target)
        if target.device != pred.device:
            target = target.to(pred.device, non_blocking=True)
        if pred.shape[0] != target.shape[0]:
            raise AuxLossError(
                f"task {self.name!r}: prediction has batch size {pred.shape[0]} but its target has {target.shape[0]}."
            )
        if self.loss in ("cross_entropy", "ce"):
            return pred, self._fit_classes(pred, target)
        if isinstance(self.loss, str) and pred.shape != target.shape:  # regression and bce: shapes must agree
            if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1 and pred.shape[:-1] == target.shape:
                pred = pred.squeeze(-1)
            else:
                raise AuxLossError(
                    f"task {self.name!r}: head output shape {tuple(pred.shape)} does not fit target shape "
                    f"{tuple(target.shape)} for loss {self.loss!r}; make the head output "
                    f"{tuple(target.shape[1:]) or 1} values per sample."
                )
        return pred, target

    def _fit_classes(self, pred: Tensor, target: Tensor) -> Tensor:
        if target.dtype.is_floating_point and target.shape == pred.shape:
            return target  # class probabilities (soft labels)
        if target.dtype.is_floating_point:
            raise AuxLossError(
                f"task {self.name!r}: cross entropy needs integer class labels, got a {target.dtype} target of shape "
                f"{tuple(target.shape)}; use loss='mse' for a regression target, or cast it with .long()."
            )
        if pred.dim() != target.dim() + 1 or pred.shape[2:] != target.shape[1:]:
            raise AuxLossError(
                f"task {self.name!r}: head output shape {tuple(pred.shape)} does not fit class labels of shape "
                f"{tuple(target.shape)}: cross entropy needs (N, C{', ...' if target.dim() > 1 else ''}) logits "
                f"for (N{', ...' if target.dim() > 1 else ''}) labels."
            )
        # Out-of-range labels give an opaque device assert on CUDA, so check them: always on the CPU (free), and
        # on the first batches elsewhere (a per-step check would cost a device sync).
        if target.numel() and (target.device.type == "cpu" or self._checks_left > 0):
            self._checks_left -= 1
            lo, hi = int(target.min()), int(target.max())
            n_classes = pred.shape[1]
            if lo < 0 and lo != -100 or hi >= n_classes:
                raise AuxLossError(
                    f"task {self.name!r}: labels out of range: they span [{lo}, {hi}] but the head predicts "
                    f"{n_classes} classes (0..{n_classes - 1}). Give the head as many outputs as there are classes."
                )
        return target.long()


def batch_as_dict(batch: Any, keys: Sequence[str]) -> Mapping[str, Any]:
    """A dict view of a batch: dicts pass through, tuples/lists are named by ``keys`` in order."""
    if isinstance(batch, Mapping):
        return batch
    if isinstance(batch, (tuple, list)):
        if len(batch) > len(keys):
            raise AuxLossError(
                f"a tuple batch has {len(batch)} items but only {len(keys)} names {tuple(keys)}; pass "
                f"batch_keys= with a name for every position to the Objective."
            )
        return dict(zip(keys, batch))
    if isinstance(batch, Tensor):
        return {keys[0]: batch}
    raise AuxLossError(f"a batch must be a dict, a tuple or a tensor, got {type(batch).__name__}.")
