"""Inception v1 (Szegedy et al. 2015, "Going deeper with convolutions"), the net that popularised auxiliary
classifiers, as :class:`GoogLeNet` (224x224 inputs, heads on ``inception4a`` and ``inception4d`` in the paper) and
:class:`GoogLeNet32` (the same trunk for 32x32 inputs)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from auxloss._checks import finite_above_zero, fraction_below_one, int_at_least

__all__ = ["ConvBlock", "GoogLeNet", "GoogLeNet32", "Inception"]


def _scaled(channels: int, width: float) -> int:
    # At least one channel: a zero-width branch would make concatenation and BatchNorm fail obscurely.
    return max(1, round(channels * width))


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
