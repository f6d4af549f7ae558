"""Run an experiment: the baseline and every variant on every seed, stored, compared, reported.

Runs are independent jobs in the SQLite store. Worker processes (``workers``) claim them one at a time, so a
second command on the same ``--out`` (or a crashed one restarted) never trains a finished run twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from auxloss._redact import without_password
from auxloss.errors import AuxLossError
from auxloss.experiment.config import ExperimentConfig, config_hash
from auxloss.experiment.results import aggregate, load_histories
from auxloss.experiment.spec import Experiment
from auxloss.experiment.storage import store_location
from auxloss.experiment.store import Store
from auxloss.experiment.worker import (
    STORE_FILE,
    STORE_URL_FILE,
    as_experiment,
    current_versions,
    distributed_loop,
    make_tracker,
    open_experiment_store,
    pool_worker,
    run_checkpoint_dir,
    run_one,
    run_threads,
    worker_loop,
)

__all__ = [
    "EXPERIMENT_FILE", "RESULTS_FILE", "STORE_FILE", "STORE_URL_FILE", "aggregate", "as_experiment", "config_hash",
    "current_versions", "load_histories", "open_experiment_store", "run", "run_checkpoint_dir", "run_experiment",
    "run_one", "write_atomic",
]

RESULTS_FILE = "results.json"
#: Held by every `auxloss run` on the folder while it works (see :func:`_single_command`).
LOCK_FILE = ".run.lock"
EXPERIMENT_FILE = "experiment.json"


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

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise AuxLossError(f"workers must be a positive integer (processes training runs in parallel), got "
                           f"{workers!r}.")
    out = Path(out)
    started = time.perf_counter()
    if store:
        # Checked (and its scheme normalised) before anything is written: a string that is no store, such as a
        # libpq "host=... password=..." string, must never become a file named after its password.
        where = store_location(store)
        store = where if isinstance(where, str) else str(where)
        out.mkdir(parents=True, exist_ok=True)
        # Where the runs are, for the user and `auxloss report --store`: without the password, readable by the
        # owner only (the host, user and database name are still worth keeping private).
        write_atomic(out / STORE_URL_FILE, without_password(store) + "\n", mode=0o600)
    tracker = None
    shared = os.environ.get("AUXLOSS_SHARED_STORE") == "1"
    if D.init_from_env():
        # Under torchrun: only rank 0 touches the store, the logs and the report, and it holds the folder's lock
        # for the whole job, as a plain command does (a second command on the folder would reset its runs). If it
        # stops with an error, torchrun ends the other ranks waiting at the barrier.
        with contextlib.ExitStack() as held:
            if D.rank() == 0:
                held.enter_context(_single_command(out, shared=shared))
                if force or _is_fresh(out, store):
                    _preflight(exp)  # as a plain command: a broken config keeps the old results, claims nothing
                db = _prepare_store(exp, out, force, store)
                tracker = _start_tracking(exp, db, out, mlflow, command, store, checkpoint_dir)
            D.barrier()
            distributed_loop(exp, out, device, checkpoint_dir, mlflow, store)
            D.barrier()
            if D.rank() != 0:
                return {}
            return _finish(exp, out, open_experiment_store(out, exp.name, store), command, started, tracker)
    local = _Local(exp, out, workers, device, force, progress, command, store, rerun_stale, started, devices,
                   checkpoint_dir, mlflow, shared)
    with _single_command(out, shared=shared):
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
    shared: bool = False  # AUXLOSS_SHARED_STORE=1: other workers may be using this folder's store right now


@contextlib.contextmanager
def _single_command(out: Path, shared: bool = False) -> Iterator[None]:
    """One `auxloss run` per output folder at a time, or any number that all set AUXLOSS_SHARED_STORE=1.

    A plain command holds ``.run.lock`` exclusively, shared-store workers hold it shared: a plain command would
    reclaim the others' runs as interrupted and train them twice (writing their epochs twice), and its cleanup
    after an early error could delete the store under them. So the two modes exclude each other, whichever
    starts first."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no POSIX locks (Windows)
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_FILE, "a")  # noqa: SIM115 - held open by the `with` below, for the whole run
    except OSError as exc:
        raise AuxLossError(f"cannot use the output folder {str(out)!r}: {exc.strerror or exc}. Choose a writable "
                           "--out folder.") from exc
    with handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            raise AuxLossError(_busy_message(out, handle, shared)) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _busy_message(out: Path, handle: Any, shared: bool) -> str:
    """Why ``.run.lock`` is taken, from which lock the others hold: a shared one is held by shared-store workers."""
    import fcntl

    if shared:
        return (f"a plain `auxloss run` (without AUXLOSS_SHARED_STORE=1) is working on {str(out)!r}, so this "
                "shared-store worker may not join it: the plain command would reset this worker's runs and train "
                "them a second time. Wait for it to finish, or use another --out folder; start every process on one "
                "folder with AUXLOSS_SHARED_STORE=1, or none.")
    try:  # a shared lock is granted only while no one holds it exclusively
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)
        others_shared = True
    except OSError:
        others_shared = False
    if others_shared:
        return (f"`auxloss run` workers started with AUXLOSS_SHARED_STORE=1 are working on {str(out)!r}, and this "
                "command was started without it: it would reset their runs and train them a second time. Start it "
                "with AUXLOSS_SHARED_STORE=1 to share the runs with them, wait for them to finish, or use another "
                "--out folder.")
    return (f"another `auxloss run` is working on {str(out)!r}; wait for it to finish (then run again to pick up "
            "anything left), use another --out folder, or start every process with AUXLOSS_SHARED_STORE=1 to "
            "share the runs between them.")


