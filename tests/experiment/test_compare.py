"""The paired comparison on the user's own model and data: ``auxloss.compare`` and ``auxloss run`` with
``module:function`` share one runner, keep the pairing, and refuse what would break it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _user_model import Net, make_model
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import auxloss as al
from auxloss.experiment.assemble import batch_hash, make_loaders, state_hash
from auxloss.experiment.spec import Variant

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "my_project"


def make_data(seed: int) -> dict[str, Dataset]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(120, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return {"train": TensorDataset(x[:80], y[:80]), "val": TensorDataset(x[80:100], y[80:100]),
            "test": TensorDataset(x[100:], y[100:])}


def deep_variant() -> Variant:
    return al.Variant("deep", taps={"mid": al.Tap("body.1", al.LinearHead(3))},
                      tasks=[al.Task("mid", source="mid", weight=0.3)])


TRAIN = {"epochs": 2, "lr": 1e-2, "device": "cpu", "eval_train": False}


def test_compare_on_tuple_data_writes_results_report_and_weights(tmp_path: Path) -> None:
    res = al.compare(model=make_model, data=make_data, variants=[deep_variant()], seeds=2, out=tmp_path / "o",
                     train=TRAIN, batch_size=16)
    on_disk = json.loads((tmp_path / "o" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert [v["name"] for v in res["variants"]] == ["baseline", "deep"]
    assert res["comparisons"][0]["variant"] == "deep" and res["comparisons"][0]["seeds"] == [0, 1]
    assert (tmp_path / "o" / "report.html").exists() and (tmp_path / "o" / "report.md").exists()
    # The kept weights: the trunk loads into the user's own class, strictly, from a tensors-only file.
    deep = next(v for v in res["variants"] if v["name"] == "deep")
    paths = deep["weights"]["0"]
    state = torch.load(tmp_path / "o" / paths["trunk"], weights_only=True)
    net = Net()
    net.load_state_dict(state, strict=True)
    heads = torch.load(tmp_path / "o" / paths["heads"], weights_only=True)
    assert any(k.startswith("mid") for k in heads)
    # The kept weights are the evaluated ones: the test metric recomputed from them matches the stored one.
    test = make_data(0)["test"]
    with torch.no_grad():
        acc = (net(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    assert acc == pytest.approx(deep["main"][0], abs=1e-6)


def test_rerun_resumes_without_training(tmp_path: Path) -> None:
    calls = []

    def counted(seed: int) -> nn.Module:
        calls.append(seed)
        return Net()

    kwargs = {"data": make_data, "variants": [deep_variant()], "seeds": 1, "out": tmp_path / "o", "train": TRAIN}
    first = al.compare(model=counted, **kwargs)
    n = len(calls)
    assert n == 4  # the preflight builds baseline and deep once (nothing claimed yet), then their two runs
    second = al.compare(model=counted, **kwargs)
    assert len(calls) == n  # nothing trained again
    assert second["comparisons"] == first["comparisons"]


def test_main_task_with_any_name(tmp_path: Path) -> None:
    res = al.compare(model=make_model, data=make_data, variants=[deep_variant()], seeds=1, out=tmp_path / "o",
                     train={**TRAIN, "patience": 1}, main=al.Task("digit", target="target"))
    assert res["main_task"] == "digit" and res["metric"] == "accuracy"
    assert all(0.0 <= v["mean"] <= 1.0 for v in res["variants"])


def test_same_seed_gives_same_trunk_and_order_with_workers(tmp_path: Path) -> None:
    # Independent reference for the order: the permutation drawn from a generator seeded alike.
    class Indexed(Dataset):
        def __len__(self) -> int:
            return 50

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input": torch.tensor([float(i)]), "target": torch.tensor(i % 3)}

    splits = {"train": Indexed(), "val": Indexed(), "test": Indexed()}
    orders = []
    for workers in (0, 2):
        loaders = make_loaders(splits, batch_size=10, eval_batch_size=50, seed=7,
                               options={"num_workers": workers, "persistent_workers": workers > 0})
        orders.append([int(v) for b in loaders["train"] for v in b["input"].flatten()])
    # A DataLoader draws its workers' base seed from the generator first, then the sampler's permutation.
    g = torch.Generator().manual_seed(7)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    expected = torch.randperm(50, generator=g).tolist()
    assert orders[0] == expected and orders[1] == expected
    torch.manual_seed(3)
    a = state_hash(make_model(3))
    torch.manual_seed(3)
    assert state_hash(make_model(3)) == a


def test_user_shuffling_loader_is_reseeded(tmp_path: Path) -> None:
    ds = TensorDataset(torch.arange(40.0).unsqueeze(1), torch.zeros(40, dtype=torch.long))
    splits = {"train": DataLoader(ds, batch_size=8, shuffle=True), "val": ds, "test": ds}
    first = [batch_hash(b) for b in make_loaders(splits, batch_size=8, eval_batch_size=8, seed=1, options={})["train"]]
    torch.manual_seed(999)  # the global stream must not matter
    again = [batch_hash(b) for b in make_loaders(splits, batch_size=8, eval_batch_size=8, seed=1, options={})["train"]]
    assert first == again


def test_nondeterministic_model_factory_is_refused(tmp_path: Path) -> None:
    count = []

    def drifting(seed: int) -> nn.Module:
        count.append(1)
        net = Net()
        with torch.no_grad():
            net.out.bias.add_(len(count))  # a different initialisation on every call
        return net

    with pytest.raises(al.AuxLossError, match="different initial weights"):
        al.compare(model=drifting, data=make_data, variants=[deep_variant()], seeds=1, out=tmp_path / "o",
                   train=TRAIN)
    assert not (tmp_path / "o" / "results.json").exists()


def test_nondeterministic_data_is_refused(tmp_path: Path) -> None:
    count = []

    def drifting(seed: int) -> dict[str, Dataset]:
        count.append(1)
        return make_data(seed + len(count))

    with pytest.raises(al.AuxLossError, match="first training batch"):
        al.compare(model=make_model, data=drifting, variants=[deep_variant()], seeds=1, out=tmp_path / "o",
                   train=TRAIN)


def test_iterable_training_data_streams_without_len(tmp_path: Path) -> None:
    class Stream(IterableDataset):
        def __init__(self, seed: int) -> None:
            self.seed = seed

        def __iter__(self):
            g = torch.Generator().manual_seed(self.seed)
            for _ in range(64):
                x = torch.randn(8, generator=g)
                yield x, (x[0] > 0).long()

    def data(seed: int) -> dict[str, Dataset]:
        held = make_data(seed)
        return {"train": Stream(seed), "val": held["val"], "test": held["test"]}

    res = al.compare(model=make_model, data=data, variants=[deep_variant()], seeds=1, out=tmp_path / "o",
                     train=TRAIN, batch_size=16)
    assert res["runs"]["done"] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": lambda seed: "not a module"}, "must return a torch.nn.Module"),
        ({"data": lambda seed: {"train": make_data(0)["train"]}}, r"no \['val', 'test'\] split"),
        ({"data": lambda seed: {**make_data(0), "test": [1, 2, 3]}}, "must be a torch Dataset or DataLoader"),
        ({"batch_keys": ("input",)}, "tuple batch has 2 items"),
        ({"variants": [al.Variant("x", taps={"mid": al.Tap("body.1", al.LinearHead(3))},
                                  tasks=[al.Task("mid", source="mid", target="colour")])]}, "colour"),
    ],
    ids=["wrong-type", "missing-splits", "bad-split", "batch-structure", "absent-target"],
)
def test_bad_input_gets_clear_error_and_writes_no_results(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"model": make_model, "data": make_data, "variants": [deep_variant()], "seeds": 1,
            "out": tmp_path / "o", "train": TRAIN, **kwargs}
    with pytest.raises(al.AuxLossError, match=message):
        al.compare(**args)
    assert not (tmp_path / "o" / "results.json").exists()


def test_iterable_data_with_a_length_dependent_option_is_refused(tmp_path: Path) -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(32):
                yield torch.randn(8), torch.tensor(i % 3)

    def data(seed: int) -> dict[str, Dataset]:
        return {**make_data(seed), "train": Stream()}

    with pytest.raises(al.AuxLossError, match="length"):
        al.compare(model=make_model, data=data, variants=[deep_variant()], seeds=1, out=tmp_path / "o",
                   train={**TRAIN, "lr_schedule": "cosine"})


def test_variant_with_a_tap_but_no_task_is_refused() -> None:
    with pytest.raises(al.AuxLossError, match="taps but no task"):
        al.Variant("x", taps={"mid": al.Tap("body.1", al.LinearHead(3))})


def test_yaml_module_function_and_python_api_give_identical_numbers(tmp_path: Path) -> None:
    # Run from another folder: the config's own folder makes my_project importable.
    cfg = EXAMPLE / "experiment.yaml"
    run = subprocess.run([sys.executable, "-m", "auxloss", "run", str(cfg), "--out", str(tmp_path / "yaml"),
                          "--seeds", "2"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stderr
    from_yaml = json.loads((tmp_path / "yaml" / "results.json").read_text())
    sys.path.insert(0, str(EXAMPLE))
    try:
        import compare as example  # examples/my_project/compare.py

        from_py = example.main(out=str(tmp_path / "py"), seeds=2, epochs=5)
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("compare", None)
    for a, b in zip(from_yaml["variants"], from_py["variants"], strict=True):
        assert a["name"] == b["name"] and a["main"] == b["main"]


def test_missing_user_module_names_module_function_and_path(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: 'nowhere_pkg.models:build'}\ndata: {name: 'nowhere_pkg.data:build'}\n")
    run = subprocess.run([sys.executable, "-m", "auxloss", "run", str(cfg), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=tmp_path, check=False)
    assert run.returncode != 0
    assert "nowhere_pkg" in run.stderr and str(tmp_path) in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o" / "results.json").exists()
