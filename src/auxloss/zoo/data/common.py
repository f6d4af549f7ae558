"""What every source shares: the dataset class, columns decoded on demand, and train/val/test splits.

A dataset item is a ``dict[str, Tensor]``: ``"input"`` (what the model sees), ``"target"`` (the main label) and
any auxiliary label keys. PyTorch's default collate turns a list of such items into a dict batch, so no custom
collate function is needed.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from auxloss.errors import AuxLossError, close_matches

__all__ = ["SPLITS", "DataRequest", "DictDataset", "LazyColumn", "UInt8Images", "split_dataset"]

SPLITS: tuple[str, ...] = ("train", "val", "test")


class LazyColumn(ABC):
    """A column whose items are made when read (an image decoded from its file, uint8 pixels scaled to float).

    It stands in a :class:`DictDataset` next to in-memory tensors, so a dataset too large to hold decoded still
    has one item type and one ``subset``. ``column[i]`` is item ``i``; ``column[a:b]`` (or a list of indices)
    stacks those items, which is how callers read an example batch. ``shape`` and ``dtype`` describe the
    column as if it were one tensor.
    """

    @property
    @abstractmethod
    def shape(self) -> torch.Size:
        """``(number of items, *item shape)``."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of every item."""

    @abstractmethod
    def load(self, index: int) -> Tensor:
        """Item ``index`` (already in range and non-negative)."""

    @abstractmethod
    def take(self, indices: Tensor) -> LazyColumn:
        """A column of the items at ``indices`` (a 1-D int64 tensor, in range), still made on demand."""

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, index: Any) -> Tensor:
        n = len(self)
        if isinstance(index, slice):
            rows: Sequence[int] = range(n)[index]
        else:
            try:
                i = operator.index(index)
            except TypeError:
                rows = [int(j) for j in torch.as_tensor(index).flatten().tolist()]
            else:
                if not -n <= i < n:
                    # IndexError (not AuxLossError) keeps ``for item in dataset`` ending where it should.
                    raise IndexError(f"index {i} is out of range for a column of {n} items")
                return self.load(i % n)
        rows = [r % n if -n <= r < n else _out_of_range(r, n) for r in rows]
        if not rows:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return torch.stack([self.load(r) for r in rows])


def _out_of_range(index: int, n: int) -> int:
    raise IndexError(f"index {index} is out of range for a column of {n} items")


class UInt8Images(LazyColumn):
    """uint8 images held as they are stored, each returned as float32 in [0, 1] (``pixel / 255``) when read.

    Holding the bytes rather than the floats keeps a 50,000-image CIFAR split at 150 MB instead of 600 MB; the
    division happens per item, and gives exactly the floats a whole-array division would.
    """

    def __init__(self, pixels: Tensor) -> None:
        if not isinstance(pixels, Tensor) or pixels.dtype != torch.uint8 or pixels.dim() < 2:
            raise AuxLossError(
                "UInt8Images needs a uint8 tensor of shape (n, ...) holding one image per row; got "
                f"{type(pixels).__name__} {getattr(pixels, 'dtype', '')} {tuple(getattr(pixels, 'shape', ()))}."
            )
        self.pixels = pixels

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def load(self, index: int) -> Tensor:
        return self.pixels[index].to(torch.float32) / 255.0

    def take(self, indices: Tensor) -> UInt8Images:
        return UInt8Images(self.pixels[indices])

    def __repr__(self) -> str:
        return f"UInt8Images(shape={tuple(self.shape)})"


# ----------------------------------------------------------------------------------------------------------
# DictDataset
# ----------------------------------------------------------------------------------------------------------


def _describe_lengths(lengths: Mapping[str, int]) -> str:
    return ", ".join(f"{k!r}: {v}" for k, v in lengths.items())


