"""Auxiliary heads. Their input sizes are inferred on the first forward (lazy layers), so a user never has to
work out that ``layer3`` has 256 channels: pass ``example_input`` to :func:`auxloss.attach` and they are built.

*Every* parameterised layer of these heads is lazy, not only the first: building a head draws nothing from the
global random stream, and its weights are drawn when it is materialised (at ``attach(..., example_input=...)`` or
the first forward). A head built before ``torch.manual_seed(run_seed)`` therefore starts from the same weights in
every run with that seed.

Any ``nn.Module`` can serve as a head; these cover the usual shapes of auxiliary tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auxloss._checks import positive_int, probability
from auxloss.errors import AuxLossError

__all__ = ["DenseHead", "InceptionAuxHead", "LinearHead", "MLPHead", "SequenceHead", "pool_features"]

Pool = Literal["avg", "max", "flatten", "cls", "mean_tokens"]


def pool_features(x: Tensor, pool: Pool = "avg") -> Tensor:
    """Reduce a feature tensor to ``(N, C)``.

    - ``(N, C)`` passes through;
    - ``(N, C, *spatial)`` (conv features) is averaged (``avg``), maxed (``max``) or flattened (``flatten``)
      over the spatial dimensions;
    - ``(N, L, D)`` token sequences (transformer blocks, ``batch_first`` RNN outputs) use ``cls`` (first token)
      or ``mean_tokens`` (mean over tokens). ``avg`` on 3-d input means "over the last dimension's positions",
      i.e. it treats the input as ``(N, C, L)`` like a Conv1d output.
    """
    if not isinstance(x, Tensor):
        raise AuxLossError(
            f"a head got a {type(x).__name__}, not a tensor; give the tap a `select` that picks the tensor "
            "(for example select=0 for the output of an nn.LSTM)."
        )
    if x.dim() < 2:
        raise AuxLossError(f"a head needs a batched input of at least 2 dims (N, C), got shape {tuple(x.shape)}.")
    if x.dim() == 2:
        return x
    if pool == "cls":
        return x[:, 0]
    if pool == "mean_tokens":
        return x.mean(dim=1)
    if pool == "avg":
        return x.flatten(2).mean(dim=2)
    if pool == "max":
        return x.flatten(2).amax(dim=2)
    if pool == "flatten":
        return x.flatten(1)
    raise AuxLossError(f"unknown pool {pool!r}; use one of 'avg', 'max', 'flatten', 'cls', 'mean_tokens'.")


class InceptionAuxHead(nn.Module):
    """GoogLeNet's auxiliary classifier (Szegedy et al. 2015, §5), with its input channels inferred.

    adaptive avg-pool to 4×4 → 1×1 conv to 128 channels → ReLU → fc to 1024 → ReLU → dropout 0.7 → fc to the
    classes. The paper pools 5×5/3 from a 14×14 map, which is 4×4; the adaptive pool gives 4×4 from any map.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        pool_size: int = 4,
        conv_channels: int = 128,
        hidden: int = 1024,
        dropout: float = 0.7,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("pool_size", pool_size),
                            ("conv_channels", conv_channels), ("hidden", hidden)):
            positive_int(name, value)
        probability("dropout", dropout)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.conv = nn.LazyConv2d(conv_channels, kernel_size=1)
        self.fc1 = nn.LazyLinear(hidden)  # in: conv_channels * pool_size², inferred like the rest (see above)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.LazyLinear(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise AuxLossError(
                f"InceptionAuxHead needs a conv feature map (N, C, H, W), got {shape}; tap a conv block, or use "
                "LinearHead/MLPHead for other features."
            )
        x = F.relu(self.conv(self.pool(x)))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(self.dropout(x))


class LinearHead(nn.Module):
    """A linear layer over pooled features (see :func:`pool_features`)."""

    def __init__(self, out_features: int, *, pool: Pool = "avg", dropout: float = 0.0) -> None:
        super().__init__()
        positive_int("out_features", out_features)
        probability("dropout", dropout)
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.LazyLinear(out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(pool_features(x, self.pool)))


class MLPHead(nn.Module):
    """An MLP over pooled features: ``hidden`` sizes with ReLU and dropout, then a linear output layer."""

    def __init__(
        self,
        out_features: int,
        *,
        hidden: Sequence[int] = (256,),
        pool: Pool = "avg",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        positive_int("out_features", out_features)
        for h in hidden:
            positive_int("hidden size", h)
        probability("dropout", dropout)
        self.pool = pool
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.LazyLinear(h), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.LazyLinear(out_features))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(pool_features(x, self.pool))


class DenseHead(nn.Module):
    """A per-position head for segmentation-style targets: ``(N, C, H, W)`` → ``(N, out_channels, H', W')``.

    An optional 3×3 conv of ``hidden`` channels, then a 1×1 conv. ``size`` upsamples the prediction
    (bilinearly) to the target's resolution, since intermediate maps are usually smaller than the labels.
    """

    def __init__(
        self,
        out_channels: int,
        *,
        hidden: int | None = 64,
        size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        positive_int("out_channels", out_channels)
        layers: list[nn.Module] = []
        if hidden:
            positive_int("hidden", hidden)
            layers += [nn.LazyConv2d(hidden, 3, padding=1), nn.ReLU()]
            layers.append(nn.LazyConv2d(out_channels, 1))
        else:
            layers.append(nn.LazyConv2d(out_channels, 1))
        self.net = nn.Sequential(*layers)
        self.size = (size, size) if isinstance(size, int) else size

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise AuxLossError(f"DenseHead needs a feature map (N, C, H, W), got {shape}.")
        y = self.net(x)
        if self.size is not None and tuple(y.shape[-2:]) != tuple(self.size):
            y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)
        return y


class SequenceHead(nn.Module):
    """A head over a sequence ``(N, T, D)`` (``batch_first``) or ``(T, N, D)``.

    ``mode="all"`` predicts at every time step, giving ``(N, T, out)``; ``mode="last"`` reads the last step,
    giving ``(N, out)``; ``mode="mean"`` the mean over steps. Tapping an ``nn.LSTM`` needs ``select=0`` (its
    output tensor) on the tap.
    """

    def __init__(
        self,
        out_features: int,
        *,
        mode: Literal["all", "last", "mean"] = "last",
        batch_first: bool = True,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        positive_int("out_features", out_features)
        if mode not in ("all", "last", "mean"):
            raise AuxLossError(f"SequenceHead mode must be 'all', 'last' or 'mean', got {mode!r}.")
        self.mode = mode
        self.batch_first = batch_first
        if hidden:
            positive_int("hidden", hidden)
            self.net: nn.Module = nn.Sequential(nn.LazyLinear(hidden), nn.ReLU(), nn.LazyLinear(out_features))
        else:
            self.net = nn.LazyLinear(out_features)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise AuxLossError(
                f"SequenceHead needs a sequence (N, T, D), got {shape}; for an nn.LSTM/GRU tap use select=0."
            )
        if not self.batch_first:
            x = x.transpose(0, 1)
        if self.mode == "last":
            x = x[:, -1]
        elif self.mode == "mean":
            x = x.mean(dim=1)
        return self.net(x)
