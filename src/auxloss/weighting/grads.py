"""Per-task gradients, efficiently: the engine under every gradient-aware weighting.

A gradient-aware strategy needs, for the main task and each auxiliary task k, the gradient of that task's loss
alone: ``g_0 = ∇L_0`` and ``g_k = ∇L_k``. :class:`PerTaskGradientWeighting` gets them from the step's one forward
pass (``report.losses``; there is never a second forward), asks its subclass how to combine them, and writes the
combined update into ``p.grad``. The strategies (:mod:`~auxloss.weighting.gating`,
:mod:`~auxloss.weighting.projection`, :mod:`~auxloss.weighting.olaux`, :mod:`~auxloss.weighting.metabalance`) only
hold the maths.

**Which parameters.** The strategy cannot see the model, so by default it *discovers* the trainable tensors: one
walk over the autograd graph from the losses (``grad_fn.next_functions`` down to the ``AccumulateGrad`` nodes,
whose ``.variable`` is a leaf that requires grad), each node visited once. The walk is redone on every statistics
step, so a parameter set that changes (a lazily built head, a conditional branch) is always complete; it is a
Python loop over the graph's nodes, small next to the ``1 + K`` backward passes it precedes. The discovered list is
cached (``params_``) and per-parameter state follows parameters across a change. Pass ``params=`` (an
``nn.Module`` or an iterable of tensors) to skip the walk; the first statistics step then checks once that the list
covers every trainable leaf the losses reach, since a leaf outside it would silently get no gradient.

**Shared parameters.** Task k's shared parameters are those that both ``L_0`` and ``L_k`` reach (non-``None``
gradients for both). Only they are gated, projected or rescaled. Every other parameter gets the plain weighted sum:
an auxiliary head's own parameters ``λ_k·g_k``, the main path above the taps ``g_0``. Shared sets differ between
tasks (a head on ``layer1`` shares less of the trunk than one on ``layer3``); each task's statistics are taken on
its own shared set.

**Exact mode** (``mode="exact"``): ``1 + K`` calls of :func:`torch.autograd.grad` per step, one per task and each
only through the part of the graph that task's loss reaches (an auxiliary loss never runs backward through the
layers above its tap nor through the main head). With a GradScaler the losses go through ``scaler.scale`` as a
plain ``scaler.scale(loss).backward()`` would, so the gradients written are in the scaled domain the trainer's
``scaler.unscale_`` expects; the statistics (dot products, norms) are divided by the scale, so what the strategies
see and remember is in the true domain whatever the current scale.

**Statistics subset** (``stats_params=``): cosines, dot products and norms are summed over the given tensors only
(say the last shared block), while the decision applies to all shared parameters. The per-tensor products cost
little next to the backward passes; the subset's point is a cheaper, more local signal. It must meet every task's
shared set.

**Amortized mode** (``mode="amortized", every=N``): the statistics are refreshed (exact mode) on one backward
call in N (calls are counted on :meth:`backward`, micro-batches included, starting with a refresh), and on the
others a *single* backward runs on ``L_0 + Σ_k m_k·λ_k·L_k`` with each strategy's cached multiplier ``m_k``
(its "effective weight" divided by ``λ_k``; see each strategy for what it caches). The trainer puts ``m_k`` on
the gradient head k sends into the trunk, at its tap (:meth:`~PerTaskGradientWeighting.before_step` with
:meth:`~auxloss.taps.AuxModel.set_trunk_grad_scales`), and the loss keeps ``λ_k``: the trunk gets
``m_k·λ_k·g_k`` and the head's own parameters their full ``λ_k·g_k``, as in exact mode. Where that is not
possible (a loop of your own that does not call ``objective.before_step(ctx)`` with the model, a task reading
the main output, a tap shared by several tasks) the single backward uses ``m_k·λ_k`` for the whole task, so
the head's own parameters get ``m_k·λ_k·g_k`` too. Per-tensor or non-scalar rules (a projection, MetaBalance's
per-tensor rescaling) are summarised by one scalar per task between refreshes.

**Representation mode** (``mode="representation"``; gating, projection, OL-AUX and MetaBalance): the statistics
are taken with respect to the taps' outputs instead of the parameters, inside the one backward pass of a
fixed-weight step, every step; see :mod:`~auxloss.weighting.representation` for what it computes, when it equals
this engine's update and what it refuses. ``every``, ``stats_params`` and ``params`` play no part there.

**Gradient accumulation.** Each backward call is one micro-batch: the decision (gate, projection, rescaling) is
taken on that micro-batch's own gradients, and the result times ``scale`` is added to ``p.grad``. For rules that
are linear in the gradients with fixed coefficients this equals a decision on the whole batch only when the
decisions agree; with non-linear rules (gating, projection) accumulation is an average of per-micro-batch
decisions, not a decision on the average.

**Non-finite gradients** (fp16 overflow): when a statistic is not finite, that step uses the plain weighted sum
(so the infinity reaches ``p.grad`` and the GradScaler skips the step) and no state is updated.

**Telemetry.** :meth:`~PerTaskGradientWeighting.telemetry` gives ``cos/<task>`` (cosine of ``g_0`` and ``g_k`` on
the statistics set of the shared parameters), ``normratio/<task>`` (``‖g_k‖/‖g_0‖`` there) and ``effw/<task>``
(the task's effective weight, the coefficient on ``g_k`` in the least-squares sense: ``(contribution_k·g_k)/‖g_k‖²``,
or the cached one on amortized steps). The objective collects telemetry during the forward pass, before this
step's backward, so a step's report carries the previous step's values.

**Distributed.** :func:`torch.autograd.grad` bypasses DDP's gradient all-reduce, so under a process group each
task's gradients are averaged explicitly (one flat all-reduce of all tasks, :func:`auxloss._distributed.
all_reduce_mean`) before any statistic: cosines, projections and state are those of the global batch and every rank
writes the same update. Amortized steps are a plain backward, which DDP reduces itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from auxloss._distributed import all_reduce_mean, is_distributed
from auxloss.errors import AuxLossError
from auxloss.step import LossReport, StepContext, StepPlan
from auxloss.taps import AuxModel
from auxloss.weighting.base import GradientWeighting
from auxloss.weighting.representation import (
    REPRESENTATION,
    collect_representations,
    prepare_representations,
    representation_backward,
)
from auxloss.weighting.taskstats import Combination, TaskStats, cosine, task_telemetry

__all__ = [
    "Combination",
    "PerTaskGradientWeighting",
    "TaskStats",
    "cosine",
    "discover_params",
    "per_task_gradients",
]

MODES = ("exact", "amortized", REPRESENTATION)


# -- pure helpers ------------------------------------------------------------------------------------------------
def discover_params(losses: Iterable[Tensor]) -> list[Tensor]:
    """The leaf tensors requiring grad that the losses reach, in a deterministic order (depth first, first loss first).

    Walks ``grad_fn.next_functions`` once, visiting every node once; ``AccumulateGrad`` nodes hold the leaf in
    ``.variable``.
    """
    found: list[Tensor] = []
    seen_leaves: set[int] = set()
    seen_nodes: set[Any] = set()
    for loss in losses:
        if loss is None or not isinstance(loss, Tensor) or not loss.requires_grad:
            continue
        if loss.grad_fn is None:  # the loss is itself a leaf
            if id(loss) not in seen_leaves:
                seen_leaves.add(id(loss))
                found.append(loss)
            continue
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node in seen_nodes:
                continue
            seen_nodes.add(node)
            variable = getattr(node, "variable", None)
            if isinstance(variable, Tensor):
                if id(variable) not in seen_leaves:
                    seen_leaves.add(id(variable))
                    found.append(variable)
                continue
            children = [fn for fn, _ in node.next_functions if fn is not None]
            stack.extend(reversed(children))  # so that the first input is visited first
    return found


def per_task_gradients(losses: Sequence[Tensor | None], params: Sequence[Tensor]) -> tuple[list[list[Tensor | None]], int]:
    """One :func:`torch.autograd.grad` per loss with respect to ``params`` (``None`` where a loss does not reach one).

    The graph is kept for all but the last backward. Returns the gradients and the number of backward calls made
    (losses that need no gradient cost none).
    """
    live = [i for i, loss in enumerate(losses) if loss is not None and loss.requires_grad]
    out: list[list[Tensor | None]] = [[None] * len(params) for _ in losses]
    for j, i in enumerate(live):
        loss = losses[i]
        assert loss is not None
        grads = torch.autograd.grad(loss, params, retain_graph=j < len(live) - 1, allow_unused=True)
        out[i] = list(grads)
    return out, len(live)


# -- the engine ---------------------------------------------------------------------------------------------------
class PerTaskGradientWeighting(GradientWeighting):
    """Base of the gradient-aware strategies: per-task gradients, shared parameters, amortization, telemetry.

    Args:
        mode: ``"exact"`` (``1 + K`` backward calls every step), ``"amortized"`` (exact every ``every`` backward
            calls, one backward with cached weights in between) or ``"representation"`` (the statistics at the taps'
            outputs, one backward every step; :mod:`~auxloss.weighting.representation`). :attr:`modes` lists those a
            strategy offers.
        every: the refresh period of amortized mode, in backward calls.
        stats_params: tensors on which the statistics are computed (a subset of the shared parameters); ``None`` =
            all shared parameters.
        params: an ``nn.Module`` or an iterable of the trainable tensors; ``None`` = discovered from the graph.

    Subclasses implement :meth:`_combine`, and may override :meth:`_amortized_multipliers`, :meth:`_before_step`,
    :meth:`_params_changed`, :meth:`_state` and :meth:`_load_state`.
    """

    # A config's `layer` names where the statistics are taken (the last shared block): `params` must cover every
    # trainable tensor, so a layer there would miss the rest.
    layer_argument: ClassVar[str | None] = "stats_params"
    #: The modes this strategy offers, and why it does not offer the others (for the error).
    modes: ClassVar[tuple[str, ...]] = MODES
    unsupported_modes_reason: ClassVar[str] = ""

    def __init__(
        self,
        *,
        mode: str = "exact",
        every: int = 10,
        stats_params: Iterable[Tensor] | None = None,
        params: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        super().__init__()
        offered = type(self).modes
        if mode not in offered:
            why = f" ({type(self).unsupported_modes_reason})" if mode in MODES and type(self).unsupported_modes_reason else ""
            raise AuxLossError(f"{type(self).__name__}: mode must be one of {list(offered)}, got {mode!r}{why}.")
        if mode == REPRESENTATION and stats_params is not None:
            raise AuxLossError(
                f"{type(self).__name__}: stats_params (or a config's layer) names parameters, but mode='representation' "
                "takes its statistics at the taps' outputs; drop stats_params, or use mode='exact'."
            )
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise AuxLossError(f"every must be a positive integer (backward calls between refreshes), got {every!r}.")
        self.mode = mode
        self.every = every
        # Held outside the module system on purpose: these are the model's tensors, not this strategy's state, and
        # registering them would put the whole model into the objective's state_dict.
        self.__dict__["_stats_list"] = self._tensor_list(stats_params, "stats_params")
        if isinstance(params, nn.Module):
            self.__dict__["_params_source"] = params
        else:
            self.__dict__["_params_source"] = self._tensor_list(params, "params")
        self.__dict__["params_"] = None  # the parameter list of the last statistics step
        self._checked_explicit = False
        # state (see get_extra_state)
        self.backward_steps = 0  # backward calls seen in training
        self.n_backward_calls = 0  # autograd backward passes run (autograd.grad or backward)
        self._cached: Tensor | None = None  # m_k per aux task, for amortized steps
        self._tele: dict[str, Tensor] = {}
        self._scaled_at_taps: dict[str, float] = {}  # tasks whose m_k before_step put at their tap
        self.__dict__["_rep_model"] = None  # representation mode: the AuxModel of before_step, and each task's tap
        self._rep_taps: dict[str, str] = {}
        self.__dict__["_rep_slots"] = {}  # representation mode: a stable placeholder "tensor" per tapped tensor

    @staticmethod
    def _tensor_list(values: Iterable[Tensor] | None, what: str) -> list[Tensor] | None:
        if values is None:
            return None
        if isinstance(values, nn.Module):
            values = values.parameters()
        out = list(values)
        if not out:
            raise AuxLossError(f"{what} is empty; pass at least one tensor, or None.")
        for v in out:
            if not isinstance(v, Tensor):
                raise AuxLossError(f"{what} must hold tensors (parameters), got a {type(v).__name__}.")
        return out

    # -- subclass hooks ---------------------------------------------------------------------------------------
    def _combine(self, stats: list[TaskStats], *, scale: float) -> list[Combination]:
        """One :class:`Combination` per auxiliary task (tasks without shared parameters included; ignore them)."""
        raise NotImplementedError

    def _on_gradients(self, params: list[Tensor], grads: list[list[Tensor | None]], inv_scale: Tensor | None
                      ) -> None:
        """Called on every statistics step with the per-task gradients (main first, ``None`` where a task does not
        reach a tensor), after the DDP all-reduce and before :meth:`_combine`: for strategies whose statistics are
        not the task-to-main dot products (ARML's task-to-task products, Auto-Lambda's look-ahead). The gradients
        are in the GradScaler's scaled domain; ``inv_scale`` (``1/s``, or ``None`` without a scaler) unscales them."""

    def _amortized_multipliers(self) -> Tensor | None:
        """``m_k`` per auxiliary task for an amortized step (``None``: refresh now). Default: the cached ones."""
        return self._cached

    def before_step(self, ctx: StepContext) -> StepPlan:
        """Before the forward: on an amortized step, put ``m_k`` on the gradient head k sends into the trunk at its
        tap (when ``ctx.model`` is an :class:`~auxloss.AuxModel` and the tap is read by task k alone), so the trunk
        gets ``m_k·λ_k·g_k`` while the head's own parameters keep ``λ_k·g_k``, exactly as in exact mode.

        A step that takes per-task gradients asks the loop to switch DDP's own synchronisation off: it all-reduces
        those gradients itself, and an amortized step is a plain backward, which DDP must reduce as usual.
        """
        if self.mode == REPRESENTATION:
            self._prepare_representations(ctx)
            return StepPlan()  # one ordinary backward: DDP reduces the gradients itself
        exact = self._next_step_exact()
        scales: dict[str, float] = {}
        model = ctx.model
        if isinstance(model, AuxModel):
            if not exact:
                m = self._amortized_multipliers()
                assert m is not None
                taps = model.taps
                for k, name in enumerate(self.aux_names):
                    if ctx.own_taps.get(name) in taps:
                        scales[name] = float(m[k])  # a Python factor for the tap's backward hook
            model.set_trunk_grad_scales({ctx.own_taps[n]: v for n, v in scales.items()})
        self._scaled_at_taps = scales
        return StepPlan(sync_gradients=not (exact and ctx.distributed))

    def _prepare_representations(self, ctx: StepContext) -> None:
        model = ctx.model
        self._rep_taps = prepare_representations(f"{type(self).__name__}(mode='representation')", model,
                                                 ctx.task_sources, self.main_name, self.aux_names)
        self.__dict__["_rep_model"] = model

    def _next_step_exact(self) -> bool:
        """Whether the next :meth:`backward` takes per-task gradients (a refresh, or no cached multipliers yet)."""
        return self.mode == "exact" or self.backward_steps % self.every == 0 or self._amortized_multipliers() is None

    def _before_step(self, ctx: StepContext) -> None:
        """Called at the start of every backward with the step's context (OL-AUX applies its periodic update
        here)."""

    def _params_changed(self, old: list[Tensor] | None, new: list[Tensor]) -> None:
        """Called when the parameter list changes (first step included); re-align per-parameter state."""

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    # -- parameters ---------------------------------------------------------------------------------------------
    def _resolve_params(self, losses: Sequence[Tensor]) -> list[Tensor]:
        source = self.__dict__["_params_source"]
        if source is None:
            params = discover_params(losses)
        else:
            if isinstance(source, nn.Module):
                params = [p for p in source.parameters() if p.requires_grad]
            else:
                params = [p for p in source if p.requires_grad]
            if not self._checked_explicit:
                known = {id(p) for p in params}
                missing = [p for p in discover_params(losses) if id(p) not in known]
                if missing:
                    shapes = ", ".join(str(tuple(p.shape)) for p in missing[:5])
                    raise AuxLossError(
                        f"{type(self).__name__}: the losses reach {len(missing)} trainable tensor(s) missing from "
                        f"params= (shapes {shapes}{', ...' if len(missing) > 5 else ''}); they would get no "
                        "gradient. Pass the whole model (params=model), or leave params=None to discover them."
                    )
                self._checked_explicit = True
        old = self.__dict__["params_"]
        if old is None or len(old) != len(params) or any(a is not b for a, b in zip(old, params)):
            self._params_changed(old, params)
            self.__dict__["params_"] = params
        return params

    # -- backward -----------------------------------------------------------------------------------------------
    def backward(self, report: LossReport, ctx: StepContext) -> None:
        main = self.main_name
        aux = list(self.aux_names)
        losses = report.losses
        missing = [n for n in [main, *aux] if n not in losses]
        if missing:
            raise AuxLossError(
                f"{type(self).__name__}: the report has no loss for task(s) {missing}; the strategy is bound to "
                f"{[main, *aux]}. Set the weighting through Objective(weighting=...) or objective.set_weighting()."
            )
        lambdas = [float(report.weights[n]) for n in aux]  # the schedules' λ: Python floats already
        self._before_step(ctx)
        scale, scaler = ctx.scale, ctx.scaler
        refresh = self.mode != "amortized" or self.backward_steps % self.every == 0
        multipliers = None if refresh else self._amortized_multipliers()
        self.backward_steps += 1
        if self.mode == REPRESENTATION:
            self._representation_step(main, aux, lambdas, losses, ctx)
        elif multipliers is None:
            self._exact_backward(main, aux, lambdas, losses, scale=scale, scaler=scaler)
        else:
            self._single_backward(main, aux, lambdas, losses, multipliers, scale=scale, scaler=scaler)

    def _single_backward(self, main: str, aux: list[str], lambdas: list[float], losses: dict[str, Tensor],
                         multipliers: Tensor, *, scale: float, scaler: Any) -> None:
        total = losses[main]
        at_taps, self._scaled_at_taps = self._scaled_at_taps, {}
        for k, name in enumerate(aux):
            loss = losses[name]
            if name in at_taps:
                # m_k already scales this head's gradient into the trunk (at its tap): the loss keeps λ_k, so the
                # head's own parameters get their full λ_k·g_k.
                weight = torch.as_tensor(lambdas[k], device=loss.device, dtype=loss.dtype)
                self._tele[f"effw/{name}"] = torch.as_tensor(at_taps[name] * lambdas[k])
            else:
                weight = multipliers[k].to(device=loss.device, dtype=loss.dtype) * lambdas[k]
                self._tele[f"effw/{name}"] = (multipliers[k] * lambdas[k]).detach()
            total = total + weight * loss
        if scale != 1.0:
            total = total * scale
        if scaler is not None:
            total = scaler.scale(total)
        if total.requires_grad:
            torch.autograd.backward(total)
            self.n_backward_calls += 1

    def _representation_step(self, main: str, aux: list[str], lambdas: list[float], losses: dict[str, Tensor],
                             ctx: StepContext) -> None:
        """Representation mode (:mod:`~auxloss.weighting.representation`): statistics at the taps, one backward."""
        model = ctx.model if ctx.model is not None else self.__dict__["_rep_model"]
        taps, groups, keys = collect_representations(f"{type(self).__name__}(mode='representation')", model,
                                                     self._rep_taps, aux)
        for group, slot in zip(groups, self._representation_slots(keys)):
            group.slot = slot
        stats, combos, calls = representation_backward(
            losses[main], [losses[n] for n in aux], aux, lambdas, taps, groups,
            lambda st: self._combine(st, scale=ctx.scale), scale=ctx.scale, scaler=ctx.scaler)
        self.n_backward_calls += calls
        self._tele.update(task_telemetry(stats, combos))

    def _representation_slots(self, keys: list[str]) -> list[int]:
        """The slot of each tapped tensor (named by its taps): ``params_`` holds one stable placeholder per slot, so
        that per-tensor state (MetaBalance's moving averages) follows the representations as it follows
        parameters in the other modes."""
        placeholders = self.__dict__["_rep_slots"]
        order = sorted(set(keys))
        slots = [placeholders.setdefault(key, torch.zeros(())) for key in order]
        old = self.__dict__["params_"]
        if old is None or len(old) != len(slots) or any(a is not b for a, b in zip(old, slots)):
            self._params_changed(old, slots)
            self.__dict__["params_"] = slots
        return [order.index(key) for key in keys]

    def _exact_backward(self, main: str, aux: list[str], lambdas: list[float], losses: dict[str, Tensor], *,
                        scale: float, scaler: Any) -> None:
        task_losses = [losses[main], *(losses[n] for n in aux)]
        params = self._resolve_params(task_losses)
        if not params:
            return
        if scaler is not None:
            task_losses = [scaler.scale(loss) if loss.requires_grad else loss for loss in task_losses]
        grads, calls = per_task_gradients(task_losses, params)
        self.n_backward_calls += calls
        grads = _all_reduce_tasks(grads)
        g0 = grads[0]
        device = task_losses[0].device
        # 1/s² turns scaled-domain products back into true-domain ones (s = the GradScaler's current scale).
        inv_s2 = inv_s = None
        if scaler is not None:
            s = scaler.scale(torch.ones((), device=device, dtype=torch.float32))
            inv_s = 1.0 / s.to(torch.float32 if device.type == "mps" else torch.float64)  # no float64 on MPS
            inv_s2 = inv_s ** 2
        self._on_gradients(params, grads, inv_s)

        stats_ids = None
        stats_list = self.__dict__["_stats_list"]
        if stats_list is not None:
            stats_ids = {id(t) for t in stats_list}
        # With every parameter on the losses' device (the usual case) the .to(device) calls would all be no-ops,
        # each still a dispatch: skip them.
        one_device = all(p.device == device for p in params)
        sq0_cache: dict[int, Tensor] = {}
        stats: list[TaskStats] = []
        for k, name in enumerate(aux):
            gk = grads[k + 1]
            shared = [i for i in range(len(params)) if g0[i] is not None and gk[i] is not None]
            dots, sq0s, sqks = [], [], []
            for i in shared:
                a, b = g0[i], gk[i]
                assert a is not None and b is not None
                acc = torch.float64 if a.dtype == torch.float64 else torch.float32
                if i not in sq0_cache:
                    sq0 = (a * a).sum(dtype=acc)
                    sq0_cache[i] = sq0 if one_device else sq0.to(device)
                dot, sqk = (a * b).sum(dtype=acc), (b * b).sum(dtype=acc)
                if not one_device:
                    dot, sqk = dot.to(device), sqk.to(device)
                dots.append(dot)
                sq0s.append(sq0_cache[i])
                sqks.append(sqk)
            if shared:
                dot, sq0, sqk = torch.stack(dots), torch.stack(sq0s), torch.stack(sqks)
                if inv_s2 is not None:
                    dot, sq0, sqk = (t * inv_s2.to(t.dtype) for t in (dot, sq0, sqk))
            else:
                dot = sq0 = sqk = torch.zeros(0, device=device)
            if stats_ids is None:
                in_stats = torch.ones(len(shared), dtype=torch.bool, device=device)
            else:
                chosen = [id(params[i]) in stats_ids for i in shared]
                in_stats = torch.tensor(chosen, dtype=torch.bool, device=device)
                if shared and not any(chosen):
                    raise AuxLossError(
                        f"{type(self).__name__}: stats_params holds none of the parameters that the main task and "
                        f"{name!r} share; give tensors of the shared trunk below {name!r}'s tap (or stats_params=None)."
                    )
            stats.append(TaskStats(name, k, lambdas[k], shared, dot, sq0, sqk, in_stats, all_in_stats=stats_ids is None))

        live = [s for s in stats if s.has_shared]
        finite = not live or bool(torch.isfinite(torch.cat([torch.stack([s.dot.sum(), s.sq0.sum(), s.sqk.sum()])
                                                           for s in live])).all())
        if finite:
            combos = self._combine(stats, scale=scale)
            self._cached = torch.stack([c.multiplier.detach().to(device, torch.float64) for c in combos])
            self._tele.update(task_telemetry(stats, combos))
        else:  # fp16 overflow: the plain weighted sum carries the inf to p.grad, and the GradScaler skips the step
            one = torch.ones((), dtype=torch.float64, device=device)
            combos = [Combination(aux=one * lam, effective=one * lam, multiplier=one) for lam in lambdas]
        self._write(params, grads, stats, combos, lambdas, scale, one_device=one_device)

    def _write(self, params: list[Tensor], grads: list[list[Tensor | None]], stats: list[TaskStats],
               combos: list[Combination], lambdas: list[float], scale: float, *, one_device: bool = False) -> None:
        n = len(params)
        g0 = grads[0]
        main_coef: list[Tensor | None] = [None] * n
        aux_coef: list[dict[int, Tensor]] = [{} for _ in range(n)]
        for s, c in zip(stats, combos):
            aux_scalar = c.aux.dim() == 0
            main_scalar = c.main is None or c.main.dim() == 0
            for pos, i in enumerate(s.shared):
                aux_coef[i][s.index] = c.aux if aux_scalar else c.aux[pos]
                if c.main is not None:
                    extra = c.main if main_scalar else c.main[pos]
                    main_coef[i] = extra if main_coef[i] is None else main_coef[i] + extra
        for i, p in enumerate(params):
            total: Tensor | None = None
            fresh = False  # whether `total` is a tensor we created (not an autograd output we may not own)
            if g0[i] is not None:
                total = g0[i]
                if main_coef[i] is not None:
                    coef = main_coef[i] if one_device else main_coef[i].to(total.device)
                    total = total * (1.0 + coef)
                    fresh = True
            for k in range(len(stats)):
                gk = grads[k + 1][i]
                if gk is None:
                    continue
                coef = aux_coef[i].get(k)
                if coef is not None and not one_device:
                    coef = coef.to(gk.device)
                term = gk * (coef if coef is not None else lambdas[k])
                total = term if total is None else total + term
                fresh = True
            if total is None:
                continue
            if scale != 1.0:
                total = total * scale
                fresh = True
            if p.grad is None:
                p.grad = total if fresh else total.clone()
            else:
                p.grad.add_(total)

    # -- telemetry and state ------------------------------------------------------------------------------------
    def telemetry(self) -> dict[str, Tensor]:
        """The last computed ``cos/<task>``, ``normratio/<task>`` and ``effw/<task>`` (from the previous step), as
        detached tensors."""
        return dict(self._tele)

    def _weights_telemetry(self, prefix: str, weights: Tensor) -> dict[str, Tensor]:
        """:meth:`telemetry` plus ``<prefix>/<task>`` for a strategy's own learned per-task weights (detached)."""
        out = PerTaskGradientWeighting.telemetry(self)
        for k, name in enumerate(self.aux_names[:len(weights)]):
            out[f"{prefix}/{name}"] = weights[k].detach().clone()
        return out

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "backward_steps": self.backward_steps,
            "n_backward_calls": self.n_backward_calls,
            "cached": None if self._cached is None else self._cached.detach().cpu().clone(),
            "telemetry": {k: float(v) for k, v in self._tele.items()},  # floats: a checkpoint is read on any device
            "strategy": self._state(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.backward_steps = int(state["backward_steps"])
        self.n_backward_calls = int(state.get("n_backward_calls", 0))
        cached = state.get("cached")
        self._cached = None if cached is None else torch.as_tensor(cached, dtype=torch.float64).clone()
        self._tele = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in state.get("telemetry", {}).items()}
        self._load_state(state.get("strategy", {}))

    def _engine_repr(self) -> str:
        stats = self.__dict__["_stats_list"]
        source = self.__dict__["_params_source"]
        if isinstance(source, nn.Module):
            params = type(source).__name__
        else:
            params = None if source is None else f"<{len(source)} tensors>"
        return (f"mode={self.mode!r}, every={self.every}, "
                f"stats_params={None if stats is None else f'<{len(stats)} tensors>'}, params={params}")

    def __repr__(self) -> str:
        args = self._args_repr()
        return f"{type(self).__name__}({args + ', ' if args else ''}{self._engine_repr()})"

    def _args_repr(self) -> str:
        return ""


def _all_reduce_tasks(grads: list[list[Tensor | None]]) -> list[list[Tensor | None]]:
    """Under DDP, every task's gradients averaged over the processes in one all-reduce (autograd.grad bypasses
    DDP's own), so that the statistics and the update are those of the global batch; a no-op in one process."""
    if not is_distributed():
        return grads
    flat = all_reduce_mean([g for task in grads for g in task])
    n = len(grads[0]) if grads else 0
    return [flat[i * n:(i + 1) * n] for i in range(len(grads))]


def warn_realigned(what: str) -> None:
    warnings.warn(
        f"{what}: the saved per-parameter state does not match the model's parameters (a different model or "
        "parameter order); it starts afresh.",
        stacklevel=3,
    )
