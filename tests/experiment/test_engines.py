"""The paired comparison trained by ``lightning.Trainer`` (the Lightning engine) is the same comparison: the same
runner, store, statistics and report, and, where both engines do the same computation, the same numbers bit for
bit as auxloss's own Trainer (the reference), epoch by epoch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import auxloss as al
from auxloss.experiment.config import load_config
from auxloss.experiment.runner import STORE_FILE, run_experiment
from auxloss.experiment.store import Store

try:
    import lightning as L
except ImportError:  # pragma: no cover - depends on the extra
    L = None

pytestmark = [
    pytest.mark.skipif(L is None, reason="lightning is not installed (pip install 'auxloss[lightning]')"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),  # lightning vs new torch
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "my_project"


class DropNet(nn.Module):
    """Dropout makes the global RNG's use part of the computation: it must be drawn in the same order."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 16), nn.Tanh())
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


def make_model(seed: int) -> nn.Module:
    return DropNet()


def make_data(seed: int) -> dict[str, Dataset]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(100, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return {"train": TensorDataset(x[:60], y[:60]), "val": TensorDataset(x[60:80], y[60:80]),
            "test": TensorDataset(x[80:], y[80:])}


def deep() -> al.Variant:
    return al.Variant("deep", taps={"mid": al.Tap("body.1", al.LinearHead(3))},
                      tasks=[al.Task("mid", source="mid", weight=0.3)])


# Three epochs: the second and third epochs' shuffles and dropout masks depend on what each engine drew before.
TRAIN = {"epochs": 3, "optimizer": "sgd", "lr": 0.05, "lr_schedule": "cosine", "device": "cpu"}


def histories(out: Path) -> dict[tuple[str, int], list[dict]]:
    store = Store(out / STORE_FILE)
    return {(r["variant"], r["seed"]): [{k: v for k, v in rec.items() if k != "time"} for rec in r["history"]]
            for r in store.runs("done")}


def assert_same_runs(a: Path, b: Path, ra: dict, rb: dict) -> None:
    for va, vb in zip(ra["variants"], rb["variants"], strict=True):
        assert va["name"] == vb["name"] and va["main"] == vb["main"] and va["best_epochs"] == vb["best_epochs"]
    ha, hb = histories(a), histories(b)
    assert ha.keys() == hb.keys() and len(ha) == 4
    for key in ha:
        assert ha[key] == hb[key], key  # every epoch's train means, val and trainval metrics, lr: bit for bit


def test_lightning_engine_gives_the_auxloss_trainers_numbers_and_the_same_outputs(tmp_path: Path) -> None:
    kwargs = {"model": make_model, "data": make_data, "variants": [deep()], "seeds": 2, "train": TRAIN,
              "batch_size": 16}
    ref = al.compare(out=tmp_path / "aux", **kwargs)
    lit = al.compare(out=tmp_path / "lit", engine="lightning", **kwargs)
    # The same outputs: results.json (what compare returned), the report, the kept weights.
    assert json.loads((tmp_path / "lit" / "results.json").read_text()) == json.loads(json.dumps(lit))
    assert (tmp_path / "lit" / "report.html").exists() and (tmp_path / "lit" / "report.md").exists()
    assert [c["variant"] for c in lit["comparisons"]] == ["deep"] and lit["comparisons"][0]["seeds"] == [0, 1]
    assert_same_runs(tmp_path / "aux", tmp_path / "lit", ref, lit)
    history = histories(tmp_path / "lit")[("deep", 1)]
    assert [r["epoch"] for r in history] == [1, 2, 3] and [r["step"] for r in history] == [3, 6, 9]
    assert {"train/loss", "train/loss/mid", "train/weight/mid", "val/metric/main", "trainval/metric/main",
            "gap"} <= set(history[0])
    for variant in ("baseline", "deep"):
        for seed in ("0", "1"):
            wa = next(v for v in ref["variants"] if v["name"] == variant)["weights"][seed]
            wl = next(v for v in lit["variants"] if v["name"] == variant)["weights"][seed]
            for part in wa:
                sa = torch.load(tmp_path / "aux" / wa[part], weights_only=True)
                sl = torch.load(tmp_path / "lit" / wl[part], weights_only=True)
                assert sa.keys() == sl.keys() and all(torch.equal(sa[k], sl[k]) for k in sa)
    # Another engine is another experiment: the folder is not silently mixed.
    with pytest.raises(al.AuxLossError, match="another experiment"):
        al.compare(out=tmp_path / "aux", engine="lightning", **kwargs)


class LitNet:  # replaced below by a LightningModule subclass when lightning is installed
    pass


if L is not None:
    from auxloss.integrations.lightning import AuxLossMixin

    class LitNet(AuxLossMixin, L.LightningModule):  # type: ignore[no-redef]
        """A user's own module: it takes the runner's model and objective and chooses its optimizer."""

        built: ClassVar[list[str]] = []

        def __init__(self, model: nn.Module, objective: al.Objective) -> None:
            super().__init__()
            self.aux_model = model
            self.objective = objective

        def configure_optimizers(self):
            LitNet.built.append("sgd")
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_own_mixin_module_with_early_stopping_equals_the_auxloss_trainer(tmp_path: Path) -> None:
    from auxloss.experiment.engines import LightningEngine

    train = {"epochs": 4, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "patience": 1, "device": "cpu",
             "eval_train": False}
    kwargs = {"model": make_model, "data": make_data, "variants": [deep()], "seeds": 2, "train": train,
              "batch_size": 16, "main": al.Task("digit", target="target")}
    LitNet.built.clear()
    ref = al.compare(out=tmp_path / "aux", **kwargs)
    lit = al.compare(out=tmp_path / "lit", engine=LightningEngine(module=LitNet, trainer_kwargs={"deterministic": True}),
                     **kwargs)
    assert LitNet.built == ["sgd"] * 4  # the user's configure_optimizers trained every run
    assert lit["main_task"] == "digit"
    assert_same_runs(tmp_path / "aux", tmp_path / "lit", ref, lit)
    stopped = {(r["variant"], r["seed"]): r["result"]["stopped_early"] for r in Store(tmp_path / "lit" / STORE_FILE).runs("done")}
    reference = {(r["variant"], r["seed"]): r["result"]["stopped_early"] for r in Store(tmp_path / "aux" / STORE_FILE).runs("done")}
    assert stopped == reference


def test_yaml_engine_lightning_on_the_example_project_matches_the_auxloss_engine(tmp_path: Path) -> None:
    small = {"seeds": 2, "train.epochs": 2, "model.params.depth": 3, "data.params.n_train": 96,
             "data.params.n_val": 32, "data.params.n_test": 64, "data.batch_size": 32,
             "variants": [{"name": "deep-supervision", "taps": {"mid": {"layer": "body.1",
                                                                         "head": {"type": "linear", "out": 10}}},
                           "tasks": [{"name": "mid", "source": "mid", "weight": 0.3}]}]}
    ref = run_experiment(load_config(EXAMPLE / "experiment.yaml", small), tmp_path / "aux")
    cfg = load_config(EXAMPLE / "experiment.yaml", {**small, "train.engine": "lightning",
                                                    "train.lightning": {"trainer": {"deterministic": True}}})
    lit = run_experiment(cfg, tmp_path / "lit")
    assert lit["config"]["train"]["engine"] == "lightning"
    assert_same_runs(tmp_path / "aux", tmp_path / "lit", ref, lit)


@pytest.mark.parametrize(
    ("engine_kwargs", "train", "message"),
    [
        ({"trainer_kwargs": {"max_epochs": 5}}, {}, "'max_epochs' \\(set by train epochs\\)"),
        ({"module": lambda model, objective: LitNet(nn.Linear(8, 3), objective)}, {}, "must keep the given model"),
        ({"module": lambda model, objective: nn.Linear(1, 1)}, {}, "must return a LightningModule"),
        ({}, {"compile": True}, "compile=True is not supported by the Lightning engine"),
    ],
    ids=["reserved-option", "other-model", "not-a-module", "compile"],
)
def test_bad_lightning_setup_gets_a_clear_error(tmp_path: Path, engine_kwargs: dict, train: dict,
                                                message: str) -> None:
    from auxloss.experiment.engines import LightningEngine

    with pytest.raises(al.AuxLossError, match=message):
        al.compare(model=make_model, data=make_data, variants=[deep()], seeds=1, out=tmp_path / "o",
                   train={**TRAIN, "epochs": 1, **train}, engine=LightningEngine(**engine_kwargs))
    assert not (tmp_path / "o" / "results.json").exists()


def test_yaml_lightning_options_without_the_engine_are_refused(tmp_path: Path) -> None:
    with pytest.raises(al.AuxLossError, match="train.engine is not 'lightning'"):
        load_config(EXAMPLE / "experiment.yaml", {"train.lightning": {"trainer": {}}})
    with pytest.raises(al.AuxLossError, match="cannot differ between variants"):
        load_config(EXAMPLE / "experiment.yaml", {"variants": [{"name": "v", "train": {"engine": "lightning"}}]})


def test_engine_module_imports_without_lightning_and_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"  # an import of it now fails as if it were not installed
        "import auxloss.experiment.engines as e\n"
        "from auxloss.integrations import MissingExtraError\n"
        "try:\n"
        "    e.LightningEngine()\n"
        "except MissingExtraError as exc:\n"
        "    print(exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert "pip install auxloss[lightning]" in run.stdout
