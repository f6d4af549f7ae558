"""Streamed columns (image folders decoded per item, uint8 images scaled per item) and the one registry."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from auxloss.errors import AuxLossError
from auxloss.experiment.build import build_data
from auxloss.experiment.config import parse_config
from auxloss.zoo.data import (
    DATASETS,
    DataRequest,
    DictDataset,
    ImageFiles,
    UInt8Images,
    build_splits,
    load_image_folder,
)


def _png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def _folder(root: Path) -> None:
    _png(root / "cat" / "a.png", (255, 0, 0))
    _png(root / "cat" / "b.png", (0, 255, 0))
    _png(root / "dog" / "c.png", (0, 0, 255))


def test_image_folder_decodes_each_image_when_it_is_read(tmp_path: Path) -> None:
    _folder(tmp_path)
    ds = load_image_folder(tmp_path, image_size=(4, 6))
    column = ds.tensors["input"]
    assert isinstance(column, ImageFiles) and column.shape == (3, 3, 4, 6)
    assert ds.tensors["target"].tolist() == [0, 0, 1]
    # Replacing a file after loading changes what is read: nothing was decoded up front.
    _png(tmp_path / "cat" / "b.png", (255, 255, 255))
    assert torch.equal(ds[1]["input"], torch.ones(3, 4, 6))
    assert torch.equal(ds[0]["input"][:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    # A subset stays streamed and keeps each item's label with its file.
    sub = ds.subset([2, 0])
    assert isinstance(sub.tensors["input"], ImageFiles) and sub.tensors["target"].tolist() == [1, 0]
    assert torch.equal(sub[0]["input"][:, 2, 3], torch.tensor([0.0, 0.0, 1.0]))
    # It pickles as paths (DataLoader workers), and batches as a dict.
    again = pickle.loads(pickle.dumps(ds))
    assert torch.equal(again[2]["input"], ds[2]["input"])
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["input"].shape == (3, 3, 4, 6) and batch["target"].tolist() == [0, 0, 1]


def test_image_folder_without_verify_reports_a_bad_file_when_read(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "dog" / "d.png").write_bytes(b"not an image at all")
    with pytest.raises(AuxLossError, match="d.png"):
        load_image_folder(tmp_path)  # the header check finds it up front
    ds = load_image_folder(tmp_path, verify=False)
    assert len(ds) == 4 and torch.equal(ds[2]["input"][:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(AuxLossError, match=r"Could not read image .*d\.png.*delete or replace"):
        ds[3]


def test_lazy_column_indexing_matches_a_tensor() -> None:
    pixels = torch.arange(5 * 2 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(5, 1, 2, 3)
    column = UInt8Images(pixels)
    whole = pixels.to(torch.float64) / 255.0  # float64 reference, compared after rounding to float32
    assert torch.equal(column[1], whole[1].float()) and torch.equal(column[-1], whole[4].float())
    assert torch.equal(column[1:4], whole[1:4].float()) and torch.equal(column[[4, 0]], whole[[4, 0]].float())
    assert column[5:].shape == (0, 1, 2, 3)
    with pytest.raises(IndexError):
        column[5]
    with pytest.raises(IndexError):
        column[[0, 9]]
    ds = DictDataset({"input": column, "target": torch.arange(5)})
    assert len(list(ds)) == 5  # iteration stops at the column's IndexError
    assert "input: float32[1, 2, 3]" in repr(ds)
    with pytest.raises(AuxLossError, match="uint8 tensor"):
        UInt8Images(torch.zeros(3, 4))


def test_registry_builds_every_experiment_dataset() -> None:
    request = DataRequest(n_train=6, n_val=4, n_test=5, seed=2, params={"step": 8})
    splits = build_splits("digits-sequence", request)
    assert splits["train"].tensors["input"].shape == (6, 8, 8)
    assert DATASETS["digits-sequence"].options == ["step"]
    assert DATASETS["shapes"].options == ["image_size", "noise", "label_noise", "n_shapes", "n_colours",
                                          "clutter", "correlation", "max_rotation"]
    with pytest.raises(AuxLossError, match=r"unknown data.name 'cifar'; use 'cifar10', the closest"):
        build_splits("cifar", request)
    with pytest.raises(AuxLossError, match="'folder' needs data.root"):
        build_splits("folder", DataRequest(n_train=6, n_val=4, n_test=5, seed=2))


def test_folder_through_a_config_streams(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / "a" / f"{i}.png", (i * 40, 0, 0))
        _png(tmp_path / "b" / f"{i}.png", (0, i * 40, 0))
    cfg = parse_config({"data": {"name": "folder", "root": str(tmp_path), "n_train": 4, "n_val": 2, "n_test": 2,
                                 "params": {"image_size": 8}}, "variants": [{"name": "v"}]})
    splits = build_data(cfg, 0)
    assert all(isinstance(s.tensors["input"], ImageFiles) for s in splits.values())
    paths = [p for s in splits.values() for p in s.tensors["input"].paths]
    assert len(set(paths)) == 8  # disjoint splits covering the folder
    # Each label still belongs to its file: class "a" (0) images have no green, class "b" (1) no red.
    for s in splits.values():
        for i in range(len(s)):
            item, path = s[i], s.tensors["input"].paths[i]
            assert item["target"].item() == ("ab".index(path.parent.name))
            assert float(item["input"][1 if path.parent.name == "a" else 0].max()) == 0.0
