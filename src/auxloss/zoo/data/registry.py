"""The one dataset registry: every source by name, with its loader, its split builder and its availability.

``experiment/build.py`` looks a config's ``data.name`` up here, so a new source is one entry in
:data:`DATASETS`, not a new branch in the experiment code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from auxloss.errors import AuxLossError, close_matches
from auxloss.zoo.data.cifar import cifar10_splits, cifar100_splits, load_cifar10, load_cifar100
from auxloss.zoo.data.common import DataRequest, DictDataset
from auxloss.zoo.data.digits import (
    digit_sequences_splits,
    digits_splits,
    load_digit_sequences,
    load_digits_dataset,
)
from auxloss.zoo.data.folder import folder_splits, load_image_folder
from auxloss.zoo.data.hf import hf_available, hf_splits, load_hf_dataset
from auxloss.zoo.data.idx import (
    _FASHION_HOW_TO_GET,
    fashion_mnist_available,
    fashion_mnist_splits,
    idx_splits,
    load_fashion_mnist,
    load_idx_dataset,
)
from auxloss.zoo.data.multi_fashion import load_multi_fashion, multi_fashion_splits
from auxloss.zoo.data.shapes import make_shapes, shapes_splits

__all__ = ["DATASETS", "DatasetSpec", "available_datasets", "build_splits", "get_dataset", "load_dataset"]


def _sklearn_installed() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def _pillow_installed() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


# Loader arguments that a request supplies itself, so they are not ``data.params`` options.
_REQUEST_ARGS = frozenset({"root", "split", "n", "seed"})


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset: how to load it and whether it can be loaded on this machine.

    Calling the spec calls its loader: ``DATASETS["shapes"](n=500, seed=1)``. ``splits`` builds the
    train/val/test splits an experiment asks for (:func:`build_splits`); ``needs_root`` says that the data is
    read from a folder the user gives (``data.root``).
    """

    name: str
    loader: Callable[..., DictDataset]
    description: str
    is_available: Callable[[], bool] = field(default=lambda: True)
    how_to_get: str = ""
    splits: Callable[[DataRequest], dict[str, DictDataset]] | None = None
    needs_root: bool = False

    def __call__(self, **kwargs: Any) -> DictDataset:
        return self.loader(**kwargs)

    @property
    def options(self) -> list[str]:
        """The ``data.params`` this source accepts: its loader's keyword arguments."""
        return [
            p.name
            for p in inspect.signature(self.loader).parameters.values()
            if p.name not in _REQUEST_ARGS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]


