"""Fit engines: what trains one run of a paired comparison.

The runner builds each run the same way whatever trains it (data loaders with the seeded generator, the seeded
trunk, the variant's heads, the objective; :func:`auxloss.experiment.assemble.build_run`), hands it to the
experiment's engine, and gets a :class:`~auxloss.train.trainer.FitResult` back: the best epoch chosen on the
validation main metric, the metrics at that epoch with the test split evaluated on its weights, and one history
record per epoch. The store, the statistics and the report never know which engine ran.

- :class:`TrainerEngine` (the default): auxloss's own :class:`~auxloss.train.Trainer`, with checkpoints and
  bit-identical resume.
- :class:`LightningEngine`: ``lightning.Trainer`` trains an :class:`~auxloss.integrations.lightning.AuxLossModule`
  (or your own ``LightningModule`` built on :class:`~auxloss.integrations.lightning.AuxLossMixin`).

Lightning is imported only when a :class:`LightningEngine` is made; without it the error says
``pip install 'auxloss[lightning]'``. This module imports neither the runner nor the experiment spec, which
import it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auxloss.errors import AuxLossError
from auxloss.train.callbacks import Callback
from auxloss.train.trainer import FitResult

__all__ = ["FitEngine", "LightningEngine", "TrainerEngine", "as_engine"]


class FitEngine:
    """Trains one built run and returns its :class:`~auxloss.train.trainer.FitResult`.

    ``fit(built, callbacks=..., checkpoint_dir=...)`` receives the run as :func:`~auxloss.experiment.assemble.
    build_run` made it (``built.model``, ``built.objective``, ``built.loaders``, and ``built.trainer``, the auxloss
    :class:`~auxloss.train.Trainer` holding the experiment's training options) and the runner's
    :class:`~auxloss.train.callbacks.Callback` objects (the pairing check, the weight keeper, the heartbeat), which
    it must call at least at ``on_fit_start``, ``on_epoch_start``, ``on_train_batch_start``, ``on_train_batch_end``,
    ``on_validation_end``, ``on_epoch_end`` and ``on_fit_end``. When it returns, ``built.model`` must hold the best
    epoch's weights.
    """

    #: The engine's name in ``results.json`` and the store's fingerprint.
    name = "engine"

    def fit(self, built: Any, *, callbacks: Sequence[Callback] = (), checkpoint_dir: Path | None = None
            ) -> FitResult:
        raise NotImplementedError

    def check(self, built: Any) -> None:
        """Raise :class:`~auxloss.errors.AuxLossError` for a training option this engine cannot honour.

        The runner calls it on every variant before the output folder is claimed, so a setting the engine rejects
        stops the experiment before any run starts rather than in the middle of it. Nothing to check by default.
        """

    def describe(self) -> dict[str, Any]:
        """A JSON description: a change of engine or of its options is another experiment."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TrainerEngine(FitEngine):
    """auxloss's own :class:`~auxloss.train.Trainer` (the default): checkpoints after every epoch, and an
    interrupted run resumes from its checkpoint, bit-identically on CPU."""

    name = "auxloss"

    def fit(self, built: Any, *, callbacks: Sequence[Callback] = (), checkpoint_dir: Path | None = None
            ) -> FitResult:
        trainer = built.trainer
        trainer.callbacks.extend(callbacks)
        trainer.checkpoint_dir = checkpoint_dir
        return trainer.fit(built.model, built.objective, built.loaders["train"], built.loaders["val"],
                           built.loaders["test"])


def as_engine(engine: Any) -> FitEngine:
    """``None``/``"auxloss"`` -> :class:`TrainerEngine`, ``"lightning"`` -> :class:`LightningEngine`, or an
    engine object as it is."""
    if engine is None or engine == "auxloss":
        return TrainerEngine()
    if engine == "lightning":
        return LightningEngine()
    if isinstance(engine, FitEngine):
        return engine
    raise AuxLossError(f"engine must be 'auxloss', 'lightning' or a FitEngine (auxloss.experiment.engines."
                       f"LightningEngine(...)), got {engine!r}.")


# -- Lightning ----------------------------------------------------------------------------------------------------
#: Trainer options the experiment's ``train`` settings decide, so that both engines train alike.
_RESERVED = {
    "max_epochs": "train epochs", "min_epochs": "train epochs", "max_steps": "train epochs",
    "accumulate_grad_batches": "train accumulate", "gradient_clip_val": "train grad_clip",
    "precision": "train amp", "accelerator": "the run's device (--device, --gpus)",
    "devices": "the run's device (--device, --gpus)", "strategy": "the run's device (--device, --gpus)",
    "num_nodes": "the run's device (--device, --gpus)",
}
#: The auxloss Trainer options the Lightning engine cannot honour, and what to do instead.
_UNSUPPORTED = {
    "compile": "call torch.compile inside your LightningModule, or use the auxloss engine",
    "checkpoint_every": "the Lightning engine does not resume inside a run; drop checkpoint_every",
    "check_grads": "use the auxloss engine, or Lightning's detect_anomaly in trainer_kwargs",
}


class LightningEngine(FitEngine):
    """``lightning.Trainer`` trains each run; the comparison (seeds, pairing, store, statistics, report) is the same.

    Args:
        module: ``(model, objective) -> LightningModule``: your module class built on
            :class:`~auxloss.integrations.lightning.AuxLossMixin`, whose ``aux_model`` and ``objective`` must be the
            ones given (its ``configure_optimizers`` then chooses the optimizer and LR schedule, and the
            experiment's ``optimizer``, ``lr``, ``weight_decay``, ``momentum`` and ``lr_schedule`` are not used).
            ``None``: an :class:`~auxloss.integrations.lightning.AuxLossModule` with the experiment's optimizer and
            LR schedule, built exactly as auxloss's Trainer builds them.
        trainer_kwargs: more ``lightning.Trainer`` options (``callbacks``, ``logger``, ``deterministic``,
            ``detect_anomaly``, ...). The experiment's ``train`` options set ``max_epochs``,
            ``accumulate_grad_batches``, ``gradient_clip_val`` and ``precision``, and the runner sets the device:
            giving those here is an error.

    What stays the same as with auxloss's Trainer, so that both engines give the same numbers for the same
    computation: the data loaders and batch order (the training loader is handed to Lightning so that each epoch
    draws its shuffle exactly as the auxloss Trainer does), the seeded trunk and heads, the pairing check,
    the optimizer and LR schedule (default module), and the evaluation: after each training epoch the validation
    split (and the training split in eval mode, ``eval_train``) is evaluated with auxloss's
    :meth:`~auxloss.train.Trainer.evaluate` on the module's ``aux_model`` and ``objective``, the best epoch is
    chosen on the validation main metric (early stopping with ``patience``), and the test split is evaluated once
    on the best epoch's weights. The module's own ``validation_step``/``test_step`` are not used by the comparison.

    Not supported: resuming inside a run (an interrupted run trains again from its start; finished runs are kept),
    several devices per run (the runner gives each run one device; use the auxloss engine under ``torchrun``),
    ``compile``, ``checkpoint_every`` and ``check_grads``. Runner callbacks get ``on_before_backward``,
    ``on_after_backward`` and ``on_before_optimizer_step`` only from the auxloss engine.
    """

    name = "lightning"

    def __init__(self, module: Callable[[nn.Module, Any], Any] | None = None,
                 trainer_kwargs: Mapping[str, Any] | None = None) -> None:
        lightning_pl()  # fail now, before any run, when Lightning is missing
        if module is not None and not callable(module):
            raise AuxLossError(f"module must be a callable (model, objective) -> LightningModule, such as your "
                               f"LightningModule class, got {type(module).__name__}.")
        kwargs = dict(trainer_kwargs or {})
        taken = sorted(set(kwargs) & set(_RESERVED))
        if taken:
            raise AuxLossError(
                "trainer_kwargs may not set " + ", ".join(f"{k!r} (set by {_RESERVED[k]})" for k in taken)
                + ": the experiment's settings decide them, so that every variant and both engines train alike."
            )
        self.module = module
        self.trainer_kwargs = kwargs

    def describe(self) -> dict[str, Any]:
        module = None if self.module is None else \
            f"{getattr(self.module, '__module__', '?')}:{getattr(self.module, '__qualname__', repr(self.module))}"
        return {"name": self.name, "module": module,
                "trainer_kwargs": {k: repr(v) for k, v in sorted(self.trainer_kwargs.items())}}

    def __repr__(self) -> str:
        return f"LightningEngine(module={self.describe()['module']}, trainer_kwargs={self.trainer_kwargs!r})"

    def check(self, built: Any) -> None:
        from auxloss.train.distributed import is_distributed

        aux = built.trainer  # the experiment's training options, validated by auxloss's Trainer
        for option, fix in _UNSUPPORTED.items():
            if getattr(aux, option, None) not in (None, False):
                raise AuxLossError(f"train option {option}={getattr(aux, option)!r} is not supported by the "
                                   f"Lightning engine: {fix}.")
        if is_distributed():
            raise AuxLossError("the Lightning engine trains each run in one process on one device; under torchrun "
                               "use the auxloss engine (the default).")

    # -- one run ---------------------------------------------------------------------------------------------------
    def fit(self, built: Any, *, callbacks: Sequence[Callback] = (), checkpoint_dir: Path | None = None
            ) -> FitResult:
        from auxloss.integrations.lightning import AuxLossMixin, AuxLossModule

        pl = lightning_pl()
        self.check(built)
        aux = built.trainer  # the experiment's training options, validated by auxloss's Trainer
        model, objective, loaders = built.model, built.objective, built.loaders
        if self.module is None:
            module = AuxLossModule(model, objective, optimizer=aux.build_optimizer,
                                   lr_scheduler=_scheduler_factory(aux, loaders["train"]),
                                   lr_scheduler_interval="step")
        else:
            module = self.module(model, objective)
            if not isinstance(module, pl.LightningModule) or not isinstance(module, AuxLossMixin):
                raise AuxLossError(f"module(model, objective) must return a LightningModule built on "
                                   f"auxloss.integrations.lightning.AuxLossMixin, got {type(module).__name__}.")
            if getattr(module, "aux_model", None) is not model or getattr(module, "objective", None) is not objective:
                raise AuxLossError(
                    f"{type(module).__name__}(model, objective) must keep the given model and objective as its "
                    "`aux_model` and `objective` (self.aux_model = model; self.objective = objective): the runner "
                    "evaluates and keeps the model it built, with this variant's heads."
                )
        bridge = _bridge_class(pl)(aux, module, list(aux.callbacks) + list(callbacks), loaders)
        kwargs: dict[str, Any] = {
            "logger": False, "enable_progress_bar": bool(aux.progress), "enable_model_summary": False,
            "num_sanity_val_steps": 0, **self.trainer_kwargs,
            "max_epochs": aux.epochs, "accumulate_grad_batches": aux.accumulate,
            "gradient_clip_val": aux.grad_clip, "precision": _precision(aux.amp, aux.device),
            **_device_kwargs(aux.device),
            # The bridge selects and keeps the best weights: it is this run's checkpoint callback.
            "enable_checkpointing": True,
            "callbacks": [*_as_list(self.trainer_kwargs.get("callbacks")), bridge],
        }
        trainer = pl.Trainer(**kwargs)
        with warnings.catch_warnings():
            # Evaluation is the bridge's (auxloss's evaluate, as in the auxloss engine), so Lightning gets no
            # validation loader on purpose.
            warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            trainer.fit(module, train_dataloaders=_EpochLoader(loaders["train"]))
        return bridge.result()


def lightning_pl() -> Any:
    """``lightning.pytorch``, or :class:`~auxloss.integrations.MissingExtraError` naming the extra."""
    from auxloss.integrations import require

    require("lightning", "lightning", note="The Lightning engine trains with lightning.Trainer.")
    return require("lightning.pytorch", "lightning")


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _precision(amp: Any, device: torch.device) -> str:
    # As auxloss's Trainer: fp16 autocast needs CUDA, so on CPU "fp16" trains in float32.
    if amp == "bf16":
        return "bf16-mixed"
    if amp == "fp16" and device.type == "cuda":
        return "16-mixed"
    return "32-true"


def _device_kwargs(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index if device.index is not None else 0]}
    if device.type in ("cpu", "mps"):
        return {"accelerator": device.type, "devices": 1}
    raise AuxLossError(f"the Lightning engine runs on cpu, cuda or mps, not on {device}; choose another device.")


