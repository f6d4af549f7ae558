"""The step protocol between the loop, the objective and the weighting (auxloss/step.py, weighting/base.py):
the obvious call never silently does the wrong thing, the main task's name is never assumed, the user's objects
are not changed, DDP state is declared once, and the step path never reads a device value."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss._distributed import SyncedState, sync_tensors
from auxloss.step import StepContext, StepPlan
from auxloss.train import Trainer
from auxloss.weighting import (
    DWA,
    CosineGating,
    GradNorm,
    MainProgress,
    MetaBalance,
    OLAux,
    Projection,
    Uncertainty,
)


def tiny(weighting=None, main=None, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    model = al.attach(net, {"deep": al.Tap("1", al.LinearHead(3))}, example_input=torch.zeros(1, 6)).double()
    objective = al.Objective(main=main, aux=[al.Task("deep", source="deep", weight=0.3)], weighting=weighting)
    return model, objective


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long())


def batch(seed=0):
    x, y = data(16, seed).tensors
    return {"input": x, "target": y}


# -- the obvious call ----------------------------------------------------------------------------------------------
def test_total_backward_with_a_gradient_aware_weighting_raises_naming_the_call_to_make():
    model, objective = tiny(CosineGating())
    b = batch()
    report = objective(model(b["input"]), b)
    out = model(b["input"])
    hand = F.cross_entropy(out.main, b["target"]) + 0.3 * F.cross_entropy(out.aux["deep"], b["target"])
    assert torch.equal(report.total.detach(), hand.detach())  # the guard leaves the value alone
    with pytest.raises(al.AuxLossError, match=r"CosineGating is gradient-aware.*objective\.backward\(report\)"):
        report.total.backward()
    assert all(p.grad is None for p in model.parameters())  # nothing was written before the error
    objective.backward(report)  # the configured method, on the same report
    assert objective.weighting.n_backward_calls == 2  # 1 + K per-task gradients, not one plain backward
    assert all(p.grad is not None for p in model.parameters())


def test_total_backward_with_a_loss_weighting_equals_objective_backward():
    grads = []
    for call in ("total", "objective"):
        model, objective = tiny(Uncertainty(init=0.5))
        b = batch()
        report = objective(model(b["input"]), b)
        report.total.backward() if call == "total" else objective.backward(report)
        grads.append([p.grad.clone() for p in [*model.parameters(), *objective.parameters()]])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_backward_takes_the_context_or_scale_and_scaler_not_both():
    model, objective = tiny()
    b = batch()
    report = objective(model(b["input"]), b)
    with pytest.raises(al.AuxLossError, match="not both"):
        objective.backward(report, StepContext(scale=0.5), scale=0.5)


def test_before_step_plans_ddp_sync_and_puts_the_amortized_multiplier_at_the_tap():
    gate = CosineGating(weighted=True, mode="amortized", every=2)
    model, objective = tiny(gate)
    ctx = StepContext(model=model, distributed=True)
    assert objective.before_step(ctx) == StepPlan(sync_gradients=False)  # a refresh: per-task gradients
    assert model._trunk_grad_scales == {}
    b = batch()
    objective.backward(objective(model(b["input"]), b), ctx)
    assert objective.before_step(ctx) == StepPlan(sync_gradients=True)  # amortized: a plain, DDP-reduced backward
    c = float(gate._cached[0])
    assert model._trunk_grad_scales == {"deep": c} and 0.0 <= c < 1.0
    assert al.Objective(aux=[al.Task("x", weight=0.1)]).before_step(ctx) == StepPlan()  # no weighting: nothing


def test_a_tap_read_by_two_tasks_carries_no_multiplier():
    gate = CosineGating(weighted=True, mode="amortized", every=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    model = al.attach(net, {"deep": al.Tap("1", al.LinearHead(3))}, example_input=torch.zeros(1, 6)).double()
    objective = al.Objective(aux=[al.Task("a", source="deep", weight=0.3), al.Task("b", source="deep", weight=0.2)],
                             weighting=gate)
    b = batch()
    ctx = StepContext(model=model)
    objective.before_step(ctx)
    objective.backward(objective(model(b["input"]), b), ctx)
    objective.before_step(ctx)
    assert model._trunk_grad_scales == {}


def test_olaux_takes_the_learning_rate_from_the_context():
    olaux = OLAux(beta=1.0, horizon=1)
    model, objective = tiny(olaux)
    b = batch()
    report = objective(model(b["input"]), b)
    objective.backward(report, StepContext(lr=0.05))
    assert olaux.lr == 0.05
    report = objective(model(b["input"]), b)
    with pytest.raises(al.AuxLossError, match="learning rate is -1.0"):
        objective.backward(report, StepContext(lr=-1.0))


# -- the main task's name --------------------------------------------------------------------------------------------
def fit_named(name):
    main = al.Task(name, target="target")
    model, objective = tiny(MainProgress(start=0.5, step=0.25), main=main)
    ds = data(96)
    loader = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(data(48, seed=1), batch_size=48)
    result = Trainer(epochs=8, lr=0.3, optimizer="sgd", patience=2, eval_train=True, device="cpu").fit(
        model, objective, loader, val)
    return result, objective


def test_the_loop_and_the_weightings_read_the_main_tasks_name():
    plain, _ = fit_named("main")
    named, objective = fit_named("digit")
    assert objective.weighting.validations == len(named.history)  # MainProgress found val/metric/digit
    rename = {k: k.replace("/main", "/digit") for k in plain.history[0]}
    assert [{rename[k]: v for k, v in r.items() if k != "time"} for r in plain.history] == \
        [{k: v for k, v in r.items() if k != "time"} for r in named.history]
    # the best epoch is the first with the highest validation metric, chosen on the main task's own key
    values = [r["val/metric/digit"] for r in named.history]
    assert named.best_epoch == 1 + values.index(max(values)) == plain.best_epoch
    assert named.best_epoch < len(values)  # so the choice above is not simply the last epoch
    assert named.stopped_early == plain.stopped_early
    assert named.main_metric("val") == named.best["val/metric/digit"] == plain.main_metric("val")
    assert "gap" in named.history[-1]


def test_objective_does_not_change_the_users_task():
    main = al.Task("digit")  # target None: the objective reads the batch key "target"
    objective = al.Objective(main=main, aux=[al.Task("deep", source="deep")])
    assert main.target is None
    assert objective.main.target == "target" and objective.main.name == "digit"


# -- DDP state declared once --------------------------------------------------------------------------------------------
def test_strategies_declare_their_synced_state():
    dwa = DWA()
    dwa.bind("main", ["a", "b"])
    assert dwa.synced_state == {"loss_sum": "sum", "loss_count": "sum"}
    gn = GradNorm(params=[nn.Parameter(torch.zeros(2))])
    gn.bind("main", ["a"])
    assert gn.synced_state == {"step_norms": "mean", "step_losses": "mean"}
    assert "step_norms" not in gn.state_dict()  # rewritten every step: not checkpointed
    assert isinstance(dwa, SyncedState)
    one = [torch.tensor([1.5]), None]
    assert sync_tensors(one, "sum") == one  # no process group: unchanged
    with pytest.raises(al.AuxLossError, match="reduce"):
        sync_tensors(one, "median")


def _sync_worker(rank, world, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        class State(SyncedState, nn.Module):
            def __init__(self):
                super().__init__()
                self.add_state("total", torch.tensor([1.0, 2.0]) * (rank + 1), reduce="sum")
                self.add_state("count", torch.tensor([3 + rank]), reduce="sum")
                self.add_state("avg", torch.tensor([float(rank)], dtype=torch.float64), reduce="mean")
                self.add_state("top", torch.tensor([float(10 * rank)]), reduce="max")
                self.add_state("low", torch.tensor([float(10 * rank)]), reduce="min")

        state = State()
        state.sync_state()
        torch.save({k: v.clone() for k, v in state.state_dict().items()}, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sync_state_reduces_each_declared_buffer_with_its_reduction(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["total"], torch.tensor([3.0, 6.0]))  # (1 + 2)·[1, 2]
        assert torch.equal(got["count"], torch.tensor([7])) and got["count"].dtype == torch.long
        assert torch.equal(got["avg"], torch.tensor([0.5], dtype=torch.float64))
        assert torch.equal(got["top"], torch.tensor([10.0])) and torch.equal(got["low"], torch.tensor([0.0]))


# -- no device reads in the step path ------------------------------------------------------------------------------
STRATEGIES = {
    "fixed": lambda m: None, "main_progress": lambda m: MainProgress(), "uncertainty": lambda m: Uncertainty(),
    "dwa": lambda m: DWA(), "gradnorm": lambda m: GradNorm(params=m.model[0].parameters()),
    "gating": lambda m: CosineGating(weighted=True), "projection": lambda m: Projection(),
    "olaux": lambda m: OLAux(), "metabalance": lambda m: MetaBalance(),
}


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_the_step_path_reads_no_device_value_per_step(monkeypatch, kind):
    """``item``, ``tolist`` and ``float(tensor)`` are counted over whole fits: a fit of 8 steps makes exactly as
    many as a fit of 2 (the per-epoch conversions), so no step makes any."""
    counts = []
    for n in (32, 128):
        model, _ = tiny()
        objective = al.Objective(aux=[al.Task("deep", source="deep", weight=0.3)], weighting=STRATEGIES[kind](model))
        calls = {"n": 0}
        for name in ("item", "tolist", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _calls=calls, **kwargs):
                _calls["n"] += 1
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        loader = DataLoader(data(n), batch_size=16)
        Trainer(epochs=1, lr=0.01, optimizer="sgd", eval_train=False, log_every=1000, device="cpu").fit(
            model, objective, loader, DataLoader(data(16), batch_size=16))
        monkeypatch.undo()
        counts.append(calls["n"])
    assert counts[0] == counts[1], counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["fixed", "uncertainty", "dwa", "gradnorm"])
def test_a_step_after_the_forward_never_synchronises_on_cuda(kind):
    """Telemetry, the running sums, the backward and the optimizer step under ``set_sync_debug_mode("error")``
    (the forward holds the one documented read: the non-finite check of the loss)."""
    model, _ = tiny()
    model = model.float().cuda()
    objective = al.Objective(aux=[al.Task("deep", source="deep", weight=0.3)],
                             weighting=STRATEGIES[kind](model)).cuda()
    optimizer = torch.optim.SGD([*model.parameters(), *objective.parameters()], lr=0.01)
    x, y = data(16).tensors
    b = {"input": x.float().cuda(), "target": y.cuda()}
    sums: dict = {}
    for _ in range(3):
        ctx = StepContext(model=model, lr=0.01)
        objective.before_step(ctx)
        report = objective(model(b["input"]), b)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tele = objective.weighting.telemetry() if objective.weighting is not None else {}
            assert all(isinstance(v, torch.Tensor) for v in tele.values())
            for key, value in report.detached().items():
                v = value.to(torch.float64) if isinstance(value, torch.Tensor) else value
                sums[key] = sums.get(key, 0.0) + v * report.batch_size
            objective.backward(report, ctx)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            objective.advance()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(float(v)) for v in sums.values())
