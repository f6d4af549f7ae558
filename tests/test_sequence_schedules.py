"""ProgressiveDrop: Al-Rfou et al. 2018's schedule for intermediate-layer losses."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import auxloss as al
from auxloss import schedules as S


def test_each_layer_stops_at_fraction_times_l_over_n_of_training():
    # 4 layers, 1000 steps, the paper's fraction 1/2: layer l stops at l/8 of training.
    total, n = 1000, 4
    for layer, stop in zip((1, 2, 3, 4), (125.0, 250.0, 375.0, 500.0)):
        s = S.ProgressiveDrop(0.5, layer=layer, n_layers=n, total=total)
        assert s.stop == stop
        assert s(0) == 0.5
        assert s(math.nextafter(stop, 0)) == 0.5  # on until just before its stop
        assert s(stop) == 0.0 and s(total) == 0.0 and s(10 * total) == 0.0


def test_lower_layers_drop_first_and_all_are_gone_by_half_way():
    schedules = [S.ProgressiveDrop(1.0, layer=l, n_layers=6, total=600) for l in range(1, 6)]
    on = [[s(t) > 0 for s in schedules] for t in range(0, 601, 10)]
    for row in on:  # at any time the layers still on are the top ones
        assert row == sorted(row)
    assert all(not any(row) for t, row in zip(range(0, 601, 10), on) if t >= 300)
    # fraction=1 spreads the drops over the whole run: layer l stops at l/n.
    assert S.ProgressiveDrop(1.0, layer=5, n_layers=6, total=600, fraction=1.0).stop == 500.0


def test_epoch_unit_and_objective_integration():
    s = S.ProgressiveDrop(0.3, layer=1, n_layers=2, total=10, unit="epoch")  # stops at epoch 2.5
    assert s.value(step=10_000, epoch=2) == 0.3 and s.value(step=0, epoch=3) == 0.0
    objective = al.Objective(aux=[al.Task("l1", source="l1", weight=s)])
    objective.set_epoch(2)
    assert objective.weights() == {"l1": 0.3}
    objective.set_epoch(3)
    assert objective.weights() == {"l1": 0.0}


def test_config_round_trip_and_state_dict():
    s = S.ProgressiveDrop(0.5, layer=2, n_layers=4, total=1000, fraction=0.5, unit="step")
    cfg = S.to_config(s)
    assert cfg == {"type": "progressive_drop", "value": 0.5, "layer": 2, "n_layers": 4, "total": 1000,
                   "fraction": 0.5, "unit": "step"}
    assert S.from_config(cfg) == s
    assert S.from_config({"type": "ProgressiveDrop", "value": 1, "layer": 1, "n_layers": 2, "total": 50}).stop == 12.5
    back = S.from_state_dict(s.state_dict())
    assert back == s and back.stop == 250.0
    other = S.ProgressiveDrop(1.0, layer=1, n_layers=2, total=10)
    with pytest.raises(al.AuxLossError, match="the state was saved from ProgressiveDrop"):
        other.load_state_dict(s.state_dict())  # schedules are immutable: no swap in place
    assert other.stop == 2.5  # 0.5 · 10 · 1/2, as built
    assert repr(s) == "ProgressiveDrop(value=0.5, layer=2, n_layers=4, total=1000, fraction=0.5, unit='step')"
    assert s.bound == 0.5
    assert (S.Warmup(1.0, 10) * s)(5) == pytest.approx(0.25)  # composes like every schedule


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"value": -1.0, "layer": 1, "n_layers": 2, "total": 10}, "value"),
        ({"value": 1.0, "layer": 0, "n_layers": 2, "total": 10}, "layer"),
        ({"value": 1.0, "layer": 1.5, "n_layers": 2, "total": 10}, "layer"),
        ({"value": 1.0, "layer": 3, "n_layers": 2, "total": 10}, "above n_layers"),
        ({"value": 1.0, "layer": 1, "n_layers": True, "total": 10}, "n_layers"),
        ({"value": 1.0, "layer": 1, "n_layers": 2, "total": 0}, "total"),
        ({"value": 1.0, "layer": 1, "n_layers": 2, "total": 10, "fraction": 0.0}, "fraction"),
        ({"value": 1.0, "layer": 1, "n_layers": 2, "total": 10, "fraction": 1.5}, "fraction"),
        ({"value": 1.0, "layer": 1, "n_layers": 2, "total": 10, "unit": "epochs"}, "unit"),
    ],
)
def test_bad_arguments_raise_a_named_error(kwargs, needle):
    with pytest.raises(al.AuxLossError, match=needle):
        S.ProgressiveDrop(**kwargs)


def test_unknown_config_key_is_named():
    with pytest.raises(al.AuxLossError, match="n_layer"):
        S.from_config({"type": "progressive_drop", "value": 1, "layer": 1, "n_layer": 2, "total": 10})


@given(
    value=st.floats(0, 10),
    n=st.integers(1, 64),
    data=st.data(),
    total=st.integers(1, 10**6),
    fraction=st.floats(0.01, 1.0),
    t=st.floats(0, 2e6),
)
def test_property_a_single_drop_at_the_formula(value, n, data, total, fraction, t):
    layer = data.draw(st.integers(1, n))
    s = S.ProgressiveDrop(value, layer=layer, n_layers=n, total=total, fraction=fraction)
    expected = value if t < fraction * total * layer / n else 0.0
    assert s(t) == expected
    assert 0.0 <= s(t) <= s.bound
