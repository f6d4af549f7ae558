"""The TorchJD bridge against TorchJD itself: the shared gradient it writes is ``aggregator(J)`` for the matrix of
per-task gradients, on fixed matrices and on each step of short training runs; heads get their own gradients;
amortized steps, GradScaler, checkpoints and configs.

The reference is always a *separate* aggregator built by the test from TorchJD (same class, same arguments), fed a
matrix the test builds from its own ``torch.autograd.grad`` calls.
"""

import io
import math
import warnings

import pytest

torchjd = pytest.importorskip("torchjd")

import torch
from _tiny import AUX, LAMBDA, batch, build, reference
from torch import nn
from torchjd import aggregation as jd

import auxloss as al
from auxloss.errors import AuxLossError
from auxloss.step import LossReport, StepContext
from auxloss.train import Callback, Trainer
from auxloss.weighting import TorchJD, build_weighting
from auxloss.weighting.torchjd import available_aggregators

# The tiny net's shared tensors (reached by the main task and at least one auxiliary task): aux1 reads layer "1",
# aux2 layer "3". aux1 does not reach model.2: zeros in its row there.
SHARED = ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
MAIN_ONLY = ["model.4.weight", "model.4.bias"]

# Constructor arguments for the aggregators that need some (m: the number of rows).
REQUIRED = {
    "CAGrad": lambda m: {"c": 0.5},
    "TrimmedMean": lambda m: {"trim_number": 1},
    "Krum": lambda m: {"n_byzantine": 1},
    "FairGrad": lambda m: {"alpha": 1.0},
    "NashMTL": lambda m: {"n_tasks": m},
    "Constant": lambda m: {"weights": torch.linspace(0.5, 1.5, m)},
}


def make(name, m):
    return getattr(jd, name)(**REQUIRED.get(name, lambda m: {})(m))


def matrices():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    return {
        "torchjd-doc": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]),  # TorchJD's own conflicting example
        "conflicting": torch.stack([a, -0.8 * a + 0.3 * b, b]),  # row 1 against row 0
        "agreeing": torch.rand(3, 4, generator=g) + 0.1,  # every pair of rows at a positive angle
        "four-tasks": torch.randn(4, 6, generator=g),
        "main-dominates": torch.stack([10 * a, 0.1 * b, -0.1 * a]),
    }


# -- 1. fixed matrices -----------------------------------------------------------------------------------------------
def run_bridge_on(matrix, weighting, lambdas):
    """One backward of ``weighting`` on losses whose per-task gradients are the rows of ``matrix``: a shared
    vector θ (row k divided by λ_k, so that λ_k·g_k is the row), a head of each auxiliary task, a main-only tensor.
    Returns θ.grad, the heads' and the main-only tensor's gradients."""
    m, n = matrix.shape
    theta = nn.Parameter(torch.zeros(n))
    heads = [nn.Parameter(torch.zeros(2)) for _ in range(m - 1)]
    own = nn.Parameter(torch.zeros(3))
    names = [f"aux{k}" for k in range(1, m)]
    weighting.bind("main", names)
    losses = {"main": matrix[0] @ theta + 3.0 * own.sum()}
    for k, name in enumerate(names, start=1):
        lam = lambdas[k - 1]
        row = matrix[k] / lam if lam > 0 else matrix[k]
        losses[name] = row @ theta + float(k) * heads[k - 1].sum()
    report = LossReport(total=sum(losses.values()), losses=losses,
                        weights={"main": 1.0, **dict(zip(names, lambdas))}, metrics={}, step=0, batch_size=1)
    weighting.backward(report, StepContext())
    return theta.grad, [h.grad for h in heads], own.grad


