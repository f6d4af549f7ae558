"""Turn a finished experiment into a report a person can decide from.

Input is what the runner stores: ``results`` (the content of results.json: per-variant final metrics and
the paired comparisons already computed by :mod:`auxloss.experiment.stats`) and ``histories`` (variant ->
seed -> per-epoch records). The verdicts come from the comparisons as stored, so the report can never
disagree with results.json.

Outputs (see :func:`build_report`): ``report.md``, ``report.html`` (self-contained, CSS inline, figures by
relative path) and PNG figures under ``figures/``; :func:`format_table` and :func:`summary_sentences` give
the terminal summary, :func:`format_sweep` the Markdown of a weight sweep.

Modules, one concept each: ``formatting`` (numbers), ``context`` (reading results and histories),
``document`` (the document model and its Markdown and HTML renderers), ``figures`` (matplotlib, imported
only when a figure is drawn), ``verdict`` (sentences and the terminal table), ``sections`` (the prose
sections), ``build`` (the entry point) and ``sweep`` (sweep.md).
"""

from auxloss.experiment.report.build import build_report
from auxloss.experiment.report.sweep import format_sweep
from auxloss.experiment.report.verdict import format_table, summary_sentences

__all__ = ["build_report", "format_sweep", "format_table", "summary_sentences"]
