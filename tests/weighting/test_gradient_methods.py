"""Each gradient-aware strategy against a float64 hand computation on a tiny net, plus resume and a training run.

The per-task gradients are taken in the test by separate ``torch.autograd.grad`` calls, the paper's formula is
applied by hand on flat vectors, and the result is compared with the ``.grad`` the strategy wrote.
"""

import io

import pytest
import torch
from _tiny import AUX, LAMBDA, batch, build, flat, reference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss.train import Callback, Trainer
from auxloss.weighting.gating import CosineGating
from auxloss.weighting.metabalance import MetaBalance
from auxloss.weighting.olaux import OLAux
from auxloss.weighting.projection import Projection

SHARED = {
    "aux1": ["model.0.weight", "model.0.bias"],
    "aux2": ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"],
}
# batch seeds and the signs of cos(g_0, g_k) they give at the initial weights (asserted where used)
CASES = {"conflict": (0, {"aux1": -1, "aux2": -1}), "agree": (3, {"aux1": 1, "aux2": 1}),
         "mixed": (2, {"aux1": -1, "aux2": 1})}










def unflat(vector, like, names):
    out, i = {}, 0
    for n in names:
        size = like[n].numel()
        out[n] = vector[i:i + size].view_as(like[n])
        i += size
    return out


def cos_of(grads, k):
    v0, vk = flat(grads["main"], SHARED[k]), flat(grads[k], SHARED[k])
    return float(v0 @ vk / (v0.norm() * vk.norm()))


def expected_update(grads, shared_terms):
    """g_0 where the main task reaches, plus for each aux task its term on its shared tensors (``shared_terms[k]``,
    a dict name -> tensor) and λ_k·g_k on the tensors only it reaches."""
    out = {}
    for n, g0 in grads["main"].items():
        total = g0
        for k in AUX:
            gk = grads[k][n]
            if gk is None:
                continue
            term = shared_terms[k][n] if n in SHARED[k] else LAMBDA[k] * gk
            total = term if total is None else total + term
        out[n] = total
    return out


def assert_grads(model, expected, atol=1e-10):
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, expected[n], atol=atol, rtol=0, msg=n)


def sgd(model, lr=0.2):
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


# -- cosine gating (Du et al. 2018) -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("weighted", [False, True])
def test_cosine_gating_matches_the_hand_formula(case, weighted):
    seed, signs = CASES[case]
    weighting = CosineGating(weighted=weighted)
    model, objective = build(weighting)
    report, grads = reference(model, objective, batch(seed))
    objective.backward(report)
    terms = {}
    for k in AUX:
        cos = cos_of(grads, k)
        assert (cos > 0) == (signs[k] > 0)
        c = max(0.0, cos) if weighted else float(cos > 0)
        terms[k] = {n: c * LAMBDA[k] * grads[k][n] for n in SHARED[k]}
        assert weighting.telemetry()[f"cos/{k}"] == pytest.approx(cos, abs=1e-12)
        assert weighting.telemetry()[f"effw/{k}"] == pytest.approx(c * LAMBDA[k], abs=1e-12)
    assert_grads(model, expected_update(grads, terms))


# -- asymmetric projection ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_projection_matches_the_hand_formula_and_never_touches_g0(case):
    seed, signs = CASES[case]
    weighting = Projection()
    model, objective = build(weighting)
    report, grads = reference(model, objective, batch(seed))
    objective.backward(report)
    terms = {}
    for k in AUX:
        v0, vk = flat(grads["main"], SHARED[k]), flat(grads[k], SHARED[k])
        dot = float(v0 @ vk)
        assert (dot > 0) == (signs[k] > 0)
        projected = vk - dot / float(v0 @ v0) * v0 if dot < 0 else vk
        assert abs(float(projected @ v0)) < 1e-12 or dot >= 0  # a conflicting g_k' is orthogonal to g_0
        terms[k] = {n: LAMBDA[k] * g for n, g in unflat(projected, grads[k], SHARED[k]).items()}
        expected_effw = LAMBDA[k] * (1 - cos_of(grads, k) ** 2) if dot < 0 else LAMBDA[k]
        assert weighting.telemetry()[f"effw/{k}"] == pytest.approx(expected_effw, abs=1e-12)
    expected = expected_update(grads, terms)
    assert_grads(model, expected)
    # The main task's first-order progress is protected over the whole update (g_0 is 0 on the heads). Not on
    # each task's own shared set: aux2 is projected on its larger set, so on aux1's layer alone its part of the
    # update may still lean against g_0.
    names = [n for n, g in grads["main"].items() if g is not None]
    update = torch.cat([model.get_parameter(n).grad.flatten() for n in names])
    v0 = flat(grads["main"], names)
    assert float(update @ v0) >= float(v0 @ v0) - 1e-12


