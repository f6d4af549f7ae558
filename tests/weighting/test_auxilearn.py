"""AuxiLearn (Navon et al. 2021) against a float64 reference built from the full Hessian of the tiny net: the
Neumann series, the implicit hypergradient and the meta step; the monotone network's multipliers by hand; the clear
error for an op without double backward; exact resume."""

import io

import pytest
import torch
import torch.nn.functional as F
from _tiny import AUX, LAMBDA, batch, build
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss.step import StepContext
from auxloss.train import Trainer
from auxloss.weighting.auxilearn import AuxiLearn, auxnet, neumann_inverse_hvp
from auxloss.weighting.registry import build_weighting


def stream(start):
    seed = start
    while True:
        yield batch(seed)
        seed += 1


def test_linear_auxilearn_hypergradient_matches_the_full_hessian_reference():
    terms, eta, lr, wd = 2, 0.05, 0.1, 1e-4
    weighting = AuxiLearn("linear", lr=lr, momentum=0.0, weight_decay=wd, every=1, neumann_terms=terms,
                          neumann_lr=eta, max_grad_norm=None)
    model, objective = build(weighting)
    b, vb = batch(0), batch(100)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def unflatten(flat):
        out, i = {}, 0
        for n, shape in zip(names, shapes):
            size = shape.numel()
            out[n] = flat[i:i + size].view(shape)
            i += size
        return out

    def task_losses(flat, data):
        out = functional_call(model, unflatten(flat), (data["input"],))
        return [F.cross_entropy(out.main, data["target"]), F.cross_entropy(out["aux1"], data["t1"]),
                F.cross_entropy(out["aux2"], data["t2"])]

    phi = torch.ones(2, dtype=torch.float64)
    lam = torch.tensor([LAMBDA[k] for k in AUX], dtype=torch.float64)

    def train_loss(flat):
        losses = task_losses(flat, b)
        return losses[0] + (phi * lam * torch.stack(losses[1:])).sum()

    hessian = torch.autograd.functional.hessian(train_loss, theta0)
    leaf = theta0.clone().requires_grad_()
    v = torch.autograd.grad(task_losses(leaf, vb)[0], leaf)[0]
    step = torch.eye(len(theta0), dtype=torch.float64) - eta * hessian
    p, power = v.clone(), v.clone()
    for _ in range(terms):
        power = step @ power
        p = p + power
    leaf = theta0.clone().requires_grad_()
    per_task = [torch.autograd.grad(loss, leaf, retain_graph=True)[0] for loss in task_losses(leaf, b)]
    hyper = torch.stack([-lam[k] * (per_task[k + 1] @ p) for k in range(2)])
    expected_phi = (phi - lr * (hyper + wd * phi)).clamp(min=0)
    expected_grad = per_task[0] + sum(phi[k] * lam[k] * per_task[k + 1] for k in range(2))

    report = objective(model(b["input"]), b)
    objective.backward(report, StepContext(model=model, validation=stream(100)))
    torch.testing.assert_close(weighting.net_0, expected_phi, atol=1e-10, rtol=0)
    written = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(written, expected_grad, atol=1e-12, rtol=0)
    assert weighting.updates == 1
    assert not torch.equal(expected_phi, phi)


def test_neumann_series_approaches_the_inverse_hessian():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64, generator=g)
    h = a @ a.T + 4 * torch.eye(4, dtype=torch.float64)
    v = torch.randn(4, dtype=torch.float64, generator=g)
    eta = 1.0 / float(torch.linalg.eigvalsh(h).max())
    p = neumann_inverse_hvp([v], lambda x: [h @ x[0]], 400, eta)[0]
    torch.testing.assert_close(eta * p, torch.linalg.solve(h, v), atol=1e-10, rtol=0)
    assert torch.equal(neumann_inverse_hvp([v], lambda x: [h @ x[0]], 0, eta)[0], v)