def _run_local(job: _Local) -> dict[str, Any]:
    exp, out = job.exp, job.out
    # Nothing claims the folder before the first run has started: a config error met while building the first
    # run (an unknown dataset, a wrong layer name) removes what this call created, so the corrected config needs
    # no --force. With --force the same checks come before the old results are discarded: a broken config keeps
    # them.
    fresh = _is_fresh(out, job.store)
    if fresh or job.force:
        _preflight(exp)
    db = _prepare_store(exp, out, job.force, job.store)
    _check_versions(db, job.rerun_stale)
    try:
        return _train_all(job, db)
    except AuxLossError:
        # A shared-store worker leaves the store alone: another worker that found the same fresh folder may be
        # training into it, and none of its runs may be done yet.
        if fresh and not job.shared and not db.runs("done"):
            for name in (STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm", "config.yaml", EXPERIMENT_FILE):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "runs", ignore_errors=True)
        raise


def _is_fresh(out: Path, store: str | None) -> bool:
    """Nothing of an experiment is in ``out`` yet (a database store lives elsewhere, so it is never fresh here)."""
    return not store and not (out / STORE_FILE).exists() and not (out / "config.yaml").exists()


def _preflight(exp: Experiment) -> None:
    """Build every variant once (seed 0, on CPU, no logs) before a new folder is claimed: an error found while
    building (a dataset, a model or a layer name), or an option the engine cannot honour, stops here, with nothing
    written."""
    import random

    import numpy as np

    from auxloss.experiment.assemble import build_run

    state = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=[]):  # the caller's random streams are left as they were
        for name in exp.variant_names:
            exp.engine.check(build_run(exp, name, 0, device="cpu"))
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
        worker_loop(exp, str(out), pinned[0], None, job.progress, None, job.checkpoint_dir, job.mlflow, job.store)
    elif todo:
        _check_picklable(exp)
        threads = run_threads()  # the same as with one worker, so that the numbers are the same
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.map(pool_worker, [(exp, str(out), d, threads, False, os.getpid(), job.checkpoint_dir, job.mlflow,
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
    tracker = make_tracker(exp, db, mlflow)
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
    # Validates the main metric before anything is written, and before --force discards old results below.
    summary = exp.summary()
    shared_db = bool(url)
    if store_path.exists() or shared_db:
        store = open_experiment_store(out, exp.name, url)
        previous = store.get_meta("config_hash")
        if previous is not None and previous != fingerprint:
            if shared_db and not _folder_wrote(out, previous):
                # The runs came from another --out folder: they are someone's experiment, not this folder's old
                # results, so --force (which discards a folder's own old results) must not clear them.
                raise AuxLossError(
                    f"the shared store {store.location!r} holds experiment {exp.name!r} with a different config "
                    f"(config {previous}, this one {fingerprint}), written from another --out folder; it is left "
                    "untouched, --force included. Rename this experiment (its config's name:) or use another "
                    "database.")
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
            # And their results and report, which would describe the discarded runs until the new ones finish.
            for name in (RESULTS_FILE, "report.html", "report.md"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "figures", ignore_errors=True)
    store = open_experiment_store(out, exp.name, url)
    store.set_meta("config_hash", fingerprint)
    store.set_meta("name", exp.name)
    store.set_meta("summary", summary)
    if exp.config is not None:
        import yaml

        write_atomic(out / "config.yaml", yaml.safe_dump(dict(exp.config), sort_keys=False))
    # The fingerprint too: it tells later that this folder wrote the runs of that config (see _folder_wrote).
    write_atomic(out / EXPERIMENT_FILE, json.dumps({**summary, "config_hash": fingerprint}, indent=2, default=repr))
    runs = [(v, s) for s in range(exp.seeds) for v in exp.variant_names]
    store.add_runs(runs)
    # This call is the only one working on `out` unless the user started others: any run marked running is
    # an interrupted one, so it is redone. (Concurrent workers on one store use heartbeats instead.)
    if os.environ.get("AUXLOSS_SHARED_STORE") != "1":
        store.reset_unfinished()

    return store


def _folder_wrote(out: Path, fingerprint: str) -> bool:
    """Whether ``out`` itself last ran the experiment ``fingerprint`` (its experiment.json records it)."""
    try:
        recorded = json.loads((out / EXPERIMENT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and recorded.get("config_hash") == fingerprint
