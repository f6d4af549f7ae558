"""Property checks of the gradient-aware combination rules, on many random gradient vectors (Hypothesis).

The maths lives in pure functions on flat tensors (``combine_gating``, ``combine_projection``, ``olaux_update``,
``metabalance_factor``...), tested here directly; the last tests tie them to what the strategies write into
``.grad`` on a real model.
"""

import pytest
import torch
from _combine import combine_gating, combine_metabalance, combine_projection, combine_weighted
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import auxloss as al
from auxloss.weighting.gating import CosineGating, gating_coefficients
from auxloss.weighting.grads import cosine
from auxloss.weighting.metabalance import metabalance_factor, moving_average
from auxloss.weighting.olaux import olaux_update
from auxloss.weighting.projection import Projection, projection_coefficients

FAST = settings(max_examples=150, deadline=None)
ATOL = 1e-9

# Values on a grid of 0.01 in [-10, 10]: no subnormals, so squares never underflow and signs are exact.
value = st.integers(-1000, 1000).map(lambda i: i / 100.0)


@st.composite
def problems(draw, agree=False):
    d = draw(st.integers(1, 6))
    k = draw(st.integers(1, 4))
    g0 = torch.tensor(draw(st.lists(value, min_size=d, max_size=d)), dtype=torch.float64)
    gks = torch.tensor(draw(st.lists(st.lists(value, min_size=d, max_size=d), min_size=k, max_size=k)),
                       dtype=torch.float64)
    lambdas = torch.tensor(draw(st.lists(st.integers(0, 200).map(lambda i: i / 100.0), min_size=k, max_size=k)),
                           dtype=torch.float64)
    if agree:
        dots = gks @ g0
        gks = torch.where(dots[:, None] < 0, -gks, gks)  # flip every conflicting g_k
        assume(bool(((gks @ g0) > 0).all()))
    return g0, gks, lambdas


def permutations(k):
    return st.permutations(list(range(k)))


# -- cosine ----------------------------------------------------------------------------------------------------------
@FAST
@given(problems())
def test_cosine_is_finite_bounded_and_zero_for_a_zero_vector(problem):
    g0, gks, _ = problem
    cos = cosine(gks @ g0, g0 @ g0, (gks * gks).sum(1))
    assert bool(torch.isfinite(cos).all()) and bool((cos.abs() <= 1).all())
    zero = torch.zeros_like(g0)
    assert bool((cosine(gks @ zero, zero @ zero, (gks * gks).sum(1)) == 0).all())


# -- gating -----------------------------------------------------------------------------------------------------------
@FAST
@given(problems(), st.booleans())
def test_gating_coefficients_lie_in_0_1_and_g0_keeps_coefficient_1(problem, weighted):
    g0, gks, lambdas = problem
    update, c = combine_gating(g0, gks, lambdas, weighted)
    assert bool(torch.isfinite(c).all()) and bool(((c >= 0) & (c <= 1)).all())
    # the update is g_0 plus a non-negative combination of the agreeing g_k: g_0's own coefficient is exactly 1
    torch.testing.assert_close(update - ((c * lambdas)[:, None] * gks).sum(0), g0, atol=ATOL, rtol=0)
    # only agreeing tasks enter, so the update never has less progress along g_0 than g_0 itself
    assert float(update @ g0) >= float(g0 @ g0) - ATOL


@FAST
@given(problems(agree=True))
def test_gating_is_the_plain_weighted_sum_when_every_task_agrees(problem):
    g0, gks, lambdas = problem
    update, c = combine_gating(g0, gks, lambdas, weighted=False)
    assert c.tolist() == [1.0] * len(c)
    torch.testing.assert_close(update, g0 + (lambdas[:, None] * gks).sum(0), atol=ATOL, rtol=0)


@FAST
@given(st.data())
def test_gating_is_equivariant_under_permuting_the_aux_tasks(data):
    g0, gks, lambdas = data.draw(problems())
    perm = torch.tensor(data.draw(permutations(len(gks))))
    weighted = data.draw(st.booleans())
    update, c = combine_gating(g0, gks, lambdas, weighted)
    update_p, c_p = combine_gating(g0, gks[perm], lambdas[perm], weighted)
    torch.testing.assert_close(c_p, c[perm], atol=0, rtol=0)
    torch.testing.assert_close(update_p, update, atol=ATOL, rtol=0)


def test_gating_coefficients_by_hand():
    cos = torch.tensor([-0.5, 0.0, 0.25, 1.0], dtype=torch.float64)
    assert gating_coefficients(cos).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert gating_coefficients(cos, weighted=True).tolist() == [0.0, 0.0, 0.25, 1.0]