# λ = powers of two, so that λ·(row/λ) is the row exactly in float32
@pytest.mark.parametrize("case", list(matrices()))
@pytest.mark.parametrize("name", sorted(available_aggregators()))
def test_on_fixed_matrices_the_bridge_writes_torchjds_own_aggregation(name, case):
    matrix = matrices()[case]
    m = matrix.shape[0]
    lambdas = [0.5 if k % 2 else 0.25 for k in range(1, m)]
    torch.manual_seed(0)  # Random, GradDrop and GradVac draw from torch's generator
    try:
        expected = make(name, m)(matrix)
    except ValueError as exc:  # e.g. TrimmedMean and Krum need more rows than this matrix has
        pytest.skip(f"{name} refuses a {tuple(matrix.shape)} matrix: {exc}")
    reference_weights = None
    if isinstance(make(name, m), jd.WeightedAggregator) and name not in {"NashMTL"}:
        torch.manual_seed(0)
        reference_weights = make(name, m).weighting(matrix)
    weighting = TorchJD(name, REQUIRED.get(name, lambda m: {})(m))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NashMTL's cvxpy notes on its problem's form
        shared, heads, own = run_bridge_on(matrix, weighting, lambdas)
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)
    for k, grad in enumerate(heads, start=1):  # a head gets its own task's λ_k·g_k
        torch.testing.assert_close(grad, torch.full((2,), k * lambdas[k - 1]))
    torch.testing.assert_close(own, torch.full((3,), 3.0))  # the main path's own tensor: g_0
    tele = weighting.telemetry()
    if reference_weights is not None:
        got = torch.stack([tele["jd_weight/main"], *(tele[f"jd_weight/aux{k}"] for k in range(1, m))])
        torch.testing.assert_close(got.float(), reference_weights.float(), atol=1e-5, rtol=1e-5)
        for k in range(1, m):
            assert float(tele[f"effw/aux{k}"]) == pytest.approx(lambdas[k - 1] * float(got[k]), rel=1e-6)
    if not weighting.weighted:
        assert not any(k.startswith(("effw/", "jd_weight/")) for k in tele)
        assert "cos/aux1" in tele


@pytest.mark.parametrize("name", ["UPGrad", "MGDA", "Mean"])
def test_a_task_whose_weight_is_zero_leaves_the_matrix(name):
    """A row of zeros would change some aggregators' answer (MGDA's least-norm point is then 0): it is left out."""
    matrix = matrices()["conflicting"]
    shared, _, _ = run_bridge_on(matrix, weighting := TorchJD(name), [0.5, 0.0])
    expected = make(name, 2)(matrix[:2])
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)
    assert float(weighting.telemetry()["jd_weight/aux2"]) == 0.0
    assert shared.abs().sum() > 0


def test_the_main_task_is_one_row_among_others_not_kept_at_one():
    """Symmetric: with MGDA the main gradient's coefficient follows the matrix (it is 1 in every main-first method)."""
    weighting = TorchJD("MGDA")
    run_bridge_on(matrices()["main-dominates"], weighting, [0.5, 0.25])
    w0 = float(weighting.telemetry()["jd_weight/main"])
    assert 0.0 <= w0 < 0.5


# -- 2. training runs ------------------------------------------------------------------------------------------------
def hand_update(grads, aggregator):
    """The update the bridge must write, from the test's own per-task gradients: ``aggregator(J)`` on the shared
    tensors (rows main, λ_1·g_1, λ_2·g_2; zeros where a task does not reach), λ_k·g_k on the heads, g_0 above."""
    rows = []
    for task, lam in (("main", 1.0), *((k, LAMBDA[k]) for k in AUX)):
        rows.append(torch.cat([(lam * grads[task][n] if grads[task][n] is not None
                                else torch.zeros_like(grads["main"][n])).flatten() for n in SHARED]))
    vector = aggregator(torch.stack(rows))
    out, start = {}, 0
    for n in SHARED:
        size = grads["main"][n].numel()
        out[n] = vector[start:start + size].view_as(grads["main"][n])
        start += size
    for n in MAIN_ONLY:
        out[n] = grads["main"][n]
    for k in AUX:
        for n, g in grads[k].items():
            if n.startswith(f"heads.{k}."):
                out[n] = LAMBDA[k] * g
    return out


class CheckEachStep(Callback):
    """Before each backward: the test's own per-task gradients and the expected update; after it: p.grad."""

    def __init__(self, model, aggregator):
        self.model, self.aggregator, self.expected, self.checked = model, aggregator, None, 0

    def on_before_backward(self, trainer, report):
        names, params = zip(*self.model.named_parameters())
        grads = {}
        for task, loss in report.losses.items():
            grads[task] = dict(zip(names, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)))
        self.expected = hand_update(grads, self.aggregator)

    def on_after_backward(self, trainer, report):
        for n, p in self.model.named_parameters():
            torch.testing.assert_close(p.grad, self.expected[n], atol=1e-9, rtol=1e-7, msg=n)
        assert all(math.isfinite(float(v.detach())) for v in report.losses.values())
        self.checked += 1