# -- OL-AUX (Lin et al. 2019) --------------------------------------------------------------------------------------
def test_olaux_weights_after_a_horizon_follow_the_hand_formula():
    # Every `horizon` optimizer steps, w_k <- max(0, w_k + β·Σ_t α·g_0(t)ᵀg_k(t)); the update lands at the first
    # backward of the next window, before that step's combination.
    beta, lr, horizon = 3.0, 0.1, 3
    weighting = OLAux(beta=beta, lr=lr, horizon=horizon)
    model, objective = build(weighting)
    w = {k: 1.0 for k in AUX}
    sums = {k: 0.0 for k in AUX}
    for t in range(2 * horizon + 1):
        if t and t % horizon == 0:
            w = {k: max(0.0, w[k] + beta * sums[k]) for k in AUX}
            sums = {k: 0.0 for k in AUX}
        model.zero_grad()
        report, grads = reference(model, objective, batch(t))
        objective.backward(report)
        assert weighting.updates == t // horizon
        for i, k in enumerate(AUX):
            assert float(weighting.aux_weights[i]) == pytest.approx(w[k], abs=1e-12)
            assert weighting.telemetry()[f"effw/{k}"] == pytest.approx(w[k] * LAMBDA[k], abs=1e-12)
        terms = {k: {n: w[k] * LAMBDA[k] * grads[k][n] for n in SHARED[k]} for k in AUX}
        assert_grads(model, expected_update(grads, terms))
        for k in AUX:
            sums[k] += lr * float(flat(grads["main"], SHARED[k]) @ flat(grads[k], SHARED[k]))
        sgd(model)
        objective.advance()
    assert w != {k: 1.0 for k in AUX}


def test_olaux_clamps_weights_at_zero_and_needs_a_learning_rate():
    weighting = OLAux(beta=1e4, lr=1.0, horizon=1)
    model, objective = build(weighting)
    b = batch(CASES["conflict"][0])
    objective.backward(objective(model(b["input"]), b))
    objective.advance()
    objective.backward(objective(model(b["input"]), b))
    assert weighting.aux_weights.tolist() == [0.0, 0.0]
    no_lr = OLAux()
    model, objective = build(no_lr)
    with pytest.raises(al.AuxLossError, match="set_lr"):
        objective.backward(objective(model(b["input"]), b))
    no_lr.set_lr(0.01)
    objective.backward(objective(model(b["input"]), b))
    with pytest.raises(al.AuxLossError, match="lr"):
        no_lr.set_lr(-1.0)
    with pytest.raises(al.AuxLossError, match="horizon"):
        OLAux(horizon=0)


def test_olaux_accumulation_weights_each_micro_batch_by_its_scale():
    weighting = OLAux(lr=0.1)
    model, objective = build(weighting)
    expected = torch.zeros(2, dtype=torch.float64)
    for seed in (0, 1):
        report, grads = reference(model, objective, batch(seed))
        objective.backward(report, scale=0.5)
        for i, k in enumerate(AUX):
            expected[i] += 0.5 * 0.1 * float(flat(grads["main"], SHARED[k]) @ flat(grads[k], SHARED[k]))
    torch.testing.assert_close(weighting.accumulated, expected, atol=1e-14, rtol=0)


