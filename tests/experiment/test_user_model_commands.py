"""``auxloss layers``, ``auxloss probe`` and ``auxloss sweep`` on the user's own model and data: the example project
(examples/my_project: a model class of its own and a ``TensorDataset`` of ``(x, y)`` tuples) named as
``module:function``, with tiny budgets."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from auxloss.cli import main
from auxloss.experiment.config import load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "my_project"
CONFIG = EXAMPLE / "experiment.yaml"

# Tiny budgets: 96 training samples in batches of 32 (3 steps per epoch), a 3-layer net, one epoch.
SMALL = {"seeds": 2, "train.epochs": 1, "train.eval_train": False, "model.params.depth": 3,
         "data.params.n_train": 96, "data.params.n_val": 32, "data.params.n_test": 64, "data.batch_size": 32,
         "variants": [{"name": "deep-supervision",
                       "taps": {"mid": {"layer": "body.1", "head": {"type": "linear", "out": 10}}},
                       "tasks": [{"name": "mid", "source": "mid", "weight": 0.3}]}]}


def listed(out: str) -> list[str]:
    lines = out.strip().splitlines()
    return [line.split()[0] for line in lines[1:] if line.strip() and not line[0].isdigit()]


def test_layers_of_a_user_function_with_an_input_shape(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(EXAMPLE)  # the working directory is importable
    assert main(["layers", "my_project.models:build", "--input-shape", "1,64", "--param", "depth=3"]) == 0
    out = capsys.readouterr().out
    from my_project.models import DeepTanhMLP

    # Every module of the user's class runs in its forward: all of them are tappable, in definition order.
    expected = [name for name, _ in DeepTanhMLP(depth=3).named_modules() if name]
    assert listed(out) == expected
    assert "Tensor(1, 64)" in out and "for input (1, 64)" in out


def test_layers_from_a_config_take_its_model_params_and_a_batch_of_its_data(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the config's own folder makes my_project importable
    assert main(["layers", "--config", str(CONFIG), "--leaves"]) == 0
    out = capsys.readouterr().out
    depth = load_config(CONFIG).model.params["depth"]
    # depth x (Linear, Tanh), then the classifier; the input is one sample of the config's 64 features.
    assert listed(out) == [f"body.{i}.{j}" for i in range(depth) for j in (0, 1)] + ["classifier"]
    assert "for input (1, 64)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["layers", "my_project.models:build"], "give an example input's shape with --input-shape"),
        (["layers", "my_project.models:build", "--input-shape", "1,x"], "must be positive integers"),
        (["layers", "my_project.models:build", "--input-shape", "1,3"], r"shape \(1, 3\) failed"),
        (["layers", "my_project.models:build", "--input-shape", "1,64", "--param", "depth"], "key=value"),
        (["layers", "no_such_pkg.models:build", "--input-shape", "1,64"], "no module 'no_such_pkg'"),
        (["layers"], "give a model"),
    ],
    ids=["no-shape", "bad-shape", "wrong-shape", "bad-param", "missing-module", "nothing"],
)
def test_layers_bad_input_gets_one_clear_line(monkeypatch: pytest.MonkeyPatch, capsys, argv: list[str],
                                              message: str) -> None:
    monkeypatch.chdir(EXAMPLE)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("auxloss: error:") and "Traceback" not in err
    assert re.search(message, err), err


def test_probe_on_the_user_project(tmp_path: Path) -> None:
    from auxloss.experiment.probe import run_probe

    cfg = load_config(CONFIG, SMALL)
    summary = run_probe(cfg, tmp_path / "probe", steps=6, every=3)
    (cand,) = summary["candidates"]
    assert cand["variant"] == "deep-supervision" and list(cand["tasks"]) == ["mid"]
    task = cand["tasks"]["mid"]
    assert -1.0 <= task["cosine"] <= 1.0 and math.isfinite(task["affinity"])
    # The cost is counted on the user's own training split (96 // 32 = 3 steps an epoch), not data.n_train.
    assert cand["batches_per_epoch"] == 3
    full = 3 * 1 * 2 * 2  # steps an epoch x epochs x seeds x (baseline + 1 variant)
    # counted in step equivalents: the training steps plus the measurements' cost
    assert summary["experiment_steps"] == full
    assert summary["cost_fraction"] == pytest.approx(summary["probe_steps"] / full)
    assert summary["probe_steps"] >= 6
    assert (tmp_path / "probe" / "probe.json").exists()


def test_sweep_on_the_user_project_with_a_renamed_main_task(tmp_path: Path) -> None:
    from auxloss.experiment.sweep import run_sweep, total_steps

    cfg = load_config(CONFIG, {**SMALL, "main": {"name": "digit"}})
    assert total_steps(cfg) == 3  # the user's 96 samples in batches of 32, one epoch
    summary = run_sweep(cfg, tmp_path / "sweep", trials=1, eval_seeds=2, schedule=True, study_name="user")
    (trial,) = summary["trials"]
    assert trial["state"] == "COMPLETE" and 0.0 <= trial["value"] <= 1.0
    frac, w = trial["params"]["start/mid"], trial["params"]["w/mid"]
    assert trial["weights"] == {"mid": {"type": "curriculum", "value": w, "start": round(frac * 3), "ramp": 1}}
    held = summary["held_out"]
    assert held["seeds"] == [0, 1] and set(held["runs"]) == {"baseline", "default", "best"}
    assert all(0.0 <= v <= 1.0 for runs in held["runs"].values() for v in runs.values())
