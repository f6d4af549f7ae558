"""Ready-made recipes built on :func:`auxloss.attach`: deep supervision, and GoogLeNet's own.

The aux heads are never hard-coded into a network: each recipe builds a plain trunk, attaches heads to named
layers, and returns the wrapped model with the objective that weights them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from auxloss.errors import AuxLossError
from auxloss.heads import InceptionAuxHead, LinearHead
from auxloss.objective import Objective
from auxloss.schedules import Schedule
from auxloss.taps import AuxModel, Selector, Tap, attach
from auxloss.tasks import Task

__all__ = ["GOOGLENET_AUX_LAYERS", "deep_supervision", "googlenet"]

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


def transformer_deep_supervision(
    model: nn.Module,
    block_names: Sequence[str] | Mapping[str, str],
    num_classes: int,
    *,
    token: str = "cls",
    weight: float | Schedule | Sequence[float | Schedule] = 0.3,
    select: Selector = None,
    head: Callable[[int], nn.Module] | None = None,
    example_input: Any = None,
    **objective_kwargs: Any,
) -> tuple[AuxModel, Objective]:
    """Deep supervision for a transformer: a classifier on the token sequence of each named block.

    Each block outputs tokens ``(N, L, D)``; its head reads the class token (``token="cls"``, the first token:
    ``LinearHead(C, pool="cls")``) or the mean of all tokens (``token="mean"``, ``pool="mean_tokens"``), and is
    trained on the main label.

    Args:
        model: the trunk, e.g. :class:`~auxloss.zoo.models.TinyTransformer` (blocks ``blocks.0``, ``blocks.1``, ...),
            a timm ViT (``blocks.i``) or a Hugging Face encoder (``encoder.layer.i``).
        block_names: the blocks to supervise: layer names (task ``i`` is then named after its layer, dots as
            underscores: ``blocks.1`` -> ``blocks_1``), or ``{task name: layer name}``.
        num_classes: classes of the main task.
        token: ``"cls"`` or ``"mean"``.
        weight: λ of every head (a float or a schedule), or one per block in order (for example
            :class:`~auxloss.schedules.ProgressiveDrop` schedules, which drop the lower blocks' losses first).
        select: picks the token tensor out of a block's output when it is a tuple (Hugging Face layers return
            ``(hidden_states, ...)``: ``select=0``).
        head: builds a head from ``num_classes`` instead of the linear one.
        example_input: a sample input, to build the heads' lazy layers right away.
        objective_kwargs: passed to :class:`~auxloss.objective.Objective`.

    Returns:
        ``(aux_model, objective)``.
    """
    if token not in ("cls", "mean"):
        raise AuxLossError(f"token must be 'cls' (the class token) or 'mean' (the mean of all tokens), got {token!r}.")
    if isinstance(block_names, str):
        block_names = [block_names]
    if isinstance(block_names, Mapping):
        layers = dict(block_names)
    else:
        layers = {name.replace(".", "_"): name for name in block_names}
        if len(layers) != len(block_names):
            raise AuxLossError(f"block_names has duplicates: {list(block_names)}.")
    if not layers:
        raise AuxLossError("transformer_deep_supervision needs at least one block: ['blocks.0', ...].")
    if isinstance(weight, (Schedule, int, float)):
        weights = [weight] * len(layers)
    else:
        weights = list(weight)
        if len(weights) != len(layers):
            raise AuxLossError(
                f"weight has {len(weights)} entries for {len(layers)} blocks; give one weight per block, or one for all."
            )
    pool = "cls" if token == "cls" else "mean_tokens"
    make = head if head is not None else (lambda c: LinearHead(c, pool=pool))
    taps = {name: Tap(layer, make(num_classes), select=select) for name, layer in layers.items()}
    aux_model = attach(model, taps, example_input=example_input)
    tasks = [Task(name, source=name, weight=w) for name, w in zip(layers, weights)]
    return aux_model, Objective(aux=tasks, **objective_kwargs)


__all__ += ["transformer_deep_supervision"]
