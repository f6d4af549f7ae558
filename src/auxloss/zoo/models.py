"""Plain trunk models to attach auxiliary heads to.

None of these models has an auxiliary head built in. auxloss attaches heads later through forward hooks
on *named* submodules, so the one design rule here is that every layer a head could sensibly hang off
is its own submodule with a stable, readable qualified name (``inception4a``, ``block2``, ``layers.3``).
Renaming a submodule breaks every config that taps it, so treat these names as public API.

The models:

* :class:`GoogLeNet` -- Inception v1 (Szegedy et al. 2015, "Going deeper with convolutions"), the net
  that popularised auxiliary classifiers; its heads sat on ``inception4a`` and ``inception4d``.
* :class:`GoogLeNet32` -- the same trunk adapted to 32x32 inputs, so GoogLeNet-style experiments fit
  CIFAR-sized data on modest hardware.
* :class:`SmallCNN` -- a few-hundred-thousand-parameter CNN for fast CPU demos and tests.
* :class:`DeepMLP` -- a deliberately deep, plainly initialised MLP whose early layers starve for
  gradient: the textbook setting where deep supervision visibly helps.

``build_model`` / ``example_input`` give name-based access for configs and the CLI.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from auxloss._checks import finite_above_zero, fraction_below_one, int_at_least
from auxloss.errors import AuxLossError, close_matches

__all__ = [
    "MODELS",
    "ConvBlock",
    "DeepMLP",
    "GoogLeNet",
    "GoogLeNet32",
    "Inception",
    "SmallCNN",
    "build_model",
    "count_parameters",
    "example_input",
]

Activation = Literal["tanh", "relu", "sigmoid"]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (buffers such as BatchNorm running stats excluded).

    Parameters shared between submodules are counted once, because ``Module.parameters()`` already
    de-duplicates them; that is the number that matters for model size.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _scaled(channels: int, width: float) -> int:
    # At least one channel: a zero-width branch would make concatenation and BatchNorm fail obscurely.
    return max(1, round(channels * width))


# --------------------------------------------------------------------------------------------------
# Inception v1
# --------------------------------------------------------------------------------------------------


class ConvBlock(nn.Module):
    """Convolution, optional BatchNorm, ReLU.

    The paper puts a ReLU after *every* convolution, including the 1x1 reductions inside Inception
    blocks, so this is the unit everything else is built from. With ``batch_norm`` the conv drops its
    bias, since BatchNorm's shift makes it redundant (the BN-Inception recipe).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=not batch_norm
        )
        # Identity instead of a missing attribute keeps the qualified names identical in both variants,
        # so a head config written for one works unchanged for the other.
        self.bn: nn.Module = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """One Inception v1 block: four parallel branches concatenated along channels.

    Arguments follow the columns of Table 1 in the paper: ``#1x1``, ``#3x3 reduce``, ``#3x3``,
    ``#5x5 reduce``, ``#5x5``, ``pool proj``. The 1x1 reductions are what make the block affordable:
    they shrink the channel count before the expensive 3x3 and 5x5 convolutions.

    The 5x5 branch uses a real 5x5 convolution as in the paper (some reimplementations swap in a 3x3,
    which changes the parameter count). Every branch preserves the spatial size, so the output is
    ``ch1x1 + ch3x3 + ch5x5 + pool_proj`` channels at the input's resolution.
    """

    def __init__(
        self,
        in_ch: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value in {
            "in_ch": in_ch,
            "ch1x1": ch1x1,
            "ch3x3red": ch3x3red,
            "ch3x3": ch3x3,
            "ch5x5red": ch5x5red,
            "ch5x5": ch5x5,
            "pool_proj": pool_proj,
        }.items():
            int_at_least(name, value)
        self.in_channels = in_ch
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj
        self.branch1x1 = ConvBlock(in_ch, ch1x1, 1, batch_norm=batch_norm)
        self.branch3x3 = nn.Sequential(
            OrderedDict(
                reduce=ConvBlock(in_ch, ch3x3red, 1, batch_norm=batch_norm),
                conv=ConvBlock(ch3x3red, ch3x3, 3, padding=1, batch_norm=batch_norm),
            )
        )
        self.branch5x5 = nn.Sequential(
            OrderedDict(
                reduce=ConvBlock(in_ch, ch5x5red, 1, batch_norm=batch_norm),
                conv=ConvBlock(ch5x5red, ch5x5, 5, padding=2, batch_norm=batch_norm),
            )
        )
        self.branch_pool = nn.Sequential(
            OrderedDict(
                # Stride 1 with padding keeps the resolution so the branch can be concatenated.
                pool=nn.MaxPool2d(3, stride=1, padding=1),
                proj=ConvBlock(in_ch, pool_proj, 1, batch_norm=batch_norm),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [self.branch1x1(x), self.branch3x3(x), self.branch5x5(x), self.branch_pool(x)], dim=1
        )


# Table 1 of the paper, in order: (name, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
_INCEPTION_TABLE: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)


def _build_inceptions(in_ch: int, width: float, batch_norm: bool) -> OrderedDict[str, Inception]:
    """The nine Inception blocks of Table 1, channel counts scaled by ``width``, chained by channels."""
    blocks: OrderedDict[str, Inception] = OrderedDict()
    for name, *channels in _INCEPTION_TABLE:
        block = Inception(in_ch, *(_scaled(c, width) for c in channels), batch_norm=batch_norm)
        blocks[name] = block
        in_ch = block.out_channels
    return blocks


def _init_inception_weights(model: nn.Module) -> None:
    """He-normal convs and a small-normal classifier.

    PyTorch's default conv init shrinks the activation variance a little at every layer; over the 22
    layers of the BN-free GoogLeNet that compounds into a trunk that barely trains. He init keeps the
    variance roughly constant through ReLUs (concatenating branches does not change it), so the plain
    variant trains and any gain from auxiliary heads is not merely a rescue from bad initialisation.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


class GoogLeNet(nn.Module):
    """Inception v1 for 224x224 inputs, following Table 1 of Szegedy et al. (2015).

    This is the trunk only: the paper's two auxiliary classifiers (on ``inception4a`` and
    ``inception4d``) are deliberately absent, because auxloss attaches heads through hooks. That way the
    same trunk serves as the no-auxiliary baseline and as the host of any head configuration.

    Faithful to the paper: real 5x5 convolutions, a ReLU after every conv, biased convs without
    BatchNorm, and ceil-mode max pools so every stage has exactly the table's spatial size
    (112, 56, 28, 14, 7). The paper's LocalResponseNorm layers are left out: they have no parameters,
    later work (Simonyan & Zisserman 2014; the BN-Inception paper) found them of little or no benefit,
    and leaving them out keeps the top-level submodules exactly the table's rows.

    ``batch_norm=True`` gives the BN-Inception-style variant (bias-free convs followed by BatchNorm),
    with identical submodule names, for when training the plain 22-layer trunk is too slow.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.4, batch_norm: bool = False) -> None:
        super().__init__()
        int_at_least("num_classes", num_classes)
        dropout = fraction_below_one("dropout", dropout)
        # ceil_mode makes 3x3/2 pools map 112->56->28->14->7 exactly, matching the table.
        self.conv1 = ConvBlock(3, 64, 7, stride=2, padding=3, batch_norm=batch_norm)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = ConvBlock(64, 64, 1, batch_norm=batch_norm)
        self.conv3 = ConvBlock(64, 192, 3, padding=1, batch_norm=batch_norm)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        blocks = _build_inceptions(192, 1.0, batch_norm)
        self.inception3a = blocks["inception3a"]
        self.inception3b = blocks["inception3b"]
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = blocks["inception4a"]
        self.inception4b = blocks["inception4b"]
        self.inception4c = blocks["inception4c"]
        self.inception4d = blocks["inception4d"]
        self.inception4e = blocks["inception4e"]
        self.maxpool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception5a = blocks["inception5a"]
        self.inception5b = blocks["inception5b"]
        # Adaptive rather than a fixed 7x7 window, so other input sizes still produce a 1x1 map.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.inception5b.out_channels, num_classes)
        _init_inception_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