@pytest.mark.parametrize("name, params", [("UPGrad", {}), ("MGDA", {}), ("CAGrad", {"c": 0.4})])
def test_a_short_training_run_writes_aggregator_of_j_on_every_step(name, params):
    weighting = TorchJD(name, params)
    model, objective = build(weighting)
    before = [p.detach().clone() for p in model.parameters()]
    check = CheckEachStep(model, getattr(jd, name)(**params))
    loader = [batch(s) for s in range(4)]
    result = Trainer(epochs=2, lr=0.1, optimizer="sgd", eval_train=False, device="cpu", callbacks=[check]).fit(
        model, objective, loader)
    assert check.checked == 8
    assert all(math.isfinite(v) for v in result.history[-1].values() if isinstance(v, float))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert weighting.n_backward_calls == 8 * 3  # 1 + K per step, as the other gradient-aware strategies
    assert {"jd_weight/main", "jd_weight/aux1", "effw/aux2", "cos/aux1"} <= set(weighting.telemetry())


def test_amortized_steps_reuse_the_refresh_weights_on_the_whole_matrix():
    """Between refreshes: one backward of w_0·L_0 + Σ w_k·λ_k·L_k, w_k at head k's tap. The shared tensors get
    w·J with the cached w, the heads their full λ_k·g_k, the main path above the taps w_0·g_0."""
    weighting = TorchJD("UPGrad", mode="amortized", every=2)
    model, objective = build(weighting)
    objective.backward(objective(model(batch(0)["input"]), batch(0)), StepContext(model=model))  # refresh
    tele = weighting.telemetry()
    w = {t: float(tele[f"jd_weight/{t}"]) for t in ("main", *AUX)}
    model.zero_grad()
    ctx = StepContext(model=model)
    objective.before_step(ctx)
    b = batch(1)
    report = objective(model(b["input"]), b)
    calls = weighting.n_backward_calls
    objective.backward(report, ctx)
    assert weighting.n_backward_calls == calls + 1
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.set_trunk_grad_scales({})
    _, grads = reference(model, objective, b)
    for n in SHARED:
        expected = w["main"] * grads["main"][n]
        for k in AUX:
            if grads[k][n] is not None:
                expected = expected + w[k] * LAMBDA[k] * grads[k][n]
        torch.testing.assert_close(got[n], expected, atol=1e-12, rtol=0, msg=n)
    for n in MAIN_ONLY:
        torch.testing.assert_close(got[n], w["main"] * grads["main"][n], atol=1e-12, rtol=0)
    for k in AUX:
        n = f"heads.{k}.weight"
        torch.testing.assert_close(got[n], LAMBDA[k] * grads[k][n], atol=1e-12, rtol=0)


def test_gradscaler_the_aggregator_sees_true_gradients_and_p_grad_is_in_the_scaled_domain():
    runs = []
    for use_scaler in (False, True):
        weighting = TorchJD("UPGrad")
        model, objective = build(weighting)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None
        b = batch(0)
        objective.backward(objective(model(b["input"]), b), scaler=scaler)
        runs.append(({n: p.grad.clone() for n, p in model.named_parameters()}, weighting.telemetry()))
    (plain, t_plain), (scaled, t_scaled) = runs
    for n in plain:
        torch.testing.assert_close(scaled[n], 1024.0 * plain[n], atol=1e-9, rtol=1e-9)
    for key, value in t_plain.items():
        assert float(t_scaled[key]) == pytest.approx(float(value), rel=1e-9, abs=1e-12)


def test_gradient_accumulation_adds_scale_times_each_micro_batchs_update():
    weighting = TorchJD("UPGrad")
    model, objective = build(weighting)
    aggregator = jd.UPGrad()
    total = {}
    for s in (0, 1):
        report, grads = reference(model, objective, batch(s))
        objective.backward(report, scale=0.5)
        total = {n: 0.5 * g + total.get(n, 0.0) for n, g in hand_update(grads, aggregator).items()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, total[n], atol=1e-10, rtol=1e-7, msg=n)


# -- state -----------------------------------------------------------------------------------------------------------
def _run(model, objective, seeds):
    grads = []
    for s in seeds:
        model.zero_grad()
        b = batch(s)
        ctx = StepContext(model=model)
        objective.before_step(ctx)
        objective.backward(objective(model(b["input"]), b), ctx)
        grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        objective.advance()
    return grads


def _checkpoint(model, objective):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "objective": objective.state_dict(), "rng": torch.get_rng_state()},
               buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # as auxloss's own checkpoints are read


