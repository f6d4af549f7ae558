import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import auxloss as al
from auxloss import schedules


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.b(self.a(x)))


def make(**task_kw):
    torch.manual_seed(0)
    model = al.attach(
        Net(), {"aux1": al.Tap("a", al.LinearHead(4)), "aux2": al.Tap("b", al.LinearHead(4))},
        example_input=torch.randn(1, 6),
    )
    objective = al.Objective(
        aux=[al.Task("aux1", source="aux1", weight=0.3, **task_kw), al.Task("aux2", source="aux2", weight=0.3)]
    )
    return model, objective


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(n, 6, generator=g), "target": torch.randint(0, 4, (n,), generator=g),
            "colour": torch.randint(0, 3, (n,), generator=g)}


def test_fixed_weights_equal_googlenets_hand_written_formula_exactly():
    model, objective = make()
    b = batch()
    out = model(b["input"])
    report = objective(out, b)
    # Szegedy et al. 2015 §5: the total is L + 0.3·L_aux1 + 0.3·L_aux2.
    by_hand = (F.cross_entropy(out.main, b["target"]) + 0.3 * F.cross_entropy(out.aux["aux1"], b["target"])
               + 0.3 * F.cross_entropy(out.aux["aux2"], b["target"]))
    assert torch.equal(report.total, by_hand)
    assert report.weights == {"main": 1.0, "aux1": 0.3, "aux2": 0.3}
    assert set(report.losses) == {"main", "aux1", "aux2"}
    acc = (out.main.argmax(1) == b["target"]).float().mean()
    assert report.metrics["main"] == acc
    flat = report.as_dict()
    assert flat["loss"] == pytest.approx(float(by_hand.detach()))
    assert flat["weight/aux2"] == 0.3 and "metric/aux1" in flat and "loss/aux2" in flat


def test_gradient_of_the_total_matches_float64_reference():
    model, objective = make()
    model = model.double()
    b = batch()
    b["input"] = b["input"].double()
    out = model(b["input"])
    objective(out, b).total.backward()
    got = model.model.a[0].weight.grad.clone()
    model.zero_grad()
    out = model(b["input"])
    ref = (F.cross_entropy(out.main, b["target"]) + 0.3 * F.cross_entropy(out.aux["aux1"], b["target"])
           + 0.3 * F.cross_entropy(out.aux["aux2"], b["target"]))
    ref.backward()
    assert torch.allclose(got, model.model.a[0].weight.grad, atol=1e-12)


def test_targets_from_a_key_a_function_and_tuple_batches():
    torch.manual_seed(0)
    model = al.attach(Net(), {"t": al.Tap("b", al.LinearHead(3))}, example_input=torch.randn(1, 6))
    b = batch()
    # The target is computed from the batch: here "is the first feature positive" as a 0/1 class, plus 1 more.
    by_fn = al.Objective(aux=[al.Task("sign", source="t", target=lambda bt: (bt["input"][:, 0] > 0).long())])
    by_key = al.Objective(aux=[al.Task("colour", source="t", target="colour")])
    out = model(b["input"])
    r1, r2 = by_fn(out, b), by_key(out, b)
    assert torch.equal(r1.losses["sign"], F.cross_entropy(out.aux["t"], (b["input"][:, 0] > 0).long()))
    assert torch.equal(r2.losses["colour"], F.cross_entropy(out.aux["t"], b["colour"]))
    # A tuple batch with named positions works the same way.
    tup = al.Objective(aux=[al.Task("colour", source="t", target="colour")], batch_keys=("input", "target", "colour"))
    r3 = tup(out, (b["input"], b["target"], b["colour"]))
    assert torch.equal(r3.total, r2.total)
    assert torch.equal(tup.inputs((b["input"], b["target"], b["colour"])), b["input"])


def test_several_tasks_share_one_tap_and_regression_losses():
    torch.manual_seed(0)
    model = al.attach(Net(), {"t": al.Tap("b", al.LinearHead(1))}, example_input=torch.randn(1, 6))
    b = batch()
    b["y"] = torch.randn(8)
    objective = al.Objective(aux=[al.Task("mse", source="t", target="y", loss="mse", weight=0.5),
                                  al.Task("l1", source="t", target="y", loss="l1", weight=0.25)])
    out = model(b["input"])
    report = objective(out, b)
    p = out.aux["t"].squeeze(-1)
    by_hand = (F.cross_entropy(out.main, b["target"]) + 0.5 * ((p - b["y"]) ** 2).mean()
               + 0.25 * (p - b["y"]).abs().mean())
    assert torch.allclose(report.total, by_hand)
    assert report.metrics["mse"] == pytest.approx(float(((p - b["y"]) ** 2).mean().detach()))
    assert report.metrics["l1"] == pytest.approx(float((p - b["y"]).abs().mean().detach()))


def test_scheduled_weights_follow_the_step_counter():
    model, _ = make()
    ramp = schedules.Curriculum(0.3, start=10, ramp=10)
    objective = al.Objective(aux=[al.Task("aux1", source="aux1", weight=ramp), al.Task("aux2", source="aux2")])
    b = batch()
    out = model(b["input"])
    assert objective(out, b).weights["aux1"] == 0.0
    objective.advance(15)
    assert objective(out, b).weights["aux1"] == pytest.approx(0.15)
    assert objective(out, b, step=100).weights["aux1"] == pytest.approx(0.3)


