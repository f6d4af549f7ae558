"""Representation mode: the rule applied at the taps' outputs inside one backward pass.

Float64 references by hand on the tiny net of ``_tiny`` (aux1 taps layer "1", aux2 the deeper layer "3"): the taps
are taken from the top down, each with its own ``autograd.grad`` calls on a fresh forward, and the update is the
plain backward plus each tap's injected term.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from _tiny import AUX, LAMBDA, batch, build
from torch import nn

import auxloss as al
from auxloss.step import StepContext
from auxloss.weighting import ARML, BLOOP, AutoLambda, CosineGating, MetaBalance, OLAux, Projection, TorchJD
from auxloss.weighting.registry import build_weighting

REP = "representation"
SEEDS = (0, 2, 3)
RELAX, BETA = 0.7, 0.9


def rep_step(model, objective, b, **ctx):
    context = StepContext(model=model, **ctx)
    objective.before_step(context)
    report = objective(model(b["input"]), b)
    objective.backward(report, context)
    return report


def plain_objective(tasks=None):
    return al.Objective(aux=tasks or [al.Task(n, source=n, target="t" + n[-1], weight=LAMBDA[n]) for n in AUX])


def rule(kind, u, g, lam):
    """What the rule adds at a tap on top of the main gradient ``u`` (first step, fresh state), and m_k or a_k."""
    dot, sq0, sqk = float(u.flatten() @ g.flatten()), float(u.flatten() @ u.flatten()), float(g.flatten() @ g.flatten())
    cos = dot / (sq0 * sqk) ** 0.5
    if kind == "gating":
        m = float(cos > 0)
    elif kind == "gating_weighted":
        m = max(0.0, cos)
    elif kind == "olaux":  # the weights start at init=1 and move only after a horizon
        m = 1.0
    elif kind == "metabalance":  # both moving averages start at 0: (1-β)·norm each, so their ratio is the norms'
        m = RELAX * (sq0 / sqk) ** 0.5 + 1 - RELAX
    elif kind == "projection":
        a = min(0.0, dot) / sq0
        return lam * g - lam * a * u, a
    return m * lam * g, m


def make(kind):
    return {"gating": lambda: CosineGating(mode=REP), "gating_weighted": lambda: CosineGating(True, mode=REP),
            "projection": lambda: Projection(mode=REP), "olaux": lambda: OLAux(lr=0.1, mode=REP),
            "metabalance": lambda: MetaBalance(RELAX, BETA, mode=REP)}[kind]()


def hand_update(model, b, kind):
    """p.grad for every parameter, tap "3" (aux2) first, then tap "1" (aux1) with what arrives from above."""
    net, heads = model.model, model.heads
    r1 = net[1](net[0](b["input"]))
    r2 = net[3](net[2](r1))
    losses = plain_objective()(al.Outputs(main=net[4](r2), aux={"aux1": heads["aux1"](r1), "aux2": heads["aux2"](r2)}),
                               b).losses
    l0, l1, l2 = losses["main"], losses["aux1"], losses["aux2"]
    grad = torch.autograd.grad
    u2, g2 = grad(l0, r2, retain_graph=True)[0], grad(l2, r2, retain_graph=True)[0]
    d2, m2 = rule(kind, u2, g2, LAMBDA["aux2"])
    u1 = grad([l0, r2], r1, grad_outputs=[torch.ones_like(l0), d2], retain_graph=True)[0]
    g1 = grad(l1, r1, retain_graph=True)[0]
    d1, m1 = rule(kind, u1, g1, LAMBDA["aux1"])
    trunk = list(net.parameters())
    out = dict(zip([f"model.{n}" for n, _ in net.named_parameters()],
                   grad([l0, r2, r1], trunk, grad_outputs=[torch.ones_like(l0), d2, d1], retain_graph=True)))
    for name, loss in (("aux1", l1), ("aux2", l2)):
        names, params = zip(*heads[name].named_parameters())
        out.update(zip([f"heads.{name}.{n}" for n in names], grad(LAMBDA[name] * loss, params, retain_graph=True)))
    return out, {"aux1": (u1, g1, m1), "aux2": (u2, g2, m2)}


def assert_grads(model, expected, atol=1e-12):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=atol, rtol=0, msg=n)


# -- the update ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gating", "gating_weighted", "projection", "olaux", "metabalance"])
@pytest.mark.parametrize("seed", SEEDS)
def test_the_update_is_the_rule_applied_tap_by_tap_from_the_top(kind, seed):
    weighting = make(kind)
    model, objective = build(weighting)
    b = batch(seed)
    rep_step(model, objective, b)
    expected, seen = hand_update(model, b, kind)
    assert_grads(model, expected)
    tele = weighting.telemetry()
    for name, (u, g, m) in seen.items():
        cos = float(u.flatten() @ g.flatten()) / float(u.norm() * g.norm())
        assert float(tele[f"cos/{name}"]) == pytest.approx(cos, abs=1e-12)
        assert float(tele[f"normratio/{name}"]) == pytest.approx(float(g.norm() / u.norm()), rel=1e-12)
        if kind == "olaux":  # the window's Σ α·g_0ᵀg_k, at the representation
            k = AUX.index(name)
            assert float(weighting.accumulated[k]) == pytest.approx(0.1 * float(u.flatten() @ g.flatten()), rel=1e-12)
        elif kind != "projection":
            assert float(tele[f"effw/{name}"]) == pytest.approx(m * LAMBDA[name], abs=1e-12)
    assert weighting.n_backward_calls == 1  # one backward: every head's gradient is read at its cut


def test_the_seeds_cover_both_decisions():
    decisions = set()
    for seed in SEEDS:
        model, _ = build(None)
        _, seen = hand_update(model, batch(seed), "gating")
        decisions |= {m for _, _, m in seen.values()}
    assert decisions == {0.0, 1.0}


def test_the_same_multipliers_give_exactly_the_parameter_level_update():
    # OL-AUX's weights stay at init within a horizon: both engines then write g_0 + w·λ_k·g_k on the shared trunk.
    b = batch(0)
    grads = []
    for mode in ("exact", REP):
        model, objective = build(OLAux(lr=0.1, init=0.4, mode=mode))
        rep_step(model, objective, b)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-12, rtol=0, msg=n)


# -- taps shared, several taps on a layer, tuple outputs, weight 0, detached -------------------------------------------
class Pair(nn.Module):
    """A layer with a tuple output; the rest of the net reads its first element."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return h, h.sum(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair, self.out = Pair(), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.pair(x)[0])


