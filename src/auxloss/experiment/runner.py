"""Run an experiment: the baseline and every variant on every seed, stored, compared, reported.

Runs are independent jobs in the SQLite store. Worker processes (``workers``) claim them one at a time, so a
second command on the same ``--out`` (or a crashed one restarted) never trains a finished run twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from auxloss.experiment.config import ExperimentConfig, config_hash
from auxloss.experiment.redact import redact_command, without_password
from auxloss.experiment.spec import BASELINE, Experiment
from auxloss.experiment.store import Store, open_store, worker_id
from auxloss.train.callbacks import Callback
from auxloss.train.checkpoint import join_location, remove_checkpoint

__all__ = ["aggregate", "config_hash", "run", "run_experiment", "run_one"]

RESULTS_FILE = "results.json"
EXPERIMENT_FILE = "experiment.json"
STORE_FILE = "results.sqlite"


def run_checkpoint_dir(exp: Experiment | ExperimentConfig, variant: str, seed: int, out: Path | None,
                       checkpoint_dir: str | Path | None = None) -> Path | str | None:
    """Where (variant, seed) keeps its checkpoints: under ``out``, or under the shared ``checkpoint_dir``.

    Under a shared root the folder names the experiment and its fingerprint: two experiments (or a config changed
    with ``--force``) never resume each other's checkpoints.
    """
    if checkpoint_dir is None:
        return out / "runs" / variant / f"seed{seed}" / "checkpoint" if out is not None else None
    exp = as_experiment(exp)
    return join_location(checkpoint_dir, f"{exp.name}-{exp.identity()}", variant, f"seed{seed}")


def run_one(exp: Experiment | ExperimentConfig, variant: str, seed: int, *, out: Path | None = None,
            device: str | None = None, progress: bool = False, callbacks: tuple = (),
            store: Store | None = None, checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    """Train one (variant, seed) and return its result record (with ``history``).

    With a ``store``, the run's pairing is checked against the seed's first run (initial trunk, first batch).
    ``checkpoint_dir``: a shared folder or fsspec URL for the checkpoints (see :func:`run_checkpoint_dir`).
    """
    from auxloss.experiment.assemble import PairingCheck, build_run

    exp = as_experiment(exp)
    run_dir = out / "runs" / variant / f"seed{seed}" if out is not None else None
    built = build_run(exp, variant, seed, device=device, log_dir=str(run_dir) if run_dir else None,
                      progress=progress)
    assert exp.main is not None
    if store is not None:
        keys = (exp.input_key,) + ((exp.main.target,) if isinstance(exp.main.target, str) else ())
        built.trainer.callbacks.append(PairingCheck(store.set_meta_once, seed, built.init_hash, keys,
                                                    tuple(exp.batch_keys)))
    keeper = _Keeper(run_dir / "weights", exp.keep) if run_dir is not None and exp.keep != "none" else None
    if keeper is not None:
        built.trainer.callbacks.append(keeper)
    built.trainer.callbacks.extend(callbacks)
    # An interrupted run resumes from its last checkpoint (bit-identically on CPU) instead of starting over.
    built.trainer.checkpoint_dir = run_checkpoint_dir(exp, variant, seed, out, checkpoint_dir)
    fit = built.trainer.fit(built.model, built.objective, built.loaders["train"], built.loaders["val"],
                            built.loaders["test"])
    record = {
        "variant": variant,
        "seed": seed,
        # The report reads the main task's history keys (`val/metric/<name>`) by this name.
        "main_task": built.objective.main.name,
        "main": _main_value(fit.best, exp.compare_on, exp.main.name),
        "best_epoch": fit.best_epoch,
        "best": fit.best,
        "seconds": fit.seconds,
        "stopped_early": fit.stopped_early,
        "skipped_steps": fit.skipped_steps,
        "init_hash": built.init_hash,
        # What else decides the numbers: the code's versions (a rerun with other ones is flagged, see
        # _check_versions) and the CPU threads torch used (fixed per run, whatever --workers is).
        "versions": current_versions(),
        "threads": torch.get_num_threads(),
        "history": fit.history,
    }
    if keeper is not None and out is not None and built.trainer.is_main_process:
        record["weights"] = keeper.save_best(built.model, out)
    return record


def _main_value(best: dict[str, float], split: str, task: str) -> float:
    key = f"{split}/metric/{task}"
    if key not in best:
        raise AuxLossError(f"the run has no {key!r} (the main task's metric on {split!r}); it has {sorted(best)}.")
    return float(best[key])


class _Keeper(Callback):
    """Keeps what was trained: the best-validation weights (the trainer has loaded them back when fit ends), as
    the stripped trunk, which loads into the user's own model class with ``strict=True``, and the heads
    separately; with ``keep="all"`` also the last epoch's. Tensors only (``torch.save`` of a state dict), so the
    files load with ``torch.load(weights_only=True)``."""

    def __init__(self, folder: Path, keep: str) -> None:
        self.folder, self.keep = folder, keep

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        if self.keep == "all" and record.get("epoch") == trainer.epochs and trainer.is_main_process:
            self._write(trainer.model, "last")

    def _write(self, model: Any, tag: str) -> dict[str, str]:
        from auxloss.taps import AuxModel

        self.folder.mkdir(parents=True, exist_ok=True)
        trunk = model.model if isinstance(model, AuxModel) else model
        paths = {"trunk": self.folder / f"{tag}-trunk.pt"}
        _save_tensors(trunk.state_dict(), paths["trunk"])
        if isinstance(model, AuxModel) and len(model.heads):
            paths["heads"] = self.folder / f"{tag}-heads.pt"
            _save_tensors(model.heads.state_dict(), paths["heads"])
        return {k: str(v) for k, v in paths.items()}

    def save_best(self, model: Any, out: Path) -> dict[str, str]:
        paths = self._write(model, "best")
        return {k: str(Path(v).relative_to(out)) for k, v in paths.items()}


def _save_tensors(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def as_experiment(exp: Experiment | ExperimentConfig) -> Experiment:
    if isinstance(exp, ExperimentConfig):
        from auxloss.experiment.build import experiment_from_config

        return experiment_from_config(exp)
    return exp


def current_versions() -> dict[str, str]:
    from auxloss import __version__

    return {"auxloss": __version__, "torch": torch.__version__}


def run_threads() -> int:
    """CPU threads of every run (``AUXLOSS_THREADS``, default 1). The same for every worker count: torch's float
    reductions split their work by thread, so the thread count changes a run's last bits, then its numbers."""
    raw = os.environ.get("AUXLOSS_THREADS", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise AuxLossError(f"AUXLOSS_THREADS must be a positive whole number of threads, got {raw!r}; unset it for "
                           "the default of 1.")
    return int(raw)


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
    """The store of the experiment under ``out``: SQLite in the folder, or the database at ``url``.

    A folder whose runs are in a database (``run_experiment(store=...)``) names it in ``out/store_url.txt``, without
    its password. That file is never connected to by itself: a folder made by someone else could name any server.
    The caller passes the URL (``--store``), and its password comes with it, or from ``PGPASSWORD``/``~/.pgpass``.
    """
    out = Path(out)
    if url:
        return open_store(url, namespace=name, stale_after=stale_after())
    if (out / STORE_URL_FILE).exists():
        recorded = (out / STORE_URL_FILE).read_text(errors="replace").strip()
        raise AuxLossError(f"the runs of {str(out)!r} are kept in a PostgreSQL database ({recorded!r}, from "
                           f"{STORE_URL_FILE}); pass it with --store URL (the password in the URL, PGPASSWORD or "
                           "~/.pgpass). auxloss does not connect to a URL read from a folder by itself.")
    return Store(out / STORE_FILE, stale_after=stale_after())


def _variant_params(exp: Experiment, variant: str, seed: int) -> dict[str, Any]:
    """What one run trains with (its MLflow params): the shared settings, the variant's own, its seed."""
    v = exp.variant(variant)
    config = exp.describe()
    return {"variant": v.describe() if v is not None else {"name": variant}, "seed": seed,
            **{k: config[k] for k in ("data", "model", "main") if k in config},
            "train": {k: repr(val) if callable(val) else val for k, val in exp.train_for(variant).items()}}


def _tracker(exp: Experiment, store: Store, mlflow: str | None) -> Any:
    if not mlflow:
        return None
    from auxloss.integrations.mlflow import MlflowTracker

    return MlflowTracker(mlflow, exp.name, exp.identity(), store)


def _worker_loop(exp: Experiment, out: str, device: str | None, threads: int | None,
                 progress: bool, parent: int | None = None, checkpoint_dir: str | None = None,
                 mlflow: str | None = None, url: str | None = None) -> int:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or run_threads())
    try:
        return _claim_and_train(exp, out, device, progress, parent, checkpoint_dir, mlflow, url)
    finally:
        torch.set_num_threads(previous_threads)  # when run in the caller's process (one worker)


