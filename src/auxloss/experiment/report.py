"""Turn a finished experiment into a report a person can decide from.

Input is what the runner stores: ``results`` (the content of results.json: per-variant final metrics and
the paired comparisons already computed by :mod:`auxloss.experiment.stats`) and ``histories`` (variant ->
seed -> per-epoch records). Nothing statistical is recomputed here except descriptive summaries of the
histories (means, spreads, t-bands for the curves): the verdicts come from the comparisons as stored, so
the report can never disagree with results.json.

Outputs (see :func:`build_report`): ``report.md``, ``report.html`` (self-contained, CSS inline, figures by
relative path) and PNG figures under ``figures/``. Both text formats are rendered from one small document
model, so they always carry the same content.

Figures use :class:`matplotlib.figure.Figure` directly rather than pyplot: that needs no GUI backend, keeps
no global figure registry (no leaks when many reports are built in one process) and does not change the
backend of a user who imported auxloss inside a notebook.
"""

from __future__ import annotations

import contextvars

import html
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats as _st

from auxloss.experiment.stats import clip_interval, metric_bounds

__all__ = ["build_report", "format_table", "summary_sentences"]

#: Fewer paired seeds than this and a paired t-test can only flag enormous, perfectly consistent effects;
#: the report says so instead of letting "no detectable effect" read as "no effect".
MIN_SEEDS = 3
#: Width the terminal table must fit in.
TABLE_WIDTH = 100
FIGURE_DPI = 110
BAND_TEXT = "shaded band: 95% t-confidence interval of the mean across seeds (absent where only one seed)"
# tab10 without its black-ish/grey entries would still leave 9; the baseline alone is black so that it
# stands out in every figure.
_PALETTE = [
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

# Lines for the tasks *within* one variant's panel use another palette, so that a task line is never
# mistaken for the variant of the same colour in the other figures (ColorBrewer Dark2).
_TASK_PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]

History = Mapping[str, Mapping[Any, Sequence[Mapping[str, Any]]]]


# --------------------------------------------------------------------------------------------------------
# Number formatting
# --------------------------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """``x`` as a finite float, or None (missing, null in JSON, NaN, inf, not a number)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _g4(x: float, sign: bool = False) -> str:
    """Four significant digits, keeping trailing zeros (0.7 -> 0.7000) so columns read evenly."""
    s = f"{x:+#.4g}" if sign else f"{x:#.4g}"
    # '#' keeps a bare trailing point for integers such as 1234 -> "1234."; drop it.
    if "e" not in s and s.endswith("."):
        s = s[:-1]
    return s


def _fmt_p(p: Any) -> str:
    v = _num(p)
    if v is None:
        return "n/a"
    return "<0.001" if v < 0.001 else f"{v:.3f}"


def _p_phrase(label: str, p: Any) -> str:
    """'Holm p = 0.012', 'Holm p < 0.001' or 'Holm p n/a' for running text."""
    s = _fmt_p(p)
    if s == "n/a":
        return f"{label} n/a"
    return f"{label} < 0.001" if s.startswith("<") else f"{label} = {s}"


@dataclass(frozen=True)
class _Fmt:
    """Formats numbers of the main metric: accuracy-like metrics as points (x100), others to 4 digits."""

    metric: str
    higher_is_better: bool

    @property
    def points(self) -> bool:
        # "acc" covers accuracy, top1_acc, balanced_accuracy...: fractions people read as percentages.
        return "acc" in self.metric.lower()

    def scale(self, x: np.ndarray | float) -> Any:
        return x * 100.0 if self.points else x

    def value(self, x: Any) -> str:
        v = _num(x)
        if v is None:
            return "n/a"
        return f"{v * 100:.1f}" if self.points else _g4(v)

    def delta(self, x: Any) -> str:
        v = _num(x)
        if v is None:
            return "n/a"
        return f"{v * 100:+.1f}" if self.points else _g4(v, sign=True)

    def amount(self, x: Any, signed: bool = False) -> str:
        """A number with its unit for running text: '3.1 points' / '0.01234'."""
        s = self.delta(x) if signed else self.value(x)
        return f"{s} points" if self.points and s != "n/a" else s

    def change(self, x: Any) -> str:
        """A signed change of the main metric with its unit: '+3.1 points of accuracy'."""
        s = self.delta(x)
        return f"{s} points of {self.metric}" if self.points else f"{s} {self.metric}"

    def ci(self, ci: Any, signed: bool = False) -> str:
        lo, hi = _pair(ci)
        if lo is None or hi is None:
            return "n/a"
        f = self.delta if signed else self.value
        return f"[{f(lo)}, {f(hi)}]"

    def mean_ci(self, mean: Any, ci: Any) -> str:
        """'70.0 ± 1.0' for a symmetric CI (the t-interval), '70.0 [68.0, 72.5]' otherwise."""
        m = _num(mean)
        lo, hi = _pair(ci)
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


def _pair(ci: Any) -> tuple[float | None, float | None]:
    if not isinstance(ci, Sequence) or isinstance(ci, str) or len(ci) != 2:
        return None, None
    return _num(ci[0]), _num(ci[1])


def _fmt_d(c: Mapping[str, Any]) -> str:
    """Cohen's d_z; to_dict() stores +/-inf as null, so recover it from a zero-width CI and delta."""
    d = _num(c.get("effect_size"))
    if d is not None:
        return f"{d:+.2f}"
    lo, hi = _pair(c.get("ci95"))
    delta = _num(c.get("delta"))
    if lo is not None and lo == hi and delta:
        return "+inf" if delta > 0 else "-inf"
    return "n/a"


