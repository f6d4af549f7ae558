"""Dynamic Weight Average: weight each auxiliary task by how slowly its loss is falling.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019 (§3.3). With ``L̄_k(t)`` the mean
training loss of auxiliary task k over epoch t, ``K`` the number of auxiliary tasks and τ a temperature::

    r_k(t−1) = L̄_k(t−1) / L̄_k(t−2)
    w_k(t)   = K · exp(r_k(t−1)/τ) / Σ_j exp(r_j(t−1)/τ)          (so Σ_k w_k = K)

and ``w_k = 1`` for the first two epochs, before two ratios exist. A task whose loss falls slowly (``r`` near or
above 1) gets more weight; τ → ∞ gives equal weights. With a single auxiliary task the weight is always 1 (DWA
only shares weight among tasks). Default ``temperature=2.0`` (the paper's τ = 2).

Only the auxiliary tasks are weighted (``K`` counts them alone); the main task's weight stays 1. Epoch means are
accumulated from training steps only (a forward with gradients enabled; evaluation batches under
``torch.no_grad()`` leave the state alone), each step's raw, detached loss counted equally, and rolled at
:meth:`DWA.on_epoch_end`. A non-finite loss is left out of its task's mean. Everything lives in buffers, on the
objective's device, so accumulating costs no device sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from auxloss._distributed import SyncedState
from auxloss.errors import AuxLossError
from auxloss.weighting.base import LossWeighting

__all__ = ["DWA", "dwa_weights"]

_TINY = 1e-12  # floor of a previous epoch's mean loss, so that a loss of exactly 0 gives a ratio instead of 0/0


def dwa_weights(last: Tensor, before: Tensor, temperature: float) -> Tensor:
    """``K · softmax(r/τ)`` with ``r = last / before``: the DWA weights from two epochs' mean losses.

    A ratio that cannot be formed (a task with no finite loss in one of the epochs) counts as 1.
    """
    ratio = last / before.clamp_min(_TINY)
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    return ratio.numel() * torch.softmax(ratio / temperature, dim=0)


class DWA(SyncedState, LossWeighting):
    """Dynamic Weight Average over the auxiliary tasks: ``w_k = K·softmax_k(r_k/τ)`` from epoch-mean loss ratios.

    Args:
        temperature: τ > 0; larger values make the weights more even.

    State (buffers, in task order): ``loss_sum``/``loss_count`` of the epoch in progress, ``epoch_means`` (row 0
    the last finished epoch, row 1 the one before), ``epochs_seen`` and the current ``weights``.
    Telemetry: ``dwa_w/<task>``.
    """

    loss_sum: Tensor
    loss_count: Tensor
    epoch_means: Tensor
    epochs_seen: Tensor
    weights: Tensor

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise AuxLossError(f"DWA: temperature must be a positive finite number, got {temperature!r}.")
        self.temperature = float(temperature)

    def bind(self, main: str, aux: list[str]) -> None:
        super().bind(main, aux)
        k = len(aux)
        f64 = torch.float64
        # The epoch's running sums, summed over the ranks under DDP at the epoch's end (each saw its own shard).
        self.add_state("loss_sum", torch.zeros(k, dtype=f64), reduce="sum")
        self.add_state("loss_count", torch.zeros(k, dtype=torch.long), reduce="sum")
        self.register_buffer("epoch_means", torch.full((2, k), math.nan, dtype=f64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("weights", torch.ones(k, dtype=f64))

    def _check_bound(self) -> None:
        if not hasattr(self, "weights"):
            raise AuxLossError("DWA is not bound to an objective yet: pass it as Objective(weighting=...).")

    def multipliers(self, losses: dict[str, Tensor], *, step: int, epoch: int) -> dict[str, Tensor | float]:
        self._check_bound()
        if torch.is_grad_enabled():  # a training step: count its losses towards this epoch's means
            device = self.loss_sum.device
            values = torch.stack([losses[n].detach().reshape(()).to(device=device, dtype=torch.float64)
                                  for n in self.aux_names])
            finite = torch.isfinite(values)
            self.loss_sum += torch.where(finite, values, torch.zeros_like(values))
            self.loss_count += finite.long()
        # A copy: autograd keeps the multipliers for the backward, and the buffer changes in place at epoch end.
        w = self.weights.clone()
        return {n: w[i].to(losses[n].dtype) for i, n in enumerate(self.aux_names)}

    def on_epoch_end(self, epoch: int) -> None:
        self._check_bound()
        # Under DDP every rank saw its own shard: the declared sums are summed over ranks, so that all ranks
        # compute the same weights from the global epoch means (and a checkpoint written by rank 0 fits every rank).
        self.sync_state()
        if int(self.loss_count.sum()) == 0:
            return  # no training step this epoch (or none finite): nothing to roll
        counted = self.loss_count > 0
        means = torch.where(counted, self.loss_sum / self.loss_count.clamp_min(1),
                            torch.full_like(self.loss_sum, math.nan))
        self.epoch_means[1] = self.epoch_means[0]
        self.epoch_means[0] = means
        self.epochs_seen += 1
        self.loss_sum.zero_()
        self.loss_count.zero_()
        if int(self.epochs_seen) >= 2:
            self.weights.copy_(dwa_weights(self.epoch_means[0], self.epoch_means[1], self.temperature))

    def telemetry(self) -> dict[str, Tensor]:
        if not hasattr(self, "weights"):
            return {}
        w = self.weights.detach().clone()  # a copy: the buffer changes in place at the epoch's end
        return {f"dwa_w/{n}": w[i] for i, n in enumerate(self.aux_names)}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
