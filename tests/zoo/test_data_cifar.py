"""CIFAR-10/100 from their python batch folders, read with the restricted unpickler.

The test writes small batch folders in the exact format of the real ones: Python 2 protocol-2 pickles of a dict
with bytes keys, ``b"data"`` a uint8 numpy array of shape (n, 3072) referred to as
``numpy.core.multiarray._reconstruct``, and the labels as lists of ints.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from auxloss.errors import AuxLossError
from auxloss.experiment.build import build_data
from auxloss.experiment.config import parse_config
from auxloss.zoo.data import CIFAR10_CLASSES, load_cifar10, load_cifar100, read_cifar_pickle


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str and bytes with Python 2's string opcodes, as the CIFAR files were written (cPickle, protocol 2)."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2_string(self, obj: str | bytes) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_string
    dispatch[str] = _save_py2_string


def _py2_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names its module numpy._core; the CIFAR files (numpy 1, 2009) say numpy.core.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _cifar10_folder(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    made = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = 2 + i % 3
        rows, labels = _rows(n, i), [(7 * i + j) % 10 for j in range(n)]
        batch = {b"batch_label": f"batch {i}", b"labels": labels, b"data": rows,
                 b"filenames": [f"img_{i}_{j}.png" for j in range(n)]}
        (folder / name).write_bytes(_py2_pickle(batch))
        made[name] = (rows, labels)
    meta = {b"num_cases_per_batch": 10000, b"label_names": list(CIFAR10_CLASSES), b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta))
    return made


def _pixel(row: np.ndarray, channel: int, y: int, x: int) -> float:
    """The format's layout: 1024 red, then 1024 green, then 1024 blue bytes, each a row-major 32 x 32 image."""
    return int(row[channel * 1024 + y * 32 + x]) / 255.0


def test_cifar10_reads_the_batches_in_order(tmp_path: Path) -> None:
    made = _cifar10_folder(tmp_path)
    train = load_cifar10(tmp_path)  # the folder holding cifar-10-batches-py
    order = [f"data_batch_{k}" for k in range(1, 6)]
    rows = np.concatenate([made[b][0] for b in order])
    labels = [y for b in order for y in made[b][1]]
    assert len(train) == len(rows) and train.tensors["target"].tolist() == labels
    vehicles = {"airplane", "automobile", "ship", "truck"}
    assert train.tensors["vehicle"].tolist() == [int(CIFAR10_CLASSES[y] in vehicles) for y in labels]
    assert train.classes == list(CIFAR10_CLASSES) and train.num_classes == {"target": 10, "vehicle": 2}
    x = train.tensors["input"]
    assert x.shape == (len(rows), 3, 32, 32) and x.dtype == torch.float32
    for i, c, yy, xx in [(0, 0, 0, 0), (3, 1, 5, 31), (len(rows) - 1, 2, 31, 7), (7, 2, 16, 16)]:
        assert float(train[i]["input"][c, yy, xx]) == pytest.approx(_pixel(rows[i], c, yy, xx), abs=1e-7)
    # Read per item, equal to dividing the whole uint8 array at once.
    whole = torch.from_numpy(rows.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    assert torch.equal(x[:], whole)
    test = load_cifar10(tmp_path / "cifar-10-batches-py", "test")  # or the folder itself
    assert test.tensors["target"].tolist() == made["test_batch"][1]
    batch = next(iter(DataLoader(train, batch_size=4)))
    assert set(batch) == {"input", "target", "vehicle"} and batch["input"].shape == (4, 3, 32, 32)


def test_cifar100_fine_and_coarse_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine, coarse = [0, 99, 42, 7], [4, 19, 0, 11]
    rows = _rows(4, 5)
    for name in ("train", "test"):
        batch = {b"filenames": ["a", "b", "c", "d"], b"batch_label": name, b"fine_labels": fine,
                 b"coarse_labels": coarse, b"data": rows}
        (folder / name).write_bytes(_py2_pickle(batch))
    meta = {b"fine_label_names": [f"fine{i}" for i in range(100)],
            b"coarse_label_names": [f"coarse{i}" for i in range(20)]}
    (folder / "meta").write_bytes(_py2_pickle(meta))
    ds = load_cifar100(tmp_path)
    assert ds.tensors["target"].tolist() == fine and ds.tensors["coarse"].tolist() == coarse
    assert ds.num_classes == {"target": 100, "coarse": 20}
    assert ds.classes[42] == "fine42" and ds.class_names["coarse"][19] == "coarse19"
    assert float(ds[2]["input"][1, 3, 4]) == pytest.approx(_pixel(rows[2], 1, 3, 4), abs=1e-7)
    # The coarse label as an auxiliary task, through a config.
    cfg = parse_config({"data": {"name": "cifar100", "root": str(tmp_path), "n_train": 2, "n_val": 1,
                                 "n_test": 2}, "variants": [{"name": "v"}]})
    splits = build_data(cfg, 3)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 1, 2]
    assert set(splits["train"].tensors) == {"input", "target", "coarse"}
    assert splits["train"].tensors["input"].shape == (2, 3, 32, 32)


