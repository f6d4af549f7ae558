"""Random Loss Weighting: fresh random task weights every training step, a cheap symmetric control.

Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
TMLR 2022 (arXiv 2111.10603, 2021). With T = 1 + K tasks (the main task included), every training forward draws

    z ~ N(0, I_T),     w = total · softmax(z),     L_total = Σ_i w_i · λ_i · L_i      (λ_main = 1)

The paper's default distribution is the softmax of standard normals, so the weights sum to 1 (``total=1.0``). The
update is a random convex combination of the task gradients; in expectation every task gets ``total/T``.

**A symmetric control.** RLW treats the main task like any other task (``symmetric = True``): its weight is
drawn too, so the main task's weight is *not* 1, unlike every main-task-first strategy. It belongs in a table as
the control that any adaptive method must beat.

**Cost.** One backward pass per step (a plain backward of the weighted sum), plus T random numbers.

**Randomness and resume.** The draws come from the strategy's own ``torch.Generator``, seeded once from ``seed``
(default: the run's seed, ``torch.initial_seed()``, read when the strategy is bound, which draws nothing from the
global RNG), so that the data order and dropout masks of a run with RLW match those of its paired baseline. The
generator's state is saved with the objective, so a resumed run draws the same weights as an uninterrupted one.
Every rank of a DDP run starts from the same seed and so draws the same weights. Draws happen on training forwards
only (gradients enabled); evaluation uses the expected weights ``total/T``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from auxloss.errors import AuxLossError
from auxloss.weighting.base import LossWeighting

__all__ = ["RLW", "rlw_weights"]


def rlw_weights(z: Tensor, total: float = 1.0) -> Tensor:
    """``total · softmax(z)``: the RLW weights from the standard-normal draws ``z`` (main task first)."""
    return total * torch.softmax(z, dim=0)


class RLW(LossWeighting):
    """Random loss weighting (Lin et al. 2022): ``w = total·softmax(z)``, ``z ~ N(0, I)`` drawn every training step.

    Args:
        total: the sum of the weights; 1.0 as in the paper, or the number of tasks for the scale of equal weights.
        seed: the generator's seed; ``None`` = the run's seed (``torch.initial_seed()`` when the strategy is bound).

    Telemetry: ``rlw_w/<task>`` for every task, the main task included.
    """

    symmetric = True

    def __init__(self, total: float = 1.0, seed: int | None = None) -> None:
        super().__init__()
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not (math.isfinite(total) and total > 0):
            raise AuxLossError(f"RLW: total must be a positive finite number (the sum of the weights), got {total!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise AuxLossError(f"RLW: seed must be an integer or None (the run's seed), got {seed!r}.")
        self.total = float(total)
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.draws = 0
        self._last: Tensor | None = None

    def bind(self, main: str, aux: list[str]) -> None:
        super().bind(main, aux)
        self._generator = torch.Generator().manual_seed(self.seed if self.seed is not None else torch.initial_seed())
        self.draws = 0

    def multipliers(self, losses: dict[str, Tensor], *, step: int, epoch: int) -> dict[str, Tensor | float]:
        if self._generator is None:
            raise AuxLossError("RLW is not bound to an objective yet: pass it as Objective(weighting=...).")
        names = [self.main_name, *self.aux_names]
        if torch.is_grad_enabled():
            # drawn on the CPU from the strategy's own generator: the same numbers on every device and rank
            z = torch.randn(len(names), generator=self._generator, dtype=torch.float64)
            w = rlw_weights(z, self.total)
            self.draws += 1
            self._last = w
        else:  # evaluation: the expected weights
            w = torch.full((len(names),), self.total / len(names), dtype=torch.float64)
        return {n: float(w[i]) for i, n in enumerate(names)}

    def telemetry(self) -> dict[str, Tensor]:
        if self._last is None:
            return {}
        return {f"rlw_w/{n}": self._last[i].clone() for i, n in enumerate([self.main_name, *self.aux_names])}

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": None if self._generator is None else self._generator.get_state(), "draws": self.draws,
                "last": None if self._last is None else self._last.clone()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None:
            if self._generator is None:
                self._generator = torch.Generator()
            self._generator.set_state(state["generator"])
        self.draws = int(state.get("draws", 0))
        last = state.get("last")
        self._last = None if last is None else torch.as_tensor(last, dtype=torch.float64).clone()

    def extra_repr(self) -> str:
        return f"total={self.total}, seed={self.seed}"
