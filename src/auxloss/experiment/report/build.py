"""Build the report files from results.json and the histories: the one entry point, :func:`build_report`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from auxloss.experiment.report import sections
from auxloss.experiment.report.context import History, make_context
from auxloss.experiment.report.document import Block, Heading, render_html, render_md
from auxloss.experiment.report.figures import draw_figures
from auxloss.experiment.report.trained import weights_section

__all__ = ["build_report"]


def build_report(
    out_dir: Path | str,
    results: Mapping[str, Any],
    histories: History | None,
    best_epochs: Mapping[str, Mapping[Any, int]] | None = None,
    root: Path | str | None = None,
) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``; return report.html's path.

    ``results`` is the content of results.json, ``histories`` maps variant -> seed -> list of per-epoch
    records, ``best_epochs`` (optional) maps variant -> seed -> best epoch. ``root`` is the output folder the
    kept weights' paths of results.json are relative to (default: ``out_dir``). Optional parts (aux tasks,
    weights, gradient telemetry, a reproduce command, CIs of single-seed runs) are skipped or shown as
    "n/a" when absent, never an error.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    ctx = make_context(results, histories, best_epochs)
    figs = draw_figures(ctx, fig_dir)

    title = f"auxloss report: {results.get('name', 'experiment')}"
    blocks: list[Block] = [
        Heading(1, title),
        *sections.verdict_section(ctx),
        *sections.setup_section(ctx),
        *sections.results_section(ctx, figs),
        *sections.overfitting_section(ctx, figs),
        *sections.aux_section(ctx, figs),
        *sections.health_section(ctx, figs),
        *weights_section(ctx, out_dir, Path(root) if root is not None else out_dir),
        *sections.reproduce_section(ctx),
    ]
    (out_dir / "report.md").write_text(render_md(blocks), encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(blocks, title), encoding="utf-8")
    return html_path
