"""Tests for auxloss.zoo.data: DictDataset, the generated shapes, digits, IDX/Fashion-MNIST, image folders."""

from __future__ import annotations

import colorsys
import gzip
import hashlib
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from auxloss.errors import AuxLossError
from auxloss.zoo.data import (
    COLOUR_RGB,
    COLOURS,
    DATASETS,
    FASHION_MNIST_DEFAULT_ROOT,
    FASHION_MNIST_GROUP_OF_LABEL,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    DictDataset,
    available_datasets,
    fashion_mnist_available,
    load_dataset,
    load_digits_dataset,
    load_fashion_mnist,
    load_image_folder,
    make_shapes,
    make_shapes_splits,
    read_idx,
)

# ------------------------------------------------------------------------------------------------------
# DictDataset
# ------------------------------------------------------------------------------------------------------


def _small_dict_dataset() -> DictDataset:
    return DictDataset(
        {"input": torch.arange(12.0).reshape(6, 2), "target": torch.tensor([0, 1, 2, 0, 1, 2])},
        num_classes={"target": 3},
        class_names={"target": ["a", "b", "c"]},
        info={"source": "test"},
    )


def test_dict_dataset_items_len_keys() -> None:
    ds = _small_dict_dataset()
    assert len(ds) == 6
    assert ds.keys == ["input", "target"]
    item = ds[4]
    assert set(item) == {"input", "target"}
    assert torch.equal(item["input"], torch.tensor([8.0, 9.0]))
    assert int(item["target"]) == 1
    assert ds.num_classes == {"target": 3}
    assert ds.classes == ["a", "b", "c"]
    assert ds.tensors["input"].shape == (6, 2)
    # Iteration relies on IndexError at the end.
    assert len(list(ds)) == 6
    with pytest.raises(IndexError):
        ds[6]
    assert "n=6" in repr(ds) and "3 classes" in repr(ds)


def test_dict_dataset_accepts_numpy_and_collates_to_dict_batches() -> None:
    ds = DictDataset({"input": np.ones((5, 3), np.float32), "target": np.arange(5)})
    assert isinstance(ds.tensors["input"], torch.Tensor)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert isinstance(batch, dict)
    assert batch["input"].shape == (4, 3)
    assert batch["target"].tolist() == [0, 1, 2, 3]
    # No class names for target: .classes says so with an AttributeError (hasattr stays honest).
    assert not hasattr(ds, "classes")


def test_dict_dataset_rejects_unequal_lengths_naming_the_key() -> None:
    with pytest.raises(AuxLossError) as err:
        DictDataset({"input": torch.zeros(5, 2), "target": torch.zeros(5), "colour": torch.zeros(4)})
    msg = str(err.value)
    assert "'colour'" in msg and "4" in msg and "5" in msg


@pytest.mark.parametrize(
    "tensors, fragment",
    [
        ({}, "non-empty"),
        ({"input": torch.zeros(0, 3), "target": torch.zeros(0)}, "0 items"),
        ({"input": [1, 2, 3]}, "torch.Tensor"),
        ({"input": torch.tensor(1.0)}, "scalar"),
        ({1: torch.zeros(3)}, "strings"),
    ],
)
def test_dict_dataset_rejects_bad_input(tensors: dict, fragment: str) -> None:
    with pytest.raises(AuxLossError, match=fragment):
        DictDataset(tensors)


def test_dict_dataset_num_classes_must_name_a_key() -> None:
    with pytest.raises(AuxLossError, match="did you mean 'target'"):
        DictDataset({"input": torch.zeros(3), "target": torch.zeros(3)}, num_classes={"targt": 2})
    with pytest.raises(AuxLossError, match="one name per class"):
        DictDataset({"target": torch.zeros(3)}, num_classes={"target": 2}, class_names={"target": ["x"]})


