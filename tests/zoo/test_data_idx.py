"""The generic IDX reader on the MNIST, Fashion-MNIST, KMNIST and EMNIST file layouts.

Every folder here is written by the test from hand-built bytes (header packed with ``struct``, pixels as
plain ``bytes``), so the expected values are the Python lists the files were made from, not the reader's
own decoding.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from auxloss.errors import AuxLossError
from auxloss.experiment.build import build_data
from auxloss.experiment.config import parse_config
from auxloss.zoo.data import (
    EMNIST_SPLITS,
    FASHION_MNIST_DEFAULT_ROOT,
    fashion_mnist_available,
    load_fashion_mnist,
    load_idx_dataset,
)


def _images_bytes(images: list[list[list[int]]]) -> bytes:
    """IDX3 of unsigned bytes: magic 0x00000803, then n, rows, cols as big-endian uint32, then the pixels."""
    n, h, w = len(images), len(images[0]), len(images[0][0])
    pixels = bytes(p for img in images for row in img for p in row)
    return b"\x00\x00\x08\x03" + struct.pack(">III", n, h, w) + pixels


def _labels_bytes(labels: list[int]) -> bytes:
    """IDX1 of unsigned bytes: magic 0x00000801, then n, then one byte per label."""
    return b"\x00\x00\x08\x01" + struct.pack(">I", len(labels)) + bytes(labels)


def _pictures(n: int, h: int, w: int, seed: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[[int(rng.integers(0, 256)) for _ in range(w)] for _ in range(h)] for _ in range(n)]


def _write(path: Path, raw: bytes, gz: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _mnist_folder(folder: Path, *, gz: bool, n_train: int = 5, n_test: int = 3, dot_names: bool = False,
                  h: int = 4, w: int = 3) -> dict[str, tuple[list, list]]:
    """The four standard files (MNIST, Fashion-MNIST and KMNIST all use these names)."""
    made = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = _pictures(n, h, w, seed=n), [(3 * i + 1) % 10 for i in range(n)]
        sep = "." if dot_names else "-"
        ext = ".gz" if gz else ""
        _write(folder / f"{prefix}-images{sep}idx3-ubyte{ext}", _images_bytes(images), gz)
        _write(folder / f"{prefix}-labels{sep}idx1-ubyte{ext}", _labels_bytes(labels), gz)
        made[split] = (images, labels)
    return made


def _expected_input(images: list) -> torch.Tensor:
    return torch.tensor(images, dtype=torch.float64)[:, None] / 255.0


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("layout", ["flat", "dot-names", "MNIST/raw", "KMNIST/raw", "FashionMNIST/raw", "raw"])
def test_idx_reads_the_standard_layouts(tmp_path: Path, gz: bool, layout: str) -> None:
    sub = {"flat": "", "dot-names": ""}.get(layout, layout)
    made = _mnist_folder(tmp_path / sub if sub else tmp_path, gz=gz, dot_names=layout == "dot-names")
    for split in ("train", "test"):
        ds = load_idx_dataset(tmp_path, split)
        images, labels = made[split]
        x = ds.tensors["input"]
        assert x.dtype == torch.float32 and x.shape == (len(images), 1, 4, 3)
        # pixel / 255 in float32: within one float32 rounding of the exact float64 quotient.
        assert torch.allclose(x.double(), _expected_input(images), rtol=0, atol=1e-7)
        assert ds.tensors["target"].dtype == torch.int64 and ds.tensors["target"].tolist() == labels
        assert ds.num_classes == {"target": max(labels) + 1}


def test_idx_flatten_num_classes_and_class_names(tmp_path: Path) -> None:
    made = _mnist_folder(tmp_path, gz=False)
    ds = load_idx_dataset(tmp_path, "train", flatten=True, num_classes=10, class_names=list("abcdefghij"))
    assert ds.tensors["input"].shape == (5, 12)
    assert torch.allclose(ds.tensors["input"].double(), _expected_input(made["train"][0]).reshape(5, 12),
                          rtol=0, atol=1e-7)
    assert ds.num_classes == {"target": 10} and ds.classes[3] == "d"
    with pytest.raises(AuxLossError, match=r"outside 0-4 .*max 7"):
        load_idx_dataset(tmp_path, "train", num_classes=5)


def test_fashion_mnist_is_the_idx_reader_plus_groups(tmp_path: Path) -> None:
    _mnist_folder(tmp_path, gz=True, h=28, w=28)
    generic = load_idx_dataset(tmp_path, "train", num_classes=10)
    fashion = load_fashion_mnist(tmp_path, "train")
    assert torch.equal(generic.tensors["input"], fashion.tensors["input"])
    assert torch.equal(generic.tensors["target"], fashion.tensors["target"])
    assert set(fashion.tensors) == {"input", "target", "group"}


def _emnist_folder(folder: Path, split: str, labels: dict[str, list[int]], *, gz: bool,
                   mapping: list[str] | None = None) -> dict[str, list]:
    """EMNIST's names; the images are written transposed (column-major), as EMNIST stores them."""
    upright = {}
    for part, ys in labels.items():
        images = _pictures(len(ys), 3, 5, seed=len(ys) + 7)  # 3 x 5: not square, so a transpose shows
        stored = [[[img[r][c] for r in range(3)] for c in range(5)] for img in images]
        ext = ".gz" if gz else ""
        _write(folder / f"emnist-{split}-{part}-images-idx3-ubyte{ext}", _images_bytes(stored), gz)
        _write(folder / f"emnist-{split}-{part}-labels-idx1-ubyte{ext}", _labels_bytes(ys), gz)
        upright[part] = images
    if mapping is not None:
        (folder / f"emnist-{split}-mapping.txt").write_text("\n".join(mapping) + "\n")
    return upright


