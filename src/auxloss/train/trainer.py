"""A plain PyTorch training loop driven by an :class:`~auxloss.objective.Objective`.

No framework is required. It gives the optimizer and LR scheduler, gradient clipping and accumulation, AMP on
CUDA and an optional ``torch.compile``, evaluation on the validation and test splits each epoch, early stopping
and the best checkpoint chosen on validation (never on test), per-task losses, weights and metrics over time,
the train/validation gap, progress bars, logs, and Lightning-style callbacks.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from auxloss._distributed import is_distributed, sync_tensors
from auxloss.errors import AuxLossError
from auxloss.objective import LossReport, Objective
from auxloss.step import StepContext
from auxloss.train.batches import ValidationStream, move_to, resolve_device
from auxloss.train.callbacks import Callback
from auxloss.train.checkpoint import (
    checkpoint_location,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from auxloss.train.logging import RunLogger
from auxloss.train.options import TrainOptions
from auxloss.train.progress import FitProgress

# ValidationStream, move_to and resolve_device live in auxloss.train.batches; they stay importable from here.
__all__ = ["FitResult", "Trainer", "ValidationStream", "move_to"]

# Settings stored under another attribute name: ``optimizer`` is the optimizer that fit builds.
_OPTION_ATTRIBUTE = {"optimizer": "optimizer_spec"}


@dataclasses.dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    ``best`` holds the validation and test metrics at ``best_epoch``, the epoch chosen on the validation main
    metric (the last epoch when there is no validation split). ``history`` is one record per epoch.
    """

    best_epoch: int
    best: dict[str, float]
    history: list[dict[str, Any]]
    stopped_early: bool
    seconds: float
    skipped_steps: int = 0
    main_task: str = "main"  # the objective's main task's name (its metric keys are "<split>/metric/<name>")

    def main_metric(self, split: str = "test") -> float:
        """The main task's metric on ``split`` at the best epoch."""
        key = f"{split}/metric/{self.main_task}"
        if key not in self.best:
            raise AuxLossError(f"no {split!r} metric in this run; the splits evaluated are "
                               f"{sorted({k.split('/')[0] for k in self.best})}.")
        return self.best[key]


