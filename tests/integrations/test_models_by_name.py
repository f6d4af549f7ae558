"""Models by name (torchvision:/timm:): the resolution logic against fake modules, the real ones when importable.

PyPI's torchvision wheel does not import beside a CPU-only torch build (``operator torchvision::nms does not
exist``), and timm needs torchvision, so the logic is tested here with fake ``torchvision``/``timm`` modules put in
``sys.modules``; the tests of the real packages skip when they cannot be imported.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from torch import nn

import auxloss as al
from auxloss.cli import main
from auxloss.integrations import MissingExtraError
from auxloss.integrations.models import example_input, list_models, resolve_model


class FakeNet(nn.Module):
    """A small CNN standing in for a torchvision/timm classifier."""

    def __init__(self, num_classes: int = 1000, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def fake_detector(*, weights=None, weights_backbone="IMAGENET1K_V1", num_classes=91):
    """Like torchvision's detection builders: the backbone's weights default to a download."""
    net = FakeNet(num_classes)
    net.weights_backbone = weights_backbone
    return net


@pytest.fixture
def fake_torchvision(monkeypatch):
    calls = []
    builders = {"fake_net": lambda *, weights=None, **kw: FakeNet(**kw), "fake_detector": fake_detector,
                "resnet18": lambda *, weights=None, **kw: FakeNet(**kw)}
    models = types.ModuleType("torchvision.models")

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        return builders[name](**kwargs)

    models.get_model = get_model
    models.list_models = lambda: sorted(builders)
    models.get_model_builder = lambda name: builders[name]
    tv = types.ModuleType("torchvision")
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    return calls


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []
    timm = types.ModuleType("timm")
    names = ["fake_net", "resnet18", "resnet34"]

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return FakeNet(**kwargs)

    timm.create_model = create_model
    timm.list_models = lambda: list(names)
    timm.is_model = lambda name: name.split(".")[0] in names
    monkeypatch.setitem(sys.modules, "timm", timm)
    return calls


# -- torchvision ------------------------------------------------------------------------------------------------
def test_torchvision_is_built_without_weights(fake_torchvision):
    net = resolve_model("torchvision:fake_net", num_classes=7)
    assert isinstance(net, FakeNet)
    assert fake_torchvision == [("fake_net", {"weights": None, "num_classes": 7})]
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    resolve_model("torchvision:fake_net", width=2)  # num_classes=None keeps the library's default
    assert fake_torchvision[-1] == ("fake_net", {"weights": None, "width": 2})


def test_torchvision_backbone_weights_are_never_downloaded(fake_torchvision):
    net = resolve_model("torchvision:fake_detector", num_classes=3)
    assert net.weights_backbone is None
    with pytest.raises(al.AuxLossError, match="never downloads"):
        resolve_model("torchvision:fake_detector", weights_backbone="DEFAULT")
    with pytest.raises(al.AuxLossError, match="never downloads"):
        resolve_model("torchvision:fake_net", weights="IMAGENET1K_V1")


def test_unknown_torchvision_name_lists_close_matches(fake_torchvision):
    with pytest.raises(al.AuxLossError, match="Did you mean 'torchvision:fake_net'") as err:
        resolve_model("torchvision:fake_nett")
    assert "list_models('torchvision')" in str(err.value)
    assert list_models("torchvision") == ["fake_detector", "fake_net", "resnet18"]


def test_unknown_prefix_suggests_the_right_one():
    with pytest.raises(al.AuxLossError, match="Did you mean 'torchvision:resnet18'"):
        resolve_model("torchvison:resnet18")
    with pytest.raises(al.AuxLossError, match="'timm:resnet18'"):
        resolve_model("tim:resnet18")
    with pytest.raises(al.AuxLossError, match="no source prefix"):
        resolve_model("resnet18")
    with pytest.raises(al.AuxLossError, match="names no model"):
        resolve_model("timm:")


def test_pretrained_is_refused_with_a_way_to_load_local_weights(fake_torchvision, fake_timm):
    for name in ("torchvision:fake_net", "timm:fake_net"):
        with pytest.raises(al.AuxLossError) as err:
            resolve_model(name, pretrained=True)
        msg = str(err.value)
        assert "never downloads weights at run time" in msg and "checkpoint=" in msg and "load_state_dict" in msg
    assert fake_torchvision == [] and fake_timm == []  # nothing was built
    with pytest.raises(al.AuxLossError, match="never downloads"):
        resolve_model("timm:hf-hub:org/model")


def test_local_checkpoint_is_loaded(fake_torchvision, tmp_path):
    source = FakeNet(5)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    for file in ("w.pth", "wrapped.pth"):
        net = resolve_model("torchvision:fake_net", num_classes=5, checkpoint=tmp_path / file)
        for a, b in zip(net.state_dict().values(), source.state_dict().values()):
            assert torch.equal(a, b)
    with pytest.raises(al.AuxLossError, match="does not fit the model"):
        resolve_model("torchvision:fake_net", num_classes=9, checkpoint=tmp_path / "w.pth")
    with pytest.raises(al.AuxLossError, match="does not exist"):
        resolve_model("torchvision:fake_net", checkpoint=tmp_path / "missing.pth")


def test_missing_torchvision_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(MissingExtraError) as err:
        resolve_model("torchvision:resnet18")
    msg = str(err.value)
    assert "pip install auxloss[vision]" in msg and "torchvision::nms" in msg
    assert isinstance(err.value, ImportError) and isinstance(err.value, al.AuxLossError)


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingExtraError, match=r"pip install auxloss\[timm\]"):
        resolve_model("timm:resnet18")


def test_a_torchvision_that_fails_to_import_is_reported(monkeypatch):
    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *args, **kwargs)

    monkeypatch.setattr("auxloss._extras.importlib.import_module", broken)
    with pytest.raises(MissingExtraError, match="cannot be imported .RuntimeError: operator torchvision::nms"):
        resolve_model("torchvision:resnet18")


# -- timm -------------------------------------------------------------------------------------------------------
def test_timm_is_built_without_pretrained_weights(fake_timm):
    net = resolve_model("timm:resnet18", num_classes=4)
    assert isinstance(net, FakeNet)
    assert fake_timm == [("resnet18", False, {"num_classes": 4})]
    resolve_model("timm:resnet18.a1_in1k")  # a weight tag still names a known architecture
    with pytest.raises(al.AuxLossError, match="Did you mean 'timm:resnet18' or 'timm:resnet34'"):
        resolve_model("timm:resnet19")


# -- example input, CLI, configs --------------------------------------------------------------------------------
def test_example_input_is_a_fixed_image_batch():
    state = torch.get_rng_state()
    x = example_input("torchvision:resnet18", size=32)
    assert x.shape == (1, 3, 32, 32)
    assert torch.equal(x, example_input("timm:anything", size=32))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert example_input("timm:x").shape == (1, 3, 224, 224)
    with pytest.raises(al.AuxLossError, match="positive integer"):
        example_input("timm:x", size=0)


def test_cli_layers_lists_a_torchvision_model(fake_torchvision, capsys):
    assert main(["layers", "torchvision:fake_net", "--size", "16", "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "features.2" in out and "Tensor(1, 8, 8, 8)" in out and "fc" in out and "Tensor(1, 3)" in out
    assert "input (1, 3, 16, 16)" in out
    assert fake_torchvision[0] == ("fake_net", {"weights": None, "num_classes": 3})


def test_cli_layers_errors_are_one_line(fake_torchvision, monkeypatch, capsys):
    assert main(["layers", "torchvision:fake_nt"]) == 2
    assert "Did you mean 'torchvision:fake_net'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "timm", None)
    assert main(["layers", "timm:resnet18"]) == 2
    assert "pip install auxloss[timm]" in capsys.readouterr().err


CONFIG = {
    "name": "by-name",
    "seeds": 1,
    "data": {"name": "shapes", "n_train": 32, "n_val": 16, "n_test": 16, "batch_size": 16,
             "params": {"image_size": 16}},
    "model": {"name": "torchvision:fake_net", "params": {"width": 2}},
    "train": {"epochs": 1, "lr": 0.01, "eval_train": False},
    "variants": [{"name": "deep", "taps": {"aux1": {"layer": "features.1", "head": {"type": "linear"}}},
                  "tasks": [{"name": "aux1", "source": "aux1", "weight": 0.3}]}],
}


def test_config_model_by_name_builds_and_trains(fake_torchvision):
    from auxloss.experiment.build import build_model, build_run
    from auxloss.experiment.config import parse_config

    cfg = parse_config(CONFIG)
    built = build_run(cfg, "deep", seed=0, device="cpu")
    assert isinstance(built.model, al.AuxModel) and isinstance(built.model.model, FakeNet)
    # num_classes is read from the data (6 shapes) and params reach the constructor
    assert fake_torchvision[0] == ("fake_net", {"weights": None, "width": 2, "num_classes": 6})
    result = built.trainer.fit(built.model, built.objective, built.loaders["train"], built.loaders["val"])
    assert "val/metric/main" in result.best
    assert isinstance(build_model(cfg, built.data["train"]), FakeNet)


# -- the real packages, where they import ------------------------------------------------------------------------
def _import_or_skip(module: str):
    # pytest.importorskip would not do: PyPI's torchvision beside a CPU-only torch fails with a RuntimeError.
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001
        extra = {"torchvision": "vision", "timm": "timm"}[module]
        pytest.skip(f"{module} cannot be imported here ({type(exc).__name__}: {str(exc)[:120]}); run this test "
                    f"after `pip install auxloss[{extra}]` with a torchvision built for this torch")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18"])
def test_real_model_by_name(name):
    _import_or_skip(name.split(":")[0])
    net = resolve_model(name, num_classes=10)
    x = example_input(name, size=64)
    layers = [info.name for info in al.list_layers(net, x, max_depth=1)]
    assert "layer3" in layers
    model = al.attach(net, {"aux": al.Tap("layer3", al.LinearHead(10))}, example_input=x)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.main.shape == (2, 10) and out.aux["aux"].shape == (2, 10)


@pytest.mark.integration
def test_real_torchvision_cli_layers(capsys):
    _import_or_skip("torchvision")
    assert main(["layers", "torchvision:resnet18", "--depth", "1", "--size", "64"]) == 0
    assert "layer4" in capsys.readouterr().out
