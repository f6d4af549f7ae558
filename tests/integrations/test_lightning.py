"""AuxLossModule / AuxLossMixin under a real ``lightning.Trainer`` on CPU, against auxloss's own Trainer.

The strongest checks train the same initial weights on the same batches with SGD through both trainers and
require bit-identical weights afterwards: fixed weights, and a gradient-aware weighting (CosineGating) with
gradient accumulation, which only holds if Lightning's backward really is delegated to the weighting with the
right scale.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss import schedules as S
from auxloss.integrations import MissingExtraError
from auxloss.train import Trainer as AuxTrainer
from auxloss.weighting.base import GradientWeighting, LossWeighting

try:
    import lightning as L
except ImportError:  # pragma: no cover - depends on the extra
    L = None

pytestmark = [
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),  # lightning vs new torch
]

needs_lightning = pytest.mark.skipif(L is None, reason="lightning is not installed (pip install auxloss[lightning])")

N, BATCH = 64, 16


def data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()  # 3 classes
    return TensorDataset(x, y)


def build(seed: int = 0, weight=0.3, weighting=None):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    model = al.attach(net, {"deep": al.Tap("1", al.LinearHead(3))}, example_input=torch.zeros(1, 8))
    objective = al.Objective(aux=[al.Task("deep", source="deep", weight=weight)], weighting=weighting)
    return model, objective


def loader(ds: TensorDataset, shuffle: bool = True, seed: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=BATCH, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def lightning_trainer(**kwargs):
    defaults = {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False}
    return L.Trainer(**{**defaults, **kwargs})


def fit_both(make, *, accumulate: int = 1, lr: float = 0.1):
    """Train two identical copies: one with lightning.Trainer + AuxLossModule, one with auxloss's Trainer."""
    from auxloss.integrations.lightning import AuxLossModule

    ds = data()
    model_l, obj_l = make()
    module = AuxLossModule(model_l, obj_l, optimizer="sgd", lr=lr, momentum=0.9)
    trainer = lightning_trainer(accumulate_grad_batches=accumulate)
    # Unshuffled: Lightning draws from a shuffling loader's generator differently (its second epoch's order
    # differs), and the point here is the same batches in the same order.
    trainer.fit(module, loader(ds, shuffle=False), DataLoader(ds, batch_size=32))
    model_a, obj_a = make()
    AuxTrainer(epochs=2, optimizer="sgd", lr=lr, momentum=0.9, accumulate=accumulate, device="cpu",
               eval_train=False).fit(model_a, obj_a, loader(ds, shuffle=False))  # no val loader: the last weights
    return (module, trainer, model_l, obj_l), (model_a, obj_a)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# -- fixed weights ------------------------------------------------------------------------------------------------
@needs_lightning
def test_fixed_weights_train_exactly_like_auxloss_trainer():
    (_, trainer, model_l, obj_l), (model_a, obj_a) = fit_both(build)
    before, _ = build()
    assert not torch.equal(before.state_dict()["model.0.weight"], model_l.state_dict()["model.0.weight"])
    assert_same_weights(model_l, model_a)
    assert obj_l.step == obj_a.step == trainer.global_step == 8
    metrics = trainer.callback_metrics
    for key in ("train/loss_epoch", "train/loss/main_epoch", "train/loss/deep_epoch", "train/weight/deep_epoch",
                "train/metric/main_epoch", "val/loss", "val/loss/deep", "val/metric/main", "val/metric/deep"):
        assert key in metrics, (key, sorted(metrics))
    assert float(metrics["train/weight/deep_epoch"]) == pytest.approx(0.3)


@needs_lightning
def test_logged_test_losses_equal_an_independent_computation():
    from auxloss.integrations.lightning import AuxLossModule

    ds = data()
    model, objective = build()
    module = AuxLossModule(model, objective, optimizer="adam", lr=1e-2)
    trainer = lightning_trainer(max_epochs=1)
    trainer.fit(module, loader(ds))
    (logged,) = trainer.test(module, DataLoader(ds, batch_size=N), verbose=False)
    x, y = ds.tensors
    model.eval()
    with torch.no_grad():
        out = model(x)
        main = F.cross_entropy(out.main, y)
        deep = F.cross_entropy(out.aux["deep"], y)
        accuracy = (out.main.argmax(1) == y).float().mean()
    assert logged["test/loss/main"] == pytest.approx(float(main), rel=1e-6)
    assert logged["test/loss/deep"] == pytest.approx(float(deep), rel=1e-6)
    assert logged["test/loss"] == pytest.approx(float(main + 0.3 * deep), rel=1e-6)
    assert logged["test/metric/main"] == pytest.approx(float(accuracy))
    assert "test/weight/deep" not in logged


