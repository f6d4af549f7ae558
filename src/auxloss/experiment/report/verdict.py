"""The verdict in words: one sentence per comparison, and the fixed-width table for a terminal.

Both read only results.json (the comparisons as :mod:`auxloss.experiment.stats` stored them), so the CLI can
print them without the histories, and they never disagree with the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from auxloss.experiment.report.context import make_context, variant_summary
from auxloss.experiment.report.formatting import (
    MIN_SEEDS,
    MetricFormat,
    as_float,
    ci_pair,
    fmt_p,
    p_phrase,
    seeds_word,
)

__all__ = ["TABLE_WIDTH", "format_table", "summary_sentences"]

#: Width the terminal table must fit in.
TABLE_WIDTH = 100


def _sentence(c: Mapping[str, Any], fmt: MetricFormat, n_comparisons: int) -> str:
    name = str(c.get("variant"))
    n = int(as_float(c.get("n")) or 0)
    verdict = str(c.get("verdict", "no detectable effect"))
    lo, hi = ci_pair(c.get("ci95"))
    ci_txt = f"95% CI {fmt.delta(lo)} to {fmt.delta(hi)}" if lo is not None and hi is not None else "95% CI n/a"
    # For lower-is-better metrics a negative change is the good direction: say so next to the number.
    lower = "" if fmt.higher_is_better else "lower is better; "
    change = fmt.change(c.get("delta"))
    p_txt = p_phrase("Holm p", c.get("p_holm"))
    if verdict in ("helps", "hurts"):
        s = f"{name} {verdict}: {change} ({lower}{ci_txt}, {p_txt}, {seeds_word(n)})."
        if n < MIN_SEEDS:
            s += f" Only {seeds_word(n)}, so treat this with caution and confirm with more seeds."
        return s
    if n < MIN_SEEDS:
        return (
            f"{name}: no detectable effect, but with only {seeds_word(n)} that says little "
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
    return f"{name}: no detectable effect ({change}, {lower}{ci_txt}, {why}; {p_txt}, {seeds_word(n)})."


def summary_sentences(results: Mapping[str, Any]) -> list[str]:
    """One plain-English verdict sentence per comparison, in the order of ``results["comparisons"]``.

    E.g. "deep-supervision helps: +3.1 points of accuracy (95% CI +1.0 to +5.2, Holm p = 0.012, 5 seeds)."
    """
    fmt = MetricFormat.of(results)
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
    ctx = make_context(results, {}, None)
    fmt = ctx.fmt
    header = ["variant", "mean", "95% CI", "delta vs base", "p (Holm)", "verdict"]
    rows: list[list[str]] = []
    few = False
    clipped_any = False
    for name in ctx.order:
        v = ctx.variants.get(name, {})
        _, _, mean, ci = variant_summary(v)
        ci, clipped = fmt.clip(ci)  # shown within the metric's range, with a note
        clipped_any |= clipped
        c = ctx.comparisons.get(name)
        if name == ctx.baseline:
            rows.append([name, fmt.value(mean), fmt.ci(ci), "(baseline)", "", ""])
        elif c is not None:
            verdict = str(c.get("verdict", ""))
            if int(as_float(c.get("n")) or 0) < MIN_SEEDS:
                verdict += "*"
                few = True
            rows.append(
                [name, fmt.value(mean), fmt.ci(ci), fmt.delta(c.get("delta")), fmt_p(c.get("p_holm")), verdict]
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
    title = (
        f"{results.get('name', 'experiment')}: {fmt.metric} of main task '{ctx.main_task}' on {ctx.split} "
        f"({hib} is better{unit})"
    )
    lines = [_fit(title, TABLE_WIDTH), line(header), "-" * min(TABLE_WIDTH, widths[0] + rest)]
    lines += [line(r) for r in rows]
    if few:
        lines.append(f"* fewer than {MIN_SEEDS} paired seeds: too few for a reliable verdict (treat with caution)")
    if clipped_any:
        lines.append(fmt.clipped_note)
    return "\n".join(lines)
