"""Representation-level gradients: a gradient-aware rule applied at the taps, inside one backward pass.

``mode="representation"`` (gating, weighted gating, projection, OL-AUX, MetaBalance) takes each task's statistics
with respect to the *representation* its head reads, the tapped layer's output ``r_k``, as MGDA-UB (Sener and
Koltun 2018) and LibMTL's ``rep_grad`` do, instead of over the shared parameters, and needs no backward pass
beyond the fixed-weight step's one:

1. **The forward** (armed by :meth:`PerTaskGradientWeighting.before_step` through
   :meth:`~auxloss.AuxModel.keep_representations`) feeds each head ``r_k`` through a gradient cut, so a head's
   gradient reaches its own parameters but not the trunk, and keeps both sides of the cut.
2. **One backward** of ``L_0 + Σ_k λ_k·L_k``. The heads' nodes run first (the trunk's tensor waits for all its
   consumers), so each cut has received ``λ_k·g_k`` (``g_k = ∂L_k/∂r_k``) and each head's own parameters their
   ``λ_k·g_k`` by the time a hook on the tapped tensor ``r`` fires with the gradient from the layers above, ``u``.
   The hook computes the statistics of every task whose head reads ``r`` from ``(u, g_k)``, asks the strategy for
   its rule (:class:`~auxloss.weighting.taskstats.Combination`), and hands on ``u·(1 + Σ_k main_k) + Σ_k
   aux_k·g_k``: the trunk below gets the combined gradient, and is traversed once, as in a fixed-weight step.
   Tasks whose gradient cannot be read off the cut alone (several tasks on one tap: the cut sees their sum; a task
   at weight 0) take theirs first, with :func:`torch.autograd.grad` through their heads only.

**What "the main gradient" at a tap is.** ``u`` is the gradient that reaches ``r_k`` from above: ``∂L_0/∂r_k``
when no other auxiliary task is tapped above ``r_k`` on the path to the main output (one tap, or taps on separate
branches); otherwise ``∂L_0/∂r_k`` plus what the higher tapped tasks send down through ``r_k``, as this step's
rule already weighted them (for a scalar rule, ``u_k = ∂(L_0 + Σ_{j above k} m_j·λ_j·L_j)/∂r_k``). Separating
the pure ``∂L_0/∂r_k`` there would take one more backward through the trunk between the taps, the cost this mode
avoids. The update is exactly that of the rule applied tap by tap from the top, with those vectors: for a scalar
multiplier ``m_k``, the gradient of ``L_0 + Σ_k m_k·λ_k·L_k`` on the trunk and ``λ_k·g_k`` on each head.

**Exact, or an approximation of the parameter-level method?** Given the same multipliers, the update is the
parameter-level one exactly (the trunk's gradient is linear in what reaches each tap): when both engines gate a
task the same way, they write the same gradients. The statistics differ: a dot product of representation
gradients sums over the batch's samples one by one, while one over parameters couples the samples through the
layers below (``Σ_ij δ0_i·J_i·J_jᵀ·δk_j``). So the cosines, the projection's coefficient (its guarantee
``update·u ≥ ‖u‖²`` holds at the representation), OL-AUX's ``g_0ᵀg_k`` (on another scale: retune β) and
MetaBalance's norms (one "tensor" per tapped tensor) are those of the representation: an approximation of the
parameter-level rule, exact only where the two agree. Parameters an auxiliary loss reaches other than through its
tap (a head tied to a trunk weight) get the plain ``λ_k·g_k``.

**Scope.** Every auxiliary task must read a tap (not the main output, not an emitted loss) that the main task does
not read and that is not ``call="all"``, and the main task's gradient must reach the tapped tensor: a selector
that computes a new tensor (a slice), or a layer outside the main path, is reported. Several tasks on one tap,
several taps on one layer (one tensor: one hook, every task there compared with the same ``u``) and tuple outputs
picked by an index or key work. A tap whose head reads a detached tensor (``Tap(detach=True)``, a frozen trunk)
shares nothing: its task gets ``λ_k`` on its head. ARML (products between tasks at different taps have no common
space), BLOOP (a moving average of the main gradient across batches, whose samples differ), Auto-Lambda (a
look-ahead step in parameter space) and the TorchJD bridge (aggregators over the parameter-space matrix) do not
offer this mode. Under ``torch.compile`` the cut at each head breaks the graph there (TorchDynamo runs it eagerly)
and a check on one small model gave the eager update; should a compiled graph hide the gradient at a tap, the step
reports that the main gradient never reached it rather than training without the rule.

**GradScaler, accumulation, DDP.** The heads' gradients are taken on the scaled losses and the hooks see scaled
gradients; the statistics are divided back to the true domain (the accumulation scale included), and what is
handed on stays in the scaled domain. Each backward call (micro-batch) decides for itself. Under a process group
each process holds its own samples' representation gradients: the hooks sum the scalar statistics over the
processes (one small all-reduce per tapped tensor) and divide by the world size squared, which gives exactly the
statistics of the global batch (for mean losses over equal local batches), so every rank takes the same decision
and state; the gradients themselves are reduced by DDP's own synchronisation, which stays on.

**Non-finite statistics** (fp16 overflow): that tap hands on the plain weighted sum, and the strategy's state is
left alone, as in the parameter-level engine.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from auxloss._distributed import is_distributed, sync_tensors, world_size
from auxloss._representations import TapRepresentation
from auxloss.errors import AuxLossError
from auxloss.taps import AuxModel
from auxloss.weighting.taskstats import Combination, TaskStats

__all__ = ["REPRESENTATION", "RepresentationGroup", "collect_representations", "prepare_representations",
           "representation_backward", "unwrap"]

REPRESENTATION = "representation"
#: A strategy's rule: one combination per task from the tasks' statistics (called once per tapped tensor).
Combine = Callable[[list[TaskStats]], list[Combination]]


@dataclass
class RepresentationGroup:
    """One tapped tensor of the trunk and the auxiliary tasks whose heads read it.

    ``slot``: its index among the strategy's representation slots (the "tensor" of its tasks' statistics);
    ``label``: how errors name it; ``tasks``: indices of the auxiliary tasks.
    """

    tensor: Tensor
    tasks: list[int]
    slot: int
    label: str
    fired: bool = False


def prepare_representations(who: str, model: Any, sources: Mapping[str, str], main: str, aux: Iterable[str]
                            ) -> dict[str, str]:
    """Before the forward: check that every auxiliary task reads a tap of the kind this mode needs, and ask the
    model to keep those taps' representations in the coming forward. Returns each auxiliary task's tap."""
    model = unwrap(model)
    if not isinstance(model, AuxModel):
        raise AuxLossError(
            f"{who} takes its statistics at the taps of an AuxModel, so the step needs the model: "
            "objective.before_step(StepContext(model=model)) before each forward (the Trainer and the Lightning "
            f"module do this); got {type(model).__name__}."
        )
    taps = model.taps
    found: dict[str, str] = {}
    for task in aux:
        source = sources.get(task)
        if source not in taps:
            raise AuxLossError(
                f"{who}: task {task!r} reads {source!r}, not a tap, so it has no representation to take its gradient "
                "at. Every auxiliary task must read a tap's head (Task(source=<tap name>)); use mode='exact' for "
                "tasks on the main output or on emitted losses."
            )
        if source == sources.get(main):
            raise AuxLossError(
                f"{who}: task {task!r} reads tap {source!r}, which the main task reads too, so their gradients "
                "cannot be told apart at the representation; use mode='exact'."
            )
        if taps[source].call == "all":
            raise AuxLossError(
                f"{who}: tap {source!r} stacks every call of layer {taps[source].layer!r} (call='all') into a new "
                "tensor that the main task never reads; pick one call (call='last' or an index), or use "
                "mode='exact'."
            )
        found[task] = source
    model.set_trunk_grad_scales({})
    model.keep_representations(found.values())
    return found


def unwrap(model: Any) -> Any:
    """The AuxModel inside a DDP or DataParallel wrapper (``.module``) or a compiled module (``._orig_mod``)."""
    for _ in range(3):  # compile(DDP(...)) at most
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if isinstance(model, AuxModel) or inner is None:
            break
        model = inner
    return model


def collect_representations(who: str, model: Any, task_taps: Mapping[str, str], aux: Sequence[str]) -> tuple[
        list[TapRepresentation | None], list[RepresentationGroup], list[str]]:
    """After the forward: each task's kept tap (``None`` without a live representation), the tapped tensors with
    the tasks reading each (slots still unset), and a stable key per tensor (its taps' names)."""
    model = unwrap(model)
    kept = model.take_representations() if isinstance(model, AuxModel) else None
    if kept is None or set(task_taps) != set(aux):
        raise AuxLossError(
            f"{who}: the forward kept no representations for this step. Call "
            "objective.before_step(StepContext(model=model)) before each training forward (the Trainer and the "
            "Lightning module do), then objective.backward(report, ctx) after it."
        )
    taps: list[TapRepresentation | None] = []
    by_tensor: dict[int, RepresentationGroup] = {}
    groups: list[RepresentationGroup] = []
    for k, task in enumerate(aux):
        tap = task_taps[task]
        entry = kept.get(tap)
        if entry is None:
            raise AuxLossError(
                f"{who}: tap {tap!r}'s head reads a layer output that is not a tensor; give the tap a select that "
                "picks the tensor (an index or a key), or use mode='exact'."
            )
        if not entry.trunk.requires_grad:  # a detached tap, a frozen trunk: nothing shared below the head
            taps.append(None)
            continue
        taps.append(entry)
        group = by_tensor.get(id(entry.trunk))
        if group is None:
            group = by_tensor[id(entry.trunk)] = RepresentationGroup(entry.trunk, [], -1, "")
            groups.append(group)
        group.tasks.append(k)
    keys = []
    for group in groups:
        names = sorted({task_taps[aux[k]] for k in group.tasks})
        keys.append("+".join(names))
        group.label = f"the output of tap(s) {names} (layer {model.taps[names[0]].layer!r})"
    return taps, groups, keys


def _float(t: Tensor) -> Tensor:
    """Half-precision gradients in float32 for the products (a scaled fp16 gradient squared overflows)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _plain(lam: float, device: torch.device) -> Combination:
    one = torch.ones((), dtype=torch.float64, device=device)
    return Combination(aux=one * lam, effective=one * lam, multiplier=one)


def _scalar(value: Tensor) -> Tensor:
    """A combination's coefficient on the one tensor of a representation (strategies may give one per tensor)."""
    return value if value.dim() == 0 else value.reshape(-1)[0]


def _head_gradients(losses: Sequence[Tensor], inputs: Sequence[Tensor | None], scaler: Any) -> tuple[
        list[Tensor | None], int]:
    """``∂L_k/∂(head input k)`` (through ``scaler.scale``), one ``autograd.grad`` call per round of distinct inputs.

    Tasks whose heads read different inputs go into one call: a loss reaches no other head's input (each head
    reads its own cut), so the summed outputs keep each task's gradient apart. Tasks sharing one head input (two
    tasks on one tap) need one call each.
    """
    out: list[Tensor | None] = [None] * len(losses)
    pending = [k for k, v in enumerate(inputs) if v is not None and losses[k].requires_grad]
    calls = 0
    while pending:
        batch, rest, seen = [], [], set()
        for k in pending:
            (rest if id(inputs[k]) in seen else batch).append(k)
            seen.add(id(inputs[k]))
        outputs = [losses[k] if scaler is None else scaler.scale(losses[k]) for k in batch]
        heads = [inputs[k] for k in batch]
        grads = torch.autograd.grad(outputs, heads, retain_graph=True, allow_unused=True)
        calls += 1
        for k, v, g in zip(batch, heads, grads):
            assert v is not None
            out[k] = g if g is not None else torch.zeros_like(v)
        pending = rest
    return out, calls


def _dot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``Σ a·b`` without a temporary the size of the representation where the layout allows."""
    if a.dtype == b.dtype == acc and a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum(dtype=acc)


def representation_backward(
    main_loss: Tensor,
    aux_losses: Sequence[Tensor],
    names: Sequence[str],
    lambdas: Sequence[float],
    taps: Sequence[TapRepresentation | None],
    groups: Sequence[RepresentationGroup],
    combine: Combine,
    *,
    scale: float,
    scaler: Any,
) -> tuple[list[TaskStats], list[Combination], int]:
    """Back-propagate ``L_0 + Σ_k λ_k·L_k`` once, applying the rule at each tapped tensor (see the module notes).

    ``taps[k]``: what task k's head read, ``None`` for a task without a live representation (its head alone gets
    ``λ_k·g_k``). Returns each task's statistics and combination (for telemetry and the cached multipliers) and the
    number of autograd calls made.
    """
    device = main_loss.device
    n = len(aux_losses)
    # The backward itself leaves S·λ_k·g_k at task k's cut (S: the accumulation scale times the GradScaler's s)
    # before the hook on the trunk's tensor fires. Tasks whose gradient does not arrive there alone (several tasks
    # on one tap: the cut sees their sum) or arrives scaled away (λ_k = 0) take theirs first, through the heads only.
    readers = Counter(id(t) for t in taps if t is not None)
    first = [k for k, t in enumerate(taps) if t is not None and (readers[id(t)] > 1 or lambdas[k] == 0.0)]
    taken, calls = _head_gradients([aux_losses[k] for k in first], [taps[k].head_input for k in first], scaler)  # type: ignore[union-attr]
    early = dict(zip(first, taken))
    stats: list[TaskStats | None] = [None] * n
    combos: list[Combination | None] = [None] * n
    empty = torch.zeros(0, device=device)
    in_groups = {k for g in groups for k in g.tasks}
    alone = [k for k in range(n) if k not in in_groups]
    if alone:
        solo = [TaskStats(names[k], k, lambdas[k], [], empty, empty, empty, empty.bool(), all_in_stats=True)
                for k in alone]
        for k, s, c in zip(alone, solo, combine(solo)):
            stats[k], combos[k] = s, c
    sigma = None  # the GradScaler's s, in float64 (λ_k·s in float32 would round λ_k), float32 on MPS (no float64)
    if scaler is not None:
        sigma = scaler.scale(torch.ones((), device=device, dtype=torch.float32))
        sigma = sigma.to(torch.float32 if device.type == "mps" else torch.float64)
    big = scale if sigma is None else sigma * scale  # the factor between the trunk's gradient and the true one

    def handle(group: RepresentationGroup, u: Tensor | None) -> Tensor:
        if u is None:
            raise _unreached(group, names)
        group.fired = True
        uf = _float(u)
        acc = uf.dtype
        vectors, factors = [], []  # per task: a vector and the factor between it and the true g_k
        for k in group.tasks:
            if k in early:
                vectors.append(_float(early[k]))  # type: ignore[arg-type]
                factors.append(1.0 if sigma is None else sigma)
            else:
                grad = taps[k].box.grad  # type: ignore[union-attr]
                vectors.append(_float(grad) if grad is not None else torch.zeros_like(uf))
                factors.append(big * lambdas[k])
        m = len(vectors)
        raw = torch.stack([_dot(uf, uf, acc), *(_dot(uf, x, acc) for x in vectors),
                           *(_dot(x, x, acc) for x in vectors)])
        divisors = [big * big, *(big * f for f in factors), *(f * f for f in factors)]
        if any(isinstance(d, Tensor) for d in divisors):
            raw = raw / torch.stack([torch.as_tensor(d, device=device).to(acc) for d in divisors])
        elif any(d != 1.0 for d in divisors):
            raw = raw / torch.tensor(divisors, dtype=acc, device=device)
        if is_distributed():
            raw = sync_tensors([raw], "sum")[0] / float(world_size()) ** 2  # type: ignore[operator]
        if all(math.isfinite(v) for v in raw.tolist()):  # one read of a few numbers (a sync, as in exact mode)
            group_stats = [TaskStats.single(names[k], k, lambdas[k], group.slot, raw[1 + i], raw[0], raw[1 + m + i])
                           for i, k in enumerate(group.tasks)]
            group_combos = combine(group_stats)
        else:  # fp16 overflow: the plain weighted sum, and no state moves
            group_stats = [TaskStats(names[k], k, lambdas[k], [], empty, empty, empty, empty.bool())
                           for k in group.tasks]
            group_combos = [_plain(lambdas[k], device) for k in group.tasks]
        main_extra: Tensor | None = None
        for k, s, c in zip(group.tasks, group_stats, group_combos):
            stats[k], combos[k] = s, c
            if c.main is not None:
                main_extra = _scalar(c.main) if main_extra is None else main_extra + _scalar(c.main)
        out = u if main_extra is None else u * (1.0 + main_extra).to(u.dtype)
        for x, f, c in zip(vectors, factors, group_combos):  # one fused multiply-add per task
            out = torch.addcmul(out, x.to(u.dtype), (_scalar(c.aux) * (big / f)).to(u.dtype))
        return out

    total = main_loss
    for lam, loss in zip(lambdas, aux_losses):
        total = total + lam * loss
    if scale != 1.0:
        total = total * scale
    if scaler is not None:
        total = scaler.scale(total)
    handles = [g.tensor.register_hook(lambda u, g=g: handle(g, u)) for g in groups]  # type: ignore[misc]
    try:
        if total.requires_grad:
            torch.autograd.backward(total)
            calls += 1
    finally:
        for h in handles:
            h.remove()
        for t in taps:
            if t is not None:
                t.box.grad = None
    missed = [g for g in groups if not g.fired]
    if missed:
        raise _unreached(missed[0], names)
    assert all(s is not None for s in stats) and all(c is not None for c in combos)
    return stats, combos, calls  # type: ignore[return-value]


def _unreached(group: RepresentationGroup, names: Sequence[str]) -> AuxLossError:
    tasks = [names[k] for k in group.tasks]
    return AuxLossError(
        f"mode='representation': the main task's gradient never reached {group.label}, which task(s) {tasks} "
        "read, so there is nothing to compare their gradients with there. The tapped tensor must be one the main "
        "output is computed from: not a layer outside the main path, nor a selector that computes a new tensor "
        "(a slice, a sum; pick a tuple element by index or a dict entry by key instead), nor a compiled model. "
        "Tap a layer on the main path, or use mode='exact'."
    )
