"""Hugging Face ``datasets`` on disk: a folder written by ``save_to_disk``, or parquet files (the ``hf`` extra).

Nothing is downloaded and no Hub name is resolved: ``root`` must be a local path. A saved ``DatasetDict`` keeps
its splits; parquet files are grouped into splits by their names (``train-00000-of-00002.parquet``,
``test.parquet``, ``train/0000.parquet``). The data stays in Hugging Face's memory-mapped Arrow files: label
columns (one number per row) are read into tensors once, images and arrays are read and converted one item at a
time, as the :class:`~auxloss.zoo.data.common.LazyColumn` of an image folder is.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from auxloss._extras import require
from auxloss.errors import AuxLossError, close_matches
from auxloss.zoo.data.common import SPLITS, DataRequest, DictDataset, LazyColumn, split_dataset
from auxloss.zoo.data.folder import _image_size_hw, image_to_tensor

__all__ = ["HF_SPLIT_NAMES", "HFArrays", "HFImages", "hf_available", "hf_splits", "load_hf_dataset"]

#: auxloss split -> the Hugging Face split names that fill it by default, the first one present winning.
HF_SPLIT_NAMES: Mapping[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("validation", "val", "valid", "dev"),
    "test": ("test",),
}
# The files save_to_disk writes: a DatasetDict's index, and a single Dataset's state.
_DATASET_DICT_FILE = "dataset_dict.json"
_DATASET_STATE_FILE = "state.json"
_PARQUET = ".parquet"
# An 'owner/name' or 'name' that is not a path on this machine is taken for a Hub dataset's name.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# PIL modes of one channel: such images load as (1, H, W) unless grayscale is given.
_ONE_CHANNEL_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
_HOW_TO_SAVE = (
    "Save it to disk once where the network is allowed: `datasets.load_dataset({name!r}).save_to_disk(PATH)` "
    "(or `.to_parquet(...)` per split), then give that folder as data.root."
)
_FORMAT = "a folder written by Dataset/DatasetDict.save_to_disk, a .parquet file, or a folder of .parquet files"


def hf_available() -> bool:
    """Whether the ``datasets`` package is installed (looked up, not imported: importing it takes a second)."""
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):  # set to None in sys.modules, or a module without a spec
        return False


def _datasets() -> ModuleType:
    return require("datasets", "hf", note="It reads Hugging Face datasets saved to disk (data.name: hf).")


# ----------------------------------------------------------------------------------------------------------
# Opening the folder: split name -> datasets.Dataset
# ----------------------------------------------------------------------------------------------------------


def _missing_root(root: str | Path) -> AuxLossError:
    text = str(root)
    if _HUB_NAME.match(text) and not text.lower().endswith(_PARQUET):
        return AuxLossError(
            f"data.root {text!r} is not a local path (nothing by that name exists here) and looks like a Hugging "
            "Face Hub name: auxloss never downloads, it reads only datasets already on disk. "
            + _HOW_TO_SAVE.format(name=text)
            + f" If you meant a local folder, check the path (relative to {Path.cwd()})."
        )
    return AuxLossError(
        f"Hugging Face dataset path {Path(text).absolute()} does not exist. Give data.root {_FORMAT}."
    )


def _neither(path: Path) -> AuxLossError:
    if path.is_file():
        held = f"it is a {path.suffix or 'suffix-less'} file"
    else:
        names = sorted(p.name for p in path.iterdir())
        held = f"it holds {names[:8]}{' ...' if len(names) > 8 else ''}" if names else "it is empty"
    return AuxLossError(
        f"{path.absolute()} is neither a saved Hugging Face dataset (no {_DATASET_DICT_FILE} or "
        f"{_DATASET_STATE_FILE}) nor parquet data; {held}. Give data.root {_FORMAT}: `dataset.save_to_disk(PATH)` "
        "or `dataset.to_parquet(PATH/train.parquet)` write one."
    )


def _parquet_split(file: Path, root: Path, known: set[str]) -> str | None:
    """The split a parquet file belongs to: its name's first word (``train-00000-of-00002``), else a folder."""
    words = [re.split(r"[-_.]", file.stem, maxsplit=1)[0]]
    words += [p.name for p in file.relative_to(root).parents if p.name]  # the closest folder first
    for word in words:
        if word.lower() in known:
            return word.lower()
    return None


