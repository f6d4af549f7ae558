"""ARML (Shi et al. 2020) and BLOOP (ICML 2024) against float64 hand computations of the papers' rules on the tiny
two-head net, property checks of their pure functions, and exact resume."""

import io

import pytest
import torch
from _tiny import AUX, LAMBDA, batch, build, flat, reference
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import auxloss as al
from auxloss.weighting.arml import ARML, arml_gradient, arml_project, arml_step
from auxloss.weighting.bloop import BLOOP, bloop_direction, ema_update
from auxloss.weighting.registry import build_weighting

FAST = settings(max_examples=60, deadline=None)
SHARED = {
    "aux1": ["model.0.weight", "model.0.bias"],
    "aux2": ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"],
}
MAIN_REACH = ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias", "model.4.weight", "model.4.bias"]


def assert_grads(model, expected, atol=1e-10):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=atol, rtol=0, msg=n)


def sgd(model, lr=0.2):
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


# -- ARML ----------------------------------------------------------------------------------------------------------
def arml_reference(grads, alpha, lr):
    """One projected step on J(α) = ‖g_0 − Σ α_k λ_k g_k‖², from flat float64 vectors, written out term by term."""
    lam = [LAMBDA[k] for k in AUX]
    b = [float(flat(grads["main"], SHARED[k]) @ flat(grads[k], SHARED[k])) for k in AUX]
    common = [n for n in SHARED["aux1"] if n in SHARED["aux2"]]
    g12 = float(flat(grads["aux1"], common) @ flat(grads["aux2"], common))
    gram = [[float(flat(grads["aux1"], SHARED["aux1"]).square().sum()), g12],
            [g12, float(flat(grads["aux2"], SHARED["aux2"]).square().sum())]]
    grad = [-2 * lam[k] * (b[k] - sum(alpha[j] * lam[j] * gram[j][k] for j in range(2))) for k in range(2)]
    stepped = [alpha[k] - lr * grad[k] for k in range(2)]
    shift = (2 - sum(stepped)) / 2
    return [max(0.0, a + shift) for a in stepped]


def test_arml_takes_the_papers_projected_gradient_step_and_writes_the_reweighted_update():
    lr = 0.5
    weighting = ARML(lr=lr)
    model, objective = build(weighting)
    alpha = [1.0, 1.0]
    for t in range(3):
        model.zero_grad()
        report, grads = reference(model, objective, batch(t))
        objective.backward(report)
        alpha = arml_reference(grads, alpha, lr)
        torch.testing.assert_close(weighting.alpha, torch.tensor(alpha, dtype=torch.float64), atol=1e-12, rtol=0)
        expected = {}
        for n, g0 in grads["main"].items():
            total = g0
            for i, k in enumerate(AUX):
                gk = grads[k][n]
                if gk is not None:
                    coef = alpha[i] * LAMBDA[k] if n in SHARED[k] else LAMBDA[k]
                    total = coef * gk if total is None else total + coef * gk
            expected[n] = total
        assert_grads(model, expected)
        assert weighting.telemetry()["arml_alpha/aux2"] == pytest.approx(alpha[1], abs=1e-12)
        sgd(model)
        objective.advance()
    assert alpha != [1.0, 1.0]


