"""OL-AUX: auxiliary weights learned online from the main task's one-step look-ahead.

Lin, Baweja, Kantor, Held, "Adaptive Auxiliary Task Weighting for Reinforcement Learning", NeurIPS 2019. After a
step ``θ' = θ − α·(g_0 + Σ_k w_k·g_k)``, the derivative of the main loss with respect to ``w_k`` is
``−α·∇L_0(θ')ᵀg_k ≈ −α·g_0ᵀg_k``. So each auxiliary task keeps a weight ``w_k`` (initially ``init``, multiplying
its scheduled ``λ_k``), and every ``horizon`` optimizer steps

    w_k ← max(0, w_k + β·Σ_t α_t·g_0(t)ᵀg_k(t))

with the sum over the window's steps, ``α_t`` the model's learning rate at step t and β the weights' learning rate.
On the shared parameters the update is ``g_0 + Σ_k w_k·λ_k·g_k``; a head's own parameters get ``λ_k·g_k``.

Details of this implementation:

- The horizon counts optimizer steps through ``objective.step`` (advanced by ``objective.advance()``, which the
  trainer calls); the update is applied at the first backward of the next window, before that step's
  combination. With gradient accumulation each micro-batch adds ``scale·α·g_0ᵀg_k`` (``scale`` = 1/accumulate),
  so a step contributes the mean of its micro-batches' products.
- ``g_0ᵀg_k`` is summed over ``stats_params`` when given, else over all shared parameters, in the true gradient
  domain (a GradScaler's scale is divided out).
- α: the step context's ``lr`` (the Trainer and the Lightning module pass the optimizer's current one each step),
  else ``lr=`` or :meth:`OLAux.set_lr`; the strategy cannot see the optimizer. Without any, the first backward
  raises.
- Amortized mode: the products are only measured on refresh steps, and each stands for the ``every`` backward
  calls it covers (it is added ``every`` times over); amortized steps use the current ``w_k``.
- Representation mode: ``g_0ᵀg_k`` is the product of the gradients at task k's tap (what reaches it from above,
  and the head's), a sum over the batch's samples on another scale than the parameters' product: retune β.
- Defaults (``beta=1.0``, ``horizon=5``, ``init=1.0``) are starting points chosen here, not the paper's tuned
  values: β needs tuning with the model's learning rate (the product ``β·α`` sets how fast the weights move).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from auxloss._checks import positive_finite
from auxloss.errors import AuxLossError
from auxloss.step import StepContext
from auxloss.weighting.grads import Combination, PerTaskGradientWeighting, TaskStats

__all__ = ["OLAux", "olaux_update"]


def olaux_update(weights: Tensor, accumulated: Tensor, beta: float) -> Tensor:
    """``max(0, w + β·Σ_t α_t·g_0ᵀg_k)``, where ``accumulated`` already holds ``Σ_t α_t·g_0ᵀg_k`` per task."""
    return (weights + beta * accumulated).clamp(min=0.0)


class OLAux(PerTaskGradientWeighting):
    """Learn each auxiliary task's weight from ``g_0ᵀg_k`` accumulated over a horizon (Lin et al. 2019).

    Args:
        beta: the weights' learning rate β.
        lr: the model's learning rate α; ``None`` = set it with :meth:`set_lr` before training.
        horizon: optimizer steps between weight updates (N in the paper).
        init: the initial ``w_k``.
        mode, every, stats_params, params: see :class:`~auxloss.weighting.grads.PerTaskGradientWeighting`.

    The weights are ``aux_weights`` (one per task, bound order); ``accumulated`` holds the window's
    ``Σ_t α_t·g_0ᵀg_k``. Both checkpoint with the objective.
    """

    def __init__(
        self,
        beta: float = 1.0,
        lr: float | None = None,
        horizon: int = 5,
        *,
        init: float = 1.0,
        mode: str = "exact",
        every: int = 10,
        stats_params: Iterable[Tensor] | None = None,
        params: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        positive_finite("beta", beta)
        positive_finite("lr", lr, none_ok=True)
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise AuxLossError(f"horizon must be a positive integer (optimizer steps), got {horizon!r}.")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init) or init < 0:
            raise AuxLossError(f"init must be a finite non-negative number, got {init!r}.")
        super().__init__(mode=mode, every=every, stats_params=stats_params, params=params)
        self.beta = float(beta)
        self.lr = None if lr is None else float(lr)
        self.horizon = horizon
        self.init = float(init)
        self.aux_weights = torch.zeros(0, dtype=torch.float64)
        self.accumulated = torch.zeros(0, dtype=torch.float64)
        self.window_start = 0  # objective.step at the start of the current window
        self.updates = 0

    def bind(self, main: str, aux: list[str]) -> None:
        super().bind(main, aux)
        self.aux_weights = torch.full((len(aux),), self.init, dtype=torch.float64)
        self.accumulated = torch.zeros(len(aux), dtype=torch.float64)

    def set_lr(self, lr: float) -> None:
        """The model's current learning rate α (call before each backward when it follows a schedule)."""
        positive_finite("lr", lr)
        self.lr = float(lr)

    def _before_step(self, ctx: StepContext) -> None:
        if ctx.lr is not None:  # the loop's learning rate in force for this step (it may follow a schedule)
            lr = float(ctx.lr)
            if not (math.isfinite(lr) and lr >= 0):  # 0 is a valid end of a schedule: the step moves nothing
                raise AuxLossError(f"OLAux: the optimizer's learning rate is {lr!r}; it must be finite and >= 0.")
            self.lr = lr
        step = int(ctx.step if ctx.step is not None else 0)
        # the objective's counter went back (a new run): start a new window there
        self.window_start = min(self.window_start, step)
        if step - self.window_start >= self.horizon:
            accumulated = self.accumulated.to(self.aux_weights.device)
            self.aux_weights = olaux_update(self.aux_weights, accumulated, self.beta)
            self.accumulated = torch.zeros_like(self.accumulated)
            self.window_start = step
            self.updates += 1

    def _combine(self, stats: list[TaskStats], *, scale: float) -> list[Combination]:
        if self.lr is None:
            raise AuxLossError(
                "OLAux needs the model's learning rate: pass OLAux(lr=...), call weighting.set_lr(lr), or give it in "
                "the step context, objective.backward(report, StepContext(lr=...)) (each step, if the learning "
                "rate follows a schedule)."
            )
        device = stats[0].dot.device if stats else torch.device("cpu")
        self.aux_weights = self.aux_weights.to(device)
        self.accumulated = self.accumulated.to(device)
        span = self.every if self.mode == "amortized" else 1
        out = []
        for s in stats:
            w = self.aux_weights[s.index]
            if s.has_shared:
                self.accumulated[s.index] += span * scale * self.lr * s.s_dot.to(self.accumulated.dtype)
            weight = w * s.lam
            out.append(Combination(aux=weight, effective=weight, multiplier=w))
        return out

    def _amortized_multipliers(self) -> Tensor | None:
        return None if self._cached is None else self.aux_weights.clone()

    def telemetry(self) -> dict[str, Tensor]:
        return self._weights_telemetry("olaux_w", self.aux_weights)

    def _state(self) -> dict[str, Any]:
        return {
            "aux_weights": self.aux_weights.detach().cpu().clone(),
            "accumulated": self.accumulated.detach().cpu().clone(),
            "window_start": self.window_start,
            "updates": self.updates,
            "lr": self.lr,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.aux_weights = torch.as_tensor(state["aux_weights"], dtype=torch.float64).clone()
        self.accumulated = torch.as_tensor(state["accumulated"], dtype=torch.float64).clone()
        self.window_start = int(state["window_start"])
        self.updates = int(state.get("updates", 0))
        if state.get("lr") is not None:
            self.lr = float(state["lr"])

    def _args_repr(self) -> str:
        return f"beta={self.beta}, lr={self.lr}, horizon={self.horizon}, init={self.init}"
