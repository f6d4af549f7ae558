"""Run an experiment: the baseline and every variant on every seed, stored, compared, reported.

Runs are independent jobs in the SQLite store. Worker processes (``workers``) claim them one at a time, so a
second command on the same ``--out`` (or a crashed one restarted) never trains a finished run twice.

Checkpoints go to ``OUT/runs/<variant>/seed<k>/checkpoint``, or with ``checkpoint_dir`` (a shared folder or an
fsspec URL) to ``<checkpoint_dir>/<name>-<config hash>/<variant>/seed<k>``: unique per experiment, config, variant
and seed, and the same on every machine, so a worker that takes over a dead one's run resumes its checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from auxloss.errors import AuxLossError
from auxloss.experiment import stats
from auxloss.experiment.config import ExperimentConfig
from auxloss.experiment.store import Store, open_store, worker_id
from auxloss.train.callbacks import Callback
from auxloss.train.checkpoint import checkpoint_location, join_location, remove_checkpoint

__all__ = ["aggregate", "run_experiment", "run_one"]

RESULTS_FILE = "results.json"
STORE_FILE = "results.sqlite"


def config_hash(cfg: ExperimentConfig) -> str:
    """A fingerprint of everything that changes the runs (not the number of seeds, which only adds runs)."""
    data = cfg.model_dump(mode="json")
    data.pop("seeds", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_checkpoint_dir(cfg: ExperimentConfig, variant: str, seed: int, out: Path | None,
                       checkpoint_dir: str | Path | None = None) -> Path | str | None:
    """Where (variant, seed) keeps its checkpoints: under ``out``, or under the shared ``checkpoint_dir``.

    Under a shared root the folder names the experiment and its config hash: two experiments (or a config changed
    with ``--force``) never resume each other's checkpoints.
    """
    if checkpoint_dir is None:
        return out / "runs" / variant / f"seed{seed}" / "checkpoint" if out is not None else None
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.name)
    return join_location(checkpoint_dir, f"{name}-{config_hash(cfg)}", variant, f"seed{seed}")


def run_one(cfg: ExperimentConfig, variant: str, seed: int, *, out: Path | None = None,
            device: str | None = None, progress: bool = False, callbacks: tuple = (),
            checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one (variant, seed) and return its result record (with ``history``).

    ``checkpoint_dir``: a shared folder or fsspec URL for the checkpoints (see :func:`run_checkpoint_dir`).
    """
    from auxloss.experiment.build import build_run

    run_dir = out / "runs" / variant / f"seed{seed}" if out is not None else None
    built = build_run(cfg, variant, seed, device=device, log_dir=str(run_dir) if run_dir else None,
                      progress=progress)
    built.trainer.callbacks.extend(callbacks)
    # An interrupted run resumes from its last checkpoint (bit-identically on CPU) instead of starting over.
    built.trainer.checkpoint_dir = run_checkpoint_dir(cfg, variant, seed, out, checkpoint_dir)
    fit = built.trainer.fit(built.model, built.objective, built.loaders["train"], built.loaders["val"],
                            built.loaders["test"])
    split = cfg.train.compare_on
    return {
        "variant": variant,
        "seed": seed,
        # The report reads the main task's history keys (`val/metric/<name>`) by this name.
        "main_task": built.objective.main.name,
        "main": fit.main_metric(split),
        "best_epoch": fit.best_epoch,
        "best": fit.best,
        "seconds": fit.seconds,
        "stopped_early": fit.stopped_early,
        "skipped_steps": fit.skipped_steps,
        "history": fit.history,
    }


def stale_after() -> float:
    """Seconds without a heartbeat before another worker takes a claimed run over (``AUXLOSS_STALE_AFTER``)."""
    raw = os.environ.get("AUXLOSS_STALE_AFTER", "120")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise AuxLossError(f"AUXLOSS_STALE_AFTER must be a positive number of seconds, got {raw!r}; unset it for "
                           "the default of 120.")
    return value