@pytest.mark.parametrize("make_weighting", [
    lambda: TorchJD("UPGrad", mode="amortized", every=3),  # the bridge's own state: counters, cached weights, w_0
    lambda: TorchJD("GradVac", {"beta": 0.3}),  # a stateful aggregator: its moving cosines, and torch's generator
    lambda: TorchJD("ExcessMTL", {"n_warmup_steps": 2}),  # another: sums over the matrix, a step counter
], ids=["upgrad-amortized", "gradvac", "excessmtl"])
def test_state_dict_round_trips_and_resume_is_exact(make_weighting):
    torch.manual_seed(0)
    w1 = make_weighting()
    m1, o1 = build(w1)
    _run(m1, o1, range(4))
    saved = _checkpoint(m1, o1)
    w2 = make_weighting()
    m2, o2 = build(w2, seed=1)
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["objective"])
    assert o2.state_dict().keys() == o1.state_dict().keys()
    torch.set_rng_state(saved["rng"])
    first = _run(m1, o1, range(4, 9))
    torch.set_rng_state(saved["rng"])
    second = _run(m2, o2, range(4, 9))
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert {k: float(v) for k, v in w1.telemetry().items()} == {k: float(v) for k, v in w2.telemetry().items()}


def test_a_resumed_gradvac_differs_from_a_fresh_one_so_the_state_matters():
    torch.manual_seed(0)
    w1 = TorchJD("GradVac", {"beta": 0.3})
    m1, o1 = build(w1)
    _run(m1, o1, range(4))
    saved = _checkpoint(m1, o1)
    fresh = TorchJD("GradVac", {"beta": 0.3})
    m2, o2 = build(fresh)
    m2.load_state_dict(saved["model"])
    torch.set_rng_state(saved["rng"])
    a = _run(m1, o1, [4])
    torch.set_rng_state(saved["rng"])
    b = _run(m2, o2, [4])
    assert any(not torch.equal(x, y) for x, y in zip(a[0], b[0]))


def test_an_aggregator_state_a_checkpoint_cannot_hold_restarts_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy's notes
        w1 = TorchJD("NashMTL", {"n_tasks": 3})
        m1, o1 = build(w1)
        _run(m1, o1, range(2))
        saved = _checkpoint(m1, o1)  # its cvxpy problem is no plain data: not saved
    w2 = TorchJD("NashMTL", {"n_tasks": 3})
    _, o2 = build(w2)
    with pytest.warns(UserWarning, match="NashMTL.*restarts from its initial state"):
        o2.load_state_dict(saved["objective"])
    assert w2.backward_steps == 2  # the bridge's own state is restored all the same


# -- 3. configs and errors -------------------------------------------------------------------------------------------
def test_a_config_builds_the_bridge_with_the_aggregators_params(tmp_path):
    from auxloss.experiment.build import build_run
    from auxloss.experiment.config import load_config

    (tmp_path / "c.yaml").write_text("""\
name: jd
seeds: 1
data: {name: shapes, n_train: 32, n_val: 16, n_test: 16, batch_size: 16, params: {image_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train: {epochs: 1, lr: 0.01, eval_train: false}
variants:
  - name: upgrad
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: 0.3}]
    weighting: {type: torchjd, aggregator: UPGrad, params: {pref_vector: [1.0, 2.0]}, mode: amortized, every: 4}
  - name: cagrad
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: 0.3}]
    weighting: {type: torchjd, aggregator: CAGrad, params: {c: 0.4}}
""")
    cfg = load_config(tmp_path / "c.yaml")
    upgrad = build_run(cfg, "upgrad", 0).objective.weighting
    assert isinstance(upgrad, TorchJD) and isinstance(upgrad.aggregator, jd.UPGrad)
    assert torch.equal(upgrad.aggregator.pref_vector, torch.tensor([1.0, 2.0]))
    assert (upgrad.mode, upgrad.every) == ("amortized", 4)
    built = build_run(cfg, "cagrad", 0)
    assert isinstance(built.objective.weighting.aggregator, jd.CAGrad)
    assert built.objective.weighting.aggregator.c == 0.4
    result = built.trainer.fit(built.model, built.objective, built.loaders["train"])
    assert math.isfinite(result.history[-1]["train/loss"])


