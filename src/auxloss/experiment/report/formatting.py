"""Number formatting for the report: every number a reader sees is written by one of these functions.

Missing values (``None`` in results.json, NaN, inf) are written as ``"n/a"``, never as an error, because a
single-seed run or an older results file legitimately lacks CIs and p-values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from auxloss.experiment.stats import clip_interval, metric_bounds

#: Fewer paired seeds than this and a paired t-test can only flag enormous, perfectly consistent effects;
#: the report says so instead of letting "no detectable effect" read as "no effect".
MIN_SEEDS = 3


def as_float(x: Any) -> float | None:
    """``x`` as a finite float, or None (missing, null in JSON, NaN, inf, not a number)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def g4(x: float, sign: bool = False) -> str:
    """Four significant digits, keeping trailing zeros (0.7 -> 0.7000) so columns read evenly."""
    s = f"{x:+#.4g}" if sign else f"{x:#.4g}"
    # '#' keeps a bare trailing point for integers such as 1234 -> "1234."; drop it.
    if "e" not in s and s.endswith("."):
        s = s[:-1]
    return s


def fmt_p(p: Any) -> str:
    v = as_float(p)
    if v is None:
        return "n/a"
    return "<0.001" if v < 0.001 else f"{v:.3f}"


def p_phrase(label: str, p: Any) -> str:
    """'Holm p = 0.012', 'Holm p < 0.001' or 'Holm p n/a' for running text."""
    s = fmt_p(p)
    if s == "n/a":
        return f"{label} n/a"
    return f"{label} < 0.001" if s.startswith("<") else f"{label} = {s}"


def ci_pair(ci: Any) -> tuple[float | None, float | None]:
    """The two ends of a stored ``[lo, hi]`` interval, each None where missing."""
    if not isinstance(ci, Sequence) or isinstance(ci, str) or len(ci) != 2:
        return None, None
    return as_float(ci[0]), as_float(ci[1])


def fmt_d(c: Mapping[str, Any]) -> str:
    """Cohen's d_z; to_dict() stores +/-inf as null, so recover it from a zero-width CI and delta."""
    d = as_float(c.get("effect_size"))
    if d is not None:
        return f"{d:+.2f}"
    lo, hi = ci_pair(c.get("ci95"))
    delta = as_float(c.get("delta"))
    if lo is not None and lo == hi and delta:
        return "+inf" if delta > 0 else "-inf"
    return "n/a"


def fmt_duration(seconds: Any) -> str | None:
    s = as_float(seconds)
    if s is None:
        return None
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {sec} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def mean_sd(
    values: Sequence[float], fmt: Callable[[float], str], sd_fmt: Callable[[float], str] | None = None
) -> str:
    """'0.8123 ± 0.01230' (mean ± sample sd over seeds), numbers written by ``fmt`` / ``sd_fmt``."""
    if not values:
        return "n/a"
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if arr.size < 2:
        return fmt(mean)
    sd = float(arr.std(ddof=1))
    # Equal values can leave float noise (6.8e-17) in the sd; that is zero, not a number to print.
    if sd <= 1e-9 * max(abs(mean), 1e-12):
        sd = 0.0
    return f"{fmt(mean)} ± {(sd_fmt or fmt)(sd)}"


def seeds_word(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


@dataclass(frozen=True)
class MetricFormat:
    """Formats numbers of the main metric: accuracy-like metrics as points (x100), others to 4 digits."""

    metric: str
    higher_is_better: bool

    @classmethod
    def of(cls, results: Mapping[str, Any]) -> MetricFormat:
        """The main metric's format as results.json describes it."""
        return cls(str(results.get("metric", "metric")), bool(results.get("higher_is_better", True)))

    @property
    def points(self) -> bool:
        # "acc" covers accuracy, top1_acc, balanced_accuracy...: fractions people read as percentages.
        return "acc" in self.metric.lower()

    def scale(self, x: np.ndarray | float) -> Any:
        return x * 100.0 if self.points else x

    def value(self, x: Any) -> str:
        v = as_float(x)
        if v is None:
            return "n/a"
        return f"{v * 100:.1f}" if self.points else g4(v)

    def delta(self, x: Any) -> str:
        v = as_float(x)
        if v is None:
            return "n/a"
        return f"{v * 100:+.1f}" if self.points else g4(v, sign=True)

    def amount(self, x: Any, signed: bool = False) -> str:
        """A number with its unit for running text: '3.1 points' / '0.01234'."""
        s = self.delta(x) if signed else self.value(x)
        return f"{s} points" if self.points and s != "n/a" else s

    def change(self, x: Any) -> str:
        """A signed change of the main metric with its unit: '+3.1 points of accuracy'."""
        s = self.delta(x)
        return f"{s} points of {self.metric}" if self.points else f"{s} {self.metric}"

    def ci(self, ci: Any, signed: bool = False) -> str:
        lo, hi = ci_pair(ci)
        if lo is None or hi is None:
            return "n/a"
        f = self.delta if signed else self.value
        return f"[{f(lo)}, {f(hi)}]"

    def clip(self, ci: Any) -> tuple[Any, bool]:
        """``ci`` cut to the range the metric can take, and whether it was cut (a missing end: as it is). Every
        printed or drawn interval of the metric goes through here, and a cut one gets :meth:`clipped_note`."""
        lo, hi = ci_pair(ci)
        if lo is None or hi is None:
            return ci, False
        return clip_interval((lo, hi), metric_bounds(self.metric))

    @property
    def clipped_note(self) -> str:
        """The mark under a table that shows a cut interval."""
        return f"95% CIs cut to the range {self.metric} can take (a t-interval near a bound reaches past it)"

    def mean_ci(self, mean: Any, ci: Any) -> str:
        """'70.0 ± 1.0' for a symmetric CI (the t-interval), '70.0 [68.0, 72.5]' otherwise."""
        m = as_float(mean)
        lo, hi = ci_pair(ci)
        if m is None:
            return "n/a"
        if lo is None or hi is None:
            return f"{self.value(m)} (CI n/a)"
        half = (hi - lo) / 2.0
        if abs((lo + hi) / 2.0 - m) <= 1e-9 * max(1.0, abs(m)):
            return f"{self.value(m)} ± {self.value(half)}"
        return f"{self.value(m)} {self.ci((lo, hi))}"

    @property
    def unit_label(self) -> str:
        return f"{self.metric} (points)" if self.points else self.metric