class _Stop(Exception):
    """This worker must stop the run: another worker took its claim over, or the process that started it died."""


class _Heartbeat(Callback):
    """Keeps a claimed run alive in the store while it trains, so a live worker's run is never taken over.

    A heartbeat goes out at most every ``stale_after / 4`` seconds, from the training loop's hooks. If the claim is
    no longer ours (a worker took it over after we stalled) or our parent process died, training stops.
    """

    def __init__(self, store: Store, variant: str, seed: int, worker: str, parent: int | None) -> None:
        self.store, self.variant, self.seed, self.worker, self.parent = store, variant, seed, worker, parent
        self.every = store.stale_after / 4
        self.last = time.monotonic()

    def beat(self, force: bool = False) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            raise _Stop("the process that started this worker died")
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        try:
            alive = self.store.heartbeat(self.variant, self.seed, self.worker)
        except AuxLossError:
            return  # best effort: a busy store delays a heartbeat, it does not stop training
        if not alive:
            raise _Stop(f"run {self.variant}/seed{self.seed} was taken over by another worker")

    def on_train_batch_end(self, trainer: Any, report: Any, batch_idx: int) -> None:
        self.beat()

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.beat()

    def on_fit_start(self, trainer: Any) -> None:
        self.beat(force=True)


STORE_URL_FILE = "store_url.txt"


def open_experiment_store(out: str | Path, name: str, url: str | None = None) -> Store:
    """The store of the experiment under ``out``: SQLite in the folder, or the database whose URL was given to
    ``run_experiment(store=...)`` (remembered in ``out/store_url.txt`` so that ``auxloss report`` finds it)."""
    out = Path(out)
    if url is None and (out / STORE_URL_FILE).exists():
        url = (out / STORE_URL_FILE).read_text().strip()
    if url:
        return open_store(url, namespace=name, stale_after=stale_after())
    return Store(out / STORE_FILE, stale_after=stale_after())


def _variant_params(cfg: ExperimentConfig, variant: str, seed: int) -> dict[str, Any]:
    """What one run trains with (its MLflow params): the shared settings, the variant's own, its seed."""
    return {"variant": cfg.variant(variant).model_dump(mode="json"), "seed": seed,
            "data": cfg.data.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
            "main": cfg.main.model_dump(mode="json"), "train": cfg.train_for(variant).model_dump(mode="json")}


def _tracker(cfg: ExperimentConfig, store: Store, mlflow: str | None) -> Any:
    if not mlflow:
        return None
    from auxloss.integrations.mlflow import MlflowTracker

    return MlflowTracker(mlflow, cfg.name, config_hash(cfg), store)


def _worker_loop(cfg_json: dict[str, Any], out: str, device: str | None, threads: int | None,
                 progress: bool, parent: int | None = None, checkpoint_dir: str | None = None,
                 mlflow: str | None = None) -> int:
    if threads:
        torch.set_num_threads(threads)
    cfg = ExperimentConfig.model_validate(cfg_json)
    store = open_experiment_store(out, cfg.name)
    tracker = _tracker(cfg, store, mlflow)
    shared = os.environ.get("AUXLOSS_SHARED_STORE") == "1"
    me = worker_id()
    done = 0
    while True:
        if parent is not None and os.getppid() != parent:
            return done  # orphaned pool worker (its parent was killed): claim nothing more
        job = store.claim(me)
        if job is None:
            if shared and store.status().get("running", 0):
                # Other workers' runs are in flight: wait, to take one over if its worker dies (no heartbeat).
                time.sleep(min(5.0, store.stale_after / 4))
                continue
            return done
        variant, seed = job
        heartbeat = _Heartbeat(store, variant, seed, me, parent)
        callbacks: tuple = (heartbeat,)
        if tracker is not None:
            callbacks += (tracker.callback(variant, seed, _variant_params(cfg, variant, seed)),)
        try:
            record = run_one(cfg, variant, seed, out=Path(out), device=device, progress=progress,
                             callbacks=callbacks, checkpoint_dir=checkpoint_dir)
        except _Stop:
            continue  # the MLflow run stays open: the worker that took the run over continues it
        except Exception as exc:
            store.fail(variant, seed, str(exc) if isinstance(exc, AuxLossError) else
                       "".join(traceback.format_exception(exc)))
            if tracker is not None:
                with contextlib.suppress(AuxLossError):  # the run's own error matters, not a tracking one on top
                    tracker.fail_run(callbacks[-1].run_id)
            raise
        history = record.pop("history")
        if store.finish(variant, seed, record, history, worker=me):
            done += 1
            if tracker is not None:
                tracker.finish_run(callbacks[-1].run_id, record)
        # The result is stored: the run's checkpoints are no longer needed.
        remove_checkpoint(run_checkpoint_dir(cfg, variant, seed, Path(out), checkpoint_dir))