# -- schedules advance per optimizer step ---------------------------------------------------------------------------
@needs_lightning
def test_curriculum_advances_once_per_optimizer_step_with_accumulation():
    from auxloss.integrations.lightning import AuxLossModule

    schedule = S.Curriculum(0.5, start=2, ramp=2)
    model, objective = build(weight=schedule)
    module = AuxLossModule(model, objective, optimizer="sgd", lr=0.05)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([pl_module.objective.step, trainer.global_step, pl_module.objective.epoch])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[-1].append(float(trainer.callback_metrics["train/weight/deep_step"]))

    trainer = lightning_trainer(accumulate_grad_batches=2, callbacks=[Record()])
    trainer.fit(module, loader(data()))
    # 4 batches per epoch, 2 per optimizer step: 2 steps per epoch, 4 in all
    assert trainer.global_step == 4 and objective.step == 4
    assert [s[0] for s in seen] == [s[1] for s in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s[2] for s in seen] == [0] * 4 + [1] * 4  # the objective's epoch follows current_epoch
    assert [s[3] for s in seen] == [schedule(t) for t in [0, 0, 1, 1, 2, 2, 3, 3]]
    assert [s[3] for s in seen][-1] == 0.25


# -- gradient-aware weightings take over backward -------------------------------------------------------------------
class CountingWeighting(GradientWeighting):
    """The plain weighted sum, through the gradient-aware path, recording every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def backward(self, report, ctx):
        self.calls.append((ctx.scale, ctx.scaler))
        total = report.total * ctx.scale if ctx.scale != 1.0 else report.total
        (ctx.scaler.scale(total) if ctx.scaler is not None else total).backward()


@needs_lightning
def test_gradient_weighting_backward_replaces_loss_backward():
    counting = []

    def make():
        weighting = CountingWeighting()
        counting.append(weighting)
        return build(weighting=weighting)

    (_, _, model_l, _), (model_a, _) = fit_both(make, accumulate=2)
    calls_l, calls_a = counting[0].calls, counting[1].calls
    assert len(calls_l) == len(calls_a) == 8  # one per batch, sanity check and validation excluded
    assert calls_l == calls_a == [(0.5, None)] * 8
    assert_same_weights(model_l, model_a)


@needs_lightning
def test_cosine_gating_under_lightning_equals_auxloss_trainer():
    gating = pytest.importorskip("auxloss.weighting.gating", reason="CosineGating is not available")

    def make():
        return build(weighting=gating.CosineGating())

    (_, trainer, model_l, obj_l), (model_a, obj_a) = fit_both(make, accumulate=2)
    assert obj_l.weighting.n_backward_calls == obj_a.weighting.n_backward_calls == 8 * 2  # 1 + K per batch
    assert_same_weights(model_l, model_a)
    assert any(k.startswith("train/cos/deep") for k in trainer.callback_metrics)  # telemetry is logged


@needs_lightning
def test_amortized_gating_under_lightning_equals_auxloss_trainer():
    """Amortized steps put the cached multiplier on the head's gradient into the trunk at its tap (the step
    protocol's before_step); with weighted gating that multiplier is not 1, so the head's own parameters would
    differ if either trainer skipped the per-tap scaling."""
    gating = pytest.importorskip("auxloss.weighting.gating", reason="CosineGating is not available")

    def make():
        return build(weighting=gating.CosineGating(weighted=True, mode="amortized", every=3))

    (_, _, model_l, obj_l), (model_a, obj_a) = fit_both(make, accumulate=2)
    # 8 backward calls: refreshes at 0, 3, 6 take 1 + K = 2 passes, the 5 amortized ones a single pass
    assert obj_l.weighting.n_backward_calls == obj_a.weighting.n_backward_calls == 3 * 2 + 5
    assert 0.0 < float(obj_a.weighting._cached[0]) < 1.0  # a multiplier that changes the head's gradient
    assert_same_weights(model_l, model_a)


@needs_lightning
@pytest.mark.parametrize("kind", ["gating", "metabalance"])
def test_representation_mode_under_lightning_equals_auxloss_trainer(kind):
    """Representation mode keeps the taps' outputs for one training forward, takes the statistics there and makes
    one backward per micro-batch. Under Lightning the same weights must come out as under auxloss's Trainer, with
    gradient accumulation (the statistics of each micro-batch, the update scaled by 1/accumulate), and MetaBalance's
    moving averages carried from step to step."""
    from auxloss.weighting.gating import CosineGating
    from auxloss.weighting.metabalance import MetaBalance

    def make():
        strategy = CosineGating(mode="representation") if kind == "gating" else MetaBalance(mode="representation")
        return build(weighting=strategy)

    (_, _, model_l, obj_l), (model_a, obj_a) = fit_both(make, accumulate=2)
    assert obj_l.weighting.n_backward_calls == obj_a.weighting.n_backward_calls == 8  # one backward per batch
    assert_same_weights(model_l, model_a)
    if kind == "metabalance":
        sl, sa = obj_l.weighting.state_dict(), obj_a.weighting.state_dict()
        assert sl.keys() == sa.keys() and sl  # the moving averages exist and match
        for key in sl:
            if isinstance(sl[key], torch.Tensor):
                assert torch.equal(sl[key], sa[key]), key
            else:
                assert sl[key] == sa[key], key


@needs_lightning
def test_gradient_weighting_gets_lightnings_grad_scaler():
    """fp16 with a GradScaler (CPU autocast; Lightning's own "16-mixed" falls back to bf16 on CPU, so the plugin is
    given explicitly): the weighting must scale its per-task losses with Lightning's scaler, which then unscales
    before the step. Without it the update would be 1024 times too small."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from auxloss.integrations.lightning import AuxLossModule

    gating = pytest.importorskip("auxloss.weighting.gating", reason="CosineGating is not available")
    states = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model, objective = build(weighting=gating.CosineGating())
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)] if scaler is not None else None
        trainer = lightning_trainer(plugins=plugins)
        trainer.fit(AuxLossModule(model, objective, optimizer="sgd", lr=0.1), loader(data(), shuffle=False))
        states.append(model.state_dict())
    assert trainer.precision_plugin.scaler is scaler and scaler.get_scale() == 2.0**10  # no overflow, no skip
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], atol=1e-3, rtol=0)  # fp16 vs fp32 maths


