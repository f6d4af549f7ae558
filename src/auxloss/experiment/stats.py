"""Honest statistics for paired-by-seed experiments.

auxloss trains a baseline (no auxiliary loss) and each variant on the *same* seeds, so every comparison
is paired: for a variant ``v`` and the baseline ``b`` the unit of analysis is the per-seed difference

    d_i = v_i - b_i        for each seed i present in both runs.

Sign convention: a positive difference means the variant reached a *higher* metric. Whether higher is
better (accuracy) or worse (loss, error rate) is given by ``higher_is_better`` and only affects the verdict.

Everything here is a pure function on plain Python / numpy numbers. The distributions and tests come from
scipy (``scipy.stats.t``, ``ttest_rel``, ``wilcoxon``, ``bootstrap``); only Holm's step-down correction,
which scipy lacks, is written out here.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats as _st

from auxloss._checks import open_fraction
from auxloss.errors import AuxLossError

__all__ = [
    "Comparison",
    "Verdict",
    "compare",
    "holm",
    "mean_ci",
    "summarize",
]

Verdict = Literal["helps", "hurts", "no detectable effect"]

#: Smallest number of paired seeds for which a Wilcoxon signed-rank p-value is reported. With fewer than 6
#: pairs the exact two-sided p-value can never drop below 0.0625, so the test could not reject at 0.05.
WILCOXON_MIN_N = 6
#: Smallest number of paired seeds for which a bootstrap CI is reported (with 2 values there are only
#: three distinct resampled means, so the "interval" is meaningless).
BOOTSTRAP_MIN_N = 3
#: Resamples and seed for the bootstrap; fixed so that a report is reproducible bit-for-bit.
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


# --------------------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------------------


def _finite_array(values: Iterable[float], what: str) -> np.ndarray:
    """``values`` as a 1-D float64 array; AuxLossError if empty, non-numeric or non-finite."""
    try:
        arr = np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AuxLossError(
            f"{what} must be a sequence of numbers, but could not be read as numbers ({exc}). "
            "Pass plain floats, one per seed."
        ) from None
    if arr.ndim != 1:
        raise AuxLossError(f"{what} must be a flat sequence of numbers, got shape {arr.shape}. Flatten it.")
    if arr.size == 0:
        raise AuxLossError(f"{what} is empty. Pass at least one value (one per seed).")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise AuxLossError(
            f"{what} contains non-finite values ({', '.join(repr(float(arr[i])) for i in bad[:5])} "
            f"at position(s) {bad[:5].tolist()}). A NaN/inf final metric usually means a diverged run: "
            "fix or drop that seed before computing statistics."
        )
    return arr


def _sorted_seeds(seeds: Iterable[Hashable]) -> list[Any]:
    """Seeds in a deterministic order (numeric order for ints; by text for mixed key types)."""
    seeds = list(seeds)
    try:
        return sorted(seeds)  # type: ignore[type-var]
    except TypeError:
        return sorted(seeds, key=repr)


def _seed_values(values_by_seed: Mapping[Any, float], what: str) -> tuple[list[Any], np.ndarray]:
    """Sorted seeds and their values; AuxLossError naming the seeds whose metric is unusable."""
    if not isinstance(values_by_seed, Mapping):
        raise AuxLossError(
            f"{what} must be a mapping seed -> metric value (e.g. {{0: 0.91, 1: 0.90}}), "
            f"got {type(values_by_seed).__name__}."
        )
    if not values_by_seed:
        raise AuxLossError(f"{what} has no seeds. Pass at least one seed -> metric value.")
    seeds = _sorted_seeds(values_by_seed)
    values, bad = [], []
    for s in seeds:
        try:
            v = float(values_by_seed[s])
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v):
            bad.append(s)
        values.append(v)
    if bad:
        raise AuxLossError(
            f"{what} has a non-numeric or non-finite metric for seed(s) {bad} "
            f"(values: {[values_by_seed[s] for s in bad]}). A NaN/inf final metric usually means a "
            "diverged run: fix or drop that seed before computing statistics."
        )
    return seeds, np.asarray(values, dtype=np.float64)


def _json_float(x: float | None) -> float | None:
    """A float that ``json.dumps`` can write in strict JSON: NaN and +/-inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------------------
