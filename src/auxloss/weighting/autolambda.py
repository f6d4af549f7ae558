"""Auto-Lambda, auxiliary mode: the auxiliary weights follow the main task's validation loss one step ahead.

Liu, Li, Kuang, Davison, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022. The weights w are
meta-learned so that a virtual step of the model, taken with them, lowers the *primary* task's loss on held-out
data. With the step's per-task gradients ``g_i = ∇θ L_i(θ)`` on a training batch and α the model's learning rate:

    θ'  = θ − α·(g_0 + Σ_k w_k·λ_k·g_k)                    (the virtual step)
    ∂L_val(θ')/∂w_k = −α·λ_k·∇θ' L_val(θ') · g_k            (the one-step look-ahead hypergradient)
    w ← max(0, Adam(w; ∂L_val(θ')/∂w))

then the step's real update is ``g_0 + Σ_k w_k·λ_k·g_k`` with the *updated* weights, as in the paper (weights first,
then the model). ``L_val`` is the main task's loss on a batch of the validation split, which the training loop hands
over in ``StepContext.validation`` (the Trainer and the Lightning module do; the test split is never used).

Details of this implementation (deviations from the authors' code, lorenmt/auto-lambda):

- The main task's weight stays 1 (auxloss is main-task-first); the paper's code also meta-learns the primary task's
  own weight. The auxiliary weights start at ``init=1.0``, the paper's equal start (all tasks at 0.1) relative to
  the main task; the meta learning rate ``lr=1e-3`` keeps the paper's pace relative to that scale (its 1e-4 on
  weights of 0.1: Adam moves a weight by about ``lr`` a step).
- The paper approximates ``g_k·∇L_val(θ')`` by finite differences (two extra forwards at ``θ ± ε·∇L_val``); here it
  is exact, from the per-task gradients the engine takes anyway.
- The virtual step is plain SGD with the loop's current learning rate (``ctx.lr``); the paper's also adds the SGD
  momentum buffer and weight decay. Weights are clipped at 0 after each step (the paper's are unconstrained; a
  negative weight would train the model to *increase* that auxiliary loss).
- The validation forward runs at θ' through :func:`torch.func.functional_call`, in the model's current mode, on
  copies of its buffers (BatchNorm's running statistics are not changed by it).
- Amortized mode (``mode="amortized", every=N``): the weights move on refresh steps only.

**Cost.** Per update: ``1 + K`` backward passes on the training batch (the engine's exact mode) plus one forward
and one backward on a validation batch, about 3 passes for one auxiliary task, as the paper reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from auxloss._distributed import all_reduce_mean
from auxloss.errors import AuxLossError
from auxloss.step import LossReport, StepContext
from auxloss.weighting.famo import adam_step
from auxloss.weighting.grads import Combination, PerTaskGradientWeighting, TaskStats

__all__ = ["AutoLambda", "lookahead_hypergradient"]


def lookahead_hypergradient(v: list[Tensor | None], task_grads: list[list[Tensor | None]], lambdas: Tensor,
                            lr: float) -> Tensor:
    """``−α·λ_k·Σ_i v_i·g_k,i`` per auxiliary task: ``v`` the validation gradient at θ', ``task_grads[k]`` task k's
    gradient at θ (``None`` where either is absent)."""
    out = []
    for k, grads in enumerate(task_grads):
        terms = [(a.double() * b.double()).sum() for a, b in zip(v, grads) if a is not None and b is not None]
        dot = torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)
        out.append(-lr * lambdas[k].to(dot.device) * dot)
    return torch.stack(out)


class AutoLambda(PerTaskGradientWeighting):
    """Auxiliary weights meta-learned on the main task's validation loss after a one-step look-ahead (Liu et al.
    2022, auxiliary mode).

    Args:
        lr: the weights' Adam learning rate.
        init: the initial auxiliary weight (the main task's is 1).
        betas, eps: Adam's.
        mode, every, stats_params, params: see :class:`~auxloss.weighting.grads.PerTaskGradientWeighting`.

    Needs ``ctx.validation`` (a validation batch stream), ``ctx.lr`` and ``ctx.model``; the Trainer fills them in
    (``fit(..., val_loader=...)`` is then required). State: ``aux_weights`` and their Adam moments, checkpointed
    with the objective. Telemetry: ``autol_w/<task>``.
    """

    needs_validation = True

    modes: ClassVar[tuple[str, ...]] = ("exact", "amortized")
    unsupported_modes_reason: ClassVar[str] = (
        "no representation mode: its look-ahead is a step of the parameters")

    def __init__(
        self,
        lr: float = 1e-3,
        init: float = 1.0,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        mode: str = "exact",
        every: int = 10,
        stats_params: Iterable[Tensor] | None = None,
        params: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        for name, value in (("lr", lr), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise AuxLossError(f"AutoLambda: {name} must be a positive finite number, got {value!r}.")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not (math.isfinite(init) and init >= 0):
            raise AuxLossError(f"AutoLambda: init must be a finite number >= 0, got {init!r}.")
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise AuxLossError(f"AutoLambda: betas must be two numbers in [0, 1), got {betas!r}.")
        super().__init__(mode=mode, every=every, stats_params=stats_params, params=params)
        self.lr, self.init, self.eps = float(lr), float(init), float(eps)
        self.betas = (float(betas[0]), float(betas[1]))
        self.aux_weights = torch.zeros(0, dtype=torch.float64)
        self._m = torch.zeros(0, dtype=torch.float64)
        self._v = torch.zeros(0, dtype=torch.float64)
        self.updates = 0
        self._ctx: StepContext | None = None
        self._lambdas: list[float] = []

    def bind(self, main: str, aux: list[str]) -> None:
        super().bind(main, aux)
        self.aux_weights = torch.full((len(aux),), self.init, dtype=torch.float64)
        self._m = torch.zeros(len(aux), dtype=torch.float64)
        self._v = torch.zeros(len(aux), dtype=torch.float64)

    def _before_step(self, ctx: StepContext) -> None:
        self._ctx = ctx

    def _on_gradients(self, params: list[Tensor], grads: list[list[Tensor | None]], inv_scale: Tensor | None
                      ) -> None:
        ctx = self._ctx
        missing = [what for what, value in (("validation", None if ctx is None else ctx.validation),
                                            ("lr", None if ctx is None else ctx.lr),
                                            ("model", None if ctx is None else ctx.model),
                                            ("main_loss", None if ctx is None else ctx.main_loss)) if value is None]
        if missing:
            raise AuxLossError(
                f"AutoLambda learns its weights on validation batches after a look-ahead step, and the step context "
                f"lacks {missing}. The Trainer fills them in when fit() gets a val_loader; in a loop of your own pass "
                "StepContext(model=model, lr=lr, validation=<an endless iterator of validation batches>) to "
                "objective.before_step and objective.backward."
            )
        assert ctx is not None and ctx.model is not None and ctx.main_loss is not None and ctx.validation is not None
        lr = float(ctx.lr)  # type: ignore[arg-type]
        model = ctx.model
        k = len(self.aux_names)
        device = next((g.device for g in grads[0] if g is not None), torch.device("cpu"))
        weights = self.aux_weights.to(device)
        lambdas = torch.tensor(self._lambdas, dtype=torch.float64, device=device)
        unscale: float | Tensor = 1.0 if inv_scale is None else inv_scale
        names = {id(p): n for n, p in model.named_parameters()}
        state: dict[str, Tensor] = {n: b.detach().clone() for n, b in model.named_buffers()}
        leaves: list[Tensor | None] = []
        for i, p in enumerate(params):
            direction: Tensor | None = None
            for t, task in enumerate(grads):
                g = task[i]
                if g is None:
                    continue
                term = g.detach() if t == 0 else g.detach() * (weights[t - 1] * lambdas[t - 1])
                if inv_scale is not None:  # the virtual step is taken in the true gradient domain
                    term = term * inv_scale.to(term.dtype)
                direction = term if direction is None else direction + term
            name = names.get(id(p))
            if direction is None or name is None:
                leaves.append(None)
                continue
            leaf = (p.detach() - lr * direction.to(p.dtype)).requires_grad_(True)
            state[name] = leaf
            leaves.append(leaf)
        batch = next(ctx.validation)
        val_loss = ctx.main_loss(lambda x: torch.func.functional_call(model, state, (x,)), batch)
        present = [leaf for leaf in leaves if leaf is not None]
        v_present = torch.autograd.grad(val_loss, present, allow_unused=True)
        self.n_backward_calls += 1
        it = iter(v_present)
        v: list[Tensor | None] = [next(it) if leaf is not None else None for leaf in leaves]
        v = all_reduce_mean(v)  # under DDP each rank scored its own validation batch
        task_grads = [[None if g is None else g.detach() * unscale for g in task] for task in grads[1:]]
        hyper = lookahead_hypergradient(v, task_grads, lambdas, lr).to(device)
        if bool(torch.isfinite(hyper).all()):
            self._m, self._v = self._m.to(device), self._v.to(device)
            new, self._m, self._v = adam_step(weights, hyper, self._m, self._v, self.updates + 1, lr=self.lr,
                                              betas=self.betas, eps=self.eps, weight_decay=0.0)
            self.aux_weights = new.clamp(min=0.0)
            self.updates += 1
        assert len(hyper) == k
        self._tele["autol/val_loss"] = val_loss.detach()

    def backward(self, report: LossReport, ctx: StepContext) -> None:
        self._lambdas = [float(report.weights[n]) for n in self.aux_names]
        super().backward(report, ctx)

    def _combine(self, stats: list[TaskStats], *, scale: float) -> list[Combination]:
        out = []
        for s in stats:
            w = self.aux_weights[s.index]
            out.append(Combination(aux=w * s.lam, effective=w * s.lam, multiplier=w))
        return out

    def _amortized_multipliers(self) -> Tensor | None:
        return None if self._cached is None else self.aux_weights.clone()

    def telemetry(self) -> dict[str, Tensor]:
        return self._weights_telemetry("autol_w", self.aux_weights)

    def _state(self) -> dict[str, Any]:
        return {"aux_weights": self.aux_weights.detach().cpu().clone(), "m": self._m.detach().cpu().clone(),
                "v": self._v.detach().cpu().clone(), "updates": self.updates}

    def _load_state(self, state: dict[str, Any]) -> None:
        if state:
            self.aux_weights = torch.as_tensor(state["aux_weights"], dtype=torch.float64).clone()
            self._m = torch.as_tensor(state["m"], dtype=torch.float64).clone()
            self._v = torch.as_tensor(state["v"], dtype=torch.float64).clone()
            self.updates = int(state["updates"])

    def _args_repr(self) -> str:
        return f"lr={self.lr}, init={self.init}, betas={self.betas}, eps={self.eps}"
