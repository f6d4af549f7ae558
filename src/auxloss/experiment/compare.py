"""``auxloss.compare``: did the auxiliary loss help on *my* model and data?

The one call of the Python API. It trains a baseline without auxiliary losses and every variant on the same
seeds, splits, initial trunk and batch order, stores the runs (a rerun resumes), and returns the paired statistics
and the verdict as :func:`auxloss.experiment.runner.aggregate` writes them to ``results.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import nn

from auxloss.experiment.spec import Experiment, Variant
from auxloss.tasks import Task

__all__ = ["compare"]


def compare(
    model: Callable[[int], nn.Module],
    data: Callable[[int], Mapping[str, Any]],
    variants: Sequence[Variant],
    *,
    out: str | Path,
    main: Task | None = None,
    seeds: int = 5,
    name: str = "experiment",
    train: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    eval_batch_size: int = 512,
    loader: Mapping[str, Any] | None = None,
    batch_keys: Sequence[str] = ("input", "target"),
    input_key: str = "input",
    compare_on: Literal["test", "val"] = "test",
    alpha: float = 0.05,
    keep: Literal["none", "best", "all"] = "best",
    engine: Any = None,
    workers: int = 1,
    device: str | None = None,
    force: bool = False,
    progress: bool = False,
    store: str | None = None,
) -> dict[str, Any]:
    """Train a baseline and ``variants`` on ``seeds`` paired seeds and say whether each variant helped.

    Args:
        model: ``seed -> nn.Module``: a fresh trunk, built from torch's global RNG (the runner seeds it first).
        data: ``seed -> {"train", "val", "test"}``: torch ``Dataset`` objects (map-style or iterable) or
            ``DataLoader`` objects. Batches may be dicts or tuples; a tuple's positions are named by
            ``batch_keys`` (``(x, y)`` is ``input``, ``target``).
        variants: :class:`~auxloss.Variant` objects: taps, tasks and a weighting each.
        out: the output folder (store, ``results.json``, ``report.html``/``.md``, per-run logs and weights). A
            second call with the same experiment resumes: finished runs are not trained again.
        main: the main task (any name): cross entropy against ``"target"`` with accuracy by default.
        seeds: how many paired seeds (``0..seeds-1``).
        train: :class:`~auxloss.train.Trainer` options (``epochs``, ``lr``, ``optimizer``, ``patience``, ...).
        loader: ``DataLoader`` options for datasets (``num_workers``, ``pin_memory``, ``persistent_workers``).
        keep: trained weights kept per run: ``"best"`` (best validation epoch; trunk and heads in separate files,
            about 4 bytes per parameter each), ``"all"`` (also the last epoch), ``"none"``. Listed in
            ``results.json`` and linked from the report; not part of the fingerprint (another ``keep`` resumes the
            same ``out``, for the runs still to train).
        engine: what trains each run: ``None`` (auxloss's Trainer), ``"lightning"``, or
            :class:`~auxloss.experiment.engines.LightningEngine` ``(module=..., trainer_kwargs=...)`` for
            ``lightning.Trainer`` (see docs/your-model.md, "Lightning").
        workers: processes training runs in parallel (factories must then be module-level functions).
        store: a PostgreSQL URL to share the runs with workers on other machines.

    Returns:
        The content of ``results.json``: per-variant means with 95% CIs, the paired comparisons with the
        baseline (Δ, CI, Holm-corrected p, verdict), and the path of each run's weights.
    """
    from auxloss.experiment.runner import run

    exp = Experiment(model=model, data=data, variants=variants, main=main, name=name, seeds=seeds,
                     train=dict(train or {}), batch_size=batch_size, eval_batch_size=eval_batch_size,
                     loader=dict(loader or {}), batch_keys=tuple(batch_keys), input_key=input_key,
                     compare_on=compare_on, alpha=alpha, keep=keep, engine=engine)
    return run(exp, out, workers=workers, device=device, force=force, progress=progress, store=store,
               command=f"auxloss.compare(..., out={str(out)!r}, seeds={seeds})")
