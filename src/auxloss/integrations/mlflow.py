"""Experiment tracking in MLflow: one parent run per experiment, one nested run per (variant, seed).

``auxloss run CONFIG --mlflow URI`` (or ``run_experiment(..., mlflow=URI)``) logs, next to the JSONL/CSV logs:

- a **parent run** per experiment (named after it, in the MLflow experiment of the same name) with the config as
  params and ``config.yaml``, and once the runs are done the verdict as tags (``auxloss.verdict.<variant>``,
  ``auxloss.summary``), each variant's Δ and p-values as metrics (``delta/<variant>``, ``p_holm/<variant>``...)
  and ``report.md``, ``report.html``, ``results.json`` and the figures as artifacts;
- a **nested run** per (variant, seed), live while it trains: the step metrics at the config's logging interval
  (``step/<key>``, MLflow step = optimizer step, the numbers of ``steps.jsonl``), every epoch record (the keys of
  ``epochs.jsonl``, MLflow step = epoch) and, when it ends, the best epoch's metrics (``best/<key>``) and the main
  metric (``main``). Two names differ from the logs: the total loss ``loss`` is ``loss/total`` (see
  :func:`mlflow_keys`), and the epoch record's ``step`` is ``global_step``.

Runs survive kills and take-overs. Workers on several machines agree on one parent run through the results store,
and a worker that takes over a run finds the nested run of the worker that died (by its tags) and continues it.
It logs only the steps and epochs that run has not logged yet (the tags ``auxloss.logged_step`` and
``auxloss.logged_epoch``): a resumed run replays the same numbers (training is deterministic), so nothing is
duplicated and nothing lost.

A URI with a password (``http://user:secret@host``, ``postgresql://...``) is never recorded as it is: every URI
that goes into MLflow, and every message that names one, shows ``user:***@host``
(:func:`auxloss._redact.mask_passwords`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from auxloss._redact import mask_passwords
from auxloss.errors import AuxLossError
from auxloss.train.callbacks import Callback

__all__ = ["MlflowCallback", "MlflowTracker", "mlflow_keys"]

#: MLflow's limits on the params, tags and metrics one ``log_batch`` call takes.
_BATCH_PARAMS, _BATCH_TAGS, _BATCH_METRICS = 100, 100, 1000

def _import_mlflow() -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError as exc:
        raise AuxLossError("--mlflow needs the mlflow package: pip install 'auxloss[mlflow]'.") from exc
    return MlflowClient


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params: dotted keys, scalars as text, lists as JSON (``tasks``, ``seeds``)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return flat


def _numbers(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a log record (bools and text are not metrics)."""
    return {f"{prefix}{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def mlflow_keys(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metric names MLflow gets: a key that is also the folder of other keys gets ``/total`` appended.

    Records hold ``loss`` (the total) beside ``loss/main`` and ``loss/aux1``; MLflow's file store keeps each metric
    in a file named by its key, so ``loss`` cannot be both a file and a folder. In the logs it is the total loss, so
    MLflow shows it as ``loss/total`` (``train/loss/total``...). Every other key is kept as it is.
    """
    folders = {key.rsplit("/", i)[0] for key in metrics for i in range(1, key.count("/") + 1)}
    return {(f"{key}/total" if key in folders else key): value for key, value in metrics.items()}


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MlflowTracker:
    """The MLflow side of one experiment: its MLflow experiment, parent run and nested runs.

    Args:
        uri: the tracking URI (``http://host:5000``, ``file:/path/mlruns``, ``sqlite:///mlflow.db``...).
        experiment: the auxloss experiment's name (also the MLflow experiment's and the parent run's name).
        fingerprint: the config's hash; a changed config gets a new parent run.
        store: the results store, where workers agree on the parent run (:meth:`Store.set_meta_once`).
    """

    def __init__(self, uri: str, experiment: str, fingerprint: str, store: Any) -> None:
        client_cls = _import_mlflow()
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        # A longer param (a long list of tasks) is left out of the params; config.yaml, an artifact, has it all.
        self._max_param = MAX_PARAM_VAL_LENGTH
        self.uri, self.shown = uri, mask_passwords(uri)
        self.name, self.fingerprint, self.store = experiment, fingerprint, store
        self.client = self._call("open a client", client_cls, tracking_uri=uri)
        self.experiment_id = self._call("open the MLflow experiment", self._experiment)
        self._parent: str | None = None

    # -- plumbing ------------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except (MlflowException, OSError) as exc:
            raise AuxLossError(f"cannot {what} on the MLflow tracking server {self.shown!r}: "
                               f"{mask_passwords(str(exc)).strip()[:400]}. Check the --mlflow URI and that the server "
                               "runs (or drop --mlflow).") from exc

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.name)
        if found is None:
            try:
                return self.client.create_experiment(self.name)
            except MlflowException:  # another worker created it first
                found = self.client.get_experiment_by_name(self.name)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise AuxLossError(f"the MLflow experiment {self.name!r} on {self.shown!r} is deleted; restore it "
                               "(mlflow experiments restore) or rename the auxloss experiment.")
        return found.experiment_id

    def _log(self, run_id: str, metrics: Mapping[str, float] | None = None, step: int = 0,
             params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        ms = [self._Metric(k, float(v), now, step) for k, v in mlflow_keys(metrics or {}).items()]
        ps = [self._Param(k, v) for k, v in (params or {}).items() if len(v) <= self._max_param]
        ts = [self._RunTag(k, v) for k, v in (tags or {}).items()]
        # Metrics and params first, tags last: a tag such as auxloss.logged_step may only claim what is logged.
        for chunk in _chunks(ms, _BATCH_METRICS):
            self._call("log metrics", self.client.log_batch, run_id, metrics=chunk)
        for chunk in _chunks(ps, _BATCH_PARAMS):
            self._call("log params", self.client.log_batch, run_id, params=chunk)
        for chunk in _chunks(ts, _BATCH_TAGS):
            self._call("set tags", self.client.log_batch, run_id, tags=chunk)

    def _alive(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        return run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id

    # -- the parent run ------------------------------------------------------------------------------------
    @property
    def parent_id(self) -> str:
        """The experiment's parent run: the one the store names, else a new one (the first worker's wins)."""
        if self._parent is None:
            key = f"mlflow_parent:{self.shown}"
            run_id = self.store.get_meta(key)
            if run_id is None or not self._alive(run_id):
                mine = self._call("create the parent run", self.client.create_run, self.experiment_id,
                                  run_name=self.name, tags={"auxloss.experiment": self.name,
                                                            "auxloss.config_hash": self.fingerprint,
                                                            "auxloss.role": "experiment"}).info.run_id
                if run_id is None:
                    run_id = self.store.set_meta_once(key, mine)
                else:  # the recorded parent was deleted in MLflow: replace it
                    self.store.set_meta(key, mine)
                    run_id = mine
                if run_id != mine:  # another worker's parent run won the race: ours is not used
                    self._call("delete an unused parent run", self.client.delete_run, mine)
            self._parent = run_id
        return self._parent

    def start_experiment(self, config: Mapping[str, Any], out: Path, *, command: str | None = None,
                         store: str | None = None, checkpoint_dir: str | None = None) -> None:
        """Log the config (params and ``config.yaml``) and where things are on the parent run."""
        tags = {"auxloss.out": str(Path(out).resolve())}
        if command:
            tags["auxloss.command"] = mask_passwords(command)
        if store:
            tags["auxloss.store"] = mask_passwords(store)
        if checkpoint_dir:
            tags["auxloss.checkpoint_dir"] = mask_passwords(str(checkpoint_dir))
        self._log(self.parent_id, params=flatten({k: v for k, v in config.items() if k != "variants"}),
                  tags=tags)
        if (Path(out) / "config.yaml").exists():
            self._call("upload config.yaml", self.client.log_artifact, self.parent_id, str(Path(out) / "config.yaml"))

    def finish_experiment(self, results: Mapping[str, Any], out: Path) -> None:
        """The verdict (tags and metrics) and the report (artifacts) on the parent run."""
        from auxloss.experiment.report import summary_sentences

        tags = {"auxloss.summary": " ".join(summary_sentences(results)),
                "auxloss.runs": json.dumps(results.get("runs", {}), sort_keys=True)}
        metrics: dict[str, float] = {}
        for comp in results.get("comparisons") or []:
            name = comp["variant"]
            tags[f"auxloss.verdict.{name}"] = str(comp.get("verdict"))
            for key in ("delta", "p_value", "p_holm", "p_wilcoxon", "effect_size"):
                value = comp.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    metrics[f"{key}/{name}"] = float(value)
        for variant in results.get("variants") or []:
            metrics[f"mean/{variant['name']}"] = float(variant["mean"])
        self._log(self.parent_id, metrics=metrics, tags=tags)
        out = Path(out)
        for name in ("report.md", "report.html", "results.json"):
            if (out / name).exists():
                self._call(f"upload {name}", self.client.log_artifact, self.parent_id, str(out / name))
        if (out / "figures").is_dir():
            self._call("upload the figures", self.client.log_artifacts, self.parent_id, str(out / "figures"),
                       "figures")
        runs = results.get("runs", {})
        if not runs.get("pending") and not runs.get("failed"):
            self._call("end the parent run", self.client.set_terminated, self.parent_id, "FINISHED")

    # -- the nested runs -----------------------------------------------------------------------------------
    def run_id(self, variant: str, seed: int) -> str:
        """The nested run of (variant, seed): the one a previous worker started, else a new one."""
        parent = self.parent_id
        query = (f"tags.mlflow.parentRunId = '{parent}' and tags.`auxloss.variant` = '{variant}' "
                 f"and tags.`auxloss.seed` = '{seed}'")
        found = self._call("look up a run", self.client.search_runs, [self.experiment_id], query,
                           order_by=["attributes.start_time ASC"], max_results=1)
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self._call("reopen a run", self.client.update_run, run_id, status="RUNNING")
            return run_id
        tags = {"mlflow.parentRunId": parent, "auxloss.experiment": self.name, "auxloss.variant": variant,
                "auxloss.seed": str(seed), "auxloss.role": "run"}
        return self._call("create a run", self.client.create_run, self.experiment_id,
                          run_name=f"{variant}/seed{seed}", tags=tags).info.run_id

    def callback(self, variant: str, seed: int, config: Mapping[str, Any]) -> MlflowCallback:
        """A training callback that logs (variant, seed) live into its nested run."""
        run_id = self.run_id(variant, seed)
        self._log(run_id, params=flatten(config))
        return MlflowCallback(self, run_id)

    def finish_run(self, run_id: str, record: Mapping[str, Any]) -> None:
        """The run's result (``main``, ``best/<key>``, ``best_epoch``), and the run marked finished."""
        metrics = {"main": float(record["main"]), "best_epoch": float(record["best_epoch"]),
                   **_numbers(record.get("best", {}), "best/")}
        self._log(run_id, metrics=metrics)
        self._call("end a run", self.client.set_terminated, run_id, "FINISHED")

    def fail_run(self, run_id: str) -> None:
        self._call("end a run", self.client.set_terminated, run_id, "FAILED")


class MlflowCallback(Callback):
    """Logs one run's step and epoch records live into its MLflow run (see the module's docstring).

    Only the main process logs (rank 0 under DDP), like the JSONL logs. Steps and epochs already in the MLflow run
    (a run resumed after a kill or taken over by another worker) are not logged again.
    """

    def __init__(self, tracker: MlflowTracker, run_id: str) -> None:
        self.tracker, self.run_id = tracker, run_id
        tags = tracker._call("read a run", tracker.client.get_run, run_id).data.tags
        self.logged_step = int(tags.get("auxloss.logged_step", 0))
        self.logged_epoch = int(tags.get("auxloss.logged_epoch", 0))

    def on_train_batch_end(self, trainer: Any, report: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_main_process or step % trainer.log_every or step <= self.logged_step:
            return
        values = {f"step/{k}": float(v) for k, v in report.detached().items()}
        self.tracker._log(self.run_id, metrics=values, step=step, tags={"auxloss.logged_step": str(step)})
        self.logged_step = step

    def on_epoch_end(self, trainer: Any, record: dict[str, float]) -> None:
        epoch = int(record["epoch"])
        if not trainer.is_main_process or epoch <= self.logged_epoch:
            return
        # The record's `step` (optimizer steps so far) is `global_step`: `step/` holds the step log's metrics.
        metrics = _numbers({("global_step" if k == "step" else k): v for k, v in record.items() if k != "epoch"})
        self.tracker._log(self.run_id, metrics=metrics, step=epoch, tags={"auxloss.logged_epoch": str(epoch)})
        self.logged_epoch = epoch