class Trainer:
    """Trains an aux model with an objective.

    Args:
        options: the training settings, a :class:`~auxloss.train.TrainOptions` (epochs, optimizer, lr, amp,
            patience, ...; its docstring describes each one). Default: every default.
        callbacks: :class:`~auxloss.train.callbacks.Callback` objects.
        log_dir: where ``epochs.jsonl``/``epochs.csv``/``steps.jsonl`` go; ``None`` = no files.
        progress: show a progress bar (rich; without rich installed, a warning and no bar).
        checkpoint_dir: where to write ``last.pt``/``prev.pt`` (atomically) after every epoch; a later ``fit`` with
            the same arguments resumes from there, bit-identically on CPU. A folder or an fsspec URL
            (``s3://bucket/run``), so that another machine can resume the run.
        **settings: any setting of :class:`~auxloss.train.TrainOptions` by name, replacing the one in
            ``options``: ``Trainer(epochs=5, lr=3e-3)``.

    Each setting is also an attribute of the same name (the optimizer's is ``optimizer_spec``, since
    ``optimizer`` is the optimizer built during :meth:`fit`; ``device`` is the resolved ``torch.device``).
    """

    def __init__(
        self,
        options: TrainOptions | None = None,
        *,
        callbacks: Sequence[Callback] = (),
        log_dir: str | Path | None = None,
        progress: bool = False,
        checkpoint_dir: str | Path | None = None,
        **settings: Any,
    ) -> None:
        self.options = TrainOptions.merged(options, settings)  # validated: a bad value names the setting
        for name, value in self.options.items():
            setattr(self, _OPTION_ATTRIBUTE.get(name, name), value)
        device = self.options.device
        self.device = resolve_device(device)
        self.callbacks = list(callbacks)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.checkpoint_dir = checkpoint_location(checkpoint_dir) if checkpoint_dir is not None else None
        if progress and importlib.util.find_spec("rich") is None:
            # The bar is a nicety of the experiment extra: training goes on without it.
            warnings.warn("progress=True draws its bar with rich, which is not installed; training without a "
                          "progress bar. Install it with: pip install 'auxloss[experiment]'.", stacklevel=2)
            progress = False
        self.progress = progress
        # Set during fit, for callbacks.
        self.model: nn.Module | None = None
        self.objective: Objective | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.epoch = 0
        self.global_step = 0
        self._val_stream: ValidationStream | None = None

    # -- building blocks ---------------------------------------------------------------------------------------
    def build_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        spec = self.optimizer_spec
        params = [p for p in params if p.requires_grad]
        if callable(spec):
            return spec(params)
        if spec == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if spec == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if spec == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        raise AuxLossError(f"unknown optimizer {spec!r}; use 'adam', 'adamw', 'sgd' or a callable.")

    def build_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        spec = self.lr_schedule
        if spec is None:
            return None
        if callable(spec):
            return spec(optimizer)
        if spec == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
        if spec == "step":
            milestones = [int(total_steps * 0.5), int(total_steps * 0.75)]
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        raise AuxLossError(f"unknown lr_schedule {spec!r}; use None, 'cosine', 'step' or a callable.")

    def _autocast(self) -> Any:
        if not self.amp:
            return nullcontext()
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)
        if self.amp == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()  # fp16 autocast needs CUDA; on CPU train in float32

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, objective: Objective, loader: Iterable[Any]) -> dict[str, float]:
        """Batch-size-weighted means of every task's loss and metric over ``loader``, in eval mode."""
        was_training = model.training
        model.eval()
        sums: dict[str, Any] = {}
        count = 0
        try:
            for batch in loader:
                batch = move_to(batch, self.device)
                with self._autocast():
                    outputs = model(objective.inputs(batch))
                    report = objective(outputs, batch)
                n = report.batch_size
                for key, value in report.detached().items():  # summed on the device: one sync at the end
                    if key.startswith("weight/"):
                        continue
                    sums[key] = sums.get(key, 0.0) + _f64(value) * n
                count += n
        finally:
            model.train(was_training)
        if is_distributed() and isinstance(getattr(loader, "sampler", None), DistributedSampler):
            # Each rank saw its own shard: the sums and the count are summed over the ranks (an unsharded loader
            # already gives every rank the whole split).
            keys = sorted(sums)
            packed = [torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys]
            synced = sync_tensors([*packed, torch.tensor(float(count), dtype=torch.float64, device=self.device)],
                                  "sum")
            sums, count = dict(zip(keys, synced[:-1])), int(synced[-1])  # type: ignore[arg-type]
        if count == 0:
            raise AuxLossError("an evaluation split is empty: give it at least one sample.")
        return {k: float(v) / count for k, v in sums.items()}

    # -- training ----------------------------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        objective: Objective,
        train_loader: DataLoader,
        val_loader: Iterable[Any] | None = None,
        test_loader: Iterable[Any] | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
    ) -> FitResult:
        """Train for ``epochs`` and return the best epoch's metrics (chosen on validation) and the history.

        With ``checkpoint_dir`` set, a checkpoint is written atomically after every epoch (and every
        ``checkpoint_every`` optimizer steps), and a later ``fit`` with the same arguments resumes from it: the
        result is bit-identical to an uninterrupted run on CPU with deterministic settings.
        """
        started = self._fit_started = time.perf_counter()
        model.to(self.device)
        objective.to(self.device)
        if optimizer is None:
            optimizer = self.build_optimizer(list(model.parameters()) + list(objective.parameters()))
        batches = _length(train_loader)
        if batches == 0:
            raise AuxLossError(
                "the training data is empty (0 batches): give the training split at least one sample, and at least "
                "batch_size samples when the loader has drop_last=True."
            )
        if batches is None and scheduler is None and self.lr_schedule is not None:
            raise AuxLossError(
                f"lr_schedule={self.lr_schedule!r} needs the number of steps, but the training data has no length (an "
                "iterable dataset): give the dataset a __len__, or drop the LR schedule."
            )
        # A last partial accumulation still steps, so an epoch has ceil(batches / accumulate) optimizer steps.
        steps_per_epoch = max(1, math.ceil(batches / self.accumulate)) if batches is not None else 1
        if scheduler is None:
            scheduler = self.build_scheduler(optimizer, steps_per_epoch * self.epochs)
        run_model: nn.Module = model
        if is_distributed():
            # Every parameter gets a gradient each step (a task at weight 0 still enters the total as 0·L), so
            # DDP's cheaper find_unused_parameters=False is safe.
            ids = [self.device.index] if self.device.type == "cuda" else None
            run_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.compile:
            run_model = torch.compile(run_model)
        self.model, self.objective, self.optimizer, self.scheduler = model, objective, optimizer, scheduler
        self._train_loader = train_loader
        use_scaler = self.amp == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if use_scaler else None
        higher = objective.main.higher_is_better
        train_eval_loader = self._train_eval_loader(train_loader) if self.eval_train else None
        weighting = objective.weighting
        if weighting is not None and weighting.needs_validation and val_loader is None:
            raise AuxLossError(
                f"{type(weighting).__name__} learns its weights from the main task's loss on validation batches: pass "
                "fit(..., val_loader=...) with a split held out from training (never the test split)."
            )

        st = self._fresh_state()
        resumed = self._resume(st)
        # Look-ahead weightings draw validation batches during training; the test split is never handed over.
        self._val_stream = (ValidationStream(val_loader, self.device, position=st.get("val_position", 0))
                            if weighting is not None and weighting.needs_validation and val_loader is not None
                            else None)
        logger = (RunLogger(self.log_dir, tensorboard=self.tensorboard, history=st["history"],
                            last_step=self.global_step) if self.log_dir is not None and self.is_main_process else None)
        if not resumed:
            self._call("on_fit_start")
        progress = FitProgress(self.progress and self.is_main_process, self.epochs, steps_per_epoch)
        try:
            while st["epoch"] < self.epochs and not st["stopped_early"]:
                epoch = st["epoch"] + 1
                self.epoch = epoch
                objective.set_epoch(epoch - 1)
                sampler = getattr(train_loader, "sampler", None)
                if isinstance(sampler, DistributedSampler):
                    sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
                if st["batch_idx"] == 0:
                    self._call("on_epoch_start", epoch)
                train_means = self._train_epoch(run_model, objective, train_loader, logger, progress, st)
                objective.on_epoch_end(epoch)
                metrics: dict[str, float] = {}
                if train_eval_loader is not None:
                    metrics.update(_prefix("trainval", self.evaluate(run_model, objective, train_eval_loader)))
                if val_loader is not None:
                    metrics.update(_prefix("val", self.evaluate(run_model, objective, val_loader)))
                if test_loader is not None and self.test_every_epoch:
                    metrics.update(_prefix("test", self.evaluate(run_model, objective, test_loader)))
                objective.on_validation_end(metrics)
                self._call("on_validation_end", metrics)
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "step": self.global_step,
                    "lr": optimizer.param_groups[0]["lr"],
                    "time": st["elapsed"] + time.perf_counter() - started,
                    **_prefix("train", train_means),
                    **metrics,
                    # gradient telemetry of gradient-aware weightings (epoch means), for the report's health section
                    **{k: v for k, v in train_means.items() if k.startswith(("cos/", "normratio/", "effw/"))},
                }
                main = objective.main.name
                if f"trainval/metric/{main}" in record and f"val/metric/{main}" in record:
                    gap = record[f"trainval/metric/{main}"] - record[f"val/metric/{main}"]
                    record["gap"] = gap if higher else -gap
                st["history"].append(record)
                self._call("on_epoch_end", record)
                if logger is not None:
                    logger.log_epoch(record)
                progress.epoch_done(record, main)
                self._select_best(st, record, metrics, higher, main)
                st["epoch"] = epoch
                st["batch_idx"] = 0
                self._save(st, started)
        finally:
            progress.close()
            if logger is not None:
                logger.close()
        if st["best_state"] is not None:
            model.load_state_dict(st["best_state"])
        if test_loader is not None and not self.test_every_epoch:
            # The test split is evaluated once, on the weights chosen on validation: the same number as evaluating
            # it every epoch and reading the best epoch's, at a fraction of the cost.
            st["best_metrics"] = {**st["best_metrics"],
                                  **_prefix("test", self.evaluate(run_model, objective, test_loader))}
        self._call("on_fit_end")
        return FitResult(
            best_epoch=st["best_epoch"],
            best=dict(st["best_metrics"]),
            history=st["history"],
            stopped_early=st["stopped_early"],
            seconds=st["elapsed"] + time.perf_counter() - started,
            skipped_steps=objective.skipped_steps,
            main_task=objective.main.name,
        )

    @property
    def is_main_process(self) -> bool:
        """Rank 0 under torch.distributed (or the only process): the one that logs and writes checkpoints."""
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def _fresh_state(self) -> dict[str, Any]:
        self.global_step = 0
        return {"epoch": 0, "batch_idx": 0, "history": [], "best_value": None, "best_epoch": 0,
                "best_state": None, "best_metrics": {}, "stale": 0, "stopped_early": False, "elapsed": 0.0,
                "sums": {}, "count": 0, "micro": 0, "epoch_gen_state": None}

    def _select_best(self, st: dict[str, Any], record: dict[str, Any], metrics: dict[str, float],
                     higher: bool, main: str) -> None:
        # The best checkpoint is chosen on validation only: choosing on test would leak it.
        assert self.model is not None
        if f"val/metric/{main}" in record:
            value, maximize = record[f"val/metric/{main}"], higher
        elif f"val/loss/{main}" in record:
            value, maximize = record[f"val/loss/{main}"], False
        else:
            st["best_epoch"], st["best_metrics"] = record["epoch"], metrics
            return
        best = st["best_value"]
        if best is None or (value > best if maximize else value < best):
            st.update(best_value=value, best_epoch=record["epoch"], best_metrics=metrics, stale=0,
                      best_state=copy.deepcopy(self.model.state_dict()))
        else:
            st["stale"] += 1
            if self.patience is not None and st["stale"] >= self.patience:
                st["stopped_early"] = True

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _checkpoint_state(self, st: dict[str, Any], started: float) -> dict[str, Any]:
        assert self.model is not None and self.objective is not None and self.optimizer is not None
        gen = getattr(self._train_loader, "generator", None)
        return {
            "trainer": {k: v for k, v in st.items() if k != "elapsed"},
            "elapsed": st["elapsed"] + time.perf_counter() - started,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "rng": get_rng_state(),
            "loader_generator": gen.get_state() if gen is not None else None,
        }

    def _save(self, st: dict[str, Any], started: float) -> None:
        if self._val_stream is not None:
            st["val_position"] = self._val_stream.position
        if self.checkpoint_dir is None or not self.is_main_process:
            return
        save_checkpoint(self.checkpoint_dir, self._checkpoint_state(st, started))

    def _resume(self, st: dict[str, Any]) -> bool:
        if self.checkpoint_dir is None:
            return False
        ckpt = load_checkpoint(self.checkpoint_dir)
        if ckpt is None:
            return False
        assert self.model is not None and self.objective is not None and self.optimizer is not None
        try:
            self.model.load_state_dict(ckpt["model"])
            self.objective.load_state_dict(ckpt["objective"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            detail = " ".join(str(exc).split())  # torch's message spans lines and lists every key: one short line
            detail = detail if len(detail) <= 240 else detail[:240] + "..."
            raise AuxLossError(
                f"the checkpoint in {str(self.checkpoint_dir)!r} does not fit this model/objective ({detail}). It belongs "
                "to another run: use another output folder, or delete the checkpoint to start over."
            ) from exc
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        for cb, state in zip(self.callbacks, ckpt["callbacks"]):
            cb.load_state_dict(state)
        st.update(ckpt["trainer"])
        st["elapsed"] = ckpt["elapsed"]
        self.global_step = ckpt["global_step"]
        gen = getattr(self._train_loader, "generator", None)
        if gen is not None and ckpt["loader_generator"] is not None:
            gen.set_state(ckpt["loader_generator"])
        set_rng_state(ckpt["rng"])
        return True

    def _train_eval_loader(self, train_loader: DataLoader) -> Iterable[Any] | None:
        # A separate, unshuffled loader over the same data: evaluating must not consume the training loader's
        # RNG, or the batch order of paired runs would drift apart.
        dataset = getattr(train_loader, "dataset", None)
        if dataset is None:
            return None
        return DataLoader(dataset, batch_size=train_loader.batch_size or 256, shuffle=False,
                          collate_fn=train_loader.collate_fn)

    def _train_epoch(
        self, model: nn.Module, objective: Objective, loader: Iterable[Any], logger: RunLogger | None,
        progress: FitProgress, st: dict[str, Any],
    ) -> dict[str, float]:
        assert self.optimizer is not None
        model.train()
        optimizer = self.optimizer
        gen = getattr(loader, "generator", None)
        skip = st["batch_idx"]  # > 0 when resuming inside an epoch
        # The shuffle of this epoch is drawn from the loader's own generator, or from the global RNG when it has
        # none: remember that state at the start of the epoch, so a resume inside the epoch can replay the same
        # order (restore it, skip the batches already trained, then put back the checkpoint's RNG state).
        if skip and st["epoch_gen_state"] is not None:
            kind, state = st["epoch_gen_state"]
            after = gen.get_state() if kind == "loader" else torch.get_rng_state()
            (gen.set_state if kind == "loader" else torch.set_rng_state)(state)
        else:
            skip = 0
            st.update(sums={}, count=0, micro=0, batch_idx=0)
            st["epoch_gen_state"] = ("loader", gen.get_state()) if gen is not None else \
                ("global", torch.get_rng_state())
            optimizer.zero_grad(set_to_none=True)
        iterator = iter(loader)
        if skip:
            for _ in range(skip):
                next(iterator)
            kind, _ = st["epoch_gen_state"]
            (gen.set_state if kind == "loader" else torch.set_rng_state)(after)
        sums, report, values = st["sums"], None, {}
        for batch_idx, batch in enumerate(iterator, start=skip):
            batch = move_to(batch, self.device)
            self._call("on_train_batch_start", batch, batch_idx)
            # One protocol call before the forward: the weighting prepares the step (per-tap multipliers, its
            # learning rate) and says whether DDP's own gradient sync must be off (per-task gradients taken with
            # autograd.grad, which DDP's hooks never see, are all-reduced by the weighting itself).
            ctx = StepContext(lr=optimizer.param_groups[0]["lr"], model=self.model, scale=1.0 / self.accumulate,
                              scaler=self.scaler, distributed=isinstance(model, nn.parallel.DistributedDataParallel),
                              validation=self._val_stream)
            plan = objective.before_step(ctx)
            sync_off = ctx.distributed and not plan.sync_gradients
            with model.no_sync() if sync_off else nullcontext():
                with self._autocast():
                    outputs = model(objective.inputs(batch))
                    report = objective(outputs, batch)
                st["batch_idx"] = batch_idx + 1
                if not report.finite:  # nonfinite="skip": drop this micro-batch's update
                    progress.step()
                    continue
                self._call("on_before_backward", report)
                objective.backward(report, ctx)
                self._call("on_after_backward", report)
            st["micro"] += 1
            # Detached tensors, summed on the device: reading them as floats every step would cost a device sync
            # per value on a GPU. They become floats once per epoch (and at log steps).
            values = report.detached()
            n = report.batch_size
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + _f64(value) * n
            st["count"] += n
            if st["micro"] % self.accumulate:
                continue
            self._optimizer_step(report, batch_idx, logger, values)
            progress.step()
            if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
                self._save(st, self._fit_started)
        if st["micro"] % self.accumulate and report is not None:  # a last partial accumulation still updates
            self._optimizer_step(report, st["batch_idx"] - 1, logger, values)
            st["micro"] = 0
        count = st["count"]
        return {k: float(v) / count for k, v in sums.items()} if count else {}

    def _skip_step(self, batch_idx: int, values: dict[str, float]) -> bool:
        """A non-finite gradient norm: drop the update (nonfinite="skip", counted) or raise."""
        assert self.optimizer is not None and self.objective is not None
        if self.objective.nonfinite == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.objective.skipped_steps += 1
            return True
        raise AuxLossError(
            f"non-finite gradient norm ({values['grad_norm']}) at step {self.global_step} (epoch {self.epoch}, batch "
            f"{batch_idx}) although the loss was finite ({float(values.get('loss', math.nan))}): the gradients exploded. Lower the "
            "learning rate or the auxiliary weights, normalise the inputs, or pass Objective(nonfinite='skip') to skip "
            "such steps and count them."
        )

    def _optimizer_step(self, report: LossReport, batch_idx: int, logger: RunLogger | None,
                        values: dict[str, float]) -> None:
        assert self.optimizer is not None and self.objective is not None and self.model is not None
        optimizer = self.optimizer
        if is_distributed():
            # The objective's own parameters (learnable task weights) are outside the DDP-wrapped model.
            params = [p for p in self.objective.parameters() if p.grad is not None]
            for p, g in zip(params, sync_tensors([p.grad for p in params], "mean")):
                p.grad = g
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.grad_clip is not None or (self.check_grads and self.scaler is None):
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if self.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            else:
                norm = _total_norm(params)
            values["grad_norm"] = float(norm)
            # Under a GradScaler an overflow is expected: the scaler skips that step and lowers its scale itself.
            if self.scaler is None and not math.isfinite(values["grad_norm"]) and self._skip_step(batch_idx, values):
                return
        self._call("on_before_optimizer_step", optimizer)
        try:
            if self.scaler is not None:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
        except RuntimeError as exc:  # a finite lr too large for float32 once the optimizer scales it (Adam: x10)
            if "without overflow" not in str(exc):
                raise
            raise AuxLossError(
                f"the optimizer step at step {self.global_step} (epoch {self.epoch}) cannot be computed in float32 "
                f"({exc}): lr={optimizer.param_groups[0].get('lr')!r} is far too large. Lower the learning rate "
                "(usual values lie between 1e-5 and 1).") from None
        optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.objective.advance()
        self.global_step += 1
        self._call("on_train_batch_end", report, batch_idx)
        if logger is not None and self.global_step % self.log_every == 0:
            # the one place step values become Python floats (a device sync), once per logging interval
            logger.log_step(self.global_step, {k: float(v) for k, v in values.items()})


def _length(loader: Iterable[Any]) -> int | None:
    """Batches per epoch, or ``None`` for a stream (a DataLoader over an iterable dataset without ``__len__``)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _total_norm(params: Sequence[Tensor]) -> Tensor:
    """The global L2 norm of the parameters' gradients (what ``clip_grad_norm_`` measures), without clipping."""
    if not params:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in params]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def _f64(value: Any) -> Any:
    """Running sums in float64 (as Python floats would be), on the value's device."""
    return value.to(torch.float64) if isinstance(value, Tensor) else value


def _prefix(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in values.items()}
