"""PyTorch Lightning: auxiliary heads, the objective and every weighting in a ``LightningModule``.

Two ways in:

- :class:`AuxLossModule` (a ``lightning.LightningModule``): give it the model with heads, the objective and an
  optimizer, and hand it to ``lightning.Trainer.fit``.
- :class:`AuxLossMixin`: put it first among the bases of your own module
  (``class Net(AuxLossMixin, L.LightningModule)``), set ``self.aux_model`` and ``self.objective`` in ``__init__``,
  and keep your own ``configure_optimizers`` (and ``training_step``, calling :meth:`AuxLossMixin.auxloss_step`).

What the mixin does with Lightning's hooks:

- ``training_step``/``validation_step``/``test_step`` run the model and the objective and ``self.log`` every
  task's loss, weight and metric (``train/loss/main``, ``val/metric/aux1``...), plus the weighting's telemetry;
- the objective's step counter advances once per *optimizer* step (``on_train_batch_end`` adds the change of
  ``trainer.global_step``, so gradient accumulation and manual optimization count right), and its epoch follows
  ``current_epoch``;
- ``objective.on_validation_end`` gets the epoch's validation means (``val/metric/main``, ``val/loss/<task>``;
  not during the sanity check) and ``objective.on_epoch_end`` the 1-based epoch after each training epoch;
- **the step protocol**, as in auxloss's own Trainer: ``auxloss_step`` calls ``objective.before_step(ctx)``
  before the forward (the learning rate, the model for per-tap multipliers of amortized steps,
  ``scale=1/accumulate_grad_batches``, Lightning's GradScaler), and the mixin overrides
  ``LightningModule.backward`` to call ``objective.backward(report, ctx)`` instead of ``loss.backward()``, so
  gradient-aware weightings (``CosineGating``...) apply their own method. Lightning keeps automatic optimization,
  so its gradient clipping, accumulation, LR schedulers and precision plugins work unchanged.
  ``training_step`` must then return ``report.total`` as it is.

Lightning is imported only when :class:`AuxLossModule` is first used; without it the import fails with
``pip install auxloss[lightning]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from auxloss._distributed import sync_tensors, world_size
from auxloss.errors import AuxLossError
from auxloss.integrations import MissingExtraError, require
from auxloss.objective import Objective
from auxloss.step import LossReport, StepContext

# AuxLossModule is built on first access (see __getattr__ at the end), so that importing needs no Lightning.
__all__ = ["AuxLossMixin", "AuxLossModule", "lightning_module_base"]  # noqa: F822

STAGES = ("train", "val", "test")


class AuxLossMixin:
    """Lightning hooks for an auxiliary-loss model. Put it before ``LightningModule`` among the bases.

    The module must have ``aux_model`` (the model, usually an :class:`~auxloss.AuxModel`) and ``objective`` (an
    :class:`~auxloss.Objective`) attributes. Every hook it overrides calls ``super()``, so your own overrides
    keep working when they call ``super()`` too.

    Example::

        class Net(AuxLossMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.aux_model = al.attach(backbone, {"deep": al.Tap("layer2", al.LinearHead(10))}, example_input=x)
                self.objective = al.Objective(aux=[al.Task("deep", source="deep", weight=0.3)])

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)
    """

    #: Log each training step's values too (``train/loss_step``); epoch means are always logged.
    auxloss_log_steps: bool = True

    # -- the step ------------------------------------------------------------------------------------------------
    def _auxloss_parts(self) -> tuple[nn.Module, Objective]:
        model = getattr(self, "aux_model", None)
        objective = getattr(self, "objective", None)
        if not isinstance(model, nn.Module) or not isinstance(objective, Objective):
            raise AuxLossError(
                f"{type(self).__name__} uses AuxLossMixin but has no `aux_model` (an nn.Module) and `objective` (an "
                "auxloss.Objective) attributes; set both in __init__ after super().__init__()."
            )
        return model, objective

    def auxloss_step(self, batch: Any, stage: str = "train") -> LossReport:
        """Forward the batch through ``aux_model``, score it with ``objective``, log the report; returns it.

        In training it makes the step protocol's first call, ``objective.before_step(ctx)``, before the forward,
        and keeps the report and the context for :meth:`backward` (a gradient-aware weighting needs every task's
        loss, not only the total).
        """
        if stage not in STAGES:
            raise AuxLossError(f"stage must be one of {STAGES}, got {stage!r}.")
        model, objective = self._auxloss_parts()
        ctx = None
        if stage == "train":
            ctx = self._auxloss_context(model)
            objective.before_step(ctx)
        outputs = model(objective.inputs(batch))
        report = objective(outputs, batch)
        if stage == "train":
            self.__dict__["_auxloss_step"] = (report, ctx)
        if not report.finite:  # nonfinite="skip": nothing sensible to log; training_step returns None
            return report
        # Detached tensors (no device sync here): Lightning averages them on the device and converts them where
        # it writes its logs.
        values = report.detached()
        n = report.batch_size or None
        if stage == "train":
            self.log("train/loss", values.pop("loss"), prog_bar=True, on_step=self.auxloss_log_steps, on_epoch=True,
                     batch_size=n)
            self.log_dict({f"train/{k}": v for k, v in values.items()}, on_step=self.auxloss_log_steps,
                          on_epoch=True, batch_size=n)
        else:
            values = {k: v for k, v in values.items() if not k.startswith("weight/")}
            self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, on_step=False, on_epoch=True,
                          batch_size=n, sync_dist=True)
            if stage == "val":
                self._auxloss_accumulate(values, report.batch_size)
        return report

    def _auxloss_context(self, model: nn.Module) -> StepContext:
        """What Lightning knows about the coming step, for the step protocol."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:  # called outside a Lightning fit
            return StepContext(model=model)
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        scale = 1.0
        if self.automatic_optimization:  # type: ignore[attr-defined]
            scale = 1.0 / trainer.accumulate_grad_batches  # what Lightning divides the returned loss by
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return StepContext(lr=lr, model=model, scale=scale, scaler=scaler, validation=self._auxloss_validation(trainer))

    def _auxloss_validation(self, trainer: Any) -> Any:
        """For a look-ahead weighting (``needs_validation``): an endless stream over the fit's validation loader,
        built once (never the test loader). ``None`` for every other weighting."""
        _, objective = self._auxloss_parts()
        weighting = objective.weighting
        if weighting is None or not weighting.needs_validation:
            return None
        stream = self.__dict__.get("_auxloss_val_stream")
        if stream is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
            if loader is None:
                raise AuxLossError(
                    f"{type(weighting).__name__} learns its weights from the main task's loss on validation batches: "
                    "give trainer.fit a val_dataloaders (a split held out from training, never the test split)."
                )
            from auxloss.train.batches import ValidationStream  # the trainer's, so both loops draw alike

            stream = ValidationStream(loader, self.device)  # type: ignore[attr-defined]
            self.__dict__["_auxloss_val_stream"] = stream
        return stream

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        report = self.auxloss_step(batch, "train")
        return report.total if report.finite else None  # None: Lightning skips the update

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.auxloss_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.auxloss_step(batch, "test")

    # -- backward: the objective's configured method -----------------------------------------------------------
    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """``objective.backward(report, ctx)`` on the report :meth:`auxloss_step` kept: the step protocol's second
        call, the same as in auxloss's own Trainer (a gradient-aware weighting applies its own method).

        ``loss`` is what Lightning made of ``training_step``'s return value (divided by ``accumulate_grad_batches``,
        scaled by the GradScaler); the objective recomputes the same from the report with the context's ``scale``
        and ``scaler``. Without a kept report (a ``training_step`` that did not call :meth:`auxloss_step`),
        Lightning's own ``loss.backward()`` runs, which a gradient-aware weighting cannot allow.
        """
        objective = getattr(self, "objective", None)
        kept = self.__dict__.pop("_auxloss_step", None)
        if kept is None:
            if isinstance(objective, Objective) and objective.custom_backward:
                raise AuxLossError(
                    f"{type(objective.weighting).__name__} is gradient-aware and needs this step's LossReport, but "
                    "no auxloss_step(batch) ran in training_step since the last backward. Call "
                    "report = self.auxloss_step(batch) in training_step and return report.total."
                )
            super().backward(loss, *args, **kwargs)  # type: ignore[misc]
            return
        report, ctx = kept
        assert isinstance(objective, Objective)
        objective.backward(report, ctx)

    # -- counters and events -------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        self.__dict__["_auxloss_global_step"] = self.trainer.global_step  # type: ignore[attr-defined]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()  # type: ignore[misc]
        _, objective = self._auxloss_parts()
        objective.set_epoch(self.current_epoch)  # type: ignore[attr-defined]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # type: ignore[misc]
        self.__dict__.pop("_auxloss_step", None)  # a skipped step's report must not reach a later backward
        # One objective step per optimizer step: global_step counts optimizer steps, so a batch that only
        # accumulates gradients (or that was skipped) adds nothing, and manual optimization counts its opt.step()s.
        now = self.trainer.global_step  # type: ignore[attr-defined]
        last = self.__dict__.get("_auxloss_global_step", now)
        if now > last:
            _, objective = self._auxloss_parts()
            objective.advance(now - last)
        self.__dict__["_auxloss_global_step"] = now

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # type: ignore[misc]
        _, objective = self._auxloss_parts()
        objective.on_epoch_end(self.current_epoch + 1)  # type: ignore[attr-defined]

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()  # type: ignore[misc]
        self.__dict__["_auxloss_val"] = ({}, 0)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()  # type: ignore[misc]
        sums, count = self.__dict__.pop("_auxloss_val", ({}, 0))
        trainer = self.trainer  # type: ignore[attr-defined]
        # Only validation inside fit() moves the weighting on; trainer.validate() leaves it alone (as auxloss's
        # Trainer, which calls on_validation_end only while training).
        if trainer.sanity_checking or getattr(trainer.state, "fn", None) != "fit" or not sums:
            return
        keys = sorted(sums)
        if world_size() > 1:  # every process saw its own shard: sum over all of them
            synced = sync_tensors([sums[k] for k in keys] + [torch.tensor(float(count), dtype=torch.float64,
                                                                        device=sums[keys[0]].device)], "sum")
            sums, count = dict(zip(keys, synced[:-1])), float(synced[-1])  # type: ignore[arg-type]
        metrics = {f"val/{k}": float(sums[k]) / count for k in keys}  # floats once per epoch
        _, objective = self._auxloss_parts()
        objective.on_validation_end(metrics)

    def _auxloss_accumulate(self, values: dict[str, Any], n: int) -> None:
        # Batch-size-weighted sums kept as float64 tensors on their device: no device sync per batch.
        sums, count = self.__dict__.get("_auxloss_val", ({}, 0))
        for k, v in values.items():
            v = torch.as_tensor(v, dtype=torch.float64, device=v.device if isinstance(v, Tensor) else self.device)
            sums[k] = sums.get(k, 0.0) + v * n
        self.__dict__["_auxloss_val"] = (sums, count + n)