def _distributed_loop(cfg: ExperimentConfig, out: Path, device: str | None, checkpoint_dir: str | None = None,
                      mlflow: str | None = None) -> None:
    """Under torchrun: rank 0 claims each run and broadcasts it; every rank trains it together with DDP."""
    from auxloss.train import distributed as D

    store = open_experiment_store(out, cfg.name) if D.rank() == 0 else None
    tracker = _tracker(cfg, store, mlflow) if store is not None else None
    me = worker_id()
    while True:
        job = store.claim(me) if store is not None else None
        job = D.broadcast_object(job)
        if job is None:
            return
        variant, seed = job
        if device is None and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        # Every rank reads the run's checkpoint on resume; only rank 0 writes it, and the logs (Trainer).
        callbacks = (tracker.callback(variant, seed, _variant_params(cfg, variant, seed)),) if tracker else ()
        record = run_one(cfg, variant, seed, out=out, device=device, callbacks=callbacks,
                         checkpoint_dir=checkpoint_dir)
        if store is not None:
            history = record.pop("history")
            store.finish(variant, seed, record, history, worker=me)
            if tracker is not None:
                tracker.finish_run(callbacks[0].run_id, record)
            remove_checkpoint(run_checkpoint_dir(cfg, variant, seed, out, checkpoint_dir))
        D.barrier()


