"""Device assignment of worker processes on a machine with several GPUs (pure logic: no GPU needed)."""

import pytest
import torch

from auxloss.errors import AuxLossError
from auxloss.experiment.devices import parse_gpus, worker_devices


def test_one_worker_per_gpu_by_default() -> None:
    assert worker_devices([0, 1, 2]) == ["cuda:0", "cuda:1", "cuda:2"]


def test_several_runs_share_a_gpu_round_robin() -> None:
    devices = worker_devices([0, 3], per_gpu=3)
    assert devices == ["cuda:0", "cuda:3", "cuda:0", "cuda:3", "cuda:0", "cuda:3"]
    # every GPU holds the same number of concurrent runs, at most per_gpu
    assert {d: devices.count(d) for d in set(devices)} == {"cuda:0": 3, "cuda:3": 3}


def test_explicit_worker_count_is_spread_and_capped() -> None:
    assert worker_devices([0, 1], per_gpu=2, workers=3) == ["cuda:0", "cuda:1", "cuda:0"]
    with pytest.raises(AuxLossError, match="raise --per-gpu"):
        worker_devices([0, 1], per_gpu=1, workers=3)


@pytest.mark.parametrize(("spec", "available", "expected"), [("all", 4, [0, 1, 2, 3]), ("0,2", 4, [0, 2]),
                                                             (" 1 ", 2, [1])])
def test_parse_gpus(spec: str, available: int, expected: list[int]) -> None:
    assert parse_gpus(spec, available) == expected


@pytest.mark.parametrize(("spec", "available", "message"), [
    ("all", 0, "no CUDA device"), ("0,0", 2, "distinct"), ("2", 2, "GPU 2 does not exist"), ("x", 2, "indices"),
    ("0", 0, "no CUDA device"),
])
def test_parse_gpus_rejects_bad_input(spec: str, available: int, message: str) -> None:
    with pytest.raises(AuxLossError, match=message):
        parse_gpus(spec, available)


def test_per_gpu_must_be_positive() -> None:
    with pytest.raises(AuxLossError, match="per-gpu"):
        worker_devices([0], per_gpu=0)


def _data(seed: int) -> dict:
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return {"train": TensorDataset(x[:32], y[:32]), "val": TensorDataset(x[32:48], y[32:48]),
            "test": TensorDataset(x[48:], y[48:])}


def _model(seed: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_train_on_their_assigned_gpu(tmp_path) -> None:
    import auxloss as al
    from auxloss.experiment.runner import run
    from auxloss.experiment.spec import Experiment

    variant = al.Variant("deep", taps={"h": al.Tap("1", al.LinearHead(2))}, tasks=[al.Task("h", source="h")])
    exp = Experiment(model=_model, data=_data, variants=[variant], seeds=1, train={"epochs": 1, "eval_train": False})
    devices = worker_devices(parse_gpus("all", torch.cuda.device_count()))[:1]
    res = run(exp, tmp_path / "o", devices=devices)
    assert res["runs"]["done"] == 2 and res["runs"]["failed"] == 0
