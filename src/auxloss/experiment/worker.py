"""One run, and the worker processes that claim runs from the store and train them.

``run_one`` trains one (variant, seed) of an :class:`~auxloss.experiment.spec.Experiment` and returns its record;
a worker loop claims pending runs one at a time, keeps its claim alive with heartbeats, stores each result in one
transaction and removes the run's checkpoints. The runner (:mod:`auxloss.experiment.runner`) starts the workers.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from auxloss.errors import AuxLossError
from auxloss.experiment.config import ExperimentConfig
from auxloss.experiment.spec import Experiment
from auxloss.experiment.store import Store, open_store, worker_id
from auxloss.train.callbacks import Callback
from auxloss.train.checkpoint import join_location, remove_checkpoint

__all__ = ["STORE_FILE", "STORE_URL_FILE", "open_experiment_store", "run_checkpoint_dir", "run_one"]

STORE_FILE = "results.sqlite"
STORE_URL_FILE = "store_url.txt"


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
    hooks: list[Callback] = []
    if store is not None:
        keys = (exp.input_key,) + ((exp.main.target,) if isinstance(exp.main.target, str) else ())
        hooks.append(PairingCheck(store.set_meta_once, seed, built.init_hash, keys, tuple(exp.batch_keys)))
    keeper = _Keeper(run_dir / "weights", exp.keep) if run_dir is not None and exp.keep != "none" else None
    if keeper is not None:
        hooks.append(keeper)
    hooks.extend(callbacks)
    # The experiment's engine trains the run (auxloss's Trainer by default; an interrupted run then resumes from
    # its last checkpoint, bit-identically on CPU, instead of starting over).
    fit = exp.engine.fit(built, callbacks=hooks,
                         checkpoint_dir=run_checkpoint_dir(exp, variant, seed, out, checkpoint_dir))
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
        self.last: dict[str, Path] = {}

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        # Every epoch, not only the planned last one: early stopping ends a run at an epoch no hook announces,
        # and once fit ends the model holds the best epoch's weights, no longer the last one's.
        if self.keep == "all" and trainer.is_main_process:
            self.last = self._write(trainer.model, "last")

    def _write(self, model: Any, tag: str) -> dict[str, Path]:
        from auxloss.taps import AuxModel

        self.folder.mkdir(parents=True, exist_ok=True)
        trunk = model.model if isinstance(model, AuxModel) else model
        paths = {"trunk": self.folder / f"{tag}-trunk.pt"}
        _save_tensors(trunk.state_dict(), paths["trunk"])
        if isinstance(model, AuxModel) and len(model.heads):
            paths["heads"] = self.folder / f"{tag}-heads.pt"
            _save_tensors(model.heads.state_dict(), paths["heads"])
        return paths

    def save_best(self, model: Any, out: Path) -> dict[str, str]:
        """Writes the best epoch's files; returns every kept file of the run (``trunk``, ``heads``, and with
        ``keep="all"`` ``last_trunk``, ``last_heads``), relative to ``out`` so the folder can move."""
        last = self.last or ({} if self.keep != "all" else _existing(self.folder, "last"))
        paths = {**self._write(model, "best"), **{f"last_{k}": v for k, v in last.items()}}
        return {k: Path(v).relative_to(out).as_posix() for k, v in paths.items()}


def _existing(folder: Path, tag: str) -> dict[str, Path]:
    """The ``tag`` files already in ``folder``: a run resumed after its last epoch wrote them trains no epoch."""
    return {part: path for part in ("trunk", "heads") if (path := folder / f"{tag}-{part}.pt").is_file()}


def _save_tensors(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({k: _plain(v, k) for k, v in state.items()}, tmp)
    os.replace(tmp, path)


#: Values ``torch.load(weights_only=True)`` reads back, besides tensors and containers of them.
_PLAIN_TYPES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _plain(value: Any, key: str) -> Any:
    """``value`` on the CPU, detached, with its containers walked. A state dict is not only tensors: a module's
    ``get_extra_state()`` (the Trinh head's generator state and seed) puts any value under ``<prefix>_extra_state``."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, _PLAIN_TYPES):
        return value
    raise AuxLossError(
        f"cannot keep the weights: the state dict's entry {key!r} holds a {type(value).__name__}, which "
        "torch.load(weights_only=True) cannot read back. Have the module's get_extra_state() return tensors and "
        "plain values (numbers, strings, lists, dicts), or train with keep: none."
    )


def as_experiment(exp: Experiment | ExperimentConfig) -> Experiment:
    if isinstance(exp, ExperimentConfig):
        from auxloss.experiment.build import experiment_from_config

        return experiment_from_config(exp)
    return exp


def current_versions() -> dict[str, str]:
    from auxloss._version import __version__

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


def open_experiment_store(out: str | Path, name: str, url: str | None = None, *, readonly: bool = False) -> Store:
    """The store of the experiment under ``out``: SQLite in the folder, or the database at ``url``.

    A folder whose runs are in a database (``run_experiment(store=...)``) names it in ``out/store_url.txt``, without
    its password. That file is never connected to by itself: a folder made by someone else could name any server.
    The caller passes the URL (``--store``), and its password comes with it, or from ``PGPASSWORD``/``~/.pgpass``.
    """
    out = Path(out)
    if url:
        return open_store(url, namespace=name, stale_after=stale_after(), readonly=readonly)
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


def make_tracker(exp: Experiment, store: Store, mlflow: str | None) -> Any:
    if not mlflow:
        return None
    from auxloss.integrations.mlflow import MlflowTracker

    return MlflowTracker(mlflow, exp.name, exp.identity(), store)


def worker_loop(exp: Experiment, out: str, device: str | None, threads: int | None,
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
    tracker = make_tracker(exp, store, mlflow)
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


def distributed_loop(exp: Experiment, out: Path, device: str | None, checkpoint_dir: str | None = None,
                      mlflow: str | None = None, url: str | None = None) -> None:
    """Under torchrun: rank 0 claims each run and broadcasts it; every rank trains it together with DDP."""
    from auxloss.train import distributed as D

    store = open_experiment_store(out, exp.name, url) if D.rank() == 0 else None
    tracker = make_tracker(exp, store, mlflow) if store is not None else None
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


def pool_worker(args: tuple) -> int:
    return worker_loop(*args)
