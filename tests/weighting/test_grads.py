"""The per-task gradient engine: parameter discovery, shared sets, backward counts, subsets, amortization,
accumulation, GradScaler and checkpoints. Float64 references on a tiny net; every model here runs in milliseconds."""

import pytest
import torch
from _tiny import AUX, LAMBDA, batch, build, flat, reference
from torch import nn

import auxloss as al
from auxloss.weighting.gating import CosineGating
from auxloss.weighting.grads import discover_params, per_task_gradients
from auxloss.weighting.metabalance import MetaBalance
from auxloss.weighting.olaux import OLAux
from auxloss.weighting.projection import Projection

# aux1 reads layer "1" (after the first Linear), aux2 layer "3": what each shares with the main task.
SHARED = {
    "aux1": ["model.0.weight", "model.0.bias"],
    "aux2": ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"],
}
CONFLICT, AGREE, MIXED = 0, 3, 2  # batch seeds: both aux tasks conflict / both agree / aux1 conflicts only










def hand_gating(grads, weighted=False, subset=None):
    """g_0 + Σ c_k λ_k g_k on the shared tensors, λ_k g_k on the heads, g_0 elsewhere; c_k from `subset` if given."""
    coef = {}
    for k in AUX:
        names = SHARED[k] if subset is None else [n for n in SHARED[k] if n in subset]
        v0, vk = flat(grads["main"], names), flat(grads[k], names)
        cos = float(v0 @ vk / (v0.norm() * vk.norm()))
        coef[k] = max(0.0, cos) if weighted else float(cos > 0)
    return assemble(grads, lambda k, n: coef[k] * LAMBDA[k] if n in SHARED[k] else LAMBDA[k]), coef


def assemble(grads, aux_coef, main_coef=lambda n: 1.0):
    out = {}
    for n, g0 in grads["main"].items():
        total = None if g0 is None else main_coef(n) * g0
        for k in AUX:
            gk = grads[k][n]
            if gk is not None:
                total = aux_coef(k, n) * gk if total is None else total + aux_coef(k, n) * gk
        out[n] = total
    return out


def assert_grads(model, expected, atol=1e-10):
    for n, p in model.named_parameters():
        if expected[n] is None:
            assert p.grad is None, n
        else:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, expected[n], atol=atol, rtol=0, msg=n)


def step(model, objective, b, **kw):
    report = objective(model(b["input"]), b)
    objective.backward(report, **kw)
    return report


# -- discovery and shared sets ----------------------------------------------------------------------------------
def test_discovery_finds_every_trainable_leaf_once_in_a_stable_order_and_skips_frozen_ones():
    model, objective = build(None)
    model.model[2].bias.requires_grad_(False)
    b = batch(0)
    report = objective(model(b["input"]), b)
    found = discover_params(report.losses.values())
    expected = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(found) == len(expected) and {id(p) for p in found} == expected
    again = discover_params(objective(model(b["input"]), b).losses.values())
    assert [id(p) for p in again] == [id(p) for p in found]


def test_per_task_gradients_match_separate_autograd_calls_and_mark_unreached_parameters():
    model, objective = build(None)
    b = batch(0)
    report, grads = reference(model, objective, b)
    names, params = zip(*model.named_parameters())
    out, calls = per_task_gradients([report.losses[t] for t in ("main", *AUX)], list(params))
    assert calls == 3
    for t, gs in zip(("main", *AUX), out):
        for n, g in zip(names, gs):
            if grads[t][n] is None:
                assert g is None
            else:
                torch.testing.assert_close(g, grads[t][n], atol=0, rtol=0)
    # the shared sets are those of the architecture: aux1 reaches only the first layer of the trunk
    for k in AUX:
        shared = [n for n in names if grads["main"][n] is not None and grads[k][n] is not None]
        assert shared == SHARED[k]


# -- exact mode: counts and the reach of each backward -------------------------------------------------------------
def count_backward(monkeypatch):
    calls = {"grad": 0, "backward": 0}
    grad, backward = torch.autograd.grad, torch.autograd.backward

    def counting_grad(*a, **kw):
        calls["grad"] += 1
        return grad(*a, **kw)

    def counting_backward(*a, **kw):
        calls["backward"] += 1
        return backward(*a, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.autograd, "backward", counting_backward)
    return calls