def _parquet_groups(root: Path, known: set[str]) -> dict[str, list[Path]]:
    files = sorted(p for p in root.rglob(f"*{_PARQUET}")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise _neither(root)
    split_of = {f: _parquet_split(f, root, known) for f in files}
    loose = [f for f, s in split_of.items() if s is None]
    if not loose:
        groups: dict[str, list[Path]] = {}
        for f, s in split_of.items():
            groups.setdefault(str(s), []).append(f)
        return groups
    if len(loose) == len(files):
        return {"train": files}  # no file names a split: they are one dataset, carved into train/val/test
    unnamed = [str(f.relative_to(root)) for f in loose[:4]]
    raise AuxLossError(
        f"Some parquet files under {root.absolute()} name a split and some do not ({unnamed} name none of "
        f"{sorted(known)}). Name every file after its split (train-00000.parquet, test.parquet) or "
        "put each split in a folder of its name (train/, test/)."
    )


def _open(root: str | Path, cache_dir: str | None, extra_names: Sequence[str]) -> tuple[dict[str, Any], str]:
    """The splits at ``root`` (split name -> ``datasets.Dataset``) and how they were stored."""
    path = Path(root).expanduser()
    if not path.exists():
        raise _missing_root(root)
    if path.is_dir() and ((path / _DATASET_DICT_FILE).is_file() or (path / _DATASET_STATE_FILE).is_file()):
        datasets = _datasets()
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise AuxLossError(
                f"Could not load the saved Hugging Face dataset at {path.absolute()} ({type(exc).__name__}: {exc}); "
                "it is damaged or was written by another datasets version. Save it again with save_to_disk."
            ) from None
        found = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return found, "save_to_disk"
    if (path.is_file() and path.suffix.lower() != _PARQUET) or (path.is_dir() and not any(path.rglob(f"*{_PARQUET}"))):
        raise _neither(path)
    known = {name for names in HF_SPLIT_NAMES.values() for name in names} | {n.lower() for n in extra_names}
    groups = {"train": [path]} if path.is_file() else _parquet_groups(path, known)
    datasets = _datasets()
    found = {}
    for split, files in groups.items():
        try:
            # Converted once into Arrow files under cache_dir (datasets' cache by default), then memory-mapped.
            found[split] = datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=cache_dir)
        except (OSError, ValueError) as exc:
            raise AuxLossError(
                f"Could not read the parquet file(s) {[str(f) for f in files][:3]} ({type(exc).__name__}: {exc}); "
                "they are damaged or not parquet."
            ) from None
    return found, "parquet"


def _choose(available: Sequence[str], splits: Mapping[str, str] | None, where: str) -> dict[str, str | None]:
    """auxloss split -> the Hugging Face split that fills it (``None``: carved from train)."""
    given = dict(splits or {})
    unknown = sorted(set(given) - set(SPLITS))
    if unknown:
        raise AuxLossError(f"splits names {unknown}; its keys are auxloss's splits {list(SPLITS)}, each mapped to a "
                           f"split of the data ({sorted(available)} in {where}).")
    chosen: dict[str, str | None] = {}
    for split in SPLITS:
        if split in given:
            name = str(given[split])
            if name not in available:
                hint = close_matches(name, available)
                raise AuxLossError(
                    f"splits maps {split!r} to {name!r}, but {where} has the splits {sorted(available)}"
                    + (f"; did you mean {hint[0]!r}?" if hint else ".")
                )
            chosen[split] = name
        else:
            chosen[split] = next((n for n in HF_SPLIT_NAMES[split] if n in available), None)
    if chosen["train"] is None:
        raise AuxLossError(f"{where} has the splits {sorted(available)} and none is named 'train'; say which one to "
                           "train on with splits: {train: NAME} (data.params.splits in a config).")
    used = [n for n in chosen.values() if n is not None]
    if len(used) != len(set(used)):
        raise AuxLossError(f"splits maps two of train/val/test to one split ({chosen}); each needs its own, or leave "
                           "val/test out to carve them from train.")
    return chosen


# ----------------------------------------------------------------------------------------------------------
# Columns
# ----------------------------------------------------------------------------------------------------------


class _HFColumn(LazyColumn):
    """A column of a memory-mapped ``datasets.Dataset`` read one row at a time; ``rows`` maps items to rows."""

    def __init__(self, data: Any, column: str, rows: np.ndarray | None, where: str) -> None:
        self.data, self.column, self.where = data, column, where
        self.rows = np.arange(len(data), dtype=np.int64) if rows is None else rows

    def _row(self, index: int) -> Any:
        return self.data[int(self.rows[index])][self.column]

    def take(self, indices: Tensor) -> _HFColumn:
        clone = copy.copy(self)  # the same memory-mapped data, other rows
        clone.rows = self.rows[indices.numpy()]
        return clone

    def __len__(self) -> int:
        return len(self.rows)


