"""What a representation-level weighting needs from an :class:`~auxloss.AuxModel` forward: a gradient cut between
each tapped layer and its head, and the tensors on both sides of it, kept for one step.

See :meth:`auxloss.AuxModel.keep_representations` and :mod:`auxloss.weighting.representation`.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch
from torch import Tensor

__all__ = ["CutGrad", "GradBox", "Representations", "TapRepresentation", "keep_tap"]


class GradBox:
    """Where :class:`CutGrad` leaves the gradient that reached it (``None`` until the backward gets there)."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: Tensor | None = None


@dataclasses.dataclass(eq=False)
class TapRepresentation:
    """One tap in a kept forward: the trunk's tensor, the head's input behind the cut, and the box where the
    cut leaves the head's gradient during the backward."""

    trunk: Tensor
    head_input: Tensor
    box: GradBox


class CutGrad(torch.autograd.Function):
    """Identity forward; no gradient flows back through it. The gradient that reaches it (the head's) is left in a
    :class:`GradBox` instead, for the representation-level weighting, which puts it into the trunk itself.

    Autograd runs this node before the trunk tensor's own backward (that one waits for every consumer of the
    tensor, this node included), so the box is filled by the time a hook on the trunk tensor fires.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, box: GradBox) -> Tensor:
        ctx.box = box  # the box only: holding the TapRepresentation would make a reference cycle through the graph
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None]:
        ctx.box.grad = grad
        return None, None


def keep_tap(feature: Tensor) -> TapRepresentation:
    """Put ``feature`` behind a cut (when it requires grad) and describe it."""
    box = GradBox()
    head_input = CutGrad.apply(feature, box) if feature.requires_grad else feature
    return TapRepresentation(feature, head_input, box)


class _Kept(threading.local):
    """Per thread: the taps whose next training forward is to be kept, and what that forward kept."""

    def __init__(self) -> None:
        self.armed: frozenset[str] | None = None
        self.kept: dict[str, TapRepresentation | None] | None = None


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

    def store(self, kept: dict[str, TapRepresentation | None]) -> None:
        self._local.kept = kept

    def take(self) -> dict[str, TapRepresentation | None] | None:
        local = self._local
        kept, local.kept = local.kept, None
        return kept