def test_emnist_balanced_in_its_gzip_folder(tmp_path: Path) -> None:
    ys = {"train": [0, 46, 10, 3], "test": [5, 45]}
    mapping = [f"{i} {code}" for i, code in enumerate(list(range(48, 58)) + list(range(65, 91))
                                                       + [97, 98, 100, 101, 102, 103, 104, 110, 113, 114, 116])]
    upright = _emnist_folder(tmp_path / "gzip", "balanced", ys, gz=True, mapping=mapping)
    ds = load_idx_dataset(tmp_path, "train", emnist_split="balanced")
    assert ds.tensors["input"].shape == (4, 1, 3, 5)  # back to the upright (rows, cols) = (3, 5)
    assert torch.allclose(ds.tensors["input"].double(), _expected_input(upright["train"]), rtol=0, atol=1e-7)
    assert ds.tensors["target"].tolist() == ys["train"]
    assert ds.num_classes == {"target": EMNIST_SPLITS["balanced"]} == {"target": 47}
    assert ds.classes[0] == "0" and ds.classes[10] == "A" and ds.classes[46] == "t"
    # The only EMNIST split in the folder is found without naming it; upright=False keeps the stored layout.
    assert load_idx_dataset(tmp_path, "test").tensors["target"].tolist() == [5, 45]
    stored = load_idx_dataset(tmp_path, "train", upright=False).tensors["input"]
    assert torch.equal(stored, ds.tensors["input"].transpose(2, 3))


def test_emnist_letters_labels_1_to_26_become_0_to_25(tmp_path: Path) -> None:
    ys = {"train": [1, 26, 13], "test": [2]}
    mapping = [f"{i} {64 + i} {96 + i}" for i in range(1, 27)]
    _emnist_folder(tmp_path, "letters", ys, gz=False, mapping=mapping)
    ds = load_idx_dataset(tmp_path, "train", emnist_split="letters")
    assert ds.tensors["target"].tolist() == [0, 25, 12]
    assert ds.num_classes == {"target": 26} and ds.classes[0] == "A/a" and ds.classes[25] == "Z/z"
    _write(tmp_path / "emnist-letters-train-labels-idx1-ubyte", _labels_bytes([0, 1, 2]), gz=False)
    with pytest.raises(AuxLossError, match="outside 1-26"):
        load_idx_dataset(tmp_path, "train", emnist_split="letters")


def test_emnist_several_splits_or_a_bad_name_are_explained(tmp_path: Path) -> None:
    _emnist_folder(tmp_path, "digits", {"train": [1, 2], "test": [3]}, gz=False)
    _emnist_folder(tmp_path, "mnist", {"train": [4], "test": [5]}, gz=False)
    with pytest.raises(AuxLossError, match=r"several splits \['digits', 'mnist'\].*emnist_split"):
        load_idx_dataset(tmp_path)
    assert load_idx_dataset(tmp_path, emnist_split="mnist").tensors["target"].tolist() == [4]
    with pytest.raises(AuxLossError, match="did you mean 'digits'"):
        load_idx_dataset(tmp_path, emnist_split="digit")
    (tmp_path / "emnist-digits-mapping.txt").write_text("0 48\nnot a line\n")
    with pytest.raises(AuxLossError, match="line 2"):
        load_idx_dataset(tmp_path, emnist_split="digits")