class HFImages(_HFColumn):
    """An ``Image`` column: each PIL image converted as an image folder's files are (RGB or ``L``, resized
    bilinearly to (H, W), float32 ``pixel / 255``) when its item is read."""

    def __init__(self, data: Any, column: str, height: int, width: int, grayscale: bool, where: str,
                 rows: np.ndarray | None = None) -> None:
        super().__init__(data.select_columns([column]), column, rows, where)
        self.height, self.width, self.grayscale = int(height), int(width), bool(grayscale)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), 1 if self.grayscale else 3, self.height, self.width))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def load(self, index: int) -> Tensor:
        image = self._row(index)
        if image is None:
            raise AuxLossError(f"row {int(self.rows[index])} of column {self.column!r} in {self.where} has no image; "
                               "drop such rows (Dataset.filter) and save the dataset again.")
        return image_to_tensor(image, self.height, self.width, self.grayscale)

    def __repr__(self) -> str:
        return f"HFImages({self.column!r}, {tuple(self.shape)})"


class HFArrays(_HFColumn):
    """A list or array column (``List``, ``Array2D``, ...) of numbers, one tensor per row, read when its item is:
    floats as float32, integers and booleans as int64. Every row must have the first row's shape."""

    def __init__(self, data: Any, column: str, item_shape: Sequence[int], dtype: torch.dtype, where: str,
                 rows: np.ndarray | None = None) -> None:
        super().__init__(data.select_columns([column]).with_format("numpy"), column, rows, where)
        self.item_shape, self._dtype = tuple(int(d) for d in item_shape), dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.item_shape))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def load(self, index: int) -> Tensor:
        value = np.asarray(self._row(index))
        if value.shape != self.item_shape or value.dtype.kind not in "biuf":
            raise AuxLossError(
                f"row {int(self.rows[index])} of column {self.column!r} in {self.where} holds {value.dtype} of shape "
                f"{value.shape}, the first row {self.item_shape}; a batch needs one shape per column. Pad or "
                "truncate the rows (Dataset.map) and save the dataset again."
            )
        return torch.from_numpy(np.ascontiguousarray(value)).to(self._dtype)

    def __repr__(self) -> str:
        return f"HFArrays({self.column!r}, {tuple(self.shape)}, {self._dtype})"


def _feature_classes(datasets: ModuleType, names: Sequence[str]) -> tuple[type, ...]:
    # datasets 4 renamed Sequence to List; look each name up so that every supported version works.
    return tuple(c for c in (getattr(datasets, n, None) for n in names) if isinstance(c, type))


def _resolve_columns(ds: Any, columns: Mapping[str, str] | Sequence[str] | None, where: str,
                     datasets: ModuleType) -> dict[str, str]:
    """batch key -> column: as given (a list keeps each column's name), or the default input/target pair."""
    features = ds.features
    if columns is None:
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        mapping = {"input": images[0] if len(images) == 1 else "image",
                   "target": labels[0] if len(labels) == 1 else "label"}
    elif isinstance(columns, Mapping):
        mapping = {str(k): v for k, v in columns.items()}
    elif isinstance(columns, Sequence) and not isinstance(columns, str):
        mapping = {str(c): c for c in columns}
    else:
        raise AuxLossError(f"columns must map batch keys to columns, e.g. {{input: image, target: label}}, or list "
                           f"columns; got {columns!r}.")
    bad = {k: v for k, v in mapping.items() if not isinstance(v, str)}
    if bad or not mapping:
        raise AuxLossError(f"columns must map batch keys to column names (strings); got {columns!r}.")
    missing = [c for c in mapping.values() if c not in features]
    if missing:
        hint = close_matches(missing[0], list(features))
        raise AuxLossError(
            f"column(s) {missing} are not in {where}; its columns are {list(features)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + ". Map batch keys to columns with columns: {input: IMAGE_COLUMN, target: LABEL_COLUMN} "
            "(data.params.columns in a config)."
        )
    return mapping


# numpy kinds that are not numbers, in words for the error.
_NOT_NUMBERS = {"U": "text", "S": "bytes", "O": "text, bytes or ragged lists", "M": "dates", "m": "durations"}


