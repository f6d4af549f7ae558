"""The built-in models by name, for configs and the CLI: :data:`MODELS`, :func:`build_model` and
:func:`example_input`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from auxloss._checks import int_at_least
from auxloss.errors import AuxLossError, close_matches
from auxloss.zoo.models.inception import GoogLeNet, GoogLeNet32
from auxloss.zoo.models.sequence import LSTMClassifier, TinyTransformer
from auxloss.zoo.models.small import DeepMLP, SmallCNN

__all__ = ["MODELS", "build_model", "example_input"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "googlenet": GoogLeNet,
    "googlenet32": GoogLeNet32,
    "small_cnn": SmallCNN,
    "deep_mlp": DeepMLP,
    "lstm_classifier": LSTMClassifier,
    "tiny_transformer": TinyTransformer,
}


def _resolve(name: str) -> str:
    """Canonical registry key for ``name``; forgiving about case and ``-`` vs ``_`` (``Small-CNN``)."""
    if not isinstance(name, str):
        raise AuxLossError(f"model name must be a string, got {name!r}; available: {', '.join(MODELS)}.")
    key = name.strip().lower().replace("-", "_")
    if key in MODELS:
        return key
    hint = close_matches(key, MODELS)
    did_you_mean = f" Did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
    raise AuxLossError(f"Unknown model {name!r}.{did_you_mean} Available models: {', '.join(MODELS)}.")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name, e.g. ``build_model("small_cnn", num_classes=100)``.

    Keyword arguments are checked against the constructor first, so a typo in a config file gives an
    :class:`~auxloss.errors.AuxLossError` naming the accepted arguments instead of a bare TypeError.
    """
    key = _resolve(name)
    factory = MODELS[key]
    signature = inspect.signature(factory)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        accepted = ", ".join(p for p in signature.parameters if p != "self")
        raise AuxLossError(
            f"Bad arguments for model {key!r}: {exc}. Accepted arguments: {accepted}."
        ) from None
    return factory(**kwargs)


def example_input(name: str, **kwargs: Any) -> Tensor:
    """A single random input of the shape the built-in model ``name`` expects.

    Takes the same keyword arguments as :func:`build_model`, so the input matches the model those
    arguments build (``in_channels`` for the CNNs, ``in_features`` for ``deep_mlp``). It is used to run
    one forward pass when listing a model's layers and their output shapes.
    """
    key = _resolve(name)
    if key == "googlenet":
        return torch.randn(1, 3, 224, 224)
    if key in ("googlenet32", "small_cnn"):
        in_channels = int_at_least("in_channels", kwargs.get("in_channels", 3))
        return torch.randn(1, in_channels, 32, 32)
    if key == "deep_mlp":
        if "in_features" not in kwargs:
            raise AuxLossError("example_input('deep_mlp') needs in_features=..., the model's input size.")
        return torch.randn(1, int_at_least("in_features", kwargs["in_features"]))
    if key == "lstm_classifier":
        # (N, T, D): a sequence of `input_size` features per step; 64 steps, as in the digits-sequence demo.
        return torch.randn(1, 64, int_at_least("input_size", kwargs.get("input_size", 1)))
    if key == "tiny_transformer":
        if kwargs.get("vocab_size"):
            return torch.randint(0, int(kwargs["vocab_size"]), (1, int(kwargs.get("max_len", 128)) // 2))
        size = int_at_least("image_size", kwargs.get("image_size", 28))
        return torch.randn(1, int_at_least("in_channels", kwargs.get("in_channels", 1)), size, size)
    # A model registered into MODELS by a user has no known input shape.
    raise AuxLossError(
        f"No example input is known for model {key!r}; pass an input tensor of the right shape yourself."
    )