DATASETS: dict[str, DatasetSpec] = {
    "shapes": DatasetSpec(
        "shapes",
        make_shapes,
        "Generated coloured shapes; target = shape, aux = colour/size/position/texture/mask/background.",
        splits=shapes_splits,
    ),
    "digits": DatasetSpec(
        "digits",
        load_digits_dataset,
        "scikit-learn's 8x8 handwritten digits; target = digit, aux = parity/loop.",
        _sklearn_installed,
        "`pip install scikit-learn` or `pip install auxloss[data]`",
        splits=digits_splits,
    ),
    "digits-sequence": DatasetSpec(
        "digits-sequence",
        load_digit_sequences,
        "The same digits read pixel by pixel (64 steps), for recurrent models; target = digit, aux = parity/loop.",
        _sklearn_installed,
        "`pip install scikit-learn` or `pip install auxloss[data]`",
        splits=digit_sequences_splits,
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        load_fashion_mnist,
        "Fashion-MNIST from local IDX files; target = garment, aux = group.",
        fashion_mnist_available,
        _FASHION_HOW_TO_GET,
        splits=fashion_mnist_splits,
    ),
    "multi-fashion": DatasetSpec(
        "multi-fashion",
        load_multi_fashion,
        "Two Fashion-MNIST garments overlaid with an offset, from local IDX files; target = the left garment, "
        "aux = right (the right garment).",
        fashion_mnist_available,
        _FASHION_HOW_TO_GET,
        splits=multi_fashion_splits,
    ),
    "idx": DatasetSpec(
        "idx",
        load_idx_dataset,
        "Any MNIST-format folder (MNIST, Fashion-MNIST, KMNIST, EMNIST) of IDX files under root; target = label.",
        how_to_get="Give data.root: a folder holding the IDX files (nothing is downloaded).",
        splits=idx_splits,
        needs_root=True,
    ),
    "folder": DatasetSpec(
        "folder",
        load_image_folder,
        "Your own images under root/<class_name>/, decoded as they are read; target = class.",
        _pillow_installed,
        "Give data.root: a folder with one subfolder per class (needs Pillow: `pip install Pillow`).",
        splits=folder_splits,
        needs_root=True,
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        load_cifar10,
        "CIFAR-10 from its python batch folder (cifar-10-batches-py) under root; target = class, aux = vehicle.",
        how_to_get="Give data.root: the extracted cifar-10-batches-py folder (nothing is downloaded).",
        splits=cifar10_splits,
        needs_root=True,
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        load_cifar100,
        "CIFAR-100 from its python folder (cifar-100-python) under root; target = fine class, aux = coarse.",
        how_to_get="Give data.root: the extracted cifar-100-python folder (nothing is downloaded).",
        splits=cifar100_splits,
        needs_root=True,
    ),
    "hf": DatasetSpec(
        "hf",
        load_hf_dataset,
        "A Hugging Face dataset on disk (save_to_disk folder or parquet files) under root; columns map to batch "
        "keys (default: its image is the input, its ClassLabel the target).",
        hf_available,
        "Give data.root: a folder written by save_to_disk, or parquet files (nothing is downloaded); needs the hf "
        "extra: `pip install 'auxloss[hf]'`.",
        splits=hf_splits,
        needs_root=True,
    ),
}


def available_datasets() -> list[str]:
    """Names of the built-in datasets that can be loaded here (packages installed, files present).

    A source read from a folder the user names (``needs_root``) is listed when its packages are installed.
    """
    return [name for name, spec in DATASETS.items() if spec.is_available()]


def get_dataset(name: str) -> DatasetSpec:
    """The registry entry ``name``, or an error naming the closest names and every built-in one."""
    if name not in DATASETS:
        hint = close_matches(name, DATASETS)
        raise AuxLossError(
            f"Unknown dataset {name!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else ".")
            + f" Built-in datasets: {sorted(DATASETS)}."
        )
    return DATASETS[name]


def load_dataset(name: str, **kwargs: Any) -> DictDataset:
    """Load built-in dataset ``name`` (a key of :data:`DATASETS`) with ``kwargs`` for its loader."""
    # The loaders themselves raise errors that say what is missing and how to get it.
    return get_dataset(name)(**kwargs)


def build_splits(name: str, request: DataRequest) -> dict[str, DictDataset]:
    """The ``{"train", "val", "test"}`` splits of dataset ``name`` for ``request`` (what ``auxloss run`` uses).

    Raises:
        AuxLossError: an unknown name (``unknown data.name ...``, naming the built-in ones); a ``params`` key
            the source does not take; a source read from a folder without ``root``; and the source's own errors.
    """
    if name not in DATASETS:
        hint = close_matches(str(name), DATASETS)
        names = sorted(DATASETS)
        listed = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
        raise AuxLossError(
            f"unknown data.name {name!r}; "
            + (f"use {hint[0]!r}, the closest built-in name (all: {listed})." if hint else f"use {listed}.")
            + " For your own data, name your function: 'package.module:function'."
        )
    spec = DATASETS[name]
    unknown = sorted(set(request.params) - set(spec.options))
    if unknown:
        raise AuxLossError(
            f"data.params {unknown} are not options of dataset {name!r}; it takes {spec.options or 'none'}."
        )
    if spec.needs_root and not request.root:
        raise AuxLossError(f"data.name {name!r} needs data.root. {spec.how_to_get}")
    assert spec.splits is not None, name  # every built-in entry has a split builder
    return spec.splits(request)

