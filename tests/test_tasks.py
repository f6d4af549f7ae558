"""Task: a built-in metric's direction is never silently put over the user's own."""

import pytest
import torch

import auxloss as al


@pytest.mark.parametrize("metric, higher", [("accuracy", True), ("binary_accuracy", True), ("mse", False),
                                            ("mae", False)])
def test_a_built_in_metric_sets_its_direction_when_none_is_given(metric, higher):
    assert al.Task("t", metric=metric).higher_is_better is higher
    assert al.Task("t", metric=metric, higher_is_better=higher).higher_is_better is higher  # agreeing: fine


def test_the_loss_picks_the_metric_and_with_it_the_direction():
    assert al.Task("t", loss="mse").higher_is_better is False  # metric "auto" -> mse, lower is better
    assert al.Task("t", loss="cross_entropy").higher_is_better is True  # -> accuracy


@pytest.mark.parametrize("metric, given", [("mse", True), ("accuracy", False), ("mae", True)])
def test_a_direction_contradicting_a_built_in_metric_is_an_error_not_an_override(metric, given):
    with pytest.raises(al.AuxLossError, match=rf"metric '{metric}' is (higher|lower) is better, but "
                                              rf"higher_is_better={given} was given"):
        al.Task("t", metric=metric, higher_is_better=given)


def test_a_callable_metric_keeps_the_users_direction_and_defaults_to_higher():
    def error_rate(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred.argmax(1) != target).float().mean()

    assert al.Task("t", metric=error_rate, higher_is_better=False).higher_is_better is False
    assert al.Task("t", metric=error_rate).higher_is_better is True
    assert al.Task("t", metric=None).higher_is_better is True
