"""The shared argument checks: what each accepts, what it returns, and the message for what it refuses."""

import math

import pytest

from auxloss import _checks as c
from auxloss.errors import AuxLossError


def test_positive_int_accepts_counts_and_names_the_owner_of_a_bad_one():
    assert c.positive_int("hidden", 3) == 3
    for bad in (0, -2, 1.0, True, "3", None):
        with pytest.raises(AuxLossError, match=rf"^MoE: hidden must be a positive integer, got {bad!r}\.$"):
            c.positive_int("hidden", bad, owner="MoE")
    with pytest.raises(AuxLossError, match=r"^segment must be a positive integer, got 0\.$"):
        c.positive_int("segment", 0)


def test_integer_takes_any_int_but_not_a_bool_or_float():
    assert c.integer("seed", -5) == -5
    for bad in (True, 1.0, "1"):
        with pytest.raises(AuxLossError, match="seed must be an integer"):
            c.integer("seed", bad)


def test_probability_is_half_open():
    assert c.probability("dropout", 0) == 0.0 and c.probability("dropout", 0.7) == 0.7
    for bad in (1.0, -0.1, math.nan, "0.5", None, True):
        with pytest.raises(AuxLossError, match=r"dropout must lie in \[0, 1\)"):
            c.probability("dropout", bad)


def test_positive_number_or_none():
    assert c.positive_number_or_none("capacity_factor", None) is None
    assert c.positive_number_or_none("capacity_factor", 1.25) == 1.25
    for bad in (0, -1.0, math.inf, math.nan, True, "2"):
        with pytest.raises(AuxLossError, match="capacity_factor must be a number > 0 or None"):
            c.positive_number_or_none("capacity_factor", bad, owner="MoE")


def test_weight_time_and_decay_factor_keep_their_types_and_say_how_to_fix():
    assert c.weight("Linear", "start", 1) == 1.0 and isinstance(c.weight("Linear", "start", 1), float)
    assert c.time_point("Linear", "begin", 100) == 100 and isinstance(c.time_point("Linear", "begin", 100), int)
    assert c.time_point("Cosine", "total", 0.5) == 0.5
    assert c.decay_factor("Exponential", 1) == 1.0
    with pytest.raises(AuxLossError, match=r"Constant: value must be finite and >= 0, got -0.3.*value=0.1"):
        c.weight("Constant", "value", -0.3)
    with pytest.raises(AuxLossError, match=r"Constant: value must be finite and >= 0, got inf"):
        c.weight("Constant", "value", 10**400)  # too large for a float: infinite, not an OverflowError
    with pytest.raises(AuxLossError, match=r"must be a number >= 0, got True \(bool\)"):
        c.weight("Constant", "value", True)
    with pytest.raises(AuxLossError, match=r"Linear: begin must be finite and >= 0.*begin=100"):
        c.time_point("Linear", "begin", -1)
    for bad in (0, 1.5, -0.5, math.nan):
        with pytest.raises(AuxLossError, match=r"Exponential: gamma must be a decay factor in \(0, 1\]"):
            c.decay_factor("Exponential", bad)


def test_int_at_least_names_the_type_or_suggests_the_fix():
    assert c.int_at_least("depth", 2) == 2 and c.int_at_least("eval_seeds", 0, 0, example="eval_seeds=3") == 0
    with pytest.raises(AuxLossError, match=r"^depth must be an integer >= 1, got True \(bool\)\.$"):
        c.int_at_least("depth", True)
    with pytest.raises(AuxLossError, match=r"^depth must be >= 1, got 0\.$"):
        c.int_at_least("depth", 0)
    for bad in (0, 2.0, True):
        with pytest.raises(AuxLossError, match=rf"^trials must be an integer >= 1, got {bad!r}; pass e\.g\. trials=20\.$"):
            c.int_at_least("trials", bad, example="trials=20")


def test_int_in_range_takes_numpy_integers_and_names_both_bounds():
    np = pytest.importorskip("numpy")
    value = c.int_in_range("n_shapes", np.int64(3), 2, 4)
    assert value == 3 and type(value) is int
    with pytest.raises(AuxLossError, match=r"^n_shapes must be between 2 and 4; got 5\.$"):
        c.int_in_range("n_shapes", 5, 2, 4)
    with pytest.raises(AuxLossError, match=r"^n must be >= 1; got 0\.$"):
        c.int_in_range("n", 0, 1)
    for bad in (True, 3.0, "3"):
        with pytest.raises(AuxLossError, match=r"^n must be an integer; got "):
            c.int_in_range("n", bad, 1)


def test_fractions_closed_open_and_half_open():
    assert c.unit_fraction("clutter", 0) == 0.0 and c.unit_fraction("clutter", 1) == 1.0
    with pytest.raises(AuxLossError, match=r"^clutter must be in \[0, 1\]; got 1\.5\.$"):
        c.unit_fraction("clutter", 1.5)
    with pytest.raises(AuxLossError, match=r"^clutter must be a number in \[0, 1\]; got None\.$"):
        c.unit_fraction("clutter", None)
    assert c.open_fraction("alpha", 0.05, example="0.05") == 0.05
    for bad in (0, 1, math.nan):
        with pytest.raises(AuxLossError, match=r"^alpha must lie strictly between 0 and 1, got .*E\.g\. use 0\.05\.$"):
            c.open_fraction("alpha", bad, example="0.05")
    assert c.fraction_below_one("dropout", 0) == 0.0
    for bad in (1, -0.1, True, "0.5"):
        with pytest.raises(AuxLossError, match=r"^dropout must be a number in \[0, 1\), got "):
            c.fraction_below_one("dropout", bad)


def test_finite_above_zero_and_positive_finite():
    assert c.finite_above_zero("width", 2) == 2.0
    for bad in (0, -1.0, math.inf, math.nan, True):
        with pytest.raises(AuxLossError, match=r"^width must be a finite number > 0, got "):
            c.finite_above_zero("width", bad)
    assert c.positive_finite("lr", 1) == 1.0 and c.positive_finite("lr", None, none_ok=True) is None
    assert c.positive_finite("momentum", 0, zero_ok=True) == 0.0
    with pytest.raises(AuxLossError, match=r"^AuxiLearn: momentum must be a non-negative finite number, got -1\.$"):
        c.positive_finite("momentum", -1, owner="AuxiLearn", zero_ok=True)
    with pytest.raises(AuxLossError, match=r"^lr must be a positive finite number or None, got 0\.$"):
        c.positive_finite("lr", 0, none_ok=True)
    for bad in (0, math.inf, True, None):
        with pytest.raises(AuxLossError, match=r"^lr must be a positive finite number, got "):
            c.positive_finite("lr", bad)