def test_arml_recovers_the_weights_that_reproduce_the_main_gradient():
    # g_0 = Σ α*_k λ_k g_k exactly, with α* on the constraint set: α* is a fixed point, and the iteration finds it.
    g = torch.Generator().manual_seed(0)
    gks = torch.randn(3, 8, dtype=torch.float64, generator=g)
    lam = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    target = torch.tensor([1.5, 0.25, 1.25], dtype=torch.float64)  # Σ = K = 3
    g0 = ((target * lam)[:, None] * gks).sum(0)
    b, gram = gks @ g0, gks @ gks.T
    assert torch.allclose(arml_gradient(target, lam, b, gram), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    alpha = torch.ones(3, dtype=torch.float64)
    step = 1.0 / (2 * float(torch.linalg.eigvalsh(lam[:, None] * gram * lam[None, :]).max()))
    for _ in range(5000):
        alpha = arml_step(alpha, lam, b, gram, step)
    torch.testing.assert_close(alpha, target, atol=1e-8, rtol=0)


@FAST
@given(st.data())
def test_arml_step_keeps_weights_non_negative_and_never_increases_j_inside_the_constraints(data):
    k = data.draw(st.integers(1, 4))
    d = data.draw(st.integers(1, 6))
    value = st.integers(-300, 300).map(lambda i: i / 100)
    gks = torch.tensor(data.draw(st.lists(st.lists(value, min_size=d, max_size=d), min_size=k, max_size=k)),
                       dtype=torch.float64)
    g0 = torch.tensor(data.draw(st.lists(value, min_size=d, max_size=d)), dtype=torch.float64)
    lam = torch.tensor(data.draw(st.lists(st.integers(1, 200).map(lambda i: i / 100), min_size=k, max_size=k)),
                       dtype=torch.float64)
    alpha = arml_project(torch.tensor(data.draw(st.lists(st.integers(0, 300).map(lambda i: i / 100), min_size=k,
                                                          max_size=k)), dtype=torch.float64))
    b, gram = gks @ g0, gks @ gks.T
    top = float(torch.linalg.eigvalsh(lam[:, None] * gram * lam[None, :]).max())
    lr = 1.0 / (2 * top) if top > 0 else 0.1
    new = arml_step(alpha, lam, b, gram, lr)
    assert bool(torch.isfinite(new).all()) and bool((new >= 0).all())

    def objective_j(a):
        return float(((g0 - ((a * lam)[:, None] * gks).sum(0)) ** 2).sum())

    shifted = alpha - lr * arml_gradient(alpha, lam, b, gram)
    shifted = shifted + (k - shifted.sum()) / k
    assume(bool((shifted >= 0).all()) and abs(float(alpha.sum()) - k) < 1e-9)  # no clipping: a true projection
    assert float(new.sum()) == pytest.approx(k, abs=1e-9)
    assert objective_j(new) <= objective_j(alpha) + 1e-9 * (1 + objective_j(alpha))
    perm = torch.tensor(data.draw(st.permutations(range(k))))
    torch.testing.assert_close(arml_step(alpha[perm], lam[perm], b[perm], gram[perm][:, perm], lr), new[perm],
                               atol=1e-12, rtol=0)


def test_arml_amortized_moves_alpha_on_refresh_steps_only_and_checks_lr():
    weighting = ARML(lr=0.5, mode="amortized", every=2)
    model, objective = build(weighting)
    seen = []
    for t in range(4):
        model.zero_grad()
        b = batch(t)
        objective.backward(objective(model(b["input"]), b))
        seen.append(weighting.alpha.clone())
        objective.advance()
    assert weighting.updates == 2
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3]) and not torch.equal(seen[1], seen[2])
    assert weighting.n_backward_calls == 3 + 1 + 3 + 1
    with pytest.raises(al.AuxLossError, match="lr"):
        ARML(lr=0)


