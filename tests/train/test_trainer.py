import csv
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss.train import Callback, Trainer


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def model_and_objective(seed=0, weight=0.3):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    m = al.attach(net, {"aux": al.Tap("1", al.LinearHead(2))}, example_input=torch.randn(1, 6))
    return m, al.Objective(aux=[al.Task("aux", source="aux", weight=weight)])


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            calls = object.__getattribute__(self, "calls")
            return lambda *a: calls.append(name)
        return object.__getattribute__(self, name)


def test_hooks_are_called_in_lightning_order():
    m, obj = model_and_objective()
    rec = Recorder()
    loader = DataLoader(data(8), batch_size=4)
    Trainer(epochs=1, callbacks=[rec], eval_train=False).fit(m, obj, loader, loader)
    step = ["on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
            "on_train_batch_end"]
    assert rec.calls == ["on_fit_start", "on_epoch_start", *step, *step, "on_validation_end", "on_epoch_end",
                         "on_fit_end"]


def test_accumulation_matches_one_large_batch():
    # Two micro-batches of 8 with accumulate=2 give the same SGD update as one batch of 16.
    ds = data(16)
    results = []
    for bs, acc in ((16, 1), (8, 2)):
        m, obj = model_and_objective()
        m = m.double()
        ds64 = TensorDataset(ds.tensors[0].double(), ds.tensors[1])
        Trainer(epochs=1, optimizer="sgd", momentum=0.0, lr=0.1, accumulate=acc, eval_train=False).fit(
            m, obj, DataLoader(ds64, batch_size=bs))
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-12)


def test_best_epoch_is_chosen_on_validation_and_restored(tmp_path):
    m, obj = model_and_objective()
    train, val, test = (DataLoader(data(64, s), batch_size=16) for s in (0, 1, 2))
    result = Trainer(epochs=6, lr=0.05, log_dir=tmp_path, test_every_epoch=True).fit(m, obj, train, val, test)
    vals = [r["val/metric/main"] for r in result.history]
    assert result.best_epoch == 1 + vals.index(max(vals))
    chosen = result.history[result.best_epoch - 1]
    assert result.best["test/metric/main"] == chosen["test/metric/main"]
    # By default the test split is evaluated once, after training, on the best epoch's weights: same number.
    m2, obj2 = model_and_objective()
    train, val, test = (DataLoader(data(64, s), batch_size=16) for s in (0, 1, 2))
    once = Trainer(epochs=6, lr=0.05).fit(m2, obj2, train, val, test)
    assert once.best["test/metric/main"] == result.best["test/metric/main"]
    assert "test/metric/main" not in once.history[0]
    # The restored weights are the best epoch's: evaluating again reproduces its validation metric.
    again = Trainer(epochs=1).evaluate(m, obj, val)
    assert again["metric/main"] == pytest.approx(chosen["val/metric/main"])
    rows = list(csv.DictReader((tmp_path / "epochs.csv").read_text().splitlines()))
    assert len(rows) == 6 and float(rows[2]["val/metric/main"]) == pytest.approx(vals[2])
    lines = [json.loads(line) for line in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5, 6]
    # the history tracks each task's loss, weight and metric, and the train/validation gap
    for key in ("train/loss/aux", "train/weight/aux", "val/metric/aux", "gap", "trainval/metric/main"):
        assert key in chosen
    assert chosen["gap"] == pytest.approx(chosen["trainval/metric/main"] - chosen["val/metric/main"])


def test_early_stopping_stops_when_validation_stalls():
    m, obj = model_and_objective()
    loader = DataLoader(data(32), batch_size=16)
    # lr so small that the validation metric cannot improve after the first epoch
    result = Trainer(epochs=10, lr=1e-12, patience=2).fit(m, obj, loader, loader)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1


def test_skip_policy_drops_nonfinite_steps():
    m, obj = model_and_objective()
    obj.nonfinite = "skip"
    x, y = data(32).tensors
    x[:16] = float("nan")
    before = [p.detach().clone() for p in m.parameters()]
    Trainer(epochs=1, lr=0.1, eval_train=False).fit(m, obj, DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16))
    assert obj.skipped_steps == 1
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, m.parameters()))


def test_plain_model_trains_as_a_baseline():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    loader = DataLoader(data(128), batch_size=32)
    result = Trainer(epochs=5, lr=0.05).fit(net, al.Objective(), loader, loader)
    assert result.best["val/metric/main"] > 0.85


def test_grad_clip_and_lr_schedule():
    m, obj = model_and_objective()
    loader = DataLoader(data(64), batch_size=16)
    seen = []

    class Norm(Callback):
        def on_before_optimizer_step(self, trainer, optimizer):
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))))

    result = Trainer(epochs=2, lr=0.5, grad_clip=0.01, lr_schedule="cosine", callbacks=[Norm()]).fit(
        m, obj, loader)
    assert max(seen) <= 0.01 + 1e-6
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine to zero over all steps


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs"), ({"accumulate": 0}, "accumulate"), ({"lr": -1.0}, "lr"),
    ({"amp": "fp8"}, "amp"), ({"patience": 0}, "patience"), ({"grad_clip": -1.0}, "grad_clip"),
])
def test_bad_trainer_arguments(kwargs, match):
    with pytest.raises(al.AuxLossError, match=match):
        Trainer(**kwargs)