def lightning_module_base() -> type:
    """``lightning.LightningModule`` (or ``pytorch_lightning.LightningModule`` when only that is installed)."""
    try:
        return require("lightning", "lightning").LightningModule
    except MissingExtraError as first:
        try:
            return require("pytorch_lightning", "lightning").LightningModule
        except MissingExtraError:
            raise first from None


def _build_module_class() -> type:
    base = lightning_module_base()

    class AuxLossModule(AuxLossMixin, base):  # type: ignore[misc, valid-type]
        """A ``LightningModule`` training ``model`` (with its heads) on ``objective``.

        Args:
            model: the model, usually an :class:`~auxloss.AuxModel` from :func:`auxloss.attach`.
            objective: the :class:`~auxloss.Objective`, with any weighting (gradient-aware ones included).
            optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` (with ``lr``, ``weight_decay``, ``momentum``) or a
                callable ``params -> Optimizer``. The objective's own parameters (learnable task weights) are
                optimized with the model's.
            lr_scheduler: a callable ``optimizer -> LRScheduler``, stepped every optimizer step (or every epoch
                with ``lr_scheduler_interval="epoch"``).

        ``forward(x)`` returns the model's :class:`~auxloss.Outputs`.
        """

        def __init__(
            self,
            model: nn.Module,
            objective: Objective,
            *,
            optimizer: str | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = "adam",
            lr: float = 1e-3,
            weight_decay: float = 0.0,
            momentum: float = 0.9,
            lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
            lr_scheduler_interval: str = "step",
        ) -> None:
            super().__init__()
            from auxloss.train.trainer import Trainer

            if not isinstance(model, nn.Module):
                raise AuxLossError(f"model must be an nn.Module, got {type(model).__name__}.")
            if not isinstance(objective, Objective):
                raise AuxLossError(f"objective must be an auxloss.Objective, got {type(objective).__name__}.")
            if lr_scheduler_interval not in ("step", "epoch"):
                raise AuxLossError(f"lr_scheduler_interval must be 'step' or 'epoch', got {lr_scheduler_interval!r}.")
            self.aux_model = model
            self.objective = objective
            # auxloss's own Trainer validates and builds the optimizer, so both train the same way.
            self._optimizer_builder = Trainer(optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                                              momentum=momentum)
            self._lr_scheduler = lr_scheduler
            self._lr_scheduler_interval = lr_scheduler_interval

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.aux_model(*args, **kwargs)

        def configure_optimizers(self) -> Any:
            optimizer = self._optimizer_builder.build_optimizer(self.parameters())
            if self._lr_scheduler is None:
                return optimizer
            scheduler = self._lr_scheduler(optimizer)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "interval": self._lr_scheduler_interval}}

    AuxLossModule.__module__ = __name__
    AuxLossModule.__qualname__ = "AuxLossModule"
    return AuxLossModule


def __getattr__(name: str) -> Any:
    # AuxLossModule subclasses LightningModule, so it is built when first asked for: importing this module never
    # needs Lightning, and without it `from auxloss.integrations.lightning import AuxLossModule` raises
    # MissingExtraError (an ImportError) saying `pip install auxloss[lightning]`.
    if name == "AuxLossModule":
        cls = _build_module_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
