"""A small mixture-of-experts layer whose router emits the usual auxiliary losses through :func:`auxloss.emit`.

The losses are computed by the model during its forward pass, not by a head, so the layer hands them to the
running :class:`~auxloss.AuxModel` with ``emit``; a task ``Task.emitted("load_balance", weight=0.01)`` then
weights, schedules and reports them like any other auxiliary loss. Outside an ``AuxModel`` (a stripped model in
deployment) ``emit`` does nothing.

* **Load balancing** (Switch Transformer, Fedus, Zoph and Shazeer 2021, eq. 4): with ``N`` experts,
  ``f_i`` the fraction of tokens routed to expert ``i`` and ``P_i`` the mean router probability of expert ``i``
  over the tokens, ``aux = α·N·Σ_i f_i·P_i``. It is 1 for perfectly uniform routing and ``N`` when every token
  and all the probability go to one expert. ``f`` is not differentiable (an argmax); the gradient flows through
  ``P``. The layer emits ``N·Σ_i f_i·P_i`` **without** α: α is the task's weight (0.01 in the paper).
* **Router z-loss** (ST-MoE, Zoph et al. 2022, eq. 5): ``mean over tokens of logsumexp(router_logits)²``, which
  keeps the router's logits small (a coefficient around 1e-3 in the paper). Emitted un-scaled as well.

With ``top_k > 1``, ``f_i`` counts the token-to-expert assignments, divided by ``tokens·k`` so that the ``f_i``
still sum to 1 (uniform routing still gives 1), and the gate values of a token's ``k`` experts are renormalised
to sum to 1. ``f`` counts every assignment the router made, including those a full expert then drops
(``capacity_factor``): the loss is about where the router *sends* tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auxloss._checks import positive_int, positive_number_or_none
from auxloss.errors import AuxLossError
from auxloss.taps import emit

__all__ = ["MoE", "expert_fractions", "load_balancing_loss", "router_z_loss"]


def expert_fractions(expert_index: Tensor, n_experts: int) -> Tensor:
    """``f``: the fraction of the token-to-expert assignments ``expert_index`` ``(S, k)`` that go to each expert."""
    counts = torch.bincount(expert_index.reshape(-1), minlength=n_experts)
    return counts.to(torch.get_default_dtype()) / max(1, expert_index.numel())


def load_balancing_loss(router_logits: Tensor, expert_index: Tensor) -> Tensor:
    """Switch Transformer's balancing loss without α: ``N·Σ_i f_i·P_i`` for logits ``(S, N)``, assignments ``(S, k)``."""
    n_experts = router_logits.shape[-1]
    probs = router_logits.softmax(dim=-1)
    f = expert_fractions(expert_index, n_experts).to(probs.dtype)
    p = probs.mean(dim=0)
    return n_experts * (f * p).sum()


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE's router z-loss: ``mean over tokens of logsumexp(router_logits)²``."""
    return torch.logsumexp(router_logits, dim=-1).square().mean()


class MoE(nn.Module):
    """A token-wise mixture of ``n_experts`` two-layer MLPs with a learned top-``k`` router.

    Input ``(..., dim)``; every position is a token routed on its own; output of the same shape. Each token's
    output is the gate-weighted sum of its ``top_k`` experts' outputs (gate = its router probability for
    ``top_k=1``, as in the Switch Transformer; probabilities renormalised over the chosen experts otherwise).
    Use it where a transformer block's feed-forward would go, inside a residual connection.

    Args:
        dim: token size.
        n_experts: number of experts ``N``.
        top_k: experts per token.
        hidden: the experts' hidden size (``2·dim`` by default).
        capacity_factor: ``None`` (no limit) or the Switch Transformer's capacity factor: each expert takes at most
            ``ceil(capacity_factor·tokens·k/N)`` tokens per forward, in token order; the assignments of a full
            expert are dropped (that part of the token's output is 0, so a residual connection passes it through).
        load_balance: the name the balancing loss is emitted under (``None``: not emitted).
        z_loss: the name the router z-loss is emitted under (``None``: not emitted).

    After each forward, ``last_usage`` holds ``f`` (detached: the fraction of assignments per expert) and
    ``last_dropped`` the fraction of assignments dropped for capacity, for monitoring.
    """

    def __init__(
        self,
        dim: int,
        n_experts: int,
        top_k: int = 1,
        *,
        hidden: int | None = None,
        capacity_factor: float | None = None,
        load_balance: str | None = "load_balance",
        z_loss: str | None = "router_z",
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("n_experts", n_experts), ("top_k", top_k)):
            positive_int(name, value, owner="MoE")
        if top_k > n_experts:
            raise AuxLossError(f"MoE: top_k ({top_k}) cannot exceed n_experts ({n_experts}).")
        hidden = positive_int("hidden", 2 * dim if hidden is None else hidden, owner="MoE")
        positive_number_or_none("capacity_factor", capacity_factor, owner="MoE")
        self.dim, self.n_experts, self.top_k = dim, n_experts, top_k
        self.capacity_factor = capacity_factor
        self.load_balance_name = load_balance
        self.z_loss_name = z_loss
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(n_experts)
        )
        self.last_usage: Tensor | None = None
        self.last_dropped: float = 0.0

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise AuxLossError(f"MoE expects tokens (..., {self.dim}), got {shape}.")
        tokens = x.reshape(-1, self.dim)
        logits = self.router(tokens)  # (S, N)
        probs = logits.softmax(dim=-1)
        gate, index = probs.topk(self.top_k, dim=-1)  # (S, k)
        if self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        keep = self._within_capacity(index)

        out = torch.zeros_like(tokens)
        flat_index = index.reshape(-1)
        flat_gate = gate.reshape(-1)
        flat_token = torch.arange(tokens.shape[0], device=x.device).repeat_interleave(self.top_k)
        flat_keep = keep.reshape(-1)
        for e, expert in enumerate(self.experts):
            sel = ((flat_index == e) & flat_keep).nonzero().flatten()
            if sel.numel() == 0:
                continue
            who = flat_token[sel]
            out.index_add_(0, who, flat_gate[sel].unsqueeze(-1).to(out.dtype) * expert(tokens[who]))

        self.last_usage = expert_fractions(index, self.n_experts).detach()
        self.last_dropped = 1.0 - float(keep.float().mean()) if self.capacity_factor is not None else 0.0
        if self.load_balance_name:
            emit(self.load_balance_name, load_balancing_loss(logits, index))
        if self.z_loss_name:
            emit(self.z_loss_name, router_z_loss(logits))
        return out.reshape(x.shape)

    def _within_capacity(self, index: Tensor) -> Tensor:
        """``(S, k)`` bool: which assignments fit their expert's capacity (first choices first, then token order)."""
        if self.capacity_factor is None:
            return torch.ones_like(index, dtype=torch.bool)
        s, k = index.shape
        capacity = math.ceil(self.capacity_factor * s * k / self.n_experts)
        # Priority: every token's first choice before any second choice (GShard/Switch), then token order.
        order = index.t().reshape(-1)  # (k·S,), rank-major
        onehot = F.one_hot(order, self.n_experts)
        position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # this assignment's place in its expert's queue
        return (position < capacity).reshape(k, s).t()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_experts={self.n_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}")