def _pool_worker(args: tuple) -> int:
    return _worker_loop(*args)


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    workers: int = 1,
    device: str | None = None,
    force: bool = False,
    progress: bool = False,
    command: str | None = None,
    store: str | None = None,
    checkpoint_dir: str | Path | None = None,
    mlflow: str | None = None,
) -> dict[str, Any]:
    """Train every (variant, seed) not yet finished under ``out``, then write ``results.json`` and the report.

    Args:
        cfg: the validated config.
        out: output folder; it holds ``results.sqlite``, ``config.yaml`` (resolved), ``runs/`` logs,
            ``results.json`` and ``report.html``/``report.md``.
        workers: processes training runs in parallel (each with ``torch`` limited to share the cores).
        force: reuse a folder that holds another experiment's results (its runs are discarded).
        store: a ``postgresql://`` URL to keep the runs in a shared database instead of ``out/results.sqlite``, so
            that workers on several machines (each with ``AUXLOSS_SHARED_STORE=1``) split one experiment.
        checkpoint_dir: a folder on shared storage or an fsspec URL (``s3://bucket/ckpt``) for the runs'
            checkpoints instead of ``out/runs/``, so that a worker on another machine resumes a dead one's run.
        mlflow: an MLflow tracking URI: every run is logged as a nested run of one parent run per experiment,
            with the verdict and the report on the parent (:mod:`auxloss.integrations.mlflow`).
    """
    from auxloss.train import distributed as D

    out = Path(out)
    started = time.perf_counter()
    if checkpoint_dir is not None:
        checkpoint_dir = str(checkpoint_location(checkpoint_dir))  # a bad URL fails here, before any training
    if store:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / STORE_URL_FILE, store + "\n")
    if D.init_from_env():
        # Under torchrun: only rank 0 touches the store, the logs and the report.
        tracker = None
        if D.rank() == 0:
            db = _prepare_store(cfg, out, force)
            tracker = _start_tracking(cfg, db, out, mlflow, command, store, checkpoint_dir)
        D.barrier()
        _distributed_loop(cfg, out, device, checkpoint_dir, mlflow)
        D.barrier()
        if D.rank() != 0:
            return {}
        return _finish(cfg, out, open_experiment_store(out, cfg.name), command, started, tracker)
    db = _prepare_store(cfg, out, force)
    tracker = _start_tracking(cfg, db, out, mlflow, command, store, checkpoint_dir)
    status = db.status()
    todo = status.get("pending", 0)
    if os.environ.get("AUXLOSS_SHARED_STORE") == "1":
        todo += status.get("running", 0)  # other workers' runs: wait, to take over any whose worker dies
    workers = max(1, min(workers, todo)) if todo else 1
    cfg_json = cfg.model_dump(mode="json")
    if todo and workers == 1:
        _worker_loop(cfg_json, str(out), device, None, progress, None, checkpoint_dir, mlflow)
    elif todo:
        # Each process gets an equal share of the cores: oversubscribed torch threads spin and slow everyone.
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.map(_pool_worker, [(cfg_json, str(out), device, threads, False, os.getpid(), checkpoint_dir,
                                     mlflow)] * workers)
    return _finish(cfg, out, db, command, started, tracker)


def _start_tracking(cfg: ExperimentConfig, db: Store, out: Path, mlflow: str | None, command: str | None,
                    store: str | None, checkpoint_dir: str | None) -> Any:
    tracker = _tracker(cfg, db, mlflow)
    if tracker is not None:
        tracker.start_experiment(cfg.model_dump(mode="json"), out, command=command, store=store,
                                 checkpoint_dir=checkpoint_dir)
    return tracker


def _finish(cfg: ExperimentConfig, out: Path, store: Store, command: str | None, started: float,
            tracker: Any = None) -> dict[str, Any]:
    from auxloss.experiment.report import build_report

    # Several processes may share `out` (AUXLOSS_SHARED_STORE): each aggregates and writes under a lock, so the
    # last one to finish writes the most complete results, and results.json is replaced whole, never torn.
    with _out_lock(out):
        results = aggregate(cfg, store, command=command, seconds=time.perf_counter() - started)
        write_atomic(out / RESULTS_FILE, json.dumps(results, indent=2))
        build_report(out, results, *load_histories(store))
        if tracker is not None:
            tracker.finish_experiment(results, out)
    return results


