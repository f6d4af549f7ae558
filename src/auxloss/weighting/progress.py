"""Main-progress weighting: raise the auxiliary weights while the main task improves, lower them when it does not.

This is the rule people describe first when asked how to weight auxiliary losses by hand, made explicit: start
with small auxiliary multipliers; after each validation, if the main task's validation metric improved on its best
so far, raise them by one step; if it got worse than at the previous validation, lower them by one step at once;
if it merely stalled (no new best for ``patience`` validations in a row), lower them by one step. The multiplier
stays within ``[min, max]``.

With ``m`` the multiplier, ``v`` the new validation value, ``best`` the best so far and ``last`` the previous
value (comparisons in the metric's direction)::

    first validation    best = last = v                   (m unchanged: nothing to compare with yet)
    v better than best  m ← up(m),   best = v, stale = 0
    v worse than last   m ← down(m), stale = 0
    otherwise           stale += 1; if stale ≥ patience: m ← down(m), stale = 0
    additive:           up(m) = m + step        down(m) = m − step
    multiplicative:     up(m) = m · (1 + step)  down(m) = m / (1 + step)

then ``m`` is clipped to ``[min, max]`` and ``last = v``. A non-finite ``v`` (a diverged run) counts as worse.

**One multiplier shared by all auxiliary tasks.** The signal, the main task's validation metric, is a single number
per epoch: it says whether the auxiliary losses *together* helped, not which one did, so per-task multipliers
would all receive the same updates anyway. Each task's own balance comes from its λ (its schedule); this strategy
scales all of them together. To weight tasks apart by their own signal use DWA, uncertainty or GradNorm weighting.

The metric read is ``"val/metric/<main>"`` in the main task's direction, or ``"val/loss/<main>"`` (lower is
better) when the main task has no metric, ``<main>`` being the main task's name (``"main"`` by default). It
needs a validation split: without one it raises :class:`AuxLossError`. Evaluation batches never change its
state; it changes only in :meth:`MainProgress.on_validation_end`.

Defaults: ``start=0.1, step=0.1, min=0.0, max=1.0, patience=1, mode="additive"``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from auxloss.errors import AuxLossError
from auxloss.weighting.base import LossWeighting

__all__ = ["MainProgress", "progress_update"]

_MODES = ("additive", "multiplicative")


def progress_update(
    mult: float, value: float, best: float | None, last: float | None, stale: int, *, higher_is_better: bool,
    step: float, min: float, max: float, patience: int, mode: str,
) -> tuple[float, float | None, float | None, int]:
    """One validation of the rule above, as a pure function: returns ``(mult, best, last, stale)``."""
    finite = math.isfinite(value)
    if best is None or last is None:  # the first validation sets the reference
        if not finite:
            return _down(mult, step, mode, min, max), None, None, 0
        return mult, value, value, 0

    def better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    if finite and better(value, best):
        return _up(mult, step, mode, min, max), value, value, 0
    if not finite or better(last, value):  # worse than the previous validation: lower now
        return _down(mult, step, mode, min, max), best, (value if finite else last), 0
    stale += 1
    if stale >= patience:
        return _down(mult, step, mode, min, max), best, value, 0
    return mult, best, value, stale


def _up(m: float, step: float, mode: str, lo: float, hi: float) -> float:
    return _clip(m + step if mode == "additive" else m * (1.0 + step), lo, hi)


def _down(m: float, step: float, mode: str, lo: float, hi: float) -> float:
    return _clip(m - step if mode == "additive" else m / (1.0 + step), lo, hi)


def _clip(m: float, lo: float, hi: float) -> float:
    return max(lo, min(m, hi))


class MainProgress(LossWeighting):
    """Raise the auxiliary multiplier while the main validation metric improves; lower it when it stalls or worsens.

    Args:
        start: the multiplier before any validation (small: the auxiliary losses start gently).
        step: the change per validation: added/subtracted (``"additive"``) or a factor ``1 + step``
            (``"multiplicative"``).
        min, max: bounds of the multiplier, ``0 ≤ min ≤ start ≤ max``.
        patience: validations without a new best before a stall lowers the multiplier (a worsening lowers it at once).
        mode: ``"additive"`` or ``"multiplicative"`` (which needs ``start > 0``).

    The multiplier ``m`` is shared by every auxiliary task (see the module docstring for why); task k's effective
    weight is ``λ_k(t)·m``. Telemetry: ``mult/<task>``.
    """

    def __init__(
        self, start: float = 0.1, step: float = 0.1, min: float = 0.0, max: float = 1.0, patience: int = 1,
        mode: Literal["additive", "multiplicative"] = "additive",
    ) -> None:
        super().__init__()
        for arg, value in (("start", start), ("step", step), ("min", min), ("max", max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AuxLossError(f"MainProgress: {arg} must be a finite number, got {value!r}.")
        if step <= 0:
            raise AuxLossError(f"MainProgress: step must be positive, got {step!r}.")
        if min < 0:
            raise AuxLossError(f"MainProgress: min must be non-negative, got {min!r}.")
        if max < min:
            raise AuxLossError(f"MainProgress: max ({max!r}) must be at least min ({min!r}).")
        if not min <= start <= max:
            raise AuxLossError(f"MainProgress: start must lie in [min, max] = [{min}, {max}], got {start!r}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise AuxLossError(f"MainProgress: patience must be a positive integer, got {patience!r}.")
        if mode not in _MODES:
            raise AuxLossError(f"MainProgress: mode must be one of {list(_MODES)}, got {mode!r}.")
        if mode == "multiplicative" and start <= 0:
            raise AuxLossError("MainProgress: start must be positive in multiplicative mode (0 can never grow); "
                               f"got start={start!r}.")
        self.start, self.step, self.min, self.max = float(start), float(step), float(min), float(max)
        self.patience, self.mode = patience, mode
        self.mult = self.start
        self.best: float | None = None
        self.last: float | None = None
        self.stale = 0
        self.validations = 0

    def multipliers(self, losses: dict[str, Tensor], *, step: int, epoch: int) -> dict[str, Tensor | float]:
        return {name: self.mult for name in self.aux_names}

    def on_validation_end(self, metrics: dict[str, float], *, higher_is_better: bool) -> None:
        metric, loss = f"val/metric/{self.main_name}", f"val/loss/{self.main_name}"
        if metric in metrics:
            value, higher = float(metrics[metric]), higher_is_better
        elif loss in metrics:
            value, higher = float(metrics[loss]), False
        else:
            raise AuxLossError(
                "MainProgress follows the main task's validation metric, but the evaluation gave neither "
                f"{metric!r} nor {loss!r} (keys: {sorted(metrics)[:8]}). Pass a validation loader to "
                "Trainer.fit, or use another weighting."
            )
        self.mult, self.best, self.last, self.stale = progress_update(
            self.mult, value, self.best, self.last, self.stale, higher_is_better=higher, step=self.step,
            min=self.min, max=self.max, patience=self.patience, mode=self.mode,
        )
        self.validations += 1

    def telemetry(self) -> dict[str, Tensor]:
        # the multiplier is a host-side float (it changes only at validations): a CPU tensor costs no device sync
        mult = torch.tensor(self.mult, dtype=torch.float64)
        return {f"mult/{name}": mult for name in self.aux_names}

    def get_extra_state(self) -> dict[str, Any]:
        return {"mult": self.mult, "best": self.best, "last": self.last, "stale": self.stale,
                "validations": self.validations}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.mult = float(state["mult"])
        self.best = None if state["best"] is None else float(state["best"])
        self.last = None if state["last"] is None else float(state["last"])
        self.stale = int(state["stale"])
        self.validations = int(state.get("validations", 0))

    def extra_repr(self) -> str:
        return (f"start={self.start}, step={self.step}, min={self.min}, max={self.max}, patience={self.patience}, "
                f"mode={self.mode!r}")
