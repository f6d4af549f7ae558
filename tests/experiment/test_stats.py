"""Tests for auxloss.experiment.stats, checked against hand-worked numbers wherever possible."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from auxloss.errors import AuxLossError
from auxloss.experiment.stats import Comparison, compare, holm, mean_ci, summarize

# Student-t quantiles t_{0.975, df} from a printed table (not from scipy).
T975 = {2: 4.302653, 4: 2.776445, 5: 2.570582}


def _t_sf_df2(t: float) -> float:
    """Closed-form upper tail of Student's t with 2 degrees of freedom: 1/2 * (1 - t / sqrt(t^2 + 2))."""
    return 0.5 * (1.0 - t / math.sqrt(t * t + 2.0))


def _paired(base: list[float], diffs: list[float], seeds: list[int] | None = None):
    seeds = list(range(len(base))) if seeds is None else seeds
    b = dict(zip(seeds, base))
    v = {s: x + d for s, x, d in zip(seeds, base, diffs)}
    return b, v


BASE3 = [0.80, 0.70, 0.90]


# ----------------------------------------------------------------------------------------------- mean_ci


def test_mean_ci_matches_hand_formula():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    m, (lo, hi) = mean_ci(values)
    s = math.sqrt(sum((x - 3.0) ** 2 for x in values) / 4)  # sqrt(2.5)
    half = T975[4] * s / math.sqrt(5)
    assert m == pytest.approx(3.0)
    assert lo == pytest.approx(3.0 - half, abs=1e-5)
    assert hi == pytest.approx(3.0 + half, abs=1e-5)
    assert (lo, hi) == pytest.approx((1.036757, 4.963243), abs=1e-5)


def test_mean_ci_other_confidence_is_narrower():
    _, (lo95, hi95) = mean_ci([1.0, 2.0, 4.0])
    _, (lo80, hi80) = mean_ci([1.0, 2.0, 4.0], confidence=0.80)
    assert lo95 < lo80 < hi80 < hi95


def test_mean_ci_single_value_has_undefined_interval():
    m, (lo, hi) = mean_ci([0.7])
    assert m == 0.7
    assert math.isnan(lo) and math.isnan(hi)


def test_mean_ci_constant_values_collapse():
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, (2.0, 2.0))


@pytest.mark.parametrize(
    "values, confidence",
    [([], 0.95), ([1.0, float("nan")], 0.95), ([1.0, float("inf")], 0.95), ([1.0, 2.0], 1.0),
     ([1.0, 2.0], 0.0), (["a", 1.0], 0.95)],
)
def test_mean_ci_rejects_bad_input(values, confidence):
    with pytest.raises(AuxLossError):
        mean_ci(values, confidence)


# ----------------------------------------------------------------------------------------------- holm


def test_holm_hand_worked_example():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_enforces_monotonicity():
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    # 0.3*3=0.9, 0.4*2=0.8 -> raised to 0.9 by the running max, 0.9*1=0.9
    assert holm([0.3, 0.4, 0.9]) == pytest.approx([0.9, 0.9, 0.9])


def test_holm_passes_nan_through_and_does_not_count_it():
    out = holm([0.5, float("nan"), 0.2])  # m = 2: 0.2*2=0.4, 0.5*1=0.5
    assert out[0] == pytest.approx(0.5)
    assert math.isnan(out[1])
    assert out[2] == pytest.approx(0.4)


def test_holm_edge_cases():
    assert holm([]) == []
    assert holm([0.03]) == [0.03]
    assert all(math.isnan(x) for x in holm([float("nan")] * 2))


@pytest.mark.parametrize("bad", [[-0.1], [1.5], [float("inf")]])
def test_holm_rejects_values_outside_unit_interval(bad):
    with pytest.raises(AuxLossError, match=r"\[0, 1\]"):
        holm(bad)
    with pytest.raises(AuxLossError):
        holm(["x"])


p_lists = st.lists(
    st.one_of(st.floats(0.0, 1.0), st.just(float("nan"))), min_size=0, max_size=12
)