def test_tasks_sharing_a_tap_or_a_layer_are_each_compared_with_the_gradient_at_that_tensor():
    # a and c read tap A, b reads tap B on the same layer's tuple output (element 0, the tensor the net goes on
    # with); d reads tap A at weight 0: it is measured but adds nothing. One hook, four tasks.
    torch.manual_seed(1)
    net = Net()
    model = al.attach(net, {"A": al.Tap("pair", nn.Linear(6, 3), select=0),
                            "B": al.Tap("pair", nn.Linear(6, 3), select=0)}).double()
    lams = {"a": 0.3, "b": 0.5, "c": 0.8, "d": 0.0}
    tasks = [al.Task("a", source="A", target="t1", weight=0.3), al.Task("b", source="B", target="t2", weight=0.5),
             al.Task("c", source="A", target="t2", loss=lambda p, t: 2 * F.cross_entropy(p, t), weight=0.8),
             al.Task("d", source="A", target="t1", weight=0.0)]
    weighting = CosineGating(True, mode=REP)
    objective = al.Objective(aux=tasks, weighting=weighting)
    b = batch(4)
    rep_step(model, objective, b)

    h = net.pair(b["input"])[0]
    losses = al.Objective(aux=tasks)(al.Outputs(main=net.out(h), aux={n: model.heads[n](h) for n in "AB"}), b).losses
    u = torch.autograd.grad(losses["main"], h, retain_graph=True)[0]
    inject = torch.zeros_like(h)
    for n, lam in lams.items():
        g = torch.autograd.grad(losses[n], h, retain_graph=True)[0]
        cos = float(u.flatten() @ g.flatten()) / float(u.norm() * g.norm())
        assert float(weighting.telemetry()[f"cos/{n}"]) == pytest.approx(cos, abs=1e-12)
        inject = inject + max(0.0, cos) * lam * g
    trunk = list(net.pair.parameters())
    expected = torch.autograd.grad([losses["main"], h], trunk, grad_outputs=[torch.ones_like(losses["main"]), inject],
                                   retain_graph=True)
    for p, e in zip(trunk, expected):
        torch.testing.assert_close(p.grad, e, atol=1e-12, rtol=0)
    for tap, names in (("A", "acd"), ("B", "b")):  # the heads get their tasks' plain λ·g
        total = sum(lams[n] * losses[n] for n in names)
        for p, e in zip(model.heads[tap].parameters(), torch.autograd.grad(total, list(model.heads[tap].parameters()),
                                                                           retain_graph=True)):
            torch.testing.assert_close(p.grad, e, atol=1e-12, rtol=0)
    assert weighting.n_backward_calls == 1 + 3  # a, c and d share tap A: their gradients are taken first