@needs_lightning
def test_gradient_weighting_needs_the_report():
    import lightning.pytorch as pl

    from auxloss.integrations.lightning import AuxLossMixin

    class Bad(AuxLossMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.aux_model, self.objective = build(weighting=CountingWeighting())

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.aux_model(x).main, y)  # never calls auxloss_step

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(al.AuxLossError, match="auxloss_step"):
        lightning_trainer(max_epochs=1).fit(Bad(), loader(data()))


# -- your own LightningModule with the mixin ----------------------------------------------------------------------
@needs_lightning
def test_mixin_with_manual_optimization():
    import lightning.pytorch as pl

    from auxloss.integrations.lightning import AuxLossMixin

    class Manual(AuxLossMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.aux_model, self.objective = build(weight=S.Linear(0.0, 1.0, begin=0, stop=8), weighting=CountingWeighting())

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            report = self.auxloss_step(batch)
            opt.zero_grad()
            self.manual_backward(report.total)  # delegated to the weighting
            opt.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Manual()
    trainer = lightning_trainer()
    trainer.fit(module, loader(data()))
    assert trainer.global_step == module.objective.step == 8
    assert module.objective.weighting.calls == [(1.0, None)] * 8


class Recorder(LossWeighting):
    """Records the events a weighting receives."""

    def __init__(self):
        super().__init__()
        self.validations, self.epochs = [], []

    def on_validation_end(self, metrics, *, higher_is_better):
        self.validations.append(dict(metrics))

    def on_epoch_end(self, epoch):
        self.epochs.append(epoch)


@needs_lightning
def test_validation_and_epoch_events_reach_the_weighting():
    from auxloss.integrations.lightning import AuxLossModule

    recorder = Recorder()
    model, objective = build(weighting=recorder)
    module = AuxLossModule(model, objective, optimizer="sgd", lr=0.1)
    trainer = lightning_trainer()
    ds = data()
    trainer.fit(module, loader(ds), DataLoader(ds, batch_size=24))  # batches of 24, 24, 16: a weighted mean
    assert recorder.epochs == [1, 2]
    assert len(recorder.validations) == 2  # not during the sanity check
    last = recorder.validations[-1]
    assert {"val/metric/main", "val/loss/main", "val/loss/deep", "val/loss"} <= set(last)
    for key in ("val/metric/main", "val/loss/deep"):
        assert last[key] == pytest.approx(float(trainer.callback_metrics[key]), rel=1e-5)
    trainer.validate(module, DataLoader(ds, batch_size=24), verbose=False)
    assert len(recorder.validations) == 2  # validating outside fit() does not move the weighting on
    model.eval()
    with torch.no_grad():
        x, y = ds.tensors
        assert last["val/loss/main"] == pytest.approx(float(F.cross_entropy(model(x).main, y)), rel=1e-5)


@needs_lightning
def test_learnable_task_weights_and_olaux_learning_rate():
    from auxloss.integrations.lightning import AuxLossModule
    from auxloss.weighting.olaux import OLAux
    from auxloss.weighting.uncertainty import Uncertainty

    model, objective = build(weighting=Uncertainty())
    before = [p.detach().clone() for p in objective.parameters()]
    assert before  # the objective has learnable weights, optimized with the model's parameters
    lightning_trainer(max_epochs=1).fit(AuxLossModule(model, objective, optimizer="sgd", lr=0.1), loader(data()))
    assert any(not torch.equal(a, b) for a, b in zip(before, objective.parameters()))

    model, objective = build(weighting=OLAux(horizon=2))  # no lr given: the module passes the optimizer's
    module = AuxLossModule(model, objective, optimizer="sgd", lr=0.05,
                           lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    lightning_trainer(max_epochs=1).fit(module, loader(data()))
    assert objective.weighting.lr == pytest.approx(0.05 * 0.5 ** 3)  # the lr of the last step (4th)


# -- without Lightning ----------------------------------------------------------------------------------------------
def test_missing_lightning_says_how_to_install(monkeypatch):
    import auxloss.integrations.lightning as integration

    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.delitem(vars(integration), "AuxLossModule", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install auxloss\[lightning\]") as err:
        from auxloss.integrations.lightning import AuxLossModule  # noqa: F401
    assert isinstance(err.value, ImportError)
    assert integration.AuxLossMixin  # the mixin itself needs no Lightning to import
    monkeypatch.delitem(vars(integration), "AuxLossModule", raising=False)


@needs_lightning
def test_autolambda_under_lightning_draws_validation_batches_like_auxloss_trainer():
    """A look-ahead weighting gets the fit's validation loader (never a test one) as a batch stream, and trains the
    same weights as auxloss's own Trainer."""
    from auxloss.integrations.lightning import AuxLossModule
    from auxloss.weighting.autolambda import AutoLambda

    ds, val = data(), data(seed=1)

    def make():
        return build(weighting=AutoLambda(lr=0.01))

    model_l, obj_l = make()
    module = AuxLossModule(model_l, obj_l, optimizer="sgd", lr=0.1, momentum=0.9)
    lightning_trainer(num_sanity_val_steps=0).fit(module, loader(ds, shuffle=False), DataLoader(val, batch_size=24))
    model_a, obj_a = make()
    AuxTrainer(epochs=2, optimizer="sgd", lr=0.1, momentum=0.9, device="cpu", eval_train=False).fit(
        model_a, obj_a, loader(ds, shuffle=False), DataLoader(val, batch_size=24))
    assert obj_l.weighting.updates == obj_a.weighting.updates == 8
    assert torch.equal(obj_l.weighting.aux_weights, obj_a.weighting.aux_weights)
    assert_same_weights(model_l, model_a)
    model_n, obj_n = make()
    with pytest.raises(al.AuxLossError, match="val_dataloaders"):
        lightning_trainer(max_epochs=1).fit(AuxLossModule(model_n, obj_n), loader(ds))
