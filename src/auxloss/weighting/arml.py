"""ARML: auxiliary weights that make the weighted auxiliary gradient match the main gradient.

Shi, Hoffman, Saenko, Darrell, Xu, "Auxiliary Task Reweighting for Minimum-data Learning", NeurIPS 2020. The
auxiliary weights α are chosen so that the weighted auxiliary likelihood is the best surrogate prior for the main
task, which the paper reduces to matching gradients on the shared parameters:

    min_α  J(α) = ‖g_0 − Σ_k α_k·λ_k·g_k‖²      subject to  α_k ≥ 0,  Σ_k α_k = K

solved by projected gradient descent. Each statistics step takes one step on J and projects back, as the authors'
code does (bfshi/ARML_Auxiliary_Task_Reweighting, ``SSL/train.py``): shift onto the hyperplane, then clip at 0,

    ∂J/∂α_k = −2·λ_k·(g_0·g_k − Σ_j α_j·λ_j·g_j·g_k)
    α ← α − η·∂J/∂α;     α ← α + (K − Σ_j α_j)/K;     α ← max(α, 0)

and the step's update is ``g_0 + Σ_k α_k·λ_k·g_k`` with the new α (heads get ``λ_k·g_k``). α starts at 1 (so
Σα = K). J needs the task-to-task products ``g_j·g_k``, taken on the tensors the main task and both tasks reach
(``stats_params`` narrows them), where a task that does not reach a tensor counts as 0 there.

Details of this implementation:

- η (``lr``) defaults to the authors' 0.05 (``task_weighter_lr``). They update α every 20 iterations: that is
  ``mode="amortized", every=20`` here (α moves on refresh steps only; steps in between use it as it is). In exact
  mode α moves every step.
- The paper samples θ by Langevin dynamics (noise on the *model's* gradient, off by default in the authors'
  code, flag ``--lagrange``); that noise is not implemented here. The clip after the shift can leave Σα < K; the
  authors' code does the same (the next step's shift restores the sum).
- Under gradient accumulation every micro-batch takes its own step on α.

**Cost.** ``1 + K`` backward passes per statistics step (the engine's exact mode), plus the K×K products of the
auxiliary gradients; amortized mode runs one backward on the other steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from auxloss.errors import AuxLossError
from auxloss.weighting.grads import Combination, PerTaskGradientWeighting, TaskStats

__all__ = ["ARML", "arml_gradient", "arml_project", "arml_step"]


def arml_gradient(alpha: Tensor, lambdas: Tensor, b: Tensor, gram: Tensor) -> Tensor:
    """``∂J/∂α_k = −2·λ_k·(b_k − Σ_j α_j·λ_j·G_jk)`` with ``b_k = g_0·g_k`` and ``G_jk = g_j·g_k``."""
    return -2.0 * lambdas * (b - gram @ (alpha * lambdas))


def arml_project(alpha: Tensor) -> Tensor:
    """The authors' projection: shift onto ``Σα = K``, then clip at 0."""
    k = alpha.numel()
    return (alpha + (k - alpha.sum()) / k).clamp(min=0.0)


def arml_step(alpha: Tensor, lambdas: Tensor, b: Tensor, gram: Tensor, lr: float) -> Tensor:
    """One projected gradient step on ``J(α) = ‖g_0 − Σ_k α_k·λ_k·g_k‖²``."""
    return arml_project(alpha - lr * arml_gradient(alpha, lambdas, b, gram))


