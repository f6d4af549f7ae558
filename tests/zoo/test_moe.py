"""The mixture-of-experts layer and its emitted losses (Switch load balancing, ST-MoE router z-loss)."""

import math

import pytest
import torch
from torch import nn

import auxloss as al
from auxloss import schedules as S
from auxloss.zoo.moe import MoE, expert_fractions, load_balancing_loss, router_z_loss


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _hand_losses(tokens, weight, top_k):
    """N·Σ f_i·P_i and mean(logsumexp²), by hand with Python floats from float64 tensors."""
    n_experts = weight.shape[0]
    rows = (tokens @ weight.T).tolist()
    counts = [0] * n_experts
    prob_sums = [0.0] * n_experts
    z = 0.0
    for logits in rows:
        m = max(logits)
        exps = [math.exp(v - m) for v in logits]
        total = sum(exps)
        probs = [e / total for e in exps]
        for i, p in enumerate(probs):
            prob_sums[i] += p
        for i in sorted(range(n_experts), key=lambda i: -probs[i])[:top_k]:
            counts[i] += 1
        z += (m + math.log(total)) ** 2
    s = len(rows)
    f = [c / (s * top_k) for c in counts]
    p = [v / s for v in prob_sums]
    return n_experts * sum(fi * pi for fi, pi in zip(f, p)), z / s, f


@pytest.mark.parametrize("top_k", [1, 2])
def test_emitted_values_equal_a_hand_computation_in_float64(top_k):
    moe = MoE(3, n_experts=4, top_k=top_k).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -1.0], [-1.0, 0.5, 0.0], [0.2, -0.3, 1.0]]))
    x = torch.tensor([[[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], [[-0.2, 0.8, 0.1], [0.0, -1.2, 0.9]]],
                     dtype=torch.float64)
    model = al.attach(moe, {})
    out = model(x)
    balance, z, f = _hand_losses(x.reshape(-1, 3), moe.router.weight.detach(), top_k)
    assert set(out.losses) == {"load_balance", "router_z"}
    assert out.losses["load_balance"].dtype == torch.float64
    assert out.losses["load_balance"].item() == pytest.approx(balance, rel=1e-12, abs=1e-12)
    assert out.losses["router_z"].item() == pytest.approx(z, rel=1e-12)
    assert moe.last_usage.tolist() == pytest.approx(f)
    assert out.main.shape == x.shape


def test_pure_functions_limits():
    # Uniform routing gives exactly 1; everything on one expert gives N.
    n = 4
    uniform_logits = torch.zeros(8, n, dtype=torch.float64)
    spread = torch.arange(8).remainder(n).unsqueeze(1)
    assert float(load_balancing_loss(uniform_logits, spread)) == pytest.approx(1.0)
    collapsed = torch.zeros(8, n, dtype=torch.float64)
    collapsed[:, 0] = 1e4
    assert float(load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long))) == pytest.approx(n)
    assert expert_fractions(torch.tensor([[0], [0], [2], [3]]), 4).tolist() == [0.5, 0.0, 0.25, 0.25]
    # logsumexp of n equal zeros is log n.
    assert float(router_z_loss(uniform_logits)) == pytest.approx(math.log(n) ** 2)


def test_gradient_flows_through_the_router_probabilities():
    moe = MoE(4, n_experts=3)
    model = al.attach(moe, {})
    out = model(torch.randn(5, 4))
    out.losses["load_balance"].backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in moe.experts.parameters())  # the balance loss does not touch the experts


def test_outside_an_aux_model_nothing_is_emitted_and_the_layer_works():
    moe = MoE(4, n_experts=3, top_k=2)
    y = moe(torch.randn(2, 5, 4))
    assert y.shape == (2, 5, 4)
    assert moe.last_usage.sum().item() == pytest.approx(1.0)


def test_capacity_drops_overflowing_assignments_in_token_order():
    moe = MoE(2, n_experts=2, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.0]]))  # positive first coordinate -> expert 0
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # three tokens want expert 0, capacity 2
    y = moe(x)
    assert moe.last_usage.tolist() == [0.75, 0.25]  # f counts where the router sent them
    assert moe.last_dropped == pytest.approx(0.25)
    assert torch.equal(y[2], torch.zeros(2)) and y[0].abs().sum() > 0 and y[3].abs().sum() > 0


