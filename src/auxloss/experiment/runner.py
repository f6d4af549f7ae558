"""Run an experiment: the baseline and every variant on every seed, stored, compared, reported.

Runs are independent jobs in the SQLite store. Worker processes (``workers``) claim them one at a time, so a
second command on the same ``--out`` (or a crashed one restarted) never trains a finished run twice.
"""

from __future__ import annotations

import contextlib
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
from auxloss.experiment.spec import BASELINE, Experiment
from auxloss.experiment.store import Store, open_store, worker_id
from auxloss.train.callbacks import Callback

__all__ = ["aggregate", "config_hash", "run", "run_experiment", "run_one"]

RESULTS_FILE = "results.json"
EXPERIMENT_FILE = "experiment.json"
STORE_FILE = "results.sqlite"


def run_one(exp: Experiment | ExperimentConfig, variant: str, seed: int, *, out: Path | None = None,
            device: str | None = None, progress: bool = False, callbacks: tuple = (),
            store: Store | None = None) -> dict[str, Any]:
    """Train one (variant, seed) and return its result record (with ``history``).

    With a ``store``, the run's pairing is checked against the seed's first run (initial trunk, first batch).
    """
    from auxloss.experiment.assemble import PairingCheck, build_run

    exp = as_experiment(exp)
    run_dir = out / "runs" / variant / f"seed{seed}" if out is not None else None
    built = build_run(exp, variant, seed, device=device, log_dir=str(run_dir) if run_dir else None,
                      progress=progress)
    assert exp.main is not None
    hooks: list[Callback] = []
    if store is not None:
        keys = (exp.input_key,) + ((exp.main.target,) if isinstance(exp.main.target, str) else ())
        hooks.append(PairingCheck(store.setdefault_meta, seed, built.init_hash, keys, tuple(exp.batch_keys)))
    keeper = _Keeper(run_dir / "weights", exp.keep) if run_dir is not None and exp.keep != "none" else None
    if keeper is not None:
        hooks.append(keeper)
    hooks.extend(callbacks)
    # The experiment's engine trains the run (auxloss's Trainer by default; an interrupted run then resumes from
    # its last checkpoint, bit-identically on CPU, instead of starting over).
    fit = exp.engine.fit(built, callbacks=hooks, checkpoint_dir=run_dir / "checkpoint" if run_dir is not None
                         else None)
    record = {
        "variant": variant,
        "seed": seed,
        "main": _main_value(fit.best, exp.compare_on, exp.main.name),
        "best_epoch": fit.best_epoch,
        "best": fit.best,
        "seconds": fit.seconds,
        "stopped_early": fit.stopped_early,
        "skipped_steps": fit.skipped_steps,
        "init_hash": built.init_hash,
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


def _worker_loop(exp: Experiment, out: str, device: str | None, threads: int | None,
                 progress: bool, parent: int | None = None) -> int:
    if threads:
        torch.set_num_threads(threads)
    store = open_experiment_store(out, exp.name)
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
            record = run_one(exp, variant, seed, out=Path(out), device=device, progress=progress,
                             callbacks=(heartbeat,), store=store)
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


def _distributed_loop(exp: Experiment, out: Path, device: str | None) -> None:
    """Under torchrun: rank 0 claims each run and broadcasts it; every rank trains it together with DDP."""
    from auxloss.train import distributed as D

    store = open_experiment_store(out, exp.name) if D.rank() == 0 else None
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
        record = run_one(exp, variant, seed, out=out, device=device, store=store)
        if store is not None:
            history = record.pop("history")
            store.finish(variant, seed, record, history, worker=me)
            shutil.rmtree(out / "runs" / variant / f"seed{seed}" / "checkpoint", ignore_errors=True)
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
) -> dict[str, Any]:
    """Train every (variant, seed) not yet finished under ``out``, then write ``results.json`` and the report.

    Args:
        exp: the experiment (from :func:`auxloss.compare` or a YAML config).
        out: output folder; it holds ``results.sqlite``, ``experiment.json`` (and ``config.yaml`` for a config),
            ``runs/`` logs and weights, ``results.json`` and ``report.html``/``report.md``.
        workers: processes training runs in parallel (each with ``torch`` limited to share the cores). The
            experiment is pickled to them: its factories must be importable functions, not lambdas.
        force: reuse a folder that holds another experiment's results (its runs are discarded).
        store: a ``postgresql://`` URL to keep the runs in a shared database instead of ``out/results.sqlite``, so
            that workers on several machines (each with ``AUXLOSS_SHARED_STORE=1``) split one experiment.
        devices: one device per worker process (``auxloss.experiment.devices.worker_devices``): each worker is
            pinned to its own, and ``workers`` is their number.
    """
    from auxloss.train import distributed as D

    out = Path(out)
    started = time.perf_counter()
    if store:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / STORE_URL_FILE, store + "\n")
    if D.init_from_env():
        # Under torchrun: only rank 0 touches the store, the logs and the report.
        if D.rank() == 0:
            _prepare_store(exp, out, force)
        D.barrier()
        _distributed_loop(exp, out, device)
        D.barrier()
        if D.rank() != 0:
            return {}
        return _finish(exp, out, open_experiment_store(out, exp.name), command, started)
    db = _prepare_store(exp, out, force)
    status = db.status()
    todo = status.get("pending", 0)
    if os.environ.get("AUXLOSS_SHARED_STORE") == "1":
        todo += status.get("running", 0)  # other workers' runs: wait, to take over any whose worker dies
    if devices:
        workers = len(devices)
    workers = max(1, min(workers, todo)) if todo else 1
    pinned = list(devices[:workers]) if devices else [device] * workers
    if todo and workers == 1:
        _worker_loop(exp, str(out), pinned[0], None, progress)
    elif todo:
        _check_picklable(exp)
        # Each process gets an equal share of the cores: oversubscribed torch threads spin and slow everyone.
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            pool.map(_pool_worker, [(exp, str(out), d, threads, False, os.getpid()) for d in pinned])
    return _finish(exp, out, db, command, started)


