"""IDX files (the MNIST format): one reader for MNIST, Fashion-MNIST, KMNIST and EMNIST folders on disk.

Nothing is downloaded. :func:`read_idx` decodes one file; :func:`load_idx_dataset` finds the images and labels of
a split under a folder, in the standard names (``train-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, ...) or
EMNIST's (``emnist-<split>-train-images-idx3-ubyte``), raw or gzipped; :func:`load_fashion_mnist` is that reader
with Fashion-MNIST's class names and its garment group as an auxiliary label.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auxloss.errors import AuxLossError, close_matches
from auxloss.zoo.data.common import DataRequest, DictDataset, split_dataset

__all__ = [
    "EMNIST_SPLITS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_ROOT",
    "FASHION_MNIST_GROUPS",
    "FASHION_MNIST_GROUP_OF_LABEL",
    "fashion_mnist_available",
    "fashion_mnist_splits",
    "idx_splits",
    "load_fashion_mnist",
    "load_idx_dataset",
    "read_idx",
]

# IDX type code -> big-endian numpy dtype (the format's numbers are big-endian).
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed, into a native-endian numpy array.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then each dimension as a big-endian uint32. Compression is
    detected from the gzip magic bytes, not from the file name.

    Raises:
        AuxLossError: the file is missing, or corrupt (bad magic number, bad gzip stream, truncated or with
            trailing bytes); the message names the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AuxLossError(f"IDX file {path.absolute()} does not exist; check the path.") from None
    except OSError as exc:
        raise AuxLossError(f"Could not read IDX file {path.absolute()}: {exc}.") from None
    fix = "Re-download or re-extract it."
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise AuxLossError(
                f"IDX file {path} is a corrupt or truncated gzip file ({exc}). {fix}"
            ) from None
    if len(raw) < 4:
        raise AuxLossError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the header. {fix}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise AuxLossError(
            f"{path} is not an IDX file: bad magic number 0x{raw[:4].hex()} (expected 0x0000 followed by a "
            f"type code in {[hex(c) for c in _IDX_DTYPES]} and the number of dimensions). {fix}"
        )
    ndim = raw[3]
    if ndim == 0:
        raise AuxLossError(f"IDX file {path} declares 0 dimensions; it is corrupt. {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise AuxLossError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes). {fix}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise AuxLossError(
            f"IDX file {path} is {what}: dims {dims} of {dtype.name} need {expected} bytes, the file has "
            f"{len(raw)}. {fix}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    # Copy into native byte order: callers get a writable array that torch.from_numpy accepts.
    return data.astype(dtype.newbyteorder("="), copy=True)



# ----------------------------------------------------------------------------------------------------------
# Finding and checking a split's pair of files
# ----------------------------------------------------------------------------------------------------------

# The standard file names start with the split's prefix: t10k is the MNIST family's name for the test set.
_PREFIX = {"train": "train", "test": "t10k"}

# EMNIST split -> number of classes (Cohen et al. 2017). "letters" labels run 1-26 in the files.
EMNIST_SPLITS: dict[str, int] = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10,
                                 "mnist": 10}
_EMNIST_FIRST_LABEL = {"letters": 1}
_EMNIST_NAME = re.compile(r"^emnist-([a-z]+)-(train|test)-images-idx3-ubyte(\.gz)?$")


@dataclass(frozen=True)
class _Source:
    """How one use of the reader names itself in errors, where it looks, and how to get its files."""

    title: str
    subdirs: tuple[str, ...]
    how_to_get: str


def _file_names(split: str, kind: str, emnist_split: str | None) -> list[str]:
    ndim = 3 if kind == "images" else 1
    if emnist_split is not None:
        return [f"emnist-{emnist_split}-{split}-{kind}-idx{ndim}-ubyte"]
    prefix = _PREFIX[split]
    # Some MNIST mirrors extract to "train-images.idx3-ubyte" (a dot instead of the dash).
    return [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]


def _candidates(root: Path, names: Sequence[str], subdirs: Sequence[str]) -> list[Path]:
    """Where one file may be: each name, raw or gzipped, in root then in each sub-folder, in that order."""
    dirs = [root, *(root / d for d in subdirs)]
    return [d / (name + ext) for d in dirs for name in names for ext in ("", ".gz")]


def _find(root: Path, names: Sequence[str], subdirs: Sequence[str]) -> Path | None:
    for p in _candidates(root, names, subdirs):
        if p.is_file():
            return p
    return None


def _check_split(split: str, title: str) -> str:
    if split not in _PREFIX:
        hint = close_matches(str(split), _PREFIX)
        raise AuxLossError(
            f"{title} split must be 'train' or 'test'; got {split!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else ".")
        )
    return split


def _emnist_splits_present(root: Path, split: str, subdirs: Sequence[str]) -> list[str]:
    found = set()
    for d in [root, *(root / s for s in subdirs)]:
        if d.is_dir():
            for p in d.iterdir():
                m = _EMNIST_NAME.match(p.name)
                if m and m.group(2) == split:
                    found.add(m.group(1))
    return sorted(found)


def _locate(root: Path, split: str, emnist_split: str | None, source: _Source) -> tuple[Path, Path]:
    """The images and labels files of ``split``, or an error naming what was looked for where."""
    names = {kind: _file_names(split, kind, emnist_split) for kind in ("images", "labels")}
    if not root.is_dir():
        raise AuxLossError(
            f"{source.title} folder {root.absolute()} does not exist (looked for {names['images'][0]}[.gz] "
            f"and {names['labels'][0]}[.gz] there). {source.how_to_get}"
        )
    found = {kind: _find(root, names[kind], source.subdirs) for kind in names}
    missing = [kind for kind, p in found.items() if p is None]
    if missing:
        where = ", ".join(f"{d}/" for d in source.subdirs)
        looked = "; ".join(
            f"{kind}: "
            + ", ".join(str(p) for p in _candidates(root.absolute(), names[kind], source.subdirs)[:2])
            + f" (also .gz, and under {where})"
            for kind in missing
        )
        raise AuxLossError(
            f"{source.title} {split} {' and '.join(missing)} not found. Looked for {looked}. "
            f"{source.how_to_get}"
        )
    images_path, labels_path = found["images"], found["labels"]
    assert images_path is not None and labels_path is not None
    return images_path, labels_path


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Both files decoded and checked against each other: uint8 images (n, H, W), n integer labels."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise AuxLossError(
            f"{images_path} should hold uint8 images of shape (n, height, width); it holds {images.dtype} "
            f"of shape {images.shape}. Check that images and labels files are not swapped."
        )
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
        raise AuxLossError(
            f"{labels_path} should hold one label per image, as integers ({len(images)} in {images_path.name}); "
            f"it holds {labels.dtype} of shape {labels.shape}. The two files come from different splits or one "
            "is damaged."
        )
    return images, labels


def _labels_to_targets(labels: np.ndarray, labels_path: Path, first: int, num_classes: int | None,
                       title: str) -> tuple[np.ndarray, int]:
    """int64 targets ``label - first`` in ``[0, num_classes)``; the class count is inferred when not given."""
    y = labels.astype(np.int64) - first
    if num_classes is None:
        num_classes = int(y.max()) + 1 if len(y) else 1
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise AuxLossError(
            f"{labels_path} has labels outside {first}-{first + num_classes - 1} (min {int(labels.min())}, max "
            f"{int(labels.max())}); it is not a {title} labels file with {num_classes} classes. Check the "
            "folder, or the num_classes / emnist_split you gave."
        )
    return y, num_classes


def _emnist_class_names(images_path: Path, emnist_split: str, num_classes: int, first: int) -> list[str] | None:
    """Class names from ``emnist-<split>-mapping.txt`` next to the images (``label code [code ...]`` lines)."""
    path = images_path.parent / f"emnist-{emnist_split}-mapping.txt"
    if not path.is_file():
        return None
    names: dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            label, *codes = (int(f) for f in line.split())
            names[label - first] = "/".join(chr(c) for c in codes)
        except (ValueError, OverflowError):
            raise AuxLossError(
                f"{path} line {number} is {line!r}; each line should be a label and character codes, e.g. "
                "'10 65'. Fix or delete the mapping file."
            ) from None
    if sorted(names) != list(range(num_classes)) or not all(names.values()):
        raise AuxLossError(
            f"{path} names labels {sorted(names)[:5]}...; EMNIST {emnist_split} has {num_classes} classes, "
            f"{first}-{first + num_classes - 1}. Fix or delete the mapping file."
        )
    return [names[i] for i in range(num_classes)]


def _to_input(images: np.ndarray, flatten: bool) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    return x.reshape(len(x), -1) if flatten else x[:, None]


# ----------------------------------------------------------------------------------------------------------
# Any IDX folder: MNIST, Fashion-MNIST, KMNIST, EMNIST
# ----------------------------------------------------------------------------------------------------------

_IDX_SUBDIRS = ("raw", "gzip", "MNIST/raw", "FashionMNIST/raw", "KMNIST/raw", "EMNIST/raw")
_IDX = _Source(
    "IDX",
    _IDX_SUBDIRS,
    "Nothing is downloaded: give root= (data.root) a folder holding the IDX files of MNIST, Fashion-MNIST or "
    "KMNIST (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) "
    "or EMNIST (emnist-<split>-train-images-idx3-ubyte, ...), each raw or .gz.",
)


def load_idx_dataset(
    root: str | Path,
    split: str = "train",
    *,
    emnist_split: str | None = None,
    flatten: bool = False,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    upright: bool = True,
) -> DictDataset:
    """One split of an MNIST-format dataset (MNIST, Fashion-MNIST, KMNIST, EMNIST) from IDX files on disk.

    Looks in ``root``, then in ``raw/``, ``gzip/`` and torchvision's ``<Name>/raw/`` below it, for the split's
    images and labels: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (MNIST, Fashion-MNIST and KMNIST use
    these names), or EMNIST's ``emnist-<emnist_split>-{train,test}-{images-idx3,labels-idx1}-ubyte``. Each may
    be raw or gzipped (detected from the bytes). A folder holding only one EMNIST split's files needs no
    ``emnist_split``.

    EMNIST stores each image transposed; ``upright=True`` (the default) transposes it back so that characters
    read as in MNIST. EMNIST "letters" labels run 1-26 in the files and become targets 0-25; the class names
    come from ``emnist-<split>-mapping.txt`` when it is next to the images.

    Keys: ``"input"`` float32 ``(1, H, W)`` (``(H*W,)`` with ``flatten=True``) = pixel / 255; ``"target"`` int64.

    Args:
        root: the folder holding the files.
        split: ``"train"`` or ``"test"``.
        emnist_split: one of :data:`EMNIST_SPLITS` to read EMNIST's files.
        flatten: one vector per image instead of a 1-channel image.
        num_classes: the class count, checked against the labels. Default: EMNIST's for its splits, else the
            largest label + 1 (give it when a split may lack the last class).
        class_names: one name per class.
        upright: transpose EMNIST images back to upright (no effect on other layouts).

    Raises:
        AuxLossError: bad split or EMNIST split; folder or files missing (naming what was looked for where);
            several EMNIST splits in one folder and no ``emnist_split``; a corrupt file (bad magic number,
            truncated, wrong size); images and labels that disagree; labels outside the classes.
    """
    split = _check_split(split, "IDX")
    root = Path(root)
    if emnist_split is not None and emnist_split not in EMNIST_SPLITS:
        hint = close_matches(str(emnist_split), EMNIST_SPLITS)
        raise AuxLossError(
            f"emnist_split must be one of {sorted(EMNIST_SPLITS)}; got {emnist_split!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else ".")
        )
    standard = _file_names(split, "images", None)
    if emnist_split is None and root.is_dir() and _find(root, standard, _IDX_SUBDIRS) is None:
        present = _emnist_splits_present(root, split, _IDX_SUBDIRS)
        if len(present) > 1:
            raise AuxLossError(
                f"{root.absolute()} holds the EMNIST {split} files of several splits {present}; choose one with "
                "emnist_split=... (data.params.emnist_split in a config)."
            )
        if present and present[0] in EMNIST_SPLITS:
            emnist_split = present[0]
    images_path, labels_path = _locate(root, split, emnist_split, _IDX)
    images, labels = _read_pair(images_path, labels_path)
    first = 0
    names: Sequence[str] | None = class_names
    if emnist_split is not None:
        first = _EMNIST_FIRST_LABEL.get(emnist_split, 0)
        if num_classes is None:
            num_classes = EMNIST_SPLITS[emnist_split]
        if upright:
            # EMNIST was written column-major: swapping height and width gives MNIST's orientation.
            images = np.ascontiguousarray(images.transpose(0, 2, 1))
        if names is None and num_classes == EMNIST_SPLITS[emnist_split]:
            names = _emnist_class_names(images_path, emnist_split, num_classes, first)
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise AuxLossError(f"num_classes must be a positive integer; got {num_classes!r}.")
    title = f"EMNIST {emnist_split}" if emnist_split is not None else "IDX"
    y, n_classes = _labels_to_targets(labels, labels_path, first, num_classes, title)
    return DictDataset(
        {"input": _to_input(images, flatten), "target": y},
        num_classes={"target": n_classes},
        class_names={"target": names} if names is not None else None,
        info={"source": "idx", "split": split, "root": str(root.absolute()), "images": images_path.name,
              "labels": labels_path.name, "emnist_split": emnist_split, "flatten": flatten},
    )


def idx_splits(request: DataRequest) -> dict[str, DictDataset]:
    """The registry's builder: train/val from the files' train split, test from their test split."""
    if not request.root:
        raise AuxLossError("data.name 'idx' needs data.root: the folder holding the IDX files.")
    params = dict(request.params)
    train = load_idx_dataset(request.root, "train", **params)
    # The test split is checked against the training split's class count, so a test file lacking the last
    # class still gets the same number of classes.
    params.setdefault("num_classes", train.num_classes["target"])
    test = load_idx_dataset(request.root, "test", **params)
    return split_dataset(train, test, request.n_train, request.n_val, request.n_test, request.seed, "idx")


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST: the IDX reader with its class names and garment groups
# ----------------------------------------------------------------------------------------------------------

FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Coarse category of each garment: the auxiliary "group" label.
FASHION_MNIST_GROUPS: tuple[str, ...] = ("top", "bottom", "dress", "footwear", "bag")
FASHION_MNIST_GROUP_OF_LABEL: tuple[int, ...] = (
    0,  # T-shirt/top -> top
    1,  # Trouser -> bottom
    0,  # Pullover -> top
    2,  # Dress -> dress
    0,  # Coat -> top
    3,  # Sandal -> footwear
    0,  # Shirt -> top
    3,  # Sneaker -> footwear
    4,  # Bag -> bag
    3,  # Ankle boot -> footwear
)
_FASHION_HOW_TO_GET = (
    "Install them with `apt-get install dataset-fashion-mnist` (the Debian package puts the IDX files under "
    f"{FASHION_MNIST_DEFAULT_ROOT}/), or pass root= a folder holding the IDX files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
    "each optionally .gz)."
)
_FASHION = _Source("Fashion-MNIST", ("raw", "FashionMNIST/raw"), _FASHION_HOW_TO_GET)


def fashion_mnist_available(root: str | Path = FASHION_MNIST_DEFAULT_ROOT) -> bool:
    """Whether all four Fashion-MNIST IDX files (train and test, images and labels) are under ``root``."""
    root = Path(root)
    return all(
        _find(root, _file_names(split, kind, None), _FASHION.subdirs) is not None
        for split in _PREFIX
        for kind in ("images", "labels")
    )


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_DEFAULT_ROOT,
    split: str = "train",
    *,
    flatten: bool = False,
) -> DictDataset:
    """Fashion-MNIST from IDX files on disk (60,000 train / 10,000 test 28x28 greyscale garments).

    Looks in ``root`` (then ``root/raw`` and ``root/FashionMNIST/raw``, torchvision's layout) for
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each raw or ``.gz``. Nothing is downloaded.

    Keys: ``"input"`` float32 ``(1, 28, 28)`` (``(784,)`` with ``flatten=True``) in [0, 1]; ``"target"`` the
    garment class (10, :data:`FASHION_MNIST_CLASSES`); ``"group"`` its coarse category (5,
    :data:`FASHION_MNIST_GROUPS`): top = {T-shirt/top, Pullover, Coat, Shirt}, bottom = {Trouser},
    dress = {Dress}, footwear = {Sandal, Sneaker, Ankle boot}, bag = {Bag}.

    Raises:
        AuxLossError: bad split; folder or files missing (naming what was looked for where, and how to get
            them); a corrupt file; images and labels that disagree.
    """
    split = _check_split(split, "Fashion-MNIST")
    root = Path(root)
    images_path, labels_path = _locate(root, split, None, _FASHION)
    images, labels = _read_pair(images_path, labels_path)
    y, _ = _labels_to_targets(labels, labels_path, 0, 10, "Fashion-MNIST")
    group = np.asarray(FASHION_MNIST_GROUP_OF_LABEL, dtype=np.int64)[y]
    return DictDataset(
        {"input": _to_input(images, flatten), "target": y, "group": group},
        num_classes={"target": 10, "group": len(FASHION_MNIST_GROUPS)},
        class_names={"target": FASHION_MNIST_CLASSES, "group": FASHION_MNIST_GROUPS},
        info={"source": "fashion-mnist", "split": split, "root": str(root.absolute()), "flatten": flatten},
    )


def fashion_mnist_splits(request: DataRequest) -> dict[str, DictDataset]:
    """The registry's builder: train/val from the official training set, test from the official test set."""
    root = request.root or FASHION_MNIST_DEFAULT_ROOT
    train = load_fashion_mnist(root, split="train", **request.params)
    test = load_fashion_mnist(root, split="test", **request.params)
    return split_dataset(train, test, request.n_train, request.n_val, request.n_test, request.seed,
                         "fashion-mnist")
