"""Build a weighting strategy from a config: ``{"type": "dwa", "temperature": 2.0}``.

:data:`WEIGHTINGS` maps each type name to the strategy class, or a ``functools.partial`` of it with some
constructor arguments fixed by the name (``gating_weighted``).

A ``layer`` key (a qualified module name, or a list of them) is resolved to those modules' parameters against
the model and passed as the constructor argument the class names in its ``layer_argument`` (GradNorm's ``params``,
the last shared layer; the gradient-aware strategies' ``stats_params``, where the statistics are taken: their
``params`` must cover every trainable tensor, so a layer there would miss the rest). A class with
``layer_required`` cannot be built without it, and one whose constructor takes ``layer`` also gets the name (for
its repr). ``stats_layer`` always becomes ``stats_params``. For an :class:`~auxloss.AuxModel` the names of the
user's model (``model.model``) are tried first, then the wrapper's own (``"model.block3"``, ``"heads.aux1"``).
A class's ``config_aliases`` rename config keys first: ``{type: torchjd, aggregator: CAGrad, params: {c: 0.4}}``
gives the TorchJD bridge ``aggregator_params={"c": 0.4}``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from auxloss.errors import AuxLossError, close_matches
from auxloss.weighting.arml import ARML
from auxloss.weighting.autolambda import AutoLambda
from auxloss.weighting.auxilearn import AuxiLearn
from auxloss.weighting.base import Weighting
from auxloss.weighting.bloop import BLOOP
from auxloss.weighting.dwa import DWA
from auxloss.weighting.famo import FAMO
from auxloss.weighting.gating import CosineGating
from auxloss.weighting.gradnorm import GradNorm
from auxloss.weighting.metabalance import MetaBalance
from auxloss.weighting.olaux import OLAux
from auxloss.weighting.progress import MainProgress
from auxloss.weighting.projection import Projection
from auxloss.weighting.rlw import RLW
from auxloss.weighting.torchjd import TorchJD
from auxloss.weighting.uncertainty import Uncertainty

__all__ = ["WEIGHTINGS", "build_weighting"]


def _fixed(**kwargs: Any) -> None:
    """The ``fixed`` type: no strategy, the tasks' own λ (constant or scheduled) only."""
    if kwargs:
        raise AuxLossError(f"weighting 'fixed' takes no parameters, got {sorted(kwargs)}.")


WEIGHTINGS: dict[str, Callable[..., Weighting | None]] = {
    "fixed": _fixed,
    "main_progress": MainProgress,
    "uncertainty": Uncertainty,
    "dwa": DWA,
    "gradnorm": GradNorm,
    "gating": functools.partial(CosineGating, weighted=False),
    "gating_weighted": functools.partial(CosineGating, weighted=True),
    "projection": Projection,
    "olaux": OLAux,
    "metabalance": MetaBalance,
    "arml": ARML,
    "bloop": BLOOP,
    "auto_lambda": AutoLambda,
    "auxilearn": AuxiLearn,
    "rlw": RLW,
    "famo": FAMO,
    "torchjd": TorchJD,
}


def _split(builder: Callable[..., Any]) -> tuple[type[Weighting], dict[str, Any]]:
    """The strategy class behind a registry entry and the arguments the entry fixes."""
    if isinstance(builder, functools.partial):
        return builder.func, dict(builder.keywords)
    return builder, {}  # type: ignore[return-value]


