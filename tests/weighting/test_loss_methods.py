"""Loss-based weightings: hand computations, evaluation never changing state, checkpoints, the registry, and
a short end-to-end fit of each strategy."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss.errors import AuxLossError
from auxloss.train import Callback, Trainer
from auxloss.weighting.dwa import DWA, dwa_weights
from auxloss.weighting.gradnorm import GradNorm
from auxloss.weighting.progress import MainProgress
from auxloss.weighting.registry import WEIGHTINGS, build_weighting
from auxloss.weighting.uncertainty import Uncertainty

AUX = ["aux1", "aux2"]


def bound(w, aux=AUX):
    w.bind("main", list(aux))
    return w


def losses_of(*values, names=("main", *AUX), requires_grad=False):
    return {n: torch.tensor(float(v), dtype=torch.float64, requires_grad=requires_grad) for n, v in zip(names, values)}


def state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
        else:
            assert a[k] == b[k], k


# -- MainProgress --------------------------------------------------------------------------------------------


def test_main_progress_follows_the_hand_worked_sequence():
    w = bound(MainProgress(start=0.1, step=0.1, min=0.0, max=0.3, patience=2))
    # (validation accuracy, multiplier after it)
    sequence = [
        (0.50, 0.1),  # first validation: the reference, no change
        (0.60, 0.2),  # new best: up
        (0.70, 0.3),  # new best: up
        (0.80, 0.3),  # new best: up, clipped at max
        (0.80, 0.3),  # stalled once (patience 2): hold
        (0.80, 0.2),  # stalled twice: down
        (0.70, 0.1),  # worse than the previous validation: down at once
        (0.75, 0.1),  # better than last but no new best: stalled once
        (0.75, 0.0),  # stalled twice: down
        (0.75, 0.0),  # stalled once
        (0.75, 0.0),  # stalled twice: down, clipped at min
        (0.90, 0.1),  # new best: up
    ]
    for value, expected in sequence:
        w.on_validation_end({"val/metric/main": value, "val/loss/main": 123.0}, higher_is_better=True)
        assert w.mult == pytest.approx(expected, abs=1e-12)
        assert w.multipliers({}, step=0, epoch=0) == {"aux1": w.mult, "aux2": w.mult}  # shared by every task
    assert w.telemetry() == {"mult/aux1": w.mult, "mult/aux2": w.mult}


def test_main_progress_falls_back_on_the_validation_loss_lower_is_better():
    w = bound(MainProgress(start=0.5, step=0.25))
    for loss, expected in [(2.0, 0.5), (1.0, 0.75), (1.5, 0.5), (0.5, 0.75)]:
        w.on_validation_end({"val/loss/main": loss}, higher_is_better=True)  # the flag is the metric's, not the loss's
        assert w.mult == pytest.approx(expected)
    w.on_validation_end({"val/loss/main": math.nan}, higher_is_better=True)  # a diverged run counts as worse
    assert w.mult == pytest.approx(0.5)


def test_main_progress_multiplicative_and_lower_is_better_metric():
    w = bound(MainProgress(start=0.25, step=1.0, max=1.0, mode="multiplicative"))
    for value, expected in [(5.0, 0.25), (4.0, 0.5), (3.0, 1.0), (2.0, 1.0), (2.5, 0.5), (2.5, 0.25)]:
        w.on_validation_end({"val/metric/main": value}, higher_is_better=False)
        assert w.mult == pytest.approx(expected)


def test_main_progress_needs_a_validation_split():
    w = bound(MainProgress())
    with pytest.raises(AuxLossError, match="validation"):
        w.on_validation_end({"trainval/metric/main": 0.5}, higher_is_better=True)


@pytest.mark.parametrize("kwargs, arg", [
    ({"start": -0.1}, "start"), ({"step": 0.0}, "step"), ({"min": -1.0}, "min"), ({"max": float("inf")}, "max"),
    ({"min": 0.5, "max": 0.2}, "max"), ({"patience": 0}, "patience"), ({"mode": "linear"}, "mode"),
    ({"start": 0.0, "mode": "multiplicative"}, "start"), ({"start": 2.0}, "start"),
])
def test_main_progress_validates_its_arguments(kwargs, arg):
    with pytest.raises(AuxLossError, match=arg):
        MainProgress(**kwargs)


def test_main_progress_checkpoint_resumes_exactly():
    a = bound(MainProgress(patience=3))
    for v in (0.1, 0.3, 0.2, 0.25):
        a.on_validation_end({"val/metric/main": v}, higher_is_better=True)
    b = bound(MainProgress(patience=3))
    b.load_state_dict(a.state_dict())
    assert (b.mult, b.best, b.last, b.stale) == (a.mult, a.best, a.last, a.stale)
    for v in (0.25, 0.25, 0.4):
        for x in (a, b):
            x.on_validation_end({"val/metric/main": v}, higher_is_better=True)
        assert a.mult == b.mult and a.stale == b.stale
    assert repr(a) == "MainProgress(start=0.1, step=0.1, min=0.0, max=1.0, patience=3, mode='additive')"


# -- Uncertainty ---------------------------------------------------------------------------------------------


def objective_on_fixed_outputs(weighting, lam=(0.5, 2.0)):
    tasks = [al.Task(n, source=n, target=f"y_{n}", loss="mse", weight=lam[i]) for i, n in enumerate(AUX)]
    objective = al.Objective(al.Task("main", target="y", loss="mse"), tasks, weighting=weighting).double()
    g = torch.Generator().manual_seed(0)
    preds = {n: torch.randn(5, generator=g, dtype=torch.float64) for n in ("main", *AUX)}
    batch = {"input": torch.zeros(5), "y": torch.randn(5, generator=g, dtype=torch.float64),
             **{f"y_{n}": torch.randn(5, generator=g, dtype=torch.float64) for n in AUX}}
    by_hand = {n: float(((preds[n] - batch["y" if n == "main" else f"y_{n}"]) ** 2).mean()) for n in preds}
    outputs = al.Outputs(main=preds["main"], aux={n: preds[n] for n in AUX})
    return objective, outputs, batch, by_hand


def test_uncertainty_total_and_its_gradient_in_s_by_hand():
    s = {"aux1": 0.3, "aux2": -0.2}
    lam = (0.5, 2.0)
    objective, outputs, batch, L = objective_on_fixed_outputs(Uncertainty(init=s), lam)
    with torch.no_grad():  # s exactly in float64 (bind made it in the default dtype, float32)
        objective.weighting.log_var.copy_(torch.tensor([s["aux1"], s["aux2"]], dtype=torch.float64))
    report = objective(outputs, batch)
    total = L["main"] + sum(math.exp(-s[n]) * lam[i] * L[n] + s[n] / 2 for i, n in enumerate(AUX))
    assert float(report.total) == pytest.approx(total, rel=1e-12)
    assert report.weights == pytest.approx({"main": 1.0, **{n: lam[i] * math.exp(-s[n]) for i, n in enumerate(AUX)}})
    report.total.backward()
    grad = objective.weighting.log_var.grad
    expected = [-math.exp(-s[n]) * lam[i] * L[n] + 0.5 for i, n in enumerate(AUX)]
    assert grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert report.extras == pytest.approx({"log_var/aux1": 0.3, "log_var/aux2": -0.2})
    # s sits in the objective's parameters, where the trainer's optimizer finds it
    assert any(p is objective.weighting.log_var for p in objective.parameters())


def test_uncertainty_arguments_state_and_repr():
    with pytest.raises(AuxLossError, match="init"):
        Uncertainty(init=float("nan"))
    with pytest.raises(AuxLossError, match="missing"):
        bound(Uncertainty(init={"aux1": 0.0}))
    with pytest.raises(AuxLossError, match="not bound"):
        Uncertainty().multipliers({}, step=0, epoch=0)
    a = bound(Uncertainty(init=0.5))
    with torch.no_grad():
        a.log_var.add_(torch.tensor([0.1, -0.3]))
    b = bound(Uncertainty())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.log_var, b.log_var)
    assert repr(Uncertainty(init=0.5)) == "Uncertainty(init=0.5)"


# -- DWA -----------------------------------------------------------------------------------------------------


def feed(w, per_step):
    """Training steps (gradients enabled) with the given auxiliary losses; returns the multipliers seen."""
    seen = []
    for values in per_step:
        m = w.multipliers(losses_of(1.0, *values), step=0, epoch=0)
        seen.append([float(m[n]) for n in AUX])
    return seen


def test_dwa_weights_follow_the_formula_in_float64():
    tau = 2.0
    w = bound(DWA(temperature=tau))
    epochs = [[(2.0, 1.0), (4.0, 1.0)], [(1.5, 0.9), (1.5, 0.7)], [(1.0, 0.8), (1.4, 0.8)], [(1.0, 1.0)]]
    means = [[sum(s[k] for s in e) / len(e) for k in range(2)] for e in epochs]

    def by_hand(last, before):
        r = [last[k] / before[k] for k in range(2)]
        e = [math.exp(x / tau) for x in r]
        return [2 * x / sum(e) for x in e]

    expected = [[1.0, 1.0], [1.0, 1.0], by_hand(means[1], means[0]), by_hand(means[2], means[1])]
    for epoch, steps in enumerate(epochs):
        seen = feed(w, steps)
        assert seen == [pytest.approx(expected[epoch], rel=1e-14)] * len(steps)
        # evaluation batches (no grad) do not count towards the means
        with torch.no_grad():
            w.multipliers(losses_of(1.0, 100.0, 100.0), step=0, epoch=0)
        w.on_epoch_end(epoch + 1)
    assert w.epoch_means[0].tolist() == pytest.approx(means[3])
    assert sum(w.weights.tolist()) == pytest.approx(2.0)
    assert dwa_weights(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), 2.0).tolist() == [1.0, 1.0]
    assert w.telemetry() == {f"dwa_w/{n}": v for n, v in zip(AUX, w.weights.tolist())}


def test_dwa_skips_non_finite_losses_and_empty_epochs():
    w = bound(DWA())
    feed(w, [(2.0, 1.0), (math.inf, 3.0)])
    w.on_epoch_end(1)
    assert w.epoch_means[0].tolist() == [2.0, 2.0]
    w.on_epoch_end(2)  # no step in this epoch: nothing rolls
    assert int(w.epochs_seen) == 1


def test_dwa_checkpoint_mid_epoch_resumes_exactly():
    a = bound(DWA(temperature=0.5))
    feed(a, [(2.0, 1.0), (1.0, 3.0)])
    a.on_epoch_end(1)
    feed(a, [(1.0, 2.0)])
    b = bound(DWA(temperature=0.5))
    b.load_state_dict(a.state_dict())
    for x in (a, b):
        feed(x, [(0.5, 1.0)])
        x.on_epoch_end(2)
        feed(x, [(0.7, 0.9)])
        x.on_epoch_end(3)
    assert torch.equal(a.weights, b.weights) and not torch.equal(a.weights, torch.ones(2, dtype=torch.float64))
    with pytest.raises(AuxLossError, match="temperature"):
        DWA(temperature=0)
    assert repr(a) == "DWA(temperature=0.5)"


# -- GradNorm ------------------------------------------------------------------------------------------------

U = [(1.0, 2.0), (0.5, -1.0), (-2.0, 0.3)]  # L_i(W) = (u_i·W − y_i)², one row per task (main first)
Y = [0.5, 1.0, -1.0]


def toy_losses(W):
    return {n: (torch.tensor(u, dtype=torch.float64) @ W - y) ** 2 for n, u, y in zip(("main", *AUX), U, Y)}


def hand_step(w, W, L0, alpha, lr):
    """One GradNorm update by hand, in Python floats."""
    res = [u[0] * W[0] + u[1] * W[1] - y for u, y in zip(U, Y)]
    L = [r * r for r in res]
    norms = [abs(2 * r) * math.hypot(*u) for r, u in zip(res, U)]  # ‖∇_W (u·W − y)²‖ = |2(u·W − y)|·‖u‖
    G = [wi * n for wi, n in zip(w, norms)]
    Lt = [a / b for a, b in zip(L, L0)]
    r = [x / (sum(Lt) / 3) for x in Lt]
    target = [sum(G) / 3 * ri**alpha for ri in r]
    dw = [math.copysign(n, g - t) for n, g, t in zip(norms, G, target)]
    new = [wi - lr * d for wi, d in zip(w, dw)]
    return [3 * x / sum(new) for x in new], L, sum(abs(g - t) for g, t in zip(G, target))


def test_gradnorm_update_equals_the_hand_computation():
    alpha, lr = 1.5, 0.1
    W = nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
    gn = bound(GradNorm(alpha=alpha, lr=lr, params=[W]))
    w = [1.0, 1.0, 1.0]
    L0 = None
    for step, point in enumerate([(0.3, -0.2), (0.1, 0.4), (-0.5, 0.2)]):
        with torch.no_grad():
            W.copy_(torch.tensor(point, dtype=torch.float64))
        losses = toy_losses(W)
        m = gn.multipliers(losses, step=step, epoch=0)
        # this step's multipliers are w_k / w_0 with the weights before the update
        assert [float(m[n]) for n in AUX] == pytest.approx([w[1] / w[0], w[2] / w[0]], rel=1e-12)
        if L0 is None:
            L0 = [float(v) for v in losses.values()]
        w, _, l_grad = hand_step(w, point, L0, alpha, lr)
        assert gn.task_weights.tolist() == pytest.approx(w, rel=1e-12)
        assert float(gn.l_grad) == pytest.approx(l_grad, rel=1e-12)
        assert sum(gn.task_weights.tolist()) == pytest.approx(3.0, rel=1e-12)
        # the graph survives for the step's own backward
        sum(losses.values()).backward()
        assert W.grad is not None
        W.grad = None
    assert int(gn.updates) == 3
    assert gn.initial_loss.tolist() == pytest.approx(L0)


def test_gradnorm_evaluation_does_not_change_state_and_resume_is_exact():
    W = nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
    a = bound(GradNorm(params=[W]))
    a.multipliers(toy_losses(W), step=0, epoch=0)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    with torch.no_grad():
        a.multipliers(toy_losses(W), step=1, epoch=0)
    state_equal(before, a.state_dict())
    b = bound(GradNorm(params=[W]))
    b.load_state_dict(a.state_dict())
    for x in (a, b):
        for point in [(0.2, 0.1), (0.0, 0.5)]:
            with torch.no_grad():
                W.copy_(torch.tensor(point, dtype=torch.float64))
            x.multipliers(toy_losses(W), step=0, epoch=0)
    assert torch.equal(a.task_weights, b.task_weights)
    assert set(a.telemetry()) == {"gradnorm_w/main", "gradnorm_w/aux1", "gradnorm_w/aux2", "gradnorm/l_grad"}


def test_gradnorm_errors():
    with pytest.raises(AuxLossError, match="params="):
        GradNorm()
    with pytest.raises(AuxLossError, match="alpha"):
        GradNorm(alpha=-1, params=[nn.Parameter(torch.zeros(1))])
    with pytest.raises(AuxLossError, match="empty"):
        GradNorm(params=[])
    W = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    other = nn.Parameter(torch.ones(2, dtype=torch.float64))
    gn = bound(GradNorm(params=[W]))
    losses = toy_losses(W)
    losses["aux2"] = (other**2).sum()  # does not reach W
    with pytest.raises(AuxLossError, match="'aux2'.*does not reach"):
        gn.multipliers(losses, step=0, epoch=0)
    assert repr(GradNorm(params=nn.Linear(2, 3))) == "GradNorm(alpha=1.5, lr=0.025, params=<2 tensors, 9 values>)"


# -- the registry --------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.block2 = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.block2(self.block1(x)))


def aux_model(seed=0):
    torch.manual_seed(seed)
    return al.attach(Net(), {"aux1": al.Tap("block1", al.LinearHead(2)), "aux2": al.Tap("block2", al.LinearHead(2))},
                     example_input=torch.randn(1, 6))


def test_registry_builds_every_loss_based_strategy():
    model = aux_model()
    assert build_weighting(None) is None and build_weighting("fixed") is None
    assert build_weighting({"type": None}) is None
    assert repr(build_weighting({"type": "dwa", "temperature": 3})) == "DWA(temperature=3.0)"
    assert isinstance(build_weighting("uncertainty"), Uncertainty)
    assert isinstance(build_weighting({"type": "main_progress", "patience": 2}), MainProgress)
    gn = build_weighting({"type": "gradnorm", "layer": "block1", "alpha": 0.5}, model=model)
    assert gn.params == list(model.model.block1.parameters()) and gn.alpha == 0.5
    assert "'block1': 2 tensors" in repr(gn)
    # the wrapper's own names work too
    gn2 = build_weighting({"type": "gradnorm", "layer": ["model.block1.0"]}, model=model)
    assert gn2.params == list(model.model.block1[0].parameters())
    ready = DWA()
    assert build_weighting(ready) is ready
    assert set(WEIGHTINGS) >= {"fixed", "main_progress", "uncertainty", "dwa", "gradnorm", "gating",
                               "gating_weighted", "projection", "olaux", "metabalance"}


@pytest.mark.parametrize("spec, match", [
    ("dwaa", r"unknown weighting type 'dwaa'.*Did you mean 'dwa'"),
    ({"type": "uncertainity"}, "Did you mean 'uncertainty'"),
    ({"temperature": 2}, "'type'"),
    ({"type": "dwa", "temp": 2}, r"\['temp'\].*\['temperature'\]"),
    ({"type": "dwa", "temperature": -1}, "temperature"),
    ({"type": "gradnorm"}, "needs 'layer'"),
    ({"type": "gradnorm", "layer": "blok1"}, r"no layer 'blok1'.*block1"),
    ({"type": "uncertainty", "layer": "block1"}, "takes no 'layer'"),
    ({"type": "fixed", "x": 1}, "no parameters"),
])
def test_registry_errors_name_the_problem(spec, match):
    with pytest.raises(AuxLossError, match=match):
        build_weighting(spec, model=aux_model())


@pytest.mark.parametrize("kind, module, cls, weighted", [
    ("gating", "gating", "CosineGating", False), ("gating_weighted", "gating", "CosineGating", True),
    ("projection", "projection", "Projection", None), ("olaux", "olaux", "OLAux", None),
    ("metabalance", "metabalance", "MetaBalance", None),
])
def test_registry_builds_the_gradient_aware_strategies_lazily(kind, module, cls, weighted):
    mod = pytest.importorskip(f"auxloss.weighting.{module}")
    model = aux_model()
    w = build_weighting({"type": kind}, model=model)
    assert type(w) is getattr(mod, cls)
    if weighted is not None:
        assert w.weighted is weighted
        with pytest.raises(AuxLossError, match=r"sets \['weighted'\] itself.*gating_weighted"):
            build_weighting({"type": kind, "weighted": not weighted})
    if kind == "projection":  # 'layer' fills the shared parameters of strategies that take params
        w = build_weighting({"type": kind, "layer": ["block1", "block2"]}, model=model)
        assert isinstance(w, mod.Projection)


def test_registry_layer_needs_the_model():
    with pytest.raises(AuxLossError, match="model=model"):
        build_weighting({"type": "gradnorm", "layer": "block1"})


# -- end to end ----------------------------------------------------------------------------------------------


class Capture(Callback):
    def __init__(self):
        self.steps = []

    def on_before_backward(self, trainer, report):
        # A log writer: the report holds device tensors (no sync in the step), read here as floats.
        self.steps.append(({k: float(v) for k, v in report.weights.items()},
                           {k: float(v) for k, v in report.extras.items()}))


def multiplier_from_telemetry(kind, extras, task):
    if kind == "main_progress":
        return extras[f"mult/{task}"]
    if kind == "uncertainty":
        return math.exp(-extras[f"log_var/{task}"])
    if kind == "dwa":
        return extras[f"dwa_w/{task}"]
    return extras[f"gradnorm_w/{task}"] / extras["gradnorm_w/main"]


@pytest.mark.parametrize("spec", ["main_progress", "uncertainty", "dwa", {"type": "gradnorm", "layer": "block1"}],
                         ids=["main_progress", "uncertainty", "dwa", "gradnorm"])
def test_fit_with_each_strategy_reports_weights_that_follow_its_multipliers(spec):
    kind = spec if isinstance(spec, str) else spec["type"]
    model = aux_model()
    lam = {"aux1": 0.3, "aux2": 0.5}
    objective = al.Objective(aux=[al.Task(n, source=n, weight=lam[n]) for n in AUX],
                             weighting=build_weighting(spec, model=model))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    capture = Capture()
    result = Trainer(epochs=2, lr=0.05, eval_train=False, callbacks=[capture]).fit(
        model, objective, DataLoader(data, batch_size=16), DataLoader(data, batch_size=48))
    assert len(result.history) == 2 and len(capture.steps) == 6
    for weights, extras in capture.steps:
        assert weights["main"] == 1.0
        for task in AUX:
            m = multiplier_from_telemetry(kind, extras, task)
            assert math.isfinite(m) and m >= 0
            assert weights[task] == pytest.approx(lam[task] * m, rel=1e-5)
    first, last = capture.steps[0][0], capture.steps[-1][0]
    if kind in ("uncertainty", "gradnorm"):  # they adapt every step
        assert first != last
    if kind == "main_progress":  # the second epoch uses the multiplier after the first validation
        assert first == pytest.approx({"main": 1.0, "aux1": 0.03, "aux2": 0.05})
    if kind == "dwa":  # weights 1 for two epochs; after the second, the first ratios set them
        assert int(objective.weighting.epochs_seen) == 2
        assert not torch.equal(objective.weighting.weights, torch.ones(2, dtype=torch.float64))
    assert "train/weight/aux1" in result.history[-1]


@pytest.mark.parametrize("make", [
    lambda m: MainProgress(), lambda m: Uncertainty(), lambda m: DWA(),
    lambda m: GradNorm(params=m.model.block1.parameters()),
], ids=["main_progress", "uncertainty", "dwa", "gradnorm"])
def test_evaluation_batches_never_change_the_state(make):
    model = aux_model()
    objective = al.Objective(aux=[al.Task(n, source=n, weight=0.3) for n in AUX], weighting=make(model))
    x = torch.randn(8, 6)
    batch = {"input": x, "target": (x[:, 0] > 0).long()}
    objective(model(x), batch)  # one training step: state is initialised
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in objective.state_dict().items()}
    with torch.no_grad():
        for _ in range(3):
            objective(model(x + 1.0), batch)
    state_equal(before, objective.state_dict())
    # and a fresh objective loaded from the checkpoint continues exactly like the original
    objective.on_validation_end({"val/metric/main": 0.5})
    objective.on_epoch_end(1)
    again = al.Objective(aux=[al.Task(n, source=n, weight=0.3) for n in AUX], weighting=make(model))
    again.load_state_dict(objective.state_dict())
    for obj in (objective, again):
        obj.on_validation_end({"val/metric/main": 0.75})
        obj(model(x), batch)
        obj.on_epoch_end(2)
        obj.on_epoch_end(3)
    state_equal(objective.state_dict(), again.state_dict())
    a, b = objective(model(x), batch), again(model(x), batch)
    assert a.weights == b.weights and a.extras == b.extras