def test_task_at_weight_zero_stays_in_the_graph_with_zero_gradient():
    # DDP must not see an unused parameter while a curriculum has switched a task off.
    model, _ = make()
    objective = al.Objective(aux=[al.Task("aux1", source="aux1", weight=0.0), al.Task("aux2", source="aux2")])
    b = batch()
    objective(model(b["input"]), b).total.backward()
    g = model.heads["aux1"].fc.weight.grad
    assert g is not None and torch.count_nonzero(g) == 0


def test_state_dict_round_trip_restores_step_and_schedules():
    make()  # building the model registers nothing the objective needs; it only must not fail
    objective = al.Objective(aux=[al.Task("aux1", source="aux1", weight=schedules.Linear(0.0, 1.0, 0, 100))])
    objective.advance(42)
    objective.set_epoch(3)
    state = objective.state_dict()
    fresh = al.Objective(aux=[al.Task("aux1", source="aux1", weight=schedules.Linear(0.0, 1.0, 0, 100))])
    fresh.load_state_dict(state)
    assert fresh.step == 42 and fresh.epoch == 3
    assert fresh.weights() == objective.weights() == {"aux1": pytest.approx(0.42)}


# -- bad input --------------------------------------------------------------------------------------------------
def test_missing_target_key_lists_the_keys_present():
    model, _ = make()
    objective = al.Objective(aux=[al.Task("c", source="aux1", target="color")])
    b = batch()
    with pytest.raises(al.AuxLossError) as err:
        objective(model(b["input"]), b)
    assert "'color'" in str(err.value) and "['colour', 'input', 'target']" in str(err.value)


def test_head_output_shape_that_does_not_fit_the_target():
    model, _ = make()
    b = batch()
    b["y"] = torch.randn(8, 2)
    with pytest.raises(al.AuxLossError, match=r"head output shape \(8, 4\) does not fit target shape \(8, 2\)"):
        al.Objective(aux=[al.Task("r", source="aux1", target="y", loss="mse")])(model(b["input"]), b)
    b["big"] = torch.full((8,), 7)
    with pytest.raises(al.AuxLossError, match=r"labels out of range.*4 classes"):
        al.Objective(aux=[al.Task("c", source="aux1", target="big")])(model(b["input"]), b)
    b["float"] = torch.rand(8)
    with pytest.raises(al.AuxLossError, match="integer class labels"):
        al.Objective(aux=[al.Task("c", source="aux1", target="float")])(model(b["input"]), b)


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf")])
def test_negative_or_non_finite_weight_is_refused(weight):
    with pytest.raises(al.AuxLossError, match="aux1"):
        al.Task("aux1", source="aux1", weight=weight)


def test_duplicate_task_name_is_refused():
    with pytest.raises(al.AuxLossError, match="duplicate task name 'x'"):
        al.Objective(aux=[al.Task("x", source="a"), al.Task("x", source="b")])
    with pytest.raises(al.AuxLossError, match="duplicate task name 'main'"):
        al.Objective(aux=[al.Task("main", source="a")])


def test_unknown_source_loss_and_metric():
    model, _ = make()
    b = batch()
    with pytest.raises(al.AuxLossError, match=r"source 'aux9'.*\['aux1', 'aux2'\]"):
        al.Objective(aux=[al.Task("x", source="aux9")])(model(b["input"]), b)
    with pytest.raises(al.AuxLossError, match="unknown loss 'hinge'"):
        al.Task("x", loss="hinge")
    with pytest.raises(al.AuxLossError, match="unknown metric 'f1'"):
        al.Task("x", metric="f1")


def test_nan_loss_names_the_task_and_the_step():
    model, _ = make()
    b = batch()
    b["y"] = torch.randn(8, 4)
    b["y"][0, 0] = math.nan
    objective = al.Objective(aux=[al.Task("reg", source="aux1", target="y", loss="mse")])
    objective.advance(7)
    with pytest.raises(al.AuxLossError, match=r"step 7 in task\(s\) \['reg'\]"):
        objective(model(b["input"]), b)
    skipping = al.Objective(aux=[al.Task("reg", source="aux1", target="y", loss="mse")], nonfinite="skip")
    report = skipping(model(b["input"]), b)
    assert not report.finite and skipping.skipped_steps == 1


def test_model_emitted_losses_are_weighted_like_any_task():
    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            logits = self.fc(x)
            al.emit("z_loss", torch.logsumexp(logits, dim=-1).pow(2).mean())
            return logits

    torch.manual_seed(0)
    model = al.attach(Router(), {})
    objective = al.Objective(aux=[al.Task.emitted("z_loss", weight=1e-3)])
    b = batch()
    out = model(b["input"])
    z = torch.logsumexp(model.model.fc(b["input"]), dim=-1).pow(2).mean()
    assert torch.allclose(out.losses["z_loss"], z)
    report = objective(out, b)
    assert torch.allclose(report.total, F.cross_entropy(out.main, b["target"]) + 1e-3 * z)
    assert report.weights["z_loss"] == 1e-3 and "z_loss" not in report.metrics
    # outside an AuxModel (deployment), emit is a no-op
    model.strip()(b["input"])
    with pytest.raises(al.AuxLossError, match="emitted no loss named 'balance'"):
        al.Objective(aux=[al.Task.emitted("balance")])(out, b)
