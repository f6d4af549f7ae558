"""Bridges to optional packages: models by name (torchvision, timm) and PyTorch Lightning.

Nothing here is imported by ``import auxloss``: each submodule imports its package only when it is used, and a
missing package is a :class:`MissingExtraError` naming the ``pip install auxloss[...]`` extra that brings it.

- :mod:`auxloss.integrations.models`: ``resolve_model("torchvision:resnet18", num_classes=10)``.
- :mod:`auxloss.integrations.lightning`: ``AuxLossModule`` and ``AuxLossMixin`` for a Lightning ``Trainer``.
"""

from __future__ import annotations

# Defined with the other optional-package helpers, which the experiment package uses too.
from auxloss._extras import MissingExtraError, require

__all__ = ["MissingExtraError", "require"]
