"""What the gradient-aware strategies decide from, and what they answer: per-task statistics and combinations.

Shared by the parameter-level engine (:mod:`~auxloss.weighting.grads`) and the representation-level one
(:mod:`~auxloss.weighting.representation`): a strategy's ``_combine`` maps a list of :class:`TaskStats` to one
:class:`Combination` per task, whichever engine took the statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["Combination", "TaskStats", "cosine", "task_telemetry"]


def cosine(dot: Tensor, sq0: Tensor, sqk: Tensor) -> Tensor:
    """``dot / (‖g_0‖·‖g_k‖)`` from the dot product and the squared norms; 0 where a norm is 0, clamped to [-1, 1]."""
    denom = torch.sqrt(sq0 * sqk)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, dot / safe, torch.zeros_like(dot)).clamp(-1.0, 1.0)


@dataclass
class TaskStats:
    """The statistics of one auxiliary task on its shared parameters, in the true (unscaled) gradient domain.

    ``shared`` are indices into the parameter list; ``dot``, ``sq0``, ``sqk`` hold per shared tensor
    ``g_0·g_k``, ``‖g_0‖²`` and ``‖g_k‖²``; ``in_stats`` marks the tensors of the statistics subset
    (``all_in_stats``: every one of them, so that no mask is needed). The properties sum them over the subset
    (``dot``/``sq0``/``sqk`` with an ``s_`` prefix) or over all shared tensors; each is computed once, on first use
    (the statistics are not changed after construction).
    """

    name: str
    index: int
    lam: float
    shared: list[int]
    dot: Tensor
    sq0: Tensor
    sqk: Tensor
    in_stats: Tensor
    all_in_stats: bool = False

    @classmethod
    def single(cls, name: str, index: int, lam: float, slot: int, dot: Tensor, sq0: Tensor, sqk: Tensor
               ) -> TaskStats:
        """The statistics of one tensor (index ``slot``), all of it in the statistics set, from 0-dim values: the
        sums are the values themselves, so they are filled in without a reduction each."""
        stats = cls(name, index, lam, [slot], dot.view(1), sq0.view(1), sqk.view(1),
                    torch.ones(1, dtype=torch.bool, device=dot.device), all_in_stats=True)
        stats.__dict__.update(s_dot=dot, s_sq0=sq0, s_sqk=sqk)  # the cached_property values
        return stats

    @property
    def has_shared(self) -> bool:
        return len(self.shared) > 0

    def _subset_sum(self, values: Tensor) -> Tensor:
        if self.all_in_stats:
            return values.sum()
        # a masked sum rather than boolean indexing, which would wait for the device
        return torch.where(self.in_stats, values, torch.zeros_like(values)).sum()

    @cached_property
    def s_dot(self) -> Tensor:
        return self._subset_sum(self.dot)

    @cached_property
    def s_sq0(self) -> Tensor:
        return self._subset_sum(self.sq0)

    @cached_property
    def s_sqk(self) -> Tensor:
        return self._subset_sum(self.sqk)

    @cached_property
    def s_cos(self) -> Tensor:
        return cosine(self.s_dot, self.s_sq0, self.s_sqk)


@dataclass
class Combination:
    """How one auxiliary task enters the update on its shared tensors.

    ``aux``: the coefficient on ``g_k`` (a scalar, or one per shared tensor); ``main``: an amount added to the
    coefficient of ``g_0`` on those tensors (``None`` for none; projection uses it, and it is never negative);
    ``effective``: the effective weight for telemetry; ``multiplier``: ``m_k`` for amortized steps (the weight
    is ``m_k·λ_k``).
    """

    aux: Tensor
    effective: Tensor
    multiplier: Tensor
    main: Tensor | None = None



def task_telemetry(stats: Sequence[TaskStats], combos: Sequence[Combination]) -> dict[str, Tensor]:
    """``cos/<task>``, ``normratio/<task>`` (``‖g_k‖/‖g_0‖``, NaN where ``g_0`` is 0) and ``effw/<task>`` of every
    task that shares something with the main task, on the statistics set, detached."""
    out: dict[str, Tensor] = {}
    for s, c in zip(stats, combos):
        if not s.has_shared:
            continue
        sq0, sqk = s.s_sq0, s.s_sqk
        out[f"cos/{s.name}"] = s.s_cos.detach()
        out[f"normratio/{s.name}"] = torch.where(
            sq0 > 0, torch.sqrt(sqk / torch.where(sq0 > 0, sq0, torch.ones_like(sq0))),
            torch.full_like(sq0, float("nan"))).detach()
        out[f"effw/{s.name}"] = c.effective.detach()
    return out