# -- BLOOP ---------------------------------------------------------------------------------------------------------
def test_bloop_projects_the_auxiliary_gradient_off_the_main_gradients_ema():
    rho, eps = 0.3, 1e-7
    weighting = BLOOP(ema=rho, eps=eps)
    model, objective = build(weighting)
    ema = None
    for t in range(3):
        model.zero_grad()
        report, grads = reference(model, objective, batch(t))
        objective.backward(report)
        shared = SHARED["aux2"]  # the tensors both g_0 and g_aux = Σ λ_k g_k reach
        g0 = flat(grads["main"], MAIN_REACH)
        ema = ema_update(ema, g0, rho) if ema is not None else g0.clone()
        e = ema[: flat(grads["main"], shared).numel()]  # `shared` leads MAIN_REACH
        aux_sum = {n: sum(LAMBDA[k] * grads[k][n] for k in AUX if grads[k][n] is not None) for n in grads["main"]}
        ga = flat(aux_sum, shared)
        ratio = float(ga @ e) / (float(e @ e) + eps)
        projected = ga - ratio * e
        i = 0
        expected = {}
        for n, g in grads["main"].items():
            if n in shared:
                size = g.numel()
                expected[n] = g + projected[i:i + size].view_as(g)
                i += size
            else:
                expected[n] = g
        for k in AUX:  # each head's own parameters get λ_k·g_k
            for n, gk in grads[k].items():
                if gk is not None and grads["main"][n] is None:
                    expected[n] = LAMBDA[k] * gk
        assert_grads(model, expected)
        written = torch.cat([model.get_parameter(n).grad.flatten() for n in shared])
        # BLOOP's guarantee: the auxiliary part of the update is orthogonal to the EMA, up to ε's share
        left = float((written - flat(grads["main"], shared)) @ e)
        assert left == pytest.approx(float(ga @ e) * eps / (float(e @ e) + eps), abs=1e-13)
        assert weighting.telemetry()["bloop/ratio"] == pytest.approx(ratio, rel=1e-10)
        assert weighting.n_backward_calls == 2 * (t + 1)  # two backward passes per step, for two aux tasks
        sgd(model)
        objective.advance()


@FAST
@given(st.data())
def test_bloop_direction_properties(data):
    d = data.draw(st.integers(1, 6))
    value = st.integers(-500, 500).map(lambda i: i / 100)
    g0, ga, e = (torch.tensor(data.draw(st.lists(value, min_size=d, max_size=d)), dtype=torch.float64)
                 for _ in range(3))
    out = bloop_direction(g0, ga, e, eps=0.0) if float(e @ e) > 0 else bloop_direction(g0, ga, e)
    assert bool(torch.isfinite(out).all())
    if float(e @ e) > 0:  # the auxiliary part is orthogonal to e, and g_0 passes untouched
        assert abs(float((out - g0) @ e)) <= 1e-9 * (1 + float(ga.norm()) * float(e.norm()))
        torch.testing.assert_close(bloop_direction(g0, 3 * e, e, eps=0.0), g0, atol=1e-9, rtol=0)
    rho = data.draw(st.integers(1, 100).map(lambda i: i / 100))
    torch.testing.assert_close(ema_update(e, g0, rho), (1 - rho) * e + rho * g0, atol=1e-12, rtol=0)
    assert torch.equal(ema_update(None, g0, rho), g0)


def test_bloop_arguments_and_registry():
    for kw in ({"ema": 0.0}, {"ema": 1.5}, {"eps": -1.0}):
        with pytest.raises(al.AuxLossError):
            BLOOP(**kw)
    assert isinstance(build_weighting({"type": "bloop", "ema": 0.2}), BLOOP)
    assert isinstance(build_weighting({"type": "arml", "mode": "amortized", "every": 20}), ARML)
    assert repr(BLOOP()) == "BLOOP(ema=0.1, eps=1e-07, mode='exact', every=10, stats_params=None, params=None)"
    assert repr(ARML()) == "ARML(lr=0.05, mode='exact', every=10, stats_params=None, params=None)"


# -- exact resume ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: ARML(lr=0.3), lambda: BLOOP(ema=0.2),
                                  lambda: BLOOP(mode="amortized", every=3)])
def test_state_dict_round_trips_and_resume_is_exact(make):
    def run(model, objective, seeds):
        out = []
        for s in seeds:
            model.zero_grad()
            b = batch(s)
            objective.backward(objective(model(b["input"]), b))
            out.append([p.grad.clone() for p in model.parameters()])
            sgd(model)
            objective.advance()
        return out

    w1 = make()
    m1, o1 = build(w1)
    run(m1, o1, range(4))
    buffer = io.BytesIO()
    torch.save({"model": m1.state_dict(), "objective": o1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    m2, o2 = build(make(), seed=1)
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["objective"])
    for a, b in zip(run(m1, o1, range(4, 9)), run(m2, o2, range(4, 9))):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
