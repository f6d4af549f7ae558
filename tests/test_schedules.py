"""Tests for auxloss.schedules: formulas at hand-picked points, persistence, errors and properties."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auxloss.errors import AuxLossError
from auxloss.schedules import (
    Constant,
    Cosine,
    Curriculum,
    DecayToThreshold,
    Exponential,
    Linear,
    Piecewise,
    Product,
    Schedule,
    Step,
    Warmup,
    as_schedule,
    from_config,
    from_state_dict,
    to_config,
)

GRID = [0, 1, 7, 49.5, 50, 99, 100, 101, 250, 499, 500, 501, 1000, 10_000, 1e7]

# --------------------------------------------------------------------------------------------------
# Values against hand-written formulas
# --------------------------------------------------------------------------------------------------


def test_constant() -> None:
    s = Constant(0.3)
    assert [s(t) for t in (0, 10, 1e9)] == [0.3, 0.3, 0.3]
    # A constant reads no counter, so it needs neither step nor epoch.
    assert s.value() == 0.3
    assert s.units == frozenset()


def test_linear_points() -> None:
    s = Linear(0.0, 0.3, begin=100, stop=500)
    assert s(0) == 0.0
    assert s(100) == 0.0
    assert s(200) == pytest.approx(0.3 * 0.25)  # a quarter of the way in
    assert s(300) == pytest.approx(0.15)
    assert s(500) == 0.3
    assert s(1e6) == 0.3
    assert isinstance(s(0), float) and isinstance(s(200), float)


def test_linear_down_and_jump() -> None:
    down = Linear(1.0, 0.2, begin=0, stop=10)
    assert down(5) == pytest.approx(0.6)
    jump = Linear(0.0, 1.0, begin=10, stop=10)
    assert jump(9.999) == 0.0 and jump(10) == 1.0


def test_cosine_points() -> None:
    s = Cosine(1.0, 0.2, total=1000, begin=100)
    assert s(0) == 1.0
    assert s(100) == 1.0
    assert s(600) == pytest.approx((1.0 + 0.2) / 2)  # midpoint
    assert s(350) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi * 0.25)) / 2)
    assert s(1100) == 0.2
    assert s(5000) == 0.2


def test_step_points() -> None:
    s = Step(1.0, milestones=[100, 200], gamma=0.5)
    assert s(0) == 1.0
    assert s(99) == 1.0
    assert s(100) == 0.5  # the new value holds at the milestone itself
    assert s(150) == 0.5
    assert s(200) == 0.25
    assert s(1e6) == 0.25
    assert Step(2.0, milestones=[])(1e6) == 2.0


def test_exponential_closed_form() -> None:
    s = Exponential(0.8, gamma=0.99, begin=10)
    for t in (0, 10):
        assert s(t) == 0.8
    for t in (11, 50.5, 1000):
        assert s(t) == pytest.approx(0.8 * math.pow(0.99, t - 10))
    assert s(1e9) == 0.0  # underflows to exactly 0, never NaN


def test_decay_to_threshold() -> None:
    s = DecayToThreshold(1.0, gamma=0.5, threshold=0.1)
    assert s(0) == 1.0
    assert s(3) == pytest.approx(math.pow(0.5, 3))  # 0.125 >= 0.1: still on
    assert s(3.3) == pytest.approx(math.pow(0.5, 3.3))  # 0.1015...
    assert s(3.33) == 0.0  # 0.0994... < 0.1: off, exactly
    assert s(4) == 0.0 and s(1e6) == 0.0
    assert s.is_active(3) and not s.is_active(4)


def test_warmup() -> None:
    s = Warmup(0.5, steps=100)
    assert s(0) == 0.0
    assert s(25) == pytest.approx(0.125)
    assert s(100) == 0.5
    assert s(1e6) == 0.5
    assert Warmup(0.5, steps=0)(0) == 0.5  # steps=0 means no warmup
    inner = Cosine(1.0, 0.0, total=1000)
    w = Warmup(inner, steps=100)
    assert w(50) == pytest.approx(0.5 * inner(50))


def test_curriculum_enter_ramp_leave() -> None:
    s = Curriculum(0.4, start=100, ramp=50, stop=1000, ramp_out=200)
    assert s(0) == 0.0
    assert s(99.9) == 0.0  # not yet on
    assert s(100) == 0.0  # ramp begins at 0
    assert s(125) == pytest.approx(0.2)  # half way up
    assert s(150) == 0.4  # fully on
    assert s(999) == 0.4
    assert s(1000) == 0.4  # leaving starts at stop, from the full value
    assert s(1050) == pytest.approx(0.3)
    assert s(1100) == pytest.approx(0.2)
    assert s(1200) == 0.0
    assert s(1e6) == 0.0
    assert not s.is_active(50) and s.is_active(500) and not s.is_active(2000)


def test_curriculum_hard_edges_and_forever() -> None:
    s = Curriculum(1.0, start=10, stop=20)
    assert [s(t) for t in (9, 10, 19, 20, 30)] == [0.0, 1.0, 1.0, 0.0, 0.0]
    forever = Curriculum(0.7, start=5)
    assert forever(4) == 0.0 and forever(5) == 0.7 and forever(1e9) == 0.7
    # A triangle: ramp up, then leave at once.
    tri = Curriculum(1.0, start=0, ramp=10, stop=10, ramp_out=10)
    assert tri(5) == pytest.approx(0.5) and tri(10) == 1.0 and tri(15) == pytest.approx(0.5)


def test_piecewise() -> None:
    s = Piecewise([(0, 0.0), (100, 1.0), (300, 0.5)])
    assert s(-5) == 0.0
    assert s(50) == pytest.approx(0.5)
    assert s(100) == 1.0
    assert s(200) == pytest.approx(0.75)
    assert s(300) == 0.5 and s(1e6) == 0.5
    single = Piecewise([(10, 0.2)])
    assert single(0) == 0.2 and single(100) == 0.2


def test_product_and_scaling() -> None:
    w, c = Warmup(1.0, steps=100), Cosine(1.0, 0.0, total=1000)
    p = w * c
    assert isinstance(p, Product)
    for t in GRID:
        assert p(t) == pytest.approx(w(t) * c(t))
    scaled = 0.3 * c
    assert scaled(500) == pytest.approx(0.3 * c(500))
    assert (c * 2)(0) == 2.0
    # a * b * c flattens to one product of three.
    assert len((w * c * Constant(0.5)).factors) == 3


def test_value_picks_unit() -> None:
    s = Linear(0.0, 1.0, begin=0, stop=10, unit="epoch")
    assert s.value(step=10_000, epoch=5) == 0.5
    mixed = Warmup(1.0, steps=100) * Exponential(1.0, gamma=0.5, unit="epoch")
    # Each factor reads its own counter: warmup at step 50, decay at epoch 2.
    assert mixed.value(step=50, epoch=2) == pytest.approx(0.5 * 0.25)
    w = Warmup(Exponential(1.0, gamma=0.5, unit="epoch"), steps=100)
    assert w.value(step=50, epoch=2) == pytest.approx(0.5 * 0.25)


def test_repr_shows_all_arguments() -> None:
    assert repr(Linear(0, 0.3, begin=100, stop=500)) == (
        "Linear(start=0.0, end=0.3, begin=100, stop=500, unit='step')"
    )
    assert repr(Curriculum(1.0, start=5)) == (
        "Curriculum(value=1.0, start=5, ramp=0, stop=None, ramp_out=0, unit='step')"
    )
    r = repr(Warmup(1.0, 10) * Step(1.0, [5, 10], unit="step"))
    assert r.startswith("Product(factors=(Warmup(target=Constant(value=1.0), steps=10")
    assert "Step(value=1.0, milestones=(5, 10), gamma=0.1, unit='step')" in r


def test_as_schedule() -> None:
    s = Linear(0, 1, 0, 1)
    assert as_schedule(s) is s
    assert as_schedule(0.5) == Constant(0.5)
    assert as_schedule(2) == Constant(2.0)


# --------------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------------

EXAMPLES: list[Schedule] = [
    Constant(0.3),
    Linear(0.0, 0.3, begin=100, stop=500),
    Linear(1.0, 0.0, begin=0.5, stop=2.5, unit="epoch"),
    Cosine(1.0, 0.1, total=1000, begin=50),
    Step(1.0, milestones=[100, 300], gamma=0.5),
    Exponential(0.5, gamma=0.99, begin=10),
    Warmup(0.7, steps=100),
    Warmup(Cosine(1.0, 0.0, total=1000), steps=50),
    Curriculum(0.4, start=100, ramp=50, stop=1000, ramp_out=200),
    Curriculum(0.4, start=3, unit="epoch"),
    Piecewise([(0, 0.0), (100, 1.0), (300, 0.5)]),
    DecayToThreshold(1.0, gamma=0.9, threshold=0.05),
    Warmup(1.0, steps=100) * Cosine(1.0, 0.0, total=1000),
    0.5 * Exponential(1.0, gamma=0.5, unit="epoch") * Warmup(1.0, steps=10),
]

# For each class, a differently configured instance to load a state into.
OTHER: dict[type[Schedule], Schedule] = {
    Constant: Constant(9.0),
    Linear: Linear(5.0, 5.0, begin=1, stop=2),
    Cosine: Cosine(0.0, 3.0, total=7),
    Step: Step(3.0, milestones=[1]),
    Exponential: Exponential(2.0, gamma=0.1),
    Warmup: Warmup(Linear(0, 1, 0, 1), steps=3, unit="epoch"),
    Curriculum: Curriculum(9.0),
    Piecewise: Piecewise([(5, 5.0)]),
    DecayToThreshold: DecayToThreshold(2.0, gamma=0.1, threshold=1.0),
    Product: Constant(2.0) * Constant(3.0),
}


def _grid_values(s: Schedule) -> list[float]:
    return [s.value(step=t, epoch=t / 100) for t in GRID]


@pytest.mark.parametrize("s", EXAMPLES, ids=repr)
def test_state_dict_round_trip(s: Schedule) -> None:
    state = json.loads(json.dumps(s.state_dict()))  # plain data: survives JSON (and so torch.save)
    back = from_state_dict(state)
    assert back == s and back is not s
    assert repr(back) == repr(s)
    assert _grid_values(back) == _grid_values(s)
    s.load_state_dict(state)  # its own state: accepted, nothing changes
    assert s == back


@pytest.mark.parametrize("s", EXAMPLES, ids=repr)
def test_load_state_dict_of_another_schedule_is_refused_and_changes_nothing(s: Schedule) -> None:
    # Schedules are immutable: loading another one's state must neither swap it in place nor pass silently.
    other = OTHER[type(s)]
    before, values, h = repr(other), _grid_values(other), hash(other)
    with pytest.raises(AuxLossError, match=r"the state was saved from .* but this schedule is .*from_state_dict"):
        other.load_state_dict(s.state_dict())
    assert repr(other) == before and _grid_values(other) == values and hash(other) == h


@pytest.mark.parametrize("s", EXAMPLES, ids=repr)
def test_config_round_trip(s: Schedule) -> None:
    cfg = json.loads(json.dumps(to_config(s)))
    back = from_config(cfg)
    assert back == s and hash(back) == hash(s)
    assert to_config(back) == cfg
    assert _grid_values(back) == _grid_values(s)


def test_from_config_spellings() -> None:
    s = from_config({"type": "linear", "start": 0, "end": 0.3, "begin": 100, "stop": 500})
    assert s == Linear(0.0, 0.3, begin=100, stop=500)
    d = DecayToThreshold(1.0, gamma=0.5, threshold=0.1)
    for name in ("decay_to_threshold", "DecayToThreshold", "DECAY-TO-THRESHOLD"):
        assert from_config({"type": name, "value": 1.0, "gamma": 0.5, "threshold": 0.1}) == d
    w = from_config(
        {"type": "Warmup", "target": {"type": "cosine", "start": 1, "end": 0, "total": 10}, "steps": 5}
    )
    assert w == Warmup(Cosine(1.0, 0.0, total=10), steps=5)
    assert from_config({"type": "warmup", "target": 0.5, "steps": 5}) == Warmup(0.5, steps=5)
    assert from_config({"type": "piecewise", "points": [[0, 0], [10, 1]]}) == Piecewise([(0, 0.0), (10, 1.0)])


# --------------------------------------------------------------------------------------------------
# Errors: each message names the offending argument
# --------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")

ERRORS: list[tuple[str, Callable[[], Any], list[str]]] = [
    ("constant negative", lambda: Constant(-1.0), ["value", ">= 0"]),
    ("constant nan", lambda: Constant(NAN), ["value"]),
    ("constant inf", lambda: Constant(INF), ["value"]),
    ("constant str", lambda: Constant("0.1"), ["value"]),  # type: ignore[arg-type]
    ("constant bool", lambda: Constant(True), ["value"]),
    ("linear start", lambda: Linear(-0.1, 1, 0, 10), ["start"]),
    ("linear end", lambda: Linear(0, NAN, 0, 10), ["end"]),
    ("linear begin negative", lambda: Linear(0, 1, -5, 10), ["begin"]),
    ("linear stop inf", lambda: Linear(0, 1, 0, INF), ["stop"]),
    ("linear begin > stop", lambda: Linear(0, 1, 500, 100), ["begin", "stop"]),
    ("linear unit", lambda: Linear(0, 1, 0, 10, unit="steps"), ["unit", "'step'"]),  # type: ignore[arg-type]
    ("cosine total zero", lambda: Cosine(1, 0, total=0), ["total"]),
    ("cosine total negative", lambda: Cosine(1, 0, total=-3), ["total"]),
    ("cosine begin", lambda: Cosine(1, 0, total=10, begin=-1), ["begin"]),
    ("cosine start", lambda: Cosine(INF, 0, total=10), ["start"]),
    ("step value", lambda: Step(-1, [10]), ["value"]),
    ("step milestones order", lambda: Step(1, [20, 10]), ["milestones"]),
    ("step milestones dup", lambda: Step(1, [10, 10]), ["milestones"]),
    ("step milestones negative", lambda: Step(1, [-1, 10]), ["milestones[0]"]),
    ("step milestones str", lambda: Step(1, "10"), ["milestones"]),  # type: ignore[arg-type]
    ("step gamma", lambda: Step(1, [10], gamma=-0.5), ["gamma"]),
    ("step overflow", lambda: Step(1, list(range(1, 400)), gamma=10.0), ["gamma"]),
    ("exp gamma zero", lambda: Exponential(1, gamma=0), ["gamma"]),
    ("exp gamma > 1", lambda: Exponential(1, gamma=1.5), ["gamma"]),
    ("exp begin", lambda: Exponential(1, gamma=0.5, begin=NAN), ["begin"]),
    ("exp value", lambda: Exponential(-2, gamma=0.5), ["value"]),
    ("warmup steps", lambda: Warmup(1.0, steps=-10), ["steps"]),
    ("warmup target type", lambda: Warmup("cosine", steps=10), ["target"]),  # type: ignore[arg-type]
    ("warmup target negative", lambda: Warmup(-1.0, steps=10), ["value"]),
    ("curriculum ends before starts", lambda: Curriculum(1, start=100, ramp=50, stop=120), ["ends before it starts", "stop"]),
    ("curriculum ramp_out alone", lambda: Curriculum(1, ramp_out=10), ["ramp_out", "stop"]),
    ("curriculum never on", lambda: Curriculum(1, start=10, stop=10), ["stop", "never on"]),
    ("curriculum ramp", lambda: Curriculum(1, ramp=-1), ["ramp"]),
    ("curriculum start", lambda: Curriculum(1, start=INF), ["start"]),
    ("curriculum value", lambda: Curriculum(NAN), ["value"]),
    ("curriculum unit", lambda: Curriculum(1, unit="epochs"), ["unit", "'epoch'"]),  # type: ignore[arg-type]
    ("piecewise empty", lambda: Piecewise([]), ["points"]),
    ("piecewise not pairs", lambda: Piecewise([(0, 1, 2)]), ["points[0]"]),  # type: ignore[list-item]
    ("piecewise order", lambda: Piecewise([(10, 1.0), (5, 0.0)]), ["points", "increasing"]),
    ("piecewise negative value", lambda: Piecewise([(0, 1.0), (5, -1.0)]), ["points[1] value"]),
    ("piecewise negative t", lambda: Piecewise([(-1, 1.0)]), ["points[0] t"]),
    ("dtt threshold above value", lambda: DecayToThreshold(0.1, gamma=0.5, threshold=0.5), ["threshold"]),
    ("dtt gamma", lambda: DecayToThreshold(1, gamma=0, threshold=0.1), ["gamma"]),
    ("dtt threshold negative", lambda: DecayToThreshold(1, gamma=0.5, threshold=-1), ["threshold"]),
    ("product empty", lambda: Product([]), ["factors"]),
    ("product bad factor", lambda: Product([Constant(1), "x"]), ["factors[1]"]),  # type: ignore[list-item]
    ("product overflow", lambda: Constant(1e200) * Constant(1e200), ["factors"]),
    ("negative scale", lambda: -1.0 * Constant(1.0), ["value"]),
    ("as_schedule str", lambda: as_schedule("0.1"), ["Schedule", "'0.1'"]),  # type: ignore[arg-type]
    ("as_schedule nan", lambda: as_schedule(NAN), ["value"]),
    ("as_schedule dict", lambda: as_schedule({"type": "constant"}), ["from_config"]),  # type: ignore[arg-type]
    ("call nan t", lambda: Constant(1.0)(NAN), ["t must be"]),
    ("call str t", lambda: Linear(0, 1, 0, 1)("5"), ["t must be"]),  # type: ignore[arg-type]
    ("value missing epoch", lambda: Linear(0, 1, 0, 1, unit="epoch").value(step=5), ["epoch"]),
    ("value missing step", lambda: Cosine(0, 1, total=1).value(epoch=5), ["step"]),
    ("mixed units raw t", lambda: (Warmup(1, 1) * Exponential(1, 0.5, unit="epoch"))(3), ["unit", "value("]),
    ("mixed units .unit", lambda: (Warmup(1, 1) * Exponential(1, 0.5, unit="epoch")).unit, ["unit"]),
    ("config not dict", lambda: from_config([("type", "linear")]), ["dict"]),  # type: ignore[arg-type]
    ("config no type", lambda: from_config({"value": 1}), ["'type'", "constant"]),
    ("config unknown type", lambda: from_config({"type": "linaer"}), ["'linaer'", "Did you mean 'linear'", "cosine"]),
    ("config unknown key", lambda: from_config({"type": "linear", "start": 0, "end": 1, "begin": 0, "stop": 1, "stopp": 2}), ["'stopp'", "begin, stop, unit"]),
    ("config missing key", lambda: from_config({"type": "linear", "start": 0, "end": 1}), ["'begin'", "'stop'"]),
    ("config nested bad", lambda: from_config({"type": "warmup", "steps": 5, "target": {"type": "cosin"}}), ["'cosin'", "'cosine'"]),
    ("config bad value", lambda: from_config({"type": "constant", "value": -3}), ["value"]),
    ("to_config float", lambda: to_config(0.5), ["Schedule"]),  # type: ignore[arg-type]
    ("state class mismatch", lambda: Linear(0, 1, 0, 1).load_state_dict(Constant(1).state_dict()), ["'Constant'", "Linear"]),
    ("state malformed", lambda: Constant(1).load_state_dict({"value": 1}), ["state_dict()"]),
    ("state unknown class", lambda: Warmup(1, 1).load_state_dict({"class": "Warmup", "params": {"target": {"class": "Nope", "params": {}}, "steps": 1}}), ["'Nope'"]),
    ("state unknown param", lambda: Constant(1).load_state_dict({"class": "Constant", "params": {"value": 1, "x": 2}}), ["'x'"]),
]  # fmt: skip


@pytest.mark.parametrize(("make", "needles"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_argument(make: Callable[[], Any], needles: list[str]) -> None:
    with pytest.raises(AuxLossError) as info:
        make()
    assert isinstance(info.value, ValueError)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in: {info.value}"


def test_failed_load_leaves_schedule_unchanged() -> None:
    s = Linear(0, 1, 0, 10)
    with pytest.raises(AuxLossError):
        s.load_state_dict({"class": "Linear", "params": {"start": 0, "end": 1, "begin": 10, "stop": 0}})
    assert s == Linear(0, 1, 0, 10)


def test_mul_with_unrelated_type_is_type_error() -> None:
    with pytest.raises(TypeError):
        Constant(1.0) * "x"  # type: ignore[operator]


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------

weights = st.floats(0.0, 100.0, allow_nan=False)
times = st.one_of(st.integers(0, 10_000), st.floats(0.0, 10_000.0, allow_nan=False))
lengths = st.one_of(st.integers(1, 5_000), st.floats(0.01, 5_000.0))
gammas = st.floats(1e-6, 1.0, exclude_min=True)
any_t = st.one_of(st.integers(-10, 10**9), st.floats(-1e6, 1e12, allow_nan=False, allow_infinity=False))


@st.composite
def linears(draw: st.DrawFn) -> Linear:
    begin = draw(times)
    return Linear(draw(weights), draw(weights), begin, begin + draw(st.integers(0, 5_000)))


@st.composite
def curricula(draw: st.DrawFn) -> Curriculum:
    start, ramp = draw(times), draw(st.integers(0, 1_000))
    stop = draw(st.none() | st.integers(0, 5_000).map(lambda d: start + ramp + d))
    ramp_out = 0 if stop is None else draw(st.integers(0, 1_000))
    if stop == start and ramp_out == 0:
        ramp_out = 1
    return Curriculum(draw(weights), start=start, ramp=ramp, stop=stop, ramp_out=ramp_out)


@st.composite
def steps(draw: st.DrawFn) -> Step:
    ms = sorted(set(draw(st.lists(st.integers(0, 10_000), max_size=5))))
    return Step(draw(weights), ms, gamma=draw(st.floats(0.0, 2.0)))


@st.composite
def piecewises(draw: st.DrawFn) -> Piecewise:
    ts = sorted(set(draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=6))))
    return Piecewise([(t, draw(weights)) for t in ts])


@st.composite
def decays(draw: st.DrawFn) -> DecayToThreshold:
    value = draw(weights)
    return DecayToThreshold(value, draw(gammas), draw(st.floats(0.0, 1.0)) * value, begin=draw(times))


leaves = st.one_of(
    weights.map(Constant),
    linears(),
    st.builds(Cosine, weights, weights, lengths, times),
    steps(),
    st.builds(Exponential, weights, gammas, times),
    curricula(),
    piecewises(),
    decays(),
)
schedules = st.one_of(
    leaves,
    st.builds(Warmup, st.one_of(weights, leaves), times),
    st.lists(leaves, min_size=1, max_size=3).map(Product),
)


@settings(max_examples=150, deadline=None)
@given(schedules, st.lists(any_t, min_size=1, max_size=10))
def test_values_finite_nonnegative(s: Schedule, ts: list[float]) -> None:
    for t in ts:
        v = s(t)
        assert type(v) is float
        assert math.isfinite(v) and v >= 0.0
        assert v <= s.bound * (1 + 1e-12)


@settings(max_examples=100, deadline=None)
@given(linears(), st.lists(st.floats(0.0, 1.0), min_size=2, max_size=20))
def test_linear_monotone_within_ramp(s: Linear, fracs: list[float]) -> None:
    p = s.params
    ts = [p["begin"] + f * (p["stop"] - p["begin"]) for f in sorted(fracs)] + [p["stop"]]
    vs = [s(t) for t in ts]
    pairs = list(itertools.pairwise(vs))
    if p["end"] >= p["start"]:
        assert all(a <= b for a, b in pairs)
    else:
        assert all(a >= b for a, b in pairs)
    assert min(p["start"], p["end"]) <= min(vs) and max(vs) <= max(p["start"], p["end"])


@settings(max_examples=100, deadline=None)
@given(curricula(), st.lists(st.floats(0.0, 1.0), min_size=2, max_size=20))
def test_curriculum_monotone_in_ramps(s: Curriculum, fracs: list[float]) -> None:
    p = s.params
    fracs = sorted(fracs)
    full = p["start"] + p["ramp"]
    up = [s(p["start"] + f * p["ramp"]) for f in fracs if f < 1.0]
    # Full value is reached at start + ramp, unless the task leaves at that very moment with no ramp_out.
    if p["stop"] is None or p["stop"] > full or p["ramp_out"] > 0:
        up.append(s(full))
        assert up[-1] == p["value"]
    assert all(a <= b for a, b in itertools.pairwise(up))
    assert all(v <= p["value"] for v in up)
    if p["stop"] is not None:
        down = [s(p["stop"] + f * p["ramp_out"]) for f in fracs] + [s(p["stop"] + p["ramp_out"])]
        assert all(a >= b for a, b in itertools.pairwise(down))
        assert down[-1] == 0.0


@settings(max_examples=100, deadline=None)
@given(schedules, schedules, st.floats(0.0, 10.0), st.lists(times, min_size=1, max_size=10))
def test_composition_is_product_of_values(a: Schedule, b: Schedule, k: float, ts: list[float]) -> None:
    ab, ka = a * b, k * a
    # An absolute floor for subnormal products: near 1e-323 a double has one or two significant bits, so the same
    # product rounded in another order (1.5e-323 against 2e-323) differs by 30% in relative terms.
    for t in ts:
        assert ab(t) == pytest.approx(a(t) * b(t), rel=1e-12, abs=1e-300)
        assert ka(t) == pytest.approx(k * a(t), rel=1e-12, abs=1e-300)


@settings(max_examples=60, deadline=None)
@given(schedules)
def test_round_trips_property(s: Schedule) -> None:
    assert from_config(json.loads(json.dumps(to_config(s)))) == s
    state = json.loads(json.dumps(s.state_dict()))
    back = from_state_dict(state)
    assert back == s and repr(back) == repr(s)
    s.load_state_dict(state)  # a schedule accepts its own state (and stays as it is)
    assert s == back
