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
* :class:`LSTMClassifier` and :class:`TinyTransformer` -- sequence trunks (an RNN, a small transformer).

``build_model`` / ``example_input`` give name-based access for configs and the CLI.

The package is split by family (:mod:`.inception`, :mod:`.small`, :mod:`.sequence`) with the name registry in
:mod:`.registry`; import everything from ``auxloss.zoo.models`` itself.
"""

from __future__ import annotations

from torch import nn

from auxloss.zoo.models.inception import ConvBlock, GoogLeNet, GoogLeNet32, Inception
from auxloss.zoo.models.registry import MODELS, build_model, example_input
from auxloss.zoo.models.sequence import LSTMClassifier, TinyTransformer
from auxloss.zoo.models.small import DeepMLP, SmallCNN

__all__ = [
    "MODELS",
    "ConvBlock",
    "DeepMLP",
    "GoogLeNet",
    "GoogLeNet32",
    "Inception",
    "LSTMClassifier",
    "SmallCNN",
    "TinyTransformer",
    "build_model",
    "count_parameters",
    "example_input",
]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (buffers such as BatchNorm running stats excluded).

    Parameters shared between submodules are counted once, because ``Module.parameters()`` already
    de-duplicates them; that is the number that matters for model size.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
