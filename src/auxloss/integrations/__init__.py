"""Bridges to optional packages: models by name (torchvision, timm) and PyTorch Lightning.

Nothing here is imported by ``import auxloss``: each submodule imports its package only when it is used, and a
missing package is a :class:`MissingExtraError` naming the ``pip install auxloss[...]`` extra that brings it.

- :mod:`auxloss.integrations.models`: ``resolve_model("torchvision:resnet18", num_classes=10)``.
- :mod:`auxloss.integrations.lightning`: ``AuxLossModule`` and ``AuxLossMixin`` for a Lightning ``Trainer``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from auxloss.errors import AuxLossError

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(AuxLossError, ImportError):
    """An optional package is missing (or cannot be imported). Both an :class:`AuxLossError` (the CLI prints it as
    one line) and an ``ImportError`` (so ``try: ... except ImportError`` guards work)."""


def require(module: str, extra: str, *, note: str = "") -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` saying ``pip install auxloss[extra]``.

    Any failure to import counts, not only a missing package: a torchvision wheel built for another torch fails
    with a ``RuntimeError`` (``operator torchvision::nms does not exist``), and the message carries it.
    """
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken install fails with RuntimeError/OSError as well
        missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == module.split(".")[0]
        what = "is not installed" if missing else f"cannot be imported ({type(exc).__name__}: {exc})"
        raise MissingExtraError(
            f"{module} {what}. Install it with `pip install auxloss[{extra}]`." + (f" {note}" if note else "")
        ) from exc
