"""Inputs that used to give silently wrong results: each now gives the right numbers, a warning, or an error."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from auxloss.errors import AuxLossError
from auxloss.experiment.config import parse_config
from auxloss.experiment.runner import current_versions, run_experiment
from auxloss.experiment.store import Store

TINY = """
name: silent
seeds: 2
data: {name: shapes, n_train: 32, n_val: 16, n_test: 16, batch_size: 16, params: {image_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train: {epochs: 1, lr: 0.01, eval_train: false}
variants:
  - name: deep
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: 0.3}]
"""


def cfg(**top):
    data = yaml.safe_load(TINY)
    data.update(top)
    return parse_config(data)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "out"
    return out, run_experiment(cfg(), out, workers=1)


def test_fewer_seeds_on_a_folder_with_more_reports_only_those(two_seeds, tmp_path):
    import shutil

    full_out, full = two_seeds
    out = tmp_path / "out"
    shutil.copytree(full_out, out)
    one = run_experiment(cfg(seeds=1), out)  # nothing left to train: seed 0 is there
    for variant, whole in zip(one["variants"], full["variants"]):
        assert variant["seeds"] == [0] and variant["main"] == whole["main"][:1]
    assert one["runs"] == {"done": 2, "failed": 0, "pending": 0}  # baseline and deep, seed 0
    assert "Seeds: 0. " in (out / "report.md").read_text()  # the header lists the seeds compared
    assert len(Store(out / "results.sqlite").runs("done")) == 4  # seed 1 is kept, just not reported


def test_numbers_do_not_depend_on_the_worker_count(two_seeds, tmp_path):
    _, one_worker = two_seeds
    two_workers = run_experiment(cfg(), tmp_path / "out", workers=2)
    assert [v["main"] for v in two_workers["variants"]] == [v["main"] for v in one_worker["variants"]]
    runs = Store(tmp_path / "out" / "results.sqlite").runs("done")
    assert {r["result"]["threads"] for r in runs} == {1}  # recorded with each run


def test_the_callers_thread_count_is_left_alone(tmp_path):
    before = torch.get_num_threads()
    run_experiment(cfg(seeds=1, variants=[]), tmp_path / "out")
    assert torch.get_num_threads() == before


def test_runs_of_other_versions_are_flagged_and_rerun_on_request(two_seeds, tmp_path, capsys):
    import shutil

    full_out, full = two_seeds
    out = tmp_path / "out"
    shutil.copytree(full_out, out)
    store = Store(out / "results.sqlite")
    (old,) = [r for r in store.runs("done") if r["variant"] == "deep" and r["seed"] == 1]
    result = {**old["result"], "versions": {"auxloss": "0.0.1", "torch": "1.0"}}
    store.reset_runs([("deep", 1)])
    assert store.claim("w") == ("deep", 1)  # the only run not done
    store.finish("deep", 1, result, old["history"], worker="w")
    capsys.readouterr()
    run_experiment(cfg(), out)
    err = capsys.readouterr().err
    assert "1 finished run(s) under this folder were trained with" in err and '"auxloss": "0.0.1"' in err
    assert "--rerun-stale" in err
    (kept,) = [r for r in Store(out / "results.sqlite").runs("done") if r["variant"] == "deep" and r["seed"] == 1]
    assert kept["result"]["versions"] == {"auxloss": "0.0.1", "torch": "1.0"}
    again = run_experiment(cfg(), out, rerun_stale=True)
    (redone,) = [r for r in Store(out / "results.sqlite").runs("done") if r["variant"] == "deep" and r["seed"] == 1]
    assert redone["result"]["versions"] == current_versions()
    assert again["variants"][1]["main"] == full["variants"][1]["main"]  # the same code gives the same numbers


def test_an_early_build_error_leaves_no_claim_on_the_folder(tmp_path):
    out = tmp_path / "out"
    bad = yaml.safe_load(TINY)
    bad["variants"][0]["taps"]["aux1"]["layer"] = "block9"  # found only when the model is built
    with pytest.raises(AuxLossError, match="no layer named 'block9'"):
        run_experiment(parse_config(bad), out)
    assert not (out / "results.sqlite").exists() and not (out / "config.yaml").exists()
    fixed = cfg(seeds=1)
    assert run_experiment(fixed, out)["runs"]["done"] == 2  # no --force needed
    assert json.loads((out / "results.json").read_text())["name"] == "silent"


@pytest.mark.parametrize("shared", [False, True])
def test_an_error_in_training_cleans_a_fresh_folder_only_when_no_other_worker_may_use_it(tmp_path, monkeypatch,
                                                                                       shared):
    # A plain command that created the folder and fails before any run is done removes what it created. A worker
    # started with AUXLOSS_SHARED_STORE=1 must not: another worker that found the same fresh folder may be training
    # into that store (audit 2's note: shared-store workers on a fresh folder could remove it under each other).
    from auxloss.experiment import runner

    def failing(job, db):
        raise AuxLossError("failed while training")

    monkeypatch.setattr(runner, "_train_all", failing)
    if shared:
        monkeypatch.setenv("AUXLOSS_SHARED_STORE", "1")
    else:
        monkeypatch.delenv("AUXLOSS_SHARED_STORE", raising=False)
    out = tmp_path / "out"
    with pytest.raises(AuxLossError, match="failed while training"):
        run_experiment(cfg(seeds=1), out)
    assert (out / "results.sqlite").exists() == shared and (out / "config.yaml").exists() == shared


def test_printed_intervals_stay_within_the_metrics_range():
    import math

    from scipy import stats as st

    from auxloss.experiment.report import format_table

    values = [0.70, 0.99, 0.93]  # accuracy: a wide spread near the top
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = st.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert mean + half > 1.0  # the raw t-interval leaves [0, 1]
    results = {"name": "clip", "metric": "accuracy", "higher_is_better": True, "baseline": "baseline",
               "split": "test", "comparisons": [],
               "variants": [{"name": "baseline", "seeds": [0, 1, 2], "main": values, "mean": mean,
                             "ci95": [mean - half, mean + half]}]}
    table = format_table(results)
    row = next(line for line in table.splitlines() if line.startswith("baseline"))
    assert f"[{100 * (mean - half):.1f}, 100.0]" in row
    assert "95% CIs cut to the range accuracy can take" in table
    results["variants"][0]["ci95"] = [mean - 0.01, mean + 0.01]
    assert "cut to the range" not in format_table(results)  # inside the range: untouched, no note


def test_the_report_cuts_intervals_to_the_metrics_range_and_says_so(tmp_path):
    """Audit 2 row 36: two seeds at 12.5% and 18.75% accuracy give the t-interval [-24.1, 55.3] points; the terminal
    table cut it to [0.0, 55.3], the report printed `15.6 ± 39.7`."""
    import math
    import re

    from scipy import stats as st

    from auxloss.experiment.report import build_report

    values = [0.125, 0.1875]
    mean = sum(values) / 2
    half = st.t.ppf(0.975, 1) * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2)
    assert mean - half < -0.2  # the raw interval reaches far below 0
    results = {"name": "det", "metric": "accuracy", "higher_is_better": True, "baseline": "baseline",
               "split": "test", "comparisons": [],
               "variants": [{"name": "baseline", "seeds": [0, 1], "main": values, "mean": mean,
                             "ci95": [mean - half, mean + half]}]}
    page = build_report(tmp_path, results, None).read_text(encoding="utf-8")
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    cell = next(line for line in md.splitlines() if line.startswith("| baseline")).split("|")[2].strip()
    assert cell == f"{100 * mean:.1f} [0.0, {100 * (mean + half):.1f}]"
    assert all(0.0 <= float(x) <= 100.0 for x in re.findall(r"-?\d+\.\d+", cell))
    html_cell = re.search(r"<td[^>]*>baseline</td>\s*<td[^>]*>([^<]*)</td>", page).group(1)
    assert html_cell == cell
    for text in (md, page):
        assert f"± {100 * half:.1f}" not in text
        assert "95% CIs cut to the range accuracy can take" in text
