"""The report's "Trained weights" section: where each run's kept weights lie, and how to load them.

results.json lists each run's files (``variants[i].weights[seed]``) relative to the experiment's output folder.
The section links them relative to the report's own folder (the same one, unless ``auxloss report --out`` wrote
the report elsewhere), so that the links still work when the folder is moved or copied whole.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from auxloss.experiment.report.context import ReportContext, seed_lookup, variant_summary
from auxloss.experiment.report.document import Block, Bullets, Code, Heading, Inline, Para

__all__ = ["weights_section"]

#: The files a run may keep (results.json's keys), in the order the report lists them, with their labels.
PARTS = {"trunk": "best trunk", "heads": "best heads", "last_trunk": "last epoch's trunk",
         "last_heads": "last epoch's heads"}

HOW_TO_KEEP = (
    "To keep them, train with keep: best (the default) in the config, --keep best on the command line "
    '(auxloss run, auxloss demo) or auxloss.compare(keep="best"), into a new --out folder: finished runs are not '
    "trained again, so a folder's finished runs keep what they kept."
)


def weights_section(ctx: ReportContext, report_dir: Path, root: Path) -> list[Block]:
    """``root`` is the folder results.json's paths are relative to; ``report_dir`` the one the report goes to."""
    keep = ctx.results.get("keep")
    kept = {v: ctx.variants[v].get("weights") or {} for v in ctx.order if v in ctx.variants}
    blocks: list[Block] = [Heading(2, "Trained weights")]
    if not any(kept.values()):
        what = "(keep: none)" if keep == "none" else "(results.json lists no weight files)"
        blocks.append(Para([f"No trained weights were kept {what}. {HOW_TO_KEEP}"]))
        return blocks
    setting = f" (keep: {keep})" if isinstance(keep, str) else ""
    intro = (f"The files each run kept{setting}, relative to this report's folder. The best trunk is your model "
             "alone with the weights of its best validation epoch (the ones evaluated above); it loads into your "
             "own model class with ")
    heads = (". The heads file holds the auxiliary heads, keyed by tap name, with any extra state a head keeps "
             "(the Trinh head's random generator under ")
    plain = "), and loads into the variant's heads with load_state_dict(strict=True). Both hold plain values, read with "
    blocks.append(Para([intro, ("code", "strict=True"), heads, ("code", "<tap>._extra_state"), plain,
                        ("code", "torch.load(path, weights_only=True)"), "."]))
    items: list[list[Inline]] = []
    example = None
    for variant, files in kept.items():
        for seed in variant_summary(ctx.variants[variant])[0]:
            paths = seed_lookup(files, seed)
            item: list[Inline] = [("b", variant), f", seed {seed}: "]
            if not isinstance(paths, Mapping) or not paths:
                items.append([*item, "no weights kept (trained with keep: none)."])
                continue
            for i, (part, label) in enumerate((p, lbl) for p, lbl in PARTS.items() if p in paths):
                link, found = _link(paths[part], report_dir, root)
                item += [", " if i else "", f"{label} ", ("link", link), "" if found else " (not in this folder)"]
                if part == "trunk" and found and example is None:
                    example = link
            items.append(item)
    blocks.append(Bullets(items))
    if example is not None:
        blocks += [Para(["Load a trunk into a fresh model (built as for the runs: same class, same arguments):"]),
                   Code(_load_snippet(example))]
    return blocks


def _link(path: Any, report_dir: Path, root: Path) -> tuple[str, bool]:
    """The file as a path relative to ``report_dir`` (forward slashes), and whether it is there."""
    target = root / str(path)
    return Path(os.path.relpath(target, report_dir)).as_posix(), target.is_file()


def _load_snippet(trunk: str) -> str:
    return ("import torch\n\n"
            "model = MyModel()  # your model class, with the arguments the runs used\n"
            f"model.load_state_dict(torch.load({trunk!r}, weights_only=True), strict=True)")
