"""``sweep.md``: a weight sweep's search and held-out verdict, from the summary that ``run_sweep`` stores.

Rendered through the report's document model, so names from the config or the study are escaped the same
way as in report.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from auxloss.experiment.report.document import Block, Heading, Inline, Para, Table, render_md

__all__ = ["format_sweep"]


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _fmt_weights(weights: Mapping[str, Any] | None) -> str:
    """'aux1: 0.300; aux2: curriculum(value=0.500, start=10, ramp=2)' for a trial's weight configs."""
    if not weights:
        return ""
    parts = []
    for task, w in weights.items():
        if isinstance(w, dict):
            inner = ", ".join(
                f"{k}={_fmt(v, 3) if isinstance(v, float) else v}" for k, v in w.items() if k != "type"
            )
            parts.append(f"{task}: {w.get('type', 'schedule')}({inner})")
        else:
            parts.append(f"{task}: {_fmt(float(w), 3)}")
    return "; ".join(parts)


def format_sweep(summary: Mapping[str, Any]) -> str:
    """``sweep.md``: the search and the held-out verdict as Markdown tables."""
    s = summary
    best = s["best"]
    intro: list[Inline] = [
        (
            f"{s['n_trials']} trials ({s['n_complete']} complete) scored on the validation {s['metric']} "
            f"({s['direction']}) of search seeds {s['search_seeds']}. Storage: "
        ),
        ("code", str(s["storage"])),
        ".",
    ]
    best_txt = (
        f"Best: trial {best['number']}, validation {s['metric']} {_fmt(best['value'])}, weights "
        f"{_fmt_weights(best['weights'])} (config: {_fmt_weights(s['default_weights'])})."
    )
    blocks: list[Block] = [
        Heading(1, f"Weight sweep: {s['study']} (variant {s['variant']})"),
        Para(intro),
        Para([best_txt]),
        Heading(2, "Trials"),
        Table(
            ["trial", "state", f"val {s['metric']}", "weights"],
            [[str(t["number"]), t["state"], _fmt(t["value"]), _fmt_weights(t["weights"])] for t in s["trials"]],
            [True, False, True, False],
        ),
    ]
    held = s.get("held_out")
    if held:
        blocks.append(Heading(2, f"Held-out seeds {held['seeds']} ({held['split']} {s['metric']})"))
        comps = {c["variant"]: c for c in held["vs_baseline"]}
        rows = []
        for key in ("baseline", "default", "best"):
            summ = held["summary"][key]
            c = comps.get(key)
            rows.append(
                [
                    f"{key} ({held['variants'][key]})",
                    _fmt(summ["mean"]),
                    _fmt(summ["std"]),
                    _fmt(c["delta"]) if c else "",
                    _fmt(c["p_holm"], 3) if c else "",
                    c["verdict"] if c else "",
                ]
            )
        blocks.append(
            Table(
                ["run", "mean", "std", "delta vs baseline", "p (Holm)", "verdict"],
                rows,
                [False, True, True, True, True, False],
            )
        )
        bd = held["best_vs_default"]
        ci = bd["ci95"]
        blocks.append(
            Para(
                [
                    (
                        f"Best vs default weights: delta {_fmt(bd['delta'])} (95% CI {_fmt(ci[0])} to "
                        f"{_fmt(ci[1])}, p = {_fmt(bd['p_value'], 3)}, n = {bd['n']}): {bd['verdict']}."
                    )
                ]
            )
        )
    else:
        blocks.append(Para(["No held-out evaluation (eval_seeds = 0)."]))
    return render_md(blocks)
