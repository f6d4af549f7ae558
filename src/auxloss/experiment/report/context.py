"""Reading results.json and the per-epoch histories into what the sections and figures need.

Nothing statistical is recomputed here except descriptive summaries of the histories (means, spreads,
t-bands for the curves): verdicts come from the stored comparisons, so the report cannot disagree with
results.json. Seeds may come back from JSON as strings and runs may stop early, so every lookup here
tolerates both.

The main task's name and the metric's direction are passed explicitly to every function that needs them
(the history keys are ``<split>/metric/<main task>``, and the legacy gap depends on the direction).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _st

from auxloss.experiment.report.formatting import MetricFormat, as_float

History = Mapping[str, Mapping[Any, Sequence[Mapping[str, Any]]]]
Runs = Mapping[Any, Sequence[Mapping[str, Any]]]

#: results.json files written before they recorded ``main_task`` come from a runner whose main task was
#: always called "main"; this is only the fallback for those files.
LEGACY_MAIN_TASK = "main"

# tab10; the baseline alone is black so that it stands out in every figure.
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
]


def main_task_of(results: Mapping[str, Any]) -> str:
    """The main task's name as results.json records it (the objective's main task when the runs were made)."""
    name = results.get("main_task")
    return str(name) if isinstance(name, str) and name else LEGACY_MAIN_TASK


def sort_seeds(seeds: Any) -> list[Any]:
    seeds = list(seeds)
    try:
        return sorted(seeds)
    except TypeError:
        return sorted(seeds, key=repr)


def seed_lookup(mapping: Mapping[Any, Any] | None, seed: Any) -> Any:
    """Seeds may come back from JSON as strings: accept 0 and "0" as the same seed."""
    if not mapping:
        return None
    if seed in mapping:
        return mapping[seed]
    for alt in (str(seed), as_float(seed)):
        if alt is not None and alt in mapping:
            return mapping[alt]
    try:
        return mapping.get(int(seed))
    except (TypeError, ValueError):
        return None


def record_value(rec: Mapping[str, Any], key: str, main_task: str, higher_is_better: bool) -> float | None:
    """``rec[key]`` as a float; for ``"gap"``, recomputed from the two main metrics if the record lacks it."""
    v = as_float(rec.get(key))
    if v is None and key == "gap":
        # Older runs may store only the two metrics; the gap is their difference by definition,
        # sign-normalised like the trainer's: positive means overfitting, whatever the metric's direction.
        tv = as_float(rec.get(f"trainval/metric/{main_task}"))
        va = as_float(rec.get(f"val/metric/{main_task}"))
        if tv is not None and va is not None:
            v = tv - va if higher_is_better else va - tv
    return v


def epochs_of(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """(epoch, record) pairs in epoch order; a record without an epoch number gets its position."""
    out = []
    for i, rec in enumerate(records):
        ep = as_float(rec.get("epoch"))
        out.append((int(ep) if ep is not None else i + 1, rec))
    return sorted(out, key=lambda t: t[0])


def curve(runs: Runs, key: str, main_task: str, higher_is_better: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, seeds x epochs matrix with NaN where a seed lacks the epoch), or None if no data.

    Seeds may have different lengths (early stopping), so epochs are aligned by number, not position.
    """
    per_seed: list[dict[int, float]] = []
    for seed in sort_seeds(runs):
        vals = {}
        for ep, rec in epochs_of(runs[seed] or []):
            v = record_value(rec, key, main_task, higher_is_better)
            if v is not None:
                vals[ep] = v
        if vals:
            per_seed.append(vals)
    if not per_seed:
        return None
    epochs = sorted({e for d in per_seed for e in d})
    mat = np.full((len(per_seed), len(epochs)), np.nan)
    for i, d in enumerate(per_seed):
        for j, e in enumerate(epochs):
            mat[i, j] = d.get(e, np.nan)
    return np.asarray(epochs, dtype=float), mat