# Mean and confidence interval
# --------------------------------------------------------------------------------------------------------


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Sample mean and Student-t confidence interval for the mean.

    With n values x_1..x_n, mean m and sample standard deviation s (ddof=1):

        CI = m -/+ t_{(1+confidence)/2, n-1} * s / sqrt(n)

    where t_{q, df} is the q-quantile of Student's t with df degrees of freedom (``scipy.stats.t.ppf``).

    The interval is undefined for a single value (no estimate of spread): then ``(m, (nan, nan))`` is
    returned; render it as "n/a". If all values are equal (s = 0) the interval collapses to ``(m, m)``.

    Raises:
        AuxLossError: empty input, a non-finite value, or ``confidence`` not in (0, 1).
    """
    confidence = open_fraction("confidence", confidence, example="0.95 / 0.05")
    x = _finite_array(values, "values")
    n = x.size
    m = float(np.mean(x))
    if n < 2:
        return m, (math.nan, math.nan)
    se = float(np.std(x, ddof=1)) / math.sqrt(n)
    half = float(_st.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * se
    return m, (m - half, m + half)


def summarize(values_by_seed: Mapping[int, float]) -> dict[str, Any]:
    """Descriptive statistics of one run's per-seed final metric, as a JSON-ready dict.

    Keys: ``n``; ``mean``; ``std`` (sample std, ddof=1); ``ci95`` (``[low, high]``, the t-based 95% CI of
    :func:`mean_ci`); ``seeds`` (sorted); ``values`` (in the order of ``seeds``). Quantities that are
    undefined for a single seed (``std``, ``ci95`` bounds) are ``None``.

    Raises:
        AuxLossError: not a mapping, empty, or a non-finite value.
    """
    seeds, x = _seed_values(values_by_seed, "values_by_seed")
    m, (lo, hi) = mean_ci(x, 0.95)
    std = float(np.std(x, ddof=1)) if x.size >= 2 else math.nan
    return {
        "n": int(x.size),
        "mean": _json_float(m),
        "std": _json_float(std),
        "ci95": [_json_float(lo), _json_float(hi)],
        "seeds": list(seeds),
        "values": [float(v) for v in x],
    }


# --------------------------------------------------------------------------------------------------------
# Holm correction
# --------------------------------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the input order.

    Let the m non-NaN p-values sorted ascending be p_(1) <= ... <= p_(m). The adjusted values are

        p~_(k) = min(1, max_{j <= k} (m - j + 1) * p_(j))

    so they are monotone in the raw p-values, never below the raw value, and capped at 1. Rejecting every
    hypothesis with p~ < alpha controls the family-wise error rate at alpha under any dependence.

    NaN entries (e.g. a comparison with fewer than two seeds, which has no p-value) are returned as NaN
    and do not count towards m.

    Raises:
        AuxLossError: a value outside [0, 1] or infinite.
    """
    try:
        p = np.asarray(list(p_values), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise AuxLossError(f"p_values must be a flat sequence of numbers (NaN allowed); {exc}.") from None
    out = np.full(p.shape, np.nan)
    known = np.flatnonzero(~np.isnan(p))
    bad = [float(v) for v in p[known] if not (0.0 <= v <= 1.0)]
    if bad:
        raise AuxLossError(f"p-values must lie in [0, 1] (or be NaN), got {bad[:5]}. Pass raw p-values.")
    m = known.size
    if m:
        order = known[np.argsort(p[known], kind="stable")]
        scaled = (m - np.arange(m)) * p[order]  # (m - j + 1) * p_(j) with j = 1..m
        out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return [float(v) for v in out]


# --------------------------------------------------------------------------------------------------------
# Paired comparison
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A variant against the baseline, paired by seed (d_i = variant_i - baseline_i).

    Attributes:
        variant, baseline: names of the two runs.
        n: number of seeds present in both (the pairs actually used).
        seeds: those seeds, sorted.
        delta: mean(d). Positive means the variant has the *higher* metric, whatever the metric means.
        ci95: t-based 95% CI of mean(d): delta -/+ t_{0.975, n-1} * s_d / sqrt(n), (nan, nan) if n < 2.
        p_value: two-sided paired t-test (``scipy.stats.ttest_rel``), t = mean(d) / (s_d / sqrt(n)) with
            n-1 degrees of freedom; NaN if n < 2. If all d_i are equal the test degenerates: p = 1.0 when
            they are all zero (no difference at all) and p = 0.0 otherwise (the limit t -> inf).
        p_holm: ``p_value`` after Holm's correction across all variants passed to the same
            :func:`compare` call.
        p_wilcoxon: two-sided Wilcoxon signed-rank p-value (zero differences dropped) as a robustness
            check, or None when n < 6 or every difference is zero.
        effect_size: Cohen's d_z = mean(d) / s_d (s_d with ddof=1). When s_d = 0 it is +inf / -inf
            following the sign of mean(d), and 0.0 when every difference is zero; NaN if n < 2.
        bootstrap_ci: 95% BCa bootstrap CI of mean(d) (``scipy.stats.bootstrap`` on the differences,
            9999 resamples, fixed seed; percentile if BCa is not computable), or None when n < 3 or bootstrapping was turned off. Collapses
            to (delta, delta) when all differences are equal.
        verdict: "helps" if p_holm < alpha and delta points the good way (delta > 0 if higher_is_better,
            else delta < 0); "hurts" if p_holm < alpha and it points the bad way; otherwise
            "no detectable effect" (always so with n < 2).
        higher_is_better: whether a higher metric is an improvement.
        alpha: significance level used for the verdict.
    """

    variant: str
    baseline: str
    n: int
    delta: float
    ci95: tuple[float, float]
    p_value: float
    p_holm: float
    p_wilcoxon: float | None
    effect_size: float
    bootstrap_ci: tuple[float, float] | None
    verdict: Verdict
    higher_is_better: bool
    alpha: float = 0.05
    seeds: tuple[Any, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict: tuples become lists, NaN and +/-inf become None (strict JSON has neither).

        The sign of an infinite ``effect_size`` is still readable from ``delta``.
        """
        d = asdict(self)
        for key in ("delta", "p_value", "p_holm", "p_wilcoxon", "effect_size", "alpha"):
            d[key] = _json_float(d[key])
        d["ci95"] = [_json_float(v) for v in self.ci95]
        d["bootstrap_ci"] = None if self.bootstrap_ci is None else [_json_float(v) for v in self.bootstrap_ci]
        d["seeds"] = list(self.seeds)
        d["n"] = int(self.n)
        d["higher_is_better"] = bool(self.higher_is_better)
        return d


def _bootstrap_mean_ci(diff: np.ndarray) -> tuple[float, float]:
    """95% bootstrap CI of the mean of ``diff`` (BCa; percentile if BCa cannot be computed)."""
    params = inspect.signature(_st.bootstrap).parameters
    seed_kw = "rng" if "rng" in params else "random_state"  # scipy >= 1.15 renamed random_state to rng
    ci = None
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = _st.bootstrap(
                (diff,),
                np.mean,
                confidence_level=0.95,
                n_resamples=BOOTSTRAP_RESAMPLES,
                method=method,
                **{seed_kw: np.random.default_rng(BOOTSTRAP_SEED)},
            )
        ci = (float(res.confidence_interval.low), float(res.confidence_interval.high))
        if all(math.isfinite(v) for v in ci):
            break
    assert ci is not None
    return ci


def _paired_stats(diff: np.ndarray, variant: np.ndarray, base: np.ndarray, bootstrap: bool) -> dict:
    """Everything about one paired comparison except the Holm step and the verdict."""
    n = diff.size
    delta = float(np.mean(diff))
    out: dict[str, Any] = {
        "delta": delta,
        "ci95": (math.nan, math.nan),
        "p_value": math.nan,
        "p_wilcoxon": None,
        "effect_size": math.nan,
        "bootstrap_ci": None,
    }
    if n < 2:
        return out
    if np.all(diff == diff[0]):
        # Zero spread: the t statistic is 0/0 (all zero) or +/-inf; use the limits, documented above.
        out["ci95"] = (delta, delta)
        if delta == 0.0:
            out["p_value"], out["effect_size"] = 1.0, 0.0
        else:
            out["p_value"], out["effect_size"] = 0.0, math.copysign(math.inf, delta)
        if bootstrap and n >= BOOTSTRAP_MIN_N:
            out["bootstrap_ci"] = (delta, delta)
        if n >= WILCOXON_MIN_N and delta != 0.0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out["p_wilcoxon"] = float(_st.wilcoxon(diff).pvalue)
        return out

    with warnings.catch_warnings():
        # Nearly identical differences make scipy warn about precision loss; the result is still usable.
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _st.ttest_rel(variant, base)
        ci = res.confidence_interval(confidence_level=0.95)
    out["p_value"] = float(res.pvalue)
    out["ci95"] = (float(ci.low), float(ci.high))
    out["effect_size"] = delta / float(np.std(diff, ddof=1))
    if n >= WILCOXON_MIN_N and np.any(diff != 0.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["p_wilcoxon"] = float(_st.wilcoxon(diff).pvalue)
    if bootstrap and n >= BOOTSTRAP_MIN_N:
        out["bootstrap_ci"] = _bootstrap_mean_ci(diff)
    return out


def _verdict(p_holm: float, delta: float, higher_is_better: bool, alpha: float) -> Verdict:
    if not (p_holm < alpha) or delta == 0.0:  # NaN p compares False -> no detectable effect
        return "no detectable effect"
    improves = delta > 0.0 if higher_is_better else delta < 0.0
    return "helps" if improves else "hurts"


def compare(
    baseline: Mapping[int, float],
    variants: Mapping[str, Mapping[int, float]],
    *,
    higher_is_better: bool = True,
    alpha: float = 0.05,
    baseline_name: str = "baseline",
    bootstrap: bool = True,
) -> list[Comparison]:
    """Compare each variant with the baseline, paired by seed, Holm-corrected across the variants.

    Each variant is paired with the baseline on the seeds present in both (the intersection; ``n`` and
    ``seeds`` on the result record which were used, so a variant that lost some seeds is still compared,
    on fewer pairs). Dict order does not matter: pairs are matched by seed key. The paired two-sided
    t-test p-values of all variants form one family for Holm's correction (see :func:`holm`), and the
    verdict uses the Holm-adjusted p-value at level ``alpha``; see :class:`Comparison` for every field.

    Power: a paired t-test has n-1 degrees of freedom, so with 2 seeds only huge, consistent effects can
    reach significance; use at least 3 seeds (5+ is better) for the verdict to mean anything. With fewer
    than 2 pairs there is no p-value (NaN) and the verdict is always "no detectable effect".

    Results are returned in the iteration order of ``variants``.

    Raises:
        AuxLossError: empty/non-finite metrics, ``alpha`` not in (0, 1), or a variant sharing no seed with
            the baseline (the message lists the seeds each side has).
    """
    alpha = open_fraction("alpha", alpha, example="0.95 / 0.05")
    if not isinstance(variants, Mapping):
        raise AuxLossError(
            f"variants must be a mapping name -> {{seed: metric}}, got {type(variants).__name__}. "
            'E.g. compare(base, {"with_aux": {0: 0.91, 1: 0.92}}).'
        )
    base_seeds, base_values = _seed_values(baseline, f"baseline {baseline_name!r}")
    base_by_seed = dict(zip(base_seeds, base_values))

    partial: list[tuple[str, list[Any], dict]] = []
    for name, runs in variants.items():
        seeds, values = _seed_values(runs, f"variant {name!r}")
        common = [s for s in seeds if s in base_by_seed]
        if not common:
            raise AuxLossError(
                f"variant {name!r} shares no seed with baseline {baseline_name!r}: the variant has seeds "
                f"{seeds} and the baseline has seeds {base_seeds}. Comparisons are paired by seed, so "
                "run the variant on (some of) the baseline's seeds, or check that the seed keys have the "
                "same type (e.g. int 0 vs str '0')."
            )
        by_seed = dict(zip(seeds, values))
        v = np.array([by_seed[s] for s in common], dtype=np.float64)
        b = np.array([base_by_seed[s] for s in common], dtype=np.float64)
        partial.append((str(name), common, _paired_stats(v - b, v, b, bootstrap)))

    adjusted = holm([st["p_value"] for _, _, st in partial])
    return [
        Comparison(
            variant=name,
            baseline=baseline_name,
            n=len(common),
            delta=st["delta"],
            ci95=st["ci95"],
            p_value=st["p_value"],
            p_holm=p_h,
            p_wilcoxon=st["p_wilcoxon"],
            effect_size=st["effect_size"],
            bootstrap_ci=st["bootstrap_ci"],
            verdict=_verdict(p_h, st["delta"], higher_is_better, alpha),
            higher_is_better=bool(higher_is_better),
            alpha=alpha,
            seeds=tuple(common),
        )
        for (name, common, st), p_h in zip(partial, adjusted)
    ]


def metric_bounds(metric: str) -> tuple[float, float]:
    """The range a metric's values can take: a fraction for accuracies, non-negative for errors, else unbounded."""
    name = metric.lower()
    if "acc" in name:
        return 0.0, 1.0
    if name in ("mse", "mae", "rmse", "loss") or name.endswith(("_mse", "_mae", "_loss")):
        return 0.0, math.inf
    return -math.inf, math.inf


def clip_interval(ci: Sequence[float], bounds: tuple[float, float]) -> tuple[tuple[float, float], bool]:
    """A mean's t-interval cut to the metric's range, and whether it was cut: the t-interval is symmetric, so a
    mean near a bound (87% accuracy with a wide spread) can reach past it (100.9%), which no value can."""
    lo, hi = float(ci[0]), float(ci[1])
    clipped = (max(lo, bounds[0]), min(hi, bounds[1]))
    return clipped, clipped != (lo, hi)
