"""Ready-made recipes built on :func:`auxloss.attach`: deep supervision, and GoogLeNet's own.

The aux heads are never hard-coded into a network: each recipe builds a plain trunk, attaches heads to named
layers, and returns the wrapped model with the objective that weights them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from auxloss.errors import AuxLossError
from auxloss.heads import InceptionAuxHead, LinearHead
from auxloss.objective import Objective
from auxloss.schedules import Curriculum, Schedule
from auxloss.taps import AuxModel, Selector, Tap, attach
from auxloss.tasks import Task

__all__ = ["DEEP_SUPERVISION_PRESETS", "GOOGLENET_AUX_LAYERS", "deep_supervision", "deep_supervision_weights",
           "drop_late", "googlenet"]

#: Where Szegedy et al. 2015 (§5) put the two auxiliary classifiers: on the outputs of inception 4a and 4d.
GOOGLENET_AUX_LAYERS = {"aux1": "inception4a", "aux2": "inception4d"}


#: The auxiliary weights of published deep-supervision recipes (λ of each head, the main loss at 1).
#:
#: - ``googlenet``: 0.3 per head. Szegedy et al. 2015, "Going Deeper with Convolutions", §5: "during training,
#:   their loss gets added to the total loss of the network with a discount weight (the losses of the auxiliary
#:   classifiers were weighted by 0.3)".
#: - ``mmseg``: 0.4. MMSegmentation's model configs give the ``auxiliary_head`` (an ``FCNHead`` on the
#:   backbone's third stage) ``loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4)`` against 1.0 for the
#:   ``decode_head`` (``configs/_base_/models/pspnet_r50-d8.py`` and the other PSPNet/DeepLab/UPerNet bases).
#: - ``torchvision``: 0.5. torchvision's segmentation reference (``references/segmentation/train.py``,
#:   ``criterion``) returns ``losses["out"] + 0.5 * losses["aux"]`` when the model has an ``aux_classifier``.
#: - ``nnunet``: ``1/2^i`` for the ``i``-th head counted from the main output (0.5, 0.25, 0.125, ...).
#:   nnU-Net v2 (``nnUNetTrainer._build_loss``) weighs its outputs ``w_i = 2^-i`` (``i = 0`` the
#:   full-resolution output), sets the coarsest one to 0 and divides by the sum. Here the main loss keeps weight
#:   1, so each head gets ``w_i / w_0 = 2^-i``: every head's weight *relative to the main loss* is nnU-Net's, and
#:   nnU-Net's normalisation is one constant factor on the whole loss (``1 / Σ w``), which Adam ignores and SGD
#:   folds into the learning rate. nnU-Net attaches a head to every decoder stage and zeroes the coarsest; here
#:   you list only the heads you train.
DEEP_SUPERVISION_PRESETS: dict[str, str] = {
    "googlenet": "0.3 per head (Szegedy et al. 2015)",
    "mmseg": "0.4 per head (MMSegmentation auxiliary_head loss_weight)",
    "torchvision": "0.5 per head (torchvision references/segmentation)",
    "nnunet": "1/2^i for the i-th head from the output (nnU-Net v2, normalised to the main output)",
}
_PRESET_VALUES = {"googlenet": 0.3, "mmseg": 0.4, "torchvision": 0.5}

Weights = str | float | Schedule | Sequence[float | Schedule]


def deep_supervision_weights(weights: Weights, n_heads: int) -> list[float | Schedule]:
    """The λ of each of ``n_heads`` heads for a preset name, one value or schedule for all, or one per head.

    >>> deep_supervision_weights("nnunet", 3)
    [0.5, 0.25, 0.125]
    >>> deep_supervision_weights("mmseg", 2)
    [0.4, 0.4]
    """
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise AuxLossError(f"deep supervision needs at least one head, got n_heads={n_heads!r}.")
    if isinstance(weights, str):
        key = weights.lower()
        if key == "nnunet":
            return [2.0 ** -i for i in range(1, n_heads + 1)]
        if key not in _PRESET_VALUES:
            raise AuxLossError(f"unknown deep-supervision preset {weights!r}; the presets are "
                               f"{sorted(DEEP_SUPERVISION_PRESETS)}, or give a number, a schedule or one per head.")
        return [_PRESET_VALUES[key]] * n_heads
    if isinstance(weights, (Schedule, int, float)) and not isinstance(weights, bool):
        return [weights] * n_heads
    if isinstance(weights, Sequence):
        out = list(weights)
        if len(out) != n_heads:
            raise AuxLossError(f"weights has {len(out)} entries for {n_heads} heads; give one weight per head (in "
                               "the order of layers), one for all, or a preset name.")
        return out
    raise AuxLossError(f"weights must be a preset name {sorted(DEEP_SUPERVISION_PRESETS)}, a number, a schedule or "
                       f"a list of them, got {type(weights).__name__}.")


def drop_late(weight: float | Schedule, drop_at: float, total: float, *, ramp: float = 0,
              unit: Literal["step", "epoch"] = "step") -> Schedule:
    """``weight`` until ``drop_at · total``, then 0 (linearly over ``ramp`` if given): heads that leave late.

    Built from :class:`~auxloss.schedules.Curriculum` (a task that leaves at ``stop``); a schedule ``weight`` is
    multiplied by it, so a warmup or a decay keeps its shape until the drop.
    """
    if isinstance(drop_at, bool) or not isinstance(drop_at, (int, float)) or not 0.0 < float(drop_at) <= 1.0:
        raise AuxLossError(f"drop_at must be a fraction of training in (0, 1] (e.g. 0.8 drops the heads for the last "
                           f"20%), got {drop_at!r}.")
    if isinstance(total, bool) or not isinstance(total, (int, float)) or not total > 0:
        raise AuxLossError(f"total must be the length of training in {unit}s (> 0) to place drop_at, got {total!r}.")
    stop = float(drop_at) * total
    if isinstance(weight, Schedule):
        return weight * Curriculum(1.0, stop=stop, ramp_out=ramp, unit=unit)
    return Curriculum(float(weight), stop=stop, ramp_out=ramp, unit=unit)


def deep_supervision(
    model: nn.Module,
    layers: Mapping[str, str],
    num_classes: int,
    *,
    weights: Weights | None = None,
    enabled: bool = True,
    drop_at: float | None = None,
    total: float | None = None,
    unit: Literal["step", "epoch"] = "step",
    weight: float | Schedule | None = None,
    head: Callable[[int], nn.Module] = InceptionAuxHead,
    example_input: Any = None,
    **objective_kwargs: Any,
) -> tuple[AuxModel, Objective]:
    """Classifier heads on intermediate layers, each trained on the main label.

    Args:
        model: the trunk.
        layers: ``{task name: layer name}``, for ``"nnunet"`` in order from the main output downwards (the first
            head gets 1/2, the next 1/4, ...).
        num_classes: classes of the main task (each head predicts the same classes).
        weights: a preset of :data:`DEEP_SUPERVISION_PRESETS` (``"googlenet"`` 0.3, the default; ``"mmseg"`` 0.4;
            ``"torchvision"`` 0.5; ``"nnunet"`` 1/2^i), a float or schedule for every head, or one per head.
        enabled: ``False`` turns deep supervision off with one switch: no head is attached and the objective has
            no auxiliary task, so the run is the plain model at the plain cost (the paired baseline).
        drop_at: drop the heads late in training: their weights go to 0 from ``drop_at · total`` on (see
            :func:`drop_late`); ``None`` keeps them to the end.
        total: the length of training (counted in ``unit``), needed with ``drop_at``.
        unit: what ``total`` counts, ``"step"`` or ``"epoch"``.
        weight: the former name of ``weights`` (one value or schedule for all heads); give one or the other.
        head: builds a head from ``num_classes``; GoogLeNet's ``InceptionAuxHead`` by default.
        example_input: a sample input, to build the heads' lazy layers right away.
        objective_kwargs: passed to :class:`~auxloss.objective.Objective` (``batch_keys``, ``nonfinite``, ...).

    Returns:
        ``(aux_model, objective)``.
    """
    if not layers:
        raise AuxLossError("deep_supervision needs at least one layer: {'aux1': 'layer_name'}.")
    if weight is not None and weights is not None:
        raise AuxLossError("give weights= (a preset, a value or one per head) or its old name weight=, not both.")
    if not isinstance(enabled, bool):
        raise AuxLossError(f"enabled must be True or False, got {enabled!r}.")
    if drop_at is not None and total is None:
        raise AuxLossError("drop_at needs total=, the length of training (in steps, or epochs with unit='epoch').")
    lams = deep_supervision_weights(weights if weights is not None else (weight if weight is not None else
                                                                          "googlenet"), len(layers))
    if drop_at is not None:
        lams = [drop_late(lam, drop_at, total, unit=unit) for lam in lams]  # type: ignore[arg-type]
    if not enabled:
        # Off: the user's model behind the same wrapper (so training code is unchanged) with no tap at all.
        return attach(model, {}), Objective(**objective_kwargs)
    taps = {name: Tap(layer, head(num_classes)) for name, layer in layers.items()}
    aux_model = attach(model, taps, example_input=example_input)
    objective = Objective(aux=[Task(name, source=name, weight=lam) for name, lam in zip(layers, lams)],
                          **objective_kwargs)
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