def test_a_detached_tap_shares_nothing_and_its_head_gets_its_plain_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model = al.attach(net, {"aux1": al.Tap("1", nn.Linear(6, 3), detach=True)}).double()
    weighting = Projection(mode=REP)
    objective = al.Objective(aux=[al.Task("aux1", source="aux1", target="t1", weight=0.3)], weighting=weighting)
    b = batch(0)
    rep_step(model, objective, b)
    out = model(b["input"])
    losses = plain_objective([al.Task("aux1", source="aux1", target="t1", weight=0.3)])(out, b).losses
    for n, p in model.named_parameters():
        loss = losses["main"] if n.startswith("model.") else 0.3 * losses["aux1"]
        torch.testing.assert_close(p.grad, torch.autograd.grad(loss, p, retain_graph=True)[0], atol=1e-12, rtol=0)
    assert "cos/aux1" not in weighting.telemetry()


# -- scale, GradScaler, DDP, training, state ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["projection", "metabalance", "olaux"])
def test_accumulation_scale_and_gradscaler_scale_the_update_but_not_the_statistics(kind):
    runs = []
    for scale, init in ((1.0, None), (0.5, 1024.0)):
        weighting = make(kind)
        model, objective = build(weighting)
        scaler = None if init is None else torch.amp.GradScaler("cpu", init_scale=init)
        for s in (0, 2):
            model.zero_grad()
            rep_step(model, objective, batch(s), scale=scale, scaler=scaler)
        runs.append(({n: p.grad.clone() for n, p in model.named_parameters()}, weighting))
    (plain, w_plain), (scaled, w_scaled) = runs
    for n in plain:
        torch.testing.assert_close(scaled[n], 512.0 * plain[n], atol=1e-9, rtol=1e-12)
    for key, value in w_plain.telemetry().items():
        assert float(w_scaled.telemetry()[key]) == pytest.approx(float(value), rel=1e-12), key
    if kind == "olaux":  # each micro-batch adds scale·α·g_0ᵀg_k
        torch.testing.assert_close(w_scaled.accumulated, 0.5 * w_plain.accumulated, atol=1e-15, rtol=1e-12)