def _fmt_duration(seconds: Any) -> str | None:
    s = _num(seconds)
    if s is None:
        return None
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {sec} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _mean_sd(values: Sequence[float], fmt: Any, sd_fmt: Any = None) -> str:
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


# --------------------------------------------------------------------------------------------------------
# Reading results and histories
# --------------------------------------------------------------------------------------------------------


def _sort_seeds(seeds: Any) -> list[Any]:
    seeds = list(seeds)
    try:
        return sorted(seeds)
    except TypeError:
        return sorted(seeds, key=repr)


def _seed_lookup(mapping: Mapping[Any, Any] | None, seed: Any) -> Any:
    """Seeds may come back from JSON as strings: accept 0 and "0" as the same seed."""
    if not mapping:
        return None
    if seed in mapping:
        return mapping[seed]
    for alt in (str(seed), _num(seed)):
        if alt is not None and alt in mapping:
            return mapping[alt]
    try:
        return mapping.get(int(seed))
    except (TypeError, ValueError):
        return None


# The metric direction of the report being built, for the legacy gap fallback below.
_HIGHER_IS_BETTER: contextvars.ContextVar[bool] = contextvars.ContextVar("higher_is_better", default=True)


def _record_value(rec: Mapping[str, Any], key: str) -> float | None:
    v = _num(rec.get(key))
    if v is None and key == "gap":
        # Older runs may store only the two metrics; the gap is their difference by definition.
        # (sign-normalised like the trainer's: positive means overfitting, whatever the metric's direction).
        tv, va = _num(rec.get("trainval/metric/main")), _num(rec.get("val/metric/main"))
        if tv is not None and va is not None:
            v = tv - va if _HIGHER_IS_BETTER.get() else va - tv
    return v


