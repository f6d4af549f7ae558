"""The training settings are defined once (TrainOptions): the YAML config, build_run and the Trainer stay in sync."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

import auxloss as al
from auxloss.train import Trainer, TrainOptions
from auxloss.train.options import option_specs
from auxloss.train.trainer import _OPTION_ATTRIBUTE

TINY = {
    "name": "options",
    "seeds": 1,
    "data": {"name": "shapes", "n_train": 16, "n_val": 8, "n_test": 8, "batch_size": 8,
             "params": {"image_size": 16}},
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "variants": [{"name": "deep", "taps": {"aux1": {"layer": "block1", "head": {"type": "linear"}}},
                  "tasks": [{"name": "aux1", "source": "aux1", "weight": 0.3}],
                  "train": {"momentum": 0.25, "epochs": 7}}],
}


def _other_value(spec: Any) -> Any:
    """A valid value of a setting that differs from its default, built from its declared rules."""
    if spec.choices is not None:
        return next(c for c in spec.choices if not (c == spec.default and type(c) is type(spec.default)))
    if spec.kind is bool:
        return not spec.default
    if spec.kind is int:
        return (spec.default or spec.ge or 1) + 2
    if spec.kind is float:
        return 0.5 if spec.default is None else spec.default * 2 + 0.25
    if spec.name == "device":
        return "cpu"
    raise AssertionError(f"add a non-default value for the new setting {spec.name!r} to this test")


def _attribute(trainer: Trainer, name: str) -> Any:
    return getattr(trainer, _OPTION_ATTRIBUTE.get(name, name))


def _expected(name: str, value: Any) -> Any:
    return torch.device(value) if name == "device" else value


def test_every_setting_goes_from_yaml_to_the_trainer(tmp_path: Path) -> None:
    import yaml

    from auxloss.experiment.build import build_run
    from auxloss.experiment.config import load_config

    values = {spec.name: _other_value(spec) for spec in option_specs()}
    assert all(values[s.name] != s.default for s in option_specs())
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**TINY, "train": values}))
    cfg = load_config(path)
    trainer = build_run(cfg, "baseline", 0).trainer
    for name, value in values.items():
        assert _attribute(trainer, name) == _expected(name, value), name
    # A variant's own `train:` overrides reach its trainer, and only its trainer.
    deep = build_run(cfg, "deep", 0).trainer
    assert (deep.momentum, deep.epochs, deep.lr) == (0.25, 7, values["lr"])
    assert trainer.momentum == values["momentum"]


def test_the_config_has_exactly_the_trainer_settings() -> None:
    from auxloss.experiment.config import TrainConfig

    names = {spec.name for spec in option_specs()}
    # compare_on, engine and lightning are the experiment's (which split, which loop), not the loop's own settings
    assert set(TrainConfig.model_fields) == names | {"compare_on", "engine", "lightning"}
    assert TrainConfig().options() == TrainOptions()
    for spec in option_specs():
        assert TrainConfig.model_fields[spec.name].default == spec.default == getattr(TrainOptions(), spec.name)
    # No setting is spelled a second time in the Trainer's signature: they all arrive through TrainOptions.
    assert not names & set(inspect.signature(Trainer.__init__).parameters)


@pytest.mark.parametrize("spec", option_specs(), ids=lambda s: s.name)
def test_every_setting_is_a_trainer_keyword(spec: Any) -> None:
    value = _other_value(spec)
    trainer = Trainer(**{spec.name: value})
    assert _attribute(trainer, spec.name) == _expected(spec.name, value)
    assert getattr(trainer.options, spec.name) == value
    # The same setting given through an options object, overridden by a keyword.
    again = Trainer(TrainOptions(**{spec.name: value}), epochs=3)
    assert _attribute(again, spec.name) == _expected(spec.name, 3 if spec.name == "epochs" else value)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr", float("inf"), "lr must be a positive finite number, got inf"),  # pydantic's gt=0 lets inf through
    ("momentum", -0.5, "momentum"),
    ("epochs", 0, "epochs"),
    ("log_every", 0, "log_every"),
    ("checkpoint_every", 0, "checkpoint_every"),
    ("amp", "fp8", "amp"),
    ("optimizer", "lbfgs", "optimizer"),
])
def test_a_bad_setting_fails_in_the_config_and_the_trainer_alike(key: str, value: Any, message: str) -> None:
    from auxloss.experiment.config import parse_config

    with pytest.raises(al.AuxLossError, match=message):
        Trainer(**{key: value})
    with pytest.raises(al.AuxLossError, match=rf"train(\.{key})?: .*"):
        parse_config({**TINY, "train": {key: value}})


def test_normalisation_and_unknown_settings() -> None:
    opts = TrainOptions(amp=True, lr=1, grad_clip=2)
    assert opts.amp == "bf16" and type(opts.lr) is float and type(opts.grad_clip) is float
    assert Trainer(amp=True).amp == "bf16"
    with pytest.raises(al.AuxLossError, match="unknown training setting 'lrr' \\(did you mean 'lr'\\?\\)"):
        Trainer(lrr=0.1)
    with pytest.raises(al.AuxLossError, match="options must be an auxloss.train.TrainOptions"):
        Trainer({"lr": 0.1})  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.lr = 0.5  # type: ignore[misc]
    sgd = Trainer(optimizer="sgd", momentum=0.5, lr=0.1).build_optimizer([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