def test_a_non_finite_statistic_hands_on_the_plain_sum_and_leaves_the_state_alone():
    def spiky(pred, target):  # sqrt at 0 has an infinite derivative: a finite loss, an overflowing gradient
        return torch.sqrt((pred - pred.detach()).abs().sum())

    weighting = OLAux(lr=0.1, mode=REP)
    torch.manual_seed(0)
    model = al.attach(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),
                      {"aux": al.Tap("1", nn.Linear(6, 3))}).double()
    objective = al.Objective(aux=[al.Task("aux", source="aux", loss=spiky, metric=None, weight=0.5)],
                             weighting=weighting)
    rep_step(model, objective, batch(0))
    assert float(weighting.accumulated[0]) == 0.0 and set(weighting.telemetry()) == {"olaux_w/aux"}
    assert not all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def _ddp_worker(rank, world, init_file, out_dir, steps):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        weighting = MetaBalance(RELAX, BETA, mode=REP)
        model, objective = build(weighting)
        ddp = nn.parallel.DistributedDataParallel(model)
        grads = []
        for s in range(steps):
            half = {k: v[rank * 4:(rank + 1) * 4] for k, v in batch(s).items()}
            model.zero_grad()
            ctx = StepContext(model=model, distributed=True)
            assert objective.before_step(ctx).sync_gradients  # one ordinary backward: DDP reduces it
            objective.backward(objective(ddp(half["input"]), half), ctx)
            grads.append([p.grad.clone() for p in model.parameters()] + [weighting.m_main.clone()])
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.2 * p.grad
        torch.save(grads, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank leaves while the other still talks to it (gloo would abort it)
    finally:
        dist.destroy_process_group()


def test_under_ddp_the_statistics_and_the_update_are_those_of_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    steps = 3
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), steps), nprocs=2, join=True)
    weighting = MetaBalance(RELAX, BETA, mode=REP)
    model, objective = build(weighting)
    expected = []
    for s in range(steps):
        model.zero_grad()
        rep_step(model, objective, batch(s))
        expected.append([p.grad.clone() for p in model.parameters()] + [weighting.m_main.clone()])
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.2 * p.grad
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), expected):
            for g, e in zip(got, want):
                torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


def test_a_short_training_run_logs_the_telemetry_and_makes_one_backward_per_step():
    from torch.utils.data import DataLoader

    from auxloss.train import Trainer
    from auxloss.zoo.data import make_shapes_splits
    from auxloss.zoo.models import SmallCNN

    torch.manual_seed(0)
    splits = make_shapes_splits(64, 32, 32, seed=0, image_size=16)
    model = al.attach(SmallCNN(6, width=4), {"deep": al.Tap("block1", al.LinearHead(6)),
                                             "colour": al.Tap("block2", al.LinearHead(6))},
                      example_input=splits["train"].tensors["input"][:1])
    gate = CosineGating(mode=REP)
    objective = al.Objective(aux=[al.Task("deep", source="deep", weight=0.3),
                                  al.Task("colour", source="colour", target="colour", weight=0.3)], weighting=gate)
    result = Trainer(epochs=2, lr=3e-3, eval_train=False).fit(model, objective,
                                                             DataLoader(splits["train"], batch_size=16))
    last = result.history[-1]
    assert {"train/cos/deep", "train/cos/colour", "train/effw/deep", "train/normratio/colour"} <= set(last)
    assert all(abs(v) < 1e6 for v in last.values())
    assert gate.n_backward_calls == gate.backward_steps == 8


def test_metabalance_state_follows_the_taps_and_resume_is_exact():
    def run(weighting, model, objective, seeds):
        out = []
        for s in seeds:
            model.zero_grad()
            rep_step(model, objective, batch(s))
            out.append([p.grad.clone() for p in model.parameters()])
        return out

    model, objective = build(MetaBalance(mode=REP))
    run(objective.weighting, model, objective, [0, 1])
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(objective.state_dict())
    assert objective.weighting.m_aux.shape == (2, 2)  # one column per tapped tensor
    straight = run(objective.weighting, model, objective, [2, 3])
    model2, objective2 = build(MetaBalance(mode=REP), seed=5)
    model2.load_state_dict(saved_model)
    objective2.load_state_dict(saved)
    resumed = run(objective2.weighting, model2, objective2, [2, 3])
    for a, b in zip(straight, resumed):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=0, rtol=0)


# -- what the mode refuses ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ARML, BLOOP, AutoLambda, TorchJD])
def test_strategies_without_the_mode_say_which_modes_they_have_and_why(cls):
    assert cls.modes == ("exact", "amortized")
    if cls is not TorchJD:  # TorchJD needs its extra before it gets there
        with pytest.raises(al.AuxLossError, match=r"mode must be one of \['exact', 'amortized'\].*no representation"):
            cls(mode=REP)