@pytest.mark.parametrize("make", [CosineGating, Projection, lambda: OLAux(lr=0.1), MetaBalance])
def test_exact_mode_runs_one_backward_per_task(monkeypatch, make):
    weighting = make()
    model, objective = build(weighting)
    calls = count_backward(monkeypatch)
    for s in range(3):
        step(model, objective, batch(s))
        assert calls == {"grad": 3 * (s + 1), "backward": 0}
        assert weighting.n_backward_calls == 3 * (s + 1)


def test_an_auxiliary_backward_never_runs_through_the_main_branch_above_its_tap():
    weighting = CosineGating()
    model, objective = build(weighting)
    seen = {"main_head": 0, "layer3": 0}

    def watch(key):
        def hook(module, args, output):
            output.register_hook(lambda g: seen.__setitem__(key, seen[key] + 1))
        return hook

    model.model[4].register_forward_hook(watch("main_head"))  # only the main loss reaches it
    model.model[3].register_forward_hook(watch("layer3"))  # main and aux2 reach it, aux1 (tapped below) does not
    step(model, objective, batch(0))
    assert seen == {"main_head": 1, "layer3": 2}


def test_amortized_mode_refreshes_every_n_backward_calls_and_runs_one_backward_in_between(monkeypatch):
    weighting = CosineGating(mode="amortized", every=3)
    model, objective = build(weighting)
    calls = count_backward(monkeypatch)
    per_step = []
    for s in range(7):
        before = calls["grad"] + calls["backward"]
        step(model, objective, batch(s))
        per_step.append(calls["grad"] + calls["backward"] - before)
    assert per_step == [3, 1, 1, 3, 1, 1, 3]
    assert weighting.n_backward_calls == sum(per_step) and weighting.backward_steps == 7


def test_an_amortized_step_is_one_backward_of_the_cached_weighted_sum():
    # Batch CONFLICT gates both tasks off at the refresh; the next step reuses c = 0 for both, so the trunk and
    # (the documented approximation) the heads' own parameters get only what L_0 + Σ c·λ·L_k gives.
    weighting = CosineGating(mode="amortized", every=2)
    model, objective = build(weighting)
    step(model, objective, batch(CONFLICT))
    assert weighting.telemetry()["effw/aux1"] == 0.0 and weighting.telemetry()["effw/aux2"] == 0.0
    model.zero_grad()
    b = batch(MIXED)
    report, grads = reference(model, objective, b)
    objective.backward(report)
    expected = assemble(grads, lambda k, n: 0.0)
    for n, p in model.named_parameters():
        if n.startswith("heads."):
            torch.testing.assert_close(p.grad, torch.zeros_like(p), atol=1e-12, rtol=0)
        else:
            torch.testing.assert_close(p.grad, expected[n], atol=1e-10, rtol=0)


def test_amortized_gating_refresh_steps_equal_exact_mode():
    exact, amortized = CosineGating(), CosineGating(mode="amortized", every=2)
    (m1, o1), (m2, o2) = build(exact), build(amortized)
    for s in (CONFLICT, AGREE, MIXED):
        for m, o in ((m1, o1), (m2, o2)):
            m.zero_grad()
            step(m, o, batch(s))
        if amortized.backward_steps % 2 == 1:  # this call was a refresh
            for p1, p2 in zip(m1.parameters(), m2.parameters()):
                torch.testing.assert_close(p1.grad, p2.grad, atol=0, rtol=0)


# -- subsets and explicit parameters -----------------------------------------------------------------------------
def test_stats_subset_decides_for_all_shared_parameters():
    model, _ = build(None)
    subset = [model.model[2].weight]  # the last shared Linear's weight: only aux2 shares it...
    with pytest.raises(al.AuxLossError, match="aux1"):  # ...so aux1 has no statistics there
        weighting = CosineGating(stats_params=subset)
        model, objective = build(weighting)
        step(model, objective, batch(0))
    for seed in (CONFLICT, AGREE, MIXED):
        model, _ = build(None)
        subset_names = ["model.0.weight", "model.2.weight"]
        weighting = CosineGating(stats_params=[model.model[0].weight, model.model[2].weight])
        objective = build(weighting)[1]
        report, grads = reference(model, objective, batch(seed))
        objective.backward(report)
        expected, _ = hand_gating(grads, subset=subset_names)
        assert_grads(model, expected)
        for k in AUX:
            names = [n for n in SHARED[k] if n in subset_names]
            v0, vk = flat(grads["main"], names), flat(grads[k], names)
            assert weighting.telemetry()[f"cos/{k}"] == pytest.approx(float(v0 @ vk / (v0.norm() * vk.norm())))
            assert weighting.telemetry()[f"normratio/{k}"] == pytest.approx(float(vk.norm() / v0.norm()))


