"""``results.json``: the runs of an experiment summarised per variant and compared with the baseline."""

from __future__ import annotations

from typing import Any

from auxloss._redact import command_without_passwords
from auxloss.experiment import stats
from auxloss.experiment.config import ExperimentConfig
from auxloss.experiment.spec import BASELINE
from auxloss.experiment.store import Store

__all__ = ["aggregate", "load_histories"]


def _asked(runs: list[dict[str, Any]], seeds: int | None) -> list[dict[str, Any]]:
    """The runs of the seeds asked for (``0..seeds-1``): a folder may hold more seeds from an earlier command, and
    a report on ``--seeds 1`` must not mix them in."""
    return runs if seeds is None else [r for r in runs if r["seed"] < seeds]


def load_histories(store: Store, seeds: int | None = None
                   ) -> tuple[dict[str, dict[int, list[dict]]], dict[str, dict[int, int]]]:
    histories: dict[str, dict[int, list[dict]]] = {}
    best: dict[str, dict[int, int]] = {}
    for run in _asked(store.runs("done"), seeds):
        histories.setdefault(run["variant"], {})[run["seed"]] = run["history"]
        best.setdefault(run["variant"], {})[run["seed"]] = run["result"]["best_epoch"]
    return histories, best


def aggregate(summary: dict[str, Any], store: Store, *, command: str | None = None,
              seconds: float | None = None) -> dict[str, Any]:
    """``results.json``: per-variant means with CIs, and paired comparisons with the baseline.

    ``summary`` is :meth:`Experiment.summary` (kept in the store, so a report needs no code of the user's).
    """
    if isinstance(summary, ExperimentConfig):  # older callers pass the config
        from auxloss.experiment.worker import as_experiment

        summary = as_experiment(summary).summary()
    done = _asked(store.runs("done"), summary.get("seeds"))
    by_variant: dict[str, dict[int, float]] = {}
    extra: dict[str, dict[int, dict]] = {}
    for run_ in done:
        by_variant.setdefault(run_["variant"], {})[run_["seed"]] = float(run_["result"]["main"])
        extra.setdefault(run_["variant"], {})[run_["seed"]] = run_["result"]
    metric, higher, split = summary["metric"], summary["higher_is_better"], summary["compare_on"]
    names = [v["name"] for v in summary["variants"]]
    variants = []
    for spec in summary["variants"]:
        name = spec["name"]
        values = by_variant.get(name, {})
        if not values:
            continue
        stat = stats.summarize(values)
        aux_final = {}
        for task in spec["aux_tasks"]:
            vals = [r["best"].get(f"{split}/metric/{task}") for r in extra[name].values()]
            vals = [v for v in vals if v is not None]
            if vals:
                aux_final[task] = sum(vals) / len(vals)
        variants.append({
            "name": name,
            "seeds": stat["seeds"],
            "main": [values[s] for s in stat["seeds"]],
            "mean": stat["mean"],
            "std": stat["std"],
            "ci95": stat["ci95"],
            "aux_tasks": list(spec["aux_tasks"]),
            "aux_metrics": aux_final,
            "best_epochs": [extra[name][s]["best_epoch"] for s in stat["seeds"]],
            "seconds": sum(extra[name][s]["seconds"] for s in stat["seeds"]),
            "weights": {str(s): extra[name][s]["weights"] for s in stat["seeds"] if "weights" in extra[name][s]},
        })
    comparisons = []
    baseline = by_variant.get(BASELINE, {})
    others = {v: by_variant[v] for v in names[1:] if v in by_variant}
    if baseline and others:
        comparisons = [c.to_dict() for c in stats.compare(baseline, others, higher_is_better=higher,
                                                          alpha=summary["alpha"])]
    status: dict[str, int] = {}
    for run_ in _asked(store.runs(None), summary.get("seeds")):
        if run_["variant"] in names:
            status[run_["status"]] = status.get(run_["status"], 0) + 1
    return {
        "name": summary["name"],
        "main_task": summary.get("main_task", "main"),
        "metric": metric,
        "higher_is_better": higher,
        "baseline": BASELINE,
        "split": split,
        "variants": variants,
        "comparisons": comparisons,
        # Which weights the runs keep (`variants[i].weights` lists each seed's files); absent from stores
        # written before it was recorded.
        **({"keep": summary["keep"]} if "keep" in summary else {}),
        "runs": {"done": status.get("done", 0), "failed": status.get("failed", 0),
                 "pending": status.get("pending", 0) + status.get("running", 0)},
        # The command may hold a database URL: recorded without its password (results.json, the report).
        "config": {**summary["config"], **({"command": command_without_passwords(command)} if command else {})},
        "timing": {"total_seconds": seconds},
    }
