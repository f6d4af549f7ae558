"""Auto-Lambda (Liu et al. 2022, auxiliary mode) against a float64 hand computation of the one-step look-ahead, the
validation stream the Trainer hands it, and a proof that it never touches the test split."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _tiny import AUX, LAMBDA, batch, build, reference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss.step import StepContext
from auxloss.train import Trainer
from auxloss.train.trainer import ValidationStream
from auxloss.weighting.autolambda import AutoLambda
from auxloss.weighting.registry import build_weighting

SHARED = {
    "aux1": ["model.0.weight", "model.0.bias"],
    "aux2": ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"],
}


def val_batches(start=100):
    seed = start
    while True:
        yield batch(seed)
        seed += 1


def test_autolambda_takes_the_papers_look_ahead_step_then_trains_with_the_new_weights():
    alpha, meta_lr = 0.3, 0.05
    weighting = AutoLambda(lr=meta_lr, init=1.0)
    model, objective = build(weighting)
    w = torch.ones(2, dtype=torch.float64)
    m = torch.zeros(2, dtype=torch.float64)
    v2 = torch.zeros(2, dtype=torch.float64)
    for t in range(3):
        model.zero_grad()
        ctx = StepContext(model=model, lr=alpha, validation=val_batches(100 + t))
        objective.before_step(ctx)
        report, grads = reference(model, objective, batch(t))
        # the virtual step θ' = θ − α(g_0 + Σ w_k λ_k g_k), on a copy, and the main loss of a validation batch there
        ahead = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in ahead.named_parameters():
                d = grads["main"][n] if grads["main"][n] is not None else torch.zeros_like(p)
                for i, k in enumerate(AUX):
                    if grads[k][n] is not None:
                        d = d + w[i] * LAMBDA[k] * grads[k][n]
                p -= alpha * d
        vb = batch(100 + t)
        val_loss = F.cross_entropy(ahead(vb["input"]).main, vb["target"])
        names, params = zip(*ahead.named_parameters())
        vgrad = dict(zip(names, torch.autograd.grad(val_loss, params, allow_unused=True)))
        hyper = torch.tensor([-alpha * LAMBDA[k] * sum(float((vgrad[n] * grads[k][n]).sum()) for n in names
                                                        if vgrad[n] is not None and grads[k][n] is not None)
                              for k in AUX], dtype=torch.float64)
        m = 0.9 * m + 0.1 * hyper
        v2 = 0.999 * v2 + 0.001 * hyper ** 2
        w = (w - meta_lr * (m / (1 - 0.9 ** (t + 1))) / ((v2 / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)).clamp(min=0)
        objective.backward(report, ctx)
        torch.testing.assert_close(weighting.aux_weights, w, atol=1e-12, rtol=0)
        for n, p in model.named_parameters():
            expected = grads["main"][n]
            for i, k in enumerate(AUX):
                gk = grads[k][n]
                if gk is not None:
                    coef = w[i] * LAMBDA[k] if n in SHARED[k] else LAMBDA[k]
                    expected = coef * gk if expected is None else expected + coef * gk
            torch.testing.assert_close(p.grad, expected, atol=1e-10, rtol=0, msg=n)
        assert float(weighting.telemetry()["autol/val_loss"]) == pytest.approx(float(val_loss.detach()), abs=1e-12)
        with torch.no_grad():
            for p in model.parameters():
                p -= alpha * p.grad
        objective.advance()
    assert weighting.updates == 3 and weighting.n_backward_calls == 3 * (3 + 1)


def test_autolambda_names_what_the_step_context_lacks():
    model, objective = build(AutoLambda())
    b = batch(0)
    with pytest.raises(al.AuxLossError, match="validation"):
        objective.backward(objective(model(b["input"]), b), StepContext(model=model, lr=0.1))
    for kw in ({"lr": 0}, {"init": -1.0}, {"betas": (0.9, 1.0)}):
        with pytest.raises(al.AuxLossError):
            AutoLambda(**kw)
    assert isinstance(build_weighting({"type": "auto_lambda", "lr": 1e-2}), AutoLambda)
    assert repr(AutoLambda()) == ("AutoLambda(lr=0.001, init=1.0, betas=(0.9, 0.999), eps=1e-08, mode='exact', "
                                  "every=10, stats_params=None, params=None)")


def test_validation_stream_cycles_leaves_the_global_rng_alone_and_resumes_in_place():
    loader = DataLoader(TensorDataset(torch.arange(5.0)), batch_size=2)
    stream = ValidationStream(loader, "cpu")
    before = torch.get_rng_state()
    taken = [float(next(stream)[0][0]) for _ in range(5)]
    assert taken == [0.0, 2.0, 4.0, 0.0, 2.0] and stream.position == 2
    assert torch.equal(torch.get_rng_state(), before)
    resumed = ValidationStream(loader, "cpu", position=stream.position)
    assert float(next(resumed)[0][0]) == float(next(stream)[0][0]) == 4.0
    with pytest.raises(al.AuxLossError, match="empty"):
        next(ValidationStream([], "cpu"))


class GuardedLoader:
    """A test split that fails the run if anything reads it while the model is training."""

    def __init__(self, data, model_ref):
        self.loader = DataLoader(data, batch_size=16)
        self.model_ref = model_ref
        self.reads = 0

    def __iter__(self):
        if self.model_ref[0].training:
            raise AssertionError("the test split was read during training")
        self.reads += 1
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def make(x, weighting):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    model = al.attach(net, {"aux": al.Tap("1", al.LinearHead(2))}, example_input=x[:1])
    return model, al.Objective(aux=[al.Task("aux", source="aux", weight=0.5)], weighting=weighting)


def test_the_trainer_feeds_validation_batches_and_never_the_test_split():
    x, y = problem()
    model, objective = make(x, AutoLambda(lr=0.01))
    train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8)
    val = DataLoader(TensorDataset(x[32:48], y[32:48]), batch_size=8)
    test = GuardedLoader(TensorDataset(x[48:], y[48:]), [model])
    result = Trainer(epochs=2, lr=0.05, eval_train=False, device="cpu").fit(model, objective, train, val, test)
    weighting = objective.weighting
    assert weighting.updates == 8  # one look-ahead per training step, each on a validation batch
    assert test.reads == 1 and "test/metric/main" in result.best  # read once, after training, in eval mode
    with pytest.raises(al.AuxLossError, match="val_loader"):
        Trainer(epochs=1, eval_train=False, device="cpu").fit(*make(x, AutoLambda()), train)


def test_the_trainer_resumes_autolambda_bit_identically(tmp_path):
    x, y = problem()
    train = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=8, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(x[40:], y[40:]), batch_size=7)  # 24 samples: passes do not align with epochs

    def fit(epochs, folder):
        model, objective = make(x, AutoLambda(lr=0.05, mode="amortized", every=2))
        train.generator.manual_seed(1)
        Trainer(epochs=epochs, lr=0.05, eval_train=False, checkpoint_dir=folder, device="cpu").fit(
            model, objective, train, val)
        return model, objective

    whole, o1 = fit(3, tmp_path / "a")
    fit(1, tmp_path / "b")
    resumed, o2 = fit(3, tmp_path / "b")
    assert torch.equal(o1.weighting.aux_weights, o2.weighting.aux_weights)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
