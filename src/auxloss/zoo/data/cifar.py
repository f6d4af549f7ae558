"""CIFAR-10 and CIFAR-100 from their canonical python-pickle batch folders, read without unpickling code.

The python versions of CIFAR are pickles (``cifar-10-batches-py``: ``data_batch_1`` ... ``data_batch_5``,
``test_batch``, ``batches.meta``; ``cifar-100-python``: ``train``, ``test``, ``meta``). A pickle can run any
code when loaded, so plain ``pickle.load`` is never used here: :class:`_RestrictedUnpickler` resolves only the
three names a numpy array in those files refers to (``_reconstruct``, ``ndarray`` and ``dtype``), and even those
resolve to inert stand-ins that record their arguments. The arrays are then rebuilt here with
``numpy.frombuffer`` from plain numeric dtypes. Anything else in a file is refused with an error.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auxloss.errors import AuxLossError
from auxloss.zoo.data.common import DataRequest, DictDataset, UInt8Images, split_dataset

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_VEHICLES",
    "cifar10_splits",
    "cifar100_splits",
    "load_cifar10",
    "load_cifar100",
    "read_cifar_pickle",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# The four machine classes: the auxiliary "vehicle" label (1) against the six animals (0).
CIFAR10_VEHICLES: frozenset[int] = frozenset({0, 1, 8, 9})

_SIDE = 32
_ROW = 3 * _SIDE * _SIDE  # one image per row: 1024 red, then 1024 green, then 1024 blue bytes, each row-major

# ----------------------------------------------------------------------------------------------------------
# The restricted unpickler
# ----------------------------------------------------------------------------------------------------------

# Plain numeric dtypes only: an object dtype would make numpy read bytes from the file as pointers.
_NUMERIC_CODES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"})


class _NdarrayName:
    """What the file's ``numpy.ndarray`` resolves to: a marker, never callable, so it cannot be invoked."""


_NDARRAY = _NdarrayName()


class _DtypeStub:
    """Records ``numpy.dtype(code, align, copy)`` and its pickled state; checked when the array is rebuilt."""

    def __init__(self, code: Any, align: Any = False, copy: Any = False) -> None:
        self.code = code.decode("ascii", "replace") if isinstance(code, bytes) else code
        self.state: tuple[Any, ...] = ()

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, tuple) else (state,)

    def to_numpy(self, path: Path) -> np.dtype:
        code, state = self.code, self.state
        endian = state[1] if len(state) > 1 else "|"
        endian = endian.decode("ascii", "replace") if isinstance(endian, bytes) else endian
        # State (version, byte order, subarray, names, fields, ...): a plain dtype has no subarray or fields.
        structured = len(state) > 4 and any(s is not None for s in state[2:5])
        if not isinstance(code, str) or code not in _NUMERIC_CODES or structured or endian not in "<>|=":
            raise AuxLossError(
                f"{path} holds an array of dtype {code!r} (byte order {endian!r}, structured={structured}); a "
                "CIFAR batch holds plain uint8 pixels and integer labels only. The file is not a CIFAR batch."
            )
        return np.dtype(code).newbyteorder(endian if endian in "<>" else "=")


class _ArrayStub:
    """Records ``numpy.core.multiarray._reconstruct(ndarray, ...)`` and the array state set on it."""

    def __init__(self) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_numpy(self, path: Path) -> np.ndarray:
        state = self.state
        bad = AuxLossError(
            f"{path} holds a numpy array whose pickled state is not the plain (version, shape, dtype, "
            "fortran_order, bytes) of a CIFAR batch; the file is damaged or not a CIFAR batch."
        )
        if not isinstance(state, tuple) or len(state) != 5:
            raise bad
        _, shape, dtype, fortran, raw = state
        if (not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(dtype, _DtypeStub) or not isinstance(raw, (bytes, bytearray))):
            raise bad
        dt = dtype.to_numpy(path)
        count = math.prod(shape)
        if len(raw) != count * dt.itemsize:
            raise AuxLossError(
                f"{path} holds an array of shape {shape} and dtype {dt} ({count * dt.itemsize} bytes) with "
                f"{len(raw)} bytes of data; the file is truncated or damaged."
            )
        flat = np.frombuffer(raw, dtype=dt, count=count)
        array = flat.reshape(shape, order="F" if fortran else "C")
        return np.array(array, dtype=dt.newbyteorder("="), order="C")  # an owned, writable, native copy


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if subtype is not _NDARRAY:
        raise AuxLossError(f"_reconstruct was asked for {subtype!r}; a CIFAR batch only rebuilds numpy arrays.")
    return _ArrayStub()