# -- projection ----------------------------------------------------------------------------------------------------------
@FAST
@given(problems())
def test_projection_removes_only_conflict_and_protects_the_main_task(problem):
    g0, gks, lambdas = problem
    update, projected = combine_projection(g0, gks, lambdas)
    a = projection_coefficients(gks @ g0, g0 @ g0)
    assert bool(torch.isfinite(a).all()) and bool((a <= 0).all())
    assert bool(torch.isfinite(update).all())
    scale = 1.0 + float(g0.norm()) * float(gks.norm())
    # no projected g_k points against g_0, so (update·g_0) >= ‖g_0‖²
    assert bool(((projected @ g0) >= -ATOL * scale).all())
    assert float(update @ g0) >= float(g0 @ g0) - ATOL * scale
    # g_0 enters with coefficient exactly 1; agreeing g_k pass through untouched
    torch.testing.assert_close(update - (lambdas[:, None] * projected).sum(0), g0, atol=ATOL * scale, rtol=0)
    keep = (gks @ g0) >= 0
    assert torch.equal(projected[keep], gks[keep])
    # projecting again changes nothing
    again = combine_projection(g0, projected, lambdas)[1]
    torch.testing.assert_close(again, projected, atol=ATOL * scale, rtol=0)


@FAST
@given(problems(agree=True))
def test_projection_is_the_plain_weighted_sum_when_every_task_agrees(problem):
    g0, gks, lambdas = problem
    update, _ = combine_projection(g0, gks, lambdas)
    torch.testing.assert_close(update, g0 + (lambdas[:, None] * gks).sum(0), atol=ATOL, rtol=0)


@FAST
@given(st.data())
def test_projection_is_equivariant_under_permuting_the_aux_tasks(data):
    g0, gks, lambdas = data.draw(problems())
    perm = torch.tensor(data.draw(permutations(len(gks))))
    update, projected = combine_projection(g0, gks, lambdas)
    update_p, projected_p = combine_projection(g0, gks[perm], lambdas[perm])
    torch.testing.assert_close(projected_p, projected[perm], atol=0, rtol=0)
    torch.testing.assert_close(update_p, update, atol=ATOL * (1 + float(gks.abs().sum())), rtol=0)


def test_projection_of_a_zero_main_gradient_changes_nothing():
    g0 = torch.zeros(3, dtype=torch.float64)
    gks = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    update, projected = combine_projection(g0, gks, torch.tensor([0.5], dtype=torch.float64))
    assert torch.equal(projected, gks) and torch.equal(update, 0.5 * gks[0])


# -- OL-AUX -------------------------------------------------------------------------------------------------------------
@FAST
@given(st.data())
def test_olaux_weights_stay_finite_and_non_negative_and_follow_their_task(data):
    k = data.draw(st.integers(1, 5))
    w = torch.tensor(data.draw(st.lists(st.integers(0, 300).map(lambda i: i / 100), min_size=k, max_size=k)),
                     dtype=torch.float64)
    acc = torch.tensor(data.draw(st.lists(value, min_size=k, max_size=k)), dtype=torch.float64)
    beta = data.draw(st.integers(1, 500).map(lambda i: i / 100))
    new = olaux_update(w, acc, beta)
    assert bool(torch.isfinite(new).all()) and bool((new >= 0).all())
    torch.testing.assert_close(new, torch.clamp(w + beta * acc, min=0), atol=0, rtol=0)
    assert bool((new[acc >= 0] >= w[acc >= 0]).all())  # a helpful task never loses weight
    perm = torch.tensor(data.draw(permutations(k)))
    torch.testing.assert_close(olaux_update(w[perm], acc[perm], beta), new[perm], atol=0, rtol=0)
    # the combination with the learned weights: g_0 keeps coefficient 1
    g0, gks, lambdas = data.draw(problems())
    w = torch.tensor(data.draw(st.lists(st.integers(0, 300).map(lambda i: i / 100), min_size=len(gks),
                                        max_size=len(gks))), dtype=torch.float64)
    update = combine_weighted(g0, gks, w * lambdas)
    torch.testing.assert_close(update - ((w * lambdas)[:, None] * gks).sum(0), g0, atol=ATOL, rtol=0)


# -- MetaBalance -----------------------------------------------------------------------------------------------------------
magnitude = st.integers(0, 1000).map(lambda i: i / 100.0)