def test_dict_dataset_subset() -> None:
    ds = _small_dict_dataset()
    sub = ds.subset([5, 0, 2])
    assert isinstance(sub, DictDataset)
    assert sub.tensors["target"].tolist() == [2, 0, 2]
    assert sub.num_classes == ds.num_classes and sub.classes == ds.classes and sub.info == ds.info
    assert ds.subset(torch.tensor([1, 3])).tensors["target"].tolist() == [1, 0]
    assert ds.subset(np.array([4])).tensors["target"].tolist() == [1]
    mask = ds.tensors["target"] == 2
    assert ds.subset(mask).tensors["target"].tolist() == [2, 2]
    with pytest.raises(AuxLossError, match=r"\[-6, 5\]"):
        ds.subset([0, 6])
    with pytest.raises(AuxLossError, match="boolean mask"):
        ds.subset(torch.tensor([True, False]))
    with pytest.raises(AuxLossError, match="integers"):
        ds.subset(torch.tensor([0.5]))


# ------------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------------

LABEL_KEYS = ("target", "colour", "size", "position", "texture", "background")


@pytest.fixture(scope="module")
def clean_shapes() -> DictDataset:
    """Noise-free shapes, shared by the attribute checks below (generation is the slow part)."""
    return make_shapes(3000, seed=11, noise=0.0)


def test_shapes_keys_dtypes_ranges(clean_shapes: DictDataset) -> None:
    ds = make_shapes(200, seed=3, image_size=24)
    assert set(ds.keys) == {"input", "mask", *LABEL_KEYS}
    x, m = ds.tensors["input"], ds.tensors["mask"]
    assert x.dtype == torch.float32 and x.shape == (200, 3, 24, 24)
    assert m.dtype == torch.float32 and m.shape == (200, 1, 24, 24)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(torch.unique(m).tolist()) == {0.0, 1.0}
    assert ds.num_classes == {
        "target": 6,
        "colour": 6,
        "size": 3,
        "position": 4,
        "texture": 3,
        "background": 2,
    }
    assert ds.class_names["target"] == SHAPES and ds.class_names["colour"] == COLOURS
    assert ds.classes == list(SHAPES)
    assert ds.info["seed"] == 3 and ds.info["generator"] == "shapes"
    for key in LABEL_KEYS:
        y = ds.tensors[key]
        assert y.dtype == torch.int64 and y.shape == (200,)
        assert 0 <= int(y.min()) and int(y.max()) < ds.num_classes[key]
    # Every image has a visible object.
    assert bool((m.sum((1, 2, 3)) > 0).all())


def test_shapes_labels_are_balanced(clean_shapes: DictDataset) -> None:
    for key, k in [("target", 6), ("colour", 6), ("size", 3), ("position", 4), ("texture", 3)]:
        counts = torch.bincount(clean_shapes.tensors[key], minlength=k)
        # Balanced by construction: counts differ by at most one.
        assert int(counts.max() - counts.min()) <= 1, (key, counts)
    # Factors are drawn independently: every shape appears in every colour, roughly equally often.
    joint = torch.bincount(clean_shapes.tensors["target"] * 6 + clean_shapes.tensors["colour"], minlength=36)
    assert int(joint.min()) > 3000 / 36 * 0.5


def test_shapes_deterministic_given_seed() -> None:
    a = make_shapes(300, seed=5, clutter=0.5, label_noise=0.1)
    b = make_shapes(300, seed=5, clutter=0.5, label_noise=0.1)
    c = make_shapes(300, seed=6, clutter=0.5, label_noise=0.1)
    for key in a.keys:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    assert not torch.equal(a.tensors["input"], c.tensors["input"])
    assert not torch.equal(a.tensors["target"], c.tensors["target"])


def test_shapes_generation_is_vectorised_and_quick() -> None:
    # A sanity check rather than a timed assertion: 2000 images must come back without per-pixel loops.
    ds = make_shapes(2000, seed=0)
    assert len(ds) == 2000


def _hue_deg(rgb: np.ndarray) -> np.ndarray:
    return np.array([colorsys.rgb_to_hsv(*c)[0] * 360.0 for c in rgb])


