"""GradNorm: balance the tasks' gradient magnitudes on the last shared layer by their relative training rates.

Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018. Every task i of the T tasks (the main task included: the balancing is among all
of them) has a weight ``w_i``. On the last shared layer's parameters W, each step::

    G_i = ‖∇_W (w_i · L_i)‖ = w_i · ‖∇_W L_i‖         L̃_i = L_i(t) / L_i(0)        r_i = L̃_i / mean_j L̃_j
    L_grad = Σ_i | G_i − mean_j(G_j) · r_i^α |        (the target mean(G)·r^α held constant)
    ∂L_grad/∂w_i = sign(G_i − target_i) · ‖∇_W L_i‖
    w ← w − lr · ∂L_grad/∂w,   then   w ← T · w / Σ_j w_j

so a task that trains slowly (large ``r_i``) gets a larger gradient share. α sets how strongly: α = 0 equalises
the gradient norms. ``L_i(0)`` is the loss at the first training step.

**The main task stays primary.** The returned multipliers are ``m_k = w_k / w_0`` for the auxiliary tasks: the
GradNorm total ``Σ_i w_i·L_i`` equals ``w_0 · (L_main + Σ_k m_k·L_k)``, and dividing a loss by the positive scalar
``w_0`` only rescales the learning rate of that step, so the main task keeps weight 1 and the direction of the
update is GradNorm's. Task k's effective weight is ``λ_k(t)·m_k``: λ scales on top of the balance.

Implementation choices:

- ``‖∇_W L_i‖`` comes from ``torch.autograd.grad`` on W only (``retain_graph=True``), during
  :meth:`GradNorm.multipliers`, only when gradients are enabled (training); this costs T partial backward passes
  through the layers above W, which is why W should be the *last* shared layer. Evaluation leaves the state alone.
- ``w`` is updated by plain gradient descent with its own rate ``lr`` on the closed-form gradient above, not by the
  trainer's optimizer (``w`` is a buffer, so the main loss never pushes it down). The step's multipliers use ``w``
  before the update; the update takes effect from the next step. Each weight is floored at ``1e-6`` before the
  renormalisation, so weights stay positive.
- A step with a non-finite loss or gradient norm leaves ``w`` unchanged. Where ``G_i`` equals its target up to
  rounding (``|G_i − target_i| ≤ 1e-12·(|G_i| + |target_i|)``) the subgradient 0 is used.

Defaults: ``alpha=1.5`` (the paper's value for its NYUv2 experiments), ``lr=0.025``. ``params`` is required.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from auxloss._distributed import SyncedState
from auxloss.errors import AuxLossError
from auxloss.weighting.base import LossWeighting

__all__ = ["GradNorm", "gradnorm_update"]

_TINY = 1e-12
_FLOOR = 1e-6


def gradnorm_update(
    w: Tensor, grad_norms: Tensor, losses: Tensor, initial: Tensor, *, alpha: float, lr: float
) -> tuple[Tensor, Tensor]:
    """One GradNorm step on the weights ``w`` (T,), given ``‖∇_W L_i‖``, ``L_i(t)`` and ``L_i(0)``.

    Returns the renormalised new weights (``Σ w = T``) and ``L_grad``. A pure function of its inputs.
    """
    g = w * grad_norms
    loss_ratio = losses / initial.clamp_min(_TINY)
    rate = loss_ratio / loss_ratio.mean().clamp_min(_TINY)
    target = g.mean() * rate.pow(alpha)  # a constant: no gradient flows through it
    diff = g - target
    l_grad = diff.abs().sum()
    # At the kink (|G_i − target_i| at rounding level) the subgradient 0 is taken: a difference of a few ulps has
    # no sign worth following, and this keeps the update independent of the order the tasks are listed in.
    tie = diff.abs() <= 1e-12 * (g.abs() + target.abs())
    grad_w = torch.where(tie, torch.zeros_like(diff), torch.sign(diff)) * grad_norms
    new = (w - lr * grad_w).clamp_min(_FLOOR)
    return new * (w.numel() / new.sum()), l_grad


def _as_params(params: object) -> list[Tensor]:
    if params is None:
        raise AuxLossError(
            "GradNorm needs params=: the parameters of the last shared layer W, on which it measures each task's "
            "gradient norm, e.g. GradNorm(params=model.model.layer3.parameters()) for an attach()ed model, or "
            "{'type': 'gradnorm', 'layer': 'layer3'} in a config."
        )
    if isinstance(params, nn.Module):
        found: list[Tensor] = list(params.parameters())
    elif isinstance(params, Tensor):
        found = [params]
    elif isinstance(params, Iterable) and not isinstance(params, (str, bytes)):
        found = list(params)
    else:
        raise AuxLossError(f"GradNorm: params must be tensors, a module or an iterable of tensors, got "
                           f"{type(params).__name__}.")
    if not found:
        raise AuxLossError("GradNorm: params is empty; give the parameters of the last shared layer.")
    for p in found:
        if not isinstance(p, Tensor):
            raise AuxLossError(f"GradNorm: params must be tensors, got a {type(p).__name__}.")
        if not p.requires_grad:
            raise AuxLossError("GradNorm: a tensor in params does not require grad; W must be trained.")
    return found


class GradNorm(SyncedState, LossWeighting):
    """GradNorm over all T tasks on the shared layer ``params``; auxiliary multipliers ``w_k / w_0``.

    Args:
        alpha: the restoring strength α ≥ 0 (0: equal gradient norms; larger: favour slow tasks more).
        lr: the learning rate of the task weights (plain gradient descent on ``L_grad``), ≥ 0 (0 freezes them).
        params: the parameters of the last shared layer W: a module, a tensor or an iterable of tensors. Required.
        layer: the name of that layer, shown in the repr (a config's ``layer`` key sets both).

    State (buffers, main task first): ``task_weights`` (the ``w_i``, summing to T), ``initial_loss`` (``L_i(0)``),
    ``has_initial``, ``updates`` and ``l_grad`` (the last ``L_grad``). Telemetry: ``gradnorm_w/<task>`` for every
    task (the weights used this step) and ``gradnorm/l_grad``.
    """

    task_weights: Tensor
    initial_loss: Tensor
    has_initial: Tensor
    updates: Tensor
    l_grad: Tensor

    layer_argument: ClassVar[str | None] = "params"
    layer_required: ClassVar[bool] = True

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, params: object = None, *,
                 layer: str | None = None) -> None:
        super().__init__()
        for arg, value in (("alpha", alpha), ("lr", lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise AuxLossError(f"GradNorm: {arg} must be a non-negative finite number, got {value!r}.")
        self.alpha, self.lr = float(alpha), float(lr)
        # A plain list, not registered: these are the model's parameters, which the model owns and saves.
        self._params = _as_params(params)
        if layer is not None and not isinstance(layer, str):
            raise AuxLossError(f"GradNorm: layer is the name of the layer params come from, got {layer!r}.")
        self.layer = layer  # for the repr only
        self._shown: Tensor | None = None

    @property
    def params(self) -> list[Tensor]:
        return list(self._params)

    def bind(self, main: str, aux: list[str]) -> None:
        super().bind(main, aux)
        t = 1 + len(aux)
        f64 = torch.float64
        self.register_buffer("task_weights", torch.ones(t, dtype=f64))
        self.register_buffer("initial_loss", torch.full((t,), math.nan, dtype=f64))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("l_grad", torch.full((), math.nan, dtype=f64))
        # This step's measurements, averaged over the ranks under DDP (the global batch's), so that every rank
        # takes the same step on w. Not saved: they are rewritten every training step.
        self.add_state("step_norms", torch.zeros(t, dtype=f64), reduce="mean", persistent=False)
        self.add_state("step_losses", torch.zeros(t, dtype=f64), reduce="mean", persistent=False)
        self._shown = None

    @property
    def names(self) -> list[str]:
        """All tasks, main first (the order of the buffers)."""
        return [self.main_name, *self.aux_names]

    def multipliers(self, losses: dict[str, Tensor], *, step: int, epoch: int) -> dict[str, Tensor | float]:
        if not hasattr(self, "task_weights"):
            raise AuxLossError("GradNorm is not bound to an objective yet: pass it as Objective(weighting=...).")
        w = self.task_weights.clone()  # the weights in force this step (the update applies from the next one)
        self._shown = w
        if torch.is_grad_enabled() and losses[self.main_name].requires_grad:
            self._update(losses)
        return {n: (w[i + 1] / w[0]).to(losses[n].dtype) for i, n in enumerate(self.aux_names)}

    def grad_norms(self, losses: dict[str, Tensor]) -> Tensor:
        """``‖∇_W L_i‖`` per task (main first), keeping the graph for the step's backward."""
        norms = []
        for name in self.names:
            loss = losses[name]
            grads = None
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, self._params, retain_graph=True, allow_unused=True)
            if grads is None or all(g is None for g in grads):
                raise AuxLossError(
                    f"GradNorm: task {name!r}'s loss does not reach the layer given as params, so the layer is not "
                    "shared by every task. Choose a layer below every task's head: the last layer all tasks share "
                    "(at or below the lowest tapped layer)."
                )
            # at least float32 (half-precision gradients under AMP), float64 kept as it is
            sq = sum(g.detach().to(torch.promote_types(g.dtype, torch.float32)).pow(2).sum()
                     for g in grads if g is not None)
            norms.append(torch.as_tensor(sq).sqrt())
        return torch.stack(norms)

    def _update(self, losses: dict[str, Tensor]) -> None:
        device = self.task_weights.device
        f64 = torch.float64
        self.step_norms.copy_(self.grad_norms(losses).to(device=device, dtype=f64))
        self.step_losses.copy_(torch.stack([losses[n].detach().reshape(()).to(device=device, dtype=f64)
                                            for n in self.names]))
        self.sync_state()
        norms, current = self.step_norms, self.step_losses
        # No device sync: every decision is a torch.where on the device.
        finite_now = torch.isfinite(current).all()
        initial = torch.where(self.has_initial, self.initial_loss, current)
        self.initial_loss.copy_(initial)
        self.has_initial.copy_(self.has_initial | finite_now)
        new, l_grad = gradnorm_update(self.task_weights, norms, current, initial, alpha=self.alpha, lr=self.lr)
        ok = finite_now & torch.isfinite(norms).all() & torch.isfinite(new).all() & self.has_initial
        self.task_weights.copy_(torch.where(ok, new, self.task_weights))
        self.l_grad.copy_(torch.where(ok, l_grad, self.l_grad))
        self.updates += ok.long()

    def telemetry(self) -> dict[str, Tensor]:
        if not hasattr(self, "task_weights"):
            return {}
        shown = (self._shown if self._shown is not None else self.task_weights).detach().clone()
        out = {f"gradnorm_w/{n}": shown[i] for i, n in enumerate(self.names)}
        out["gradnorm/l_grad"] = self.l_grad.detach().clone()
        return out

    def extra_repr(self) -> str:
        size = sum(p.numel() for p in self._params)
        where = f"{self.layer!r}: " if self.layer else ""
        return f"alpha={self.alpha}, lr={self.lr}, params=<{where}{len(self._params)} tensors, {size} values>"