# -- MetaBalance (He et al. 2022) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("adapt", ["both", "shrink", "enlarge"])
def test_metabalance_moving_averages_and_rescaled_gradients_over_two_steps(adapt):
    relax, beta = 0.7, 0.9
    weighting = MetaBalance(relax=relax, beta=beta, adapt=adapt)
    model, objective = build(weighting)
    m0, mk = {}, {k: {} for k in AUX}
    union = SHARED["aux2"]
    for seed in (0, 1):
        model.zero_grad()
        report, grads = reference(model, objective, batch(seed))
        objective.backward(report)
        for n in union:
            m0[n] = beta * m0.get(n, 0.0) + (1 - beta) * float(grads["main"][n].norm())
        terms = {}
        for k in AUX:
            terms[k] = {}
            for n in SHARED[k]:
                mk[k][n] = beta * mk[k].get(n, 0.0) + (1 - beta) * float(grads[k][n].norm())
                f = relax * m0[n] / mk[k][n] + (1 - relax)
                if (adapt == "shrink" and not mk[k][n] > m0[n]) or (adapt == "enlarge" and not mk[k][n] < m0[n]):
                    f = 1.0
                terms[k][n] = LAMBDA[k] * f * grads[k][n]
        assert_grads(model, expected_update(grads, terms))
        sgd(model)
    position = {id(p): i for i, p in enumerate(weighting.params_)}
    for n in union:
        i = position[id(model.get_parameter(n))]
        assert float(weighting.m_main[i]) == pytest.approx(m0[n], abs=1e-14)
        for j, k in enumerate(AUX):
            if n in SHARED[k]:
                assert float(weighting.m_aux[j, i]) == pytest.approx(mk[k][n], abs=1e-14)
            else:
                assert float(weighting.m_aux[j, i]) == 0.0


def test_metabalance_rejects_bad_arguments():
    for kw, word in (({"relax": 1.5}, "relax"), ({"beta": 1.0}, "beta"), ({"adapt": "grow"}, "adapt")):
        with pytest.raises(al.AuxLossError, match=word):
            MetaBalance(**kw)


# -- checkpoints: exact resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: OLAux(beta=2.0, lr=0.1, horizon=3), lambda: MetaBalance(),
                                  lambda: CosineGating(weighted=True, stats_params=None)])
def test_state_dict_round_trips_through_torch_save_and_resume_is_exact(make):
    def run(model, objective, seeds):
        grads = []
        for s in seeds:
            model.zero_grad()
            b = batch(s)
            objective.backward(objective(model(b["input"]), b))
            grads.append([p.grad.clone() for p in model.parameters()])
            sgd(model)
            objective.advance()
        return grads

    w1 = make()
    m1, o1 = build(w1)
    run(m1, o1, range(4))  # OL-AUX: one update done, a window half accumulated
    buffer = io.BytesIO()
    torch.save({"model": m1.state_dict(), "objective": o1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    w2 = make()
    m2, o2 = build(w2, seed=1)
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["objective"])
    assert o2.state_dict().keys() == o1.state_dict().keys()
    for a, b in zip(run(m1, o1, range(4, 9)), run(m2, o2, range(4, 9))):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert w1.telemetry() == w2.telemetry()


# -- end to end ------------------------------------------------------------------------------------------------------
class Extras(Callback):
    def __init__(self):
        self.extras = []

    def on_train_batch_end(self, trainer, report, batch_idx):
        self.extras.append(dict(report.extras))


@pytest.mark.parametrize("make", [CosineGating, lambda: OLAux(lr=0.01, horizon=2),
                                  lambda: MetaBalance(mode="amortized", every=2)])
def test_training_with_the_trainer_logs_cosines(make):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    model = al.attach(net, {"aux": al.Tap("1", al.LinearHead(2))}, example_input=x[:1])
    objective = al.Objective(aux=[al.Task("aux", source="aux", weight=0.3)], weighting=make())
    recorder = Extras()
    result = Trainer(epochs=1, lr=0.01, accumulate=2, eval_train=False, callbacks=[recorder]).fit(
        model, objective, DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(x, y), batch_size=16))
    assert len(result.history) == 1 and "val/metric/main" in result.best
    assert all("cos/aux" in e and "effw/aux" in e and "normratio/aux" in e for e in recorder.extras)
    assert -1.0 <= recorder.extras[-1]["cos/aux"] <= 1.0