def test_nonlinear_network_multipliers_are_its_input_gradient_and_stay_non_negative():
    weighting = AuxiLearn("nonlinear", hidden=(3,), seed=4)
    weighting.bind("main", list(AUX))
    w1, b1, w2 = weighting.weights()
    assert bool((w1 >= 0).all()) and bool((w2 >= 0).all()) and torch.equal(b1, torch.zeros(3, dtype=torch.float64))
    u = torch.tensor([0.7, 1.9], dtype=torch.float64)
    expected = (w2 @ torch.diag(torch.sigmoid(w1 @ u + b1)) @ w1).flatten()  # d softplus = sigmoid
    torch.testing.assert_close(weighting._multipliers_of(u, [w1, b1, w2], graph=False), expected, atol=1e-14, rtol=0)
    assert bool((expected >= 0).all())  # monotone: more auxiliary loss never lowers the total
    assert float(auxnet(u, [w1, b1, w2], "nonlinear")) == pytest.approx(
        float(w2 @ F.softplus(w1 @ u + b1)), abs=1e-14)


class SquareGrad(torch.autograd.Function):
    """The backward of :class:`Square`, itself without a backward: an op that lacks double backward."""

    @staticmethod
    def forward(ctx, x, grad):
        return 2 * x * grad

    @staticmethod
    def backward(ctx, _):
        raise NotImplementedError("SquareGrad has no derivative")


class NoDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return SquareGrad.apply(x, grad)


def test_an_op_without_double_backward_gets_a_clear_error_and_the_first_order_fallback_works():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(NoDoubleBackward.apply(self.a(x)))

    for terms in (2, 0):
        model = al.attach(Net(), {"aux1": al.Tap("a", nn.Linear(6, 3))}).double()
        objective = al.Objective(aux=[al.Task("aux1", source="aux1", target="t1")],
                                 weighting=AuxiLearn(every=1, neumann_terms=terms))
        b = batch(0)
        report = objective(model(b["input"]), b)
        ctx = StepContext(model=model, validation=stream(1))
        if terms:
            with pytest.raises(al.AuxLossError, match="neumann_terms=0"):
                objective.backward(report, ctx)
        else:
            objective.backward(report, ctx)
            assert objective.weighting.updates == 1


def test_auxilearn_arguments_registry_and_repr():
    for kw in ({"net": "deep"}, {"every": 0}, {"neumann_terms": -1}, {"lr": 0}, {"hidden": ()}):
        with pytest.raises(al.AuxLossError):
            AuxiLearn(**({"net": "nonlinear", **kw} if "hidden" in kw else kw))
    assert isinstance(build_weighting({"type": "auxilearn", "net": "nonlinear"}), AuxiLearn)
    assert repr(AuxiLearn()) == ("AuxiLearn(net='linear', hidden=(3,), lr=0.001, momentum=0.9, weight_decay=0.0001, "
                                 "every=50, neumann_terms=3, neumann_lr=0.0001, max_grad_norm=25.0, seed=None)")
    model, objective = build(AuxiLearn(every=1))
    b = batch(0)
    with pytest.raises(al.AuxLossError, match="validation"):
        objective.backward(objective(model(b["input"]), b))


@pytest.mark.parametrize("net", ["linear", "nonlinear"])
def test_state_dict_round_trip_resumes_exactly(net):
    def run(model, objective, seeds):
        out = []
        for s in seeds:
            model.zero_grad()
            b = batch(s)
            objective.backward(objective(model(b["input"]), b), StepContext(model=model, validation=stream(50 + s)))
            out.append([p.grad.clone() for p in model.parameters()])
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.2 * p.grad
            objective.advance()
        return out

    def make():
        return AuxiLearn(net, lr=0.5, every=2, neumann_terms=1, neumann_lr=0.01, seed=3)

    m1, o1 = build(make())
    run(m1, o1, range(3))
    buffer = io.BytesIO()
    torch.save({"model": m1.state_dict(), "objective": o1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    m2, o2 = build(AuxiLearn(net, lr=0.5, every=2, neumann_terms=1, neumann_lr=0.01, seed=9), seed=1)
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["objective"])
    for a, b in zip(run(m1, o1, range(3, 7)), run(m2, o2, range(3, 7))):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(o1.weighting.weights(), o2.weighting.weights()))


def test_auxilearn_trains_with_the_trainer_on_validation_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    model = al.attach(net, {"aux": al.Tap("1", al.LinearHead(2))}, example_input=x[:1])
    weighting = AuxiLearn(every=2, lr=0.1)
    objective = al.Objective(aux=[al.Task("aux", source="aux", weight=0.5)], weighting=weighting)
    Trainer(epochs=1, lr=0.05, eval_train=False, device="cpu").fit(
        model, objective, DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8),
        DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8))
    assert weighting.updates == 2 and "auxilearn_m/aux" in weighting.telemetry()
