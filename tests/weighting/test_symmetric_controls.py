"""RLW (Lin et al. 2022) and FAMO (Liu et al. 2023), the symmetric controls: each against a hand computation of the
paper's rule, the property checks of the loss-based strategies, and exact resume through the Trainer."""

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss.train import Trainer
from auxloss.weighting.famo import FAMO, adam_step, famo_logit_gradient, famo_weights
from auxloss.weighting.registry import build_weighting
from auxloss.weighting.rlw import RLW, rlw_weights

FAST = settings(max_examples=40, deadline=None)
loss_value = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_subnormal=False)


def tiny(weighting, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model = al.attach(net, {"aux1": al.Tap("1", nn.Linear(6, 3))}).double()
    objective = al.Objective(aux=[al.Task("aux1", source="aux1", target="t1", weight=0.5)], weighting=weighting)
    return model, objective


def batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(n, 4, generator=g, dtype=torch.float64),
            "target": torch.randint(0, 3, (n,), generator=g), "t1": torch.randint(0, 3, (n,), generator=g)}


# -- RLW ---------------------------------------------------------------------------------------------------------
def test_rlw_draws_the_softmax_of_standard_normals_from_its_own_seeded_generator():
    weighting = RLW(seed=7)
    model, objective = tiny(weighting)
    reference = torch.Generator().manual_seed(7)
    before = torch.get_rng_state()
    for t in range(3):
        b = batch(t)
        report = objective(model(b["input"]), b)
        z = torch.randn(2, generator=reference, dtype=torch.float64)
        w = torch.exp(z) / torch.exp(z).sum()  # softmax by hand
        assert report.weights["main"] == pytest.approx(float(w[0]), abs=1e-15)
        assert report.weights["aux1"] == pytest.approx(0.5 * float(w[1]), abs=1e-15)
        expected = w[0] * report.losses["main"] + 0.5 * w[1] * report.losses["aux1"]
        torch.testing.assert_close(report.total, expected, atol=1e-12, rtol=0)
        # the gradient is that of the weighted sum: the main task is weighted like any task
        g_ref = torch.autograd.grad(expected, model.model[0].weight, retain_graph=True)[0]
        model.zero_grad()
        objective.backward(report)
        torch.testing.assert_close(model.model[0].weight.grad, g_ref, atol=1e-12, rtol=0)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG (data order, dropout) is untouched
    with torch.no_grad():  # evaluation: the expected weights
        report = objective(model(batch(0)["input"]), batch(0))
    assert report.weights["main"] == 0.5 and report.weights["aux1"] == 0.25


def test_rlw_default_seed_is_the_runs_seed_and_total_scales_the_weights():
    torch.manual_seed(123)
    a, b = RLW(), RLW(total=2.0, seed=123)
    a.bind("main", ["x", "y"])
    b.bind("main", ["x", "y"])
    wa, wb = a.multipliers({}, step=0, epoch=0), b.multipliers({}, step=0, epoch=0)
    assert sum(wa.values()) == pytest.approx(1.0, abs=1e-15)
    for n in wa:
        assert wb[n] == pytest.approx(2 * wa[n], abs=1e-15)
    with pytest.raises(al.AuxLossError, match="total"):
        RLW(total=0)
    with pytest.raises(al.AuxLossError, match="seed"):
        RLW(seed=1.5)


@FAST
@given(st.lists(st.floats(-30, 30), min_size=2, max_size=6), st.floats(0.1, 10.0))
def test_rlw_weights_are_positive_sum_to_total_and_permute_with_the_draws(z, total):
    z = torch.tensor(z, dtype=torch.float64)
    w = rlw_weights(z, total)
    assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    assert float(w.sum()) == pytest.approx(total, rel=1e-12)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(len(z)))
    torch.testing.assert_close(rlw_weights(z[perm], total), w[perm], atol=0, rtol=1e-15)


