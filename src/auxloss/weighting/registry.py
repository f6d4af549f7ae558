"""Build a weighting strategy from a config: ``{"type": "dwa", "temperature": 2.0}``.

:data:`WEIGHTINGS` maps each type name to a callable building that strategy from keyword arguments. The
gradient-aware strategies are imported only when asked for, so this module imports without them.

A ``layer`` key (a qualified module name, or a list of them) is resolved to those modules' parameters against
the model and passed as ``params`` to strategies that take ``params`` (GradNorm's last shared layer, the shared
parameters of the gradient-aware ones); likewise ``stats_layer`` becomes ``stats_params``. For an
:class:`~auxloss.AuxModel` the names of the user's model (``model.model``) are tried first, then the wrapper's own
(``"model.block3"``, ``"heads.aux1"``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from auxloss.errors import AuxLossError, close_matches
from auxloss.weighting.base import Weighting

__all__ = ["WEIGHTINGS", "build_weighting"]


class _Lazy:
    """A strategy class imported on first use, with some constructor arguments fixed by the type name."""

    def __init__(self, module: str, cls: str, **fixed: Any) -> None:
        self.module, self.cls, self.fixed = module, cls, fixed

    def resolve(self) -> type[Weighting]:
        try:
            return getattr(importlib.import_module(self.module), self.cls)
        except (ImportError, AttributeError) as exc:
            raise AuxLossError(f"the weighting {self.module}.{self.cls} is not available ({exc}).") from exc

    def __call__(self, **kwargs: Any) -> Weighting:
        return self.resolve()(**self.fixed, **kwargs)

    def __repr__(self) -> str:
        fixed = "".join(f", {k}={v!r}" for k, v in self.fixed.items())
        return f"<{self.module}.{self.cls}{fixed}>"


def _fixed(**kwargs: Any) -> None:
    """The ``fixed`` type: no strategy, the tasks' own λ (constant or scheduled) only."""
    if kwargs:
        raise AuxLossError(f"weighting 'fixed' takes no parameters, got {sorted(kwargs)}.")


_W = "auxloss.weighting."
WEIGHTINGS: dict[str, Callable[..., Weighting | None]] = {
    "fixed": _fixed,
    "main_progress": _Lazy(_W + "progress", "MainProgress"),
    "uncertainty": _Lazy(_W + "uncertainty", "Uncertainty"),
    "dwa": _Lazy(_W + "dwa", "DWA"),
    "gradnorm": _Lazy(_W + "gradnorm", "GradNorm"),
    "gating": _Lazy(_W + "gating", "CosineGating", weighted=False),
    "gating_weighted": _Lazy(_W + "gating", "CosineGating", weighted=True),
    "projection": _Lazy(_W + "projection", "Projection"),
    "olaux": _Lazy(_W + "olaux", "OLAux"),
    "metabalance": _Lazy(_W + "metabalance", "MetaBalance"),
}


# Config keys naming layers, resolved against the model to the parameter lists the strategies take.
_LAYER_KEYS = {"layer": "params", "stats_layer": "stats_params"}


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
    if not isinstance(builder, _Lazy):
        return builder(**params)

    cls = builder.resolve()
    accepted = inspect.signature(cls).parameters
    layer = params.get("layer")
    keys = dict(_LAYER_KEYS)
    if kind != "gradnorm":
        # For the gradient-aware strategies a layer names where the statistics are taken (the last shared block):
        # their `params` must cover every trainable tensor, so a layer there would miss the rest.
        keys["layer"] = "stats_params"
    for key, target in keys.items():
        if key not in params:
            continue
        names = params.pop(key)
        if target not in accepted:
            raise AuxLossError(f"weighting {kind!r} takes no {key!r} (it has no {target!r} to fill).")
        if target in params:
            raise AuxLossError(f"weighting {kind!r}: give either {key!r} or {target!r}, not both.")
        params[target] = resolve_layer_params(model, names, kind)
    clash = sorted(set(params) & set(builder.fixed))
    if clash:
        raise AuxLossError(f"weighting {kind!r} sets {clash} itself; choose the type name instead "
                           f"({[k for k, b in WEIGHTINGS.items() if isinstance(b, _Lazy) and b.cls == builder.cls]}).")
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(k for k in params if k not in accepted)
    if unknown and not takes_any:
        valid = [k for k in accepted if k not in builder.fixed and k != "self"]
        valid += [key for key, target in _LAYER_KEYS.items() if target in valid]
        raise AuxLossError(f"weighting {kind!r} has no parameter(s) {unknown}; its parameters are {valid}.")
    if kind == "gradnorm" and "params" not in params:
        raise AuxLossError("weighting 'gradnorm' needs 'layer': the qualified name of the last layer every task "
                           "shares (e.g. {'type': 'gradnorm', 'layer': 'block3'}).")
    try:
        weighting = builder(**params)
    except TypeError as exc:  # e.g. a required parameter missing
        raise AuxLossError(f"weighting {kind!r}: {exc}.") from exc
    if layer is not None and kind == "gradnorm":
        weighting.layer = layer if isinstance(layer, str) else ",".join(layer)
    return weighting


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
