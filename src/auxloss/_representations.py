"""What a representation-level weighting needs from an :class:`~auxloss.AuxModel` forward: a gradient cut between
each tapped layer and its head, and the tensors on both sides of it, kept for one step.

See :meth:`auxloss.AuxModel.keep_representations` and :mod:`auxloss.weighting.representation`.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

__all__ = ["CutGrad", "Representations"]


class CutGrad(torch.autograd.Function):
    """Identity forward; no gradient flows back through it. A representation-level weighting feeds a head its
    layer's output through it, takes the head's gradient at its input, and puts it into the trunk itself."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> None:
        return None


class _Kept(threading.local):
    """Per thread: the taps whose next training forward is to be kept, and what that forward kept."""

    def __init__(self) -> None:
        self.armed: frozenset[str] | None = None
        self.kept: dict[str, tuple[Tensor, Tensor] | None] | None = None


class Representations:
    """The representations of one training forward, for a representation-level weighting (one-shot, per thread).

    :meth:`arm` asks that the next forward with gradients feed the named taps' heads through :class:`CutGrad` and
    keep, per tap, the trunk's tensor and the head's input (``None`` where the head reads no tensor);
    :meth:`take` hands them over once. Each forward first drops what the previous one kept, so nothing outlives a
    step by more than one forward. Copies and pickles start empty (a ``threading.local`` cannot be copied).
    """

    def __init__(self) -> None:
        self._local = _Kept()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = _Kept()

    def arm(self, taps: frozenset[str]) -> None:
        self._local.armed = taps

    def begin(self) -> frozenset[str] | None:
        """At the start of a forward: the taps to keep in this one (disarming), or ``None``."""
        local = self._local
        local.kept = None
        armed = local.armed
        if armed is None or not torch.is_grad_enabled():  # an evaluation forward leaves the request for the next
            return None
        local.armed = None
        return armed

    def store(self, kept: dict[str, tuple[Tensor, Tensor] | None]) -> None:
        self._local.kept = kept

    def take(self) -> dict[str, tuple[Tensor, Tensor] | None] | None:
        local = self._local
        kept, local.kept = local.kept, None
        return kept
