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