def test_bad_arguments_are_named():
    with pytest.raises(al.AuxLossError, match="top_k"):
        MoE(4, n_experts=2, top_k=3)
    with pytest.raises(al.AuxLossError, match="capacity_factor"):
        MoE(4, n_experts=2, capacity_factor=0)
    with pytest.raises(al.AuxLossError, match="tokens"):
        MoE(4, n_experts=2)(torch.randn(3, 5))


class _Classifier(nn.Module):
    """Tokens -> linear -> residual MoE -> mean over tokens -> classes."""

    def __init__(self, dim=16, n_experts=4):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.moe = MoE(dim, n_experts)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.moe(h)
        return self.fc(h.mean(dim=1))


def _clusters(n, seed):
    centers = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)) * 2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    x = centers[y][:, None, :] + torch.randn(n, 6, 8, generator=g) + 1.0
    return x, y


def test_emitted_loss_is_weighted_scheduled_and_reported_like_any_task():
    net = _Classifier()
    model = al.attach(net, {})
    weight = S.Curriculum(0.01, start=2)
    objective = al.Objective(aux=[al.Task.emitted("load_balance", weight=weight),
                                  al.Task.emitted("router_z", weight=1e-3)])
    x, y = _clusters(16, 1)
    batch = {"input": x, "target": y}
    for step in range(3):
        out = model(x)
        report = objective(out, batch)
        lb, rz = out.losses["load_balance"], out.losses["router_z"]
        expected = report.losses["main"] + weight(step) * lb + 1e-3 * rz
        assert torch.equal(report.total, expected)
        assert torch.equal(report.losses["load_balance"], lb)
        flat = report.as_dict()
        assert flat["weight/load_balance"] == weight(step)
        assert flat["loss/router_z"] == pytest.approx(rz.item())
        assert "metric/load_balance" not in flat
        objective.advance()
    assert report.weights["load_balance"] == 0.01


def _train(alpha, seed, steps=200):
    torch.manual_seed(seed)
    net = _Classifier()
    model = al.attach(net, {})
    aux = [al.Task.emitted("load_balance", weight=alpha)] if alpha else []
    objective = al.Objective(aux=aux)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = _clusters(512, 1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=g)
        report = objective(model(x[idx]), {"input": x[idx], "target": y[idx]})
        optimizer.zero_grad()
        report.total.backward()
        optimizer.step()
    xt, yt = _clusters(256, 2)
    with torch.no_grad():
        accuracy = (model(xt).main.argmax(dim=1) == yt).float().mean().item()
    usage = net.moe.last_usage
    return float(usage.std() / usage.mean()), accuracy


def test_balancing_loss_makes_expert_usage_more_uniform():
    # A real effect at a fixed seed: without the loss the router concentrates tokens on a few experts (measured
    # coefficient of variation of f across experts 0.75 at seed 0); with α = 0.1 it stays near uniform.
    cv_without, acc_without = _train(0.0, seed=0)
    cv_with, acc_with = _train(0.1, seed=0)
    assert cv_without > 0.5
    assert cv_with < 0.5 * cv_without
    assert acc_with > 0.9 and acc_without > 0.9  # balancing costs this task nothing


def test_hugging_face_style_aux_loss_is_collected():
    class Output(dict):
        """Like transformers' ModelOutput: a dict whose keys are also attributes."""

        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    class AttrOutput:
        def __init__(self, logits, aux_loss):
            self.logits, self.aux_loss = logits, aux_loss

    class FakeMoEModel(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            logits = self.fc(x)
            aux = logits.square().mean()
            return Output(logits=logits, aux_loss=aux) if self.kind == "dict" else AttrOutput(logits, aux)

    x = torch.randn(5, 4)
    for kind in ("dict", "attr"):
        model = al.attach(FakeMoEModel(kind), {})
        out = model(x)
        assert set(out.losses) == {"aux_loss"}
        assert torch.equal(out.losses["aux_loss"], model.model.fc(x).square().mean())
        objective = al.Objective(
            main=al.Task("main", target="target", select=lambda o: o.logits),  # the logits out of the output
            aux=[al.Task.emitted("router", loss_name="aux_loss", weight=0.02)],
        )
        report = objective(out, {"input": x, "target": torch.tensor([0, 1, 2, 0, 1])})
        assert report.losses["router"] is out.losses["aux_loss"]
        assert torch.allclose(report.total, report.losses["main"] + 0.02 * out.losses["aux_loss"])