# -- FAMO ----------------------------------------------------------------------------------------------------------
def test_famo_weights_give_the_gradient_of_the_papers_rescaled_log_objective():
    # Σ w_i·∇L_i must equal ∇(Σ z_i·log D_i / c) with c = Σ z_i/D_i held constant, on an autograd float64 reference.
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 3, dtype=torch.float64, generator=g)
    losses = (a @ theta) ** 2 + 0.1
    xi = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    min_losses = torch.tensor([0.0, 0.05, 0.0], dtype=torch.float64)
    z = torch.softmax(xi, 0)
    d = losses - min_losses + 1e-8
    c = (z / d).sum().detach()
    paper = torch.autograd.grad((z * d.log() / c).sum(), theta, retain_graph=True)[0]
    w = famo_weights(xi, losses.detach(), min_losses)
    ours = torch.autograd.grad((w * losses).sum(), theta)[0]
    torch.testing.assert_close(ours, paper, atol=1e-12, rtol=1e-12)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-15)


def test_famo_logit_gradient_is_the_softmax_jacobian_times_the_log_loss_fall():
    xi = torch.tensor([0.1, -0.4, 0.7], dtype=torch.float64, requires_grad=True)
    before = torch.tensor([2.0, 1.5, 0.9], dtype=torch.float64)
    after = torch.tensor([1.0, 1.4, 0.95], dtype=torch.float64)
    delta = (before + 1e-8).log() - (after + 1e-8).log()
    expected = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)[0]  # the authors' formulation
    torch.testing.assert_close(famo_logit_gradient(xi.detach(), before, after, torch.zeros(3, dtype=torch.float64)),
                               expected, atol=1e-15, rtol=0)


def test_adam_step_matches_torch_optim_adam():
    w = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.025, weight_decay=0.01)
    mine, m, v = w.detach().clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t in range(1, 6):
        grad = torch.tensor([0.3, -1.0, 0.01 * t], dtype=torch.float64)
        w.grad = grad.clone()
        opt.step()
        mine, m, v = adam_step(mine, grad, m, v, t, lr=0.025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        torch.testing.assert_close(mine, w.detach(), atol=1e-15, rtol=0)


def test_famo_updates_the_logits_once_per_optimizer_step_from_the_previous_steps_losses():
    weighting = FAMO(lr=0.1, gamma=0.01)
    model, objective = tiny(weighting)
    xi = torch.zeros(2, dtype=torch.float64)
    m = torch.zeros(2, dtype=torch.float64)
    v = torch.zeros(2, dtype=torch.float64)
    prev = None
    t = 0
    for step in range(4):
        micro = []
        for k in range(2):  # two micro-batches per optimizer step
            b = batch(10 * step + k)
            report = objective(model(b["input"]), b)
            values = torch.stack([report.losses["main"].detach(), report.losses["aux1"].detach()])
            if k == 0 and prev is not None:
                delta = (prev + 1e-8).log() - (values + 1e-8).log()  # D = L − 0 + ε
                z = torch.softmax(xi, 0)
                grad = z * (delta - (z * delta).sum()) + 0.01 * xi
                t += 1
                m = 0.9 * m + 0.1 * grad
                v = 0.999 * v + 0.001 * grad ** 2
                xi = xi - 0.1 * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
            torch.testing.assert_close(weighting.logits, xi, atol=1e-12, rtol=0)
            z = torch.softmax(xi, 0)
            w = (z / (values + 1e-8)) / (z / (values + 1e-8)).sum()
            assert report.weights["main"] == pytest.approx(float(w[0]), abs=1e-12)
            assert report.weights["aux1"] == pytest.approx(0.5 * float(w[1]), abs=1e-12)
            micro.append(values)
            objective.backward(report, scale=0.5)
        prev = torch.stack(micro).mean(0)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
                p.grad = None
        objective.advance()
    assert weighting.adam_steps.item() == 3 and not torch.equal(weighting.logits, torch.zeros(2, dtype=torch.float64))


def test_famo_explains_a_loss_below_its_minimum_and_checks_arguments():
    weighting = FAMO()
    weighting.bind("main", ["aux"])
    with pytest.raises(al.AuxLossError, match="min_losses"):
        weighting.multipliers({"main": torch.tensor(0.5), "aux": torch.tensor(-0.1)}, step=0, epoch=0)
    ok = FAMO(min_losses={"aux": -1.0})
    ok.bind("main", ["aux"])
    ok.multipliers({"main": torch.tensor(0.5), "aux": torch.tensor(-0.1)}, step=0, epoch=0)
    with pytest.raises(al.AuxLossError, match="unknown task"):
        FAMO(min_losses={"nope": 0.0}).bind("main", ["aux"])
    for kw in ({"lr": 0}, {"gamma": -1}, {"betas": (1.0, 0.9)}):
        with pytest.raises(al.AuxLossError):
            FAMO(**kw)


@FAST
@given(st.lists(loss_value, min_size=2, max_size=5), st.data())
def test_famo_weights_are_a_convex_combination_that_permutes_with_the_tasks(losses, data):
    k = len(losses)
    xi = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=k, max_size=k)), dtype=torch.float64)
    values = torch.tensor(losses, dtype=torch.float64)
    w = famo_weights(xi, values, torch.zeros(k, dtype=torch.float64))
    assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    assert float(w.sum()) == pytest.approx(1.0, rel=1e-12)
    perm = torch.tensor(data.draw(st.permutations(range(k))))
    torch.testing.assert_close(famo_weights(xi[perm], values[perm], torch.zeros(k, dtype=torch.float64)), w[perm],
                               atol=1e-15, rtol=1e-12)


