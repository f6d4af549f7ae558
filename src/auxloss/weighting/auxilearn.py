"""AuxiLearn: a small auxiliary network combines the losses, trained by implicit differentiation on held-out data.

Navon, Achituve, Maron, Chechik, Fetaya, "Auxiliary Learning by Implicit Differentiation", ICLR 2021 (reference
code AvivNavon/AuxiLearn). With ``u = (L_1, …, L_K)`` the auxiliary losses and g_φ a monotone network,

    linear:    g_φ(u) = Σ_k φ_k·u_k,   φ ≥ 0         nonlinear: g_φ(u) = W_L·softplus(…softplus(W_1·u + b_1)…),  W ≥ 0

the model trains on the gradient of ``L_train = L_0 + g_φ(u)`` with each task's schedule on its share,

    ∇θ L_train = g_0 + Σ_k m_k·λ_k·g_k,     m_k = ∂g_φ/∂u_k  (= φ_k for the linear net) Every ``every`` steps φ moves against the hypergradient of the main task's loss
on a *validation* batch, by the implicit function theorem with a truncated Neumann series for the inverse Hessian:

    v = ∇θ L_val,    p = Σ_{j=0..J} (I − η·H)^j·v,    H = ∇²θ L_train
    dL_val/dφ = −(∂/∂φ ∇θ L_train)ᵀ·p = −Σ_k (∂m_k/∂φ)·λ_k·(g_k·p)

(J = ``neumann_terms``, η = ``neumann_lr``), then the gradient is clipped to ``max_grad_norm``, φ takes an SGD step
with momentum and weight decay, and the network's weights are clipped at 0 (monotone). Defaults follow the
authors' NYUv2 trainer: J = 3, η = 1e-4, hypergradient every 50 steps, SGD lr 1e-3, momentum 0.9, weight decay
1e-4, clip 25, linear weights starting at 1, nonlinear ones uniform in [0, 1] with one hidden layer of 3 units.

Details of this implementation:

- The main task keeps weight 1 (the authors' nonlinear net adds the main loss the same way; their linear net also
  weights it). The network sees the batch-mean auxiliary losses (theirs sees per-sample losses). Like the
  gradient-aware strategies it applies ``m_k`` in its own backward: ``report.total`` is the plain ``L_0 + Σ λ_k·L_k``
  and ``report.total.backward()`` raises; ``auxilearn_m/<task>`` reports ``m_k``.
- A hypergradient step uses the step's own training batch at the current θ and one validation batch from
  ``ctx.validation`` (the authors draw a fresh training batch after the step), and writes the step's update with φ
  before its change.
- H·p needs second derivatives of the model (double backward). An op without them raises an :class:`AuxLossError`
  naming ``neumann_terms=0``, which needs first derivatives only (p = v: the one-step look-ahead approximation).
- Under a GradScaler the hypergradient step's losses are not scaled (its written gradient is, as the trainer
  expects); fp16 gradients of such a step may underflow.

**Cost.** On a hypergradient step: ``1 + K`` backward passes on the training batch (built with ``create_graph`` when
J > 0), one forward and backward on a validation batch, and J Hessian-vector products (about one backward each);
on the other steps one backward.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from auxloss._checks import positive_finite
from auxloss._distributed import all_reduce_mean
from auxloss.errors import AuxLossError
from auxloss.step import LossReport, StepContext, StepPlan
from auxloss.weighting.base import LossWeighting
from auxloss.weighting.grads import discover_params

__all__ = ["AuxiLearn", "auxnet", "neumann_inverse_hvp"]

NETS = ("linear", "nonlinear")
_OWNER = "AuxiLearn"  # how argument errors name the class


def auxnet(u: Tensor, weights: Sequence[Tensor], kind: str) -> Tensor:
    """``g_φ(u)``: ``Σ φ_k·u_k`` (``weights = [φ]``) or the softplus network ``[W_1, b_1, …, W_L]``."""
    if kind == "linear":
        return (weights[0] * u).sum()
    h = u
    for i in range(0, len(weights) - 1, 2):
        h = F.softplus(weights[i] @ h + weights[i + 1])
    return (weights[-1] @ h).sum()


def neumann_inverse_hvp(v: list[Tensor], hvp: Any, terms: int, lr: float) -> list[Tensor]:
    """``Σ_{j=0..J} (I − η·H)^j·v`` with ``hvp(x) = H·x`` (lists of tensors): the truncated Neumann series for
    ``H⁻¹·v / η``, as the reference code computes it."""
    p, cur = list(v), list(v)
    for _ in range(terms):
        hx = hvp(cur)
        cur = [c - lr * h for c, h in zip(cur, hx)]
        p = [a + c for a, c in zip(p, cur)]
    return p


class AuxiLearn(LossWeighting):
    """A monotone auxiliary network over the losses, learned by implicit differentiation (Navon et al. 2021).

    Args:
        net: ``"linear"`` or ``"nonlinear"``.
        hidden: the nonlinear net's hidden sizes.
        lr, momentum, weight_decay: the network's SGD.
        every: training steps (backward calls) between hypergradient steps.
        neumann_terms: J, the terms of the Neumann series (0: first derivatives only).
        neumann_lr: η, the series' step.
        max_grad_norm: the hypergradient's norm clip (``None``: no clip).
        seed: the nonlinear net's initialisation seed; ``None`` = the run's seed (``torch.initial_seed()``).

    The network's weights are buffers (``net_0``, ``net_1``, …), not parameters: only the hypergradient trains them,
    never the model's optimizer. They and the momentum checkpoint with the objective. Telemetry: ``auxilearn_m/<task>``
    (the multiplier ``∂g/∂u_k``).
    """

    custom_backward: ClassVar[bool] = True
    needs_validation: ClassVar[bool] = True

    def __init__(self, net: str = "linear", hidden: Sequence[int] = (3,), *, lr: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 1e-4, every: int = 50, neumann_terms: int = 3, neumann_lr: float = 1e-4,
                 max_grad_norm: float | None = 25.0, seed: int | None = None) -> None:
        super().__init__()
        if net not in NETS:
            raise AuxLossError(f"AuxiLearn: net must be one of {NETS}, got {net!r}.")
        hidden = tuple(hidden)
        if net == "nonlinear" and (not hidden or not all(isinstance(h, int) and h > 0 for h in hidden)):
            raise AuxLossError(f"AuxiLearn: hidden must be positive layer sizes, got {hidden!r}.")
        for name, value in (("every", every), ("neumann_terms", neumann_terms)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "every" else 0):
                raise AuxLossError(f"AuxiLearn: {name} must be an integer >= {1 if name == 'every' else 0}, got "
                                   f"{value!r}.")
        self.net, self.hidden = net, hidden
        self.lr = positive_finite("lr", lr, owner=_OWNER)
        self.neumann_lr = positive_finite("neumann_lr", neumann_lr, owner=_OWNER)
        self.momentum = positive_finite("momentum", momentum, owner=_OWNER, zero_ok=True)
        self.weight_decay = positive_finite("weight_decay", weight_decay, owner=_OWNER, zero_ok=True)
        self.max_grad_norm = (
            None if max_grad_norm is None else positive_finite("max_grad_norm", max_grad_norm, owner=_OWNER))
        self.every, self.neumann_terms, self.seed = every, neumann_terms, seed
        self.backward_steps = 0
        self.updates = 0
        self.n_backward_calls = 0
        self._n_weights = 0
        self._m: Tensor | None = None

    # -- the network ------------------------------------------------------------------------------------------------
    def bind(self, main: str, aux: list[str]) -> None:
        super().bind(main, aux)
        k, f64 = len(aux), torch.float64
        if self.net == "linear":
            weights = [torch.ones(k, dtype=f64)]
        else:
            g = torch.Generator().manual_seed(self.seed if self.seed is not None else torch.initial_seed())
            dims = [k, *self.hidden]
            weights = []
            for a, b in itertools.pairwise(dims):
                weights += [torch.rand(b, a, generator=g, dtype=f64), torch.zeros(b, dtype=f64)]
            weights.append(torch.rand(1, dims[-1], generator=g, dtype=f64))
        for i, w in enumerate(weights):
            self.register_buffer(f"net_{i}", w)
            self.register_buffer(f"momentum_{i}", torch.zeros_like(w))
        self._n_weights = len(weights)

    def weights(self) -> list[Tensor]:
        """The network's weights ``[φ]`` or ``[W_1, b_1, …, W_L]``."""
        if not self._n_weights:
            raise AuxLossError("AuxiLearn is not bound to an objective yet: pass it as Objective(weighting=...).")
        return [getattr(self, f"net_{i}") for i in range(self._n_weights)]

    def _multipliers_of(self, u: Tensor, weights: Sequence[Tensor], *, graph: bool) -> Tensor:
        """``m_k = ∂g_φ/∂u_k`` at ``u`` (with a graph to φ when ``graph``)."""
        if self.net == "linear":
            return weights[0]
        with torch.enable_grad():
            leaf = u.detach().clone().requires_grad_(True)
            return torch.autograd.grad(auxnet(leaf, weights, self.net), leaf, create_graph=graph)[0]

    # -- the step -------------------------------------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> StepPlan:
        # a hypergradient step takes its gradients with autograd.grad and all-reduces them itself
        return StepPlan(sync_gradients=not (self._hyper_next() and ctx.distributed))

    def _hyper_next(self) -> bool:
        return (self.backward_steps + 1) % self.every == 0

    def backward(self, report: LossReport, ctx: StepContext) -> None:
        """``L_0 + Σ_k m_k·λ_k·L_k`` back-propagated, ``m_k = ∂g_φ/∂L_k`` at this step's losses; on every
        ``every``-th call, first the hypergradient step on φ (which writes the same update itself)."""
        weights = self.weights()
        device = weights[0].device
        u = torch.stack([report.losses[n].detach().reshape(()).to(device, torch.float64) for n in self.aux_names])
        self._m = self._multipliers_of(u, weights, graph=False).detach()
        hyper = self._hyper_next()
        self.backward_steps += 1
        if hyper:
            self._hyper_step(report, ctx, u)
            return
        total = report.losses[self.main_name]
        for k, name in enumerate(self.aux_names):
            loss = report.losses[name]
            total = total + (self._m[k] * float(report.weights[name])).to(loss.dtype) * loss
        total = total * ctx.scale if ctx.scale != 1.0 else total
        if ctx.scaler is not None:
            total = ctx.scaler.scale(total)
        if total.requires_grad:
            total.backward()
            self.n_backward_calls += 1

    def _hyper_step(self, report: LossReport, ctx: StepContext, u: Tensor) -> None:
        if ctx.validation is None or ctx.model is None or ctx.main_loss is None:
            raise AuxLossError(
                "AuxiLearn trains its network on the main task's loss on validation batches, and the step context has "
                "no validation stream or model. The Trainer fills them in when fit() gets a val_loader; in a loop of "
                "your own pass StepContext(model=model, validation=<an endless iterator of validation batches>)."
            )
        main, aux = self.main_name, self.aux_names
        losses = [report.losses[main], *(report.losses[n] for n in aux)]
        params = discover_params(losses)
        weights = self.weights()
        device = weights[0].device
        assert self._m is not None
        m_now = self._m
        lam = torch.tensor([float(report.weights[n]) for n in aux], dtype=torch.float64)
        second = self.neumann_terms > 0
        grads = [list(torch.autograd.grad(loss, params, retain_graph=True, create_graph=second, allow_unused=True))
                 if loss.requires_grad else [None] * len(params) for loss in losses]
        self.n_backward_calls += sum(1 for loss in losses if loss.requires_grad)
        # the training gradient with the current network: g_0 + Σ_k m_k·λ_k·g_k (the step's update)
        coef = [1.0, *(float(m_now[k]) * float(lam[k]) for k in range(len(aux)))]
        dtrain: list[Tensor | None] = []
        for i in range(len(params)):
            total = None
            for t, task in enumerate(grads):
                if task[i] is not None:
                    term = task[i] * coef[t]
                    total = term if total is None else total + term
            dtrain.append(total)
        batch = next(ctx.validation)
        val_loss = ctx.main_loss(ctx.model, batch)
        v_raw = torch.autograd.grad(val_loss, params, allow_unused=True)
        self.n_backward_calls += 1
        v = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(v_raw, params)]
        v = all_reduce_mean(v)  # type: ignore[assignment]
        live = [i for i, d in enumerate(dtrain) if d is not None and d.requires_grad]

        def hvp(x: list[Tensor]) -> list[Tensor]:
            out = [torch.zeros_like(p) for p in params]
            if not live:
                return out
            hx = torch.autograd.grad([dtrain[i] for i in live], params, grad_outputs=[x[i] for i in live],
                                     retain_graph=True, allow_unused=True)
            self.n_backward_calls += 1
            return [o if h is None else h.detach() for o, h in zip(out, hx)]

        try:
            p = neumann_inverse_hvp(v, hvp, self.neumann_terms, self.neumann_lr)
        except (RuntimeError, NotImplementedError) as exc:  # only second derivatives are taken in here
            raise AuxLossError(
                f"AuxiLearn needs second derivatives of the model (Hessian-vector products for its Neumann series), "
                f"and an operation in it has none ({' '.join(str(exc).split())[:200]}). Use "
                "AuxiLearn(neumann_terms=0), which needs first derivatives only, or a model whose ops support double "
                "backward."
            ) from exc
        # c_k = λ_k·(g_k·p): how much task k's gradient moves θ along the validation direction
        c = []
        for k in range(len(aux)):
            terms = [(g.detach().double() * q.double()).sum() for g, q in zip(grads[k + 1], p) if g is not None]
            c.append(lam[k] * (torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)))
        c_t = torch.stack(c).to(device)
        c_t = all_reduce_mean([c_t])[0]
        assert c_t is not None
        leaves = [w.detach().clone().requires_grad_(True) for w in weights]
        m_phi = self._multipliers_of(u, leaves, graph=True)
        hyper = torch.autograd.grad(-(m_phi * c_t).sum(), leaves, allow_unused=True)
        hyper = [torch.zeros_like(w) if h is None else h for h, w in zip(hyper, weights)]
        if all(bool(torch.isfinite(h).all()) for h in hyper):
            self._meta_step(hyper)
        # the step's update, with the network before its change
        s = None if ctx.scaler is None else ctx.scaler.scale(torch.ones((), device=device, dtype=torch.float32))
        written = [None if d is None else d.detach() * ctx.scale for d in dtrain]
        if s is not None:
            written = [None if d is None else d * s.to(d.dtype) for d in written]
        written = all_reduce_mean(written)
        for param, g in zip(params, written):
            if g is None:
                continue
            if param.grad is None:
                param.grad = g.clone()
            else:
                param.grad.add_(g)

    def _meta_step(self, hyper: list[Tensor]) -> None:
        """Clip, SGD with momentum and weight decay (``torch.optim.SGD``'s rule), then clip the weights at 0."""
        if self.max_grad_norm is not None:
            norm = torch.sqrt(sum((h * h).sum() for h in hyper))
            factor = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            hyper = [h * factor for h in hyper]
        for i, (w, h) in enumerate(zip(self.weights(), hyper)):
            g = h + self.weight_decay * w
            buf = getattr(self, f"momentum_{i}")
            buf.copy_(g if self.updates == 0 else self.momentum * buf + g)
            w -= self.lr * buf
            if self.net == "linear" or i % 2 == 0 or i == self._n_weights - 1:  # weights, not biases
                w.clamp_(min=0.0)
        self.updates += 1

    def telemetry(self) -> dict[str, Tensor]:
        if self._m is None:
            return {}
        return {f"auxilearn_m/{n}": self._m[i].clone() for i, n in enumerate(self.aux_names)}

    def get_extra_state(self) -> dict[str, Any]:
        return {"backward_steps": self.backward_steps, "updates": self.updates,
                "n_backward_calls": self.n_backward_calls}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.backward_steps = int(state["backward_steps"])
        self.updates = int(state["updates"])
        self.n_backward_calls = int(state.get("n_backward_calls", 0))

    def extra_repr(self) -> str:
        return (f"net={self.net!r}, hidden={self.hidden}, lr={self.lr}, momentum={self.momentum}, "
                f"weight_decay={self.weight_decay}, every={self.every}, neumann_terms={self.neumann_terms}, "
                f"neumann_lr={self.neumann_lr}, max_grad_norm={self.max_grad_norm}, seed={self.seed}")