def _scheduler_factory(aux: Any, train_loader: Any) -> Callable[[Any], Any] | None:
    """auxloss's LR schedule over the same number of optimizer steps, stepped once per optimizer step."""
    if aux.lr_schedule is None:
        return None
    try:
        batches = len(train_loader)
    except TypeError:
        raise AuxLossError(
            f"lr_schedule={aux.lr_schedule!r} needs the number of steps, but the training data has no length (an "
            "iterable dataset): give the dataset a __len__, or drop the LR schedule."
        ) from None
    total = max(1, math.ceil(batches / aux.accumulate)) * aux.epochs

    def build(optimizer: Any) -> Any:
        return aux.build_scheduler(optimizer, total)

    return build


class _EpochLoader:
    """The training loader, read to its end every epoch.

    Lightning stops an epoch after ``len(loader)`` batches without asking the loader for more, so a shuffling
    sampler never reaches its end, where PyTorch's ``RandomSampler`` draws once more from the loader's generator.
    auxloss's Trainer reads every epoch to the end. Reading one batch ahead makes the generator's state, and so the
    next epoch's order, the same under both engines. (Not a ``DataLoader``: Lightning then leaves it as it is.)
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        try:
            batch = next(iterator)
        except StopIteration:
            return
        for following in iterator:
            yield batch
            batch = following
        yield batch


class _View:
    """What the runner's callbacks read of "the trainer" (``epoch``, ``epochs``, ``model``, ...), under Lightning."""

    def __init__(self, aux: Any, model: nn.Module, objective: Any) -> None:
        self.epoch, self.epochs, self.global_step = 0, aux.epochs, 0
        self.model, self.objective, self.optimizer, self.device = model, objective, None, aux.device
        self.is_main_process = True
        self.lightning: Any = None
        self.last_report: Any = None