def test_shapes_colour_matches_masked_pixels(clean_shapes: DictDataset) -> None:
    x = clean_shapes.tensors["input"].numpy()
    m = clean_shapes.tensors["mask"].numpy()
    colour = clean_shapes.tensors["colour"].numpy()
    mean_rgb = (x * m).sum((2, 3)) / m.sum((2, 3))
    # Nearest named colour, after scaling out brightness (texture and value only scale the colour).
    palette = np.array([COLOUR_RGB[c] for c in COLOURS])
    normed = mean_rgb / mean_rgb.max(1, keepdims=True)
    nearest = np.argmin(((normed[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    assert (nearest == colour).mean() >= 0.95
    # And the hue itself is within the +-30 degrees that belong to the named colour.
    diff = np.abs((_hue_deg(mean_rgb) - 60.0 * colour + 180.0) % 360.0 - 180.0)
    assert (diff < 30.0).mean() >= 0.95


def test_shapes_size_bucket_follows_mask_area(clean_shapes: DictDataset) -> None:
    S = 32
    area = clean_shapes.tensors["mask"].sum((1, 2, 3)).numpy()
    size = clean_shapes.tensors["size"].numpy()
    means = [area[size == b].mean() for b in range(len(SIZES))]
    assert means[0] < means[1] < means[2]
    # Thresholds halfway between the nominal equivalent-radius ranges classify almost every sample.
    edges = [math.pi * (0.1325 * S) ** 2, math.pi * (0.1875 * S) ** 2]
    predicted = np.digitize(area, edges)
    assert (predicted == size).mean() >= 0.98
    # The area says nothing about the shape: per-shape mean areas stay close together.
    target = clean_shapes.tensors["target"].numpy()
    per_shape = np.array([area[target == s].mean() for s in range(len(SHAPES))])
    assert per_shape.max() / per_shape.min() < 1.2


def test_shapes_position_is_the_mask_centroid_quadrant(clean_shapes: DictDataset) -> None:
    m = clean_shapes.tensors["mask"][:, 0].numpy()
    S = m.shape[-1]
    grid = np.arange(S) + 0.5
    total = m.sum((1, 2))
    cy = (m.sum(2) * grid).sum(1) / total
    cx = (m.sum(1) * grid).sum(1) / total
    quadrant = (cy > S / 2).astype(int) * 2 + (cx > S / 2).astype(int)
    assert (quadrant == clean_shapes.tensors["position"].numpy()).all()
    assert POSITIONS[0] == "top-left" and POSITIONS[3] == "bottom-right"


def test_shapes_texture_and_background_are_drawn(clean_shapes: DictDataset) -> None:
    x = clean_shapes.tensors["input"].numpy()
    m = clean_shapes.tensors["mask"].numpy()[:, 0].astype(bool)
    texture = clean_shapes.tensors["texture"].numpy()
    bright = x.max(1)
    # Relative spread of the brightness inside the mask: zero for solid, large for striped and dotted.
    spread = np.array([bright[i][m[i]].std() / bright[i][m[i]].mean() for i in range(len(x))])
    assert spread[texture == TEXTURES.index("solid")].max() < 1e-5
    for name in ("striped", "dotted"):
        assert np.median(spread[texture == TEXTURES.index(name)]) > 0.1, name
    # Without clutter or noise, everything outside the mask is grey (R == G == B).
    outside = ~m[:, None].repeat(3, 1)
    rgb_out = np.where(outside, x, 0.0)
    assert np.abs(rgb_out[:, 0] - rgb_out[:, 1]).max() < 1e-6
    assert (clean_shapes.tensors["background"] == 0).all()


def test_shapes_clutter_adds_coloured_strokes_outside_the_mask() -> None:
    ds = make_shapes(200, seed=2, noise=0.0, clutter=1.0)
    assert (ds.tensors["background"] == 1).all()
    x = ds.tensors["input"].numpy()
    outside = ds.tensors["mask"].numpy()[:, 0] == 0
    chroma = (x.max(1) - x.min(1)) * outside
    # Most cluttered images have non-grey pixels off the object (a stroke can hide behind the object).
    assert ((chroma > 0.05).sum((1, 2)) > 0).mean() > 0.9
    half = make_shapes(1000, seed=2, clutter=0.5)
    assert 0.4 < float(half.tensors["background"].float().mean()) < 0.6


def test_shapes_noise_knob_is_the_pixel_noise_std() -> None:
    clean = make_shapes(200, seed=4, noise=0.0)
    noisy = make_shapes(200, seed=4, noise=0.2)
    # The noise is drawn after every latent factor: same objects, only the pixels differ.
    for key in ("mask", *LABEL_KEYS):
        assert torch.equal(clean.tensors[key], noisy.tensors[key]), key
    diff = (noisy.tensors["input"] - clean.tensors["input"]).std().item()
    assert 0.15 < diff < 0.21  # a bit under 0.2 because pixels are clipped to [0, 1]


def test_shapes_label_noise_flips_exactly_that_fraction() -> None:
    ds = make_shapes(1000, seed=8, label_noise=0.25)
    flipped = ds.tensors["target"] != ds.tensors["clean_target"]
    assert int(flipped.sum()) == 250
    assert ds.num_classes["clean_target"] == 6
    assert "clean_target" not in make_shapes(10, seed=8).keys


def test_shapes_fewer_classes_and_correlation() -> None:
    ds = make_shapes(300, seed=1, n_shapes=3, n_colours=4, correlation=1.0)
    assert int(ds.tensors["target"].max()) == 2 and ds.num_classes["target"] == 3
    assert ds.classes == list(SHAPES[:3]) and ds.class_names["colour"] == COLOURS[:4]
    assert torch.equal(ds.tensors["colour"], ds.tensors["target"] % 4)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"n": 0}, "n must be"),
        ({"n": 10, "image_size": 8}, "image_size"),
        ({"n": 10, "label_noise": 1.5}, "label_noise"),
        ({"n": 10, "noise": -0.1}, "noise"),
        ({"n": 10, "seed": -1}, "seed"),
        ({"n": 10, "n_shapes": 7}, "n_shapes"),
        ({"n": 10.0}, "integer"),
    ],
)
def test_shapes_rejects_bad_knobs(kwargs: dict, fragment: str) -> None:
    with pytest.raises(AuxLossError, match=fragment):
        make_shapes(**kwargs)


