"""Tests for auxloss.experiment.report on a small synthetic experiment.

Expected numbers are computed here from the raw per-seed values with plain arithmetic, not read back from
the report module, so a formatting or pairing bug shows up as a mismatch.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from auxloss.experiment.report import build_report, format_table, summary_sentences
from auxloss.experiment.stats import compare, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEEDS = [0, 1, 2]
EPOCHS = 5

# Final test accuracy per seed. deep-supervision: a clear, consistent gain; curriculum: noise around zero.
BASE = [0.700, 0.690, 0.710]
FINAL = {
    "baseline": BASE,
    "deep-supervision": [b + d for b, d in zip(BASE, [0.031, 0.029, 0.033])],
    "curriculum": [b + d for b, d in zip(BASE, [0.010, -0.012, 0.001])],
}
AUX = {"baseline": [], "deep-supervision": ["aux1", "aux2"], "curriculum": ["aux1"]}
# Mean gradient cosine per (variant, task): aux2 of deep-supervision conflicts with the main task.
COS = {("deep-supervision", "aux1"): 0.4, ("deep-supervision", "aux2"): -0.3, ("curriculum", "aux1"): 0.2}


def _record(variant: str, seed: int, epoch: int, *, with_cos: bool = True) -> dict[str, Any]:
    frac = epoch / EPOCHS
    val = FINAL[variant][seed] * (0.8 + 0.2 * frac) + 0.002 * seed
    gap = {"baseline": 0.08, "deep-supervision": 0.04, "curriculum": 0.075}[variant] * frac + 0.001 * seed
    rec: dict[str, Any] = {
        "epoch": epoch,
        "step": epoch * 10,
        "lr": 0.1,
        "time": 1.0,
        "train/loss": 1.0 / epoch,
        "train/loss/main": 0.9 / epoch,
        "val/loss": 1.1 / epoch,
        "val/metric/main": val,
        "test/metric/main": val,
        "trainval/metric/main": val + gap,
        "gap": gap,
    }
    for k, task in enumerate(AUX[variant]):
        rec[f"train/loss/{task}"] = 0.5 / epoch
        rec[f"train/weight/{task}"] = 0.3 * frac if variant == "curriculum" else 0.5 - 0.1 * k
        rec[f"val/loss/{task}"] = 0.6 / epoch
        rec[f"val/metric/{task}"] = 0.5 + 0.05 * epoch + 0.01 * seed + 0.02 * k
        if with_cos:
            rec[f"cos/{task}"] = COS[(variant, task)] + 0.05 * (seed - 1)
            rec[f"normratio/{task}"] = 0.8
    return rec


def _histories(with_cos: bool = True, variants: dict[str, list[float]] = FINAL) -> dict:
    return {
        v: {s: [_record(v, s, e, with_cos=with_cos) for e in range(1, EPOCHS + 1)] for s in SEEDS}
        for v in variants
    }


def _results(
    finals: dict[str, list[float]] = FINAL,
    metric: str = "accuracy",
    hib: bool = True,
    aux: dict[str, list[str]] = AUX,
) -> dict[str, Any]:
    """results.json as the runner writes it: summaries and comparisons from auxloss.experiment.stats."""
    seeds = {v: SEEDS[: len(x)] for v, x in finals.items()}
    variants = []
    for v, vals in finals.items():
        s = summarize(dict(zip(seeds[v], vals)))
        variants.append(
            {
                "name": v,
                "seeds": s["seeds"],
                "main": s["values"],
                "mean": s["mean"],
                "std": s["std"],
                "ci95": s["ci95"],
                "aux_tasks": aux.get(v, []),
            }
        )
    comps = compare(
        dict(zip(SEEDS, finals["baseline"])),
        {v: dict(zip(seeds[v], x)) for v, x in finals.items() if v != "baseline"},
        higher_is_better=hib,
    )
    return {
        "name": "shapes-demo",
        "metric": metric,
        "higher_is_better": hib,
        "baseline": "baseline",
        "split": "test",
        "variants": variants,
        "comparisons": [c.to_dict() for c in comps],
        "config": {"command": ["auxloss", "run", "configs/shapes.yaml", "--seeds", "3"]},
        "timing": {"total_seconds": 123.4},
    }


BEST = {v: {s: 4 + (s % 2) for s in SEEDS} for v in FINAL}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("report")
    path = build_report(out, _results(), _histories(), BEST)
    return path, (out / "report.md").read_text(encoding="utf-8"), path.read_text(encoding="utf-8")


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 1024, path


def test_writes_all_files_and_valid_pngs(built: tuple[Path, str, str]) -> None:
    path, md, page = built
    assert path.name == "report.html" and path.exists()
    names = ["learning_curves", "gap", "weights", "aux_metrics", "seeds", "gradient_health"]
    for name in names:
        _assert_png(path.parent / "figures" / f"{name}.png")
        # Both documents reference the figure by relative path.
        assert f"figures/{name}.png" in md and f'src="figures/{name}.png"' in page
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page


def test_markdown_names_variants_and_verdicts(built: tuple[Path, str, str]) -> None:
    _, md, _ = built
    for v in FINAL:
        assert v in md
    assert "deep-supervision helps" in md
    assert "curriculum: no detectable effect" in md and "CI spans zero" in md
    for section in (
        "## Verdict",
        "## Results",
        "## Overfitting",
        "## Auxiliary tasks",
        "## Auxiliary task health",
        "## How to reproduce",
    ):
        assert section in md
    assert "auxloss run configs/shapes.yaml --seeds 3" in md


def test_delta_formatted_as_points(built: tuple[Path, str, str]) -> None:
    _, md, _ = built
    diffs = [v - b for v, b in zip(FINAL["deep-supervision"], BASE)]
    delta_points = 100 * sum(diffs) / len(diffs)  # 3.1
    expected = f"+{delta_points:.1f} points of accuracy"
    assert expected == "+3.1 points of accuracy"
    assert expected in md
    # The mean of the baseline in points, and the seed count in the sentence.
    assert f"{100 * sum(BASE) / 3:.1f}" in md
    sentence = next(s for s in summary_sentences(_results()) if s.startswith("deep-supervision"))
    assert "3 seeds" in sentence and "Holm p" in sentence and "95% CI +" in sentence


def test_non_accuracy_metric_uses_four_significant_digits_and_lower_is_better(tmp_path: Path) -> None:
    finals = {
        "baseline": [0.5000, 0.5200, 0.5100],
        "deep-supervision": [0.5000 - 0.01234, 0.5200 - 0.01232, 0.5100 - 0.01236],
        "curriculum": [0.5010, 0.5190, 0.5105],
    }
    res = _results(finals, metric="loss", hib=False)
    sentences = summary_sentences(res)
    assert sentences[0].startswith("deep-supervision helps: -0.01234 loss (lower is better;")
    build_report(tmp_path, res, _histories(variants=finals))
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "-0.01234 loss" in md and "points" not in md.split("## Setup")[0]
    # The trainer stores the gap sign-normalised (positive = overfitting) for every metric: the text says how.
    assert "validation loss minus the train-set loss" in md and "larger positive gap means more overfitting" in md


def test_negative_cosine_flagged(built: tuple[Path, str, str]) -> None:
    _, md, page = built
    health = md.split("## Auxiliary task health", 1)[1]
    flagged = [line for line in health.splitlines() if "mostly conflicts with the main task" in line]
    assert len(flagged) == 1 and "aux2" in flagged[0] and "deep-supervision" in flagged[0]
    assert "mostly conflicts with the main task" in page


def test_overfitting_section_in_words_and_numbers(built: tuple[Path, str, str]) -> None:
    _, md, _ = built
    section = md.split("## Overfitting", 1)[1].split("## ", 1)[0]
    base_gap = 100 * sum(0.08 + 0.001 * s for s in SEEDS) / 3  # final epoch, frac = 1
    ds_gap = 100 * sum(0.04 + 0.001 * s for s in SEEDS) / 3
    assert f"{base_gap:.1f} points" in section
    assert f"{ds_gap - base_gap:+.1f} points vs the baseline: less overfitting" in section
    assert "4, 5, 4" in section  # best epoch per seed


def test_aux_task_final_val_metric(built: tuple[Path, str, str]) -> None:
    _, md, _ = built
    section = md.split("## Auxiliary tasks", 1)[1].split("## ", 1)[0]
    # aux1 of deep-supervision at epoch 5: 0.75 + 0.01 * seed -> mean 0.76, sd 0.01.
    row = next(line for line in section.splitlines() if line.startswith("| deep-supervision | aux1 |"))
    assert "0.7600 ± 0.01000" in row


def test_null_ci_renders_na(tmp_path: Path) -> None:
    # A variant run on a single seed: its CI and the comparison's CI, p and d_z are all null.
    finals = dict(FINAL)
    finals["aux-task"] = [0.75]
    aux = dict(AUX, **{"aux-task": ["aux1"]})
    res = _results(finals, aux=aux)
    row = next(c for c in res["comparisons"] if c["variant"] == "aux-task")
    assert row["ci95"] == [None, None] and row["p_value"] is None
    hist = _histories(variants=FINAL)
    build_report(tmp_path, res, hist)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    line = next(x for x in md.splitlines() if x.startswith("| aux-task |"))
    assert "n/a" in line and "75.0 (CI n/a)" in line
    sentence = next(s for s in summary_sentences(res) if s.startswith("aux-task"))
    assert "only 1 seed" in sentence and "not evidence of no effect" in sentence and "95% CI n/a" in sentence
    assert "no detectable effect*" in format_table(res)


def test_html_escapes_variant_names(tmp_path: Path) -> None:
    evil = "<b>x</b>"
    finals = {"baseline": BASE, evil: FINAL["deep-supervision"]}
    aux = {"baseline": [], evil: ["aux1"]}
    res = _results(finals, aux=aux)
    hist = _histories(variants=FINAL)
    hist = {"baseline": hist["baseline"], evil: hist["curriculum"]}
    page = build_report(tmp_path, res, hist).read_text(encoding="utf-8")
    assert evil not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    # Backslash-escaped, so markdown renderers show the name instead of treating it as an HTML tag.
    assert "\\<b>x\\</b>" in md and not re.search(r"(?<!\\)<b>", md)


def test_optional_parts_missing_do_not_crash(built: tuple[Path, str, str], tmp_path: Path) -> None:
    # No cosine telemetry, no aux tasks at all, no best epochs, no command, no timing. Built over a copy
    # of the full report, so this also checks that figures of the earlier build are removed, not left
    # behind to contradict the new report.
    out = tmp_path / "report"
    shutil.copytree(built[0].parent, out)
    assert (out / "figures" / "gradient_health.png").exists()
    res = _results(aux={})
    res["config"] = {}
    del res["timing"]
    hist = _histories(with_cos=False)
    for runs in hist.values():
        for recs in runs.values():
            for rec in recs:
                # Drop every per-aux-task key ("train/loss/aux1", ...); keep the main task's.
                for key in [k for k in rec if k.count("/") == 2 and not k.endswith("/main")]:
                    del rec[key]
    path = build_report(out, res, hist)
    md = (out / "report.md").read_text(encoding="utf-8")
    figs = {p.name for p in (path.parent / "figures").iterdir()}
    assert figs == {"learning_curves.png", "gap.png", "seeds.png"}
    assert "## Auxiliary task health" not in md and "## How to reproduce" not in md
    assert "No variant has auxiliary tasks." in md


def test_empty_histories_and_no_comparisons(tmp_path: Path) -> None:
    res = _results({"baseline": BASE})
    path = build_report(tmp_path, res, {})
    assert path.exists()
    assert summary_sentences(res) == ["No variant was compared with the baseline."]
    assert 'no "gap" key' in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_format_table_fits_terminal() -> None:
    res = _results()
    long_name = "a-very-long-variant-name-" * 5
    res_long = copy.deepcopy(res)
    res_long["comparisons"][0]["variant"] = long_name
    res_long["variants"][1]["name"] = long_name
    for r in (res, res_long):
        table = format_table(r)
        lines = table.splitlines()
        assert all(len(line) <= 100 for line in lines), max(map(len, lines))
        assert "helps" in table and "no detectable effect" in table and "(baseline)" in table
    assert "a-very-long" in format_table(res_long)  # shortened, not dropped

    lines = format_table(res).splitlines()
    header, rows = lines[1], {line.split()[0]: line for line in lines[3:]}
    # Right-aligned numeric columns: the Holm p of every compared row ends where its header ends.
    end = header.index("p (Holm)") + len("p (Holm)")
    for name in ("deep-supervision", "curriculum"):
        holm_p = next(c["p_holm"] for c in res["comparisons"] if c["variant"] == name)
        assert rows[name][:end].endswith(f"{holm_p:.3f}")
    delta = 100 * sum(v - b for v, b in zip(FINAL["deep-supervision"], BASE)) / 3
    assert f" +{delta:.1f} " in rows["deep-supervision"]


def test_json_round_trip_gives_the_same_report(built: tuple[Path, str, str], tmp_path: Path) -> None:
    # Read back from JSON files, seed keys are strings; the report must not depend on that.
    loaded = [json.loads(json.dumps(x)) for x in (_results(), _histories(), BEST)]
    again = build_report(tmp_path, *loaded).parent / "report.md"
    assert again.read_text(encoding="utf-8") == built[1]


def _renamed_main(histories: dict, name: str) -> dict:
    """The histories as a run whose main task is called ``name`` logs them, without the stored "gap" key."""
    out = copy.deepcopy(histories)
    for runs in out.values():
        for recs in runs.values():
            for i, rec in enumerate(recs):
                renamed = {(k[: -len("/main")] + "/" + name if k.endswith("/main") else k): v for k, v in rec.items()}
                # Without "gap", the report recomputes it from the main task's train and validation metrics.
                del renamed["gap"]
                recs[i] = renamed
    return out


def test_main_task_named_otherwise(tmp_path: Path) -> None:
    res = _results()
    res["main_task"] = "digit"
    hist = _renamed_main(_histories(), "digit")
    assert not any("main" in k for runs in hist.values() for recs in runs.values() for rec in recs for k in rec)
    path = build_report(tmp_path, res, hist, BEST)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")

    assert "Main task: digit. Main metric: accuracy on the test split" in md
    assert "on the final test accuracy of the main task (digit)" in md
    assert "main task 'digit'" in format_table(res).splitlines()[0]
    assert "(main)" not in md and "'main'" not in format_table(res)
    # The main task's validation curve is found under its own name.
    _assert_png(path.parent / "figures" / "learning_curves.png")

    # The main task is not listed as an auxiliary task of any variant, not even of the baseline, which has none.
    aux = md.split("## Auxiliary tasks", 1)[1].split("## ", 1)[0]
    pairs = {tuple(c.strip() for c in line.split("|")[1:3]) for line in aux.splitlines() if line.startswith("| ")}
    expected = {(v, t) for v, tasks in AUX.items() for t in tasks}
    assert pairs - {("Variant", "Task"), ("---", "---")} == expected

    # The gap comes from trainval/metric/digit − val/metric/digit: the values the records were built with.
    section = md.split("## Overfitting", 1)[1].split("## ", 1)[0]
    base_gap = 100 * sum(0.08 + 0.001 * s for s in SEEDS) / 3
    ds_gap = 100 * sum(0.04 + 0.001 * s for s in SEEDS) / 3
    assert f"The baseline ends with a gap of {base_gap:.1f} points" in section
    assert f"{ds_gap - base_gap:+.1f} points vs the baseline: less overfitting" in section

    # The verdict and the results table still read the main metric from results.json.
    diffs = [v - b for v, b in zip(FINAL["deep-supervision"], BASE)]
    assert f"deep-supervision helps: +{100 * sum(diffs) / 3:.1f} points of accuracy" in md
    row = next(line for line in md.splitlines() if line.startswith("| deep-supervision |"))
    assert f"{100 * sum(FINAL['deep-supervision']) / 3:.1f} ± " in row


def test_gap_recomputed_in_the_metric_direction_passed_in(tmp_path: Path) -> None:
    # For a lower-is-better metric the gap is validation − train (positive = overfitting). A higher-is-better
    # report built just before in the same process must not change the direction of the next one.
    finals = {"baseline": [0.50, 0.52, 0.51], "deep-supervision": [0.49, 0.51, 0.50]}
    aux = {"baseline": [], "deep-supervision": ["aux1", "aux2"]}
    build_report(tmp_path / "first", _results(), _renamed_main(_histories(), "digit"))
    res = _results(finals, metric="loss", hib=False, aux=aux)
    res["main_task"] = "digit"
    hist = _renamed_main(_histories(variants=finals), "digit")
    for variant, runs in hist.items():
        for recs in runs.values():
            for rec in recs:
                # The train loss is the lower one, so validation − train is the (positive) overfitting gap.
                rec["trainval/metric/digit"] = rec["val/metric/digit"] - (0.02 if variant == "baseline" else 0.01)
    build_report(tmp_path / "second", res, hist)
    section = (tmp_path / "second" / "report.md").read_text(encoding="utf-8").split("## Overfitting", 1)[1]
    assert "The baseline ends with a gap of 0.02000 (3 seeds)." in section
    assert "deep-supervision ends with a gap of 0.01000, -0.01000 vs the baseline: less overfitting" in section


def test_curve_bands_stay_within_the_metric_range() -> None:
    # Two seeds at 0.98 and 1.0: the t-band (t_0.975,1 = 12.7) reaches far past 1; drawn, it is cut at 1 and 0.
    pytest.importorskip("matplotlib")
    import numpy as np
    from matplotlib.figure import Figure

    from auxloss.experiment.report.figures import _difference_bounds, _plot_band

    ax = Figure().add_subplot()
    mat = np.array([[0.5, 0.98], [0.02, 1.0]])  # seeds x epochs
    _plot_band(ax, np.array([1, 2]), mat, lambda a: a, "v", (0.0, 1.0), color="red")
    (poly,) = ax.collections
    ys = poly.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.0, abs=1e-12) and ys.max() == pytest.approx(1.0, abs=1e-12)
    ax2 = Figure().add_subplot()
    _plot_band(ax2, np.array([1, 2]), mat, lambda a: a, "v", color="red")  # unbounded: the raw t-band
    assert ax2.collections[0].get_paths()[0].vertices[:, 1].max() > 1.1
    assert _difference_bounds((0.0, 1.0)) == (-1.0, 1.0)
    assert _difference_bounds((-np.inf, np.inf)) == (-np.inf, np.inf)