def _claim_and_train(exp: Experiment, out: str, device: str | None, progress: bool, parent: int | None,
                     checkpoint_dir: str | None, mlflow: str | None, url: str | None) -> int:
    store = open_experiment_store(out, exp.name, url)
    tracker = _tracker(exp, store, mlflow)
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
            callbacks += (tracker.callback(variant, seed, _variant_params(exp, variant, seed)),)
        try:
            record = run_one(exp, variant, seed, out=Path(out), device=device, progress=progress,
                             callbacks=callbacks, store=store, checkpoint_dir=checkpoint_dir)
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
        remove_checkpoint(run_checkpoint_dir(exp, variant, seed, Path(out), checkpoint_dir))


def _distributed_loop(exp: Experiment, out: Path, device: str | None, checkpoint_dir: str | None = None,
                      mlflow: str | None = None, url: str | None = None) -> None:
    """Under torchrun: rank 0 claims each run and broadcasts it; every rank trains it together with DDP."""
    from auxloss.train import distributed as D

    store = open_experiment_store(out, exp.name, url) if D.rank() == 0 else None
    tracker = _tracker(exp, store, mlflow) if store is not None else None
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
        callbacks = (tracker.callback(variant, seed, _variant_params(exp, variant, seed)),) if tracker else ()
        record = run_one(exp, variant, seed, out=out, device=device, callbacks=callbacks, store=store,
                         checkpoint_dir=checkpoint_dir)
        if store is not None:
            history = record.pop("history")
            store.finish(variant, seed, record, history, worker=me)
            if tracker is not None:
                tracker.finish_run(callbacks[0].run_id, record)
            remove_checkpoint(run_checkpoint_dir(exp, variant, seed, out, checkpoint_dir))
        D.barrier()