def _image_hashes(ds: DictDataset) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in ds.tensors["input"]}


def test_shapes_splits_are_disjoint_and_deterministic() -> None:
    splits = make_shapes_splits(400, 100, 150, seed=3, noise=0.0, label_noise=0.2)
    assert {k: len(v) for k, v in splits.items()} == {"train": 400, "val": 100, "test": 150}
    hashes = {k: _image_hashes(v) for k, v in splits.items()}
    assert len(hashes["train"]) == 400  # no duplicates inside a split either
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    # Label noise only in train, so validation and test measure the clean task.
    assert "clean_target" in splits["train"].keys
    assert "clean_target" not in splits["val"].keys and "clean_target" not in splits["test"].keys
    again = make_shapes_splits(400, 100, 150, seed=3, noise=0.0, label_noise=0.2)
    assert torch.equal(again["test"].tensors["input"], splits["test"].tensors["input"])
    # Each split has its own generator: resizing train leaves val and test as they were.
    resized = make_shapes_splits(50, 100, 150, seed=3, noise=0.0, label_noise=0.2)
    assert torch.equal(resized["val"].tensors["input"], splits["val"].tensors["input"])
    other = make_shapes_splits(400, 100, 150, seed=4, noise=0.0)
    assert not torch.equal(other["test"].tensors["input"], splits["test"].tensors["input"])