def test_a_config_asking_a_loss_based_strategy_for_a_mode_is_told_which_strategies_have_it():
    with pytest.raises(al.AuxLossError, match="gradnorm.*no gradient mode.*representation.*gating.*projection"):
        build_weighting({"type": "gradnorm", "layer": "0", "mode": REP}, model=build(None)[0])
    assert isinstance(build_weighting({"type": "gating_weighted", "mode": REP}), CosineGating)


def test_misuses_are_reported_before_or_during_the_step():
    model, objective = build(CosineGating(mode=REP))
    b = batch(0)
    with pytest.raises(al.AuxLossError, match="stats_params.*representation"):
        CosineGating(mode=REP, stats_params=[model.model[0].weight])
    with pytest.raises(al.AuxLossError, match="needs the model"):
        objective.before_step(StepContext())
    with pytest.raises(al.AuxLossError, match="kept no representations"):  # no before_step: nothing was kept
        objective.backward(objective(model(b["input"]), b))
    tasks = [al.Task("aux1", source="main", target="t1", weight=0.3)]
    with pytest.raises(al.AuxLossError, match="'aux1' reads 'main', not a tap"):
        al.Objective(aux=tasks, weighting=Projection(mode=REP)).before_step(StepContext(model=model))
    both = al.Objective(main=al.Task("main", source="aux2", target="t2"),
                        aux=[al.Task("aux1", source="aux2", target="t1", weight=0.3)], weighting=Projection(mode=REP))
    with pytest.raises(al.AuxLossError, match="which the main task reads too"):
        both.before_step(StepContext(model=model))


def test_a_tap_the_main_gradient_never_reaches_is_an_error_not_a_silent_plain_sum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    for tap in (al.Tap("1", nn.Linear(3, 3), select=lambda out: out[:, :3]),  # a selector computing a new tensor
                al.Tap("1", nn.Linear(6, 3), call="all")):
        model = al.attach(copy.deepcopy(net), {"aux1": tap}).double()
        objective = al.Objective(aux=[al.Task("aux1", source="aux1", target="t1", weight=0.3)],
                                 weighting=CosineGating(mode=REP))
        with pytest.raises(al.AuxLossError, match="never reached|call='all'"):
            rep_step(model, objective, batch(0))


def test_the_model_keeps_representations_for_one_training_forward_only():
    model, _ = build(None)
    x = batch(0)["input"]
    model.keep_representations(["aux1"])
    with torch.no_grad():
        model(x)  # an evaluation forward leaves the request for the next training one
    assert model.take_representations() is None
    out = model(x)
    kept = model.take_representations()
    assert set(kept) == {"aux1"} and model.take_representations() is None
    assert kept["aux1"].head_input is not kept["aux1"].trunk and kept["aux1"].trunk.requires_grad
    out.aux["aux1"].sum().backward()  # behind the cut: the head learns, the trunk gets nothing from it
    assert model.heads["aux1"].weight.grad is not None and model.model[0].weight.grad is None
    model(x)
    assert model.take_representations() is None  # one-shot
    copy.deepcopy(model)  # EMA copies: the per-thread store is not copied
    with pytest.raises(al.AuxLossError, match="no tap named"):
        model.keep_representations(["nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine DataParallel wants the model on cuda:0; "
                    "this checks the unwrapping through the CPU fallback, which calls the module itself")
def test_a_model_wrapped_in_dataparallel_is_unwrapped():
    weighting = CosineGating(mode=REP)
    model, objective = build(weighting)
    wrapped = nn.DataParallel(model)  # on the CPU a plain call of the module: it stands for DDP's `.module`
    b = batch(0)
    ctx = StepContext(model=wrapped)
    objective.before_step(ctx)
    objective.backward(objective(wrapped(b["input"]), b), ctx)
    expected, _ = hand_update(model, b, "gating")
    assert_grads(model, expected)
