"""Ready-made recipes built on :func:`auxloss.attach`: deep supervision, and GoogLeNet's own.

The aux heads are never hard-coded into a network: each recipe builds a plain trunk, attaches heads to named
layers, and returns the wrapped model with the objective that weights them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from auxloss.errors import AuxLossError
from auxloss.heads import InceptionAuxHead
from auxloss.objective import Objective
from auxloss.schedules import Schedule
from auxloss.taps import AuxModel, Tap, attach
from auxloss.tasks import Task

__all__ = ["deep_supervision", "googlenet", "GOOGLENET_AUX_LAYERS"]

#: Where Szegedy et al. 2015 (§5) put the two auxiliary classifiers: on the outputs of inception 4a and 4d.
GOOGLENET_AUX_LAYERS = {"aux1": "inception4a", "aux2": "inception4d"}


def deep_supervision(
    model: nn.Module,
    layers: Mapping[str, str],
    num_classes: int,
    *,
    weight: float | Schedule = 0.3,
    head: Callable[[int], nn.Module] = InceptionAuxHead,
    example_input: Any = None,
    **objective_kwargs: Any,
) -> tuple[AuxModel, Objective]:
    """Classifier heads on intermediate layers, each trained on the main label at ``weight``.

    Args:
        model: the trunk.
        layers: ``{task name: layer name}``.
        num_classes: classes of the main task (each head predicts the same classes).
        weight: λ of every head, a float or a schedule (for example a curriculum that switches them off late).
        head: builds a head from ``num_classes``; GoogLeNet's ``InceptionAuxHead`` by default.
        example_input: a sample input, to build the heads' lazy layers right away.
        objective_kwargs: passed to :class:`~auxloss.objective.Objective` (``batch_keys``, ``nonfinite``, ...).

    Returns:
        ``(aux_model, objective)``.
    """
    if not layers:
        raise AuxLossError("deep_supervision needs at least one layer: {'aux1': 'layer_name'}.")
    taps = {name: Tap(layer, head(num_classes)) for name, layer in layers.items()}
    aux_model = attach(model, taps, example_input=example_input)
    objective = Objective(aux=[Task(name, source=name, weight=weight) for name in layers], **objective_kwargs)
    return aux_model, objective


def googlenet(
    num_classes: int = 1000,
    *,
    weight: float | Schedule = 0.3,
    small_input: bool = False,
    example_input: Any = None,
    **model_kwargs: Any,
) -> tuple[AuxModel, Objective]:
    """GoogLeNet (Inception v1) with its two auxiliary classifiers after inception4a and inception4d at 0.3.

    ``small_input=True`` builds the 32×32 variant. ``aux_model.strip()`` gives the deployable network without
    the heads, as the paper discards them at inference.
    """
    from auxloss.zoo.models import GoogLeNet, GoogLeNet32

    trunk = GoogLeNet32(num_classes, **model_kwargs) if small_input else GoogLeNet(num_classes, **model_kwargs)
    if example_input is None:
        size = 32 if small_input else 224
        example_input = torch.zeros(1, 3, size, size)
    return deep_supervision(trunk, GOOGLENET_AUX_LAYERS, num_classes, weight=weight, example_input=example_input)