def test_explicit_params_give_the_same_update_and_a_missing_parameter_is_an_error():
    model, objective = build(None)
    objective.set_weighting(CosineGating(params=model))
    report, grads = reference(model, objective, batch(MIXED))
    objective.backward(report)
    assert_grads(model, hand_gating(grads)[0])
    model, objective = build(None)
    objective.set_weighting(CosineGating(params=list(model.model.parameters())))  # the heads are missing
    with pytest.raises(al.AuxLossError, match="missing from params"):
        step(model, objective, batch(0))


def test_a_detached_tap_shares_nothing_and_its_head_gets_its_plain_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model = al.attach(net, {"probe": al.Tap("1", nn.Linear(6, 3), detach=True)}).double()
    weighting = CosineGating()
    objective = al.Objective(aux=[al.Task("probe", source="probe", weight=0.5)], weighting=weighting)
    b = batch(0)
    report = objective(model(b["input"]), b)
    g_head = torch.autograd.grad(report.losses["probe"], model.heads["probe"].weight, retain_graph=True)[0]
    objective.backward(report)
    torch.testing.assert_close(model.heads["probe"].weight.grad, 0.5 * g_head, atol=1e-12, rtol=0)
    assert "cos/probe" not in weighting.telemetry()


# -- accumulation and GradScaler ---------------------------------------------------------------------------------
def test_accumulation_adds_each_micro_batchs_own_decision_and_equals_the_big_batch_when_decisions_agree():
    b1, b2 = batch(AGREE), batch(11)
    both = {k: torch.cat([b1[k], b2[k]]) for k in b1}
    weighting = CosineGating()
    model, objective = build(weighting)
    expected = {}
    for b in (b1, b2):
        report, grads = reference(model, objective, b)
        hand, coef = hand_gating(grads)
        assert coef == {"aux1": 1.0, "aux2": 1.0}  # every task agrees in both micro-batches
        objective.backward(report, scale=0.5)
        expected = {n: None if g is None else 0.5 * g + expected.get(n, 0.0) for n, g in hand.items()}
    assert_grads(model, expected)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    report, grads = reference(model, objective, both)
    assert hand_gating(grads)[1] == {"aux1": 1.0, "aux2": 1.0}
    objective.backward(report)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, accumulated[n], atol=1e-12, rtol=0)


def test_accumulation_with_disagreeing_micro_batches_is_the_mean_of_per_micro_batch_decisions():
    weighting = Projection()
    model, objective = build(weighting)
    total = {}
    for seed in (CONFLICT, AGREE):
        report, grads = reference(model, objective, batch(seed))
        objective.backward(report, scale=0.5)
        hand = hand_projection(grads)
        total = {n: None if g is None else 0.5 * g + total.get(n, 0.0) for n, g in hand.items()}
    assert_grads(model, total)


def hand_projection(grads):
    extra = {}
    for k in AUX:
        v0, vk = flat(grads["main"], SHARED[k]), flat(grads[k], SHARED[k])
        a = min(0.0, float(v0 @ vk)) / float(v0 @ v0)
        for n in SHARED[k]:
            extra[n] = extra.get(n, 0.0) - LAMBDA[k] * a
    return assemble(grads, lambda k, n: LAMBDA[k], lambda n: 1.0 + extra.get(n, 0.0))


