"""Gradient-cosine gating: an auxiliary task contributes only while its gradient agrees with the main task's.

Du, Czarnecki, Jayakumar, Farajtabar, Pascanu, Lakshminarayanan, "Adapting Auxiliary Losses Using Gradient
Similarity", arXiv 1812.02224 (2018). On the parameters that the main task and task k share:

    update = g_0 + Σ_k c_k·λ_k·g_k,   c_k = 1[cos(g_0, g_k) > 0]        (unweighted, the default)
                                       c_k = max(0, cos(g_0, g_k))      (weighted)

``g_0``'s coefficient is always exactly 1. An auxiliary head's own parameters always get ``λ_k·g_k``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from auxloss.errors import AuxLossError
from auxloss.weighting.grads import Combination, PerTaskGradientWeighting, TaskStats

__all__ = ["CosineGating", "gating_coefficients"]


def gating_coefficients(cos: Tensor, weighted: bool = False) -> Tensor:
    """``c_k`` from the cosines: ``1[cos > 0]``, or ``max(0, cos)`` when ``weighted``. Always in [0, 1]."""
    return cos.clamp(min=0.0) if weighted else (cos > 0).to(cos.dtype)


class CosineGating(PerTaskGradientWeighting):
    """Gate each auxiliary gradient on its cosine with the main gradient (Du et al. 2018).

    Args:
        weighted: scale by ``max(0, cos)`` instead of the 0/1 gate.
        mode, every, stats_params, params: see :class:`~auxloss.weighting.grads.PerTaskGradientWeighting`. The
            cosine is computed on ``stats_params`` (when given) and the gate applies to all shared parameters.
            Amortized steps reuse the last refresh's ``c_k``.

    Example:
        >>> import auxloss as al
        >>> from auxloss.weighting.gating import CosineGating
        >>> objective = al.Objective(aux=[al.Task("aux1", weight=0.3)], weighting=CosineGating())
    """

    def __init__(
        self,
        weighted: bool = False,
        *,
        mode: str = "exact",
        every: int = 10,
        stats_params: Iterable[Tensor] | None = None,
        params: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        if not isinstance(weighted, bool):
            raise AuxLossError(f"weighted must be True or False, got {weighted!r}.")
        super().__init__(mode=mode, every=every, stats_params=stats_params, params=params)
        self.weighted = weighted

    def _combine(self, stats: list[TaskStats], *, scale: float) -> list[Combination]:
        out = []
        for s in stats:
            c = gating_coefficients(s.s_cos, self.weighted) if s.has_shared else torch.ones((), dtype=torch.float64)
            weight = c * s.lam
            out.append(Combination(aux=weight, effective=weight, multiplier=c))
        return out

    def _args_repr(self) -> str:
        return f"weighted={self.weighted}"