def test_idx_bad_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(AuxLossError, match="does not exist.*train-images-idx3-ubyte"):
        load_idx_dataset(tmp_path / "nowhere")
    with pytest.raises(AuxLossError, match="train images and labels not found.*emnist-<split>"):
        load_idx_dataset(tmp_path)
    with pytest.raises(AuxLossError, match="did you mean 'test'"):
        load_idx_dataset(tmp_path, "tset")
    _mnist_folder(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    good_images, good_labels = images.read_bytes(), labels.read_bytes()
    # A wrong magic number: the type byte says int32 (0x0C) where the data are bytes.
    images.write_bytes(good_images[:2] + b"\x0c" + good_images[3:])
    with pytest.raises(AuxLossError, match=r"train-images-idx3-ubyte is (truncated|longer)"):
        load_idx_dataset(tmp_path)
    images.write_bytes(b"\x00\x01" + good_images[2:])
    with pytest.raises(AuxLossError, match="bad magic number 0x0001"):
        load_idx_dataset(tmp_path)
    # Swapped files: the labels file where the images should be.
    images.write_bytes(good_labels)
    with pytest.raises(AuxLossError, match="not swapped"):
        load_idx_dataset(tmp_path)
    images.write_bytes(good_images)
    labels.write_bytes(_labels_bytes([1, 2, 3]))
    with pytest.raises(AuxLossError, match=r"one label per image.*\(5 in train-images-idx3-ubyte\)"):
        load_idx_dataset(tmp_path)
    labels.write_bytes(good_labels[:-2])
    with pytest.raises(AuxLossError, match="train-labels-idx1-ubyte is truncated"):
        load_idx_dataset(tmp_path)


def test_idx_through_the_registry_and_a_config(tmp_path: Path) -> None:
    made = _mnist_folder(tmp_path, gz=True, n_train=9, n_test=4)
    cfg = parse_config({
        "data": {"name": "idx", "root": str(tmp_path), "n_train": 5, "n_val": 4, "n_test": 3,
                 "params": {"flatten": True}},
        "model": {"name": "deep_mlp"},
        "variants": [{"name": "v"}],
    })
    splits = build_data(cfg, 0)
    train_labels, test_labels = made["train"][1], made["test"][1]
    # train and val are disjoint and together drawn from the train files; test comes from the t10k files.
    drawn = splits["train"].tensors["target"].tolist() + splits["val"].tensors["target"].tolist()
    assert sorted(drawn) == sorted(train_labels)
    assert set(splits["test"].tensors["target"].tolist()) <= set(test_labels)
    assert splits["train"].tensors["input"].shape == (5, 12)
    assert splits["test"].num_classes == splits["train"].num_classes  # checked against the train split
    with pytest.raises(AuxLossError, match="needs data.root"):
        build_data(parse_config({"data": {"name": "idx"}, "variants": [{"name": "v"}]}), 0)
    with pytest.raises(AuxLossError, match=r"data.params \['flaten'\] are not options of dataset 'idx'"):
        build_data(parse_config({"data": {"name": "idx", "root": str(tmp_path), "params": {"flaten": True}},
                                 "variants": [{"name": "v"}]}), 0)


@pytest.mark.skipif(
    not fashion_mnist_available(FASHION_MNIST_DEFAULT_ROOT),
    reason=f"real Fashion-MNIST IDX files not installed under {FASHION_MNIST_DEFAULT_ROOT}",
)
def test_idx_reads_the_real_fashion_mnist_files() -> None:
    ds = load_idx_dataset(FASHION_MNIST_DEFAULT_ROOT, "test")
    assert len(ds) == 10000 and ds.tensors["input"].shape[1:] == (1, 28, 28)
    assert ds.num_classes == {"target": 10}
    assert torch.bincount(ds.tensors["target"], minlength=10).tolist() == [1000] * 10
    assert torch.equal(ds.tensors["input"], load_fashion_mnist(split="test").tensors["input"])