@pytest.mark.parametrize("make", [Projection, lambda: MetaBalance(), lambda: OLAux(lr=0.1)])
def test_gradscaler_grads_unscale_to_the_unscaled_run_and_state_is_in_the_true_domain(make):
    runs = []
    for use_scaler in (False, True):
        weighting = make()
        model, objective = build(weighting)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None
        for s in (CONFLICT, MIXED):
            optimizer.zero_grad()
            step(model, objective, batch(s), scaler=scaler)
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        if scaler is not None:
            scaler.unscale_(optimizer)
        runs.append(({n: p.grad.clone() for n, p in model.named_parameters()}, raw, weighting))
    (plain, _, w_plain), (unscaled, scaled, w_scaled) = runs
    for n in plain:
        torch.testing.assert_close(unscaled[n], plain[n], atol=1e-12, rtol=0)
        torch.testing.assert_close(scaled[n], 1024.0 * plain[n], atol=1e-9, rtol=0)
    for key, value in w_plain.telemetry().items():  # telemetry is tensors: read as floats, as the logs do
        assert float(w_scaled.telemetry()[key]) == pytest.approx(float(value), rel=1e-12)
    s_plain, s_scaled = w_plain.get_extra_state()["strategy"], w_scaled.get_extra_state()["strategy"]
    for key, value in s_plain.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(s_scaled[key], value, atol=1e-12, rtol=1e-12)


def test_a_non_finite_gradient_falls_back_to_the_plain_sum_and_leaves_the_state_alone():
    # sqrt at 0 has an infinite derivative: a finite loss with an overflowing gradient, as fp16 can give.
    def spiky(pred, target):
        return torch.sqrt((pred - pred.detach()).abs().sum())

    weighting = OLAux(lr=0.1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model = al.attach(net, {"aux": al.Tap("1", nn.Linear(6, 3))}).double()
    objective = al.Objective(aux=[al.Task("aux", source="aux", loss=spiky, metric=None, weight=0.5)],
                             weighting=weighting)
    step(model, objective, batch(0))
    assert float(weighting.accumulated[0]) == 0.0 and weighting.telemetry() == {"olaux_w/aux": 1.0}
    assert not all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


# -- telemetry, checkpoints, arguments ----------------------------------------------------------------------------
def test_telemetry_reaches_the_next_reports_extras():
    weighting = Projection()
    model, objective = build(weighting)
    b = batch(CONFLICT)
    first = step(model, objective, b)
    assert not any(k.startswith("cos/") for k in first.extras)  # collected before the first backward
    tele = weighting.telemetry()
    second = objective(model(b["input"]), b)
    assert {k: second.extras[k] for k in tele} == tele
    assert tele["cos/aux1"] < 0 and 0 < tele["effw/aux1"] < LAMBDA["aux1"]
    assert set(tele) == {f"{kind}/{k}" for kind in ("cos", "normratio", "effw") for k in AUX}


def test_amortized_state_round_trips_and_resume_is_exact():
    def run(weighting, model, objective, seeds):
        out = []
        for s in seeds:
            model.zero_grad()
            step(model, objective, batch(s))
            out.append(([p.grad.clone() for p in model.parameters()], weighting.n_backward_calls))
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            objective.advance()
        return out

    for make in (lambda: CosineGating(mode="amortized", every=3), lambda: MetaBalance(mode="amortized", every=3),
                 lambda: OLAux(lr=0.5, horizon=2, mode="amortized", every=3)):
        w1 = make()
        m1, o1 = build(w1)
        run(w1, m1, o1, range(4))
        state, model_state = o1.state_dict(), m1.state_dict()
        w2 = make()
        m2, o2 = build(w2, seed=1)
        m2.load_state_dict(model_state)
        o2.load_state_dict(state)
        assert w2.backward_steps == 4 and torch.equal(w2._cached, w1._cached)
        a, b = run(w1, m1, o1, range(4, 9)), run(w2, m2, o2, range(4, 9))
        for (ga, ca), (gb, cb) in zip(a, b):
            assert ca == cb
            for x, y in zip(ga, gb):
                assert torch.equal(x, y)


def test_bad_arguments_are_reported():
    with pytest.raises(al.AuxLossError, match="mode"):
        CosineGating(mode="fast")
    with pytest.raises(al.AuxLossError, match="every"):
        Projection(mode="amortized", every=0)
    with pytest.raises(al.AuxLossError, match="stats_params"):
        CosineGating(stats_params=[])
    with pytest.raises(al.AuxLossError, match="weighted"):
        CosineGating(weighted="yes")
    with pytest.raises(al.AuxLossError, match="at least one auxiliary"):
        al.Objective(weighting=Projection())


def test_repr_prints_every_argument():
    assert repr(CosineGating(True, mode="amortized", every=4)) == (
        "CosineGating(weighted=True, mode='amortized', every=4, stats_params=None, params=None)")
    model, _ = build(None)
    text = repr(MetaBalance(0.5, 0.8, "shrink", stats_params=[model.model[0].weight], params=model))
    assert text == ("MetaBalance(relax=0.5, beta=0.8, adapt='shrink', mode='exact', every=10, "
                    "stats_params=<1 tensors>, params=AuxModel)")
    assert "beta=0.5, lr=0.01, horizon=3, init=1.0" in repr(OLAux(0.5, 0.01, 3))
    assert repr(Projection()) == "Projection(mode='exact', every=10, stats_params=None, params=None)"


# -- DDP ---------------------------------------------------------------------------------------------------------------
def _ddp_worker(rank, world, init_file, out_dir, steps):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        weighting = MetaBalance(mode="amortized", every=2)
        model, objective = build(weighting)
        ddp = nn.parallel.DistributedDataParallel(model)
        grads = []
        for s in range(steps):
            b = batch(s)
            half = {k: v[rank * 4:(rank + 1) * 4] for k, v in b.items()}
            model.zero_grad()
            objective.backward(objective(ddp(half["input"]), half))
            grads.append([p.grad.clone() for p in model.parameters()])
            sgd_step(model)
        torch.save(grads, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank leaves while the other still talks to it (gloo would abort it)
    finally:
        dist.destroy_process_group()


def sgd_step(model, lr=0.2):
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def test_under_ddp_each_rank_writes_the_update_of_the_global_batch(tmp_path):
    # Per-task gradients are averaged across the processes before any statistic, so two ranks with half a batch
    # each write exactly what one process writes for the whole batch, on refresh and on amortized steps alike.
    import torch.multiprocessing as mp

    steps = 3
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), steps), nprocs=2, join=True)
    weighting = MetaBalance(mode="amortized", every=2)
    model, objective = build(weighting)
    expected = []
    for s in range(steps):
        model.zero_grad()
        step(model, objective, batch(s))
        expected.append([p.grad.clone() for p in model.parameters()])
        sgd_step(model)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for g_step, e_step in zip(got, expected):
            for g, e in zip(g_step, e_step):
                torch.testing.assert_close(g, e, atol=1e-12, rtol=0)


