"""Models by name from torchvision and timm: ``"torchvision:resnet18"``, ``"timm:resnet18"``.

Used by configs (``model: {name: "torchvision:resnet18"}``) and ``auxloss layers torchvision:resnet18``. The
weights are always freshly initialised: auxloss never downloads weights at run time. Pretrained weights come from
a file you downloaded once yourself, loaded with ``checkpoint="path/to/weights.pth"``.

torchvision and timm are optional extras (``pip install auxloss[vision]``, ``auxloss[timm]``), imported only
when a name with their prefix is resolved.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from auxloss.errors import AuxLossError, close_matches
from auxloss.integrations import require

__all__ = ["PREFIXES", "example_input", "list_models", "resolve_model", "split_name"]

#: The prefix of each source of models, and the extra that installs it.
PREFIXES = {"torchvision": "vision", "timm": "timm"}

_CPU_NOTE = (
    "torchvision is compiled against one torch release and build: install the torchvision matching your torch "
    "(same release pair, and a CPU build for a CPU-only torch, from the package index your torch came from). A "
    "mismatched wheel fails on import with `operator torchvision::nms does not exist`."
)
_TIMM_NOTE = "timm needs torchvision, so the same caveat applies: " + _CPU_NOTE

_NO_DOWNLOAD = (
    "auxloss never downloads weights at run time: models are built with fresh weights. To start from pretrained "
    "weights, download them once yourself and save the state dict (torch.save(model.state_dict(), path)), then "
    "pass checkpoint='path/to/weights.pth' (in a config: model.params.checkpoint), or call "
    "model.load_state_dict(torch.load(path, weights_only=True)) yourself before attaching heads."
)


def split_name(name: str) -> tuple[str, str]:
    """``"torchvision:resnet18"`` -> ``("torchvision", "resnet18")``; an unknown prefix is an error with hints."""
    if not isinstance(name, str) or ":" not in name:
        raise AuxLossError(
            f"model name {name!r} has no source prefix; use 'torchvision:NAME' or 'timm:NAME' "
            "(built-in models have plain names such as 'small_cnn')."
        )
    prefix, _, model = name.partition(":")
    key = prefix.strip().lower()
    if key not in PREFIXES:
        hint = close_matches(key, PREFIXES)
        did_you_mean = f" Did you mean {' or '.join(repr(h + ':' + model) for h in hint)}?" if hint else ""
        raise AuxLossError(
            f"unknown model source {prefix!r} in {name!r}.{did_you_mean} Use 'torchvision:NAME' or 'timm:NAME'."
        )
    model = model.strip()
    if not model:
        raise AuxLossError(f"model name {name!r} names no model after {prefix!r}:, e.g. '{key}:resnet18'.")
    return key, model


def _torchvision_models() -> Any:
    tv = require("torchvision", PREFIXES["torchvision"], note=_CPU_NOTE)
    return tv.models


def _timm() -> Any:
    return require("timm", PREFIXES["timm"], note=_TIMM_NOTE)


def list_models(prefix: str) -> list[str]:
    """The model names the installed torchvision or timm can build (timm: architectures, without weight tags)."""
    key, _ = split_name(prefix.partition(":")[0] + ":_")
    if key == "torchvision":
        return sorted(_torchvision_models().list_models())
    return sorted(_timm().list_models())


def _unknown(key: str, model: str, available: list[str]) -> AuxLossError:
    hint = close_matches(model, available)
    did_you_mean = f" Did you mean {' or '.join(repr(f'{key}:{h}') for h in hint)}?" if hint else ""
    return AuxLossError(
        f"{key} has no model named {model!r}.{did_you_mean} The installed {key} has {len(available)} models "
        f"(auxloss.integrations.models.list_models({key!r}) lists them)."
    )


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _torchvision(model: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    models = _torchvision_models()
    available = list(models.list_models())
    if model not in available:
        raise _unknown("torchvision", model, available)
    for key in ("weights", "weights_backbone"):
        if kwargs.get(key) is not None:
            raise AuxLossError(f"torchvision:{model}: {key}={kwargs[key]!r} would download weights. " + _NO_DOWNLOAD)
        kwargs.pop(key, None)
    builder = getattr(models, "get_model_builder", None)
    if builder is not None and _accepts(builder(model), "weights_backbone"):
        kwargs["weights_backbone"] = None  # detection/segmentation models default to a downloaded backbone
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return models.get_model(model, weights=None, **kwargs)
    except TypeError as exc:
        raise AuxLossError(f"torchvision:{model} does not take these parameters {sorted(kwargs)}: {exc}") from exc


def _timm_model(model: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    timm = _timm()
    if model.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or kwargs.get("pretrained_cfg_overlay"):
        raise AuxLossError(f"timm:{model}: weights from a hub or a pretrained_cfg are not loaded. " + _NO_DOWNLOAD)
    is_model = getattr(timm, "is_model", None)
    known = is_model(model) if is_model is not None else model.split(".")[0] in timm.list_models()
    if not known:
        raise _unknown("timm", model, list(timm.list_models()))
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(model, pretrained=False, **kwargs)
    except TypeError as exc:
        raise AuxLossError(f"timm:{model} does not take these parameters {sorted(kwargs)}: {exc}") from exc


def load_checkpoint(model: nn.Module, path: str | Path, name: str) -> None:
    """Load a local state dict file (a plain state dict, or a dict holding one under ``state_dict``/``model``)."""
    path = Path(path)
    if not path.is_file():
        raise AuxLossError(f"{name}: checkpoint {str(path)!r} does not exist; give the path of a saved state dict.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of a file that is not a state dict
        raise AuxLossError(f"{name}: cannot read {str(path)!r} as a state dict ({exc}).") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise AuxLossError(
            f"{name}: the checkpoint {str(path)!r} does not fit the model ({str(exc).splitlines()[0]}). If only the "
            "classifier differs, build with the checkpoint's num_classes and replace the classifier afterwards."
        ) from exc


def resolve_model(
    name: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``"torchvision:NAME"`` or ``"timm:NAME"`` with fresh weights (no download, ever).

    Args:
        name: ``"torchvision:resnet18"`` (``torchvision.models.get_model(name, weights=None, ...)``) or
            ``"timm:resnet18"`` (``timm.create_model(name, pretrained=False, ...)``).
        num_classes: the classifier's output size; ``None`` keeps the library's default (1000 for ImageNet models).
        pretrained: must stay ``False``: weights are never downloaded at run time (see ``checkpoint``).
        checkpoint: a local file holding a state dict, loaded after building.
        kwargs: passed to the model's constructor.

    Raises:
        AuxLossError: an unknown source or model (with close names), ``pretrained=True``, or a missing package
            (a :class:`~auxloss.integrations.MissingExtraError` naming ``pip install auxloss[vision]``/``[timm]``).
    """
    key, model = split_name(name)
    if pretrained:
        raise AuxLossError(f"{name}: pretrained=True is not supported. " + _NO_DOWNLOAD)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise AuxLossError(f"{name}: num_classes must be a positive integer or None, got {num_classes!r}.")
    if "pretrained" in kwargs:
        raise AuxLossError(f"{name}: pretrained is not supported. " + _NO_DOWNLOAD)
    kwargs = dict(kwargs)
    net = _torchvision(model, num_classes, kwargs) if key == "torchvision" else _timm_model(model, num_classes, kwargs)
    if not isinstance(net, nn.Module):
        raise AuxLossError(f"{name} built a {type(net).__name__}, not an nn.Module.")
    if checkpoint is not None:
        load_checkpoint(net, checkpoint, name)
    return net


def example_input(name: str, size: int = 224) -> Tensor:
    """One random image batch ``(1, 3, size, size)`` for ``name`` (to list its layers or infer head sizes).

    Drawn from a fixed-seed generator, so it neither depends on nor disturbs the global RNG.
    """
    split_name(name)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise AuxLossError(f"size must be a positive integer (pixels), got {size!r}.")
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