def _tensor_dtype(kind: str, what: str) -> torch.dtype:
    if kind in "biu":
        return torch.int64
    if kind == "f":
        return torch.float32
    raise AuxLossError(f"{what} holds {_NOT_NUMBERS.get(kind, kind)}, not numbers, and a batch holds tensors. "
                       "Convert or tokenize it first (Dataset.map) and save the dataset again, or leave it out of "
                       "columns.")


def _convert(ds: Any, column: str, where: str, image_size: Any, grayscale: bool | None,
             like: Any, datasets: ModuleType) -> tuple[Tensor | LazyColumn, list[str] | None]:
    """One column as a tensor (one number per row) or a lazy column (images, arrays), with its class names."""
    feature = ds.features[column]
    what = f"column {column!r} ({feature}) of {where}"
    nulls = ds.data.column(column).null_count
    if nulls:
        raise AuxLossError(f"{what} has {nulls} missing value(s) (None); drop or fill those rows "
                           "(Dataset.filter / Dataset.map) and save the dataset again.")
    if isinstance(feature, datasets.Image):
        if isinstance(like, HFImages):  # val/test take train's size and channels
            return HFImages(ds, column, like.height, like.width, like.grayscale, where), None
        first = ds.select_columns([column])[0][column]
        height, width = (first.height, first.width) if image_size is None else _image_size_hw(image_size)
        gray = first.mode in _ONE_CHANNEL_MODES if grayscale is None else bool(grayscale)
        return HFImages(ds, column, height, width, gray, where), None
    if isinstance(feature, datasets.ClassLabel):
        values = np.asarray(ds.with_format("numpy", columns=[column])[:][column], dtype=np.int64)
        unlabelled = int((values < 0).sum())
        if unlabelled:
            raise AuxLossError(
                f"{what} has {unlabelled} unlabelled row(s) (label -1, how Hugging Face marks a test split without "
                "labels). Evaluate on a labelled split, e.g. splits: {test: validation}, or leave test out to carve "
                "it from train."
            )
        return torch.from_numpy(values), list(feature.names)
    if isinstance(feature, datasets.Value):
        values = np.asarray(ds.with_format("numpy", columns=[column])[:][column])
        dtype = _tensor_dtype(values.dtype.kind, what)
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype), None
    if isinstance(feature, _feature_classes(datasets, ("List", "LargeList", "Sequence", "Array2D", "Array3D",
                                                        "Array4D", "Array5D"))):
        first = np.asarray(ds.select_columns([column]).with_format("numpy")[0][column])
        return HFArrays(ds, column, first.shape, _tensor_dtype(first.dtype.kind, what), where), None
    raise AuxLossError(f"{what} is of a kind auxloss cannot turn into tensors (it reads Image, ClassLabel, numeric "
                       "Value, List and ArrayND columns); leave it out of columns.")


def _to_dict_dataset(ds: Any, split: str, columns: Any, image_size: Any, grayscale: bool | None,
                     info: Mapping[str, Any], like: DictDataset | None = None) -> DictDataset:
    datasets = _datasets()
    where = f"the Hugging Face dataset at {info['root']} (split {split!r})"
    if len(ds) == 0:
        raise AuxLossError(f"{where} has no rows; give a split with data, or map another with splits=.")
    mapping = _resolve_columns(ds, columns, where, datasets)
    tensors: dict[str, Tensor | LazyColumn] = {}
    names: dict[str, list[str]] = {}
    for key, column in mapping.items():
        previous = like.tensors.get(key) if like is not None else None
        tensors[key], class_names = _convert(ds, column, where, image_size, grayscale, previous, datasets)
        if class_names is not None:
            names[key] = class_names
    return DictDataset(tensors, num_classes={k: len(v) for k, v in names.items()}, class_names=names,
                       info={**info, "split": split, "columns": mapping})


# ----------------------------------------------------------------------------------------------------------
# Loader and split builder
# ----------------------------------------------------------------------------------------------------------