def test_amortized_step_through_the_trainer_keeps_each_heads_full_gradient():
    """With the multiplier applied at the tap, the trunk gets m·λ·g_k and the head its full λ·g_k (float64)."""
    import auxloss as al
    from auxloss.step import StepContext
    from auxloss.weighting import CosineGating

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = al.attach(net, {"h": al.Tap("1", al.LinearHead(2))}, example_input=torch.randn(1, 5)).double()
    gate = CosineGating(weighted=True, mode="amortized", every=2)
    objective = al.Objective(aux=[al.Task("h", source="h", target="t2", weight=0.7)], weighting=gate)
    batch = {"input": torch.randn(16, 5, dtype=torch.float64), "target": torch.randint(0, 3, (16,)),
             "t2": torch.randint(0, 2, (16,))}
    objective.backward(objective(model(batch["input"]), batch))  # step 0: exact, fills the cache
    model.zero_grad()
    m = float(gate._amortized_multipliers()[0])  # what the next (amortized) step will use
    ctx = StepContext(model=model)  # what the Trainer passes: the step protocol puts m at the tap
    assert objective.before_step(ctx).sync_gradients
    objective.backward(objective(model(batch["input"]), batch), ctx)  # step 1: amortized, one backward
    got_trunk = net[0].weight.grad.clone()
    got_head = model.heads["h"].fc.weight.grad.clone()

    model.set_trunk_grad_scales({})
    out = model(batch["input"])
    l0 = torch.nn.functional.cross_entropy(out.main, batch["target"])
    lk = torch.nn.functional.cross_entropy(out.aux["h"], batch["t2"])
    g0 = torch.autograd.grad(l0, net[0].weight, retain_graph=True)[0]
    gk_trunk, gk_head = torch.autograd.grad(lk, [net[0].weight, model.heads["h"].fc.weight])
    assert 0.0 <= m < 1.0  # not 1, so the head check below tells the two behaviours apart
    assert torch.allclose(got_trunk, g0 + m * 0.7 * gk_trunk, atol=1e-12)
    assert torch.allclose(got_head, 0.7 * gk_head, atol=1e-12)