def _bridge_class(pl: Any) -> type:
    """The Lightning callback that evaluates, selects the best epoch and calls the runner's callbacks.

    It subclasses Lightning's ``Checkpoint`` because it is one (it keeps the best weights), and because Lightning
    calls checkpoint callbacks' ``on_train_epoch_end`` after the module's: the module has then told the objective
    that the epoch ended (``objective.on_epoch_end``), as auxloss's Trainer does before it evaluates.
    """

    class _Bridge(pl.callbacks.Checkpoint):
        def __init__(self, aux: Any, module: Any, callbacks: list[Callback], loaders: Mapping[str, Any]) -> None:
            self.aux, self.callbacks, self.loaders = aux, callbacks, loaders
            self.model, self.objective = module.aux_model, module.objective
            self.view = _View(aux, self.model, self.objective)
            self.st = aux._fresh_state()
            # auxloss's unshuffled copy of the training loader: evaluating never touches the training order.
            self.train_eval = aux._train_eval_loader(loaders["train"]) if aux.eval_train else None
            self.logger: Any = None
            self.started = 0.0
            self.report: Any = None
            self.sums: dict[str, Any] = {}
            self.count = 0
            self.last_step = 0

        @property
        def state_key(self) -> str:
            return "auxloss_bridge"

        def _call(self, hook: str, *args: Any) -> None:
            for cb in self.callbacks:
                getattr(cb, hook)(self.view, *args)

        # -- fit -------------------------------------------------------------------------------------------------
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            from auxloss.train.logging import RunLogger

            self.started = time.perf_counter()
            self.view.lightning = trainer
            self.view.optimizer = trainer.optimizers[0] if trainer.optimizers else None
            # A run that trains again after an interruption starts its logs afresh (history=[]).
            if self.aux.log_dir is not None:
                self.logger = RunLogger(self.aux.log_dir, tensorboard=self.aux.tensorboard, history=[])
            self._call("on_fit_start")

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.view.epoch = trainer.current_epoch + 1
            self.sums, self.count, self.last_step = {}, 0, trainer.global_step
            self._call("on_epoch_start", self.view.epoch)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._call("on_train_batch_start", batch, batch_idx)

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
            kept = pl_module.__dict__.get("_auxloss_step")  # (report, ctx) kept by AuxLossMixin.auxloss_step
            self.report = kept[0] if kept is not None else None

        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            # The epoch's training means, summed in float64 on the device after the backward, as auxloss's
            # Trainer does (a gradient-aware weighting's telemetry is set during the backward).
            report, self.report = self.report, None
            if report is None:
                return
            n = report.batch_size
            for key, value in report.detached().items():
                v = value.to(torch.float64) if isinstance(value, torch.Tensor) else value
                self.sums[key] = self.sums.get(key, 0.0) + v * n
            self.count += n
            self.view.last_report = report

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            # auxloss's on_train_batch_end follows an optimizer step: not a batch that only accumulated.
            if trainer.global_step == self.last_step:
                return
            self.last_step = self.view.global_step = trainer.global_step
            report = self.view.last_report
            self._call("on_train_batch_end", report, batch_idx)
            if self.logger is not None and report is not None and trainer.global_step % self.aux.log_every == 0:
                self.logger.log_step(trainer.global_step, report.as_dict())

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            aux, st, epoch = self.aux, self.st, self.view.epoch
            model, objective = self.model, self.objective
            train_means = {k: float(v) / self.count for k, v in self.sums.items()} if self.count else {}
            metrics: dict[str, float] = {}
            if self.train_eval is not None:
                metrics.update(_prefix("trainval", aux.evaluate(model, objective, self.train_eval)))
            metrics.update(_prefix("val", aux.evaluate(model, objective, self.loaders["val"])))
            if aux.test_every_epoch:
                metrics.update(_prefix("test", aux.evaluate(model, objective, self.loaders["test"])))
            objective.on_validation_end(metrics)
            self._call("on_validation_end", metrics)
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            record: dict[str, Any] = {
                "epoch": epoch, "step": trainer.global_step,
                "lr": optimizer.param_groups[0]["lr"] if optimizer is not None else None,
                "time": time.perf_counter() - self.started,
                **_prefix("train", train_means), **metrics,
                **{k: v for k, v in train_means.items() if k.startswith(("cos/", "normratio/", "effw/"))},
            }
            main, higher = objective.main.name, objective.main.higher_is_better
            if f"trainval/metric/{main}" in record and f"val/metric/{main}" in record:
                gap = record[f"trainval/metric/{main}"] - record[f"val/metric/{main}"]
                record["gap"] = gap if higher else -gap
            st["history"].append(record)
            self._call("on_epoch_end", record)
            if self.logger is not None:
                self.logger.log_epoch(record)
            aux.model = model  # auxloss's best-epoch rule copies aux.model's weights
            aux._select_best(st, record, metrics, higher, main)
            st["epoch"] = epoch
            if st["stopped_early"]:
                trainer.should_stop = True

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            if self.logger is not None:
                self.logger.close()
                self.logger = None

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if self.logger is not None:
                self.logger.close()
                self.logger = None

        # -- the result ------------------------------------------------------------------------------------------
        def result(self) -> FitResult:
            aux, st, model, objective = self.aux, self.st, self.model, self.objective
            model.to(aux.device)
            objective.to(aux.device)
            if st["best_state"] is not None:
                model.load_state_dict(st["best_state"])
            if not aux.test_every_epoch:
                # Once, on the weights chosen on validation, as auxloss's Trainer does.
                st["best_metrics"] = {**st["best_metrics"], **_prefix("test", aux.evaluate(model, objective,
                                                                                            self.loaders["test"]))}
            self._call("on_fit_end")
            return FitResult(best_epoch=st["best_epoch"], best=dict(st["best_metrics"]), history=st["history"],
                             stopped_early=st["stopped_early"], seconds=time.perf_counter() - self.started,
                             skipped_steps=objective.skipped_steps, main_task=objective.main.name)

    return _Bridge


def _prefix(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in values.items()}