@contextlib.contextmanager
def _out_lock(out: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no POSIX locks (Windows): one process per folder
        yield
        return
    with open(out / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AuxLossError(f"cannot write {str(path)!r}: {exc.strerror or exc}. Free some disk space or choose a "
                           "writable output folder, then run the same command again (finished runs are kept).") from exc


def _prepare_store(cfg: ExperimentConfig, out: Path, force: bool) -> Store:
    import yaml

    store_path = out / STORE_FILE
    fingerprint = config_hash(cfg)
    shared_db = (out / STORE_URL_FILE).exists()
    if store_path.exists() or shared_db:
        store = open_experiment_store(out, cfg.name)
        previous = store.get_meta("config_hash")
        if previous is not None and previous != fingerprint:
            if not force:
                raise AuxLossError(
                    f"{str(out)!r} holds the results of another experiment ({store.get_meta('name')!r}, a different "
                    "config). Use another --out folder, or pass --force to discard them."
                )
            if shared_db:
                store.clear()
            else:
                store_path.unlink()
                for suffix in ("-wal", "-shm"):
                    Path(str(store_path) + suffix).unlink(missing_ok=True)
            # Their logs and checkpoints too: a run of the new config must never resume an old run's checkpoint.
            shutil.rmtree(out / "runs", ignore_errors=True)
    store = open_experiment_store(out, cfg.name)
    store.set_meta("config_hash", fingerprint)
    store.set_meta("name", cfg.name)
    write_atomic(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    runs = [(v, s) for s in range(cfg.seeds) for v in cfg.variant_names]
    store.add_runs(runs)
    # This call is the only one working on `out` unless the user started others: any run marked running is
    # an interrupted one, so it is redone. (Concurrent workers on one store use heartbeats instead.)
    if os.environ.get("AUXLOSS_SHARED_STORE") != "1":
        store.reset_unfinished()

    return store


def load_histories(store: Store) -> tuple[dict[str, dict[int, list[dict]]], dict[str, dict[int, int]]]:
    histories: dict[str, dict[int, list[dict]]] = {}
    best: dict[str, dict[int, int]] = {}
    for run in store.runs("done"):
        histories.setdefault(run["variant"], {})[run["seed"]] = run["history"]
        best.setdefault(run["variant"], {})[run["seed"]] = run["result"]["best_epoch"]
    return histories, best


def aggregate(cfg: ExperimentConfig, store: Store, *, command: str | None = None,
              seconds: float | None = None) -> dict[str, Any]:
    """``results.json``: per-variant means with CIs, and paired comparisons with the baseline."""
    done = store.runs("done")
    by_variant: dict[str, dict[int, float]] = {}
    extra: dict[str, dict[int, dict]] = {}
    for run in done:
        by_variant.setdefault(run["variant"], {})[run["seed"]] = float(run["result"]["main"])
        extra.setdefault(run["variant"], {})[run["seed"]] = run["result"]
    metric, higher = cfg.main.resolved_metric()
    variants = []
    for name in cfg.variant_names:
        values = by_variant.get(name, {})
        if not values:
            continue
        summary = stats.summarize(values)
        aux_tasks = [t.name for t in cfg.variant(name).tasks]
        aux_final = {}
        for task in aux_tasks:
            vals = [r["best"].get(f"{cfg.train.compare_on}/metric/{task}") for r in extra[name].values()]
            vals = [v for v in vals if v is not None]
            if vals:
                aux_final[task] = sum(vals) / len(vals)
        variants.append({
            "name": name,
            "seeds": summary["seeds"],
            "main": [values[s] for s in summary["seeds"]],
            "mean": summary["mean"],
            "std": summary["std"],
            "ci95": summary["ci95"],
            "aux_tasks": aux_tasks,
            "aux_metrics": aux_final,
            "best_epochs": [extra[name][s]["best_epoch"] for s in summary["seeds"]],
            "seconds": sum(extra[name][s]["seconds"] for s in summary["seeds"]),
        })
    comparisons = []
    baseline = by_variant.get("baseline", {})
    others = {v: by_variant[v] for v in cfg.variant_names[1:] if v in by_variant}
    if baseline and others:
        comparisons = [c.to_dict() for c in stats.compare(baseline, others, higher_is_better=higher,
                                                          alpha=cfg.alpha)]
    status = store.status()
    # Runs stored before records carried it lack the name; the report then falls back to the old fixed name.
    main_task = next((r["result"]["main_task"] for r in done if r["result"].get("main_task")), None)
    return {
        "name": cfg.name,
        **({"main_task": main_task} if main_task else {}),
        "metric": metric,
        "higher_is_better": higher,
        "baseline": "baseline",
        "split": cfg.train.compare_on,
        "variants": variants,
        "comparisons": comparisons,
        "runs": {"done": status.get("done", 0), "failed": status.get("failed", 0),
                 "pending": status.get("pending", 0) + status.get("running", 0)},
        "config": {**cfg.model_dump(mode="json"), **({"command": command} if command else {})},
        "timing": {"total_seconds": seconds},
    }
