"""A bridge to TorchJD's aggregators (UPGrad, MGDA, CAGrad, ...): symmetric multi-task methods on auxloss's engine.

TorchJD (Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232) turns the matrix of
per-task gradients, one row per task, into one update vector. Its aggregators come from the multi-task literature,
where every task counts the same: **they treat the main task like any other task**. Every other gradient-aware
strategy of auxloss keeps the main gradient's coefficient at exactly 1; these do not (MGDA may give it a weight
near 0 when an auxiliary gradient is shorter). Use them as strong symmetric baselines next to the main-first methods.

**The matrix.** Per statistics step the engine (:class:`~auxloss.weighting.grads.PerTaskGradientWeighting`) takes
each task's gradient from the step's one forward pass, all-reduced under DDP. The columns are the *shared*
parameters, the tensors that the main task and at least one auxiliary task reach (the union of each task's shared
set), flattened in the engine's parameter order. The rows are the tasks, main first, each times its schedule's
weight as in every other strategy here (ARML, projection and gating all combine ``λ_k·g_k``):

    J = [ g_0 ; λ_1·g_1 ; ... ; λ_K·g_K ]       (zeros where a task does not reach a tensor)

A task whose weight is 0 on this step (a curriculum not started) or that shares no parameter with the main task
is left out of the matrix: its row would be all zeros, and some aggregators answer a zero row with a zero update
(MGDA's least-norm point of the rows' convex hull is then 0). With a GradScaler the matrix is unscaled first, so
the aggregator sees true gradients whatever the current scale. ``J`` is one more copy of the shared gradients.

**The update.** ``aggregator(J)`` becomes the shared parameters' gradient. Every other tensor gets the plain sum
of the task gradients that reach it, as with the other strategies and TorchJD's own ``mtl_backward``: an auxiliary
head's own parameters ``λ_k·g_k``, the main path above the taps ``g_0``.

**Weights.** Most aggregators combine the rows with a weight vector computed by ``aggregator.weighting``
(TorchJD's ``WeightedAggregator``); the bridge records it: ``jd_weight/<task>`` per task, main included (the
weight on the task's row), and the engine's ``effw/<task> = λ_k·w_k`` (the coefficient on ``g_k``). Aggregators
that are not a weighted combination of the rows (``ConFIG``, ``GradDrop``, ``TrimmedMean``) have no such weights:
their telemetry holds the engine's cosines and norm ratios only.

**Amortized mode** needs those weights: between refreshes one backward runs on ``w_0·L_0 + Σ_k w_k·λ_k·L_k``
with the last refresh's weights, ``w_k`` at head k's tap (so the head keeps its full ``λ_k·g_k``; see
:mod:`~auxloss.weighting.grads`). The shared parameters then get exactly ``w·J`` with the cached ``w``; the main
path above the taps gets ``w_0·g_0`` (the engine cannot scale the main task's gradient below its head alone). A
task left out of the last refresh's matrix (weight 0 then) stays out until the next refresh.

**State.** The bridge's own state (counters, cached weights, telemetry) goes into ``state_dict``. So does a stateful
aggregator's (TorchJD marks them ``torchjd.Stateful``: ``GradVac``'s moving cosines, ``ExcessMTL``'s sums): its
tensors and plain attributes are saved and restored, so a resumed run continues exactly. An aggregator whose state
holds objects a checkpoint cannot store (``NashMTL`` keeps a cvxpy problem once it has run) restarts from its
initial state on resume, with a warning. Aggregators that draw random numbers (``Random``, ``GradVac``,
``GradDrop``) use torch's global generator, which auxloss's checkpoints restore; under DDP each process draws its
own, so seed them alike.

**Cost.** The same ``1 + K`` backward passes per statistics step as the other gradient-aware strategies (one
``torch.autograd.grad`` per task, each through the part of the graph its loss reaches), plus the aggregator on the
``(1 + K) × n`` matrix: a small quadratic program on the ``(1 + K) × (1 + K)`` Gramian for UPGrad, DualProj, MGDA
and CAGrad.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterable, Mapping
from types import MappingProxyType, ModuleType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from auxloss._extras import MissingExtraError, require
from auxloss.errors import AuxLossError, close_matches
from auxloss.weighting.grads import Combination, PerTaskGradientWeighting, TaskStats

__all__ = ["TorchJD", "available_aggregators"]

EXTRA = "torchjd"
TESTED_VERSION = "0.18.0"
#: An attribute value the aggregator state keeps under this tag is a tensor, an array or a tuple (see _plain).
_TENSOR, _ARRAY, _TUPLE = "__tensor__", "__ndarray__", "__tuple__"


def _aggregation() -> ModuleType:
    """``torchjd.aggregation``, or a :class:`MissingExtraError` naming the ``torchjd`` extra."""
    require("torchjd", EXTRA, note=f"The bridge is tested with torchjd {TESTED_VERSION}.")
    return importlib.import_module("torchjd.aggregation")


def available_aggregators() -> dict[str, type]:
    """The aggregators the installed TorchJD offers, by class name, read from ``torchjd.aggregation`` at run time.

    Every concrete ``Aggregator`` it exports, less the generic bases other aggregators are built on
    (``WeightedAggregator``, which needs a weighting object that a config cannot give).
    """
    agg = _aggregation()
    classes = {}
    for name in getattr(agg, "__all__", dir(agg)):
        obj = getattr(agg, name, None)
        if inspect.isclass(obj) and issubclass(obj, agg.Aggregator) and not inspect.isabstract(obj):
            classes[name] = obj
    bases = {c for c in classes.values() for other in classes.values() if other is not c and issubclass(other, c)}
    return {name: cls for name, cls in sorted(classes.items()) if cls not in bases}


def _build_aggregator(name: Any, params: Mapping[str, Any] | None) -> nn.Module:
    """The aggregator ``name`` built with ``params``, or an :class:`AuxLossError` saying what is wrong."""
    available = available_aggregators()
    if not isinstance(name, str) or not name:
        raise AuxLossError(f"torchjd: aggregator must be the name of a TorchJD aggregator, one of {sorted(available)}; "
                           f"got {name!r}.")
    cls = available.get(name)
    if cls is None:  # a case-insensitive match ("upgrad") is unambiguous: the names differ by more than case
        folded = [n for n in available if n.lower() == name.lower()]
        cls = available[folded[0]] if len(folded) == 1 else None
        name = folded[0] if cls is not None else name
    if cls is None:
        hint = close_matches(name, available, n=1)
        raise AuxLossError(f"torchjd: unknown aggregator {name!r}; the installed TorchJD offers {sorted(available)}."
                           + (f" Did you mean {hint[0]!r}?" if hint else ""))
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise AuxLossError(f"torchjd: params must be a mapping of {name}'s constructor arguments (e.g. {{c: 0.5}}), "
                           f"got {type(params).__name__}.")
    signature = inspect.signature(cls)
    accepted = {k: p for k, p in signature.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(k for k in params if k not in accepted)
    if unknown:
        raise AuxLossError(f"torchjd: aggregator {name} has no parameter(s) {unknown}; its parameters are "
                           f"{list(accepted)}.")
    missing = [k for k, p in accepted.items() if p.default is p.empty and k not in params]
    if missing:
        raise AuxLossError(f"torchjd: aggregator {name} needs parameter(s) {missing}: give them under params, e.g. "
                           f"params: {{{missing[0]}: ...}}.")
    kwargs = {}
    for key, value in params.items():
        # A config gives vectors (pref_vector, Constant's weights) as lists; TorchJD wants tensors.
        if isinstance(value, (list, tuple)) and "Tensor" in str(accepted[key].annotation):
            value = torch.tensor(value, dtype=torch.get_default_dtype())
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ImportError as exc:  # TorchJD's own check for a solver (quadprog, cvxpy, ecos, scipy)
        raise MissingExtraError(f"torchjd: aggregator {name} needs a solver that is not installed ({exc}). Install "
                                f"it with `pip install auxloss[{EXTRA}]`, which brings every TorchJD solver.") from exc
    except (TypeError, ValueError) as exc:
        raise AuxLossError(f"torchjd: aggregator {name} rejected params {dict(params)}: {exc}") from exc


def _is_weighted(aggregator: nn.Module | type, jd: ModuleType) -> bool:
    """Whether the aggregator's output is ``weighting(J) @ J`` (TorchJD's ``WeightedAggregator``, its forward kept):
    then the weights are the tasks' coefficients. (ConFIG also has a ``weighting``, a preference, not the
    combination.)"""
    cls = aggregator if isinstance(aggregator, type) else type(aggregator)
    return issubclass(cls, jd.WeightedAggregator) and cls.forward is jd.WeightedAggregator.forward


class TorchJD(PerTaskGradientWeighting):
    """Aggregate the per-task gradient matrix with a TorchJD aggregator (symmetric: the main task is one row).

    Args:
        aggregator: a TorchJD aggregator's class name (``"UPGrad"``, ``"MGDA"``, ``"CAGrad"``...; the installed
            TorchJD's list is :func:`available_aggregators`), or an aggregator object already built.
        aggregator_params: the aggregator's constructor arguments (``{"c": 0.5}`` for CAGrad); a config's
            ``params`` key. Only with a name.
        mode, every, stats_params, params: see :class:`~auxloss.weighting.grads.PerTaskGradientWeighting`;
            ``stats_params`` narrows the cosines and norm ratios of the telemetry, never the matrix.
            ``mode="amortized"`` needs an aggregator with weights (see the module notes).

    Example:
        >>> import auxloss as al
        >>> from auxloss.weighting.torchjd import TorchJD
        >>> weighting = TorchJD("CAGrad", {"c": 0.4})  # doctest: +SKIP
        >>> objective = al.Objective(aux=[al.Task("aux1", weight=0.3)], weighting=weighting)  # doctest: +SKIP
    """

    # A config's `params` are the aggregator's arguments; the engine's `params` (tensors) has no config form.
    config_aliases: ClassVar[Mapping[str, str]] = MappingProxyType({"params": "aggregator_params"})

    modes: ClassVar[tuple[str, ...]] = ("exact", "amortized")
    unsupported_modes_reason: ClassVar[str] = (
        "no representation mode: TorchJD's aggregators act on the matrix of per-task gradients over the parameters")

    def __init__(
        self,
        aggregator: str | nn.Module = "UPGrad",
        aggregator_params: Mapping[str, Any] | None = None,
        *,
        mode: str = "exact",
        every: int = 10,
        stats_params: Iterable[Tensor] | None = None,
        params: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        super().__init__(mode=mode, every=every, stats_params=stats_params, params=params)
        jd = _aggregation()
        if isinstance(aggregator, jd.Aggregator):
            if aggregator_params:
                raise AuxLossError("torchjd: aggregator_params are for an aggregator given by name; this one is "
                                   "already built (pass its arguments to its constructor).")
            built = aggregator
        elif isinstance(aggregator, nn.Module):
            raise AuxLossError(f"torchjd: {type(aggregator).__name__} is not a TorchJD aggregator; give a "
                               f"torchjd.aggregation.Aggregator or a name from {sorted(available_aggregators())}.")
        else:
            built = _build_aggregator(aggregator, aggregator_params)
        # Kept out of the module system: its buffers would put keys into the objective's state_dict that a fresh
        # aggregator (whose lazily made state is still None) refuses to load. Its state travels in _state().
        self.__dict__["aggregator"] = built
        self.weighted = _is_weighted(built, jd)
        if mode == "amortized" and not self.weighted:
            weighted = sorted(n for n, c in available_aggregators().items() if _is_weighted(c, jd))
            raise AuxLossError(f"torchjd: mode='amortized' reuses the aggregator's task weights between refreshes, "
                               f"and {type(built).__name__} has none (it is not a weighted combination of the rows). "
                               f"Use mode='exact', or one of {weighted}.")
        self._stateful = isinstance(built, importlib.import_module("torchjd").Stateful)
        self.main_weight: Tensor | None = None  # w_0 of the last refresh, for amortized steps
        # Within one statistics step only: the engine's gradients (_on_gradients -> _combine), then the aggregated
        # vector in the true domain with the shared tensors' indices and 1/GradScaler scale (_combine -> _write).
        self._pending: tuple[list[list[Tensor | None]], Tensor | None] | None = None
        self._update: tuple[list[int], Tensor, Tensor | None] | None = None

    # -- the matrix and the aggregator ----------------------------------------------------------------------------
    def _on_gradients(self, params: list[Tensor], grads: list[list[Tensor | None]], inv_scale: Tensor | None
                      ) -> None:
        self._pending = (grads, inv_scale)
        self._update = None

    def _combine(self, stats: list[TaskStats], *, scale: float) -> list[Combination]:
        assert self._pending is not None
        grads, inv_scale = self._pending
        columns = sorted({i for s in stats for i in s.shared})
        rows = [s for s in stats if s.has_shared and s.lam > 0]
        device = next(grads[0][i].device for i in columns) if columns else torch.device("cpu")  # type: ignore[union-attr]
        one = torch.ones((), dtype=torch.float64, device=device)
        if not columns:  # nothing shared: every tensor gets its plain task gradients
            return [Combination(aux=one * s.lam, effective=one * s.lam, multiplier=one) for s in stats]
        matrix = self.jacobian(grads, columns, [(0, 1.0), *((s.index + 1, s.lam) for s in rows)], device)
        if inv_scale is not None:
            matrix = matrix * inv_scale.to(matrix.dtype)
        aggregator = self.__dict__["aggregator"]
        captured: list[Tensor] = []
        hook = aggregator.weighting.register_forward_hook(lambda m, i, out: captured.append(out)) \
            if self.weighted else None
        try:
            vector = aggregator(matrix)
        finally:
            if hook is not None:
                hook.remove()
        self._update = (columns, vector.detach(), inv_scale)
        self._pending = None
        weights = captured[-1].detach().to(device, torch.float64) if captured else None
        row_of = {s.index: r + 1 for r, s in enumerate(rows)}
        out = []
        for s in stats:
            if not s.has_shared:  # its gradients reach no shared tensor: the plain λ_k·g_k on its own
                out.append(Combination(aux=one * s.lam, effective=one * s.lam, multiplier=one))
            elif weights is None:  # no weights: the telemetry leaves effw out (see telemetry())
                out.append(Combination(aux=one * s.lam, effective=one * float("nan"), multiplier=one))
            else:
                w = weights[row_of[s.index]] if s.index in row_of else one * 0.0  # left out: weight 0 this step
                out.append(Combination(aux=w * s.lam, effective=w * s.lam, multiplier=w))
        if weights is not None:
            self.main_weight = weights[0].clone()
            self._tele[f"jd_weight/{self.main_name}"] = weights[0].clone()
            for s in stats:
                self._tele[f"jd_weight/{s.name}"] = weights[row_of[s.index]].clone() if s.index in row_of \
                    else torch.zeros((), dtype=torch.float64, device=device)
        return out

    @staticmethod
    def jacobian(grads: list[list[Tensor | None]], columns: list[int], rows: list[tuple[int, float]],
                 device: torch.device) -> Tensor:
        """The matrix handed to the aggregator: for each ``(task, λ)`` of ``rows`` (task 0 = main) the task's
        gradients on the tensors ``columns``, flattened and concatenated, times λ; zeros where it reaches none."""
        present = [g for t, _ in rows for i in columns if (g := grads[t][i]) is not None]
        dtype = torch.float32
        for g in present:
            dtype = torch.promote_types(dtype, g.dtype)
        sizes = [next(g for t, _ in rows if (g := grads[t][i]) is not None).numel() for i in columns]
        matrix = torch.zeros(len(rows), sum(sizes), dtype=dtype, device=device)
        for r, (t, lam) in enumerate(rows):
            start = 0
            for i, size in zip(columns, sizes):
                g = grads[t][i]
                if g is not None:
                    matrix[r, start:start + size] = g.detach().reshape(-1).to(device, dtype) * lam
                start += size
        return matrix

    # -- writing p.grad --------------------------------------------------------------------------------------------
    def _write(self, params: list[Tensor], grads: list[list[Tensor | None]], stats: list[TaskStats],
               combos: list[Combination], lambdas: list[float], scale: float, *, one_device: bool = False) -> None:
        update, self._update, self._pending = self._update, None, None
        if update is None:  # a non-finite step (the engine's plain weighted sum) or nothing shared
            super()._write(params, grads, stats, combos, lambdas, scale, one_device=one_device)
            return
        columns, vector, inv_scale = update
        if inv_scale is not None:  # back into the GradScaler's scaled domain that scaler.unscale_ expects
            vector = vector / inv_scale.to(vector.dtype)
        if scale != 1.0:
            vector = vector * scale
        offsets: dict[int, int] = {}
        start = 0
        for i in columns:
            offsets[i] = start
            start += params[i].numel()
        for i, p in enumerate(params):
            if i in offsets:  # a copy of its own, not a view that would keep the whole vector alive
                total: Tensor | None = vector[offsets[i]:offsets[i] + p.numel()].view(p.shape).to(
                    p.device, p.dtype, copy=True)
            else:  # the plain sum of the task gradients that reach it (a head's λ_k·g_k, the main path's g_0)
                total = grads[0][i]
                for k, lam in enumerate(lambdas):
                    gk = grads[k + 1][i]
                    if gk is not None:
                        total = gk * lam if total is None else total + gk * lam
                if total is None:
                    continue
                total = total * scale if scale != 1.0 else total.clone()  # never hand out an autograd output
            if p.grad is None:
                p.grad = total
            else:
                p.grad.add_(total)

    def _exact_backward(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._exact_backward(*args, **kwargs)
        finally:  # never keep a step's gradients alive past it (an exception in between included)
            self._pending = self._update = None

    def _single_backward(self, main: str, aux: list[str], lambdas: list[float], losses: dict[str, Tensor],
                         multipliers: Tensor, *, scale: float, scaler: Any) -> None:
        w0 = self.main_weight
        if w0 is not None:  # the main row's weight of the last refresh: the shared tensors get w·J
            loss = losses[main]
            losses = {**losses, main: loss * w0.to(device=loss.device, dtype=loss.dtype)}
        super()._single_backward(main, aux, lambdas, losses, multipliers, scale=scale, scaler=scaler)

    # -- telemetry and state ---------------------------------------------------------------------------------------
    def telemetry(self) -> dict[str, Tensor]:
        """The engine's ``cos``/``normratio``, and with a weighted aggregator ``effw`` and ``jd_weight/<task>``."""
        out = super().telemetry()
        if not self.weighted:
            out = {k: v for k, v in out.items() if not k.startswith("effw/")}
        return out

    def _state(self) -> dict[str, Any]:
        return {
            "main_weight": None if self.main_weight is None else self.main_weight.detach().cpu().clone(),
            "aggregator": self._aggregator_state(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        w0 = state.get("main_weight")
        self.main_weight = None if w0 is None else torch.as_tensor(w0, dtype=torch.float64).clone()
        saved = state.get("aggregator")
        if saved is not None:
            self._restore_aggregator(saved)
        elif self._stateful:
            warnings.warn(f"torchjd: the checkpoint holds no state for {type(self.__dict__['aggregator']).__name__} "
                          "(it kept objects a checkpoint cannot store); it restarts from its initial state.",
                          stacklevel=2)
            self.__dict__["aggregator"].reset()

    def _aggregator_state(self) -> dict[str, Any] | None:
        """A stateful aggregator's tensors and plain attributes, per submodule (``None`` for a stateless one, or
        one holding something a ``weights_only`` checkpoint cannot store)."""
        if not self._stateful:
            return None
        internals = set(nn.Module().__dict__)
        out: dict[str, Any] = {}
        for name, module in self.__dict__["aggregator"].named_modules():
            attrs: dict[str, Any] = {}
            for key, value in module.__dict__.items():
                if key in internals or callable(value):  # nn.Module's own fields; code (functions, projectors)
                    continue
                ok, plain = _plain(value)
                if not ok:
                    return None
                attrs[key] = plain
            buffers = {}
            for key, value in module._buffers.items():
                ok, plain = _plain(value)
                if not ok:
                    return None
                buffers[key] = plain
            out[name] = {"attrs": attrs, "buffers": buffers}
        return out

    def _restore_aggregator(self, state: dict[str, Any]) -> None:
        modules = dict(self.__dict__["aggregator"].named_modules())
        if set(state) != set(modules):
            warnings.warn("torchjd: the saved aggregator state does not match this aggregator's modules (another "
                          "aggregator?); it starts afresh.", stacklevel=3)
            return
        for name, entry in state.items():
            module = modules[name]
            for key, value in entry["buffers"].items():
                module._buffers[key] = _unplain(value)
            for key, value in entry["attrs"].items():
                module.__dict__[key] = _unplain(value)  # the stored field itself, not through a property's check

    def _args_repr(self) -> str:
        return f"aggregator={self.__dict__['aggregator']!r}"


def _plain(value: Any) -> tuple[bool, Any]:
    """``(True, value)`` in a form ``torch.load(weights_only=True)`` rebuilds (tensors on the CPU with their device
    noted, numpy arrays as tensors, tuples tagged), or ``(False, None)`` for anything else."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return True, value
    if isinstance(value, Tensor):
        return True, (_TENSOR, value.detach().cpu().clone(), str(value.device))
    numpy = _numpy()
    if numpy is not None and isinstance(value, numpy.ndarray):
        return True, (_ARRAY, torch.from_numpy(value.copy()), str(value.dtype))
    if numpy is not None and isinstance(value, numpy.generic):
        return True, value.item()
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        if not all(ok for ok, _ in items):
            return False, None
        plain = [v for _, v in items]
        return True, ((_TUPLE, plain) if isinstance(value, tuple) else plain)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        entries = {k: _plain(v) for k, v in value.items()}
        if not all(ok for ok, _ in entries.values()):
            return False, None
        return True, {k: v for k, (_, v) in entries.items()}
    return False, None


def _unplain(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _TENSOR:
        _, tensor, device = value
        target = torch.device(device)
        usable = target.type == "cpu" or (target.type == "cuda" and torch.cuda.is_available())
        return tensor.to(target) if usable else tensor
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _ARRAY:
        numpy = _numpy()
        assert numpy is not None
        return value[1].numpy().astype(numpy.dtype(value[2]))
    if isinstance(value, tuple) and len(value) == 2 and value[0] == _TUPLE:
        return tuple(_unplain(v) for v in value[1])
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    if isinstance(value, dict):
        return {k: _unplain(v) for k, v in value.items()}
    return value


def _numpy() -> ModuleType | None:
    try:
        return importlib.import_module("numpy")
    except ImportError:
        return None