def band(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-epoch mean and 95% t-CI of the mean over the seeds present (NaN CI where fewer than 2)."""
    ok = np.isfinite(mat)
    n = ok.sum(axis=0)
    filled = np.where(ok, mat, 0.0)
    mean = np.where(n > 0, filled.sum(axis=0) / np.maximum(n, 1), np.nan)
    dev = np.where(ok, mat - mean, 0.0)
    var = np.where(n > 1, (dev**2).sum(axis=0) / np.maximum(n - 1, 1), np.nan)
    tq = np.where(n > 1, _st.t.ppf(0.975, np.maximum(n - 1, 1)), np.nan)
    half = tq * np.sqrt(var) / np.sqrt(np.maximum(n, 1))
    return mean, mean - half, mean + half


def final(runs: Runs, key: str, main_task: str, higher_is_better: bool) -> dict[Any, float]:
    """Per seed, the value of ``key`` at the last epoch that recorded it."""
    out = {}
    for seed in sort_seeds(runs):
        last = None
        for _, rec in epochs_of(runs[seed] or []):
            v = record_value(rec, key, main_task, higher_is_better)
            if v is not None:
                last = v
        if last is not None:
            out[seed] = last
    return out


def mean_over_run(runs: Runs, key: str, main_task: str, higher_is_better: bool) -> list[float]:
    """Per seed, the mean of ``key`` over all its epochs (each seed weighs the same)."""
    out = []
    for seed in sort_seeds(runs):
        vals = [
            v
            for _, rec in epochs_of(runs[seed] or [])
            if (v := record_value(rec, key, main_task, higher_is_better)) is not None
        ]
        if vals:
            out.append(float(np.mean(vals)))
    return out


def tasks_with_prefix(runs: Runs, prefix: str, main_task: str) -> list[str]:
    """The task names that follow ``prefix`` in any record's keys, the main task excluded, in first-seen order."""
    seen: dict[str, None] = {}
    for seed in sort_seeds(runs):
        for rec in runs[seed] or []:
            for k in rec:
                if isinstance(k, str) and k.startswith(prefix):
                    task = k[len(prefix) :]
                    if task and task != main_task:
                        seen.setdefault(task, None)
    return list(seen)


def variant_summary(v: Mapping[str, Any]) -> tuple[list[Any], list[float], float | None, Any]:
    """(seeds, per-seed values, mean, ci95) of one variant, computing the mean/CI if results lack them."""
    values = [float(x) for x in v.get("main") or [] if as_float(x) is not None]
    seeds = list(v.get("seeds") or range(len(values)))
    mean = as_float(v.get("mean"))
    ci = v.get("ci95")
    if mean is None and values:
        mean = float(np.mean(values))
    if ci is None and len(values) >= 2:
        arr = np.asarray(values)
        half = float(_st.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
        ci = [mean - half, mean + half]
    return seeds, values, mean, ci


@dataclass
class ReportContext:
    """Everything the sections and figures need, resolved once from results.json and the histories."""

    results: Mapping[str, Any]
    histories: History
    best_epochs: Mapping[str, Mapping[Any, int]]
    fmt: MetricFormat
    #: The main task's name: the suffix of its history keys (``val/metric/<main_task>``).
    main_task: str
    baseline: str
    order: list[str]
    variants: dict[str, Mapping[str, Any]]
    comparisons: dict[str, Mapping[str, Any]]
    colors: dict[str, str]

    @property
    def split(self) -> str:
        return str(self.results.get("split", "?"))

    def main_key(self, split: str) -> str:
        """The history key of the main task's metric on ``split``."""
        return f"{split}/metric/{self.main_task}"

    def runs(self, variant: str) -> Runs:
        return self.histories.get(variant) or {}

    def curve(self, variant: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        return curve(self.runs(variant), key, self.main_task, self.fmt.higher_is_better)

    def final(self, variant: str, key: str) -> dict[Any, float]:
        return final(self.runs(variant), key, self.main_task, self.fmt.higher_is_better)

    def mean_over_run(self, variant: str, key: str) -> list[float]:
        return mean_over_run(self.runs(variant), key, self.main_task, self.fmt.higher_is_better)

    def tasks_with_prefix(self, variant: str, prefix: str) -> list[str]:
        return tasks_with_prefix(self.runs(variant), prefix, self.main_task)

    def style(self, variant: str) -> dict[str, Any]:
        if variant == self.baseline:
            return {"color": "black", "linestyle": "--", "linewidth": 2.0}
        return {"color": self.colors[variant], "linestyle": "-", "linewidth": 1.6}

    def aux_tasks(self, variant: str) -> list[str]:
        """Declared aux tasks first (their order is the config's), then any others found in the logs."""
        seen: dict[str, None] = {}
        for t in self.variants.get(variant, {}).get("aux_tasks") or []:
            if str(t) != self.main_task:
                seen.setdefault(str(t), None)
        for prefix in ("val/metric/", "train/weight/", "val/loss/", "cos/"):
            for t in self.tasks_with_prefix(variant, prefix):
                seen.setdefault(t, None)
        return list(seen)


def make_context(
    results: Mapping[str, Any], histories: History | None, best_epochs: Mapping[str, Mapping[Any, int]] | None
) -> ReportContext:
    histories = histories or {}
    baseline = str(results.get("baseline", "baseline"))
    variants = {str(v.get("name")): v for v in results.get("variants") or []}
    comparisons = {str(c.get("variant")): c for c in results.get("comparisons") or []}
    order: dict[str, None] = {baseline: None}
    for name in [*variants, *comparisons, *map(str, histories)]:
        order.setdefault(name, None)
    if baseline not in variants and baseline not in histories:
        order.pop(baseline)
    others = [v for v in order if v != baseline]
    colors = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(others)}
    colors[baseline] = "black"
    return ReportContext(
        results=results,
        histories=histories,
        best_epochs=best_epochs or {},
        fmt=MetricFormat.of(results),
        main_task=main_task_of(results),
        baseline=baseline,
        order=list(order),
        variants=variants,
        comparisons=comparisons,
        colors=colors,
    )