def test_shapes_splits_reject_unknown_option() -> None:
    with pytest.raises(AuxLossError, match="did you mean 'noise'"):
        make_shapes_splits(10, 10, 10, seed=0, nois=0.1)
    with pytest.raises(AuxLossError, match="n_val"):
        make_shapes_splits(10, 0, 10, seed=0)


def test_shapes_main_task_is_learnable_from_pixels() -> None:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    splits = make_shapes_splits(1500, 1, 600, seed=0, noise=0.0, image_size=16)
    tr, te = splits["train"], splits["test"]
    clf = LogisticRegression(max_iter=200, C=0.05)
    # One BLAS thread: this small fit is fastest single-threaded and must not oversubscribe a busy machine.
    with threadpool_limits(limits=1):
        clf.fit(tr.tensors["input"].flatten(1).numpy(), tr.tensors["target"].numpy())
    acc = clf.score(te.tensors["input"].flatten(1).numpy(), te.tensors["target"].numpy())
    # Chance is 1/6 ~ 0.167; a linear model on raw pixels gets clearly above it, far from perfect.
    assert acc > 0.25


# ------------------------------------------------------------------------------------------------------
# Digits
# ------------------------------------------------------------------------------------------------------


def test_digits_dataset() -> None:
    ds = load_digits_dataset()
    assert len(ds) == 1797
    x, y = ds.tensors["input"], ds.tensors["target"]
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert torch.equal(ds.tensors["parity"], y % 2)
    loop = {d: int(ds.tensors["loop"][y == d][0]) for d in range(10)}
    assert loop == {0: 1, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 1, 7: 0, 8: 1, 9: 1}
    assert ds.num_classes == {"target": 10, "parity": 2, "loop": 2}
    flat = load_digits_dataset(flatten=True)
    assert flat.tensors["input"].shape == (1797, 64)
    assert torch.equal(flat.tensors["input"].reshape(-1, 1, 8, 8), x)


def test_digits_without_sklearn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(AuxLossError, match=r"pip install scikit-learn.*auxloss\[data\]"):
        load_digits_dataset()


# ------------------------------------------------------------------------------------------------------
# IDX and Fashion-MNIST
# ------------------------------------------------------------------------------------------------------

