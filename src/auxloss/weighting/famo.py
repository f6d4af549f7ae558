"""FAMO: fast adaptive multitask optimisation, O(1) space and time, a symmetric control.

Liu, Liang, Chen, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023. Every task i (the main
task included) has a logit ξ_i, ``z = softmax(ξ)``, and the step minimises ``Σ_i z_i·log(L_i − L_i^*)`` rescaled
by ``c = Σ_i z_i/D_i`` (``D_i = L_i − L_i^* + ε``, held constant), whose gradient is

    ∇θ = Σ_i w_i·∇L_i,     w_i = (z_i / D_i) / Σ_j (z_j / D_j)          (Σ_i w_i = 1)

so the strategy returns these ``w_i`` as multipliers of the linear sum (same gradient, an interpretable total). After
the step the logits learn from how much each log-loss actually fell:

    δ_i = log D_i(t−1) − log D_i(t),     ξ ← Adam(ξ; gradient (∂z/∂ξ)ᵀ δ = z ⊙ (δ − zᵀδ), weight decay γ)

so a task whose loss fell fast loses weight. Defaults follow the authors' code (``famo.py``): ``lr=0.025`` (the
logits' Adam learning rate), ``gamma=0.01`` (weight decay), ``ε = 1e-8``, ``L^* = 0`` for every task
(``min_losses``).

**Deviation from the authors' loop.** Their example measures ``L(t)`` with a second forward on the *same* batch
after the optimizer step; that costs a forward per step. Here ``δ`` compares the mean loss of the previous
optimizer step's micro-batches with this step's first micro-batch, on the next batch, so FAMO stays at one
forward and one backward per step; the batch-to-batch noise enters δ, and Adam averages it out. The logits move
once per optimizer step (the objective's step counter), however many micro-batches it has.

**A symmetric control.** FAMO treats the main task like any other task (``symmetric = True``): the main task's
weight is ``w_main``, not 1. A loss must stay above its ``L^*`` (the log needs ``D > 0``): a loss that can be
negative needs its own ``min_losses`` entry (FAMO issue #9), and the step that sees one raises.

**Cost.** One backward pass per step, and O(T) arithmetic for the logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from auxloss._distributed import all_reduce_mean
from auxloss.errors import AuxLossError
from auxloss.weighting.base import LossWeighting

__all__ = ["FAMO", "adam_step", "famo_logit_gradient", "famo_weights"]

EPS = 1e-8


def famo_weights(logits: Tensor, losses: Tensor, min_losses: Tensor, eps: float = EPS) -> Tensor:
    """``w_i = (z_i/D_i)/Σ_j(z_j/D_j)`` with ``z = softmax(ξ)`` and ``D = L − L^* + ε``: the loss weights whose
    linear sum has the gradient of FAMO's ``Σ z_i·log D_i / c``."""
    z = torch.softmax(logits, dim=0)
    ratio = z / (losses - min_losses + eps)
    return ratio / ratio.sum()


def famo_logit_gradient(logits: Tensor, before: Tensor, after: Tensor, min_losses: Tensor, eps: float = EPS) -> Tensor:
    """The logits' gradient ``(∂z/∂ξ)ᵀ δ = z ⊙ (δ − zᵀδ)`` with ``δ = log D(before) − log D(after)``."""
    delta = torch.log(before - min_losses + eps) - torch.log(after - min_losses + eps)
    z = torch.softmax(logits, dim=0)
    return z * (delta - (z * delta).sum())


def adam_step(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, t: int, *, lr: float, betas: tuple[float, float],
              eps: float, weight_decay: float) -> tuple[Tensor, Tensor, Tensor]:
    """One step of Adam with L2 weight decay (``torch.optim.Adam``'s rule): the new parameter and moments.
    ``t`` is the 1-based step number."""
    b1, b2 = betas
    grad = grad + weight_decay * param
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return param - lr * m_hat / (v_hat.sqrt() + eps), m, v


