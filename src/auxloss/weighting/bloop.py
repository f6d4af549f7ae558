"""BLOOP: the auxiliary gradient only moves the model orthogonally to the main task's recent gradient.

Bilevel optimisation with orthogonal projection (ICML 2024; reference code apple/ml-bloop, in JAX). With
``g_aux = ∇ Σ_k λ_k·L_k`` (the weighted auxiliary losses, one gradient) and ``e`` an exponential moving average of
the main gradient, updated with this step's ``g_0`` *before* it is used:

    e ← e + ρ·(g_0 − e)                     (e starts at the first g_0: the reference code's default ``init="grad"``)
    update = g_0 + (g_aux − (g_aux·e / (‖e‖² + ε))·e)

so the auxiliary tasks act only in the directions orthogonal to where the main task has recently been going, and
the main task's own progress along ``e`` is left to ``g_0``. BLOOP's λ is each task's scheduled weight ``λ_k`` here
(the reference code's ``lbda`` default is 0.1); ρ (``ema``) defaults to the reference code's 0.1 and ε to its 1e-7.

Details of this implementation:

- The EMA and the projection live on the shared parameters (the tensors both the main loss and the auxiliary sum
  reach); the products ``g_aux·e`` and ``‖e‖²`` are summed over all of them, or over ``stats_params`` when given,
  and the projection is applied to every shared tensor. A head's own parameters get ``λ_k·g_k``; the main path above
  the taps gets ``g_0``. The EMA is kept per tensor in float32/64 as the gradient, in the true (unscaled) domain.
- Amortized mode: between refreshes one backward runs on ``L_0 + Σ_k m·λ_k·L_k`` with the least-squares summary of
  the projection ``m = 1 − (g_aux·e)²/((‖e‖² + ε)·‖g_aux‖²)``; the EMA moves on refresh steps only.
- Telemetry: ``bloop/cos`` (the cosine of ``g_aux`` and ``e``), ``bloop/ratio`` (``g_aux·e/(‖e‖²+ε)``), and
  ``effw/<task>`` = ``m·λ_k``. There is no per-task cosine: BLOOP takes one gradient for all auxiliary tasks.

**Cost.** Two backward passes per step (``g_0``, then ``g_aux``), whatever the number of auxiliary tasks, and
memory for one copy of the shared parameters (the EMA), which checkpoints with the objective.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from auxloss.errors import AuxLossError
from auxloss.weighting.grads import (
    PerTaskGradientWeighting,
    _all_reduce_tasks,
    per_task_gradients,
    warn_realigned,
)

__all__ = ["BLOOP", "bloop_direction", "ema_update"]


def ema_update(ema: Tensor | None, grad: Tensor, rho: float) -> Tensor:
    """``e + ρ·(g − e)``; the first call (``ema=None``) starts the average at ``g``."""
    return grad.clone() if ema is None else ema + rho * (grad - ema)


def bloop_direction(g0: Tensor, g_aux: Tensor, ema: Tensor, eps: float = 1e-7) -> Tensor:
    """``g_0 + g_aux − (g_aux·e/(‖e‖² + ε))·e`` on flat vectors (the EMA already updated with ``g_0``)."""
    ratio = (g_aux @ ema) / (ema @ ema + eps)
    return g0 + g_aux - ratio * ema


class BLOOP(PerTaskGradientWeighting):
    """Project the auxiliary gradient off an EMA of the main gradient (BLOOP, ICML 2024).

    Args:
        ema: ρ, the weight of the new main gradient in the moving average (the reference code's 0.1).
        eps: ε in the projection's denominator.
        mode, every, stats_params, params: see :class:`~auxloss.weighting.grads.PerTaskGradientWeighting` and the
            module notes.
    """

    modes: ClassVar[tuple[str, ...]] = ("exact", "amortized")
    unsupported_modes_reason: ClassVar[str] = (
        "no representation mode: it keeps a moving average of the main gradient across steps, and a representation gradient belongs to one batch's samples")

    def __init__(
        self,
        ema: float = 0.1,
        *,
        eps: float = 1e-7,
        mode: str = "exact",
        every: int = 10,
        stats_params: Iterable[Tensor] | None = None,
        params: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 < ema <= 1.0:
            raise AuxLossError(f"BLOOP: ema (the weight of the new main gradient) must lie in (0, 1], got {ema!r}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
            raise AuxLossError(f"BLOOP: eps must be a finite number >= 0, got {eps!r}.")
        super().__init__(mode=mode, every=every, stats_params=stats_params, params=params)
        self.ema, self.eps = float(ema), float(eps)
        self._ema: list[Tensor | None] = []  # per parameter of params_, None where the main task does not reach
        self._loaded: list[Tensor | None] | None = None
        self._loaded_shapes: list[tuple[int, ...]] | None = None

    def _params_changed(self, old: list[Tensor] | None, new: list[Tensor]) -> None:
        if old is None and self._loaded is not None:  # a resumed checkpoint: the same model, the same order
            shapes = [tuple(p.shape) for p in new]
            if self._loaded_shapes == shapes:
                self._ema = [None if e is None else e.to(p.device) for e, p in zip(self._loaded, new)]
            else:
                warn_realigned("BLOOP")
                self._ema = [None] * len(new)
            self._loaded = self._loaded_shapes = None
            return
        where = {id(p): j for j, p in enumerate(old or [])}
        self._ema = [self._ema[where[id(p)]] if id(p) in where else None for p in new]

    def _exact_backward(self, main: str, aux: list[str], lambdas: list[float], losses: dict[str, Tensor], *,
                        scale: float, scaler: Any) -> None:
        main_loss = losses[main]
        params = self._resolve_params([main_loss, *(losses[n] for n in aux)])
        if not params:
            return
        aux_total: Tensor | None = None
        for lam, name in zip(lambdas, aux):
            loss = losses[name]
            if loss.requires_grad:
                term = lam * loss
                aux_total = term if aux_total is None else aux_total + term
        pair = [main_loss, aux_total]
        if scaler is not None:
            pair = [scaler.scale(t) if t is not None and t.requires_grad else t for t in pair]
        grads, calls = per_task_gradients(pair, params)
        self.n_backward_calls += calls
        g0, ga = _all_reduce_tasks(grads)
        device = main_loss.device
        s: Tensor | None = None  # the GradScaler's scale: the written gradients live in its domain
        if scaler is not None:
            s = scaler.scale(torch.ones((), device=device, dtype=torch.float32))
        stats_list = self.__dict__["_stats_list"]
        chosen = None if stats_list is None else {id(t) for t in stats_list}

        new_ema: list[Tensor | None] = list(self._ema)
        dots, sqs, sqa = [], [], []
        shared = []
        for i, (a, b) in enumerate(zip(g0, ga)):
            if a is None:
                continue
            true = a.detach() / s.to(a.dtype) if s is not None else a.detach()
            new_ema[i] = ema_update(self._ema[i], true, self.ema)
            if b is None:
                continue
            shared.append(i)
            if chosen is None or id(params[i]) in chosen:
                e = new_ema[i]
                assert e is not None
                b_true = b / s.to(b.dtype) if s is not None else b
                dots.append((e * b_true).sum(dtype=torch.float64).to(device))
                sqs.append((e * e).sum(dtype=torch.float64).to(device))
                sqa.append((b_true * b_true).sum(dtype=torch.float64).to(device))
        if shared and not dots:
            raise AuxLossError("BLOOP: stats_params holds none of the parameters that the main and the auxiliary tasks "
                               "share; give tensors of the shared trunk (or stats_params=None).")
        zero = torch.zeros((), dtype=torch.float64, device=device)
        dot = torch.stack(dots).sum() if dots else zero
        sq = torch.stack(sqs).sum() if dots else zero
        sq_aux = torch.stack(sqa).sum() if dots else zero
        finite = bool(torch.isfinite(torch.stack([dot, sq, sq_aux])).all())
        ratio = dot / (sq + self.eps) if (finite and dots) else zero
        if finite:
            self._ema = new_ema
            kept = torch.where(sq_aux > 0, 1.0 - ratio * dot / torch.where(sq_aux > 0, sq_aux, torch.ones_like(sq_aux)),
                               torch.ones_like(sq_aux))
            self._cached = kept.detach().expand(len(aux)).clone()
            denom = torch.sqrt(sq * sq_aux)
            self._tele["bloop/cos"] = torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)),
                                                  zero).detach()
            self._tele["bloop/ratio"] = ratio.detach()
            for lam, name in zip(lambdas, aux):
                self._tele[f"effw/{name}"] = (kept * lam).detach()
        # else: fp16 overflow, the plain sum carries the inf to p.grad and the GradScaler skips the step
        shared_set = set(shared)
        for i, p in enumerate(params):
            a, b = g0[i], ga[i]
            total: Tensor | None = None
            if a is not None:
                total = a
            if b is not None:
                total = b if total is None else total + b
            if total is None:
                continue
            if finite and i in shared_set:
                e = self._ema[i]
                assert e is not None
                coef = ratio.to(e.dtype) * (s.to(e.dtype) if s is not None else 1.0)
                total = total - coef * e
            if scale != 1.0:
                total = total * scale
            if p.grad is None:
                p.grad = total.detach().clone() if total is a or total is b else total.detach()
            else:
                p.grad.add_(total.detach())

    def _state(self) -> dict[str, Any]:
        params = self.__dict__["params_"]
        return {"ema": [None if e is None else e.detach().cpu().clone() for e in self._ema],
                "shapes": None if params is None else [tuple(p.shape) for p in params]}

    def _load_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._loaded = [None if e is None else torch.as_tensor(e).clone() for e in state["ema"]]
        shapes = state.get("shapes")
        self._loaded_shapes = None if shapes is None else [tuple(x) for x in shapes]
        self.__dict__["params_"] = None  # align on the next statistics step

    def _args_repr(self) -> str:
        return f"ema={self.ema}, eps={self.eps}"
