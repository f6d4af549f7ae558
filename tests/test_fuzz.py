"""Fuzzing with Hypothesis: bad input gives a valid object or an AuxLossError, never another exception, never NaN.

- the config schema: random documents, mutations of a valid config (a key dropped, a value replaced by anything,
  an unknown key added) and random edits of the YAML text, with and without command-line overrides;
- the schedules: every class with random arguments, evaluated at random steps and epochs, and from_config;
- every weighting strategy: random losses and gradients, extreme magnitudes included, over several steps.

Each property runs ~50 cases in the normal suite and thousands under ``-m slow`` (``make test-all``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import auxloss as al
from auxloss import schedules as S
from auxloss.errors import AuxLossError
from auxloss.experiment.config import ExperimentConfig, load_config, parse_config

FAST = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# derandomize=False whatever the profile (tests/conftest.py): the slow fuzz exists to find new cases each run.
SLOW = settings(max_examples=3000, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fast_and_slow(*strategies, slow_examples=3000):
    """The property as two tests: ``<name>`` (50 cases) and ``<name>_many`` (thousands, marked slow)."""
    def wrap(fn):
        fast = FAST(given(*strategies)(fn))
        many = pytest.mark.slow(settings(SLOW, max_examples=slow_examples)(given(*strategies)(fn)))
        globals()[fn.__name__ + "_many"] = many
        return fast
    return wrap


# -- values of any kind ------------------------------------------------------------------------------------------
numbers = st.one_of(
    st.integers(-10, 10), st.integers(-2**70, 2**70), st.integers(-10**400, 10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-320, 5e-324, 1e308, -1e308, 0.5, 1.0, 100.0]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=10), st.integers(-3, 3)), inner, max_size=4)),
    max_leaves=12,
)

VALID = {
    "name": "fuzz",
    "seeds": 2,
    "data": {"name": "shapes", "n_train": 48, "n_val": 32, "n_test": 32, "batch_size": 16,
             "params": {"image_size": 16}},
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "main": {"target": "target", "loss": "cross_entropy"},
    "train": {"epochs": 2, "lr": 0.01, "lr_schedule": "cosine", "grad_clip": 1.0, "patience": 2},
    "variants": [
        {"name": "deep", "taps": {"aux1": {"layer": "block1", "head": {"type": "linear"}}},
         "tasks": [{"name": "aux1", "source": "aux1", "weight": 0.3}]},
        {"name": "colour", "taps": {"c": {"layer": "block2", "head": {"type": "mlp", "params": {"hidden": [8]}},
                                          "select": None, "detach": False}},
         "tasks": [{"name": "colour", "source": "c", "target": "colour",
                    "weight": {"type": "curriculum", "value": 0.5, "start": 2, "ramp": 2}}],
         "weighting": {"type": "dwa"}, "train": {"lr": 0.02}},
    ],
    "alpha": 0.05,
}

KEYS = ["name", "seeds", "data", "model", "main", "train", "variants", "alpha", "n_train", "lr", "epochs", "taps",
        "tasks", "weight", "source", "layer", "head", "type", "out", "params", "unknown", "0"]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_configs(draw):
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(anything)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(anything)
        else:
            parent.append(draw(anything))
    return data


def check_config(data):
    try:
        cfg = parse_config(data)
    except AuxLossError as exc:
        assert str(exc).startswith("invalid config") or "mapping" in str(exc), str(exc)
        return
    assert isinstance(cfg, ExperimentConfig)
    from auxloss.experiment.runner import config_hash

    assert len(config_hash(cfg)) == 16  # what the runner does first with a valid config
    # the resolved config that the runner writes to config.yaml, and `auxloss report` reads back, reloads as it was
    dumped = cfg.model_dump(mode="json")
    again = parse_config(yaml.safe_load(yaml.safe_dump(dumped, sort_keys=False)))
    assert json.dumps(again.model_dump(mode="json"), sort_keys=True) == json.dumps(dumped, sort_keys=True)


@fast_and_slow(anything)
def test_any_document_is_a_config_or_an_auxloss_error(data):
    check_config(data)


@fast_and_slow(mutated_configs())
def test_a_mutated_config_is_a_config_or_an_auxloss_error(data):
    check_config(data)


VALID_YAML = """\
name: fuzz
seeds: 2
data: {name: shapes, n_train: 48, n_val: 32, n_test: 32, batch_size: 16, params: {image_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train:
  epochs: 2
  lr: 0.01
variants:
  - name: deep
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: 0.3}]
"""
EDIT_CHARS = st.sampled_from(list(":{}[],-#&*!|>'\"%@` \n\t.0123456789abcxyz") + ["\x00", "\ufeff", "é", "!!python/object"])


@st.composite
def edited_yaml(draw):
    text = VALID_YAML
    for _ in range(draw(st.integers(1, 5))):
        i = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(EDIT_CHARS)
        if kind == "insert":
            text = text[:i] + piece + text[i:]
        elif kind == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 8)):]
        else:
            text = text[:i] + piece + text[i + 1:]
    return text


@fast_and_slow(edited_yaml(), st.sampled_from([{}, {"seeds": 3}, {"train.compile": True}, {"data.n_train.x": 1}]),
               slow_examples=2000)
def test_an_edited_yaml_file_loads_or_gives_an_auxloss_error(text, overrides):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            cfg = load_config(path, overrides)
        except AuxLossError:
            return
        assert isinstance(cfg, ExperimentConfig)


# -- schedules ---------------------------------------------------------------------------------------------------
times = st.one_of(st.integers(0, 10**6), st.floats(0, 1e6), numbers)
weights = st.one_of(st.floats(0, 2), numbers)
units = st.sampled_from(["step", "epoch", "steps", None, 3])


@st.composite
def schedules(draw, depth=0):
    kind = draw(st.sampled_from(["constant", "linear", "cosine", "step", "exponential", "decay", "warmup",
                                 "curriculum", "piecewise", "product"] if depth < 2 else ["constant", "linear"]))
    unit = draw(st.one_of(st.just("step"), units))
    if kind == "constant":
        return S.Constant(draw(weights))
    if kind == "linear":
        return S.Linear(draw(weights), draw(weights), draw(times), draw(times), unit=unit)
    if kind == "cosine":
        return S.Cosine(draw(weights), draw(weights), draw(times), draw(times), unit=unit)
    if kind == "step":
        return S.Step(draw(weights), draw(st.lists(times, max_size=4)), draw(st.one_of(st.floats(0, 3), numbers)),
                      unit=unit)
    if kind == "exponential":
        return S.Exponential(draw(weights), draw(st.one_of(st.floats(0, 1), numbers)), draw(times), unit=unit)
    if kind == "decay":
        return S.DecayToThreshold(draw(weights), draw(st.one_of(st.floats(0, 1), numbers)), draw(weights),
                                  draw(times), unit=unit)
    if kind == "warmup":
        target = draw(st.one_of(weights, schedules(depth + 1)))
        return S.Warmup(target, draw(times), unit=unit)
    if kind == "curriculum":
        return S.Curriculum(draw(weights), draw(times), draw(times), draw(st.one_of(st.none(), times)), draw(times),
                            unit=unit)
    if kind == "piecewise":
        return S.Piecewise(draw(st.lists(st.tuples(times, weights), min_size=0, max_size=4)), unit=unit)
    return S.Product(draw(st.lists(st.one_of(weights, schedules(depth + 1)), min_size=0, max_size=3)))


@st.composite
def built_schedules(draw):
    """A schedule, or the AuxLossError its arguments gave."""
    try:
        return draw(schedules())
    except AuxLossError as exc:
        return exc


def check_value(schedule, step, epoch):
    try:
        v = schedule.value(step=step, epoch=epoch)
    except AuxLossError:
        return
    assert isinstance(v, float) and math.isfinite(v) and v >= 0, (schedule, step, epoch, v)
    assert v <= schedule.bound * (1 + 1e-9) + 1e-300, (schedule, v)


@fast_and_slow(built_schedules(), st.lists(st.tuples(times, times), min_size=1, max_size=6))
def test_a_schedule_is_finite_and_non_negative_or_an_auxloss_error(schedule, points):
    if isinstance(schedule, AuxLossError):
        return
    for step, epoch in points:
        check_value(schedule, step, epoch)
        try:
            raw = schedule(step)
        except AuxLossError:
            continue
        assert math.isfinite(raw) and raw >= 0
    again = S.from_config(S.to_config(schedule))  # the config round trip rebuilds an equal schedule
    assert again == schedule
    fresh = copy.deepcopy(schedule)
    fresh.load_state_dict(schedule.state_dict())
    assert fresh == schedule


@fast_and_slow(st.dictionaries(st.sampled_from(["type", "value", "start", "end", "begin", "stop", "total", "gamma",
                                                "milestones", "threshold", "ramp", "ramp_out", "points", "target",
                                                "factors", "steps", "unit", "begn"]),
                               st.one_of(anything, st.sampled_from(["linear", "Cosine", "step", "warmup", "curriculum",
                                                                    "piecewise", "product", "decay_to_threshold"])),
                               max_size=6),
               times)
def test_from_config_builds_a_schedule_or_gives_an_auxloss_error(config, step):
    try:
        schedule = S.from_config(config)
    except AuxLossError:
        return
    check_value(schedule, step, step)


# -- weightings --------------------------------------------------------------------------------------------------
magnitudes = st.one_of(st.floats(-1e30, 1e30), st.sampled_from([0.0, 1e-30, -1e-30, 1e-300, 1e30, -1e30, 1e-7]),
                       st.floats(-3, 3))
loss_values = st.one_of(st.floats(0, 1e30), st.sampled_from([0.0, 1e-300, 1e-30, 1e30, 1e300, math.nan, math.inf]))


def _float(value):
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _finite(value):
    return math.isfinite(_float(value))


def loss_strategies():
    from auxloss.weighting.dwa import DWA
    from auxloss.weighting.progress import MainProgress
    from auxloss.weighting.uncertainty import Uncertainty

    return {
        "dwa": lambda d: DWA(d.draw(st.floats(1e-3, 1e3))),
        "uncertainty": lambda d: Uncertainty(d.draw(st.floats(-30, 30))),
        "main_progress": lambda d: MainProgress(start=0.1, step=d.draw(st.floats(1e-3, 1.0)),
                                                mode=d.draw(st.sampled_from(["additive", "multiplicative"]))),
    }


@fast_and_slow(st.sampled_from(["dwa", "uncertainty", "main_progress", "gradnorm"]), st.integers(1, 3), st.data(),
               slow_examples=1500)
def test_loss_weightings_stay_finite_whatever_the_losses(kind, k, data):
    """Multipliers finite and >= 0 on every step; a non-finite loss (skipped by the objective) poisons nothing."""
    aux = [f"aux{i}" for i in range(k)]
    params = None
    if kind == "gradnorm":
        from auxloss.weighting.gradnorm import GradNorm

        W = nn.Parameter(torch.ones(3, dtype=torch.float64))
        weighting = GradNorm(alpha=data.draw(st.floats(0, 3)), lr=data.draw(st.floats(0, 1)), params=[W])
        params = W
    else:
        weighting = loss_strategies()[kind](data)
    weighting.bind("main", aux)
    for epoch in range(1, data.draw(st.integers(1, 4)) + 1):
        for _ in range(data.draw(st.integers(1, 3))):
            raw = {n: data.draw(loss_values) for n in ["main", *aux]}
            if params is not None:
                scale = {n: data.draw(magnitudes) for n in raw}
                losses = {n: (params * scale[n]).sum() * 0 + torch.tensor(v, dtype=torch.float64)
                          for n, v in raw.items()}
            else:
                losses = {n: torch.tensor(v, dtype=torch.float64) for n, v in raw.items()}
            m = weighting.multipliers(losses, step=0, epoch=epoch)
            assert list(m) == aux
            for v in m.values():
                assert _finite(v) and _float(v) >= 0, (kind, raw, m)
        weighting.on_epoch_end(epoch)
        weighting.on_validation_end({"val/metric/main": data.draw(st.one_of(st.floats(0, 1), loss_values))},
                                    higher_is_better=data.draw(st.booleans()))
        for value in weighting.telemetry().values():
            assert not math.isnan(value) or kind == "gradnorm", (kind, weighting.telemetry())


def gradient_strategy(kind, data):
    from auxloss.weighting.gating import CosineGating
    from auxloss.weighting.metabalance import MetaBalance
    from auxloss.weighting.olaux import OLAux
    from auxloss.weighting.projection import Projection

    mode = data.draw(st.sampled_from(["exact", "amortized"]))
    every = data.draw(st.integers(1, 3))
    if kind == "gating":
        return CosineGating(data.draw(st.booleans()), mode=mode, every=every)
    if kind == "projection":
        return Projection(mode=mode, every=every)
    if kind == "olaux":
        return OLAux(beta=data.draw(st.floats(1e-3, 10)), lr=data.draw(st.floats(1e-4, 1)),
                     horizon=data.draw(st.integers(1, 3)), mode=mode, every=every)
    return MetaBalance(relax=data.draw(st.floats(0, 1)), beta=data.draw(st.floats(0, 0.99)),
                       adapt=data.draw(st.sampled_from(["both", "shrink", "enlarge"])), mode=mode, every=every)


@fast_and_slow(st.sampled_from(["gating", "projection", "olaux", "metabalance"]), st.integers(1, 3),
               st.sampled_from([torch.float32, torch.float64]), st.data(), slow_examples=1500)
def test_gradient_weightings_write_finite_gradients_whatever_the_magnitudes(kind, k, dtype, data):
    """Per-task gradients of any magnitude: the update written to .grad is finite whenever the plain weighted sum
    of the same gradients is (else the objective or the trainer's gradient check names the step)."""
    d = data.draw(st.integers(1, 4))
    W = nn.Parameter(torch.ones(d, dtype=dtype))
    heads = nn.ParameterList([nn.Parameter(torch.ones((), dtype=dtype)) for _ in range(k)])
    vec = st.lists(st.one_of(st.floats(-1, 1), st.just(0.0)), min_size=d, max_size=d)
    weighting = gradient_strategy(kind, data)
    tasks = [al.Task(f"aux{i}", loss=lambda p, t: p, metric=None, weight=data.draw(st.floats(0, 2)))
             for i in range(k)]
    objective = al.Objective(al.Task("main", loss=lambda p, t: p, metric=None), tasks, weighting=weighting)
    for step in range(data.draw(st.integers(1, 3))):
        u = [torch.tensor(data.draw(vec), dtype=dtype) for _ in range(k + 1)]
        s = [data.draw(magnitudes) for _ in range(k + 1)]
        losses = {"main": s[0] * (W * u[0]).sum()}
        for i in range(k):
            losses[f"aux{i}"] = s[i + 1] * (W * u[i + 1]).sum() * heads[i]
        W.grad = None
        for h in heads:
            h.grad = None
        try:
            report = _report(objective, losses)
        except AuxLossError:
            event("the objective refused a non-finite total")
            return
        plain = torch.autograd.grad(sum(report.weights[n] * losses[n] for n in losses), [W, *heads],
                                    allow_unused=True, retain_graph=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                objective.backward(report)
        except AuxLossError:
            event("the strategy raised AuxLossError")
            return
        if not all(g is None or bool(torch.isfinite(g).all()) for g in plain):
            event("the plain weighted sum overflows too")
            return  # nothing finite to write
        for p in [W, *heads]:
            assert p.grad is None or bool(torch.isfinite(p.grad).all()), (kind, s, u, p.grad)
        for name, value in weighting.telemetry().items():
            assert math.isfinite(value) or name.startswith("normratio/"), (kind, name, value)
        objective.advance()
    event("every step checked finite")


def _report(objective, losses):
    from auxloss.objective import LossReport

    weights = objective.weights()
    total = losses["main"] + sum(weights[n] * losses[n] for n in weights)
    report = LossReport(total=total, losses=losses, weights={"main": 1.0, **weights}, metrics={},
                        step=objective.step, batch_size=1)
    objective._check_finite(report)
    return report


def test_metabalance_after_its_moving_average_decayed_to_almost_zero_writes_no_nan():
    """Found by the fuzzer: m_k ~ 1e-166 and g_k = 0 gave f ~ 1e166, inf in float32, and inf·0 = NaN in .grad."""
    from auxloss.weighting.metabalance import MetaBalance

    W = nn.Parameter(torch.ones(4))
    head = nn.Parameter(torch.ones(()))
    weighting = MetaBalance(relax=1.0, beta=3.4e-166)
    objective = al.Objective(al.Task("main", loss=lambda p, t: p, metric=None),
                             [al.Task("aux0", loss=lambda p, t: p, metric=None)], weighting=weighting)
    e = torch.eye(4)
    for u0, uk in ((torch.zeros(4), e[2]), (e[0], torch.zeros(4))):  # g_k: a step with a gradient, then 0
        losses = {"main": (W * u0).sum(), "aux0": (W * uk).sum() * head}
        W.grad = head.grad = None
        objective.backward(_report(objective, losses))
        assert bool(torch.isfinite(W.grad).all()), W.grad
        objective.advance()


def test_hypothesis_profiles_derandomize_ci_but_not_the_slow_fuzz():
    # tests/conftest.py: CI (CI=true) and `make test` (HYPOTHESIS_PROFILE=ci) replay the same cases every run.
    profile = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI", "").lower() == "true" else "dev")
    assert settings.default.derandomize is (profile == "ci")
    assert settings.get_profile("ci").derandomize is True
    assert SLOW.derandomize is False and FAST.derandomize is True