@pytest.mark.parametrize("spec, problem", [
    ({"aggregator": "UPGrd"}, (r"unknown aggregator 'UPGrd'; the installed TorchJD offers \[.*'MGDA'.*\]\. "
                               r"Did you mean 'UPGrad'\?")),
    ({"aggregator": "CAGrad"}, r"aggregator CAGrad needs parameter\(s\) \['c'\]: give them under params"),
    ({"aggregator": "CAGrad", "params": {"cc": 0.4}},
     r"aggregator CAGrad has no parameter\(s\) \['cc'\]; its parameters are \['c', 'norm_eps'\]"),
    ({"aggregator": "CAGrad", "params": {"c": -1}}, r"aggregator CAGrad rejected params \{'c': -1\}: .*non-negative"),
    ({"aggregator": "UPGrad", "params": [0.4]}, r"params must be a mapping"),
    ({"aggregator": "ConFIG", "mode": "amortized"}, r"ConFIG has none .* Use mode='exact', or one of \[.*'UPGrad'"),
    ({"aggregator": 3}, r"aggregator must be the name of a TorchJD aggregator"),
    ({"aggregatr": "UPGrad"}, r"has no parameter\(s\) \['aggregatr'\]; its parameters are \['aggregator', 'params'"),
    ({"aggregator": "UPGrad", "params": {}, "aggregator_params": {}}, r"give either 'params' or 'aggregator_params'"),
])
def test_bad_configs_are_named(spec, problem):
    with pytest.raises(AuxLossError, match=problem):
        build_weighting({"type": "torchjd", **spec})


def test_the_aggregator_list_is_read_from_torchjd_and_a_name_may_differ_in_case():
    names = available_aggregators()
    assert {"UPGrad", "MGDA", "CAGrad", "DualProj", "PCGrad", "IMTLG"} <= set(names)
    assert "WeightedAggregator" not in names and "Aggregator" not in names  # bases, not methods
    assert isinstance(build_weighting({"type": "torchjd", "aggregator": "upgrad"}).aggregator, jd.UPGrad)


def test_an_aggregator_object_may_be_given_but_not_with_params():
    weighting = TorchJD(jd.DualProj())
    assert isinstance(weighting.aggregator, jd.DualProj)
    with pytest.raises(AuxLossError, match="already built"):
        TorchJD(jd.DualProj(), {"pref_vector": [1.0]})
    with pytest.raises(AuxLossError, match="not a TorchJD aggregator"):
        TorchJD(nn.Linear(2, 2))


def test_the_objective_refuses_a_plain_total_backward_with_the_bridge():
    model, objective = build(TorchJD())
    b = batch(0)
    with pytest.raises(AuxLossError, match="objective.backward"):
        objective(model(b["input"]), b).total.backward()


def test_an_auxmodel_wraps_the_bridge_like_any_weighting():
    model, objective = build(TorchJD("IMTLG"))
    assert isinstance(model, al.AuxModel)
    b = batch(0)
    objective.backward(objective(model(b["input"]), b))
    assert all(p.grad is not None for p in model.parameters())


def test_sum_through_the_bridge_is_the_fixed_weighting():
    """TorchJD's Sum adds the rows: the bridge with it writes the plain backward of L_0 + Σ λ_k·L_k (docs' control)."""
    b = batch(0)
    model, objective = build(TorchJD("Sum"))
    objective.backward(objective(model(b["input"]), b))
    plain_model, plain = build(None)
    plain(plain_model(b["input"]), b).total.backward()
    for (n, p), q in zip(model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-12, msg=n)


@pytest.mark.parametrize("name", ["UPGrad", "DualProj"])
def test_upgrad_and_dualproj_conflict_with_no_task_as_the_docs_say(name):
    matrix = matrices()["conflicting"]
    assert float(matrix[0] @ matrix[1]) < 0
    shared, _, _ = run_bridge_on(matrix, TorchJD(name), [0.5, 0.25])
    cos = (matrix @ shared) / (matrix.norm(dim=1) * shared.norm())
    assert bool((cos >= -1e-3).all()), cos  # TorchJD's projector regularises the Gramian (reg_eps=1e-4)


def test_stats_params_narrow_the_telemetry_never_the_matrix():
    b = batch(0)
    full_model, full = build(TorchJD("UPGrad"))
    full.backward(full(full_model(b["input"]), b))
    model, objective = build(None)
    subset = TorchJD("UPGrad", stats_params=list(model.model[0].parameters()))  # a subset both aux tasks share
    objective.set_weighting(subset)
    objective.backward(objective(model(b["input"]), b))
    for (n, p), q in zip(model.named_parameters(), full_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=n)
    assert float(subset.telemetry()["cos/aux2"]) != pytest.approx(float(full.weighting.telemetry()["cos/aux2"]))
