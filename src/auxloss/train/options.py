"""The training loop's settings, defined once.

:class:`TrainOptions` is the one list of the :class:`~auxloss.train.Trainer`'s settings with their defaults and
allowed values. The Trainer takes one (or its fields as keyword arguments); the experiment config's ``train:``
section (``auxloss.experiment.config.TrainConfig``) is generated from :func:`option_specs`, and ``build_run``
hands the config's options to the Trainer whole. Adding a setting is one new field here.

This module is plain Python and torch: the config side turns the specs into pydantic fields itself, so the core
package never imports pydantic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from typing import Any, Literal

import torch
from torch import nn

from auxloss.errors import AuxLossError, close_matches

__all__ = ["AMP_MODES", "DEVICE_TYPES", "LR_SCHEDULES", "OPTIMIZERS", "OptionSpec", "TrainOptions", "check_device",
           "option_specs"]

#: Optimizers by name (the API also takes a callable ``params -> Optimizer``).
OPTIMIZERS = ("adam", "adamw", "sgd")
#: LR schedules by name (the API also takes a callable ``optimizer -> LRScheduler``).
LR_SCHEDULES = ("cosine", "step")
#: Mixed precision modes (the API also takes ``True``, meaning ``"bf16"``).
AMP_MODES = (False, "bf16", "fp16")
#: The device types auxloss trains on (and ``"auto"``: CUDA when available, else CPU). Others that torch names
#: (``meta``, ``xla``, ``ipu``, ...) need their own training loop: tensors there cannot be read back, or need a
#: backend that this loop does not drive.
DEVICE_TYPES = ("cpu", "cuda", "mps")
#: The largest float32: optimizers multiply float32 tensors by the float settings (lr, weight_decay, ...), and a
#: larger number cannot be converted.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` parsed, if it names a device type auxloss trains on (``None`` for ``"auto"``, and for ``None``,
    which has always meant ``"auto"``); whether that device exists on this machine is
    :func:`auxloss.train.batches.resolve_device`'s check."""
    if device is None or device == "auto":
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise AuxLossError(f"unknown device {device!r} ({str(exc).splitlines()[0]}); use 'auto', 'cpu', 'cuda', "
                           "'cuda:N' or 'mps'.") from None
    if resolved.type not in DEVICE_TYPES:
        raise AuxLossError(f"device {str(device)!r}: auxloss does not train on {resolved.type!r} devices; use 'auto', "
                           "'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return resolved


def _rules(*, ge: float | None = None, gt: float | None = None, choices: tuple[Any, ...] | None = None,
           or_callable: bool = False, config_type: Any = None) -> dict[str, Any]:
    """A field's allowed values, as metadata that both the Trainer's checks and the config read.

    ``ge``/``gt``: bounds of a number. ``choices``: the allowed values (``None`` is allowed too when the default
    is ``None``); ``or_callable``: the API also takes a callable there, which a config file cannot hold.
    ``config_type``: the type a config file gives, when it is narrower than the field's annotation.
    """
    rules = {"ge": ge, "gt": gt, "choices": choices, "or_callable": or_callable, "config_type": config_type}
    return {k: v for k, v in rules.items() if v is not None and v is not False}


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The Trainer's settings. A bad value raises :class:`~auxloss.AuxLossError` naming the setting.

    Args:
        epochs: number of epochs.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` or a callable ``params -> Optimizer``.
        lr: learning rate.
        weight_decay: weight decay of the named optimizers.
        momentum: momentum of ``"sgd"``.
        lr_schedule: ``None``, ``"cosine"`` (to zero over all steps), ``"step"`` (×0.1 at 50% and 75%), or a
            callable ``optimizer -> LRScheduler`` stepped once per optimizer step.
        grad_clip: max global gradient norm, or ``None``.
        accumulate: micro-batches per optimizer step.
        amp: ``False``, ``"bf16"`` or ``"fp16"`` (``True`` means ``"bf16"``). Autocast on CUDA; fp16 uses a
            GradScaler. On CPU, ``"bf16"`` uses CPU autocast and ``"fp16"`` runs in float32 without a scaler (CPU
            autocast has no fp16 path).
        compile: wrap the model in ``torch.compile`` (hooks are registered before, as compile requires).
        patience: early stopping after this many epochs without a better validation main metric; ``None`` = off.
        device: ``"auto"`` (CUDA when available), or any torch device.
        eval_train: also evaluate the training set in eval mode each epoch, for an honest train/val gap (the
            running train-mode metric is biased by dropout and by the weights changing during the epoch).
        log_every: log a step record every N optimizer steps.
        tensorboard: also write TensorBoard event files next to the logs (when the package is installed).
        checkpoint_every: also checkpoint every N optimizer steps inside an epoch (a run with a checkpoint folder
            always checkpoints after every epoch), so a killed run resumes closer to where it stopped.
        check_grads: check the global gradient norm before every optimizer step (always done when ``grad_clip``
            is set, since clipping computes it): a NaN/Inf norm, exploding gradients from a finite loss, raises an
            error naming the step, or with ``Objective(nonfinite="skip")`` skips the update and counts it in
            ``skipped_steps``. Off by default: it costs a device sync per step.
        test_every_epoch: evaluate the test split every epoch, not only once on the weights chosen on validation.
    """

    epochs: int = field(default=10, metadata=_rules(ge=1))
    optimizer: str | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = field(
        default="adam", metadata=_rules(choices=OPTIMIZERS, or_callable=True))
    lr: float = field(default=1e-3, metadata=_rules(gt=0))
    weight_decay: float = field(default=0.0, metadata=_rules(ge=0))
    momentum: float = field(default=0.9, metadata=_rules(ge=0))
    lr_schedule: str | Callable[[torch.optim.Optimizer], Any] | None = field(
        default=None, metadata=_rules(choices=LR_SCHEDULES, or_callable=True))
    grad_clip: float | None = field(default=None, metadata=_rules(gt=0))
    accumulate: int = field(default=1, metadata=_rules(ge=1))
    amp: Literal[False, "bf16", "fp16"] | bool = field(default=False, metadata=_rules(choices=AMP_MODES))
    compile: bool = False
    patience: int | None = field(default=None, metadata=_rules(ge=1))
    device: str | torch.device = field(default="auto", metadata=_rules(config_type=str))
    eval_train: bool = True
    log_every: int = field(default=10, metadata=_rules(ge=1))
    tensorboard: bool = False
    checkpoint_every: int | None = field(default=None, metadata=_rules(ge=1))
    check_grads: bool = False
    test_every_epoch: bool = False

    def __post_init__(self) -> None:
        if self.amp is True:  # the API's shorthand; configs spell the mode
            object.__setattr__(self, "amp", "bf16")
        for spec in option_specs():
            value = getattr(self, spec.name)
            _check(spec, value)
            if spec.kind is float and value is not None:
                object.__setattr__(self, spec.name, float(value))  # an int lr (lr=1) is a float lr
        check_device(self.device)  # a device type auxloss cannot train on stops a config at load

    def items(self) -> Iterable[tuple[str, Any]]:
        """``(name, value)`` of every setting, in declaration order."""
        return ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))

    @classmethod
    def merged(cls, options: TrainOptions | None, settings: Mapping[str, Any]) -> TrainOptions:
        """``options`` (default: every default) with ``settings`` (setting name -> value) replacing its values."""
        if options is not None and not isinstance(options, TrainOptions):
            raise AuxLossError(f"options must be an auxloss.train.TrainOptions, got {type(options).__name__}; "
                               "or pass the settings as keyword arguments, e.g. Trainer(epochs=5, lr=3e-3).")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in settings:
            if key not in names:
                hint = close_matches(key, names, n=1)
                raise AuxLossError(f"unknown training setting {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint
                                   else "") + f"; the settings are {names} (see auxloss.train.TrainOptions).")
        return dataclasses.replace(options if options is not None else cls(), **settings)


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One setting as a config file sees it: its name, default, type and bounds."""

    name: str
    default: Any
    #: the type a config file gives: a ``Literal`` of the choices, or the field's own type.
    config_type: Any
    #: ``int``, ``float``, ``bool`` or ``None`` (anything else).
    kind: type | None
    nullable: bool
    ge: float | None
    gt: float | None
    choices: tuple[Any, ...] | None
    or_callable: bool


@functools.cache
def option_specs() -> tuple[OptionSpec, ...]:
    """Every setting of :class:`TrainOptions`, in declaration order (what the config's ``train:`` accepts)."""
    hints = typing.get_type_hints(TrainOptions)
    specs = []
    for f in dataclasses.fields(TrainOptions):
        hint = hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) is not Literal else ()
        nullable = type(None) in args
        plain = [a for a in args if a is not type(None)] if args else [hint]
        kind = plain[0] if len(plain) == 1 and plain[0] in (int, float, bool) else None
        choices = f.metadata.get("choices")
        config_type = f.metadata.get("config_type", hint)
        if choices is not None:
            config_type = Literal[choices]  # type: ignore[valid-type]
            if f.default is None:
                nullable = True
                config_type = config_type | None
        specs.append(OptionSpec(f.name, f.default, config_type, kind, nullable, f.metadata.get("ge"),
                                f.metadata.get("gt"), choices, bool(f.metadata.get("or_callable"))))
    return tuple(specs)


def _check(spec: OptionSpec, value: Any) -> None:
    if value is None and spec.nullable:
        return
    or_none = " or None" if spec.nullable else ""
    if spec.choices is not None:
        if spec.or_callable and callable(value):
            return
        if not any(value == c and type(value) is type(c) for c in spec.choices):
            options = [repr(c) for c in spec.choices] + (["a callable"] if spec.or_callable else []) + (
                ["None"] if spec.nullable else [])
            raise AuxLossError(f"{spec.name} must be {', '.join(options[:-1])} or {options[-1]}, got {value!r}.")
        return
    if spec.ge is None and spec.gt is None:
        return
    if spec.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "a positive integer" if spec.ge == 1 else f"an integer >= {spec.ge}"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        what = "a positive finite number" if spec.gt == 0 else "a non-negative finite number" if spec.ge == 0 \
            else f"a finite number >= {spec.ge}" if spec.ge is not None else f"a finite number > {spec.gt}"
    if ok and spec.kind is float and abs(value) > FLOAT32_MAX:
        raise AuxLossError(f"{spec.name} must be at most {FLOAT32_MAX:.4g}, the largest float32 (the optimizer "
                           f"multiplies float32 tensors by it), got {value!r}.")
    if ok and spec.ge is not None:
        ok = value >= spec.ge
    if ok and spec.gt is not None:
        ok = value > spec.gt
    if not ok:
        raise AuxLossError(f"{spec.name} must be {what}{or_none}, got {value!r}.")