class DictDataset(Dataset[dict[str, Tensor]]):
    """A dataset of equal-length tensors, one per key; item ``i`` is ``{key: tensor[i] for each key}``.

    Args:
        tensors: key -> tensor (or numpy array, converted without copying where possible), or a
            :class:`LazyColumn` whose items are made when read (images decoded from their files). All must
            have the same, non-zero first dimension: the number of items.
        num_classes: key -> number of classes, for the integer-valued keys where it is known (a key whose
            class count is unknown, or which is not a class label, such as ``"input"``, is simply absent).
        class_names: key -> the names of its classes, index ``c`` naming class ``c``.
        info: free-form metadata (how the data was made: generator, seed, source folder, ...).

    Attributes:
        tensors: the dict of columns (shared, not copied: do not resize them). Label columns are always
            tensors; only ``"input"`` of the streamed sources (image folders, CIFAR) is a :class:`LazyColumn`.
        num_classes: as given.
        class_names: as given.
        info: as given.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor | np.ndarray | LazyColumn],
        *,
        num_classes: Mapping[str, int] | None = None,
        class_names: Mapping[str, Sequence[str]] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(tensors, Mapping) or len(tensors) == 0:
            raise AuxLossError(
                "DictDataset needs a non-empty dict of tensors, e.g. DictDataset({'input': x, 'target': y}); "
                f"got {type(tensors).__name__} {tensors!r:.80}."
            )
        converted: dict[str, Tensor | LazyColumn] = {}
        for key, value in tensors.items():
            if not isinstance(key, str):
                raise AuxLossError(
                    f"DictDataset keys must be strings (they become batch keys); got key {key!r} of type "
                    f"{type(key).__name__}. Rename it to a string."
                )
            if isinstance(value, np.ndarray):
                array = np.ascontiguousarray(value)
                if not array.flags.writeable:
                    # torch warns on read-only buffers (it cannot promise not to write): copy those.
                    array = array.copy()
                try:
                    value = torch.from_numpy(array)
                except TypeError:
                    raise AuxLossError(
                        f"DictDataset value for key {key!r} is a numpy array of dtype {array.dtype}, which "
                        "torch cannot hold; convert it to a numeric dtype first."
                    ) from None
            if isinstance(value, LazyColumn):
                converted[key] = value
                continue
            if not isinstance(value, Tensor):
                raise AuxLossError(
                    f"DictDataset value for key {key!r} must be a torch.Tensor, numpy array or LazyColumn; got "
                    f"{type(value).__name__}. Convert it with torch.as_tensor(...)."
                )
            if value.dim() == 0:
                raise AuxLossError(
                    f"DictDataset value for key {key!r} is a scalar tensor; every value needs a first "
                    "dimension indexing the items. Give one value per item, e.g. value.expand(n)."
                )
            converted[key] = value

        lengths = {k: int(v.shape[0]) for k, v in converted.items()}
        if len(set(lengths.values())) > 1:
            # Name the keys that disagree with the most common length: usually one key is the odd one out.
            counts: dict[int, int] = {}
            for n in lengths.values():
                counts[n] = counts.get(n, 0) + 1
            common = max(counts, key=lambda n: counts[n])
            odd = {k: n for k, n in lengths.items() if n != common}
            raise AuxLossError(
                "DictDataset tensors must all have the same first dimension (the number of items); "
                f"key(s) {sorted(odd)} have length(s) {_describe_lengths(odd)} while the others have "
                f"{common} (all lengths: {_describe_lengths(lengths)}). Slice or pad them to one length."
            )
        n = next(iter(lengths.values()))
        if n == 0:
            raise AuxLossError(
                f"DictDataset has 0 items (keys {sorted(converted)} are all empty); give it at least one item."
            )

        self.tensors: dict[str, Tensor | LazyColumn] = converted
        self.num_classes: dict[str, int] = {}
        for key, count in dict(num_classes or {}).items():
            self._check_known_key(key, "num_classes")
            if int(count) < 1:
                raise AuxLossError(f"num_classes[{key!r}] must be a positive integer; got {count!r}.")
            self.num_classes[key] = int(count)
        self.class_names: dict[str, tuple[str, ...]] = {}
        for key, names in dict(class_names or {}).items():
            self._check_known_key(key, "class_names")
            names = tuple(str(s) for s in names)
            if key in self.num_classes and len(names) != self.num_classes[key]:
                raise AuxLossError(
                    f"class_names[{key!r}] has {len(names)} names but num_classes[{key!r}] is "
                    f"{self.num_classes[key]}; give one name per class."
                )
            self.class_names[key] = names
        self.info: dict[str, Any] = dict(info or {})
        self._len = n

    def _check_known_key(self, key: str, what: str) -> None:
        if key not in self.tensors:
            hint = close_matches(key, self.tensors)
            raise AuxLossError(
                f"{what} names key {key!r}, which is not one of the dataset's keys {sorted(self.tensors)}"
                + (f"; did you mean {hint[0]!r}?" if hint else ".")
            )

    @property
    def keys(self) -> list[str]:
        """The item keys, in insertion order."""
        return list(self.tensors)

    @property
    def classes(self) -> list[str]:
        """The names of the ``"target"`` classes (class ``i`` is ``classes[i]``), where known."""
        if "target" not in self.class_names:
            raise AttributeError("this DictDataset has no class names for 'target'")
        return list(self.class_names["target"])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        # Tensor indexing raises IndexError out of range, which keeps ``for item in dataset`` working.
        return {k: v[index] for k, v in self.tensors.items()}

    def subset(self, indices: Sequence[int] | Tensor | np.ndarray) -> DictDataset:
        """A new :class:`DictDataset` holding the items at ``indices`` (ints, or a boolean mask)."""
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
        if idx.dtype == torch.bool:
            if idx.dim() != 1 or idx.numel() != len(self):
                raise AuxLossError(
                    f"subset got a boolean mask of shape {tuple(idx.shape)}; a mask needs exactly one "
                    f"entry per item ({len(self)})."
                )
            idx = idx.nonzero().flatten()
        elif idx.numel() == 0:
            idx = idx.to(torch.long)
        elif idx.is_floating_point() or idx.is_complex():
            raise AuxLossError(f"subset indices must be integers; got dtype {idx.dtype}. Use .long().")
        idx = idx.to(torch.long).flatten()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise AuxLossError(
                f"subset indices must lie in [-{len(self)}, {len(self) - 1}]; got values from "
                f"{int(idx.min())} to {int(idx.max())}."
            )
        return DictDataset(
            {k: v.take(idx) if isinstance(v, LazyColumn) else v[idx] for k, v in self.tensors.items()},
            num_classes=self.num_classes,
            class_names=self.class_names,
            info=self.info,
        )

    def __repr__(self) -> str:
        parts = []
        for k, v in self.tensors.items():
            desc = f"{k}: {str(v.dtype).replace('torch.', '')}{list(v.shape[1:])}"
            if k in self.num_classes:
                desc += f" ({self.num_classes[k]} classes)"
            parts.append(desc)
        return f"DictDataset(n={len(self)}, " + ", ".join(parts) + ")"



# ----------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataRequest:
    """What an experiment asks of a data source: a folder (where it reads one), split sizes, seed, options.

    ``params`` are the source's own options (``data.params`` in the YAML), passed to its loader.
    """

    n_train: int
    n_val: int
    n_test: int
    seed: int
    root: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


def split_dataset(full: DictDataset, test: DictDataset | None, n_train: int, n_val: int, n_test: int,
                  seed: int, name: str, *, val: DictDataset | None = None) -> dict[str, DictDataset]:
    """Train/val/test subsets drawn from ``full`` by a permutation seeded with ``seed``.

    Train always comes from ``full``. A split given here (``test``: a source's official test split; ``val``: its
    official validation split) is drawn from by a permutation of its own, seeded with ``seed + 1`` for test and
    ``seed + 2`` for val; the splits not given are carved from ``full`` after train, in the order val, test, so
    all the carved ones are disjoint. ``name`` names the data in errors.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(full))
    carved = [("train", n_train)] + [(split, n) for split, given, n in (("val", val, n_val), ("test", test, n_test))
                                     if given is None]
    need = sum(n for _, n in carved)
    if need > len(full):
        raise AuxLossError(f"the {name} data has {len(full)} samples but the splits ask for {need}; lower "
                           "data.n_train/n_val/n_test.")
    out: dict[str, DictDataset] = {}
    start = 0
    for split, n in carved:
        out[split] = full.subset(order[start:start + n].tolist())
        start += n
    for split, given, n, offset in (("val", val, n_val, 2), ("test", test, n_test, 1)):
        if given is None:
            continue
        if n > len(given):
            raise AuxLossError(f"the {name} {split} split has {len(given)} samples, fewer than data.n_{split}={n}.")
        out[split] = given.subset(np.random.default_rng(seed + offset).permutation(len(given))[:n].tolist())
    return {split: out[split] for split in SPLITS}
