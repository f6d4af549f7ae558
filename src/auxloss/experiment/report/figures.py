"""The report's PNG figures, one function per figure, each returning whether it drew anything.

Figures use :class:`matplotlib.figure.Figure` directly rather than pyplot: that needs no GUI backend, keeps
no global figure registry (no leaks when many reports are built in one process) and does not change the
backend of a user who imported auxloss inside a notebook. matplotlib is imported inside the functions, so
importing the report (for its tables and sentences) works without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from auxloss.errors import AuxLossError
from auxloss.experiment.report.context import ReportContext, band, seed_lookup, sort_seeds, variant_summary
from auxloss.experiment.report.formatting import as_float, ci_pair
from auxloss.experiment.stats import metric_bounds

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FIGURE_DPI", "draw_figures"]

FIGURE_DPI = 110
# Lines for the tasks *within* one variant's panel use another palette, so that a task line is never
# mistaken for the variant of the same colour in the other figures (ColorBrewer Dark2).
_TASK_PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def _new_figure(**kwargs: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AuxLossError(
            "the report's figures need matplotlib, which is not installed; install it (pip install matplotlib) "
            "and run `auxloss report <out>` to rebuild the report."
        ) from None
    return Figure(layout="constrained", **kwargs)


def _label(name: str) -> str:
    """A legend-safe label: matplotlib hides labels starting with '_' and parses '$...$' as math."""
    name = str(name).replace("$", r"\$")
    return " " + name if name.startswith("_") else name


def _save(fig: Figure, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.savefig(path, dpi=FIGURE_DPI)


def _grid(n: int, w: float = 4.6, h: float = 3.4) -> tuple[Figure, list[Any]]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(figsize=(w * ncols, h * nrows))
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


def _plot_band(ax: Any, x: np.ndarray, mat: np.ndarray, scale: Any, label: str,
               bounds: tuple[float, float] = (-math.inf, math.inf), **style: Any) -> np.ndarray:
    """The mean curve over seeds and its 95% band, the band cut to ``bounds`` (the values the quantity can take:
    a t-band around an accuracy near 1 reaches past it)."""
    mean, lo, hi = band(mat)
    lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
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


def learning_curves(ctx: ReportContext, path: Path) -> bool:
    fig = _new_figure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    drawn = False
    for v in ctx.order:
        cur = ctx.curve(v, ctx.main_key("val"))
        if cur is None:
            continue
        x, mat = cur
        mean = _plot_band(ax, x, mat, ctx.fmt.scale, v, metric_bounds(ctx.fmt.metric), **ctx.style(v))
        # Mark each seed's best epoch on the mean curve: shows how early the selected checkpoints were.
        bx, by = [], []
        for seed in sort_seeds(ctx.runs(v)):
            be = as_float(seed_lookup(ctx.best_epochs.get(v), seed))
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
    ax.set_title(f"Validation {ctx.fmt.metric} of the main task ({_label(ctx.main_task).strip()})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def _difference_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    """The range of a difference of two values in ``bounds`` (the train-validation gap of an accuracy: [-1, 1])."""
    width = bounds[1] - bounds[0]
    return -width, width


def gap(ctx: ReportContext, path: Path) -> bool:
    fig = _new_figure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    drawn = False
    for v in ctx.order:
        cur = ctx.curve(v, "gap")
        if cur is not None:
            _plot_band(ax, cur[0], cur[1], ctx.fmt.scale, v, _difference_bounds(metric_bounds(ctx.fmt.metric)),
                       **ctx.style(v))
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


def per_variant_tasks(
    ctx: ReportContext, path: Path, prefix: str, ylabel: str, title: str, zero_line: bool = False
) -> bool:
    """One panel per variant, one line per aux task (mean over seeds): for per-variant properties such as
    the weights and the gradient cosines."""
    panels = []
    for v in ctx.order:
        curves = [(t, c) for t in ctx.aux_tasks(v) if (c := ctx.curve(v, prefix + t)) is not None]
        if curves:
            panels.append((v, curves))
    if not panels:
        return False
    fig, axes = _grid(len(panels))
    for ax, (v, curves) in zip(axes, panels):
        for i, (task, (x, mat)) in enumerate(curves):
            ax.plot(
                x,
                np.nanmean(mat, axis=0),
                color=_TASK_PALETTE[i % len(_TASK_PALETTE)],
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


def aux_metrics(ctx: ReportContext, path: Path) -> bool:
    """One panel per aux task name, one line per variant: same-named tasks share a metric scale."""
    tasks: dict[str, list[tuple[str, tuple[np.ndarray, np.ndarray]]]] = {}
    for v in ctx.order:
        for t in ctx.aux_tasks(v):
            cur = ctx.curve(v, f"val/metric/{t}")
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


def _paired_diffs(ctx: ReportContext, v: str) -> list[float]:
    """Per-seed variant − baseline final metric, on the seeds both have (what the comparison used)."""
    bs, bv, _, _ = variant_summary(ctx.variants.get(ctx.baseline, {}))
    vs, vv, _, _ = variant_summary(ctx.variants.get(v, {}))
    base = {str(s): x for s, x in zip(bs, bv)}
    return [x - base[str(s)] for s, x in zip(vs, vv) if str(s) in base]


def seeds(ctx: ReportContext, path: Path) -> bool:
    names = [v for v in ctx.order if variant_summary(ctx.variants.get(v, {}))[1]]
    if not names:
        return False
    compared = [v for v in ctx.order if v in ctx.comparisons]
    fig = _new_figure(figsize=(max(8.0, 1.6 * len(names) + 1.6 * len(compared)), 4.8))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    s = ctx.fmt.scale

    def dots(ax: Any, i: int, values: list[float], color: str) -> None:
        # Deterministic horizontal spread so that equal values stay visible without random jitter.
        off = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(i + off, s(np.asarray(values)), color=color, alpha=0.6, s=22, zorder=2)

    for i, v in enumerate(names):
        _, values, mean, ci = variant_summary(ctx.variants[v])
        color = ctx.style(v)["color"]
        dots(ax1, i, values, color)
        lo, hi = ci_pair(ctx.fmt.clip(ci)[0])  # the bar stays within the metric's range, as in the tables
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
        d = as_float(c.get("delta"))
        lo, hi = ci_pair(c.get("ci95"))
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


def draw_figures(ctx: ReportContext, fig_dir: Path) -> dict[str, bool]:
    """Draw every figure into ``fig_dir``; return which were drawn (by file name).

    A figure with nothing to show is not drawn, and a stale file of that name from an earlier build is
    removed, because it would contradict this report.
    """
    makers: dict[str, Callable[[ReportContext, Path], bool]] = {
        "learning_curves.png": learning_curves,
        "gap.png": gap,
        "weights.png": lambda c, p: per_variant_tasks(
            c, p, "train/weight/", "weight λ (mean over seeds)", "Auxiliary task weights"
        ),
        "aux_metrics.png": aux_metrics,
        "seeds.png": seeds,
        "gradient_health.png": lambda c, p: per_variant_tasks(
            c,
            p,
            "cos/",
            f"cosine({_label(c.main_task).strip()}, aux)",
            "Gradient agreement with the main task",
            zero_line=True,
        ),
    }
    drawn: dict[str, bool] = {}
    for name, make in makers.items():
        path = fig_dir / name
        drawn[name] = make(ctx, path)
        if not drawn[name] and path.exists():
            path.unlink()
    return drawn
