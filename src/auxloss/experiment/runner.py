"""Run an experiment: the baseline and every variant on every seed, stored, compared, reported.

Runs are independent jobs in the SQLite store. Worker processes (``workers``) claim them one at a time, so a
second command on the same ``--out`` (or a crashed one restarted) never trains a finished run twice.
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
from auxloss.experiment.redact import redact_command, without_password
from auxloss.experiment.store import Store, open_store, worker_id
from auxloss.train.callbacks import Callback

__all__ = ["aggregate", "run_experiment", "run_one"]

RESULTS_FILE = "results.json"
STORE_FILE = "results.sqlite"


def config_hash(cfg: ExperimentConfig) -> str:
    """A fingerprint of everything that changes the runs (not the number of seeds, which only adds runs)."""
    data = cfg.model_dump(mode="json")
    data.pop("seeds", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_one(cfg: ExperimentConfig, variant: str, seed: int, *, out: Path | None = None,
            device: str | None = None, progress: bool = False, callbacks: tuple = ()) -> dict[str, Any]:
    """Train one (variant, seed) and return its result record (with ``history``)."""
    from auxloss.experiment.build import build_run

    run_dir = out / "runs" / variant / f"seed{seed}" if out is not None else None
    built = build_run(cfg, variant, seed, device=device, log_dir=str(run_dir) if run_dir else None,
                      progress=progress)
    built.trainer.callbacks.extend(callbacks)
    # An interrupted run resumes from its last checkpoint (bit-identically on CPU) instead of starting over.
    built.trainer.checkpoint_dir = run_dir / "checkpoint" if run_dir is not None else None
    fit = built.trainer.fit(built.model, built.objective, built.loaders["train"], built.loaders["val"],
                            built.loaders["test"])
    split = cfg.train.compare_on
    return {
        "variant": variant,
        "seed": seed,
        "main": fit.main_metric(split),
        "best_epoch": fit.best_epoch,
        "best": fit.best,
        "seconds": fit.seconds,
        "stopped_early": fit.stopped_early,
        "skipped_steps": fit.skipped_steps,
        # What else decides the numbers: the code's versions (a rerun with other ones is flagged, see
        # _check_versions) and the CPU threads torch used (fixed per run, whatever --workers is).
        "versions": current_versions(),
        "threads": torch.get_num_threads(),
        "history": fit.history,
    }


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


def _worker_loop(cfg_json: dict[str, Any], out: str, device: str | None, threads: int | None,
                 progress: bool, parent: int | None = None, url: str | None = None) -> int:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or run_threads())
    try:
        return _claim_and_train(cfg_json, out, device, progress, parent, url)
    finally:
        torch.set_num_threads(previous_threads)  # when run in the caller's process (one worker)


def _claim_and_train(cfg_json: dict[str, Any], out: str, device: str | None, progress: bool, parent: int | None,
                     url: str | None) -> int:
    cfg = ExperimentConfig.model_validate(cfg_json)
    store = open_experiment_store(out, cfg.name, url)
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
        try:
            record = run_one(cfg, variant, seed, out=Path(out), device=device, progress=progress,
                             callbacks=(heartbeat,))
        except _Stop:
            continue
        except AuxLossError as exc:
            store.fail(variant, seed, str(exc))
            raise
        except Exception as exc:
            store.fail(variant, seed, "".join(traceback.format_exception(exc)))
            raise
        history = record.pop("history")
        if store.finish(variant, seed, record, history, worker=me):
            done += 1
        # The result is stored: the run's checkpoints are no longer needed.
        shutil.rmtree(Path(out) / "runs" / variant / f"seed{seed}" / "checkpoint", ignore_errors=True)


def _distributed_loop(cfg: ExperimentConfig, out: Path, device: str | None, url: str | None = None) -> None:
    """Under torchrun: rank 0 claims each run and broadcasts it; every rank trains it together with DDP."""
    from auxloss.train import distributed as D

    store = open_experiment_store(out, cfg.name, url) if D.rank() == 0 else None
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
        record = run_one(cfg, variant, seed, out=out, device=device)
        if store is not None:
            history = record.pop("history")
            store.finish(variant, seed, record, history, worker=me)
            shutil.rmtree(out / "runs" / variant / f"seed{seed}" / "checkpoint", ignore_errors=True)
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
    rerun_stale: bool = False,
) -> dict[str, Any]:
    """Train every (variant, seed) not yet finished under ``out``, then write ``results.json`` and the report.

    Args:
        cfg: the validated config.
        out: output folder; it holds ``results.sqlite``, ``config.yaml`` (resolved), ``runs/`` logs,
            ``results.json`` and ``report.html``/``report.md``.
        workers: processes training runs in parallel; each run uses ``AUXLOSS_THREADS`` CPU threads (default 1)
            whatever their number, so the numbers do not depend on it.
        force: reuse a folder that holds another experiment's results (its runs are discarded).
        store: a ``postgresql://`` URL to keep the runs in a shared database instead of ``out/results.sqlite``, so
            that workers on several machines (each with ``AUXLOSS_SHARED_STORE=1``) split one experiment.
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
    if D.init_from_env():
        # Under torchrun: only rank 0 touches the store, the logs and the report.
        if D.rank() == 0:
            _prepare_store(cfg, out, force, store)
        D.barrier()
        _distributed_loop(cfg, out, device, store)
        D.barrier()
        if D.rank() != 0:
            return {}
        return _finish(cfg, out, open_experiment_store(out, cfg.name, store), command, started)
    if os.environ.get("AUXLOSS_SHARED_STORE") == "1":
        return _run_local(cfg, out, workers, device, force, progress, command, store, rerun_stale, started)
    with _single_command(out):
        return _run_local(cfg, out, workers, device, force, progress, command, store, rerun_stale, started)


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