class GoogLeNet32(nn.Module):
    """GoogLeNet's Inception trunk adapted to 32x32 (CIFAR-sized) inputs.

    The ImageNet stem downsamples 224 -> 28 before the first Inception block; applied to a 32x32 image
    it would leave a 2x2 map by ``inception4a``. So the stem here is a single stride-1 3x3 conv and
    there are no early pools: the Inception stages run at 32x32, 16x16 and 8x8. The Inception blocks
    keep the paper's names, so head configs written for :class:`GoogLeNet` (``inception4a``,
    ``inception4d``) carry over.

    ``width`` scales every channel count (stem and all Inception columns), so ``width=0.25`` gives a
    roughly 16x smaller net for quick experiments. BatchNorm is on by default because at this scale
    that is what makes the 20-odd-layer trunk train reliably in a short budget; pass
    ``batch_norm=False`` for the paper's plain setting, where auxiliary heads matter most.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: float = 1.0,
        dropout: float = 0.4,
        *,
        in_channels: int = 3,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        int_at_least("num_classes", num_classes)
        int_at_least("in_channels", in_channels)
        width = finite_above_zero("width", width)
        dropout = fraction_below_one("dropout", dropout)
        stem_channels = _scaled(192, width)
        self.stem = ConvBlock(in_channels, stem_channels, 3, padding=1, batch_norm=batch_norm)
        blocks = _build_inceptions(stem_channels, width, batch_norm)
        self.inception3a = blocks["inception3a"]
        self.inception3b = blocks["inception3b"]
        # padding=1 halves even sizes exactly: 32 -> 16 -> 8.
        self.maxpool3 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception4a = blocks["inception4a"]
        self.inception4b = blocks["inception4b"]
        self.inception4c = blocks["inception4c"]
        self.inception4d = blocks["inception4d"]
        self.inception4e = blocks["inception4e"]
        self.maxpool4 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception5a = blocks["inception5a"]
        self.inception5b = blocks["inception5b"]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.inception5b.out_channels, num_classes)
        _init_inception_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


# --------------------------------------------------------------------------------------------------
# Small models for demos and tests
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[..., nn.Module]] = {
    "googlenet": GoogLeNet,
    "googlenet32": GoogLeNet32,
    "small_cnn": SmallCNN,
    "deep_mlp": DeepMLP,
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


# --------------------------------------------------------------------------------------------------
# Sequence models: an RNN classifier and a small transformer
# --------------------------------------------------------------------------------------------------

_RNN_CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


class LSTMClassifier(nn.Module):
    """An RNN over a sequence ``(N, T, D)`` (``batch_first``), classifying from its last step's output.

    ``rnn`` is an ``nn.LSTM`` (or ``nn.GRU`` with ``cell="gru"``) of ``layers`` layers, read by the Trinh
    auxiliary losses (:mod:`auxloss.sequence`) and by :class:`~auxloss.heads.SequenceHead` taps (``select=0``
    picks its per-step outputs); ``fc`` maps the last step's output to the classes. The RNN starts from a zero
    state and reads the model input directly, which is what the truncated Trinh losses need.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        hidden: int = 64,
        layers: int = 1,
        cell: Literal["lstm", "gru"] = "lstm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_size = int_at_least("input_size", input_size)
        int_at_least("num_classes", num_classes)
        int_at_least("hidden", hidden)
        int_at_least("layers", layers)
        dropout = fraction_below_one("dropout", dropout)
        if cell not in _RNN_CELLS:
            raise AuxLossError(f"cell must be 'lstm' or 'gru', got {cell!r}.")
        # nn.LSTM only applies dropout between layers, and warns when given one with a single layer.
        self.rnn = _RNN_CELLS[cell](input_size, hidden, num_layers=layers, batch_first=True,
                                    dropout=dropout if layers > 1 else 0.0)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise AuxLossError(
                f"LSTMClassifier expects a sequence (N, T, {self.input_size}), got shape {tuple(x.shape)}; "
                "images can be read row by row as (N, H, W)."
            )
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class TinyTransformer(nn.Module):
    """A small pre-norm transformer classifier (a ViT for images, or a token classifier) with a class token.

    Images ``(N, C, H, W)`` are cut into ``patch_size`` patches by a strided conv (``embed``); with
    ``vocab_size`` set, the input is instead token ids ``(N, L)`` embedded by an ``nn.Embedding``. A learned
    class token is prepended and learned positions added, then ``blocks`` -- an ``nn.ModuleList`` of
    ``nn.TransformerEncoderLayer(batch_first=True, norm_first=True)`` -- run in turn; ``norm`` and ``fc``
    classify from the class token.

    The tap points are ``blocks.0``, ``blocks.1``, ...: each outputs the token sequence ``(N, 1 + P, dim)``, class
    token first, so a deep-supervision head reads it with ``LinearHead(C, pool="cls")`` or pools every token with
    ``pool="mean_tokens"`` (see :func:`auxloss.recipes.transformer_deep_supervision`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 7,
        vocab_size: int | None = None,
        max_len: int = 128,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        int_at_least("num_classes", num_classes)
        int_at_least("dim", dim)
        int_at_least("depth", depth)
        int_at_least("heads", heads)
        dropout = fraction_below_one("dropout", dropout)
        if dim % heads:
            raise AuxLossError(f"dim ({dim}) must be divisible by heads ({heads}).")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise AuxLossError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}.")
        self.vocab_size = vocab_size
        if vocab_size is None:
            int_at_least("in_channels", in_channels)
            int_at_least("image_size", image_size)
            int_at_least("patch_size", patch_size)
            if image_size % patch_size:
                raise AuxLossError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}).")
            self.embed: nn.Module = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
            n_tokens = (image_size // patch_size) ** 2
        else:
            int_at_least("vocab_size", vocab_size)
            n_tokens = int_at_least("max_len", max_len)
            self.embed = nn.Embedding(vocab_size, dim)
        self.n_tokens = n_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=round(dim * mlp_ratio), dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.vocab_size is None:
            if x.dim() != 4:
                raise AuxLossError(f"TinyTransformer expects images (N, C, H, W), got shape {tuple(x.shape)}.")
            tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, P, dim)
        else:
            if x.dim() != 2 or x.dtype.is_floating_point:
                raise AuxLossError(f"TinyTransformer with vocab_size expects token ids (N, L), got {x.dtype} "
                                   f"{tuple(x.shape)}.")
            tokens = self.embed(x)
        if tokens.shape[1] > self.n_tokens:
            raise AuxLossError(f"TinyTransformer got {tokens.shape[1]} tokens but has positions for {self.n_tokens}; "
                               "raise max_len or check image_size/patch_size.")
        h = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        h = h + self.pos_embed[:, : h.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.fc(self.norm(h[:, 0]))


MODELS["lstm_classifier"] = LSTMClassifier
MODELS["tiny_transformer"] = TinyTransformer
__all__ += ["LSTMClassifier", "TinyTransformer"]