def _load(root: str | Path, wanted: Sequence[str], *, columns: Any = None, splits: Mapping[str, str] | None = None,
          image_size: Any = None, grayscale: bool | None = None, cache_dir: str | None = None
          ) -> dict[str, DictDataset | None]:
    """auxloss split -> its DictDataset, for each split in ``wanted`` (``None`` where the data has none)."""
    if splits is not None and not isinstance(splits, Mapping):
        raise AuxLossError(f"splits must map auxloss splits to the data's, e.g. {{val: validation}}; got {splits!r}.")
    found, stored = _open(root, cache_dir, [str(v) for v in (splits or {}).values()])
    info = {"source": "hf", "root": str(Path(root).expanduser().absolute()), "stored": stored}
    chosen = _choose(list(found), splits, info["root"])
    out: dict[str, DictDataset | None] = {}
    train: DictDataset | None = None
    for split in ("train", *(s for s in SPLITS if s != "train")):  # train first: val/test take its image size
        name = chosen[split]
        if (split not in wanted and split != "train") or name is None:
            out[split] = None
            continue
        out[split] = _to_dict_dataset(found[name], name, columns, image_size, grayscale, info, like=train)
        if train is None:
            train = out[split]
    return {s: out[s] for s in wanted}


def load_hf_dataset(
    root: str | Path,
    split: str = "train",
    *,
    columns: Mapping[str, str] | Sequence[str] | None = None,
    splits: Mapping[str, str] | None = None,
    image_size: int | Sequence[int] | None = None,
    grayscale: bool | None = None,
    cache_dir: str | None = None,
) -> DictDataset:
    """One split of a Hugging Face dataset on disk, as a :class:`DictDataset` (needs ``pip install auxloss[hf]``).

    ``root`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, one ``.parquet``
    file, or a folder of them (grouped into splits by name: ``train-00000-of-00002.parquet``, ``test.parquet``,
    ``train/0000.parquet``; files that name no split are all ``train``). Never a Hub name: nothing is downloaded.

    Args:
        root: the local path.
        split: ``"train"``, ``"val"`` or ``"test"``: auxloss's split, filled by the data's ``train``,
            ``validation`` (or ``val``, ``valid``, ``dev``) and ``test`` splits unless ``splits`` says otherwise.
        columns: batch key -> column, e.g. ``{"input": "image", "target": "label"}``; a list keeps each column's
            name. Default: ``input`` = the only ``Image`` column (else ``image``), ``target`` = the only
            ``ClassLabel`` column (else ``label``).
        splits: auxloss split -> the data's split, e.g. ``{"val": "validation_matched"}``.
        image_size: (height, width) every image is resized to; default the first training image's size.
        grayscale: load images as one channel; default: when the first training image has one.
        cache_dir: where parquet files are converted to Arrow once (default: the ``datasets`` cache).

    Columns: an ``Image`` becomes float32 ``(3 or 1, H, W)`` = pixel / 255, converted and resized as an image
    folder's files are, when its item is read; a ``ClassLabel`` an int64 label (its class count and names
    recorded); a number int64 (integers, booleans) or float32; a ``List``/``ArrayND`` of numbers a tensor per row,
    read when its item is.

    Raises:
        AuxLossError: ``root`` missing, or a Hub-like name; neither a saved dataset nor parquet; the split absent;
            a missing column (listing those present); a column that holds text, missing values, or unlabelled
            rows; rows of unequal shape (when read). MissingExtraError: ``datasets`` is not installed.
    """
    if split not in SPLITS:
        hint = close_matches(str(split), SPLITS)
        raise AuxLossError(f"split must be one of {list(SPLITS)}; got {split!r}"
                           + (f"; did you mean {hint[0]!r}?" if hint else "."))
    loaded = _load(root, [split], columns=columns, splits=splits, image_size=image_size, grayscale=grayscale,
                   cache_dir=cache_dir)[split]
    if loaded is None:
        raise AuxLossError(
            f"the Hugging Face dataset at {Path(root).absolute()} has no {split} split (it looked for "
            f"{list(HF_SPLIT_NAMES[split])}); name one with splits={{{split!r}: NAME}}, or let data.name 'hf' carve "
            "it from train."
        )
    return loaded


def hf_splits(request: DataRequest) -> dict[str, DictDataset]:
    """The registry's builder: train from the data's train split, val and test from its own where it has them,
    else carved from train by the seeded permutation every source uses (disjoint from the training items)."""
    if not request.root:
        raise AuxLossError("data.name 'hf' needs data.root: " + _FORMAT + ".")
    loaded = _load(request.root, SPLITS, **request.params)  # the registry has checked the params' names
    train = loaded["train"]
    assert train is not None  # _choose insists on a training split
    return split_dataset(train, loaded["test"], request.n_train, request.n_val, request.n_test, request.seed, "hf",
                         val=loaded["val"])