def _run_local(cfg: ExperimentConfig, out: Path, workers: int, device: str | None, force: bool, progress: bool,
               command: str | None, store: str | None, rerun_stale: bool, started: float) -> dict[str, Any]:
    # Nothing claims the folder before the first run has started: a config error met while building the first
    # run (an unknown dataset, a wrong layer name) removes what this call created, so the corrected config needs
    # no --force.
    fresh = not store and not (out / STORE_FILE).exists() and not (out / "config.yaml").exists()
    if fresh:
        _preflight(cfg)
    db = _prepare_store(cfg, out, force, store)
    _check_versions(db, rerun_stale)
    try:
        return _train_all(cfg, out, workers, device, progress, command, store, db, started)
    except AuxLossError:
        if fresh and not db.runs("done"):
            for name in (STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm", "config.yaml"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "runs", ignore_errors=True)
        raise


def _preflight(cfg: ExperimentConfig) -> None:
    """Build every variant once (seed 0, on CPU, no logs) before a new folder is claimed: a config error found
    while building (a dataset, a model or a layer name) stops here, with nothing written."""
    import random

    import numpy as np

    from auxloss.experiment.build import build_run

    state = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=[]):  # the caller's random streams are left as they were
        for name in cfg.variant_names:
            build_run(cfg, name, 0, device="cpu")
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


def _train_all(cfg: ExperimentConfig, out: Path, workers: int, device: str | None, progress: bool,
               command: str | None, store: str | None, db: Store, started: float) -> dict[str, Any]:
    status = db.status()
    todo = status.get("pending", 0)
    if os.environ.get("AUXLOSS_SHARED_STORE") == "1":
        todo += status.get("running", 0)  # other workers' runs: wait, to take over any whose worker dies
    workers = max(1, min(workers, todo)) if todo else 1
    cfg_json = cfg.model_dump(mode="json")
    if todo and workers == 1:
        _worker_loop(cfg_json, str(out), device, None, progress, None, store)
    elif todo:
        threads = run_threads()  # the same as with one worker, so that the numbers are the same
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.map(_pool_worker, [(cfg_json, str(out), device, threads, False, os.getpid(), store)] * workers)
    return _finish(cfg, out, db, command, started)


def _finish(cfg: ExperimentConfig, out: Path, store: Store, command: str | None, started: float) -> dict[str, Any]:
    from auxloss.experiment.report import build_report

    # Several processes may share `out` (AUXLOSS_SHARED_STORE): each aggregates and writes under a lock, so the
    # last one to finish writes the most complete results, and results.json is replaced whole, never torn.
    with _out_lock(out):
        results = aggregate(cfg, store, command=command, seconds=time.perf_counter() - started)
        write_atomic(out / RESULTS_FILE, json.dumps(results, indent=2))
        build_report(out, results, *load_histories(store, cfg.seeds))
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


def _prepare_store(cfg: ExperimentConfig, out: Path, force: bool, url: str | None = None) -> Store:
    import yaml

    store_path = out / STORE_FILE
    fingerprint = config_hash(cfg)
    shared_db = bool(url)
    if store_path.exists() or shared_db:
        store = open_experiment_store(out, cfg.name, url)
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
    store = open_experiment_store(out, cfg.name, url)
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


def aggregate(cfg: ExperimentConfig, store: Store, *, command: str | None = None,
              seconds: float | None = None) -> dict[str, Any]:
    """``results.json``: per-variant means with CIs, and paired comparisons with the baseline (on the config's
    seeds only, whatever else the store holds)."""
    done = _asked(store.runs("done"), cfg.seeds)
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
    status: dict[str, int] = {}
    for run in _asked(store.runs(None), cfg.seeds):
        if run["variant"] in cfg.variant_names:
            status[run["status"]] = status.get(run["status"], 0) + 1
    return {
        "name": cfg.name,
        "metric": metric,
        "higher_is_better": higher,
        "baseline": "baseline",
        "split": cfg.train.compare_on,
        "variants": variants,
        "comparisons": comparisons,
        "runs": {"done": status.get("done", 0), "failed": status.get("failed", 0),
                 "pending": status.get("pending", 0) + status.get("running", 0)},
        # The command may hold a database URL: recorded without its password (results.json, the report).
        "config": {**cfg.model_dump(mode="json"), **({"command": redact_command(command)} if command else {})},
        "timing": {"total_seconds": seconds},
    }