@settings(max_examples=200, deadline=None)
@given(p_lists)
def test_holm_properties(ps):
    adj = holm(ps)
    assert len(adj) == len(ps)
    for p, a in zip(ps, adj):
        if math.isnan(p):
            assert math.isnan(a)
        else:
            assert p <= a <= 1.0
    known = [(p, a) for p, a in zip(ps, adj) if not math.isnan(p)]
    for p1, a1 in known:
        for p2, a2 in known:
            if p1 < p2:
                assert a1 <= a2
            if p1 == p2:
                assert a1 == a2


# ----------------------------------------------------------------------------------------------- compare: numbers


def test_paired_t_test_matches_hand_formula():
    diffs = [0.5, 0.7, 0.5]
    b, v = _paired(BASE3, diffs)
    (c,) = compare(b, {"aux": v})
    n = 3
    mean_d = sum(diffs) / n
    s_d = math.sqrt(sum((d - mean_d) ** 2 for d in diffs) / (n - 1))
    t = mean_d / (s_d / math.sqrt(n))
    assert t == pytest.approx(8.5)
    assert c.n == 3
    assert c.delta == pytest.approx(mean_d)
    assert c.p_value == pytest.approx(2 * scipy_stats.t.sf(t, n - 1))
    assert c.p_value == pytest.approx(2 * _t_sf_df2(t))  # independent of scipy
    assert c.p_value == pytest.approx(0.0135599, abs=1e-6)
    half = T975[2] * s_d / math.sqrt(n)
    assert c.ci95 == pytest.approx((mean_d - half, mean_d + half), abs=1e-5)
    assert c.effect_size == pytest.approx(mean_d / s_d)  # Cohen's d_z
    assert c.effect_size == pytest.approx(4.907477, abs=1e-6)
    assert c.p_holm == pytest.approx(c.p_value)  # family of one
    assert c.p_wilcoxon is None  # n < 6
    assert c.variant == "aux" and c.baseline == "baseline" and c.seeds == (0, 1, 2)