def _check_picklable(exp: Experiment) -> None:
    import pickle

    try:
        pickle.dumps(exp)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise AuxLossError(
            f"workers > 1 sends the experiment to other processes, but it cannot be pickled ({exc}). Define the "
            "model and data factories as module-level functions (not lambdas or local functions), or use workers=1."
        ) from None


def _finish(exp: Experiment, out: Path, store: Store, command: str | None, started: float) -> dict[str, Any]:
    from auxloss.experiment.report import build_report

    # Several processes may share `out` (AUXLOSS_SHARED_STORE): each aggregates and writes under a lock, so the
    # last one to finish writes the most complete results, and results.json is replaced whole, never torn.
    with _out_lock(out):
        results = aggregate(exp.summary(), store, command=command, seconds=time.perf_counter() - started)
        write_atomic(out / RESULTS_FILE, json.dumps(results, indent=2))
        build_report(out, results, *load_histories(store))
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


def _prepare_store(exp: Experiment, out: Path, force: bool) -> Store:
    store_path = out / STORE_FILE
    fingerprint = exp.identity()
    shared_db = (out / STORE_URL_FILE).exists()
    if store_path.exists() or shared_db:
        store = open_experiment_store(out, exp.name)
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
    store = open_experiment_store(out, exp.name)
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


def load_histories(store: Store) -> tuple[dict[str, dict[int, list[dict]]], dict[str, dict[int, int]]]:
    histories: dict[str, dict[int, list[dict]]] = {}
    best: dict[str, dict[int, int]] = {}
    for run in store.runs("done"):
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
    done = store.runs("done")
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
    status = store.status()
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
        "config": {**summary["config"], **({"command": command} if command else {})},
        "timing": {"total_seconds": seconds},
    }
