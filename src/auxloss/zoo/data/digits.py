"""scikit-learn's bundled 8x8 handwritten digits, as images or read pixel by pixel as sequences."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from auxloss.errors import AuxLossError
from auxloss.zoo.data.common import DataRequest, DictDataset, split_dataset

__all__ = [
    "DIGIT_LOOPS",
    "digit_sequences_splits",
    "digits_splits",
    "load_digit_sequences",
    "load_digits_dataset",
    "pixel_sequences",
]

# Digits drawn with a closed loop. 4 counts as open: handwritten 4s are mostly drawn open at the top, and
# at 8x8 the printed closed triangle is rarely visible, so calling it "loop" would make a noisy label.
DIGIT_LOOPS: frozenset[int] = frozenset({0, 6, 8, 9})


def load_digits_dataset(*, flatten: bool = False) -> DictDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (bundled with scikit-learn, never downloaded).

    Keys: ``"input"`` float32 ``(1, 8, 8)`` (``(64,)`` with ``flatten=True``) scaled from 0-16 to [0, 1];
    ``"target"`` the digit (10 classes); ``"parity"`` ``digit % 2`` (0 even, 1 odd); ``"loop"`` 1 for
    digits with a closed loop (:data:`DIGIT_LOOPS`: 0, 6, 8, 9; 4 counts as open), else 0.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise AuxLossError(
            "The digits dataset needs scikit-learn, which is not installed. Install it with "
            "`pip install scikit-learn` or `pip install auxloss[data]`."
        ) from None
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    x = images.reshape(len(images), 64) if flatten else images[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    loop = np.isin(y, sorted(DIGIT_LOOPS)).astype(np.int64)
    return DictDataset(
        {"input": x, "target": y, "parity": y % 2, "loop": loop},
        num_classes={"target": 10, "parity": 2, "loop": 2},
        class_names={
            "target": [str(d) for d in range(10)],
            "parity": ["even", "odd"],
            "loop": ["open", "loop"],
        },
        info={"source": "sklearn.datasets.load_digits", "flatten": flatten},
    )



def pixel_sequences(images: DictDataset, step: int = 1) -> DictDataset:
    """Images ``(N, 1, H, W)`` read in raster order, ``step`` pixels per time step: ``(N, H·W/step, step)``."""
    x = images.tensors["input"]
    if not isinstance(x, Tensor):
        raise AuxLossError("pixel_sequences needs images held in memory; this dataset decodes them on demand.")
    pixels = int(math.prod(x.shape[1:]))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or pixels % step:
        raise AuxLossError(f"data.params.step must be a positive divisor of the {pixels} pixels, got {step!r}.")
    tensors = dict(images.tensors, input=x.reshape(len(x), pixels // step, step))
    return DictDataset(tensors, num_classes=images.num_classes, class_names=images.class_names,
                       info={**images.info, "sequence_step": step})


def load_digit_sequences(*, step: int = 1) -> DictDataset:
    """The digits read pixel by pixel for a recurrent model: ``"input"`` float32 ``(64 / step, step)``.

    The labels are those of :func:`load_digits_dataset` (``"target"``, ``"parity"``, ``"loop"``).
    """
    return pixel_sequences(load_digits_dataset(), step)


def digits_splits(request: DataRequest) -> dict[str, DictDataset]:
    """The registry's builder: disjoint random train/val/test subsets of the 1,797 digits."""
    full = load_digits_dataset(**request.params)
    return split_dataset(full, None, request.n_train, request.n_val, request.n_test, request.seed, "digits")


def digit_sequences_splits(request: DataRequest) -> dict[str, DictDataset]:
    """The registry's builder for ``digits-sequence``: ``params`` (``step``) go to :func:`pixel_sequences`."""
    full = pixel_sequences(load_digits_dataset(), **request.params)
    return split_dataset(full, None, request.n_train, request.n_val, request.n_test, request.seed,
                         "digits-sequence")