def build_weighting(spec: Mapping[str, Any] | str | Weighting | None, *, model: nn.Module | None = None
                    ) -> Weighting | None:
    """The strategy a config names, or ``None`` for fixed weights.

    Args:
        spec: ``None``, a type name (``"dwa"``), a dict ``{"type": name, **parameters}``, or a strategy already
            built (returned as it is).
        model: the model (an :class:`~auxloss.AuxModel` or a plain module), needed to resolve ``layer``.

    Raises :class:`AuxLossError` for an unknown type (with the valid ones and the closest), a parameter the
    strategy does not take, or a layer the model does not have.
    """
    if spec is None or isinstance(spec, Weighting):
        return spec
    if isinstance(spec, str):
        params: dict[str, Any] = {}
        kind: Any = spec
    elif isinstance(spec, Mapping):
        params = dict(spec)
        if "type" not in params:
            raise AuxLossError(f"a weighting config needs a 'type' key (one of {sorted(WEIGHTINGS)}); got keys "
                               f"{sorted(params)}.")
        kind = params.pop("type")
    else:
        raise AuxLossError(f"a weighting is a type name or a dict with 'type', got {type(spec).__name__}.")
    if kind is None:
        kind = "fixed"
    if not isinstance(kind, str) or kind.lower() not in WEIGHTINGS:
        hint = close_matches(str(kind), WEIGHTINGS, n=3)
        raise AuxLossError(f"unknown weighting type {kind!r}; valid types: {sorted(WEIGHTINGS)}."
                           + (f" Did you mean {hint[0]!r}?" if hint else ""))
    kind = kind.lower()
    builder = WEIGHTINGS[kind]
    if builder is _fixed:
        return builder(**params)

    cls, fixed = _split(builder)
    accepted = inspect.signature(cls).parameters
    for key, target in cls.config_aliases.items():
        if key in params:
            if target in params:
                raise AuxLossError(f"weighting {kind!r}: give either {key!r} or {target!r}, not both.")
            params[target] = params.pop(key)
    layer = params.get("layer")
    keys = {"layer": cls.layer_argument, "stats_layer": "stats_params"}
    for key, target in keys.items():
        if key not in params:
            continue
        names = params.pop(key)
        if target is None or target not in accepted:
            raise AuxLossError(f"weighting {kind!r} takes no {key!r} (it has no {target or 'layer'!r} to fill).")
        if target in params:
            raise AuxLossError(f"weighting {kind!r}: give either {key!r} or {target!r}, not both.")
        params[target] = resolve_layer_params(model, names, kind)
    if cls.layer_required and cls.layer_argument not in params:
        raise AuxLossError(f"weighting {kind!r} needs 'layer': the qualified name of the layer whose parameters fill "
                           f"its {cls.layer_argument!r} (e.g. {{'type': {kind!r}, 'layer': 'block3'}}).")
    if layer is not None and "layer" in accepted:  # the name itself, for the strategy's repr
        params["layer"] = layer if isinstance(layer, str) else ",".join(layer)
    clash = sorted(set(params) & set(fixed))
    if clash:
        names = [k for k, b in WEIGHTINGS.items() if _split(b)[0] is cls]
        raise AuxLossError(f"weighting {kind!r} sets {clash} itself; choose the type name instead ({names}).")
    if "mode" in params and "mode" not in accepted:
        by_mode = {mode: [name for name, b in WEIGHTINGS.items() if mode in getattr(_split(b)[0], "modes", ())]
                   for mode in ("exact", "amortized", "representation")}
        raise AuxLossError(
            f"weighting {kind!r} has no gradient mode (got mode={params['mode']!r}): it does not take per-task "
            f"gradients. mode='exact' and 'amortized' are offered by {by_mode['amortized']}; mode='representation' "
            f"by {by_mode['representation']}."
        )
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(k for k in params if k not in accepted)
    if unknown and not takes_any:
        valid = [k for k in accepted if k not in fixed and k != "self"]
        valid += [key for key, target in keys.items() if target in valid]
        # a config names an aliased argument by its alias (and cannot reach the argument the alias shadows)
        alias_of = {target: key for key, target in cls.config_aliases.items()}
        valid = [alias_of.get(k, k) for k in valid if k not in cls.config_aliases]
        raise AuxLossError(f"weighting {kind!r} has no parameter(s) {unknown}; its parameters are {valid}.")
    try:
        return builder(**params)
    except TypeError as exc:  # e.g. a required parameter missing
        raise AuxLossError(f"weighting {kind!r}: {exc}.") from exc


def resolve_layer_params(model: nn.Module | None, layer: str | list[str], kind: str = "gradnorm") -> list[nn.Parameter]:
    """The parameters of the named layer(s) of ``model`` (for an AuxModel: its user model's names first)."""
    if model is None:
        raise AuxLossError(f"weighting {kind!r}: 'layer' needs the model to look it up; call "
                           "build_weighting(spec, model=model).")
    names = [layer] if isinstance(layer, str) else list(layer)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise AuxLossError(f"weighting {kind!r}: 'layer' must be a module name or a list of them, got {layer!r}.")
    roots = [model]
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        roots.insert(0, inner)
    out: list[nn.Parameter] = []
    for name in names:
        module = None
        for root in roots:
            found = dict(root.named_modules()).get(name)
            if found is not None:
                module = found
                break
        if module is None:
            candidates = [n for root in roots for n in dict(root.named_modules()) if n]
            hint = close_matches(name, candidates)
            raise AuxLossError(f"weighting {kind!r}: the model has no layer {name!r}."
                               + (f" Closest names: {hint}." if hint else "")
                               + " Run auxloss.list_layers(model, example_input) to see them.")
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise AuxLossError(f"weighting {kind!r}: layer {name!r} has no trainable parameters; pick a layer with "
                               "weights (a Linear or Conv, or a block holding them).")
        out.extend(params)
    return out
