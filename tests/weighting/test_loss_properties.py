"""Property checks of the loss-based weightings over many random losses: multipliers finite and non-negative,
listing the auxiliary tasks in another order permutes their multipliers, DWA's weights sum to K."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from auxloss.weighting.dwa import DWA
from auxloss.weighting.gradnorm import GradNorm
from auxloss.weighting.progress import MainProgress
from auxloss.weighting.uncertainty import Uncertainty

FAST = settings(max_examples=40, deadline=None)

loss_value = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_subnormal=False)
small = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False, allow_subnormal=False)


def names(k):
    return [f"aux{i}" for i in range(k)]


def as_float(v):
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def check_multipliers(m, names_):
    assert list(m) == names_
    for v in m.values():
        v = as_float(v)
        assert math.isfinite(v) and v >= 0


@st.composite
def dwa_case(draw):
    k = draw(st.integers(1, 4))
    epochs = draw(st.lists(st.lists(st.lists(loss_value, min_size=k, max_size=k), min_size=1, max_size=3),
                           min_size=2, max_size=4))
    tau = draw(st.floats(min_value=0.05, max_value=10.0))
    perm = draw(st.permutations(range(k)))
    return k, epochs, tau, perm


@FAST
@given(dwa_case())
def test_dwa_weights_are_finite_sum_to_k_and_permute_with_the_tasks(case):
    k, epochs, tau, perm = case
    aux = names(k)
    shuffled = [aux[i] for i in perm]
    a, b = DWA(tau), DWA(tau)
    a.bind("main", aux)
    b.bind("main", shuffled)
    for epoch, steps in enumerate(epochs, start=1):
        for values in steps:
            losses = {"main": torch.tensor(1.0), **{n: torch.tensor(v, dtype=torch.float64) for n, v in zip(aux, values)}}
            ma = a.multipliers(losses, step=0, epoch=epoch)
            mb = b.multipliers(losses, step=0, epoch=epoch)
            check_multipliers(ma, aux)
            check_multipliers(mb, shuffled)
            assert sum(float(v) for v in ma.values()) == pytest.approx(k, rel=1e-9)
            for n in aux:
                assert float(mb[n]) == pytest.approx(float(ma[n]), rel=1e-9, abs=1e-300)
        a.on_epoch_end(epoch)
        b.on_epoch_end(epoch)


@FAST
@given(st.lists(st.floats(min_value=-20.0, max_value=20.0), min_size=1, max_size=4), st.data())
def test_uncertainty_multipliers_are_positive_and_permute_with_the_tasks(init, data):
    k = len(init)
    aux = names(k)
    perm = data.draw(st.permutations(range(k)))
    losses_ = data.draw(st.lists(loss_value, min_size=k, max_size=k))
    shuffled = [aux[i] for i in perm]
    start = dict(zip(aux, init))
    runs = []
    for order in (aux, shuffled):
        w = Uncertainty(init=start)
        w.bind("main", order)
        w.double()
        with torch.no_grad():
            w.log_var.copy_(torch.tensor([start[n] for n in order], dtype=torch.float64))
        losses = {n: torch.tensor(v, dtype=torch.float64) for n, v in zip(aux, losses_)}
        m = w.multipliers(losses, step=0, epoch=0)
        check_multipliers(m, order)
        total = sum(m[n] * losses[n] for n in order) + w.extra_loss(losses)
        total.backward()
        grads = dict(zip(order, w.log_var.grad.tolist()))
        runs.append(({n: as_float(m[n]) for n in order}, grads))
    (ma, ga), (mb, gb) = runs
    for n in aux:
        assert mb[n] == ma[n]
        assert gb[n] == pytest.approx(ga[n], rel=1e-12, abs=1e-300)
        # d/ds (exp(−s)·L + s/2) = −exp(−s)·L + 1/2
        assert ga[n] == pytest.approx(-math.exp(-start[n]) * losses_[aux.index(n)] + 0.5, rel=1e-9, abs=1e-9)


@FAST
@given(st.lists(st.one_of(st.floats(allow_nan=True), small), min_size=1, max_size=12),
       st.floats(0.0, 1.0), st.floats(0.01, 2.0), st.integers(1, 3), st.sampled_from(["additive", "multiplicative"]),
       st.booleans())
def test_main_progress_stays_within_its_bounds(values, start, step, patience, mode, higher):
    lo, hi = 0.05, 0.8
    start = min(max(start, lo), hi)
    w = MainProgress(start=start, step=step, min=lo, max=hi, patience=patience, mode=mode)
    w.bind("main", names(3))
    for v in values:
        w.on_validation_end({"val/metric/main": v}, higher_is_better=higher)
        m = w.multipliers({}, step=0, epoch=0)
        check_multipliers(m, names(3))
        assert lo <= w.mult <= hi and len(set(m.values())) == 1


@st.composite
def gradnorm_case(draw):
    k = draw(st.integers(1, 3))
    t = k + 1
    u = draw(st.lists(st.lists(small, min_size=3, max_size=3), min_size=t, max_size=t))
    y = draw(st.lists(small, min_size=t, max_size=t))
    points = draw(st.lists(st.lists(small, min_size=3, max_size=3), min_size=1, max_size=3))
    alpha = draw(st.floats(0.0, 3.0))
    perm = draw(st.permutations(range(k)))
    return k, u, y, points, alpha, perm


@FAST
@given(gradnorm_case())
def test_gradnorm_weights_stay_positive_sum_to_t_and_permute_with_the_tasks(case):
    k, u, y, points, alpha, perm = case
    aux = names(k)
    shuffled = [aux[i] for i in perm]
    W = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    a, b = GradNorm(alpha=alpha, lr=0.1, params=[W]), GradNorm(alpha=alpha, lr=0.1, params=[W])
    a.bind("main", aux)
    b.bind("main", shuffled)
    rows = dict(zip(["main", *aux], zip(u, y)))
    for point in points:
        with torch.no_grad():
            W.copy_(torch.tensor(point, dtype=torch.float64))
        losses = {n: (torch.tensor(ui, dtype=torch.float64) @ W - yi) ** 2 + 0.01 for n, (ui, yi) in rows.items()}
        ma = a.multipliers(losses, step=0, epoch=0)
        mb = b.multipliers(losses, step=0, epoch=0)
        check_multipliers(ma, aux)
        check_multipliers(mb, shuffled)
        for n in aux:
            assert float(mb[n]) == pytest.approx(float(ma[n]), rel=1e-9)
        for g in (a, b):
            assert float(g.task_weights.sum()) == pytest.approx(k + 1, rel=1e-12)
            assert bool((g.task_weights > 0).all())
