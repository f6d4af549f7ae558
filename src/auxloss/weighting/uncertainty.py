"""Uncertainty weighting: learn each auxiliary task's weight as a homoscedastic noise level.

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics",
CVPR 2018. Each task gets a learnt log-variance ``s_k = log σ_k²``; the paper's objective is
``L_k/(2σ_k²) + log σ_k`` for a regression task and ``L_k/σ_k² + log σ_k`` for a classification one. We use the
common simplified form, the same for every kind of loss::

    L_total = L_main + Σ_k ( exp(−s_k) · λ_k(t) · L_k  +  s_k / 2 )

(for regression it is the paper's term with ``s`` shifted by ``log 2``, a constant; for classification it halves
the regulariser). The multipliers are ``m_k = exp(−s_k)``, returned as tensors with their graph so that the
trainer's optimizer, which sees the objective's parameters, learns ``s`` from the total; ``Σ s_k/2`` is the
:meth:`~Uncertainty.extra_loss`. Minimising over ``s_k`` alone gives ``exp(−s_k) = 1/(2·λ_k·L_k)``: a task whose
loss stays high (noisy, hard) is weighted down.

Only the auxiliary tasks are weighted: the main task's weight stays 1 (it is the task we care about; letting its
σ grow would trade it away for the auxiliary ones). Default ``init=0.0`` (every multiplier starts at 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from auxloss.errors import AuxLossError
from auxloss.weighting.base import LossWeighting

__all__ = ["Uncertainty"]


class Uncertainty(LossWeighting):
    """Learnt ``s_k = log σ_k²`` per auxiliary task; multiplier ``exp(−s_k)``, extra loss ``Σ s_k/2``.

    Args:
        init: the initial ``s`` of every auxiliary task, or a mapping task name → initial ``s`` covering each of
            them. ``0.0`` starts every multiplier at 1.

    ``s`` is the parameter ``log_var`` (one entry per auxiliary task, in task order), created when the objective
    binds the strategy, so build the optimizer after the objective (the :class:`~auxloss.train.Trainer` does).
    Telemetry: ``log_var/<task>``.
    """

    def __init__(self, init: float | Mapping[str, float] = 0.0) -> None:
        super().__init__()
        values = init.values() if isinstance(init, Mapping) else [init]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise AuxLossError(f"Uncertainty: init must be a finite number (or a mapping of task name to one), "
                                   f"got {init!r}.")
        self.init: float | dict[str, float] = dict(init) if isinstance(init, Mapping) else float(init)
        self.log_var: nn.Parameter | None
        self.register_parameter("log_var", None)  # created in bind(), once the tasks are known

    def bind(self, main: str, aux: list[str]) -> None:
        super().bind(main, aux)
        if isinstance(self.init, dict):
            missing = [n for n in aux if n not in self.init]
            unknown = [n for n in self.init if n not in aux]
            if missing or unknown:
                raise AuxLossError(f"Uncertainty: init must give one value per auxiliary task {aux}; missing "
                                   f"{missing}, unknown {unknown}.")
            start = [float(self.init[n]) for n in aux]
        else:
            start = [self.init] * len(aux)
        self.log_var = nn.Parameter(torch.tensor(start, dtype=torch.get_default_dtype()))

    def _s(self) -> Tensor:
        if self.log_var is None:
            raise AuxLossError("Uncertainty is not bound to an objective yet: pass it as Objective(weighting=...).")
        return self.log_var

    def multipliers(self, losses: dict[str, Tensor], *, step: int, epoch: int) -> dict[str, Tensor | float]:
        mult = torch.exp(-self._s())  # keeps the graph: s learns through the total
        return {name: mult[i] for i, name in enumerate(self.aux_names)}

    def extra_loss(self, losses: dict[str, Tensor]) -> Tensor | None:
        return 0.5 * self._s().sum()

    def telemetry(self) -> dict[str, Tensor]:
        if self.log_var is None:
            return {}
        values = self.log_var.detach().clone()  # a copy: the optimizer changes the parameter in place
        return {f"log_var/{name}": values[i] for i, name in enumerate(self.aux_names)}

    def extra_repr(self) -> str:
        return f"init={self.init!r}"
