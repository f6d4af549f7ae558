"""Multi-Fashion: the overlay by hand on a tiny IDX folder, determinism, disjoint splits, and the real files."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from auxloss.errors import AuxLossError
from auxloss.zoo.data import DATASETS, DataRequest, build_splits
from auxloss.zoo.data.idx import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist_available
from auxloss.zoo.data.multi_fashion import load_multi_fashion, overlay_pairs


def _folder(root: Path, n_train: int = 12, n_test: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four Fashion-MNIST IDX files with random 28x28 garments and labels 0-9."""
    made = {}
    rng = np.random.default_rng(3)
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 7 + 2) % 10
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", n, 28, 28)
                                                          + images.tobytes())
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", n)
                                                          + labels.astype(np.uint8).tobytes())
        made[split] = (images, labels)
    return made


def test_overlay_by_hand():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[0, 27, 27] = 100   # bottom-right pixel of the left garment: under the right garment when offset < 28
    images[0, 0, 0] = 50
    images[1, 0, 0] = 200     # top-left pixel of the right garment lands at (offset, offset)
    images[1, 27 - 4, 27 - 4] = 30
    x = overlay_pairs(images, np.array([0]), np.array([1]), offset=4)
    assert x.shape == (1, 1, 32, 32) and x.dtype == np.float32
    expected = np.zeros((32, 32))
    expected[0, 0] = 50 / 255
    expected[4, 4] = 200 / 255
    expected[27, 27] = max(100, 30) / 255  # the overlap keeps the brighter pixel
    assert np.allclose(x[0, 0], expected, rtol=0, atol=1e-7)


def test_labels_follow_the_garments_and_a_seed_fixes_the_images(tmp_path):
    made = _folder(tmp_path)
    ds = load_multi_fashion(tmp_path, "train", n=20, seed=5, offset=8)
    images, labels = made["train"]
    x = ds.tensors["input"].numpy()
    assert x.shape == (20, 1, 36, 36)
    for i in range(20):
        # the left garment is the top-left 28x28 block outside the overlap; find it among the sources
        left = [j for j in range(len(images)) if np.allclose(x[i, 0, :8, :28], images[j, :8] / 255, atol=1e-7)]
        right = [j for j in range(len(images)) if np.allclose(x[i, 0, 28:, 8:], images[j, 20:] / 255, atol=1e-7)]
        assert len(left) == 1 and len(right) == 1 and left != right
        assert int(ds.tensors["target"][i]) == labels[left[0]] and int(ds.tensors["right"][i]) == labels[right[0]]
    again = load_multi_fashion(tmp_path, "train", n=20, seed=5, offset=8)
    assert torch.equal(again.tensors["input"], ds.tensors["input"])
    other = load_multi_fashion(tmp_path, "train", n=20, seed=6, offset=8)
    assert not torch.equal(other.tensors["input"], ds.tensors["input"])


def test_splits_never_share_a_garment(tmp_path):
    made = _folder(tmp_path, n_train=40, n_test=10)
    splits = build_splits("multi-fashion", DataRequest(n_train=30, n_val=10, n_test=8, seed=1, root=str(tmp_path),
                                                       params={"offset": 6}))
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "val": 10, "test": 8}
    train_images = made["train"][0]

    def garments(ds):  # indices of the training garments whose top-left rows appear as left items
        x = ds.tensors["input"].numpy()[:, 0, :6, :28]
        return {j for i in range(len(x)) for j in range(len(train_images))
                if np.allclose(x[i], train_images[j, :6] / 255, atol=1e-7)}

    assert garments(splits["train"]).isdisjoint(garments(splits["val"]))
    assert not garments(splits["test"])  # test images come from the test garments only
    assert splits["train"].tensors["input"].shape[-1] == 34


def test_bad_input_says_how_to_fix(tmp_path):
    with pytest.raises(AuxLossError, match="offset must be"):
        overlay_pairs(np.zeros((2, 28, 28), np.uint8), np.array([0]), np.array([1]), offset=0)
    with pytest.raises(AuxLossError, match="dataset-fashion-mnist"):
        load_multi_fashion(tmp_path / "absent")
    assert DATASETS["multi-fashion"].options == ["offset", "flatten"]


@pytest.mark.skipif(not fashion_mnist_available(FASHION_MNIST_DEFAULT_ROOT),
                    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
def test_real_files():
    ds = load_multi_fashion(split="test", n=50, seed=0)
    assert ds.tensors["input"].shape == (50, 1, 36, 36)
    assert 0.0 <= float(ds.tensors["input"].min()) and float(ds.tensors["input"].max()) <= 1.0
    assert set(ds.tensors["target"].tolist()) <= set(range(10))
    assert not torch.equal(ds.tensors["target"], ds.tensors["right"])