class ARML(PerTaskGradientWeighting):
    """Auxiliary task reweighting (Shi et al. 2020): α minimises ``‖g_0 − Σ α_k·λ_k·g_k‖²``, α ≥ 0, Σα = K.

    Args:
        lr: the step size η of α's projected gradient descent (the authors' 0.05).
        mode, every, stats_params, params: see :class:`~auxloss.weighting.grads.PerTaskGradientWeighting`
            (``mode="amortized", every=20`` is the authors' schedule).

    ``alpha`` holds α (bound task order) and checkpoints with the objective. Telemetry: ``arml_alpha/<task>``, and
    the engine's ``cos``/``normratio``/``effw``.
    """

    modes: ClassVar[tuple[str, ...]] = ("exact", "amortized")
    unsupported_modes_reason: ClassVar[str] = (
        "no representation mode: its weights come from products between every pair of tasks' gradients, and representation gradients of taps at different layers share no space")

    def __init__(
        self,
        lr: float = 0.05,
        *,
        mode: str = "exact",
        every: int = 10,
        stats_params: Iterable[Tensor] | None = None,
        params: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise AuxLossError(f"ARML: lr (the step size of the weights) must be a positive finite number, got {lr!r}.")
        super().__init__(mode=mode, every=every, stats_params=stats_params, params=params)
        self.lr = float(lr)
        self.alpha = torch.zeros(0, dtype=torch.float64)
        self.updates = 0
        self._gram: Tensor | None = None

    def bind(self, main: str, aux: list[str]) -> None:
        super().bind(main, aux)
        self.alpha = torch.ones(len(aux), dtype=torch.float64)

    def _on_gradients(self, params: list[Tensor], grads: list[list[Tensor | None]], inv_scale: Tensor | None
                      ) -> None:
        # G_jk = g_j·g_k over the tensors the main task reaches (within stats_params), 0 where a task does not reach
        k = len(self.aux_names)
        stats_list = self.__dict__["_stats_list"]
        chosen = None if stats_list is None else {id(t) for t in stats_list}
        device = next((g.device for g in grads[0] if g is not None), torch.device("cpu"))
        entries: list[list[Tensor]] = [[] for _ in range(k * k)]
        for i, g0 in enumerate(grads[0]):
            if g0 is None or (chosen is not None and id(params[i]) not in chosen):
                continue
            for a in range(k):
                ga = grads[a + 1][i]
                if ga is None:
                    continue
                for c in range(a, k):
                    gc = grads[c + 1][i]
                    if gc is not None:
                        entries[a * k + c].append((ga * gc).sum(dtype=torch.float64).to(device))
        flat = torch.stack([torch.stack(e).sum() if e else torch.zeros((), dtype=torch.float64, device=device)
                            for e in entries]).view(k, k)
        gram = torch.triu(flat) + torch.triu(flat, 1).T
        if inv_scale is not None:
            gram = gram * inv_scale.to(gram.dtype) ** 2
        self._gram = gram

    def _combine(self, stats: list[TaskStats], *, scale: float) -> list[Combination]:
        assert self._gram is not None
        device = self._gram.device
        b = torch.stack([s.s_dot.to(device, torch.float64) if s.has_shared else
                         torch.zeros((), dtype=torch.float64, device=device) for s in stats])
        lambdas = torch.tensor([s.lam for s in stats], dtype=torch.float64, device=device)
        alpha = self.alpha.to(device)
        new = arml_step(alpha, lambdas, b, self._gram, self.lr)
        if bool(torch.isfinite(new).all()):  # a degenerate step (overflowing products) leaves α alone
            self.alpha = new
            self.updates += 1
        out = []
        for s in stats:
            a = self.alpha[s.index]
            weight = a * s.lam
            out.append(Combination(aux=weight, effective=weight, multiplier=a))
        return out

    def _amortized_multipliers(self) -> Tensor | None:
        return None if self._cached is None else self.alpha.clone()

    def telemetry(self) -> dict[str, Tensor]:
        out = super().telemetry()
        for k, name in enumerate(self.aux_names):
            if k < len(self.alpha):
                out[f"arml_alpha/{name}"] = self.alpha[k].detach().clone()
        return out

    def _state(self) -> dict[str, Any]:
        return {"alpha": self.alpha.detach().cpu().clone(), "updates": self.updates}

    def _load_state(self, state: dict[str, Any]) -> None:
        if state:
            self.alpha = torch.as_tensor(state["alpha"], dtype=torch.float64).clone()
            self.updates = int(state.get("updates", 0))

    def _args_repr(self) -> str:
        return f"lr={self.lr}"