def _epochs(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    out = []
    for i, rec in enumerate(records):
        ep = _num(rec.get("epoch"))
        out.append((int(ep) if ep is not None else i + 1, rec))
    return sorted(out, key=lambda t: t[0])


def _curve(runs: Mapping[Any, Sequence[Mapping[str, Any]]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, seeds x epochs matrix with NaN where a seed lacks the epoch), or None if no data.

    Seeds may have different lengths (early stopping), so epochs are aligned by number, not position.
    """
    per_seed: list[dict[int, float]] = []
    for seed in _sort_seeds(runs):
        vals = {}
        for ep, rec in _epochs(runs[seed] or []):
            v = _record_value(rec, key)
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


def _band(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _final(runs: Mapping[Any, Sequence[Mapping[str, Any]]], key: str) -> dict[Any, float]:
    """Per seed, the value of ``key`` at the last epoch that recorded it."""
    out = {}
    for seed in _sort_seeds(runs):
        last = None
        for _, rec in _epochs(runs[seed] or []):
            v = _record_value(rec, key)
            if v is not None:
                last = v
        if last is not None:
            out[seed] = last
    return out


def _mean_over_run(runs: Mapping[Any, Sequence[Mapping[str, Any]]], key: str) -> list[float]:
    """Per seed, the mean of ``key`` over all its epochs (each seed weighs the same)."""
    out = []
    for seed in _sort_seeds(runs):
        vals = [v for _, rec in _epochs(runs[seed] or []) if (v := _record_value(rec, key)) is not None]
        if vals:
            out.append(float(np.mean(vals)))
    return out


def _tasks_with_prefix(runs: Mapping[Any, Sequence[Mapping[str, Any]]], prefix: str) -> list[str]:
    seen: dict[str, None] = {}
    for seed in _sort_seeds(runs):
        for rec in runs[seed] or []:
            for k in rec:
                if isinstance(k, str) and k.startswith(prefix):
                    task = k[len(prefix) :]
                    if task and task != "main":
                        seen.setdefault(task, None)
    return list(seen)


@dataclass
class _Ctx:
    """Everything the sections and figures need, resolved once."""

    results: Mapping[str, Any]
    histories: History
    best_epochs: Mapping[str, Mapping[Any, int]]
    fmt: _Fmt
    baseline: str
    order: list[str]
    variants: dict[str, Mapping[str, Any]]
    comparisons: dict[str, Mapping[str, Any]]
    colors: dict[str, str]

    def runs(self, variant: str) -> Mapping[Any, Sequence[Mapping[str, Any]]]:
        return self.histories.get(variant) or {}

    def style(self, variant: str) -> dict[str, Any]:
        if variant == self.baseline:
            return {"color": "black", "linestyle": "--", "linewidth": 2.0}
        return {"color": self.colors[variant], "linestyle": "-", "linewidth": 1.6}

    def aux_tasks(self, variant: str) -> list[str]:
        """Declared aux tasks first (their order is the config's), then any others found in the logs."""
        seen: dict[str, None] = {}
        for t in self.variants.get(variant, {}).get("aux_tasks") or []:
            if str(t) != "main":
                seen.setdefault(str(t), None)
        runs = self.runs(variant)
        for prefix in ("val/metric/", "train/weight/", "val/loss/", "cos/"):
            for t in _tasks_with_prefix(runs, prefix):
                seen.setdefault(t, None)
        return list(seen)


def _context(
    results: Mapping[str, Any], histories: History | None, best_epochs: Mapping[str, Mapping[Any, int]] | None
) -> _Ctx:
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
    colors = {v: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(others)}
    colors[baseline] = "black"
    fmt = _Fmt(str(results.get("metric", "metric")), bool(results.get("higher_is_better", True)))
    return _Ctx(
        results, histories, best_epochs or {}, fmt, baseline, list(order), variants, comparisons, colors
    )


def _variant_summary(v: Mapping[str, Any]) -> tuple[list[Any], list[float], float | None, Any]:
    """(seeds, per-seed values, mean, ci95) of one variant, computing the mean/CI if results lack them."""
    values = [float(x) for x in v.get("main") or [] if _num(x) is not None]
    seeds = list(v.get("seeds") or range(len(values)))
    mean = _num(v.get("mean"))
    ci = v.get("ci95")
    if mean is None and values:
        mean = float(np.mean(values))
    if ci is None and len(values) >= 2:
        arr = np.asarray(values)
        half = float(_st.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
        ci = [mean - half, mean + half]
    return seeds, values, mean, ci


# --------------------------------------------------------------------------------------------------------
# Verdict sentences and the terminal table
# --------------------------------------------------------------------------------------------------------


def _seeds_word(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _sentence(c: Mapping[str, Any], fmt: _Fmt, n_comparisons: int) -> str:
    name = str(c.get("variant"))
    n = int(_num(c.get("n")) or 0)
    verdict = str(c.get("verdict", "no detectable effect"))
    lo, hi = _pair(c.get("ci95"))
    ci_txt = (
        f"95% CI {fmt.delta(lo)} to {fmt.delta(hi)}" if lo is not None and hi is not None else "95% CI n/a"
    )
    # For lower-is-better metrics a negative change is the good direction: say so next to the number.
    lower = "" if fmt.higher_is_better else "lower is better; "
    change = fmt.change(c.get("delta"))
    p_txt = _p_phrase("Holm p", c.get("p_holm"))
    if verdict in ("helps", "hurts"):
        s = f"{name} {verdict}: {change} ({lower}{ci_txt}, {p_txt}, {_seeds_word(n)})."
        if n < MIN_SEEDS:
            s += f" Only {_seeds_word(n)}, so treat this with caution and confirm with more seeds."
        return s
    if n < MIN_SEEDS:
        return (
            f"{name}: no detectable effect, but with only {_seeds_word(n)} that says little "
            f"({change}, {lower}{ci_txt}, {p_txt}). With fewer than {MIN_SEEDS} paired seeds only a huge, "
            "perfectly consistent effect could be detected, so this is not evidence of no effect: "
            "rerun with 5 or more seeds."
        )
    if lo is not None and hi is not None and lo <= 0.0 <= hi:
        why = "the CI spans zero"
    elif lo is not None and hi is not None:
        # The unadjusted CI excludes zero but Holm's correction removed significance: say why, honestly.
        why = f"the CI excludes zero, but the effect is not significant after Holm correction over {n_comparisons}"
        why += " comparisons" if n_comparisons != 1 else " comparison"
    else:
        why = "no CI"
    return f"{name}: no detectable effect ({change}, {lower}{ci_txt}, {why}; {p_txt}, {_seeds_word(n)})."


def summary_sentences(results: Mapping[str, Any]) -> list[str]:
    """One plain-English verdict sentence per comparison, in the order of ``results["comparisons"]``.

    E.g. "deep-supervision helps: +3.1 points of accuracy (95% CI +1.0 to +5.2, Holm p = 0.012, 5 seeds)."
    """
    fmt = _Fmt(str(results.get("metric", "metric")), bool(results.get("higher_is_better", True)))
    comps = list(results.get("comparisons") or [])
    if not comps:
        return ["No variant was compared with the baseline."]
    return [_sentence(c, fmt, len(comps)) for c in comps]


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 1)] + "..."


def format_table(results: Mapping[str, Any]) -> str:
    """Fixed-width plain-text table for a terminal (at most 100 columns).

    Columns: variant, mean, 95% CI, delta vs baseline, Holm-adjusted p, verdict. Long variant names are
    shortened with "..." so that the numbers always stay aligned and visible.
    """
    ctx = _context(results, {}, None)
    fmt = ctx.fmt
    header = ["variant", "mean", "95% CI", "delta vs base", "p (Holm)", "verdict"]
    rows: list[list[str]] = []
    few = False
    clipped_any = False
    for name in ctx.order:
        v = ctx.variants.get(name, {})
        _, _, mean, ci = _variant_summary(v)
        if None not in _pair(ci):  # shown within the metric's range, with a note (issue 14)
            ci, clipped = clip_interval(_pair(ci), metric_bounds(fmt.metric))
            clipped_any |= clipped
        c = ctx.comparisons.get(name)
        if name == ctx.baseline:
            rows.append([name, fmt.value(mean), fmt.ci(ci), "(baseline)", "", ""])
        elif c is not None:
            verdict = str(c.get("verdict", ""))
            if int(_num(c.get("n")) or 0) < MIN_SEEDS:
                verdict += "*"
                few = True
            rows.append(
                [
                    name,
                    fmt.value(mean),
                    fmt.ci(ci),
                    fmt.delta(c.get("delta")),
                    _fmt_p(c.get("p_holm")),
                    verdict,
                ]
            )
        elif v:
            rows.append([name, fmt.value(mean), fmt.ci(ci), "n/a", "n/a", "not compared"])
    sep = "  "
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    rest = sum(widths[1:]) + len(sep) * (len(header) - 1)
    widths[0] = max(8, min(widths[0], TABLE_WIDTH - rest))
    right = [False, True, True, True, True, False]

    def line(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            cell = _fit(cell, widths[i])
            out.append(cell.rjust(widths[i]) if right[i] else cell.ljust(widths[i]))
        return sep.join(out).rstrip()[:TABLE_WIDTH]

    hib = "higher" if fmt.higher_is_better else "lower"
    unit = "; points, x100" if fmt.points else ""
    title = f"{results.get('name', 'experiment')}: {fmt.metric} on {results.get('split', '?')} ({hib} is better{unit})"
    lines = [_fit(title, TABLE_WIDTH), line(header), "-" * min(TABLE_WIDTH, widths[0] + rest)]
    lines += [line(r) for r in rows]
    if few:
        lines.append(
            f"* fewer than {MIN_SEEDS} paired seeds: too few for a reliable verdict (treat with caution)"
        )
    if clipped_any:
        lines.append(f"95% CIs cut to the range {fmt.metric} can take (a t-interval near a bound reaches past it)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Document model: one structure rendered to both markdown and HTML, so they cannot drift apart
# --------------------------------------------------------------------------------------------------------

# A span of inline text: (style, text) with style "" (plain), "b" (bold) or "code".
_Span = tuple[str, str]
_Inline = str | _Span


@dataclass
class _Heading:
    level: int
    text: str


@dataclass
class _Para:
    parts: list[_Inline]


@dataclass
class _Bullets:
    items: list[list[_Inline]]


@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]
    right: list[bool]


@dataclass
class _Fig:
    file: str
    alt: str
    caption: str


@dataclass
class _Code:
    text: str


_Block = _Heading | _Para | _Bullets | _Table | _Fig | _Code


def _md_escape(text: str, table: bool = False) -> str:
    """Backslash-escape what markdown would otherwise interpret in a user-given name or number."""
    text = " ".join(str(text).splitlines())
    for ch in ("\\", "`", "*"):
        text = text.replace(ch, "\\" + ch)
    # Only what could start an HTML tag/autolink ("<b", "</", "<!") or an inline link ("](") is escaped,
    # so that ordinary text such as "p < 0.001" or "[95% CI]" stays readable in the raw file.
    text = re.sub(r"<(?=[A-Za-z/!?])", r"\\<", text).replace("](", "]\\(")
    return text.replace("|", "\\|") if table else text


def _md_inline(parts: list[_Inline]) -> str:
    out = []
    for p in parts:
        style, text = ("", p) if isinstance(p, str) else p
        if style == "b":
            out.append(f"**{_md_escape(text)}**")
        elif style == "code":
            fence = "``" if "`" in text else "`"
            out.append(f"{fence}{text}{fence}")
        else:
            out.append(_md_escape(text))
    return "".join(out)


def _html_inline(parts: list[_Inline]) -> str:
    out = []
    for p in parts:
        style, text = ("", p) if isinstance(p, str) else p
        esc = html.escape(text)
        out.append(
            f"<strong>{esc}</strong>" if style == "b" else f"<code>{esc}</code>" if style == "code" else esc
        )
    return "".join(out)


def _render_md(blocks: list[_Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, _Heading):
            out.append("#" * b.level + " " + _md_escape(b.text))
        elif isinstance(b, _Para):
            out.append(_md_inline(b.parts))
        elif isinstance(b, _Bullets):
            out.append("\n".join("- " + _md_inline(item) for item in b.items))
        elif isinstance(b, _Table):
            rows = [b.header, ["---:" if r else "---" for r in b.right], *b.rows]
            lines = []
            for i, row in enumerate(rows):
                cells = row if i == 1 else [_md_escape(c, table=True) for c in row]
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
        elif isinstance(b, _Fig):
            out.append(f"![{_md_escape(b.alt)}](figures/{b.file})\n\n*{_md_escape(b.caption)}*")
        elif isinstance(b, _Code):
            fence = "```"
            while fence in b.text:
                fence += "`"
            out.append(f"{fence}\n{b.text}\n{fence}")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .35em .6em; vertical-align: top; }
th { background: #f5f5f5; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; }
code { background: #f6f8fa; padding: 0 .2em; }
"""


def _render_html(blocks: list[_Block], title: str) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, _Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, _Para):
            body.append(f"<p>{_html_inline(b.parts)}</p>")
        elif isinstance(b, _Bullets):
            items = "".join(f"<li>{_html_inline(i)}</li>" for i in b.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(b, _Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = []
            for row in b.rows:
                cells = "".join(
                    f'<td class="num">{html.escape(c)}</td>' if r else f"<td>{html.escape(c)}</td>"
                    for c, r in zip(row, b.right)
                )
                rows.append(f"<tr>{cells}</tr>")
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        elif isinstance(b, _Fig):
            src = html.escape(f"figures/{b.file}", quote=True)
            body.append(
                f'<figure><img src="{src}" alt="{html.escape(b.alt, quote=True)}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
            )
        elif isinstance(b, _Code):
            body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def _label(name: str) -> str:
    """A legend-safe label: matplotlib hides labels starting with '_' and parses '$...$' as math."""
    name = str(name).replace("$", r"\$")
    return " " + name if name.startswith("_") else name


def _save(fig: Figure, path: Path) -> None:
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.savefig(path, dpi=FIGURE_DPI)


def _grid(n: int, w: float = 4.6, h: float = 3.4) -> tuple[Figure, list[Any]]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


def _plot_band(ax: Any, x: np.ndarray, mat: np.ndarray, scale: Any, label: str, **style: Any) -> np.ndarray:
    mean, lo, hi = _band(mat)
    ax.plot(x, scale(mean), label=_label(label), **style)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        ax.fill_between(
            x,
            scale(np.where(ok, lo, mean)),
            scale(np.where(ok, hi, mean)),
            where=ok,
            color=style.get("color"),
            alpha=0.12 if style.get("color") == "black" else 0.2,
            linewidth=0,
        )
    return mean


def _fig_learning_curves(ctx: _Ctx, path: Path) -> bool:
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    for v in ctx.order:
        cur = _curve(ctx.runs(v), "val/metric/main")
        if cur is None:
            continue
        x, mat = cur
        mean = _plot_band(ax, x, mat, ctx.fmt.scale, v, **ctx.style(v))
        # Mark each seed's best epoch on the mean curve: shows how early the selected checkpoints were.
        bx, by = [], []
        for seed in _sort_seeds(ctx.runs(v)):
            be = _num(_seed_lookup(ctx.best_epochs.get(v), seed))
            if be is not None and be in x:
                bx.append(be)
                by.append(ctx.fmt.scale(mean[int(np.flatnonzero(x == be)[0])]))
        if bx:
            ax.plot(bx, by, linestyle="none", marker="v", markersize=8, color=ctx.style(v)["color"])
        drawn = True
    if not drawn:
        return False
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {ctx.fmt.unit_label}")
    ax.set_title("Validation main metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def _fig_gap(ctx: _Ctx, path: Path) -> bool:
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    for v in ctx.order:
        cur = _curve(ctx.runs(v), "gap")
        if cur is not None:
            _plot_band(ax, cur[0], cur[1], ctx.fmt.scale, v, **ctx.style(v))
            drawn = True
    if not drawn:
        return False
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"train − validation {ctx.fmt.unit_label}")
    ax.set_title("Train/validation gap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def _fig_per_variant_tasks(
    ctx: _Ctx, path: Path, prefix: str, ylabel: str, title: str, band: bool, zero_line: bool = False
) -> bool:
    """One panel per variant, one line per aux task (weights and cosines are per-variant properties)."""
    panels = []
    for v in ctx.order:
        curves = [(t, c) for t in ctx.aux_tasks(v) if (c := _curve(ctx.runs(v), prefix + t)) is not None]
        if curves:
            panels.append((v, curves))
    if not panels:
        return False
    fig, axes = _grid(len(panels))
    for ax, (v, curves) in zip(axes, panels):
        for i, (task, (x, mat)) in enumerate(curves):
            color = _TASK_PALETTE[i % len(_TASK_PALETTE)]
            if band:
                _plot_band(ax, x, mat, lambda a: a, task, color=color, linewidth=1.6)
            else:
                ax.plot(
                    x,
                    np.nanmean(mat, axis=0),
                    color=color,
                    linewidth=1.6,
                    marker="o",
                    markersize=3,
                    label=_label(task),
                )
        if zero_line:
            ax.axhline(0.0, color="grey", linewidth=1.0, linestyle=":")
            ax.set_ylim(-1.05, 1.05)
        ax.set_title(_label(v).strip() if v != ctx.baseline else f"{_label(v)} (baseline)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    _save(fig, path)
    return True


def _fig_aux_metrics(ctx: _Ctx, path: Path) -> bool:
    """One panel per aux task name, one line per variant: same-named tasks share a metric scale."""
    tasks: dict[str, list[tuple[str, tuple[np.ndarray, np.ndarray]]]] = {}
    for v in ctx.order:
        for t in ctx.aux_tasks(v):
            cur = _curve(ctx.runs(v), f"val/metric/{t}")
            if cur is not None:
                tasks.setdefault(t, []).append((v, cur))
    if not tasks:
        return False
    fig, axes = _grid(len(tasks))
    for ax, (task, curves) in zip(axes, tasks.items()):
        for v, (x, mat) in curves:
            _plot_band(ax, x, mat, lambda a: a, v, **ctx.style(v))
        ax.set_title(_label(task).strip())
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation metric")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Auxiliary tasks: own validation metric")
    _save(fig, path)
    return True


def _paired_diffs(ctx: _Ctx, v: str) -> list[float]:
    """Per-seed variant − baseline final metric, on the seeds both have (what the comparison used)."""
    bs, bv, _, _ = _variant_summary(ctx.variants.get(ctx.baseline, {}))
    vs, vv, _, _ = _variant_summary(ctx.variants.get(v, {}))
    base = {str(s): x for s, x in zip(bs, bv)}
    return [x - base[str(s)] for s, x in zip(vs, vv) if str(s) in base]


def _fig_seeds(ctx: _Ctx, path: Path) -> bool:
    names = [v for v in ctx.order if _variant_summary(ctx.variants.get(v, {}))[1]]
    if not names:
        return False
    compared = [v for v in ctx.order if v in ctx.comparisons]
    fig = Figure(figsize=(max(8.0, 1.6 * len(names) + 1.6 * len(compared)), 4.8), layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    s = ctx.fmt.scale

    def dots(ax: Any, i: int, values: list[float], color: str) -> None:
        # Deterministic horizontal spread so that equal values stay visible without random jitter.
        off = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(i + off, s(np.asarray(values)), color=color, alpha=0.6, s=22, zorder=2)

    for i, v in enumerate(names):
        _, values, mean, ci = _variant_summary(ctx.variants[v])
        color = ctx.style(v)["color"]
        dots(ax1, i, values, color)
        lo, hi = _pair(ci)
        if mean is not None:
            yerr = None if lo is None or hi is None else [[s(mean - lo)], [s(hi - mean)]]
            ax1.errorbar(
                [i + 0.3], [s(mean)], yerr=yerr, fmt="D", color=color, capsize=5, markersize=6, zorder=3
            )
    ax1.set_xticks(range(len(names)), [_label(v).strip() for v in names], rotation=20, ha="right")
    ax1.set_ylabel(f"final {ctx.results.get('split', '')} {ctx.fmt.unit_label}".replace("  ", " "))
    ax1.set_title("Per seed (dots), mean and 95% CI (diamond)")
    ax1.grid(alpha=0.3, axis="y")

    for i, v in enumerate(compared):
        c = ctx.comparisons[v]
        color = ctx.style(v)["color"]
        diffs = _paired_diffs(ctx, v)
        if diffs:
            dots(ax2, i, diffs, color)
        d = _num(c.get("delta"))
        lo, hi = _pair(c.get("ci95"))
        if d is not None:
            yerr = None if lo is None or hi is None else [[s(d - lo)], [s(hi - d)]]
            ax2.errorbar(
                [i + 0.3], [s(d)], yerr=yerr, fmt="D", color=color, capsize=5, markersize=6, zorder=3
            )
    ax2.axhline(0.0, color="black", linewidth=1.0, linestyle="--")
    ax2.set_xticks(range(len(compared)), [_label(v).strip() for v in compared], rotation=20, ha="right")
    better = "higher" if ctx.fmt.higher_is_better else "lower"
    ax2.set_ylabel(f"Δ vs {_label(ctx.baseline).strip()} ({better} is better)")
    ax2.set_title("Paired difference per seed, mean and 95% CI")
    ax2.grid(alpha=0.3, axis="y")
    _save(fig, path)
    return True


# --------------------------------------------------------------------------------------------------------
# Report sections
# --------------------------------------------------------------------------------------------------------


def _setup_section(ctx: _Ctx) -> list[_Block]:
    r, fmt = ctx.results, ctx.fmt
    hib = "higher" if fmt.higher_is_better else "lower"
    seeds = sorted(
        {str(s) for v in ctx.variants.values() for s in (v.get("seeds") or [])}, key=lambda x: (len(x), x)
    )
    alpha = next((_num(c.get("alpha")) for c in ctx.comparisons.values() if _num(c.get("alpha"))), 0.05)
    parts: list[_Inline] = [
        f"Main metric: {fmt.metric} on the {r.get('split', '?')} split ({hib} is better"
        + (", shown in points, i.e. ×100" if fmt.points else "")
        + f"). Baseline: {ctx.baseline} (no auxiliary loss). Seeds: {', '.join(seeds) or 'n/a'}. "
        f"Each variant is compared with the baseline paired by seed (paired t-test on the per-seed "
        f"differences), with Holm's correction across the {len(ctx.comparisons)} comparison(s) at "
        f"alpha = {alpha:g}."
    ]
    total = _fmt_duration((r.get("timing") or {}).get("total_seconds"))
    if total:
        parts.append(f" Total training time: {total}.")
    return [_Heading(2, "Setup"), _Para(parts)]


def _results_section(ctx: _Ctx, figs: dict[str, bool]) -> list[_Block]:
    fmt = ctx.fmt
    seed_lists = [
        tuple(map(str, _variant_summary(ctx.variants[v])[0])) for v in ctx.order if v in ctx.variants
    ]
    same_seeds = len(set(seed_lists)) == 1 and seed_lists
    seed_head = f"Per seed ({', '.join(seed_lists[0])})" if same_seeds else "Per seed (seed: value)"
    header = [
        "Variant",
        "Mean ± 95% CI",
        seed_head,
        "Δ vs baseline [95% CI]",
        "p",
        "Holm p",
        "d_z",
        "Verdict",
    ]
    rows = []
    for v in ctx.order:
        if v not in ctx.variants:
            continue
        seeds, values, mean, ci = _variant_summary(ctx.variants[v])
        if same_seeds:
            per_seed = ", ".join(fmt.value(x) for x in values)
        else:
            per_seed = ", ".join(f"{s}: {fmt.value(x)}" for s, x in zip(seeds, values))
        c = ctx.comparisons.get(v)
        if v == ctx.baseline:
            rows.append([v, fmt.mean_ci(mean, ci), per_seed, "(baseline)", "", "", "", ""])
        elif c is None:
            rows.append([v, fmt.mean_ci(mean, ci), per_seed, "n/a", "n/a", "n/a", "n/a", "not compared"])
        else:
            verdict = str(c.get("verdict", ""))
            if int(_num(c.get("n")) or 0) < MIN_SEEDS:
                verdict += f" (only {int(_num(c.get('n')) or 0)} seeds)"
            delta = f"{fmt.delta(c.get('delta'))} {fmt.ci(c.get('ci95'), signed=True)}"
            rows.append(
                [
                    v,
                    fmt.mean_ci(mean, ci),
                    per_seed,
                    delta,
                    _fmt_p(c.get("p_value")),
                    _fmt_p(c.get("p_holm")),
                    _fmt_d(c),
                    verdict,
                ]
            )
    blocks: list[_Block] = [_Heading(2, "Results")]
    unit = " Values are in points (×100)." if fmt.points else ""
    blocks.append(
        _Para(
            [
                f"Final {ctx.results.get('split', '?')} {fmt.metric} per variant.{unit} Δ is variant − baseline, "
                + "paired by seed; p is the paired t-test, Holm p the same after Holm's correction; d_z is the mean "
                + "paired difference divided by its standard deviation."
            ]
        )
    )
    if rows:
        blocks.append(_Table(header, rows, [False, True, True, True, True, True, True, False]))
    else:
        blocks.append(_Para(["results.json lists no variants."]))
    if figs.get("seeds.png"):
        blocks.append(
            _Fig(
                "seeds.png",
                "Per-seed results",
                f"Left: final {fmt.metric} of every seed (dots) with the mean and its 95% t-CI (diamond and bar). "
                "Right: per-seed paired differences to the baseline with their mean and 95% CI; the dashed line "
                "is zero (no difference).",
            )
        )
    if figs.get("learning_curves.png"):
        best = " Triangles mark each seed's best epoch." if ctx.best_epochs else ""
        blocks.append(
            _Fig(
                "learning_curves.png",
                "Learning curves",
                f"Validation {fmt.metric} per epoch, mean over seeds; {BAND_TEXT}. The baseline is black and "
                f"dashed.{best}",
            )
        )
    return blocks


def _overfitting_section(ctx: _Ctx, figs: dict[str, bool]) -> list[_Block]:
    fmt = ctx.fmt
    blocks: list[_Block] = [_Heading(2, "Overfitting")]
    finals = {v: _final(ctx.runs(v), "gap") for v in ctx.order}
    finals = {v: f for v, f in finals.items() if f}
    if not finals:
        blocks.append(_Para(['No train/validation gap was recorded (the histories have no "gap" key).']))
        return blocks
    # The trainer stores the gap sign-normalised: (train − val) when higher is better, (val − train) when lower is
    # better, so that a positive gap always means overfitting.
    sign = 1.0
    stat = {
        v: (float(np.mean(list(f.values()))), float(np.std(list(f.values()), ddof=1)) if len(f) > 1 else None)
        for v, f in finals.items()
    }
    sentences = []
    if fmt.higher_is_better:
        sentences.append(
            f"The gap is the train-set {fmt.metric} (evaluated in eval mode) minus the validation "
            f"{fmt.metric} at the final epoch, mean over seeds; a larger positive gap means more overfitting."
        )
    else:
        sentences.append(
            f"The gap is the validation {fmt.metric} minus the train-set {fmt.metric} (evaluated in eval mode) "
            f"at the final epoch, mean over seeds (lower {fmt.metric} is better); a larger positive gap means "
            "more overfitting."
        )
    b = stat.get(ctx.baseline)
    if b is not None:
        sentences.append(
            f"The baseline ends with a gap of {fmt.amount(b[0])} ({_seeds_word(len(finals[ctx.baseline]))})."
        )
    for v, (m, sd) in stat.items():
        if v == ctx.baseline:
            continue
        if b is None:
            sentences.append(f"{v} ends with a gap of {fmt.amount(m)}.")
            continue
        diff = m - b[0]
        more = sign * diff > 0
        spread = max(x for x in (sd, b[1], 0.0) if x is not None)
        if diff == 0.0:
            judgement = "the same as the baseline"
        elif spread > 0 and abs(diff) <= spread:
            judgement = (
                f"{'more' if more else 'less'} overfitting than the baseline on average, but within "
                f"the seed-to-seed spread (sd up to {fmt.amount(spread)}), so no clear change"
            )
        else:
            judgement = f"{'more' if more else 'less'} overfitting than the baseline"
        sentences.append(
            f"{v} ends with a gap of {fmt.amount(m)}, {fmt.amount(diff, signed=True)} vs the baseline: {judgement}."
        )
    blocks.append(_Para([" ".join(sentences)]))
    rows = []
    for v, f in finals.items():
        m, _ = stat[v]
        vs_base = "(baseline)" if v == ctx.baseline else (fmt.delta(m - b[0]) if b is not None else "n/a")
        runs = ctx.runs(v)
        last = [max(e for e, _ in _epochs(runs[s])) for s in _sort_seeds(runs) if runs[s]]
        best = [_num(_seed_lookup(ctx.best_epochs.get(v), s)) for s in _sort_seeds(runs)]
        best_txt = ", ".join(str(int(x)) for x in best if x is not None) or "n/a"
        rows.append(
            [
                v,
                _mean_sd(list(f.values()), fmt.value),
                vs_base,
                best_txt,
                ", ".join(str(e) for e in sorted(set(last))) or "n/a",
            ]
        )
    blocks.append(
        _Table(
            ["Variant", "Final gap (mean ± sd)", "vs baseline", "Best epoch per seed", "Final epoch"],
            rows,
            [False, True, True, True, True],
        )
    )
    if figs.get("gap.png"):
        blocks.append(
            _Fig(
                "gap.png",
                "Train/validation gap",
                f"Train − validation {fmt.metric} per epoch, mean over seeds; {BAND_TEXT}.",
            )
        )
    return blocks


def _aux_section(ctx: _Ctx, figs: dict[str, bool]) -> list[_Block]:
    blocks: list[_Block] = [_Heading(2, "Auxiliary tasks")]
    pairs = [(v, t) for v in ctx.order for t in ctx.aux_tasks(v)]
    if not pairs:
        blocks.append(_Para(["No variant has auxiliary tasks."]))
        return blocks
    cols = [
        ("val/metric/", "Final val metric"),
        ("test/metric/", "Final test metric"),
        ("val/loss/", "Final val loss"),
        ("train/weight/", "Final weight λ"),
    ]
    data = {(v, t): {p: list(_final(ctx.runs(v), p + t).values()) for p, _ in cols} for v, t in pairs}
    used = [(p, h) for p, h in cols if any(d[p] for d in data.values())]
    blocks.append(
        _Para(
            [
                "Each auxiliary task's own metrics at the final epoch (mean ± sd over seeds, 4 significant digits; "
                + "the unit is the task's own metric). The weight λ is the task's mean loss weight over the final epoch."
            ]
        )
    )
    rows = [[v, t, *(_mean_sd(data[(v, t)][p], _g4) for p, _ in used)] for v, t in pairs]
    blocks.append(
        _Table(["Variant", "Task", *(h for _, h in used)], rows, [False, False, *([True] * len(used))])
    )
    if figs.get("aux_metrics.png"):
        blocks.append(
            _Fig(
                "aux_metrics.png",
                "Auxiliary task metrics",
                f"Validation metric of each auxiliary task per epoch, one panel per task, mean over "
                f"seeds; {BAND_TEXT}.",
            )
        )
    if figs.get("weights.png"):
        blocks.append(
            _Fig(
                "weights.png",
                "Auxiliary task weights",
                "Mean loss weight λ of each auxiliary task per epoch (mean over seeds), one panel "
                "per variant.",
            )
        )
    return blocks


def _health_section(ctx: _Ctx, figs: dict[str, bool]) -> list[_Block]:
    rows, flags = [], []
    for v in ctx.order:
        runs = ctx.runs(v)
        for t in _tasks_with_prefix(runs, "cos/"):
            per_seed = _mean_over_run(runs, f"cos/{t}")
            if not per_seed:
                continue
            cur = _curve(runs, f"cos/{t}")
            frac = float(np.mean(cur[1][np.isfinite(cur[1])] < 0)) if cur is not None else math.nan
            mean = float(np.mean(per_seed))
            ratio = _mean_over_run(runs, f"normratio/{t}")
            rows.append(
                [
                    v,
                    t,
                    f"{mean:+.3f}",
                    _mean_sd(
                        list(_final(runs, f"cos/{t}").values()), lambda x: f"{x:+.3f}", lambda x: f"{x:.3f}"
                    ),
                    f"{100 * frac:.0f}%",
                    _g4(float(np.mean(ratio))) if ratio else "n/a",
                ]
            )
            if mean < 0:
                flags.append(
                    [
                        ("b", t),
                        f" ({v}) mostly conflicts with the main task: its gradient has mean cosine {mean:+.3f} "
                        + f"with the main-task gradient and points against it in {100 * frac:.0f}% of the logged "
                        + "epochs. Consider a lower weight, a decaying schedule, or dropping it.",
                    ]
                )
    if not rows:
        return []
    blocks: list[_Block] = [
        _Heading(2, "Auxiliary task health"),
        _Para(
            [
                "Cosine between the main-task gradient and each auxiliary task's gradient on the shared "
                + "parameters: above 0 the auxiliary task pushes the shared weights the same way as the main "
                + "task, below 0 it pulls against it. Mean over epochs, then over seeds. The norm ratio compares "
                + "the two gradients' sizes."
            ]
        ),
    ]
    if flags:
        blocks.append(_Bullets(flags))
    else:
        blocks.append(
            _Para(["No auxiliary task conflicts with the main task on average (every mean cosine ≥ 0)."])
        )
    blocks.append(
        _Table(
            [
                "Variant",
                "Task",
                "Mean cosine",
                "Final cosine (mean ± sd)",
                "Epochs with cosine < 0",
                "Mean norm ratio",
            ],
            rows,
            [False, False, True, True, True, True],
        )
    )
    if figs.get("gradient_health.png"):
        blocks.append(
            _Fig(
                "gradient_health.png",
                "Gradient health",
                "Cosine between main and auxiliary gradients per epoch (mean over seeds), one panel "
                "per variant; the dotted line is zero, below it the task conflicts with the main task.",
            )
        )
    return blocks


def _reproduce_section(ctx: _Ctx) -> list[_Block]:
    config = ctx.results.get("config") or {}
    cmd = config.get("command") if isinstance(config, Mapping) else None
    if not cmd:
        return []
    text = shlex.join(map(str, cmd)) if isinstance(cmd, (list, tuple)) else str(cmd)
    return [_Heading(2, "How to reproduce"), _Para(["Run:"]), _Code(text)]


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def build_report(
    out_dir: Path | str,
    results: Mapping[str, Any],
    histories: History | None,
    best_epochs: Mapping[str, Mapping[Any, int]] | None = None,
) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``; return report.html's path.

    ``results`` is the content of results.json, ``histories`` maps variant -> seed -> list of per-epoch
    records, ``best_epochs`` (optional) maps variant -> seed -> best epoch. Optional parts (aux tasks,
    weights, gradient telemetry, a reproduce command, CIs of single-seed runs) are skipped or shown as
    "n/a" when absent, never an error.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    _HIGHER_IS_BETTER.set(bool(results.get("higher_is_better", True)))
    ctx = _context(results, histories, best_epochs)

    figs: dict[str, bool] = {}
    makers = {
        "learning_curves.png": lambda p: _fig_learning_curves(ctx, p),
        "gap.png": lambda p: _fig_gap(ctx, p),
        "weights.png": lambda p: _fig_per_variant_tasks(
            ctx, p, "train/weight/", "weight λ (mean over seeds)", "Auxiliary task weights", band=False
        ),
        "aux_metrics.png": lambda p: _fig_aux_metrics(ctx, p),
        "seeds.png": lambda p: _fig_seeds(ctx, p),
        "gradient_health.png": lambda p: _fig_per_variant_tasks(
            ctx,
            p,
            "cos/",
            "cosine(main, aux)",
            "Gradient agreement with the main task",
            band=False,
            zero_line=True,
        ),
    }
    for name, make in makers.items():
        path = fig_dir / name
        figs[name] = make(path)
        if not figs[name] and path.exists():
            path.unlink()  # a stale figure from an earlier build would contradict this report

    title = f"auxloss report: {results.get('name', 'experiment')}"
    n_comp = len(results.get("comparisons") or [])
    base_txt = "the baseline" if ctx.baseline == "baseline" else f"the baseline ({ctx.baseline})"
    holm_txt = f", Holm-corrected across {n_comp} comparisons" if n_comp > 1 else ""
    intro = (
        f"Each variant was compared with {base_txt} on the final {results.get('split', '?')} "
        f"{ctx.fmt.metric}, paired by seed{holm_txt}."
    )
    blocks: list[_Block] = [
        _Heading(1, title),
        _Heading(2, "Verdict"),
        _Para([intro + " " + " ".join(summary_sentences(results))]),
        *_setup_section(ctx),
        *_results_section(ctx, figs),
        *_overfitting_section(ctx, figs),
        *_aux_section(ctx, figs),
        *_health_section(ctx, figs),
        *_reproduce_section(ctx),
    ]
    (out_dir / "report.md").write_text(_render_md(blocks), encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(_render_html(blocks, title), encoding="utf-8")
    return html_path