_IDX_CODES = {
    np.dtype("u1"): 0x08,
    np.dtype("i1"): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def _idx_bytes(arr: np.ndarray) -> bytes:
    """Encode an array in the IDX format (written here independently of the reader under test)."""
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    header = bytes([0, 0, _IDX_CODES[big.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + big.tobytes()


def _write_idx(path: Path, arr: np.ndarray, compress: bool = False) -> Path:
    raw = _idx_bytes(arr)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([5, 0, 9], dtype=np.uint8),
        np.array([[-3, 70000], [1, 2]], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32),
        np.array([-2, 3], dtype=np.int16),
    ],
    ids=["u8-3d", "u8-1d", "i32", "f32", "i16"],
)
def test_read_idx_round_trip(tmp_path: Path, arr: np.ndarray, compress: bool) -> None:
    path = _write_idx(tmp_path / "x.idx", arr, compress)
    out = read_idx(path)
    assert out.shape == arr.shape
    assert np.array_equal(out, arr)
    assert out.dtype.isnative and out.flags.writeable


def test_read_idx_detects_gzip_by_content_not_name(tmp_path: Path) -> None:
    arr = np.arange(10, dtype=np.uint8)
    assert np.array_equal(read_idx(_write_idx(tmp_path / "plain-but-named.gz", arr)), arr)
    assert np.array_equal(read_idx(_write_idx(tmp_path / "zipped-no-ext", arr, compress=True)), arr)


def test_read_idx_rejects_corrupt_files_naming_them(tmp_path: Path) -> None:
    raw = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    cases = {
        "truncated": raw[:-5],
        "header-cut": raw[:9],
        "tiny": raw[:2],
        "trailing": raw + b"\x00",
        "bad-magic": b"\x08\x03" + raw[2:],
        "bad-type": raw[:2] + b"\x42" + raw[3:],
        "truncated-gz": gzip.compress(raw)[:-12],
        "garbage-gz": b"\x1f\x8b" + b"not really gzip data",
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}-idx3-ubyte"
        path.write_bytes(content)
        with pytest.raises(AuxLossError) as err:
            read_idx(path)
        assert path.name in str(err.value), name
    with pytest.raises(AuxLossError, match="does not exist"):
        read_idx(tmp_path / "missing-idx1-ubyte")


def _fake_fashion(root: Path, n_train: int = 12, n_test: int = 7, compress_train: bool = True) -> None:
    """A tiny Fashion-MNIST folder: standard file names, random pixels, labels cycling through 0-9."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, gz in (("train", n_train, compress_train), ("t10k", n_test, False)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        _write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz)


def test_load_fashion_mnist_from_fake_folder(tmp_path: Path) -> None:
    _fake_fashion(tmp_path / "fm")
    assert fashion_mnist_available(tmp_path / "fm")
    train = load_fashion_mnist(tmp_path / "fm", split="train")
    test = load_fashion_mnist(str(tmp_path / "fm"), split="test")
    assert len(train) == 12 and len(test) == 7
    x = train.tensors["input"]
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # Pixels are the file's bytes / 255.
    raw = read_idx(tmp_path / "fm" / "train-images-idx3-ubyte.gz")
    assert torch.allclose(x[:, 0], torch.from_numpy(raw.astype(np.float32) / 255.0))
    y = train.tensors["target"]
    assert y.dtype == torch.int64 and y.tolist() == [i % 10 for i in range(12)]
    group = train.tensors["group"]
    assert group.tolist() == [FASHION_MNIST_GROUP_OF_LABEL[i % 10] for i in range(12)]
    # The documented coarse groups: tops, bottom, dress, footwear, bag.
    assert [FASHION_MNIST_GROUP_OF_LABEL[i] for i in (0, 2, 4, 6)] == [0, 0, 0, 0]
    assert [FASHION_MNIST_GROUP_OF_LABEL[i] for i in (1, 3, 5, 7, 9, 8)] == [1, 2, 3, 3, 3, 4]
    assert train.num_classes == {"target": 10, "group": 5}
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert load_fashion_mnist(tmp_path / "fm", "test", flatten=True).tensors["input"].shape == (7, 784)


def test_load_fashion_mnist_finds_torchvision_raw_layout(tmp_path: Path) -> None:
    _fake_fashion(tmp_path / "FashionMNIST" / "raw", compress_train=False)
    assert len(load_fashion_mnist(tmp_path)) == 12


def test_load_fashion_mnist_missing_folder_says_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert not fashion_mnist_available(missing)
    with pytest.raises(AuxLossError) as err:
        load_fashion_mnist(missing)
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "train-images-idx3-ubyte" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "root=" in msg


def test_load_fashion_mnist_missing_file_names_what_was_looked_for(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    assert not fashion_mnist_available(tmp_path)
    assert len(load_fashion_mnist(tmp_path, "train")) == 12  # the other split still loads
    with pytest.raises(AuxLossError) as err:
        load_fashion_mnist(tmp_path, "test")
    msg = str(err.value)
    assert "labels" in msg and "t10k-labels-idx1-ubyte" in msg and str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_load_fashion_mnist_rejects_bad_split_and_mismatched_files(tmp_path: Path) -> None:
    _fake_fashion(tmp_path, compress_train=False)
    with pytest.raises(AuxLossError, match="did you mean 'test'"):
        load_fashion_mnist(tmp_path, split="tset")
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(AuxLossError, match="one label per image"):
        load_fashion_mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(12, 11, np.uint8))
    with pytest.raises(AuxLossError, match="outside 0-9"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((12, 28, 28), np.uint8))[:-100])
    with pytest.raises(AuxLossError, match="train-images-idx3-ubyte.*truncated"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not fashion_mnist_available(FASHION_MNIST_DEFAULT_ROOT),
    reason=f"real Fashion-MNIST IDX files not installed under {FASHION_MNIST_DEFAULT_ROOT} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist() -> None:
    train = load_fashion_mnist(split="train")
    test = load_fashion_mnist(split="test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.tensors["input"].shape[1:] == (1, 28, 28)
    # The official splits are balanced: 6000 / 1000 per class.
    assert torch.bincount(train.tensors["target"], minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.tensors["target"], minlength=10).tolist() == [1000] * 10


# ------------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------------


def _write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_load_image_folder(tmp_path: Path) -> None:
    # Class folders on purpose not in sorted order of creation; one nested subfolder; mixed-case ext.
    _write_png(tmp_path / "zebra" / "a.png", (255, 255, 255))
    _write_png(tmp_path / "zebra" / "nested" / "b.PNG", (255, 255, 255), size=(40, 40))
    _write_png(tmp_path / "apple" / "x.png", (255, 0, 0))
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    ds = load_image_folder(tmp_path, image_size=(16, 24))
    assert ds.classes == ["apple", "zebra"]
    assert ds.num_classes == {"target": 2}
    assert ds.tensors["target"].tolist() == [0, 1, 1]
    x = ds.tensors["input"]
    assert x.shape == (3, 3, 16, 24) and x.dtype == torch.float32
    assert torch.allclose(x[0].mean((1, 2)), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(x[1], torch.ones(3, 16, 24))
    grey = load_image_folder(tmp_path, image_size=8, grayscale=True)
    assert grey.tensors["input"].shape == (3, 1, 8, 8)
    # Pillow's luma of pure red is 0.299 * 255.
    assert abs(float(grey.tensors["input"][0].mean()) - 76 / 255) < 2 / 255


def test_load_image_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(AuxLossError, match="does not exist") as err:
        load_image_folder(missing)
    assert str(missing.absolute()) in str(err.value)

    flat = tmp_path / "flat"
    _write_png(flat / "img.png", (0, 0, 0))
    with pytest.raises(AuxLossError, match="no class subfolders.*directly"):
        load_image_folder(flat)

    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "readme.md").write_text("x")
    with pytest.raises(AuxLossError, match="No images found") as err:
        load_image_folder(no_images)
    assert ".png" in str(err.value) and ".jpg" in str(err.value)

    one_empty = tmp_path / "one_empty"
    _write_png(one_empty / "cat" / "1.png", (0, 0, 0))
    (one_empty / "dog").mkdir()
    with pytest.raises(AuxLossError, match=r"\['dog'\]"):
        load_image_folder(one_empty)

    corrupt = tmp_path / "corrupt"
    _write_png(corrupt / "cat" / "1.png", (0, 0, 0))
    (corrupt / "cat" / "2.png").write_bytes(b"this is not a png")
    with pytest.raises(AuxLossError, match="2.png"):
        load_image_folder(corrupt)

    with pytest.raises(AuxLossError, match="image_size"):
        load_image_folder(one_empty, image_size=(0, 4))


# ------------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------------


def test_registry() -> None:
    # One registry for every source: the experiment builder looks data.name up here.
    assert set(DATASETS) == {"shapes", "digits", "digits-sequence", "fashion-mnist", "multi-fashion", "idx",
                             "folder", "cifar10", "cifar100", "hf"}
    names = available_datasets()
    assert "shapes" in names and "digits" in names
    assert ("fashion-mnist" in names) == fashion_mnist_available()
    ds = load_dataset("shapes", n=12, seed=1)
    assert len(ds) == 12 and torch.equal(
        ds.tensors["input"], DATASETS["shapes"](n=12, seed=1).tensors["input"]
    )
    assert len(load_dataset("digits")) == 1797
    with pytest.raises(AuxLossError, match="did you mean 'shapes'"):
        load_dataset("shape")
    assert "apt-get install" in DATASETS["fashion-mnist"].how_to_get