@FAST
@given(st.data())
def test_metabalance_factors_are_finite_positive_and_respect_the_adapt_choice(data):
    k = data.draw(st.integers(1, 5))
    m0 = torch.tensor(data.draw(magnitude), dtype=torch.float64)
    mk = torch.tensor(data.draw(st.lists(magnitude, min_size=k, max_size=k)), dtype=torch.float64)
    relax = data.draw(st.integers(0, 100).map(lambda i: i / 100))
    for adapt in ("both", "shrink", "enlarge"):
        f = metabalance_factor(m0.expand_as(mk), mk, relax, adapt)
        assert bool(torch.isfinite(f).all()) and bool((f >= 1 - relax - 1e-12).all()) and bool((f >= 0).all())
        if adapt == "shrink":
            assert bool((f <= 1 + 1e-12).all())
        if adapt == "enlarge":
            assert bool((f >= 1 - 1e-12).all())
        assert bool((f[mk == m0] == 1).all()) and bool((f[mk == 0] == 1).all())
    f = metabalance_factor(m0.expand_as(mk), mk, 1.0, "both")
    positive = mk > 0
    torch.testing.assert_close((f * mk)[positive], m0.expand_as(mk)[positive], atol=1e-12, rtol=1e-12)
    assert bool((metabalance_factor(m0.expand_as(mk), mk, 0.0, "both") == 1).all())


@FAST
@given(st.data())
def test_metabalance_combination_keeps_g0_and_is_permutation_equivariant(data):
    g0, gks, lambdas = data.draw(problems())
    mks = torch.tensor(data.draw(st.lists(magnitude, min_size=len(gks), max_size=len(gks))), dtype=torch.float64)
    m0 = torch.tensor(data.draw(magnitude), dtype=torch.float64)
    update, f = combine_metabalance(g0, gks, lambdas, m0, mks, 0.7)
    torch.testing.assert_close(update - ((lambdas * f)[:, None] * gks).sum(0), g0, atol=ATOL * 10, rtol=0)
    perm = torch.tensor(data.draw(permutations(len(gks))))
    update_p, f_p = combine_metabalance(g0, gks[perm], lambdas[perm], m0, mks[perm], 0.7)
    torch.testing.assert_close(f_p, f[perm], atol=0, rtol=0)
    torch.testing.assert_close(update_p, update, atol=ATOL * (1 + float(gks.abs().sum())) * 10, rtol=0)


def test_moving_average_from_zero_by_hand():
    m = moving_average(torch.tensor(0.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), 0.9)
    assert float(m) == pytest.approx(0.2)
    assert float(moving_average(m, torch.tensor(1.0, dtype=torch.float64), 0.9)) == pytest.approx(0.28)


# -- the strategies write what the pure functions say ---------------------------------------------------------------
def one_layer_trunk(seed, k):
    """A single shared Linear under a main head and k aux heads: the shared set is exactly the trunk."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    heads = {f"a{i}": al.Tap("1", nn.Linear(4, 2)) for i in range(k)}
    return al.attach(net, heads).double()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.sampled_from(["gating", "weighted", "projection"]))
def test_the_strategies_write_the_pure_combination_on_the_shared_trunk(seed, k, kind):
    model = one_layer_trunk(seed, k)
    weighting = Projection() if kind == "projection" else CosineGating(weighted=kind == "weighted")
    lambdas = [0.2 + 0.3 * i for i in range(k)]
    objective = al.Objective(aux=[al.Task(f"a{i}", source=f"a{i}", target=f"t{i}", weight=lam)
                                  for i, lam in enumerate(lambdas)], weighting=weighting)
    g = torch.Generator().manual_seed(seed)
    b = {"input": torch.randn(6, 3, generator=g, dtype=torch.float64), "target": torch.randint(0, 2, (6,), generator=g)}
    b.update({f"t{i}": torch.randint(0, 2, (6,), generator=g) for i in range(k)})
    report = objective(model(b["input"]), b)
    trunk = list(model.model[0].parameters())
    flat = [torch.cat([x.flatten() for x in torch.autograd.grad(report.losses[t], trunk, retain_graph=True)])
            for t in report.losses]
    objective.backward(report)
    g0, gks, lam = flat[0], torch.stack(flat[1:]), torch.tensor(lambdas, dtype=torch.float64)
    if kind == "projection":
        expected = combine_projection(g0, gks, lam)[0]
    else:
        expected = combine_gating(g0, gks, lam, weighted=kind == "weighted")[0]
    written = torch.cat([p.grad.flatten() for p in trunk])
    torch.testing.assert_close(written, expected, atol=1e-12, rtol=0)
