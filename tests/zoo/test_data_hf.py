"""Hugging Face datasets on disk (data.name: hf): a saved DatasetDict and parquet files, written here by `datasets`
itself, read back through the loader, the registry and `auxloss run`, and checked against the rows written."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from auxloss._extras import MissingExtraError
from auxloss.cli import main
from auxloss.errors import AuxLossError
from auxloss.experiment.build import build_data
from auxloss.experiment.config import load_config
from auxloss.zoo.data import DATASETS, DataRequest, build_splits, load_hf_dataset, load_image_folder
from auxloss.zoo.data.hf import hf_available

CLASSES = ["cat", "dog", "fox"]


def _rows(n: int, seed: int, side: int = 16) -> dict[str, list]:
    """The source rows: an RGB image, a class, an id, a float and a fixed-length vector per row."""
    rng = np.random.default_rng(seed)
    return {
        "pixels": [rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8) for _ in range(n)],
        "label": [int(v) for v in rng.integers(0, 3, size=n)],
        "row": list(range(seed * 1000, seed * 1000 + n)),
        "size": [float(v) for v in rng.normal(size=n)],
        "vec": [[float(v) for v in rng.normal(size=3)] for _ in range(n)],
    }


def _dataset(datasets, rows: dict[str, list]):
    from PIL import Image

    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES), "row": datasets.Value("int64"),
        "size": datasets.Value("float64"), "vec": datasets.List(datasets.Value("float32"), length=3)
        if hasattr(datasets, "List") else datasets.Sequence(datasets.Value("float32"), length=3),
    })
    data = {k: v for k, v in rows.items() if k != "pixels"}
    return datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in rows["pixels"]], **data},
                                      features=features)


@pytest.fixture
def datasets():
    return pytest.importorskip("datasets")


@pytest.fixture
def saved(datasets, tmp_path: Path) -> tuple[Path, dict[str, dict[str, list]]]:
    """A DatasetDict with train (30 rows) and test (10 rows) written by save_to_disk, and the rows written."""
    rows = {"train": _rows(30, 1), "test": _rows(10, 2)}
    root = tmp_path / "saved"
    datasets.DatasetDict({s: _dataset(datasets, r) for s, r in rows.items()}).save_to_disk(str(root))
    return root, rows


COLUMNS = {"input": "image", "target": "label", "row": "row", "size": "size", "vec": "vec"}


def _expected_image(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / np.float32(255)).permute(2, 0, 1)


def _check_item(item: dict[str, torch.Tensor], rows: dict[str, list]) -> None:
    """One item against the source row it names by its id: every value exactly, in the documented dtype."""
    i = rows["row"].index(int(item["row"]))
    assert torch.equal(item["input"], _expected_image(rows["pixels"][i]))
    assert item["target"].dtype == torch.int64 and int(item["target"]) == rows["label"][i]
    assert item["size"].dtype == torch.float32 and float(item["size"]) == float(np.float32(rows["size"][i]))
    assert torch.equal(item["vec"], torch.tensor(rows["vec"][i], dtype=torch.float32))


def test_a_saved_dataset_dict_reads_back_every_row_exactly(saved) -> None:
    root, rows = saved
    for split, source in (("train", "train"), ("test", "test")):
        ds = load_hf_dataset(root, split, columns=COLUMNS)
        assert len(ds) == len(rows[source]["row"])
        assert ds.tensors["row"].tolist() == rows[source]["row"]  # in the stored order
        assert ds.num_classes == {"target": 3} and ds.classes == CLASSES
        assert tuple(ds.tensors["input"].shape) == (len(ds), 3, 16, 16)
        for i in range(len(ds)):
            _check_item(ds[i], rows[source])
    # The default columns: the one Image column is the input, the one ClassLabel column the target.
    plain = load_hf_dataset(root)
    assert set(plain.keys) == {"input", "target"} and plain.tensors["target"].tolist() == rows["train"]["label"]
    # A list keeps the columns' names.
    assert load_hf_dataset(root, columns=["label", "row"]).keys == ["label", "row"]


def test_images_become_the_tensors_an_image_folder_gives(saved, tmp_path: Path) -> None:
    from PIL import Image

    root, rows = saved
    folder = tmp_path / "folder"
    for pixels, label, row in zip(rows["train"]["pixels"], rows["train"]["label"], rows["train"]["row"]):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / CLASSES[label] / f"{row}.png")
    for grayscale in (False, True):
        hf = load_hf_dataset(root, columns=COLUMNS, image_size=(8, 12), grayscale=grayscale)
        images = load_image_folder(folder, image_size=(8, 12), grayscale=grayscale)
        ids = [int(p.stem) for p in images.tensors["input"].paths]
        for j in range(0, len(images), 7):
            item = hf[rows["train"]["row"].index(ids[j])]
            assert item["input"].shape == (1 if grayscale else 3, 8, 12)
            assert torch.equal(item["input"], images[j]["input"])


def test_the_registry_draws_test_from_the_test_split_and_carves_val_by_the_seed(saved) -> None:
    root, rows = saved
    request = DataRequest(n_train=12, n_val=6, n_test=5, seed=3, root=str(root), params={"columns": COLUMNS})
    splits = build_splits("hf", request)
    ids = {s: splits[s].tensors["row"].tolist() for s in splits}
    # The seeded split every source uses: one permutation of the training rows (seed 3), train then val; the
    # test split's own permutation (seed 3 + 1).
    order = np.random.default_rng(3).permutation(30)
    assert ids["train"] == [rows["train"]["row"][i] for i in order[:12]]
    assert ids["val"] == [rows["train"]["row"][i] for i in order[12:18]]
    assert ids["test"] == [rows["test"]["row"][i] for i in np.random.default_rng(4).permutation(10)[:5]]
    assert not set(ids["train"]) & set(ids["val"])
    for split in splits:
        for i in range(len(splits[split])):
            _check_item(splits[split][i], rows["test" if split == "test" else "train"])
    again = build_splits("hf", request)
    assert all(again[s].tensors["row"].tolist() == ids[s] for s in ids)
    other = build_splits("hf", DataRequest(12, 6, 5, 4, root=str(root), params={"columns": COLUMNS}))
    assert other["train"].tensors["row"].tolist() != ids["train"]
    assert DATASETS["hf"].options == ["columns", "splits", "image_size", "grayscale", "cache_dir"]


def test_a_validation_split_is_used_and_splits_renames(datasets, tmp_path: Path) -> None:
    rows = {"train": _rows(12, 1), "validation": _rows(8, 2), "holdout": _rows(6, 3)}
    root = tmp_path / "three"
    datasets.DatasetDict({s: _dataset(datasets, r) for s, r in rows.items()}).save_to_disk(str(root))
    params = {"columns": COLUMNS, "splits": {"test": "holdout"}}
    splits = build_splits("hf", DataRequest(12, 8, 6, 0, root=str(root), params=params))
    assert sorted(splits["train"].tensors["row"].tolist()) == rows["train"]["row"]  # all 12: none carved
    assert sorted(splits["val"].tensors["row"].tolist()) == rows["validation"]["row"]
    assert sorted(splits["test"].tensors["row"].tolist()) == rows["holdout"]["row"]
    assert load_hf_dataset(root, "val", columns=COLUMNS).tensors["row"].tolist() == rows["validation"]["row"]
    with pytest.raises(AuxLossError, match=r"splits maps 'test' to 'holdot', but .* \['holdout', 'train', "
                                           r"'validation'\]; did you mean 'holdout'\?"):
        load_hf_dataset(root, "test", splits={"test": "holdot"})
    with pytest.raises(AuxLossError, match=r"splits names \['tset'\]"):
        load_hf_dataset(root, splits={"tset": "holdout"})
    with pytest.raises(AuxLossError, match=r"no test split .* splits=\{'test': NAME\}"):
        load_hf_dataset(root, "test")


def test_parquet_files_load_and_split_by_their_names(datasets, tmp_path: Path) -> None:
    rows = _rows(20, 5)
    one = tmp_path / "one.parquet"
    _dataset(datasets, rows).to_parquet(str(one))
    cache = str(tmp_path / "cache")
    ds = load_hf_dataset(one, columns=COLUMNS, cache_dir=cache)
    assert ds.info["stored"] == "parquet" and ds.tensors["row"].tolist() == rows["row"]
    for i in range(len(ds)):
        _check_item(ds[i], rows)
    # One file, no named split: train, val and test all carved from it, disjoint.
    splits = build_splits("hf", DataRequest(8, 5, 7, 1, root=str(one), params={"columns": COLUMNS,
                                                                                "cache_dir": cache}))
    ids = [set(splits[s].tensors["row"].tolist()) for s in ("train", "val", "test")]
    assert [len(s) for s in ids] == [8, 5, 7] and set.union(*ids) == set(rows["row"])
    # The Hub's layout: data/<split>-XXXXX-of-XXXXX.parquet, and a folder per split.
    test_rows = _rows(6, 6)
    folder = tmp_path / "hub"
    (folder / "data").mkdir(parents=True)
    _dataset(datasets, rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    (folder / "test").mkdir()
    _dataset(datasets, test_rows).to_parquet(str(folder / "test" / "0000.parquet"))
    test = load_hf_dataset(folder, "test", columns=COLUMNS, cache_dir=cache)
    assert test.tensors["row"].tolist() == test_rows["row"]
    _dataset(datasets, rows).to_parquet(str(folder / "data" / "extra.parquet"))
    with pytest.raises(AuxLossError, match=r"Some parquet files .* name a split and some do not .*extra\.parquet"):
        load_hf_dataset(folder, cache_dir=cache)


def test_items_survive_pickling_for_dataloader_workers(saved) -> None:
    root, rows = saved
    ds = load_hf_dataset(root, columns=COLUMNS).subset([4, 2, 9])
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.tensors["row"].tolist() == [rows["train"]["row"][i] for i in (4, 2, 9)]
    for i in range(3):
        _check_item(copy[i], rows["train"])
    batch = torch.utils.data.default_collate([copy[i] for i in range(3)])
    assert batch["input"].shape == (3, 3, 16, 16) and batch["vec"].shape == (3, 3)


TINY = """\
name: hf-tiny
seeds: 1
data: {{name: hf, root: {root}, n_train: 16, n_val: 8, n_test: 6, batch_size: 8,
        params: {{columns: {{input: image, target: label, odd: odd, size: size}}}}}}
