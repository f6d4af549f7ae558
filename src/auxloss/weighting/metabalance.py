"""MetaBalance: bring each auxiliary gradient's magnitude closer to the main gradient's, tensor by tensor.

He, Feng, Cheng, Ji, Guo, Caverlee, "MetaBalance: Improving Multi-Task Recommendations via Adapting Gradient
Magnitudes of Auxiliary Tasks", WWW 2022. For every shared parameter tensor θ_i, moving averages of the gradient
norms (from 0, updated on each statistics step)

    m_0,i ← β·m_0,i + (1−β)·‖g_0,i‖        m_k,i ← β·m_k,i + (1−β)·‖g_k,i‖

set a factor ``f_k,i = r·(m_0,i/m_k,i) + (1−r)`` (r the relax factor), and

    update_i = g_0,i + Σ_k λ_k·f_k,i·g_k,i.

``adapt="shrink"`` applies the factor only where ``m_k,i > m_0,i`` (auxiliary gradients larger than the main one are
reduced, smaller ones left alone), ``adapt="enlarge"`` only where ``m_k,i < m_0,i``; ``"both"`` everywhere. (The
paper calls this choice the strategy; the name ``mode`` is taken here by exact/amortized.) ``f`` is 1 where
``m_k,i`` is 0. Defaults r = 0.7 and β = 0.9 are those of the authors' released optimizer (``relax_factor=0.7``,
``beta=0.9``, "set as 0.9 empirically"); the paper tunes r per dataset.

Subset and amortized mode: the moving averages are per tensor and kept for every shared tensor; ``stats_params``
narrows the telemetry and the amortized multiplier, which is the least-squares summary of the per-tensor factors,
``f̄_k = Σ_i f_k,i·‖g_k,i‖² / Σ_i ‖g_k,i‖²`` over the statistics set (also reported as ``effw = λ_k·f̄_k``). The
moving averages only move on refresh steps.

Representation mode: the "tensors" are the tapped tensors (one per tapped layer output, whichever tasks read it):
``m_0`` is the moving norm of the gradient reaching it from above, ``m_k`` that of task k's gradient there, and the
factor applies to everything task k sends into the trunk.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from auxloss.errors import AuxLossError
from auxloss.weighting.grads import Combination, PerTaskGradientWeighting, TaskStats, warn_realigned

__all__ = ["MetaBalance", "metabalance_factor", "moving_average"]

ADAPT = ("both", "shrink", "enlarge")


def moving_average(m: Tensor, value: Tensor, beta: float) -> Tensor:
    """``β·m + (1−β)·value``."""
    return beta * m + (1.0 - beta) * value


def metabalance_factor(m0: Tensor, mk: Tensor, relax: float, adapt: str = "both") -> Tensor:
    """``f = r·(m_0/m_k) + (1−r)`` (elementwise), 1 where ``m_k`` is 0 or where ``adapt`` leaves it alone."""
    positive = mk > 0
    ratio = torch.where(positive, m0 / torch.where(positive, mk, torch.ones_like(mk)), torch.ones_like(mk))
    f = relax * ratio + (1.0 - relax)
    if adapt == "shrink":
        f = torch.where(mk > m0, f, torch.ones_like(f))
    elif adapt == "enlarge":
        f = torch.where(mk < m0, f, torch.ones_like(f))
    return torch.where(positive, f, torch.ones_like(f))


class MetaBalance(PerTaskGradientWeighting):
    """Rescale each auxiliary gradient, per shared tensor, towards the main gradient's magnitude (He et al. 2022).

    Args:
        relax: r in [0, 1]; 0 leaves the gradients alone, 1 matches the magnitudes fully.
        beta: the moving averages' β in [0, 1).
        adapt: ``"both"``, ``"shrink"`` (only reduce larger auxiliary gradients) or ``"enlarge"`` (only raise
            smaller ones).
        mode, every, stats_params, params: see :class:`~auxloss.weighting.grads.PerTaskGradientWeighting` and the
            module notes.

    The moving averages live in ``m_main`` (one per parameter tensor) and ``m_aux`` (tasks × tensors), aligned with
    ``params_``, and checkpoint with the objective.
    """

    def __init__(
        self,
        relax: float = 0.7,
        beta: float = 0.9,
        adapt: str = "both",
        *,
        mode: str = "exact",
        every: int = 10,
        stats_params: Iterable[Tensor] | None = None,
        params: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        if isinstance(relax, bool) or not isinstance(relax, (int, float)) or not 0.0 <= relax <= 1.0:
            raise AuxLossError(f"relax must lie in [0, 1], got {relax!r}.")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise AuxLossError(f"beta must lie in [0, 1), got {beta!r}.")
        if adapt not in ADAPT:
            raise AuxLossError(f"adapt must be one of {ADAPT}, got {adapt!r}.")
        super().__init__(mode=mode, every=every, stats_params=stats_params, params=params)
        self.relax, self.beta, self.adapt = float(relax), float(beta), adapt
        self.m_main = torch.zeros(0, dtype=torch.float64)
        self.m_aux = torch.zeros(0, 0, dtype=torch.float64)
        self._loaded_shapes: list[tuple[int, ...]] | None = None

    def _params_changed(self, old: list[Tensor] | None, new: list[Tensor]) -> None:
        k = len(self.aux_names)
        m_main = torch.zeros(len(new), dtype=torch.float64, device=self.m_main.device)
        m_aux = torch.zeros(k, len(new), dtype=torch.float64, device=self.m_main.device)
        if old is None and self._loaded_shapes is not None:  # a resumed checkpoint: same model, same order
            if self._loaded_shapes == [tuple(p.shape) for p in new] and self.m_aux.shape == (k, len(new)):
                m_main, m_aux = self.m_main, self.m_aux
            else:
                warn_realigned("MetaBalance")
        elif old is not None:  # follow each parameter to its new position
            where = {id(p): j for j, p in enumerate(old)}
            for i, p in enumerate(new):
                j = where.get(id(p))
                if j is not None:
                    m_main[i] = self.m_main[j]
                    m_aux[:, i] = self.m_aux[:, j]
        self._loaded_shapes = None
        self.m_main, self.m_aux = m_main, m_aux

    def _combine(self, stats: list[TaskStats], *, scale: float) -> list[Combination]:
        device = stats[0].dot.device if stats else self.m_main.device
        self.m_main, self.m_aux = self.m_main.to(device), self.m_aux.to(device)
        # m_0 moves once per tensor per step, however many tasks share it
        norm0: dict[int, Tensor] = {}
        for s in stats:
            for pos, i in enumerate(s.shared):
                norm0.setdefault(i, s.sq0[pos])
        if norm0:
            idx = torch.tensor(sorted(norm0), device=device)
            values = torch.stack([norm0[i] for i in sorted(norm0)]).to(torch.float64).sqrt()
            self.m_main[idx] = moving_average(self.m_main[idx], values, self.beta)
        out = []
        for s in stats:
            one = torch.ones((), dtype=torch.float64, device=device)
            if not s.has_shared:
                out.append(Combination(aux=one * s.lam, effective=one * s.lam, multiplier=one))
                continue
            idx = torch.tensor(s.shared, device=device)
            self.m_aux[s.index, idx] = moving_average(self.m_aux[s.index, idx], s.sqk.to(torch.float64).sqrt(),
                                                      self.beta)
            f = metabalance_factor(self.m_main[idx], self.m_aux[s.index, idx], self.relax, self.adapt)
            # A tensor where g_k is 0 now contributes nothing whatever f is; but m_k may have decayed to almost 0
            # there, and a huge f times a zero gradient is NaN once cast to the gradient's dtype: use 1.
            f = torch.where(s.sqk > 0, f, torch.ones_like(f))
            sqk = torch.where(s.in_stats, s.sqk.to(torch.float64), torch.zeros_like(f))
            total = sqk.sum()
            fbar = torch.where(total > 0, (f * sqk).sum() / torch.where(total > 0, total, one), f.mean())
            out.append(Combination(aux=f * s.lam, effective=fbar * s.lam, multiplier=fbar))
        return out

    def _state(self) -> dict[str, Any]:
        params = self.__dict__["params_"]
        return {
            "m_main": self.m_main.detach().cpu().clone(),
            "m_aux": self.m_aux.detach().cpu().clone(),
            "shapes": None if params is None else [tuple(p.shape) for p in params],
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.m_main = torch.as_tensor(state["m_main"], dtype=torch.float64).clone()
        self.m_aux = torch.as_tensor(state["m_aux"], dtype=torch.float64).clone()
        shapes = state.get("shapes")
        self._loaded_shapes = None if shapes is None else [tuple(s) for s in shapes]
        current = self.__dict__["params_"]
        if current is not None:  # loading into a strategy already in use: align on the next step
            self.__dict__["params_"] = None

    def _args_repr(self) -> str:
        return f"relax={self.relax}, beta={self.beta}, adapt={self.adapt!r}"
