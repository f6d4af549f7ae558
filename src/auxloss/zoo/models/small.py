"""Small trunks for fast CPU demos and tests: :class:`SmallCNN` (a few hundred thousand parameters) and
:class:`DeepMLP` (deep and plainly initialised, so its early layers starve for gradient: the textbook setting
where deep supervision visibly helps)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from auxloss._checks import fraction_below_one, int_at_least
from auxloss.errors import AuxLossError

__all__ = ["DeepMLP", "SmallCNN"]

Activation = Literal["tanh", "relu", "sigmoid"]


class SmallCNN(nn.Module):
    """A three-block CNN that trains in seconds on a CPU, for demos, tutorials and tests.

    Each block is conv3x3-BN-ReLU, a 2x2 max pool, then conv3x3-BN-ReLU, doubling the channels
    (``width``, ``2*width``, ``4*width``) while halving the resolution (32 -> 16 -> 8 -> 4; 28 -> 14 ->
    7 -> 3). Pooling *between* the two convs rather than after them runs the second conv at a quarter
    of the pixels: with ``width=16`` and a batch of 64 that makes forward+backward about 18 ms instead
    of 32 ms on two CPU cores, at no visible cost on CIFAR-sized data.

    The blocks are the natural tap points: ``block1`` (early, high resolution), ``block2``, ``block3``.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width: int = 32, dropout: float = 0.0
    ) -> None:
        super().__init__()
        int_at_least("num_classes", num_classes)
        int_at_least("in_channels", in_channels)
        int_at_least("width", width)
        dropout = fraction_below_one("dropout", dropout)
        self.block1 = self._block(in_channels, width)
        self.block2 = self._block(width, 2 * width)
        self.block3 = self._block(2 * width, 4 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width, num_classes)

    @staticmethod
    def _block(in_channels: int, out_channels: int) -> nn.Sequential:
        return nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                bn1=nn.BatchNorm2d(out_channels),
                relu1=nn.ReLU(inplace=True),
                pool=nn.MaxPool2d(2),
                conv2=nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                bn2=nn.BatchNorm2d(out_channels),
                relu2=nn.ReLU(inplace=True),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
}


class DeepMLP(nn.Module):
    """A deep, narrow MLP in which the first layers get almost no gradient.

    Every hidden layer's weights are drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) -- a plain init
    whose variance, 1/(3*fan_in), is three times too small for tanh. Each tanh (or, worse, sigmoid,
    whose slope is at most 1/4) layer therefore shrinks the backpropagated signal, and by ``layers.0``
    of a ten-layer net it has decayed by orders of magnitude. That is the vanishing-gradient regime that
    motivated deep supervision: a head on ``layers.2`` hands those early layers a short, strong
    gradient path. The init is written out rather than left to PyTorch's default so the effect does
    not silently change with the PyTorch version.

    ``layers`` is an ``nn.Sequential`` with one child per hidden layer (``linear``, optional ``norm``,
    ``act``), so ``layers.3`` is a tap point whose output is that layer's activation. Inputs with more
    than two dimensions (images) are flattened. ``batch_norm=True`` is the fix-the-trunk alternative
    to deep supervision, useful as a comparison.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 64,
        depth: int = 10,
        activation: Activation = "tanh",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = int_at_least("in_features", in_features)
        int_at_least("num_classes", num_classes)
        int_at_least("hidden", hidden)
        int_at_least("depth", depth)
        if activation not in _ACTIVATIONS:
            raise AuxLossError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}.")
        layers: list[nn.Module] = []
        width_in = in_features
        for _ in range(depth):
            parts: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(width_in, hidden))
            if batch_norm:
                parts["norm"] = nn.BatchNorm1d(hidden)
            parts["act"] = _ACTIVATIONS[activation]()
            layers.append(nn.Sequential(parts))
            width_in = hidden
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(hidden, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw all Linear weights and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.uniform_(m.bias, -bound, bound)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            x = torch.flatten(x, 1)
        if x.shape[-1] != self.in_features:
            # Caught here so the user sees their own mistake, not a matmul shape error from torch.
            raise AuxLossError(
                f"DeepMLP expected {self.in_features} input features, got input of shape "
                f"{tuple(x.shape)} ({x.shape[-1]} features after flattening); "
                f"set in_features={x.shape[-1]} or reshape the data."
            )
        return self.fc(self.layers(x))