# (module, name) -> what it resolves to. numpy 2 writes "numpy._core"; the CIFAR files say "numpy.core".
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_ALLOWED` and refuses every other global or persistent id."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        # encoding="bytes": the files were written by Python 2, whose str keys become bytes (b"data").
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise AuxLossError(
                f"{self.path} asks to load {module}.{name}, which a CIFAR batch never does; refusing to unpickle "
                "it (a pickle can run code). Use the original files from the CIFAR site's python version."
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise AuxLossError(f"{self.path} uses pickle persistent ids, which a CIFAR batch never does; refusing it.")


def _materialise(value: Any, path: Path) -> Any:
    if isinstance(value, _ArrayStub):
        return value.to_numpy(path)
    if isinstance(value, dict):
        return {k: _materialise(v, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialise(v, path) for v in value]
    if isinstance(value, tuple):
        return tuple(_materialise(v, path) for v in value)
    if isinstance(value, (_DtypeStub, _NdarrayName)):
        raise AuxLossError(f"{path} holds a bare numpy dtype or class object; it is not a CIFAR batch.")
    return value


def read_cifar_pickle(path: str | Path) -> dict[bytes, Any]:
    """Read one CIFAR python batch (or meta) file without running code: a dict with bytes keys.

    numpy arrays come back as native-endian numpy arrays with a plain numeric dtype; strings as ``bytes``.

    Raises:
        AuxLossError: the file is missing; it refers to anything other than a numpy array (such a file is
            refused before anything in it runs); it is damaged or not a dict.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            loaded = _RestrictedUnpickler(f, path).load()  # type: ignore[arg-type]
    except FileNotFoundError:
        raise AuxLossError(f"CIFAR file {path.absolute()} does not exist; check the folder.") from None
    except AuxLossError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError) as exc:
        raise AuxLossError(
            f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc}); re-extract it from the "
            "python-version archive."
        ) from None
    result = _materialise(loaded, path)
    if not isinstance(result, dict):
        raise AuxLossError(f"{path} holds a {type(result).__name__}, not the dict of a CIFAR batch.")
    return result


# ----------------------------------------------------------------------------------------------------------
# The batch folders
# ----------------------------------------------------------------------------------------------------------


def _folder(root: str | Path, name: str, marker: str) -> Path:
    """``root`` itself when it holds ``marker``, else ``root/name`` (the archive's folder) when that does."""
    root = Path(root)
    for d in (root, root / name):
        if (d / marker).is_file():
            return d
    what = "does not exist" if not root.exists() else f"holds no {marker}"
    raise AuxLossError(
        f"CIFAR folder {root.absolute()} {what} (looked for {marker} in it and in {name}/). Nothing is "
        f"downloaded: extract the python version of the dataset (the archive with the {name} folder) and give "
        "that folder, or the one holding it, as root= (data.root)."
    )


def _batch(path: Path, label_keys: Sequence[bytes]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The uint8 (n, 3072) pixels and each requested label list of one batch file, checked."""
    batch = read_cifar_pickle(path)
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise AuxLossError(
            f"{path} should hold b'data': uint8 of shape (n, {_ROW}) (32x32 RGB images, one per row); it holds "
            f"{desc}. The file is not a CIFAR batch."
        )
    labels = []
    for key in label_keys:
        raw = batch.get(key)
        try:
            y = np.asarray(raw, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            y = np.empty(0)
        if raw is None or y.shape != (len(data),):
            raise AuxLossError(
                f"{path} should hold {key!r}: one integer label per image ({len(data)}); it holds "
                f"{type(raw).__name__}{'' if raw is None else f' of shape {y.shape}'}. The file is damaged "
                "or from a different CIFAR version."
            )
        labels.append(y)
    return data, labels


def _check_range(y: np.ndarray, k: int, what: str, paths: Sequence[Path]) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
        raise AuxLossError(
            f"{what} labels in {', '.join(p.name for p in paths)} span {int(y.min())}-{int(y.max())}, outside "
            f"0-{k - 1}; the files are not this CIFAR version."
        )


def _names(meta_path: Path, key: bytes, k: int) -> list[str] | None:
    if not meta_path.is_file():
        return None
    names = read_cifar_pickle(meta_path).get(key)
    if not isinstance(names, list) or len(names) != k or not all(isinstance(n, (bytes, str)) for n in names):
        raise AuxLossError(f"{meta_path} should hold {key!r}: a list of {k} names; the file is damaged.")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise AuxLossError(f"CIFAR split must be 'train' or 'test'; got {split!r}.")
    return split


def _images(data: np.ndarray) -> UInt8Images:
    return UInt8Images(torch.from_numpy(data.reshape(len(data), 3, _SIDE, _SIDE)))


def load_cifar10(root: str | Path, split: str = "train") -> DictDataset:
    """CIFAR-10 (50,000 train / 10,000 test 32x32 colour images, 10 classes) from ``cifar-10-batches-py``.

    ``root`` is that folder or the one holding it. The training split is ``data_batch_1`` to ``data_batch_5``
    in order; the test split is ``test_batch``; class names come from ``batches.meta`` (the standard ten,
    :data:`CIFAR10_CLASSES`, when it is absent). The files are read with a restricted unpickler that runs no
    code (see :func:`read_cifar_pickle`).

    Keys: ``"input"`` float32 ``(3, 32, 32)`` = pixel / 255, kept as uint8 until read; ``"target"`` the class;
    ``"vehicle"`` 1 for the machines (airplane, automobile, ship, truck, :data:`CIFAR10_VEHICLES`), 0 for the
    animals: an auxiliary label.

    Raises:
        AuxLossError: the folder or a batch file is missing; a file refers to anything but numpy arrays, or is
            damaged; labels outside 0-9.
    """
    split = _check_split(split)
    folder = _folder(root, "cifar-10-batches-py", "test_batch")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    paths = [folder / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise AuxLossError(
            f"CIFAR-10 folder {folder.absolute()} lacks {missing}; the {split} split needs {names}. Re-extract "
            "the python-version archive."
        )
    batches = [_batch(p, [b"labels"]) for p in paths]
    data = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1][0] for b in batches])
    _check_range(y, 10, "CIFAR-10", paths)
    classes = _names(folder / "batches.meta", b"label_names", 10) or list(CIFAR10_CLASSES)
    vehicle = np.isin(y, sorted(CIFAR10_VEHICLES)).astype(np.int64)
    return DictDataset(
        {"input": _images(data), "target": y, "vehicle": vehicle},
        num_classes={"target": 10, "vehicle": 2},
        class_names={"target": classes, "vehicle": ["animal", "vehicle"]},
        info={"source": "cifar10", "split": split, "root": str(folder.absolute())},
    )


def load_cifar100(root: str | Path, split: str = "train") -> DictDataset:
    """CIFAR-100 (50,000 train / 10,000 test 32x32 colour images) from ``cifar-100-python``.

    ``root`` is that folder or the one holding it; the splits are the files ``train`` and ``test``, the class
    names come from ``meta`` when it is there. Read with the restricted unpickler (:func:`read_cifar_pickle`).

    Keys: ``"input"`` float32 ``(3, 32, 32)`` = pixel / 255, kept as uint8 until read; ``"target"`` the fine
    class (100); ``"coarse"`` its superclass (20), an auxiliary label.

    Raises:
        AuxLossError: the folder or file is missing; a file refers to anything but numpy arrays, or is damaged;
            labels outside 0-99 / 0-19.
    """
    split = _check_split(split)
    folder = _folder(root, "cifar-100-python", "test")
    path = folder / split
    if not path.is_file():
        raise AuxLossError(f"CIFAR-100 folder {folder.absolute()} has no {split!r} file; re-extract the archive.")
    data, (fine, coarse) = _batch(path, [b"fine_labels", b"coarse_labels"])
    _check_range(fine, 100, "CIFAR-100 fine", [path])
    _check_range(coarse, 20, "CIFAR-100 coarse", [path])
    names: dict[str, Sequence[str]] = {}
    for key, meta_key, k in (("target", b"fine_label_names", 100), ("coarse", b"coarse_label_names", 20)):
        found = _names(folder / "meta", meta_key, k)
        if found is not None:
            names[key] = found
    return DictDataset(
        {"input": _images(data), "target": fine, "coarse": coarse},
        num_classes={"target": 100, "coarse": 20},
        class_names=names,
        info={"source": "cifar100", "split": split, "root": str(folder.absolute())},
    )


def _splits(loader: Any, name: str, request: DataRequest) -> dict[str, DictDataset]:
    if not request.root:
        raise AuxLossError(f"data.name {name!r} needs data.root: the folder holding the python-version batches.")
    train = loader(request.root, "train", **request.params)
    test = loader(request.root, "test", **request.params)
    return split_dataset(train, test, request.n_train, request.n_val, request.n_test, request.seed, name)


def cifar10_splits(request: DataRequest) -> dict[str, DictDataset]:
    """The registry's builder: train/val from the five training batches, test from ``test_batch``."""
    return _splits(load_cifar10, "cifar10", request)


def cifar100_splits(request: DataRequest) -> dict[str, DictDataset]:
    """The registry's builder: train/val from ``train``, test from ``test``."""
    return _splits(load_cifar100, "cifar100", request)