class FAMO(LossWeighting):
    """Fast adaptive multitask optimisation (Liu et al. 2023): softmax logits learned from the fall of each log-loss.

    Args:
        lr: the Adam learning rate of the logits (the authors' 0.025).
        gamma: the logits' weight decay γ (the authors' 0.01).
        min_losses: ``L^*`` per task name (missing tasks: 0); every loss must stay above its value.
        betas, eps: Adam's (PyTorch's defaults, as the authors' code uses).

    State (buffers, main task first): ``logits`` ξ, Adam's ``exp_avg``/``exp_avg_sq`` and ``adam_steps``, the previous
    step's summed losses and micro-batch count (``prev_sum``, ``prev_count``) and the step they belong to. Telemetry:
    ``famo_z/<task>`` (the softmax of the logits) and ``famo_w/<task>`` (the loss weights of the last training step).
    """

    symmetric = True
    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_steps: Tensor
    prev_sum: Tensor
    prev_count: Tensor
    prev_step: Tensor
    min_loss: Tensor

    def __init__(self, lr: float = 0.025, gamma: float = 0.01, min_losses: Mapping[str, float] | None = None, *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise AuxLossError(f"FAMO: {name} must be a positive finite number, got {value!r}.")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma >= 0):
            raise AuxLossError(f"FAMO: gamma (the logits' weight decay) must be finite and >= 0, got {gamma!r}.")
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise AuxLossError(f"FAMO: betas must be two numbers in [0, 1), got {betas!r}.")
        self.lr, self.gamma, self.betas, self.eps = float(lr), float(gamma), (float(betas[0]), float(betas[1])), float(eps)
        self.min_losses = dict(min_losses or {})
        for name, value in self.min_losses.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AuxLossError(f"FAMO: min_losses[{name!r}] must be a finite number, got {value!r}.")
        self._last_w: Tensor | None = None

    def bind(self, main: str, aux: list[str]) -> None:
        super().bind(main, aux)
        names = [main, *aux]
        unknown = sorted(set(self.min_losses) - set(names))
        if unknown:
            raise AuxLossError(f"FAMO: min_losses names unknown task(s) {unknown}; the tasks are {names}.")
        t, f64 = len(names), torch.float64
        self.register_buffer("logits", torch.zeros(t, dtype=f64))
        self.register_buffer("exp_avg", torch.zeros(t, dtype=f64))
        self.register_buffer("exp_avg_sq", torch.zeros(t, dtype=f64))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_sum", torch.zeros(t, dtype=f64))
        self.register_buffer("prev_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_step", torch.full((), -1, dtype=torch.long))
        self.register_buffer("min_loss", torch.tensor([float(self.min_losses.get(n, 0.0)) for n in names], dtype=f64))

    def _names(self) -> list[str]:
        if not hasattr(self, "logits"):
            raise AuxLossError("FAMO is not bound to an objective yet: pass it as Objective(weighting=...).")
        return [self.main_name, *self.aux_names]

    def multipliers(self, losses: dict[str, Tensor], *, step: int, epoch: int) -> dict[str, Tensor | float]:
        names = self._names()
        device = self.logits.device
        values = torch.stack([losses[n].detach().reshape(()).to(device=device, dtype=torch.float64) for n in names])
        if torch.is_grad_enabled():
            self._observe(values, int(step), names)
        w = famo_weights(self.logits, values, self.min_loss)
        w = torch.where(torch.isfinite(w), w, torch.full_like(w, 1.0 / len(names)))  # a NaN loss: skip, don't poison
        if torch.is_grad_enabled():
            self._last_w = w.detach().clone()
        return {n: w[i].to(losses[n].dtype) for i, n in enumerate(names)}

    def _observe(self, values: Tensor, step: int, names: list[str]) -> None:
        """A training forward: at the first micro-batch of a new optimizer step, update the logits from the fall of
        the log-losses since the previous step; then count this micro-batch towards the current step."""
        # One sync per micro-batch, only to give a clear error: a loss at or below its L* has no log.
        if bool((values - self.min_loss <= 0).any()):
            bad = [n for n, v, m in zip(names, values.tolist(), self.min_loss.tolist()) if not v > m]
            raise AuxLossError(
                f"FAMO takes the log of each loss minus its min_losses value, so every loss must stay above it; task(s) "
                f"{bad} have loss {[values[names.index(n)].item() for n in bad]}. Give FAMO(min_losses={{task: lower "
                "bound}}) for losses that can reach 0 or go negative."
            )
        prev_step = int(self.prev_step)
        if step != prev_step:
            if prev_step >= 0 and int(self.prev_count) > 0 and step > prev_step:
                before = self.prev_sum / self.prev_count
                # Under DDP each rank saw its own batch: the logits move on the mean over the ranks, so they agree.
                before, after = all_reduce_mean([before, values.clone()])
                assert before is not None and after is not None
                grad = famo_logit_gradient(self.logits, before, after, self.min_loss)
                if bool(torch.isfinite(grad).all()):
                    t = int(self.adam_steps) + 1
                    logits, m, v = adam_step(self.logits, grad, self.exp_avg, self.exp_avg_sq, t, lr=self.lr,
                                             betas=self.betas, eps=self.eps, weight_decay=self.gamma)
                    self.logits.copy_(logits)
                    self.exp_avg.copy_(m)
                    self.exp_avg_sq.copy_(v)
                    self.adam_steps.fill_(t)
            self.prev_sum.zero_()
            self.prev_count.zero_()
            self.prev_step.fill_(step)
        self.prev_sum += values
        self.prev_count += 1

    def telemetry(self) -> dict[str, Tensor]:
        if not hasattr(self, "logits"):
            return {}
        names = [self.main_name, *self.aux_names]
        z = torch.softmax(self.logits.detach(), dim=0)
        out = {f"famo_z/{n}": z[i].clone() for i, n in enumerate(names)}
        if self._last_w is not None:
            out.update({f"famo_w/{n}": self._last_w[i].clone() for i, n in enumerate(names)})
        return out

    def extra_repr(self) -> str:
        return (f"lr={self.lr}, gamma={self.gamma}, min_losses={self.min_losses!r}, betas={self.betas}, "
                f"eps={self.eps}")