def test_wilcoxon_reported_from_six_pairs():
    base = [0.5, 0.6, 0.55, 0.58, 0.52, 0.61]
    b, v = _paired(base, [0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    (c,) = compare(b, {"aux": v})
    # All six differences positive with distinct ranks: exact two-sided p = 2 / 2**6.
    assert c.p_wilcoxon == pytest.approx(2 / 64)
    b5, v5 = _paired(base[:5], [0.01, 0.02, 0.03, 0.04, 0.05])
    assert compare(b5, {"aux": v5})[0].p_wilcoxon is None


def test_bootstrap_ci_is_reproducible_and_sensible():
    base = [0.5, 0.6, 0.55, 0.58, 0.52, 0.61, 0.57, 0.54]
    diffs = [0.01, 0.03, 0.02, 0.04, 0.0, 0.025, 0.015, 0.035]
    b, v = _paired(base, diffs)
    (c1,) = compare(b, {"aux": v})
    (c2,) = compare(b, {"aux": v})
    assert c1.bootstrap_ci == c2.bootstrap_ci
    lo, hi = c1.bootstrap_ci
    assert min(diffs) <= lo < c1.delta < hi <= max(diffs)
    assert compare(b, {"aux": v}, bootstrap=False)[0].bootstrap_ci is None
    b2, v2 = _paired(base[:2], diffs[:2])
    assert compare(b2, {"aux": v2})[0].bootstrap_ci is None  # n < 3


def test_zero_spread_differences():
    b = dict(enumerate(BASE3))
    (same,) = compare(b, {"same": dict(b)})  # bit-identical runs
    assert same.delta == 0.0 and same.p_value == 1.0 and same.effect_size == 0.0
    assert same.ci95 == (0.0, 0.0) and same.verdict == "no detectable effect"

    b = {0: 1.0, 1: 2.0, 2: 3.0}
    worse = {0: 0.5, 1: 1.5, 2: 2.5}  # exactly -0.5 on every seed
    (c,) = compare(b, {"worse": worse})
    assert c.effect_size == -math.inf
    assert c.p_value == 0.0
    assert c.verdict == "hurts"
    assert c.bootstrap_ci == (-0.5, -0.5)


def test_fewer_than_two_pairs_has_no_test():
    (c,) = compare({0: 0.5, 1: 0.6}, {"aux": {0: 0.9}})
    assert c.n == 1
    assert math.isnan(c.p_value) and math.isnan(c.p_holm) and math.isnan(c.effect_size)
    assert all(math.isnan(x) for x in c.ci95)
    assert c.p_wilcoxon is None and c.bootstrap_ci is None
    assert c.verdict == "no detectable effect"


# ----------------------------------------------------------------------------------------------- compare: verdicts

CLEAR = [0.050, 0.052, 0.048, 0.051, 0.049]
NOISE = [0.010, -0.012, 0.004, -0.006, 0.002]
BASE5 = [0.80, 0.82, 0.79, 0.81, 0.83]


def test_verdicts_higher_is_better():
    b, good = _paired(BASE5, CLEAR)
    _, bad = _paired(BASE5, [-d for d in CLEAR])
    _, noise = _paired(BASE5, NOISE)
    res = {c.variant: c for c in compare(b, {"good": good, "bad": bad, "noise": noise})}
    assert res["good"].verdict == "helps" and res["good"].delta > 0
    assert res["bad"].verdict == "hurts" and res["bad"].delta < 0
    assert res["noise"].verdict == "no detectable effect"
    assert all(c.higher_is_better for c in res.values())


def test_lower_is_better_flips_the_verdict():
    b, up = _paired(BASE5, CLEAR)
    _, down = _paired(BASE5, [-d for d in CLEAR])
    res = {c.variant: c for c in compare(b, {"up": up, "down": down}, higher_is_better=False)}
    assert res["up"].verdict == "hurts"
    assert res["down"].verdict == "helps"
    assert res["down"].delta < 0  # sign convention does not depend on higher_is_better
    assert not res["up"].higher_is_better


def test_holm_correction_can_remove_significance():
    # diffs 0.7, 1.0, 1.3: t = 1 / (0.3 / sqrt 3) = 5.7735, p = 2 * sf(t; df=2) = 0.0287 < 0.05 alone ...
    b, v = _paired(BASE3, [0.7, 1.0, 1.3])
    (alone,) = compare(b, {"aux": v})
    assert alone.p_value == pytest.approx(2 * _t_sf_df2(1.0 / (0.3 / math.sqrt(3))))
    assert alone.p_value == pytest.approx(0.02872, abs=1e-5)
    assert alone.verdict == "helps"
    # ... but with a second (null) variant in the family Holm doubles it to 0.0574 > 0.05.
    _, null = _paired(BASE3, [-1.0, 0.0, 1.0])
    res = {c.variant: c for c in compare(b, {"aux": v, "null": null})}
    assert res["aux"].p_holm == pytest.approx(2 * alone.p_value)
    assert res["aux"].verdict == "no detectable effect"
    assert res["null"].p_holm == pytest.approx(1.0)
    # ... and a stricter / looser alpha moves the line.
    assert compare(b, {"aux": v, "null": null}, alpha=0.1)[0].verdict == "helps"


def test_results_follow_variant_order():
    b, good = _paired(BASE5, CLEAR)
    _, noise = _paired(BASE5, NOISE)
    assert [c.variant for c in compare(b, {"z": noise, "a": good})] == ["z", "a"]
    assert compare(b, {}) == []


# ----------------------------------------------------------------------------------------------- compare: pairing


def test_dict_order_does_not_matter():
    seeds = [3, 11, 7, 0, 5]
    b, v = _paired(BASE5, CLEAR, seeds)
    b_rev = dict(reversed(list(b.items())))
    v_shuffled = {s: v[s] for s in [7, 0, 11, 5, 3]}
    c1 = compare(b, {"aux": v})[0]
    c2 = compare(b_rev, {"aux": v_shuffled})[0]
    assert c1 == c2
    assert c1.seeds == (0, 3, 5, 7, 11)


def test_pairing_is_by_seed_not_position():
    b = {0: 1.0, 1: 2.0, 2: 3.0}
    v = {2: 3.1, 0: 1.1, 1: 2.1}  # +0.1 on every seed, listed in another order
    (c,) = compare(b, {"aux": v})
    assert c.delta == pytest.approx(0.1)
    assert c.effect_size > 100 or math.isinf(c.effect_size)


def test_missing_seeds_use_the_intersection():
    b, v = _paired(BASE5, CLEAR)
    del v[1], v[3]
    v[99] = 5.0  # a seed the baseline lacks is ignored too
    (c,) = compare(b, {"aux": v})
    assert c.n == 3 and c.seeds == (0, 2, 4)
    assert c.delta == pytest.approx((CLEAR[0] + CLEAR[2] + CLEAR[4]) / 3)


def test_empty_intersection_names_variant_and_seeds():
    with pytest.raises(AuxLossError) as info:
        compare({0: 0.5, 1: 0.6}, {"aux_loss": {7: 0.9, 8: 0.8}})
    msg = str(info.value)
    assert "aux_loss" in msg and "[7, 8]" in msg and "[0, 1]" in msg


@pytest.mark.parametrize(
    "baseline, variants, kwargs, needle",
    [
        ({}, {"a": {0: 1.0}}, {}, "no seeds"),
        ({0: 1.0, 1: float("nan")}, {"a": {0: 1.0}}, {}, "seed(s) [1]"),
        ({0: 1.0}, {"a": {0: float("inf")}}, {}, "'a'"),
        ({0: 1.0}, {"a": {0: None}}, {}, "non-numeric"),
        ({0: 1.0}, {"a": [1.0]}, {}, "mapping"),
        ({0: 1.0}, [{0: 1.0}], {}, "mapping"),
        ({0: 1.0}, {"a": {0: 1.0}}, {"alpha": 0.0}, "alpha"),
        ({0: 1.0}, {"a": {0: 1.0}}, {"alpha": 1.5}, "alpha"),
    ],
)
def test_compare_rejects_bad_input(baseline, variants, kwargs, needle):
    with pytest.raises(AuxLossError) as info:
        compare(baseline, variants, **kwargs)
    assert needle in str(info.value)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        compare({0: 1.0}, {"a": {1: 1.0}})


# ----------------------------------------------------------------------------------------------- to_dict / summarize


def test_to_dict_is_strict_json():
    b, good = _paired(BASE5, CLEAR)
    comps = compare(b, {"good": good, "one": {0: 0.9}, "flat": {0: 0.9, 1: 0.92}},
                    baseline_name="no_aux")
    for c in comps:
        d = c.to_dict()
        text = json.dumps(d, allow_nan=False)  # raises on NaN / inf
        assert json.loads(text) == d
        assert d["baseline"] == "no_aux"
    one = comps[1].to_dict()
    assert one["p_value"] is None and one["ci95"] == [None, None] and one["effect_size"] is None
    good_d = comps[0].to_dict()
    assert good_d["verdict"] == "helps" and isinstance(good_d["ci95"], list) and good_d["n"] == 5
    assert set(good_d) >= {
        "variant", "baseline", "n", "delta", "ci95", "p_value", "p_holm", "p_wilcoxon",
        "effect_size", "bootstrap_ci", "verdict", "higher_is_better",
    }
    # An infinite effect size (zero-spread differences) also becomes None.
    (inf_c,) = compare({0: 1.0, 1: 2.0}, {"x": {0: 1.5, 1: 2.5}})
    assert math.isinf(inf_c.effect_size)
    assert inf_c.to_dict()["effect_size"] is None
    json.dumps(inf_c.to_dict(), allow_nan=False)


def test_comparison_is_frozen():
    (c,) = compare({0: 1.0, 1: 2.0}, {"x": {0: 1.5, 1: 2.7}})
    assert isinstance(c, Comparison)
    with pytest.raises(AttributeError):
        c.delta = 0.0  # type: ignore[misc]


def test_summarize():
    s = summarize({4: 5.0, 0: 1.0, 2: 3.0, 1: 2.0, 3: 4.0})
    assert s["n"] == 5 and s["seeds"] == [0, 1, 2, 3, 4] and s["values"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert s["mean"] == pytest.approx(3.0)
    assert s["std"] == pytest.approx(math.sqrt(2.5))
    assert s["ci95"] == pytest.approx([1.036757, 4.963243], abs=1e-5)
    json.dumps(s, allow_nan=False)
    one = summarize({7: 0.5})
    assert one == {"n": 1, "mean": 0.5, "std": None, "ci95": [None, None], "seeds": [7], "values": [0.5]}
    with pytest.raises(AuxLossError):
        summarize({})
    with pytest.raises(AuxLossError):
        summarize({0: float("nan")})