def _pool_worker(args: tuple) -> int:
    return _worker_loop(*args)


def run_experiment(cfg: ExperimentConfig, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """``auxloss run``: the experiment a config describes, through the same runner as :func:`auxloss.compare`."""
    from auxloss.experiment.build import experiment_from_config

    return run(experiment_from_config(cfg), out, **kwargs)


def run(
    exp: Experiment,
    out: str | Path,
    *,
    workers: int = 1,
    device: str | None = None,
    force: bool = False,
    progress: bool = False,
    command: str | None = None,
    store: str | None = None,
    devices: list[str] | None = None,
    checkpoint_dir: str | Path | None = None,
    mlflow: str | None = None,
    rerun_stale: bool = False,
) -> dict[str, Any]:
    """Train every (variant, seed) not yet finished under ``out``, then write ``results.json`` and the report.

    Args:
        exp: the experiment (from :func:`auxloss.compare` or a YAML config).
        out: output folder; it holds ``results.sqlite``, ``experiment.json`` (and ``config.yaml`` for a config),
            ``runs/`` logs and weights, ``results.json`` and ``report.html``/``report.md``.
        workers: processes training runs in parallel; each run uses ``AUXLOSS_THREADS`` CPU threads (default 1)
            whatever their number, so the numbers do not depend on it. The experiment is pickled to them: its
            factories must be importable functions, not lambdas.
        force: reuse a folder that holds another experiment's results (its runs are discarded).
        store: a ``postgresql://`` URL to keep the runs in a shared database instead of ``out/results.sqlite``, so
            that workers on several machines (each with ``AUXLOSS_SHARED_STORE=1``) split one experiment.
        devices: one device per worker process (``auxloss.experiment.devices.worker_devices``): each worker is
            pinned to its own, and ``workers`` is their number.
        checkpoint_dir: a folder on shared storage or an fsspec URL (``s3://bucket/ckpt``) for the runs'
            checkpoints instead of ``out/runs/``, so that a worker on another machine resumes a dead one's run.
        mlflow: an MLflow tracking URI: every run is logged as a nested run of one parent run per experiment,
            with the verdict and the report on the parent (:mod:`auxloss.integrations.mlflow`).
        rerun_stale: train again the finished runs that other auxloss or torch versions trained (otherwise they
            are kept, with a warning).
    """
    from auxloss.train import distributed as D

    out = Path(out)
    started = time.perf_counter()
    if store:
        out.mkdir(parents=True, exist_ok=True)
        # Where the runs are, for the user and `auxloss report --store`: without the password, readable by the
        # owner only (the host, user and database name are still worth keeping private).
        write_atomic(out / STORE_URL_FILE, without_password(store) + "\n", mode=0o600)
    tracker = None
    if D.init_from_env():
        # Under torchrun: only rank 0 touches the store, the logs and the report.
        if D.rank() == 0:
            db = _prepare_store(exp, out, force, store)
            tracker = _start_tracking(exp, db, out, mlflow, command, store, checkpoint_dir)
        D.barrier()
        _distributed_loop(exp, out, device, checkpoint_dir, mlflow, store)
        D.barrier()
        if D.rank() != 0:
            return {}
        return _finish(exp, out, open_experiment_store(out, exp.name, store), command, started, tracker)
    local = _Local(exp, out, workers, device, force, progress, command, store, rerun_stale, started, devices,
                   checkpoint_dir, mlflow)
    if os.environ.get("AUXLOSS_SHARED_STORE") == "1":
        return _run_local(local)
    with _single_command(out):
        return _run_local(local)


@dataclasses.dataclass(frozen=True)
class _Local:
    """One `run` call on this machine: what its steps below share."""

    exp: Experiment
    out: Path
    workers: int
    device: str | None
    force: bool
    progress: bool
    command: str | None
    store: str | None
    rerun_stale: bool
    started: float
    devices: list[str] | None
    checkpoint_dir: str | Path | None
    mlflow: str | None


@contextlib.contextmanager
def _single_command(out: Path) -> Iterator[None]:
    """One `auxloss run` per output folder at a time (unless AUXLOSS_SHARED_STORE=1): a second one would reclaim
    the first one's runs as interrupted and train them twice, writing their epochs twice."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no POSIX locks (Windows)
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".run.lock", "a")  # noqa: SIM115 - held open by the `with` below, for the whole run
    except OSError as exc:
        raise AuxLossError(f"cannot use the output folder {str(out)!r}: {exc.strerror or exc}. Choose a writable "
                           "--out folder.") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise AuxLossError(f"another `auxloss run` is working on {str(out)!r}; wait for it to finish (then run "
                               "again to pick up anything left), use another --out folder, or start every process "
                               "with AUXLOSS_SHARED_STORE=1 to share the runs between them.") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_local(job: _Local) -> dict[str, Any]:
    exp, out = job.exp, job.out
    # Nothing claims the folder before the first run has started: a config error met while building the first
    # run (an unknown dataset, a wrong layer name) removes what this call created, so the corrected config needs
    # no --force.
    fresh = not job.store and not (out / STORE_FILE).exists() and not (out / "config.yaml").exists()
    if fresh:
        _preflight(exp)
    db = _prepare_store(exp, out, job.force, job.store)
    _check_versions(db, job.rerun_stale)
    try:
        return _train_all(job, db)
    except AuxLossError:
        if fresh and not db.runs("done"):
            for name in (STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm", "config.yaml", EXPERIMENT_FILE):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "runs", ignore_errors=True)
        raise


def _preflight(exp: Experiment) -> None:
    """Build every variant once (seed 0, on CPU, no logs) before a new folder is claimed: an error found while
    building (a dataset, a model or a layer name) stops here, with nothing written."""
    import random

    import numpy as np

    from auxloss.experiment.assemble import build_run

    state = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=[]):  # the caller's random streams are left as they were
        for name in exp.variant_names:
            build_run(exp, name, 0, device="cpu")
    random.setstate(state[0])
    np.random.set_state(state[1])


def _check_versions(store: Store, rerun: bool) -> None:
    """Finished runs trained by other auxloss/torch versions: kept with a warning, or (``rerun``) redone."""
    import sys

    now = current_versions()
    stale = [(r["variant"], r["seed"], (r["result"] or {}).get("versions")) for r in store.runs("done")
             if (r["result"] or {}).get("versions") != now]
    if not stale:
        return
    if rerun:
        store.reset_runs([(v, s) for v, s, _ in stale])
        return
    seen = sorted({json.dumps(v, sort_keys=True) if v else "unrecorded versions" for _, _, v in stale})
    print(f"auxloss: warning: {len(stale)} finished run(s) under this folder were trained with {', '.join(seen)}, "
          f"not {json.dumps(now, sort_keys=True)}; they are kept as they are. Pass --rerun-stale to train them "
          "again with this version.", file=sys.stderr, flush=True)


def _train_all(job: _Local, db: Store) -> dict[str, Any]:
    exp, out = job.exp, job.out
    tracker = _start_tracking(exp, db, out, job.mlflow, job.command, job.store, job.checkpoint_dir)
    status = db.status()
    todo = status.get("pending", 0)
    if os.environ.get("AUXLOSS_SHARED_STORE") == "1":
        todo += status.get("running", 0)  # other workers' runs: wait, to take over any whose worker dies
    workers = len(job.devices) if job.devices else job.workers
    workers = max(1, min(workers, todo)) if todo else 1
    pinned = list(job.devices[:workers]) if job.devices else [job.device] * workers
    if todo and workers == 1:
        _worker_loop(exp, str(out), pinned[0], None, job.progress, None, job.checkpoint_dir, job.mlflow, job.store)
    elif todo:
        _check_picklable(exp)
        threads = run_threads()  # the same as with one worker, so that the numbers are the same
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.map(_pool_worker, [(exp, str(out), d, threads, False, os.getpid(), job.checkpoint_dir, job.mlflow,
                                     job.store) for d in pinned])
    return _finish(exp, out, db, job.command, job.started, tracker)


def _check_picklable(exp: Experiment) -> None:
    import pickle

    try:
        pickle.dumps(exp)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise AuxLossError(
            f"workers > 1 sends the experiment to other processes, but it cannot be pickled ({exc}). Define the "
            "model and data factories as module-level functions (not lambdas or local functions), or use workers=1."
        ) from None


def _start_tracking(exp: Experiment, db: Store, out: Path, mlflow: str | None, command: str | None,
                    store: str | None, checkpoint_dir: str | None) -> Any:
    tracker = _tracker(exp, db, mlflow)
    if tracker is not None:
        tracker.start_experiment(exp.describe(), out, command=command, store=store, checkpoint_dir=checkpoint_dir)
    return tracker


def _finish(exp: Experiment, out: Path, store: Store, command: str | None, started: float,
            tracker: Any = None) -> dict[str, Any]:
    from auxloss.experiment.report import build_report

    # Several processes may share `out` (AUXLOSS_SHARED_STORE): each aggregates and writes under a lock, so the
    # last one to finish writes the most complete results, and results.json is replaced whole, never torn.
    with _out_lock(out):
        results = aggregate(exp.summary(), store, command=command, seconds=time.perf_counter() - started)
        write_atomic(out / RESULTS_FILE, json.dumps(results, indent=2))
        build_report(out, results, *load_histories(store, exp.seeds))
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


def write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file.

    ``mode`` sets the file's permissions before any byte is written (``0o600``: the owner's eyes only)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if mode is not None:
            tmp.unlink(missing_ok=True)  # os.open's mode applies only to a file it creates
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            os.chmod(tmp, mode)  # the umask may have removed bits; it can only have removed them
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AuxLossError(f"cannot write {str(path)!r}: {exc.strerror or exc}. Free some disk space or choose a "
                           "writable output folder, then run the same command again (finished runs are kept).") from exc


def _prepare_store(exp: Experiment, out: Path, force: bool, url: str | None = None) -> Store:
    store_path = out / STORE_FILE
    fingerprint = exp.identity()
    shared_db = bool(url)
    if store_path.exists() or shared_db:
        store = open_experiment_store(out, exp.name, url)
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
    summary = exp.summary()  # validates the main metric before anything is written
    store = open_experiment_store(out, exp.name, url)
    store.set_meta("config_hash", fingerprint)
    store.set_meta("name", exp.name)
    store.set_meta("summary", summary)
    if exp.config is not None:
        import yaml

        write_atomic(out / "config.yaml", yaml.safe_dump(dict(exp.config), sort_keys=False))
    write_atomic(out / EXPERIMENT_FILE, json.dumps(summary, indent=2, default=repr))
    runs = [(v, s) for s in range(exp.seeds) for v in exp.variant_names]
    store.add_runs(runs)
    # This call is the only one working on `out` unless the user started others: any run marked running is
    # an interrupted one, so it is redone. (Concurrent workers on one store use heartbeats instead.)
    if os.environ.get("AUXLOSS_SHARED_STORE") != "1":
        store.reset_unfinished()

    return store


def _asked(runs: list[dict[str, Any]], seeds: int | None) -> list[dict[str, Any]]:
    """The runs of the seeds asked for (``0..seeds-1``): a folder may hold more seeds from an earlier command, and
    a report on ``--seeds 1`` must not mix them in."""
    return runs if seeds is None else [r for r in runs if r["seed"] < seeds]


def load_histories(store: Store, seeds: int | None = None
                   ) -> tuple[dict[str, dict[int, list[dict]]], dict[str, dict[int, int]]]:
    histories: dict[str, dict[int, list[dict]]] = {}
    best: dict[str, dict[int, int]] = {}
    for run in _asked(store.runs("done"), seeds):
        histories.setdefault(run["variant"], {})[run["seed"]] = run["history"]
        best.setdefault(run["variant"], {})[run["seed"]] = run["result"]["best_epoch"]
    return histories, best


def aggregate(summary: dict[str, Any], store: Store, *, command: str | None = None,
              seconds: float | None = None) -> dict[str, Any]:
    """``results.json``: per-variant means with CIs, and paired comparisons with the baseline.

    ``summary`` is :meth:`Experiment.summary` (kept in the store, so a report needs no code of the user's).
    """
    if isinstance(summary, ExperimentConfig):  # older callers pass the config
        summary = as_experiment(summary).summary()
    done = _asked(store.runs("done"), summary.get("seeds"))
    by_variant: dict[str, dict[int, float]] = {}
    extra: dict[str, dict[int, dict]] = {}
    for run_ in done:
        by_variant.setdefault(run_["variant"], {})[run_["seed"]] = float(run_["result"]["main"])
        extra.setdefault(run_["variant"], {})[run_["seed"]] = run_["result"]
    metric, higher, split = summary["metric"], summary["higher_is_better"], summary["compare_on"]
    names = [v["name"] for v in summary["variants"]]
    variants = []
    for spec in summary["variants"]:
        name = spec["name"]
        values = by_variant.get(name, {})
        if not values:
            continue
        stat = stats.summarize(values)
        aux_final = {}
        for task in spec["aux_tasks"]:
            vals = [r["best"].get(f"{split}/metric/{task}") for r in extra[name].values()]
            vals = [v for v in vals if v is not None]
            if vals:
                aux_final[task] = sum(vals) / len(vals)
        variants.append({
            "name": name,
            "seeds": stat["seeds"],
            "main": [values[s] for s in stat["seeds"]],
            "mean": stat["mean"],
            "std": stat["std"],
            "ci95": stat["ci95"],
            "aux_tasks": list(spec["aux_tasks"]),
            "aux_metrics": aux_final,
            "best_epochs": [extra[name][s]["best_epoch"] for s in stat["seeds"]],
            "seconds": sum(extra[name][s]["seconds"] for s in stat["seeds"]),
            "weights": {str(s): extra[name][s]["weights"] for s in stat["seeds"] if "weights" in extra[name][s]},
        })
    comparisons = []
    baseline = by_variant.get(BASELINE, {})
    others = {v: by_variant[v] for v in names[1:] if v in by_variant}
    if baseline and others:
        comparisons = [c.to_dict() for c in stats.compare(baseline, others, higher_is_better=higher,
                                                          alpha=summary["alpha"])]
    status: dict[str, int] = {}
    for run_ in _asked(store.runs(None), summary.get("seeds")):
        if run_["variant"] in names:
            status[run_["status"]] = status.get(run_["status"], 0) + 1
    return {
        "name": summary["name"],
        "main_task": summary.get("main_task", "main"),
        "metric": metric,
        "higher_is_better": higher,
        "baseline": BASELINE,
        "split": split,
        "variants": variants,
        "comparisons": comparisons,
        "runs": {"done": status.get("done", 0), "failed": status.get("failed", 0),
                 "pending": status.get("pending", 0) + status.get("running", 0)},
        # The command may hold a database URL: recorded without its password (results.json, the report).
        "config": {**summary["config"], **({"command": redact_command(command)} if command else {})},
        "timing": {"total_seconds": seconds},
    }
