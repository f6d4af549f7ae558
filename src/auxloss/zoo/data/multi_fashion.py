"""Multi-Fashion: two Fashion-MNIST garments overlaid with an offset; the left one is the main task, the right one
the auxiliary task.

The two-item construction of MultiMNIST (Sabour et al. 2017, "Dynamic Routing Between Capsules", §5) as used for
multi-task benchmarks on Fashion-MNIST (Lin et al. 2019, "Pareto Multi-Task Learning", MultiFashion): each image
holds one garment in the top-left corner and another shifted ``offset`` pixels down and to the right, overlapping
it; a pixel is the brighter of the two. Built from the local IDX files (Debian's ``dataset-fashion-mnist``),
nothing is downloaded, and a given seed always builds the same images.

Keys: ``"input"`` float32 ``(1, 28 + offset, 28 + offset)`` in [0, 1] (flat with ``flatten=True``); ``"target"``
the left garment's class; ``"right"`` the right garment's class (both the 10 Fashion-MNIST classes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from auxloss.errors import AuxLossError
from auxloss.zoo.data.common import DataRequest, DictDataset
from auxloss.zoo.data.idx import (
    _FASHION,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_ROOT,
    _check_split,
    _labels_to_targets,
    _locate,
    _read_pair,
)

__all__ = ["load_multi_fashion", "multi_fashion_splits", "overlay_pairs"]


def _check_offset(offset: object) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or not 1 <= offset <= 28:
        raise AuxLossError(f"offset must be an integer number of pixels in 1..28 (the right garment's shift down and "
                           f"right; 28 means no overlap), got {offset!r}.")
    return offset


def overlay_pairs(images: np.ndarray, left: np.ndarray, right: np.ndarray, offset: int) -> np.ndarray:
    """``(k, 1, S, S)`` float32 images, ``S = 28 + offset``: ``images[left]`` at the top left and ``images[right]``
    shifted ``offset`` pixels down and right, the brighter pixel where they overlap (uint8 ``(N, 28, 28)`` in)."""
    offset = _check_offset(offset)
    h, w = images.shape[1:]
    canvas = np.zeros((len(left), h + offset, w + offset), dtype=np.uint8)
    canvas[:, :h, :w] = images[left]
    region = canvas[:, offset:, offset:]
    np.maximum(region, images[right], out=region)
    return (canvas.astype(np.float32) / 255.0)[:, None]


def _pairs(pool: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (left, right) item indices from ``pool``, never the same item twice in one image.

    Left items are a permutation of the pool (each used once while ``n`` fits); the right item is another pool
    entry at a random nonzero distance, so it always differs from the left one.
    """
    if len(pool) < 2:
        raise AuxLossError(f"Multi-Fashion needs at least 2 garments to pair, got {len(pool)}.")
    pos = rng.permutation(len(pool))[:n] if n <= len(pool) else rng.integers(0, len(pool), n)
    other = (pos + rng.integers(1, len(pool), len(pos))) % len(pool)
    return pool[pos], pool[other]


def _dataset(images: np.ndarray, labels: np.ndarray, left: np.ndarray, right: np.ndarray, offset: int,
             flatten: bool, info: dict) -> DictDataset:
    x = overlay_pairs(images, left, right, offset)
    if flatten:
        x = x.reshape(len(x), -1)
    return DictDataset(
        {"input": x, "target": labels[left], "right": labels[right]},
        num_classes={"target": 10, "right": 10},
        class_names={"target": FASHION_MNIST_CLASSES, "right": FASHION_MNIST_CLASSES},
        info={"source": "multi-fashion", "offset": offset, "flatten": flatten, **info},
    )


def _read(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    split = _check_split(split, "Multi-Fashion")
    images_path, labels_path = _locate(Path(root), split, None, _FASHION)
    images, labels = _read_pair(images_path, labels_path)
    y, _ = _labels_to_targets(labels, labels_path, 0, 10, "Fashion-MNIST")
    return images, y


def load_multi_fashion(root: str | Path = FASHION_MNIST_DEFAULT_ROOT, split: str = "train", n: int | None = None,
                       seed: int = 0, *, offset: int = 8, flatten: bool = False) -> DictDataset:
    """``n`` Multi-Fashion images built from the garments of one Fashion-MNIST split (all of them by default).

    Raises:
        AuxLossError: a bad split or offset; the IDX files missing (saying where they were looked for and how to
            get them) or corrupt.
    """
    offset = _check_offset(offset)
    images, y = _read(root, split)
    n = len(images) if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AuxLossError(f"n must be a positive number of images, got {n!r}.")
    left, right = _pairs(np.arange(len(images)), n, np.random.default_rng(seed))
    return _dataset(images, y, left, right, offset, flatten, {"split": split, "seed": seed,
                                                               "root": str(Path(root).absolute())})


def multi_fashion_splits(request: DataRequest) -> dict[str, DictDataset]:
    """The registry's builder: train and val from disjoint halves of the official training garments (in proportion
    to ``n_train`` and ``n_val``), test from the official test garments, so no garment is in two splits."""
    params = dict(request.params)
    offset = _check_offset(params.pop("offset", 8))
    flatten = bool(params.pop("flatten", False))
    root = request.root or FASHION_MNIST_DEFAULT_ROOT
    images, y = _read(root, "train")
    test_images, test_y = _read(root, "test")
    rng = np.random.default_rng(request.seed)
    order = rng.permutation(len(images))
    cut = max(2, min(len(images) - 2, round(len(images) * request.n_train / max(1, request.n_train + request.n_val))))
    info = {"seed": request.seed, "root": str(Path(root).absolute())}
    out = {}
    for split, pool, n, imgs, labels in (("train", order[:cut], request.n_train, images, y),
                                         ("val", order[cut:], request.n_val, images, y),
                                         ("test", np.arange(len(test_images)), request.n_test, test_images, test_y)):
        if n < 1:
            raise AuxLossError(f"Multi-Fashion needs at least one {split} image (data.n_{split} >= 1), got {n}.")
        left, right = _pairs(pool, n, rng)
        out[split] = _dataset(imgs, labels, left, right, offset, flatten, {**info, "split": split})
    return out
