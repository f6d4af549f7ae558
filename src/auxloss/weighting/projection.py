"""Asymmetric gradient projection: the PCGrad rule, applied to the auxiliary gradients only.

The projection rule of Yu et al., "Gradient Surgery for Multi-Task Learning" (PCGrad, NeurIPS 2020), with the main
task as primary: an auxiliary gradient that conflicts with the main one loses its component along ``g_0``, and
``g_0`` itself is never touched. On the parameters that the main task and task k share:

    g_k' = g_k − (g_k·g_0 / ‖g_0‖²)·g_0   if g_k·g_0 < 0,   else g_k
    update = g_0 + Σ_k λ_k·g_k'

so ``update·g_0 ≥ ‖g_0‖²``: no auxiliary task slows the main task's first-order progress. Each task is projected
against ``g_0`` on its own shared set, so on a tensor the coefficient of ``g_0`` is
``1 − Σ_k λ_k·min(0, g_k·g_0)/‖g_0‖²`` over the tasks sharing it (never below 1).

Subset and amortized mode: the projection needs the full shared vectors (a coefficient estimated on a subset
would not remove the conflict on the rest), so in exact steps it always uses them; ``stats_params`` then narrows
the telemetry and the amortized decision only. A projected ``g_k'`` is not a multiple of ``g_k``, and the only
multiple that keeps ``update·g_0 ≥ ‖g_0‖²`` for a conflicting task is 0, so amortized steps *gate*: ``m_k = 1``
when the last refresh saw ``g_k·g_0 ≥ 0`` (on the statistics set), else 0. The effective weight reported in exact
steps is the least-squares coefficient of the contribution on ``g_k``: ``λ_k·(1 − cos²)`` for a conflicting task,
``λ_k`` otherwise.

Representation mode projects at each tap: ``g_k`` is task k's gradient at its tapped tensor and ``g_0`` the one
reaching that tensor from above, so the guarantee holds there (see :mod:`~auxloss.weighting.representation`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from auxloss.weighting.grads import Combination, PerTaskGradientWeighting, TaskStats, cosine

__all__ = ["Projection", "projection_coefficients"]


def projection_coefficients(dot: Tensor, sq0: Tensor) -> Tensor:
    """``a_k = min(0, g_k·g_0)/‖g_0‖²`` (0 where ``g_0`` is 0): ``g_k' = g_k − a_k·g_0``. Never positive."""
    safe = torch.where(sq0 > 0, sq0, torch.ones_like(sq0))
    return torch.where(sq0 > 0, dot.clamp(max=0.0) / safe, torch.zeros_like(dot))


class Projection(PerTaskGradientWeighting):
    """Project conflicting auxiliary gradients off the main gradient; never touch ``g_0`` (PCGrad rule, asymmetric).

    Args:
        mode, every, stats_params, params: see :class:`~auxloss.weighting.grads.PerTaskGradientWeighting` and the
            module notes (the projection itself always uses the full shared vectors; amortized steps gate).
    """

    def __init__(
        self,
        *,
        mode: str = "exact",
        every: int = 10,
        stats_params: Iterable[Tensor] | None = None,
        params: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        super().__init__(mode=mode, every=every, stats_params=stats_params, params=params)

    def _combine(self, stats: list[TaskStats], *, scale: float) -> list[Combination]:
        out = []
        for s in stats:
            if not s.has_shared:
                one = torch.ones((), dtype=torch.float64)
                out.append(Combination(aux=one * s.lam, effective=one * s.lam, multiplier=one))
                continue
            if s.all_in_stats:  # the statistics set is the full shared set: its (cached) sums are the ones
                dot, sq0, cos = s.s_dot, s.s_sq0, s.s_cos
            else:  # the full shared vectors
                dot, sq0, sqk = s.dot.sum(), s.sq0.sum(), s.sqk.sum()
                cos = cosine(dot, sq0, sqk)
            a = projection_coefficients(dot, sq0)
            lam = torch.full_like(dot, s.lam)
            effective = torch.where(a < 0, lam * (1 - cos * cos), lam)
            keep = (s.s_dot >= 0).to(dot.dtype)  # the amortized gate, on the statistics set
            out.append(Combination(aux=lam, main=-s.lam * a, effective=effective, multiplier=keep))
        return out
