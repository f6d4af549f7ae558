"""Tests for auxloss.experiment.sweep: the Optuna search of auxiliary weights and its held-out check.

Trial values are checked against runs recomputed here straight from a hand-edited config dict (not through
the sweep's own helpers), so a sweep that scored trials on the wrong split or the wrong seed shows up.
"""

from __future__ import annotations

import copy
import json
import shutil
import sqlite3

import pytest
import torch

from auxloss import AuxLossError
from auxloss.experiment.config import parse_config
from auxloss.experiment.runner import run_one
from auxloss.experiment.sweep import run_sweep, total_steps

TINY = {
    "name": "tiny-sweep",
    "seeds": 2,
    "data": {"name": "shapes", "n_train": 48, "n_val": 32, "n_test": 48, "batch_size": 16,
             "params": {"image_size": 16}},
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "train": {"epochs": 1, "lr": 0.01},
    "variants": [
        {"name": "deep", "taps": {"aux1": {"layer": "block1", "head": {"type": "linear"}}},
         "tasks": [{"name": "aux1", "source": "aux1", "weight": 0.3}]},
    ],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tiny models train ~10x faster on one thread when the cores are shared with other work.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _with_weight(weight):
    data = copy.deepcopy(TINY)
    data["variants"][0]["tasks"][0]["weight"] = weight
    return parse_config(data)


def _trial_numbers(out):
    with sqlite3.connect(out / "optuna.sqlite") as db:
        return [n for (n,) in db.execute("SELECT number FROM trials ORDER BY number")]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    summary = run_sweep(parse_config(TINY), out, trials=3, eval_seeds=2)
    return out, summary


def test_sweep_searches_on_validation_and_checks_on_held_out_seeds(swept):
    out, summary = swept
    on_disk = json.loads((out / "sweep.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["n_trials"] == 3 and len(on_disk["trials"]) == 3
    assert [t["state"] for t in on_disk["trials"]] == ["COMPLETE"] * 3
    assert [t["number"] for t in on_disk["trials"]] == [0, 1, 2]
    assert on_disk["direction"] == "maximize" and on_disk["search_seeds"] == [1000]
    assert "password" not in on_disk["storage"] and on_disk["storage"].startswith("sqlite:///")
    w = on_disk["best_params"]["w/aux1"]
    assert 0.01 <= w <= 3.0 and on_disk["best"]["weights"] == {"aux1": w}
    values = [t["value"] for t in on_disk["trials"]]
    assert on_disk["best_value"] == max(values)

    # Each trial's value is the validation metric of the variant trained with its weight on search seed 1000.
    val_differs_from_test = False
    for trial in on_disk["trials"]:
        best = run_one(_with_weight(trial["params"]["w/aux1"]), "deep", 1000)["best"]
        assert trial["value"] == pytest.approx(best["val/metric/main"], abs=1e-9)
        val_differs_from_test |= best["val/metric/main"] != best["test/metric/main"]
    assert val_differs_from_test  # else the check above could not tell validation from test

    held = on_disk["held_out"]
    assert held["seeds"] == [0, 1] and held["split"] == "test"
    assert set(held["runs"]) == {"baseline", "default", "best"}
    assert all(set(r) == {"0", "1"} for r in held["runs"].values())
    assert {c["variant"] for c in held["vs_baseline"]} == {"best", "default"}
    assert all(c["baseline"] == "baseline" and c["n"] == 2 for c in held["vs_baseline"])
    bd = held["best_vs_default"]
    assert bd["variant"] == "best" and bd["baseline"] == "default" and bd["n"] == 2
    # The default is the config's own variant (weight 0.3) on the held-out seed: recompute one.
    assert held["runs"]["default"]["0"] == pytest.approx(run_one(_with_weight(0.3), "deep", 0)["main"], abs=1e-9)
    assert bd["delta"] == pytest.approx(
        sum(held["runs"]["best"][s] - held["runs"]["default"][s] for s in ("0", "1")) / 2, abs=1e-12)
    md = (out / "sweep.md").read_text()
    assert "## Trials" in md and "Held-out seeds [0, 1]" in md and "Best vs default" in md


def test_resume_runs_only_missing_trials_and_refuses_another_setup(swept, tmp_path):
    out, summary = swept
    shutil.copy(out / "optuna.sqlite", tmp_path / "optuna.sqlite")
    cfg = parse_config(TINY)
    again = run_sweep(cfg, tmp_path, trials=3, eval_seeds=0)
    assert again["n_trials"] == 3 and again["held_out"] is None
    assert [t["params"] for t in again["trials"]] == [t["params"] for t in summary["trials"]]
    more = run_sweep(cfg, tmp_path, trials=4, eval_seeds=0)
    assert more["n_trials"] == 4 and _trial_numbers(tmp_path) == [0, 1, 2, 3]
    assert more["trials"][3]["state"] == "COMPLETE"
    # the resumed sampler does not replay the first run's proposals
    assert more["trials"][3]["params"] not in [t["params"] for t in summary["trials"]]
    with pytest.raises(AuxLossError, match="another setup.*schedule"):
        run_sweep(cfg, tmp_path, trials=5, eval_seeds=0, schedule=True)
    with pytest.raises(AuxLossError, match="another setup.*config_hash"):
        run_sweep(_with_weight(0.5), tmp_path, trials=5, eval_seeds=0)
    assert _trial_numbers(tmp_path) == [0, 1, 2, 3]


def test_schedule_search_builds_a_curriculum(tmp_path):
    cfg = parse_config(TINY)
    summary = run_sweep(cfg, tmp_path, trials=1, eval_seeds=0, schedule=True, study_name="sched")
    (trial,) = summary["trials"]
    frac, w = trial["params"]["start/aux1"], trial["params"]["w/aux1"]
    steps = total_steps(cfg)
    assert steps == 3  # 48 samples, batches of 16, one epoch
    assert 0.0 <= frac <= 0.5
    assert trial["weights"] == {"aux1": {"type": "curriculum", "value": w, "start": round(frac * steps), "ramp": 1}}


def test_two_worker_processes_share_one_study(tmp_path):
    summary = run_sweep(parse_config(TINY), tmp_path, trials=4, eval_seeds=0, workers=2)
    assert summary["n_trials"] == 4
    assert _trial_numbers(tmp_path) == [0, 1, 2, 3]
    assert [t["state"] for t in summary["trials"]] == ["COMPLETE"] * 4
    params = [t["params"]["w/aux1"] for t in summary["trials"]]
    assert len(set(params)) == 4  # workers sample with different seeds


def test_errors_say_what_to_fix(tmp_path):
    cfg = parse_config(TINY)
    with pytest.raises(AuxLossError, match=r"no variant 'nope'.*\['deep'\]"):
        run_sweep(cfg, tmp_path, variant="nope")
    with pytest.raises(AuxLossError, match="no variant 'baseline'"):
        run_sweep(cfg, tmp_path, variant="baseline")
    with pytest.raises(AuxLossError, match="trials must be an integer >= 1, got 0"):
        run_sweep(cfg, tmp_path, trials=0)
    with pytest.raises(AuxLossError, match="eval_seeds must be an integer >= 0"):
        run_sweep(cfg, tmp_path, eval_seeds=-1)
    bare = copy.deepcopy(TINY)
    bare["variants"].append({"name": "empty"})
    with pytest.raises(AuxLossError, match="'empty' has no auxiliary tasks"):
        run_sweep(parse_config(bare), tmp_path, variant="empty")
    with pytest.raises(AuxLossError, match="has no variants"):
        run_sweep(parse_config({**TINY, "variants": []}), tmp_path)
    with pytest.raises(AuxLossError, match="in-memory"):
        run_sweep(cfg, tmp_path, storage="sqlite://")
    assert not (tmp_path / "optuna.sqlite").exists()
