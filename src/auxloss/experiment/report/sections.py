"""The report's sections in words and tables, each a function of the context returning document blocks.

``figs`` tells a section which of its figures were drawn (by file name), so that it references only those.
A section whose data is absent says so in a sentence, or is left out when it would be empty.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping

import numpy as np

from auxloss.experiment.report.context import (
    ReportContext,
    epochs_of,
    seed_lookup,
    sort_seeds,
    variant_summary,
)
from auxloss.experiment.report.document import Block, Bullets, Code, Fig, Heading, Inline, Para, Table
from auxloss.experiment.report.formatting import (
    MIN_SEEDS,
    as_float,
    fmt_d,
    fmt_duration,
    fmt_p,
    g4,
    mean_sd,
    seeds_word,
)
from auxloss.experiment.report.verdict import summary_sentences

BAND_TEXT = "shaded band: 95% t-confidence interval of the mean across seeds (absent where only one seed)"


def verdict_section(ctx: ReportContext) -> list[Block]:
    n_comp = len(ctx.comparisons)
    # Only a baseline named otherwise is named in the text: "the baseline (baseline)" would read as a stutter.
    base_txt = "the baseline" if ctx.baseline == "baseline" else f"the baseline ({ctx.baseline})"
    holm_txt = f", Holm-corrected across {n_comp} comparisons" if n_comp > 1 else ""
    intro = (
        f"Each variant was compared with {base_txt} on the final {ctx.split} {ctx.fmt.metric} of the main "
        f"task ({ctx.main_task}), paired by seed{holm_txt}."
    )
    return [Heading(2, "Verdict"), Para([intro + " " + " ".join(summary_sentences(ctx.results))])]


def setup_section(ctx: ReportContext) -> list[Block]:
    r, fmt = ctx.results, ctx.fmt
    hib = "higher" if fmt.higher_is_better else "lower"
    seeds = sorted(
        {str(s) for v in ctx.variants.values() for s in (v.get("seeds") or [])}, key=lambda x: (len(x), x)
    )
    alpha = next((as_float(c.get("alpha")) for c in ctx.comparisons.values() if as_float(c.get("alpha"))), 0.05)
    parts: list[Inline] = [
        f"Main task: {ctx.main_task}. Main metric: {fmt.metric} on the {ctx.split} split ({hib} is better"
        + (", shown in points, i.e. ×100" if fmt.points else "")
        + f"). Baseline: {ctx.baseline} (no auxiliary loss). Seeds: {', '.join(seeds) or 'n/a'}. "
        f"Each variant is compared with the baseline paired by seed (paired t-test on the per-seed "
        f"differences), with Holm's correction across the {len(ctx.comparisons)} comparison(s) at "
        f"alpha = {alpha:g}."
    ]
    total = fmt_duration((r.get("timing") or {}).get("total_seconds"))
    if total:
        parts.append(f" Total training time: {total}.")
    return [Heading(2, "Setup"), Para(parts)]


def results_section(ctx: ReportContext, figs: Mapping[str, bool]) -> list[Block]:
    fmt = ctx.fmt
    seed_lists = [tuple(map(str, variant_summary(ctx.variants[v])[0])) for v in ctx.order if v in ctx.variants]
    same_seeds = len(set(seed_lists)) == 1 and seed_lists
    seed_head = f"Per seed ({', '.join(seed_lists[0])})" if same_seeds else "Per seed (seed: value)"
    header = ["Variant", "Mean ± 95% CI", seed_head, "Δ vs baseline [95% CI]", "p", "Holm p", "d_z", "Verdict"]
    rows = []
    clipped_any = False
    for v in ctx.order:
        if v not in ctx.variants:
            continue
        seeds, values, mean, ci = variant_summary(ctx.variants[v])
        ci, clipped = fmt.clip(ci)  # within the metric's range, with the note under the table
        clipped_any |= clipped
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
            if int(as_float(c.get("n")) or 0) < MIN_SEEDS:
                verdict += f" (only {int(as_float(c.get('n')) or 0)} seeds)"
            delta = f"{fmt.delta(c.get('delta'))} {fmt.ci(c.get('ci95'), signed=True)}"
            rows.append(
                [
                    v,
                    fmt.mean_ci(mean, ci),
                    per_seed,
                    delta,
                    fmt_p(c.get("p_value")),
                    fmt_p(c.get("p_holm")),
                    fmt_d(c),
                    verdict,
                ]
            )
    blocks: list[Block] = [Heading(2, "Results")]
    unit = " Values are in points (×100)." if fmt.points else ""
    blocks.append(
        Para(
            [
                f"Final {ctx.split} {fmt.metric} of the main task per variant.{unit} Δ is variant − baseline, "
                + "paired by seed; p is the paired t-test, Holm p the same after Holm's correction; d_z is the mean "
                + "paired difference divided by its standard deviation."
            ]
        )
    )
    if rows:
        blocks.append(Table(header, rows, [False, True, True, True, True, True, True, False]))
        if clipped_any:
            blocks.append(Para([f"{fmt.clipped_note}."]))
    else:
        blocks.append(Para(["results.json lists no variants."]))
    if figs.get("seeds.png"):
        blocks.append(
            Fig(
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
            Fig(
                "learning_curves.png",
                "Learning curves",
                f"Validation {fmt.metric} of the main task ({ctx.main_task}) per epoch, mean over seeds; "
                f"{BAND_TEXT}. The baseline is black and dashed.{best}",
            )
        )
    return blocks


def overfitting_section(ctx: ReportContext, figs: Mapping[str, bool]) -> list[Block]:
    fmt = ctx.fmt
    blocks: list[Block] = [Heading(2, "Overfitting")]
    finals = {v: f for v in ctx.order if (f := ctx.final(v, "gap"))}
    if not finals:
        blocks.append(Para(['No train/validation gap was recorded (the histories have no "gap" key).']))
        return blocks
    # The trainer stores the gap sign-normalised: (train − val) when higher is better, (val − train) when lower is
    # better, so that a positive gap always means overfitting, and a larger gap than the baseline's means more.
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
            f"The baseline ends with a gap of {fmt.amount(b[0])} ({seeds_word(len(finals[ctx.baseline]))})."
        )
    for v, (m, sd) in stat.items():
        if v == ctx.baseline:
            continue
        if b is None:
            sentences.append(f"{v} ends with a gap of {fmt.amount(m)}.")
            continue
        diff = m - b[0]
        more = diff > 0
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
    blocks.append(Para([" ".join(sentences)]))
    rows = []
    for v, f in finals.items():
        m, _ = stat[v]
        vs_base = "(baseline)" if v == ctx.baseline else (fmt.delta(m - b[0]) if b is not None else "n/a")
        runs = ctx.runs(v)
        last = [max(e for e, _ in epochs_of(runs[s])) for s in sort_seeds(runs) if runs[s]]
        best = [as_float(seed_lookup(ctx.best_epochs.get(v), s)) for s in sort_seeds(runs)]
        best_txt = ", ".join(str(int(x)) for x in best if x is not None) or "n/a"
        rows.append(
            [
                v,
                mean_sd(list(f.values()), fmt.value),
                vs_base,
                best_txt,
                ", ".join(str(e) for e in sorted(set(last))) or "n/a",
            ]
        )
    blocks.append(
        Table(
            ["Variant", "Final gap (mean ± sd)", "vs baseline", "Best epoch per seed", "Final epoch"],
            rows,
            [False, True, True, True, True],
        )
    )
    if figs.get("gap.png"):
        blocks.append(
            Fig(
                "gap.png",
                "Train/validation gap",
                f"Train − validation {fmt.metric} per epoch, mean over seeds; {BAND_TEXT}.",
            )
        )
    return blocks


def aux_section(ctx: ReportContext, figs: Mapping[str, bool]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Auxiliary tasks")]
    pairs = [(v, t) for v in ctx.order for t in ctx.aux_tasks(v)]
    if not pairs:
        blocks.append(Para(["No variant has auxiliary tasks."]))
        return blocks
    cols = [
        ("val/metric/", "Final val metric"),
        ("test/metric/", "Final test metric"),
        ("val/loss/", "Final val loss"),
        ("train/weight/", "Final weight λ"),
    ]
    data = {(v, t): {p: list(ctx.final(v, p + t).values()) for p, _ in cols} for v, t in pairs}
    used = [(p, h) for p, h in cols if any(d[p] for d in data.values())]
    blocks.append(
        Para(
            [
                "Each auxiliary task's own metrics at the final epoch (mean ± sd over seeds, 4 significant digits; "
                + "the unit is the task's own metric). The weight λ is the task's mean loss weight over the final epoch."
            ]
        )
    )
    rows = [[v, t, *(mean_sd(data[(v, t)][p], g4) for p, _ in used)] for v, t in pairs]
    blocks.append(Table(["Variant", "Task", *(h for _, h in used)], rows, [False, False, *([True] * len(used))]))
    if figs.get("aux_metrics.png"):
        blocks.append(
            Fig(
                "aux_metrics.png",
                "Auxiliary task metrics",
                f"Validation metric of each auxiliary task per epoch, one panel per task, mean over "
                f"seeds; {BAND_TEXT}.",
            )
        )
    if figs.get("weights.png"):
        blocks.append(
            Fig(
                "weights.png",
                "Auxiliary task weights",
                "Mean loss weight λ of each auxiliary task per epoch (mean over seeds), one panel per variant.",
            )
        )
    return blocks


def health_section(ctx: ReportContext, figs: Mapping[str, bool]) -> list[Block]:
    rows, flags = [], []
    for v in ctx.order:
        for t in ctx.tasks_with_prefix(v, "cos/"):
            per_seed = ctx.mean_over_run(v, f"cos/{t}")
            if not per_seed:
                continue
            cur = ctx.curve(v, f"cos/{t}")
            frac = float(np.mean(cur[1][np.isfinite(cur[1])] < 0)) if cur is not None else math.nan
            mean = float(np.mean(per_seed))
            ratio = ctx.mean_over_run(v, f"normratio/{t}")
            rows.append(
                [
                    v,
                    t,
                    f"{mean:+.3f}",
                    mean_sd(list(ctx.final(v, f"cos/{t}").values()), lambda x: f"{x:+.3f}", lambda x: f"{x:.3f}"),
                    f"{100 * frac:.0f}%",
                    g4(float(np.mean(ratio))) if ratio else "n/a",
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
    blocks: list[Block] = [
        Heading(2, "Auxiliary task health"),
        Para(
            [
                f"Cosine between the gradient of the main task ({ctx.main_task}) and each auxiliary task's gradient "
                + "on the shared parameters: above 0 the auxiliary task pushes the shared weights the same way as "
                + "the main task, below 0 it pulls against it. Mean over epochs, then over seeds. The norm ratio "
                + "compares the two gradients' sizes."
            ]
        ),
    ]
    if flags:
        blocks.append(Bullets(flags))
    else:
        blocks.append(Para(["No auxiliary task conflicts with the main task on average (every mean cosine ≥ 0)."]))
    blocks.append(
        Table(
            ["Variant", "Task", "Mean cosine", "Final cosine (mean ± sd)", "Epochs with cosine < 0", "Mean norm ratio"],
            rows,
            [False, False, True, True, True, True],
        )
    )
    if figs.get("gradient_health.png"):
        blocks.append(
            Fig(
                "gradient_health.png",
                "Gradient health",
                "Cosine between main and auxiliary gradients per epoch (mean over seeds), one panel "
                "per variant; the dotted line is zero, below it the task conflicts with the main task.",
            )
        )
    return blocks


def reproduce_section(ctx: ReportContext) -> list[Block]:
    config = ctx.results.get("config") or {}
    cmd = config.get("command") if isinstance(config, Mapping) else None
    if not cmd:
        return []
    text = shlex.join(map(str, cmd)) if isinstance(cmd, (list, tuple)) else str(cmd)
    return [Heading(2, "How to reproduce"), Para(["Run:"]), Code(text)]