model: {{name: small_cnn, params: {{width: 4}}}}
train: {{epochs: 1, lr: 0.01, eval_train: false}}
variants:
  - name: deep
    taps: {{aux1: {{layer: block1, head: {{type: linear}}}}, aux2: {{layer: block1, head: {{type: linear}}}}}}
    tasks: [{{name: aux1, source: aux1, target: odd, weight: 0.3}},
            {{name: aux2, source: aux2, target: size, loss: mse, weight: 0.1}}]
"""


def test_auxloss_run_trains_on_a_saved_dataset(datasets, saved, tmp_path: Path) -> None:
    root, rows = saved
    # An auxiliary label column: whether the id is odd.
    with_odd = datasets.load_from_disk(str(root)).map(lambda r: {"odd": r["row"] % 2})
    with_odd.save_to_disk(str(tmp_path / "odd"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.format(root=tmp_path / "odd"))
    # The data the run trains on: each item is one source row (found by its pixels), the aux label computed from it.
    splits = build_data(load_config(cfg), 0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 8, 6]
    for split in splits:
        source = rows["test" if split == "test" else "train"]
        for i in range(len(splits[split])):
            item = splits[split][i]
            found = [j for j, px in enumerate(source["pixels"]) if torch.equal(item["input"], _expected_image(px))]
            assert len(found) == 1
            assert int(item["target"]) == source["label"][found[0]] and int(item["odd"]) == source["row"][found[0]] % 2
            assert float(item["size"]) == float(np.float32(source["size"][found[0]]))
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--workers", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["data"]["name"] == "hf" and "deep" in json.dumps(results["variants"])


# -- errors ---------------------------------------------------------------------------------------------------------


def test_a_missing_root_and_a_hub_name_say_nothing_is_downloaded(datasets, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AuxLossError, match=r"'ylecun/mnist' is not a local path .* never downloads.*"
                                           r"load_dataset\('ylecun/mnist'\)\.save_to_disk\(PATH\)"):
        load_hf_dataset("ylecun/mnist")
    with pytest.raises(AuxLossError, match=r"Hugging Face dataset path .*no-such/data does not exist"):
        load_hf_dataset(tmp_path / "no-such" / "data")


def test_a_folder_that_is_neither_saved_nor_parquet(datasets, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(AuxLossError, match=r"neither a saved Hugging Face dataset .* nor parquet data; it holds "
                                           r"\['notes.txt'\]"):
        load_hf_dataset(tmp_path)
    with pytest.raises(AuxLossError, match=r"neither .* it is a \.txt file"):
        load_hf_dataset(tmp_path / "notes.txt")


def test_bad_columns_are_named_with_the_columns_present(datasets, saved, tmp_path: Path) -> None:
    root, _ = saved
    with pytest.raises(AuxLossError, match=r"column\(s\) \['lable'\] are not in .* its columns are \['image', "
                                           r"'label', 'row', 'size', 'vec'\] \(did you mean 'label'\?\)"):
        load_hf_dataset(root, columns={"input": "image", "target": "lable"})
    odd = tmp_path / "odd"
    rows = {"text": ["a", "b"], "ragged": [[1.0, 2.0], [3.0]], "label": [0, -1], "gap": [1, None]}
    features = datasets.Features({"text": datasets.Value("string"), "ragged": datasets.List(datasets.Value("float32"))
                                  if hasattr(datasets, "List") else datasets.Sequence(datasets.Value("float32")),
                                  "label": datasets.ClassLabel(names=["a", "b"]), "gap": datasets.Value("int64")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(odd))
    with pytest.raises(AuxLossError, match=r"column 'text' .* holds text, not numbers.* tokenize it first"):
        load_hf_dataset(odd, columns=["text"])
    with pytest.raises(AuxLossError, match=r"column 'label' .* 1 unlabelled row\(s\) \(label -1.*splits: \{test: "):
        load_hf_dataset(odd, columns=["label"])
    with pytest.raises(AuxLossError, match=r"column 'gap' .* 1 missing value\(s\)"):
        load_hf_dataset(odd, columns=["gap"])
    ragged = load_hf_dataset(odd, columns=["ragged"])
    assert ragged[0]["ragged"].tolist() == [1.0, 2.0]
    with pytest.raises(AuxLossError, match=r"row 1 of column 'ragged' .* shape \(1,\), the first row \(2,\).* Pad"):
        ragged[1]


def test_without_datasets_the_error_names_the_extra(saved, monkeypatch) -> None:
    root, _ = saved
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    assert not hf_available()
    with pytest.raises(MissingExtraError, match=r"datasets is not installed\. Install it with `pip install "
                                                r"auxloss\[hf\]`"):
        load_hf_dataset(root)
