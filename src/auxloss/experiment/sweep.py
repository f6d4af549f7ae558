"""Search the auxiliary weights of one variant with Optuna, then check the result on held-out seeds.

The search and the verdict use different data, so the verdict is not inflated by the search:

* every trial trains the variant with suggested weights on the *search seeds* (``1000, 1001, ...``) and is
  scored on the **validation** main metric at the best-validation epoch (never the test split);
* afterwards the best trial's weights, the config's own weights ("default") and the baseline are trained on
  the *evaluation seeds* ``0 .. eval_seeds-1``, which no trial used, and compared, paired by seed, on the
  config's compared split (``train.compare_on``, the test split by default).

Each task's weight is suggested log-uniformly in ``[0.01, 3.0]`` (parameter ``w/<task>``). With
``schedule=True`` each task also gets a curriculum start (parameter ``start/<task>``, a fraction in
``[0, 0.5]`` of the run's optimizer steps) and its weight becomes
``{"type": "curriculum", "value": w, "start": <step>, "ramp": <10% of the steps>}``. Without it, a task
whose config weight is a schedule with a ``value`` keeps that schedule with ``value`` replaced; any other
weight is replaced by the constant ``w``.

Trials live in an Optuna study in any SQLAlchemy storage (SQLite under ``out`` by default; PostgreSQL or
MySQL to share a study between machines). Any number of processes may run :func:`sweep_worker` on the same
study at once: the total number of trials over all of them is exactly ``trials``, because each worker counts
the study's trials (finished, running and waiting) and creates its next one while holding a lock shared by all
workers (a lock file next to a SQLite database; an advisory lock on PostgreSQL and MySQL). Running the sweep
again with the same storage resumes it: finished trials count, so it only adds the missing ones.

A trial that dies without reporting (a killed process) stays *running* until Optuna's heartbeat marks it
failed (about two minutes later); it then counts as a failed trial.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from auxloss._checks import int_at_least
from auxloss._redact import mask_password
from auxloss.errors import AuxLossError
from auxloss.experiment import stats
from auxloss.experiment.config import ExperimentConfig, VariantConfig
from auxloss.experiment.report.sweep import format_sweep
from auxloss.experiment.storage import StudyLock, optuna_storage
from auxloss.experiment.usercode import is_user_reference

__all__ = ["SEARCH_SEED_OFFSET", "WEIGHT_RANGE", "format_sweep", "run_sweep", "sweep_worker", "total_steps",
           "with_weights"]

#: Trials train on seeds ``SEARCH_SEED_OFFSET + i``, disjoint from the evaluation seeds ``0 .. eval_seeds-1``.
SEARCH_SEED_OFFSET = 1000
#: The range of each task's weight (searched log-uniformly).
WEIGHT_RANGE = (0.01, 3.0)
#: The range of a task's curriculum start, as a fraction of the run's optimizer steps (``schedule=True``).
START_RANGE = (0.0, 0.5)
#: The curriculum ramp, as a fraction of the run's optimizer steps (``schedule=True``).
RAMP_FRACTION = 0.1

SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
STORAGE_FILE = "optuna.sqlite"

# Heartbeats let a later worker tell a trial whose process died from one still training.
_HEARTBEAT_S = 30
_GRACE_S = 120
# Trial states that count towards the number of trials (waiting ones are enqueued and will run).
_COUNTED = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
_ATTR = "auxloss_sweep"


# --------------------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------------------


def _as_config(cfg: ExperimentConfig | Mapping[str, Any] | str) -> ExperimentConfig:
    if isinstance(cfg, ExperimentConfig):
        return cfg
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    return ExperimentConfig.model_validate(cfg)


def _sweep_variant(cfg: ExperimentConfig, variant: str | None) -> VariantConfig:
    names = [v.name for v in cfg.variants]
    if not names:
        raise AuxLossError(f"config {cfg.name!r} has no variants, so there are no auxiliary weights to search; "
                           "add a variant with at least one task under 'variants:'.")
    if variant is None:
        variant = names[0]
    if variant not in names:
        raise AuxLossError(f"no variant {variant!r} to sweep; the config's variants are {names} (the baseline "
                           "has no weights to search). Pass one of them, e.g. --variant " + names[0] + ".")
    vcfg = cfg.variant(variant)
    if not vcfg.tasks:
        with_tasks = [v.name for v in cfg.variants if v.tasks]
        raise AuxLossError(f"variant {variant!r} has no auxiliary tasks, so it has no weights to search; sweep a "
                           f"variant with tasks ({with_tasks or 'none in this config'}) or add tasks to it.")
    return vcfg


def _main_metric(cfg: ExperimentConfig) -> tuple[str, bool]:
    """The main metric's name and whether higher is better (as the runner's results.json reports it)."""
    return cfg.main.resolved_metric()


def total_steps(cfg: ExperimentConfig, variant: str | None = None) -> int:
    """Optimizer steps of a full run (what a ``unit: step`` schedule counts), from the config alone.

    The training loader drops its last partial batch when there is more than one batch, and a last partial
    gradient accumulation still makes a step.
    """
    tcfg = cfg.train
    if variant is not None and cfg.variant(variant).train:
        tcfg = cfg.train_for(variant)
    n, bs = cfg.data.n_train, cfg.data.batch_size
    batches = n // bs if n > bs else 1
    if is_user_reference(cfg.data.name):  # data.n_train is not used: count the user's own training split
        batches = _user_train_batches(cfg)
    return max(1, math.ceil(batches / tcfg.accumulate)) * tcfg.epochs


def _user_train_batches(cfg: ExperimentConfig) -> int:
    from torch.utils.data import DataLoader

    from auxloss.experiment.build import build_data

    train = build_data(cfg, 0)["train"]
    try:
        n = len(train)
    except TypeError:
        raise AuxLossError("searching when each task enters (--schedule) needs the number of training steps, but "
                           "the training split has no length (an iterable dataset); give it a __len__, or search "
                           "the weights only.") from None
    if isinstance(train, DataLoader):
        return max(1, n)
    bs = cfg.data.batch_size
    return n // bs if n > bs else 1  # the runner's loader drops a last partial batch when there are several


def _weights_from_params(cfg: ExperimentConfig, vcfg: VariantConfig, params: Mapping[str, float],
                         schedule: bool) -> dict[str, float | dict[str, Any]]:
    """Each task's weight config for a trial's parameters."""
    weights: dict[str, float | dict[str, Any]] = {}
    steps = total_steps(cfg, vcfg.name) if schedule else 0  # only a schedule needs it (user data is built for it)
    for task in vcfg.tasks:
        w = float(params[f"w/{task.name}"])
        if schedule:
            start = round(float(params[f"start/{task.name}"]) * steps)
            ramp = max(1, round(RAMP_FRACTION * steps))
            weights[task.name] = {"type": "curriculum", "value": w, "start": start, "ramp": ramp}
        elif isinstance(task.weight, dict) and "value" in task.weight:
            weights[task.name] = {**task.weight, "value": w}
        else:
            weights[task.name] = w
    return weights


def with_weights(cfg: ExperimentConfig, variant: str, weights: Mapping[str, float | dict[str, Any]],
                 name: str | None = None) -> tuple[ExperimentConfig, str]:
    """``cfg`` plus a copy of ``variant`` whose tasks have the given weights, and that copy's name.

    The copy is called ``name`` (default ``<variant>-tuned``, with a number added if the config already has a
    variant of that name); tasks missing from ``weights`` keep their weight.
    """
    vcfg = cfg.variant(variant)
    unknown = sorted(set(weights) - {t.name for t in vcfg.tasks})
    if unknown:
        raise AuxLossError(f"weights for unknown task(s) {unknown} of variant {variant!r}; its tasks are "
                           f"{[t.name for t in vcfg.tasks]}.")
    taken = set(cfg.variant_names)
    if name is None:
        name, k = f"{variant}-tuned", 2
        while name in taken:
            name, k = f"{variant}-tuned{k}", k + 1
    elif name in taken:
        raise AuxLossError(f"the config already has a variant {name!r}; pick another name for the tuned copy.")
    data = vcfg.model_dump()
    data["name"] = name
    for task in data["tasks"]:
        if task["name"] in weights:
            task["weight"] = weights[task["name"]]
    tuned = VariantConfig.model_validate(data)
    return cfg.model_copy(update={"variants": [*cfg.variants, tuned]}), name


def _fingerprint(cfg: ExperimentConfig, variant: str, search_seeds: int, schedule: bool) -> dict[str, Any]:
    """What makes two trials comparable: stored on the study, checked when a sweep joins it."""
    from auxloss.experiment.runner import config_hash

    return {"config_hash": config_hash(cfg), "variant": variant, "search_seeds": search_seeds,
            "schedule": bool(schedule)}


# --------------------------------------------------------------------------------------------------------
# The study (its storage URL and the lock shared by all workers live in auxloss.experiment.storage)
# --------------------------------------------------------------------------------------------------------


def _open_study(cfg: ExperimentConfig, variant: str, url: str, study_name: str, search_seeds: int,
                schedule: bool, lock: StudyLock) -> tuple[Any, Any]:
    """The storage and the study, created or joined; refuse a study holding a sweep of another setup."""
    import optuna

    _, higher = _main_metric(cfg)
    direction = "maximize" if higher else "minimize"
    mine = _fingerprint(cfg, variant, search_seeds, schedule)
    with lock:  # also serialises the creation of the database tables by workers starting together
        storage = optuna_storage(url, heartbeat_s=_HEARTBEAT_S, grace_s=_GRACE_S)
        study = optuna.create_study(study_name=study_name, storage=storage, direction=direction,
                                    load_if_exists=True)
        theirs = study.user_attrs.get(_ATTR)
        if theirs is None:
            if study.trials:
                raise AuxLossError(f"study {study_name!r} already holds trials that no auxloss sweep made; give "
                                   "another study name (--study) or another storage.")
            study.set_user_attr(_ATTR, mine)
        elif theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            what = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in diff)
            raise AuxLossError(f"study {study_name!r} holds a sweep of another setup ({what}); its trials are not "
                               "comparable with this one's. Use another study name (--study) or another --out, "
                               "or run with the same config and options to resume it.")
        if study.direction != optuna.study.StudyDirection[direction.upper()]:
            raise AuxLossError(f"study {study_name!r} was created to {study.direction.name.lower()} but the main "
                               f"metric is to {direction}; use another study name (--study).")
    return storage, study


def _counted(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=tuple(TrialState[s] for s in _COUNTED)))


def _fail_stale(study: Any) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


# --------------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------------


class _Objective:
    def __init__(self, cfg: ExperimentConfig, vcfg: VariantConfig, search_seeds: int, schedule: bool,
                 lock: StudyLock) -> None:
        self.cfg, self.vcfg, self.schedule, self.lock = cfg, vcfg, schedule, lock
        self.seeds = [SEARCH_SEED_OFFSET + i for i in range(search_seeds)]

    def __call__(self, trial: Any) -> float:
        # Optuna has created this trial: the next worker may now count it and create its own.
        self.lock.release()
        from auxloss.experiment.build import final_metric
        from auxloss.experiment.runner import run_one

        params = {}
        for task in self.vcfg.tasks:
            params[f"w/{task.name}"] = trial.suggest_float(f"w/{task.name}", *WEIGHT_RANGE, log=True)
            if self.schedule:
                params[f"start/{task.name}"] = trial.suggest_float(f"start/{task.name}", *START_RANGE)
        weights = _weights_from_params(self.cfg, self.vcfg, params, self.schedule)
        trial.set_user_attr("weights", weights)
        cfg, name = with_weights(self.cfg, self.vcfg.name, weights)
        values: dict[str, float] = {}
        try:
            for seed in self.seeds:
                values[str(seed)] = final_metric(run_one(cfg, name, seed)["best"], "val", cfg.main.name)
        except AuxLossError as exc:  # e.g. a loss that became NaN with these weights: this trial fails
            trial.set_user_attr("error", str(exc))
            raise
        value = sum(values.values()) / len(values)
        trial.set_user_attr("val_by_seed", values)
        trial.set_user_attr("val_metric", value)
        return value


def _mixed_seed(sampler_seed: int, n_existing: int) -> int:
    # A resumed worker must not replay the random proposals of the first run: mix in the study's progress.
    import numpy as np

    return int(np.random.SeedSequence([int(sampler_seed) & 0xFFFFFFFF, n_existing]).generate_state(1)[0])


def sweep_worker(cfg_json: ExperimentConfig | Mapping[str, Any] | str, storage_url: str, study_name: str,
                 variant: str | None, trials: int, search_seeds: int = 1, schedule: bool = False,
                 sampler_seed: int = 0, *, threads: int | None = None) -> int:
    """Run trials of the study until it holds ``trials`` trials in all; return how many this call ran.

    Any number of these may run at once, in other processes or on other machines sharing ``storage_url``;
    give each its own ``sampler_seed`` (e.g. base seed + worker index) so that they propose different
    weights. ``cfg_json`` is the config as a dict (``cfg.model_dump(mode="json")``), a JSON string or an
    :class:`ExperimentConfig`. ``threads`` sets ``torch.set_num_threads`` (leave ``None`` to keep torch's
    default). Only the search runs here: :func:`run_sweep` evaluates the result.
    """
    import optuna

    if threads:
        torch.set_num_threads(threads)
    cfg = _as_config(cfg_json)
    vcfg = _sweep_variant(cfg, variant)
    trials = int_at_least("trials", trials, example="trials=20 (--trials 20)")
    search_seeds = int_at_least("search_seeds", search_seeds, example="search_seeds=1")
    lock = StudyLock(storage_url, study_name)
    storage, study = _open_study(cfg, vcfg.name, storage_url, study_name, search_seeds, schedule, lock)
    sampler = optuna.samplers.TPESampler(seed=_mixed_seed(sampler_seed, _counted(study)))
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    objective = _Objective(cfg, vcfg, search_seeds, schedule, lock)
    ran = 0
    while True:
        lock.acquire()
        try:
            _fail_stale(study)
            if _counted(study) >= trials:
                return ran
            # The lock is held from the count until Optuna has created the trial (the objective releases it),
            # so concurrent workers never create more than `trials` trials in all.
            study.optimize(objective, n_trials=1, catch=(AuxLossError,))
        finally:
            lock.release()
        ran += 1


def _pool_worker(args: tuple) -> int:
    return sweep_worker(*args[:-1], threads=args[-1])


# --------------------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------------------


def _eval_job(args: tuple) -> dict[str, Any]:
    cfg_json, name, seed, out, threads = args
    if threads:
        torch.set_num_threads(threads)
    from auxloss.experiment.runner import run_one

    record = run_one(_as_config(cfg_json), name, seed, out=Path(out) if out else None)
    record.pop("history", None)
    return record


def _evaluate(cfg: ExperimentConfig, jobs: list[tuple[str, int]], out: Path, workers: int
              ) -> list[dict[str, Any]]:
    cfg_json = cfg.model_dump(mode="json")
    args = [(cfg_json, name, seed, str(out), None) for name, seed in jobs]
    if workers <= 1 or len(jobs) <= 1:
        return [_eval_job(a) for a in args]
    args = [(*a[:-1], 1) for a in args]
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return pool.map(_eval_job, args)


# --------------------------------------------------------------------------------------------------------
# run_sweep
# --------------------------------------------------------------------------------------------------------


def _json_float(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def run_sweep(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    trials: int = 20,
    storage: str | None = None,
    study_name: str | None = None,
    variant: str | None = None,
    eval_seeds: int = 3,
    workers: int = 1,
    search_seeds: int = 1,
    schedule: bool = False,
    sampler_seed: int = 0,
) -> dict[str, Any]:
    """Search ``variant``'s auxiliary weights on validation, then compare them on held-out seeds.

    Args:
        cfg: the validated config.
        out: output folder: ``optuna.sqlite`` (the default storage), ``sweep.json``, ``sweep.md`` and the
            held-out runs' logs under ``runs/``.
        trials: the number of trials of the study in all (over every worker, earlier runs included): a
            study that already holds that many is not searched further.
        storage: an SQLAlchemy URL; default ``sqlite:///<out>/optuna.sqlite``.
        study_name: default: the config's name.
        variant: the variant to tune; default: the config's first.
        eval_seeds: held-out seeds ``0 .. eval_seeds-1`` for the final comparison; 0 skips it (for example on
            machines that only add trials to a shared study).
        workers: processes running trials (and then the held-out runs) in parallel, one torch thread each.
        search_seeds: seeds each trial trains on (``1000 ..``); its value is the mean validation metric.
        schedule: also search a curriculum start per task.
        sampler_seed: seed of the TPE sampler (worker ``i`` uses ``sampler_seed + i``).

    Returns:
        The content of ``sweep.json``: the study, every trial, the best one and the held-out comparisons
        (best and default weights against the baseline, and best against default).
    """
    started = time.perf_counter()
    cfg = _as_config(cfg)
    vcfg = _sweep_variant(cfg, variant)
    variant = vcfg.name
    trials = int_at_least("trials", trials, example="trials=20 (--trials 20)")
    workers = int_at_least("workers", workers, example="workers=2 (--workers 2)")
    search_seeds = int_at_least("search_seeds", search_seeds, example="search_seeds=1")
    eval_seeds = int_at_least("eval_seeds", eval_seeds, example="eval_seeds=3 (--eval-seeds 3)", minimum=0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / STORAGE_FILE).resolve()}"
    study_name = study_name or cfg.name
    metric, higher = _main_metric(cfg)

    # Fail on a bad config now rather than in every trial (trials catch errors raised during training).
    from auxloss.experiment.build import build_run

    default_weights = {t.name: t.weight for t in vcfg.tasks}
    probe = {f"{k}/{t.name}": v for t in vcfg.tasks for k, v in (("w", 0.1), ("start", 0.25))}
    probe_cfg, probe_name = with_weights(cfg, variant, _weights_from_params(cfg, vcfg, probe, schedule))
    build_run(probe_cfg, probe_name, SEARCH_SEED_OFFSET, device="cpu")

    lock = StudyLock(url, study_name)
    storage, study = _open_study(cfg, variant, url, study_name, search_seeds, schedule, lock)
    cfg_json = cfg.model_dump(mode="json")
    todo = trials - _counted(study)
    if todo > 0 and workers == 1:
        sweep_worker(cfg_json, url, study_name, variant, trials, search_seeds, schedule, sampler_seed)
    elif todo > 0:
        jobs = [(cfg_json, url, study_name, variant, trials, search_seeds, schedule, sampler_seed + i, 1)
                for i in range(min(workers, todo))]
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            pool.map(_pool_worker, jobs)

    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=storage)
    all_trials = study.get_trials(deepcopy=False)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    if not complete:
        errors = [t.user_attrs["error"] for t in all_trials if "error" in t.user_attrs]
        raise AuxLossError(f"none of the {len(all_trials)} trials of study {study_name!r} completed"
                           + (f"; the first error: {errors[0]}" if errors else "")
                           + ". Fix the cause and run again (finished trials are kept), or use another --study.")
    best = study.best_trial
    best_weights = best.user_attrs.get("weights") or _weights_from_params(cfg, vcfg, best.params, schedule)

    summary: dict[str, Any] = {
        "study": study_name,
        "storage": mask_password(url),
        "variant": variant,
        "metric": metric,
        "higher_is_better": higher,
        "direction": "maximize" if higher else "minimize",
        "search_split": "val",
        "search_seeds": [SEARCH_SEED_OFFSET + i for i in range(search_seeds)],
        "schedule": bool(schedule),
        "n_trials": len(all_trials),
        "n_complete": len(complete),
        "best": {"number": best.number, "params": dict(best.params), "value": _json_float(best.value),
                 "weights": best_weights},
        "best_params": dict(best.params),
        "best_value": _json_float(best.value),
        "default_weights": default_weights,
        "trials": [
            {"number": t.number, "state": t.state.name, "value": _json_float(t.value), "params": dict(t.params),
             "weights": t.user_attrs.get("weights"), **({"error": t.user_attrs["error"]}
                                                         if "error" in t.user_attrs else {})}
            for t in sorted(all_trials, key=lambda t: t.number)
        ],
        "held_out": None,
    }

    if eval_seeds:
        tuned_cfg, tuned = with_weights(cfg, variant, best_weights)
        seeds = list(range(eval_seeds))
        jobs = [(name, s) for s in seeds for name in ("baseline", variant, tuned)]
        records = _evaluate(tuned_cfg, jobs, out, workers)
        by_run: dict[str, dict[int, float]] = {"baseline": {}, "default": {}, "best": {}}
        label = {"baseline": "baseline", variant: "default", tuned: "best"}
        for record in records:
            by_run[label[record["variant"]]][record["seed"]] = float(record["main"])
        vs_base = stats.compare(by_run["baseline"], {"best": by_run["best"], "default": by_run["default"]},
                                higher_is_better=higher, alpha=cfg.alpha)
        (best_vs_default,) = stats.compare(by_run["default"], {"best": by_run["best"]}, higher_is_better=higher,
                                           alpha=cfg.alpha, baseline_name="default")
        summary["held_out"] = {
            "seeds": seeds,
            "split": cfg.train.compare_on,
            "variants": {"baseline": "baseline", "default": variant, "best": tuned},
            "runs": {k: {str(s): v for s, v in sorted(vals.items())} for k, vals in by_run.items()},
            "summary": {k: stats.summarize(vals) for k, vals in by_run.items()},
            "vs_baseline": [c.to_dict() for c in vs_base],
            "best_vs_default": best_vs_default.to_dict(),
        }
    summary["seconds"] = time.perf_counter() - started
    (out / SWEEP_JSON).write_text(json.dumps(summary, indent=2))
    (out / SWEEP_MD).write_text(format_sweep(summary))
    return summary