class _Payload:
    """Unpickling this would run os.system (the classic pickle attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_before_running(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    evil = _py2_pickle({b"data": _Payload(marker), b"labels": [0]})
    (folder / "test_batch").write_bytes(evil)
    with pytest.raises(AuxLossError, match=r"asks to load (posix|nt|os)\.system.*refusing") as err:
        load_cifar10(folder, "test")
    assert "test_batch" in str(err.value)
    assert not marker.exists()

    # Other globals a real batch never names: builtins, numpy functions beyond array reconstruction.
    for module, name in [("builtins", "eval"), ("numpy", "load"), ("numpy.core.multiarray", "scalar"),
                         ("subprocess", "Popen")]:
        crafted = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00."
        path = tmp_path / f"{module}-{name}"
        path.write_bytes(crafted)
        with pytest.raises(AuxLossError, match=rf"asks to load {module}\.{name}"):
            read_cifar_pickle(path)

    # numpy.ndarray itself resolves to an inert marker: calling it is refused, not run.
    call_ndarray = b"\x80\x02cnumpy\nndarray\nq\x00K\x05\x85q\x01Rq\x02."
    (tmp_path / "call").write_bytes(call_ndarray)
    with pytest.raises(AuxLossError, match="not a readable CIFAR pickle"):
        read_cifar_pickle(tmp_path / "call")


def test_object_dtype_and_damaged_arrays_are_refused(tmp_path: Path) -> None:
    good = _py2_pickle({b"data": _rows(2, 0), b"labels": [1, 2]})
    # The same pickle whose dtype code says object ('O8' has the length of 'u1' plus one, so rewrite fully).
    assert b"U\x02u1" in good
    path = tmp_path / "objects"
    path.write_bytes(good.replace(b"U\x02u1", b"U\x02O8"))
    with pytest.raises(AuxLossError, match="dtype 'O8'"):
        read_cifar_pickle(path)
    # Pixel bytes cut short: the array state no longer matches its shape.
    start = good.index(b"T\x00\x18\x00\x00")  # BINSTRING of 2 * 3072 = 6144 bytes
    short = good[:start] + b"T\x00\x17\x00\x00" + good[start + 5:start + 5 + 5888] + good[start + 5 + 6144:]
    path.write_bytes(short)
    with pytest.raises(AuxLossError, match="6144 bytes.*with 5888 bytes"):
        read_cifar_pickle(path)
    path.write_bytes(good[:100])
    with pytest.raises(AuxLossError, match="not a readable CIFAR pickle"):
        read_cifar_pickle(path)
    # The pickle itself is fine, but the batch is not: wrong row length, labels missing or out of range.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for batch, fragment in [
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"uint8 of shape \(n, 3072\)"),
        ({b"data": _rows(2, 0)}, r"b'labels'.*one integer label per image \(2\)"),
        ({b"data": _rows(2, 0), b"labels": [0, 10]}, "outside 0-9"),
    ]:
        (folder / "test_batch").write_bytes(_py2_pickle(batch))
        with pytest.raises(AuxLossError, match=fragment):
            load_cifar10(tmp_path, "test")


def test_cifar_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(AuxLossError, match=r"does not exist.*cifar-10-batches-py.*Nothing is\s+downloaded"):
        load_cifar10(tmp_path / "nowhere")
    _cifar10_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(AuxLossError, match=r"lacks \['data_batch_4'\]"):
        load_cifar10(tmp_path)
    assert len(load_cifar10(tmp_path, "test")) == 4  # the test split does not need it
    with pytest.raises(AuxLossError, match="split must be 'train' or 'test'"):
        load_cifar10(tmp_path, "val")
    with pytest.raises(AuxLossError, match="holds no test"):
        load_cifar100(tmp_path)