# -- both: registry, repr, exact resume ------------------------------------------------------------------------------
def test_registry_names_and_reprs():
    assert isinstance(build_weighting({"type": "rlw", "total": 2.0}), RLW)
    famo = build_weighting({"type": "famo", "lr": 0.05})
    assert isinstance(famo, FAMO)
    assert repr(RLW(total=2.0, seed=3)) == "RLW(total=2.0, seed=3)"
    assert repr(famo) == "FAMO(lr=0.05, gamma=0.01, min_losses={}, betas=(0.9, 0.999), eps=1e-08)"
    assert RLW.symmetric and FAMO.symmetric


@pytest.mark.parametrize("make", [lambda: RLW(seed=5), lambda: FAMO(lr=0.2)])
def test_state_dict_round_trip_resumes_exactly(make):
    def run(model, objective, seeds):
        out = []
        for s in seeds:
            b = batch(s)
            report = objective(model(b["input"]), b)
            model.zero_grad()
            objective.backward(report)
            out.append((dict(report.weights), [p.grad.clone() for p in model.parameters()]))
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            objective.advance()
        return out

    m1, o1 = tiny(make())
    run(m1, o1, range(3))
    buffer = io.BytesIO()
    torch.save({"model": m1.state_dict(), "objective": o1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    m2, o2 = tiny(make(), seed=1)
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["objective"])
    for (wa, ga), (wb, gb) in zip(run(m1, o1, range(3, 7)), run(m2, o2, range(3, 7))):
        assert {k: float(v) for k, v in wa.items()} == {k: float(v) for k, v in wb.items()}
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.parametrize("make", [lambda: RLW(), FAMO])
def test_the_trainer_resumes_a_symmetric_control_bit_identically(make, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g)
    y = (x[:, 0] > 0).long()
    data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))

    def fit(epochs, folder):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
        model = al.attach(net, {"aux": al.Tap("1", al.LinearHead(2))}, example_input=x[:1])
        objective = al.Objective(aux=[al.Task("aux", source="aux", weight=0.5)], weighting=make())
        data.generator.manual_seed(1)
        Trainer(epochs=epochs, lr=0.01, eval_train=False, checkpoint_dir=folder, device="cpu").fit(
            model, objective, data)
        return model, objective

    whole, _ = fit(3, tmp_path / "a")
    fit(1, tmp_path / "b")
    resumed, objective = fit(3, tmp_path / "b")
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert math.isfinite(float(objective.weighting.telemetry()[next(iter(objective.weighting.telemetry()))]))
