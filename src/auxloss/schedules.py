"""Weight schedules: the weight λ(t) of one auxiliary task as a pure function of training time t.

An objective is ``L_total = L_main + Σ_i λ_i(t) · L_aux_i``; a schedule gives one ``λ_i``. Here ``t`` is
the optimizer step count or the epoch, whichever the schedule's ``unit`` says (``"step"`` by default).

The caller (an Objective) passes both counters and each schedule picks its own::

    lam = schedule.value(step=global_step, epoch=epoch)

and ``schedule(t)`` evaluates at a raw ``t`` in the schedule's own unit.

Every schedule

* validates its arguments when built, raising :class:`~auxloss.errors.AuxLossError` that names the
  argument and says how to fix it, so a bad config fails at start-up and not 10 000 steps in;
* returns a Python ``float`` that is finite and ``>= 0`` for every finite ``t``;
* is a pure function of ``t``: it holds no counters, so resuming from a checkpoint is exact as long as
  the caller restores its own step and epoch. ``state_dict()`` saves the hyperparameters, so a checkpoint
  also pins *which* schedule was used: ``load_state_dict()`` checks that it is this one (it never changes
  the schedule), and :func:`from_state_dict` builds the schedule a state describes;
* is immutable: no method changes it after construction, so it can be shared, hashed and used as a key;
* composes: ``a * b`` is the pointwise product (e.g. ``Warmup(1.0, 500) * Cosine(1.0, 0.0, 10_000)``)
  and ``0.3 * a`` scales ``a``;
* round-trips through plain dicts: ``from_config(to_config(s)) == s``.
"""

from __future__ import annotations

import abc
import bisect
import inspect
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from auxloss._checks import as_float as _float
from auxloss._checks import decay_factor as _gamma
from auxloss._checks import is_number as _is_number
from auxloss._checks import time_point as _time
from auxloss._checks import weight as _weight
from auxloss.errors import AuxLossError, close_matches

__all__ = [
    "Constant",
    "Cosine",
    "Curriculum",
    "DecayToThreshold",
    "Exponential",
    "Linear",
    "Piecewise",
    "Product",
    "ProgressiveDrop",
    "Schedule",
    "Step",
    "Unit",
    "Warmup",
    "as_schedule",
    "from_config",
    "from_state_dict",
    "to_config",
]

Unit = Literal["step", "epoch"]
_UNITS: tuple[str, ...] = ("step", "epoch")

# Time points (begin, stop, milestones, ...) keep the type they were given: an ``int`` step stays an
# ``int`` in reprs and configs, while a fractional epoch such as 0.5 stays a ``float``.
Time = int | float


# ----------------------------------------------------------------------------------------------------
# Argument checks (shared ones in auxloss._checks). Each takes the owner's name so the message says *where*
# the bad value went.
# ----------------------------------------------------------------------------------------------------


def _unit(owner: str, x: object) -> Unit:
    if x not in _UNITS:
        hint = close_matches(str(x), _UNITS)
        did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
        raise AuxLossError(
            f"{owner}: unit must be 'step' (count optimizer steps) or 'epoch' (count epochs), "
            f"got {x!r}.{did_you_mean}"
        )
    return x  # type: ignore[return-value]


def _lerp(a: float, b: float, frac: float) -> float:
    """``a + (b - a)·frac``, clamped to [min(a, b), max(a, b)].

    Rounding can put ``a + (b - a)`` a hair past ``b``; the clamp keeps a ramp monotone all the way into
    its flat end, and keeps the result ``>= 0`` when both ends are.
    """
    v = a + (b - a) * frac
    lo, hi = (a, b) if a <= b else (b, a)
    return lo if v < lo else min(v, hi)


# ----------------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------------


class Schedule(abc.ABC):
    """A weight λ(t) >= 0 for one auxiliary task, a pure function of the step or epoch ``t``.

    Subclasses implement :meth:`_value` (the formula, given a validated finite ``t``), :meth:`_params`
    (the constructor arguments, in order, under their constructor names) and :attr:`bound`.
    """

    _unit: Unit = "step"

    # -- to implement ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def _value(self, t: float) -> float:
        """λ(t) for a finite ``t`` in this schedule's unit."""

    @abc.abstractmethod
    def _params(self) -> dict[str, Any]:
        """The constructor arguments, keyed by their names; ``type(self)(**_params())`` rebuilds it."""

    @property
    @abc.abstractmethod
    def bound(self) -> float:
        """An upper bound on λ(t) over all t (exact for every schedule but :class:`Product`)."""

    # -- evaluation -----------------------------------------------------------------------------------

    @property
    def unit(self) -> Unit:
        """Whether ``t`` counts optimizer steps (``"step"``) or epochs (``"epoch"``)."""
        return self._unit

    @property
    def units(self) -> frozenset[str]:
        """Every unit this schedule reads (empty for :class:`Constant`, maybe two for a product)."""
        return frozenset((self._unit,))

    @property
    def params(self) -> dict[str, Any]:
        """A copy of the constructor arguments; schedules are immutable, so change a copy instead."""
        return self._params()

    def __call__(self, t: float) -> float:
        """λ(t) at a raw ``t`` given in this schedule's unit."""
        return self._value(self._check_t(t))

    def _check_t(self, t: object) -> float:
        if not _is_number(t) or not math.isfinite(_float(t)):
            raise AuxLossError(
                f"{self!r}: t must be a finite number (the {self._unit} count), got {t!r}; "
                f"pass an int or float (call .item() on a tensor)."
            )
        return float(t)  # type: ignore[arg-type]

    def value(self, *, step: float | None = None, epoch: float | None = None) -> float:
        """λ at the current training time; the schedule reads ``step`` or ``epoch`` per its unit."""
        return self(self._pick(step, epoch))

    def is_active(self, t: float) -> bool:
        """Whether the task is on at ``t`` (λ(t) > 0), so a caller can skip computing its loss."""
        return self(t) > 0.0

    def _pick(self, step: float | None, epoch: float | None) -> float:
        t = step if self._unit == "step" else epoch
        if t is None:
            other = "epoch" if self._unit == "step" else "step"
            raise AuxLossError(
                f"{self!r} counts {self._unit}s but value() got no {self._unit}; pass "
                f"{self._unit}=..., or build the schedule with unit={other!r} to count {other}s."
            )
        return t

    # -- composition ----------------------------------------------------------------------------------

    def __mul__(self, other: object) -> Product:
        if isinstance(other, Schedule) or _is_number(other):
            return Product([self, as_schedule(other)])  # type: ignore[arg-type]
        return NotImplemented

    def __rmul__(self, other: object) -> Product:
        if _is_number(other):
            return Product([as_schedule(other), self])  # type: ignore[arg-type]
        return NotImplemented

    # -- persistence ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"class": <class name>, "params": {...}}`` with nested schedules as their own state dicts.

        Schedules hold no mutable state (they are pure in ``t``), so the hyperparameters are the whole
        state; the caller saves its step and epoch counters next to this.
        """
        return {"class": type(self).__name__, "params": _plain(self._params(), _state_of)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check that ``state`` (from :meth:`state_dict`) describes this very schedule; change nothing.

        Schedules are immutable, so loading cannot turn this one into another: a checkpoint written with a
        different schedule is an error that shows both, rather than a silent swap of the run's configured
        schedule. To continue with the checkpoint's schedule, build it with :func:`from_state_dict`.
        """
        saved = _from_state(state, expect=type(self))
        if saved != self:
            raise AuxLossError(
                f"load_state_dict: the state was saved from {saved!r}, but this schedule is {self!r}; schedules "
                "are immutable, so it is not changed in place. Build the saved one with "
                "auxloss.schedules.from_state_dict(state), or resume with the schedule the state was saved from."
            )

    # -- dunder ---------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._params() == other._params()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        # Hash the params, not the repr, so that equal schedules (begin=100 vs begin=100.0) hash equal.
        return hash((type(self).__name__, tuple(self._params().items())))


# ----------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------


class Constant(Schedule):
    """λ(t) = value for every t. Reads no counter, so ``value()`` needs neither ``step`` nor ``epoch``."""

    def __init__(self, value: float) -> None:
        self._weight = _weight("Constant", "value", value)

    def _value(self, t: float) -> float:
        return self._weight

    def value(self, *, step: float | None = None, epoch: float | None = None) -> float:
        return self._weight

    def _params(self) -> dict[str, Any]:
        return {"value": self._weight}

    @property
    def units(self) -> frozenset[str]:
        return frozenset()

    @property
    def bound(self) -> float:
        return self._weight


class Linear(Schedule):
    """Linear ramp from ``start`` to ``end`` between t = ``begin`` and t = ``stop``::

        λ(t) = start                                           t <= begin
               start + (end − start)·(t − begin)/(stop − begin)  begin < t < stop
               end                                             t >= stop

    ``begin == stop`` is a jump from ``start`` to ``end`` at that t.
    """

    def __init__(self, start: float, end: float, begin: Time, stop: Time, unit: Unit = "step") -> None:
        self._start = _weight("Linear", "start", start)
        self._end = _weight("Linear", "end", end)
        self._begin = _time("Linear", "begin", begin)
        self._stop = _time("Linear", "stop", stop)
        self._unit = _unit("Linear", unit)
        if self._begin > self._stop:
            raise AuxLossError(
                f"Linear: begin ({self._begin}) is after stop ({self._stop}); the ramp must begin before "
                f"it stops. Swap them, or swap start and end to ramp the other way."
            )

    def _value(self, t: float) -> float:
        if t >= self._stop:
            return self._end
        if t <= self._begin:
            return self._start
        return _lerp(self._start, self._end, (t - self._begin) / (self._stop - self._begin))

    def _params(self) -> dict[str, Any]:
        return {
            "start": self._start,
            "end": self._end,
            "begin": self._begin,
            "stop": self._stop,
            "unit": self._unit,
        }

    @property
    def bound(self) -> float:
        return max(self._start, self._end)


class Cosine(Schedule):
    """Half-cosine from ``start`` to ``end`` over [begin, begin + total], flat outside::

        λ(t) = end + (start − end)·(1 + cos(π·(t − begin)/total))/2   for begin <= t <= begin + total

    ``start`` before ``begin`` and ``end`` after ``begin + total``; the midpoint is (start + end)/2.
    """

    def __init__(self, start: float, end: float, total: Time, begin: Time = 0, unit: Unit = "step") -> None:
        self._start = _weight("Cosine", "start", start)
        self._end = _weight("Cosine", "end", end)
        self._total = _time("Cosine", "total", total)
        self._begin = _time("Cosine", "begin", begin)
        self._unit = _unit("Cosine", unit)
        if self._total <= 0:
            raise AuxLossError(
                f"Cosine: total must be > 0 (the length of the cosine), got {self._total!r}; for a jump "
                f"use Step or Linear with begin == stop."
            )

    def _value(self, t: float) -> float:
        if t <= self._begin:
            return self._start
        if t >= self._begin + self._total:
            return self._end
        frac = (1.0 - math.cos(math.pi * (t - self._begin) / self._total)) / 2.0
        return _lerp(self._start, self._end, frac)

    def _params(self) -> dict[str, Any]:
        return {
            "start": self._start,
            "end": self._end,
            "total": self._total,
            "begin": self._begin,
            "unit": self._unit,
        }

    @property
    def bound(self) -> float:
        return max(self._start, self._end)


class Step(Schedule):
    """Piecewise constant, multiplied by ``gamma`` at each milestone::

        λ(t) = value · gamma^k,   k = #{m in milestones : m <= t}

    so at t equal to a milestone the new value already holds.
    """

    def __init__(
        self, value: float, milestones: Sequence[Time], gamma: float = 0.1, unit: Unit = "step"
    ) -> None:
        self._weight = _weight("Step", "value", value)
        self._unit = _unit("Step", unit)
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise AuxLossError(
                f"Step: milestones must be a list of step or epoch counts, got {milestones!r}; "
                f"pass e.g. milestones=[1000, 2000]."
            )
        self._milestones = tuple(_time("Step", f"milestones[{i}]", m) for i, m in enumerate(milestones))
        for i in range(1, len(self._milestones)):
            if self._milestones[i] <= self._milestones[i - 1]:
                raise AuxLossError(
                    f"Step: milestones must be strictly increasing, but milestones[{i}] = "
                    f"{self._milestones[i]} follows {self._milestones[i - 1]}; sort them and drop "
                    f"duplicates (a repeated milestone would be the same as gamma squared)."
                )
        if not _is_number(gamma) or not math.isfinite(_float(gamma)) or gamma < 0:
            raise AuxLossError(
                f"Step: gamma must be a finite number >= 0 (the factor applied at each milestone), got "
                f"{gamma!r}; use gamma=0.1 to divide by 10 at each milestone."
            )
        self._gamma = float(gamma)
        # Check the largest value now, so that a gamma > 1 that would overflow fails here, not mid-run.
        try:
            self._bound = self._weight * max(1.0, self._gamma ** len(self._milestones))
        except OverflowError:
            self._bound = math.inf
        if not math.isfinite(self._bound):
            raise AuxLossError(
                f"Step: value·gamma^{len(self._milestones)} overflows a float (gamma={self._gamma!r}); "
                f"use a smaller gamma or fewer milestones."
            )

    def _value(self, t: float) -> float:
        return self._weight * self._gamma ** bisect.bisect_right(self._milestones, t)

    def _params(self) -> dict[str, Any]:
        return {
            "value": self._weight,
            "milestones": self._milestones,
            "gamma": self._gamma,
            "unit": self._unit,
        }

    @property
    def bound(self) -> float:
        return self._bound


class Exponential(Schedule):
    """Exponential decay after ``begin``::

    λ(t) = value                         t <= begin
           value · gamma^(t − begin)     t > begin,   gamma in (0, 1]
    """

    def __init__(self, value: float, gamma: float, begin: Time = 0, unit: Unit = "step") -> None:
        self._weight = _weight("Exponential", "value", value)
        self._gamma = _gamma("Exponential", gamma)
        self._begin = _time("Exponential", "begin", begin)
        self._unit = _unit("Exponential", unit)

    def _value(self, t: float) -> float:
        if t <= self._begin:
            return self._weight
        # gamma <= 1 and a positive exponent: no overflow; a long run underflows to 0.0, which is fine.
        return self._weight * self._gamma ** (t - self._begin)

    def _params(self) -> dict[str, Any]:
        return {"value": self._weight, "gamma": self._gamma, "begin": self._begin, "unit": self._unit}

    @property
    def bound(self) -> float:
        return self._weight


class DecayToThreshold(Schedule):
    """Deeply-Supervised-Nets style: decay exponentially, and switch off for good below ``threshold``::

        d(t) = value · gamma^max(0, t − begin)
        λ(t) = d(t)   if d(t) >= threshold
               0      otherwise

    Since d is non-increasing, once the task is off it stays off.
    """

    def __init__(
        self, value: float, gamma: float, threshold: float, begin: Time = 0, unit: Unit = "step"
    ) -> None:
        self._weight = _weight("DecayToThreshold", "value", value)
        self._gamma = _gamma("DecayToThreshold", gamma)
        self._threshold = _weight("DecayToThreshold", "threshold", threshold)
        self._begin = _time("DecayToThreshold", "begin", begin)
        self._unit = _unit("DecayToThreshold", unit)
        if self._threshold > self._weight:
            raise AuxLossError(
                f"DecayToThreshold: threshold ({self._threshold}) is above value ({self._weight}), so "
                f"the task would be off from the start; use a threshold below value (e.g. value/100)."
            )

    def _value(self, t: float) -> float:
        d = self._weight if t <= self._begin else self._weight * self._gamma ** (t - self._begin)
        return d if d >= self._threshold else 0.0

    def _params(self) -> dict[str, Any]:
        return {
            "value": self._weight,
            "gamma": self._gamma,
            "threshold": self._threshold,
            "begin": self._begin,
            "unit": self._unit,
        }

    @property
    def bound(self) -> float:
        return self._weight


class Warmup(Schedule):
    """A linear 0 → 1 multiplier over the first ``steps`` (of this schedule's unit), times ``target``::

        λ(t) = min(1, max(0, t / steps)) · target(t)       (steps = 0: no warmup, λ = target)

    ``target`` is a schedule or a float; a target schedule reads its own unit in :meth:`value`.
    """

    def __init__(self, target: Schedule | float, steps: Time, unit: Unit = "step") -> None:
        if not isinstance(target, Schedule) and not _is_number(target):
            raise AuxLossError(
                f"Warmup: target must be a Schedule or a float, got {target!r} ({type(target).__name__}); "
                f"pass e.g. target=1.0 or target=Cosine(1.0, 0.0, total=10000)."
            )
        self._target = as_schedule(target)
        self._steps = _time("Warmup", "steps", steps)
        self._unit = _unit("Warmup", unit)

    def _ramp(self, t: float) -> float:
        if t >= self._steps:
            return 1.0
        return 0.0 if t <= 0 else t / self._steps

    def _value(self, t: float) -> float:
        _one_unit(self)
        return self._ramp(t) * self._target._value(t)

    def value(self, *, step: float | None = None, epoch: float | None = None) -> float:
        # The ramp reads this schedule's unit, the target reads its own.
        ramp = self._ramp(self._check_t(self._pick(step, epoch)))
        return ramp * self._target.value(step=step, epoch=epoch)

    def _params(self) -> dict[str, Any]:
        return {"target": self._target, "steps": self._steps, "unit": self._unit}

    @property
    def units(self) -> frozenset[str]:
        return frozenset((self._unit,)) | self._target.units

    @property
    def bound(self) -> float:
        return self._target.bound


class Curriculum(Schedule):
    """A task that enters, holds and (optionally) leaves::

        λ(t) = 0                                   t < start                       (not yet on)
               value · (t − start)/ramp            start <= t < start + ramp       (entering)
               value                               start + ramp <= t < stop        (on)
               value · (1 − (t − stop)/ramp_out)   stop <= t < stop + ramp_out     (leaving)
               0                                   t >= stop + ramp_out            (off for good)

    ``stop=None`` keeps the task on forever. Leaving late in training is how deep supervision is
    usually switched off once the auxiliary heads have done their job.
    """

    def __init__(
        self,
        value: float,
        start: Time = 0,
        ramp: Time = 0,
        stop: Time | None = None,
        ramp_out: Time = 0,
        unit: Unit = "step",
    ) -> None:
        self._weight = _weight("Curriculum", "value", value)
        self._start = _time("Curriculum", "start", start)
        self._ramp_in = _time("Curriculum", "ramp", ramp)
        self._stop = None if stop is None else _time("Curriculum", "stop", stop)
        self._ramp_out = _time("Curriculum", "ramp_out", ramp_out)
        self._unit = _unit("Curriculum", unit)
        if self._stop is None:
            if self._ramp_out > 0:
                raise AuxLossError(
                    f"Curriculum: ramp_out={self._ramp_out} has no effect without stop; set stop= to the "
                    f"{self._unit} where the task starts to leave, or drop ramp_out."
                )
            return
        if self._stop < self._start + self._ramp_in:
            raise AuxLossError(
                f"Curriculum: the schedule ends before it starts: stop ({self._stop}) is before "
                f"start + ramp ({self._start} + {self._ramp_in}); set stop >= {self._start + self._ramp_in}."
            )
        if self._stop == self._start and self._ramp_out == 0:
            raise AuxLossError(
                f"Curriculum: stop equals start ({self._stop}) with ramp_out=0, so the task is never on; "
                f"set stop later than start, or give it a ramp_out."
            )

    def _value(self, t: float) -> float:
        if t < self._start:
            return 0.0
        if self._stop is not None and t >= self._stop:
            if t >= self._stop + self._ramp_out:
                return 0.0
            return _lerp(self._weight, 0.0, (t - self._stop) / self._ramp_out)
        if t < self._start + self._ramp_in:
            return _lerp(0.0, self._weight, (t - self._start) / self._ramp_in)
        return self._weight

    def _params(self) -> dict[str, Any]:
        return {
            "value": self._weight,
            "start": self._start,
            "ramp": self._ramp_in,
            "stop": self._stop,
            "ramp_out": self._ramp_out,
            "unit": self._unit,
        }

    @property
    def bound(self) -> float:
        return self._weight


class Piecewise(Schedule):
    """Linear interpolation through ``points`` = [(t_0, v_0), (t_1, v_1), ...] with t_0 < t_1 < ...::

    λ(t) = v_0                                             t <= t_0
           v_i + (v_{i+1} − v_i)·(t − t_i)/(t_{i+1} − t_i)   t_i <= t <= t_{i+1}
           v_last                                          t >= t_last
    """

    def __init__(self, points: Sequence[tuple[Time, float]], unit: Unit = "step") -> None:
        self._unit = _unit("Piecewise", unit)
        if isinstance(points, (str, bytes)) or not isinstance(points, Sequence) or len(points) == 0:
            raise AuxLossError(
                f"Piecewise: points must be a non-empty list of (t, value) pairs, got {points!r}; "
                f"pass e.g. points=[(0, 0.0), (1000, 0.5), (5000, 0.0)]."
            )
        pts: list[tuple[Time, float]] = []
        for i, p in enumerate(points):
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2:
                raise AuxLossError(
                    f"Piecewise: points[{i}] must be a (t, value) pair, got {p!r}; "
                    f"pass e.g. points=[(0, 0.0), (1000, 0.5)]."
                )
            pts.append(
                (_time("Piecewise", f"points[{i}] t", p[0]), _weight("Piecewise", f"points[{i}] value", p[1]))
            )
            if i > 0 and pts[i][0] <= pts[i - 1][0]:
                raise AuxLossError(
                    f"Piecewise: points must have strictly increasing t, but points[{i}] has t = "
                    f"{pts[i][0]} after t = {pts[i - 1][0]}; sort the points and merge duplicates."
                )
        self._points = tuple(pts)
        self._ts = [p[0] for p in pts]
        self._vs = [p[1] for p in pts]

    def _value(self, t: float) -> float:
        i = bisect.bisect_right(self._ts, t)
        if i == 0:
            return self._vs[0]
        if i == len(self._ts):
            return self._vs[-1]
        t0, t1 = self._ts[i - 1], self._ts[i]
        return _lerp(self._vs[i - 1], self._vs[i], (t - t0) / (t1 - t0))

    def _params(self) -> dict[str, Any]:
        return {"points": self._points, "unit": self._unit}

    @property
    def bound(self) -> float:
        return max(self._vs)


class Product(Schedule):
    """The pointwise product of schedules, usually made with ``*``::

        λ(t) = Π_i factor_i(t)

    In :meth:`value` each factor reads its own unit, so a step warmup may multiply an epoch decay;
    calling such a mixed product at a raw ``t`` is ambiguous and raises.
    """

    def __init__(self, factors: Sequence[Schedule | float]) -> None:
        if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or len(factors) == 0:
            raise AuxLossError(
                f"Product: factors must be a non-empty list of schedules or floats, got {factors!r}; "
                f"write a * b instead, or pass e.g. factors=[Warmup(1.0, 500), Cosine(1.0, 0.0, 10000)]."
            )
        flat: list[Schedule] = []
        for i, f in enumerate(factors):
            if not isinstance(f, Schedule) and not _is_number(f):
                raise AuxLossError(
                    f"Product: factors[{i}] must be a Schedule or a float, got {f!r} ({type(f).__name__})."
                )
            s = as_schedule(f)
            # Flatten so that a * b * c is one Product of three, not nested pairs: shorter reprs, and
            # a config round trip gives back the same structure.
            flat.extend(s._factors if isinstance(s, Product) else (s,))
        self._factors = tuple(flat)
        self._bound = math.prod(f.bound for f in self._factors)
        if not math.isfinite(self._bound):
            raise AuxLossError(
                "Product: the factors' largest values multiply to more than a float can hold; "
                "scale the factors down (a weight above ~1e6 is almost surely a mistake)."
            )

    def _value(self, t: float) -> float:
        _one_unit(self)
        return math.prod(f._value(t) for f in self._factors)

    def value(self, *, step: float | None = None, epoch: float | None = None) -> float:
        return math.prod(f.value(step=step, epoch=epoch) for f in self._factors)

    def _params(self) -> dict[str, Any]:
        return {"factors": self._factors}

    @property
    def factors(self) -> tuple[Schedule, ...]:
        return self._factors

    @property
    def unit(self) -> Unit:
        """The factors' common unit ('step' if all are constant); raises if they count different things."""
        units = self.units
        if len(units) > 1:
            raise AuxLossError(
                f"{self!r} mixes units {sorted(units)}, so it has no single unit; "
                f"call .value(step=..., epoch=...) so each factor reads its own."
            )
        return next(iter(units), "step")  # type: ignore[return-value]

    @property
    def units(self) -> frozenset[str]:
        return frozenset().union(*(f.units for f in self._factors))

    @property
    def bound(self) -> float:
        return self._bound


class ProgressiveDrop(Schedule):
    """Al-Rfou et al. 2018's intermediate-layer losses: layer ``l`` of ``n_layers`` stops at ``fraction·l/n`` of training::

        λ(t) = value    t < fraction · total · layer / n_layers
               0        otherwise

    From "Character-Level Language Modeling with Deeper Self-Attention" (Al-Rfou, Choe, Constant, Guo and Jones,
    AAAI 2019, §"Multiple Intermediate Layer Losses"): with ``n`` layers, the loss of the ``l``-th intermediate
    layer (``l`` counted from 1 at the bottom) ceases to contribute after ``l/2n`` of training, so the lowest layers'
    losses go first and every intermediate loss is gone by half-way. That is ``fraction=0.5``, the default.
    ``fraction=1`` spreads the drops over all of training instead (layer ``l`` stops at ``l/n``). ``total`` is the
    length of training in this schedule's unit (steps, or epochs with ``unit="epoch"``). Give each layer's task its
    own schedule::

        weights = [ProgressiveDrop(1.0, layer=l, n_layers=4, total=10_000) for l in (1, 2, 3)]
    """

    def __init__(
        self, value: float, layer: int, n_layers: int, total: Time, fraction: float = 0.5, unit: Unit = "step"
    ) -> None:
        self._weight = _weight("ProgressiveDrop", "value", value)
        for name, v in (("layer", layer), ("n_layers", n_layers)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise AuxLossError(
                    f"ProgressiveDrop: {name} must be an integer >= 1 (layers count from 1 at the bottom), got "
                    f"{v!r}; pass e.g. layer=1, n_layers=4."
                )
        if layer > n_layers:
            raise AuxLossError(
                f"ProgressiveDrop: layer ({layer}) is above n_layers ({n_layers}); number the layers 1..n_layers, "
                f"the lowest first."
            )
        self._layer, self._n_layers = int(layer), int(n_layers)
        self._total = _time("ProgressiveDrop", "total", total)
        if self._total <= 0:
            raise AuxLossError(
                f"ProgressiveDrop: total must be > 0 (the length of training in {unit}s), got {self._total!r}."
            )
        if not _is_number(fraction) or not 0.0 < float(fraction) <= 1.0:  # type: ignore[arg-type]
            raise AuxLossError(
                f"ProgressiveDrop: fraction must be in (0, 1] (the share of training after which the top "
                f"intermediate layer stops), got {fraction!r}; the paper's is 0.5."
            )
        self._fraction = float(fraction)  # type: ignore[arg-type]
        self._unit = _unit("ProgressiveDrop", unit)

    @property
    def stop(self) -> float:
        """The time from which λ is 0: ``fraction · total · layer / n_layers``."""
        return self._fraction * self._total * self._layer / self._n_layers

    def _value(self, t: float) -> float:
        return self._weight if t < self.stop else 0.0

    def _params(self) -> dict[str, Any]:
        return {
            "value": self._weight,
            "layer": self._layer,
            "n_layers": self._n_layers,
            "total": self._total,
            "fraction": self._fraction,
            "unit": self._unit,
        }

    @property
    def bound(self) -> float:
        return self._weight


def _one_unit(s: Schedule) -> None:
    """A composite evaluated at a raw t needs all its parts to agree on what t counts."""
    units = s.units
    if len(units) > 1:
        raise AuxLossError(
            f"{s!r} mixes units {sorted(units)}, so a raw t is ambiguous; call "
            f".value(step=..., epoch=...) so each part reads its own counter, or give all parts one unit."
        )


# ----------------------------------------------------------------------------------------------------
# Conversion, configs, state dicts
# ----------------------------------------------------------------------------------------------------


def as_schedule(x: Schedule | float) -> Schedule:
    """A schedule as is; a number as :class:`Constant` (checked finite and >= 0); anything else raises."""
    if isinstance(x, Schedule):
        return x
    if _is_number(x):
        return Constant(x)
    raise AuxLossError(
        f"expected a weight (a float >= 0) or a Schedule, got {x!r} ({type(x).__name__}); pass e.g. 0.3 "
        f"or Linear(0.0, 0.3, begin=100, stop=500), or build one from a dict with from_config()."
    )


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _norm(name: str) -> str:
    # "DecayToThreshold", "decay_to_threshold" and "decay-to-threshold" all name the same type.
    return re.sub(r"[\s_\-]", "", name.lower())


_CLASSES: tuple[type[Schedule], ...] = (
    Constant,
    Linear,
    Cosine,
    Step,
    Exponential,
    Warmup,
    Curriculum,
    Piecewise,
    DecayToThreshold,
    Product,
    ProgressiveDrop,
)
_TYPES: dict[str, type[Schedule]] = {_snake(c.__name__): c for c in _CLASSES}
_BY_NORM: dict[str, type[Schedule]] = {_norm(c.__name__): c for c in _CLASSES}
_BY_CLASS: dict[str, type[Schedule]] = {c.__name__: c for c in _CLASSES}


def _plain(value: Any, nested: Any) -> Any:
    """Params as plain dicts/lists/numbers (JSON- and YAML-friendly); nested schedules via ``nested``."""
    if isinstance(value, Schedule):
        return nested(value)
    if isinstance(value, dict):
        return {k: _plain(v, nested) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v, nested) for v in value]
    return value


def _state_of(s: Schedule) -> dict[str, Any]:
    return s.state_dict()


def to_config(schedule: Schedule) -> dict[str, Any]:
    """A plain dict ``{"type": "linear", "start": ..., ...}`` that :func:`from_config` turns back."""
    if not isinstance(schedule, Schedule):
        raise AuxLossError(
            f"to_config: expected a Schedule, got {schedule!r} ({type(schedule).__name__}); "
            f"wrap a number with as_schedule() first."
        )
    return {"type": _snake(type(schedule).__name__), **_plain(schedule._params(), to_config)}


def _build(cls: type[Schedule], kwargs: dict[str, Any], where: str) -> Schedule:
    """``cls(**kwargs)``, with unknown and missing keys reported by name instead of as a TypeError."""
    sig = inspect.signature(cls.__init__)
    names = [p for p in sig.parameters if p != "self"]
    for key in kwargs:
        if key not in names:
            hint = close_matches(str(key), names)
            did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
            raise AuxLossError(
                f"{where}: unknown key {key!r} for {cls.__name__}; valid keys are "
                f"{', '.join(names)}.{did_you_mean}"
            )
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in kwargs
    ]
    if missing:
        raise AuxLossError(
            f"{where}: {cls.__name__} needs {', '.join(repr(m) for m in missing)}; its keys are "
            f"{', '.join(names)}."
        )
    return cls(**kwargs)


def from_config(config: Mapping[str, Any]) -> Schedule:
    """Build a schedule from a dict such as ``{"type": "linear", "start": 0, "end": 0.3, ...}``.

    ``type`` is case-insensitive (``"Linear"``, ``"decay_to_threshold"``, ``"DecayToThreshold"``); the
    other keys are the constructor's arguments. Warmup's ``target`` and Product's ``factors`` may be
    nested configs or numbers.
    """
    if not isinstance(config, Mapping):
        raise AuxLossError(
            f"from_config: expected a dict such as {{'type': 'linear', 'start': 0.0, 'end': 0.3, "
            f"'begin': 100, 'stop': 500}}, got {config!r} ({type(config).__name__})."
        )
    valid = ", ".join(_TYPES)
    if "type" not in config:
        raise AuxLossError(
            f"from_config: the config {dict(config)!r} has no 'type' key; add one of: {valid}."
        )
    kind = config["type"]
    cls = _BY_NORM.get(_norm(kind)) if isinstance(kind, str) else None
    if cls is None:
        hint = close_matches(str(kind).lower(), _TYPES)
        did_you_mean = f" Did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
        raise AuxLossError(
            f"from_config: unknown schedule type {kind!r}; valid types are {valid}.{did_you_mean}"
        )
    kwargs = {k: v for k, v in config.items() if k != "type"}
    if isinstance(kwargs.get("target"), Mapping):
        kwargs["target"] = from_config(kwargs["target"])
    if cls is Product and isinstance(kwargs.get("factors"), Sequence):
        kwargs["factors"] = [from_config(f) if isinstance(f, Mapping) else f for f in kwargs["factors"]]
    return _build(cls, kwargs, "from_config")


def from_state_dict(state: Mapping[str, Any]) -> Schedule:
    """A new schedule built from :meth:`Schedule.state_dict` output (its arguments validated again)."""
    return _from_state(state)


def _from_state(state: Mapping[str, Any], expect: type[Schedule] | None = None) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.state_dict` output, checking the class when given one."""
    if (
        not isinstance(state, Mapping)
        or set(state) != {"class", "params"}
        or not isinstance(state["params"], Mapping)
    ):
        raise AuxLossError(
            f"load_state_dict: expected {{'class': ..., 'params': {{...}}}} as made by state_dict(), got "
            f"{state!r}; pass the dict that Schedule.state_dict() returned."
        )
    name = state["class"]
    if expect is not None and name != expect.__name__:
        raise AuxLossError(
            f"load_state_dict: the state is for class {name!r}, but this schedule is a {expect.__name__}; "
            f"load it into a {name} (or rebuild with from_config) instead."
        )
    cls = _BY_CLASS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise AuxLossError(
            f"load_state_dict: unknown schedule class {name!r}; known classes are {', '.join(_BY_CLASS)}."
        )
    kwargs = dict(state["params"])
    if isinstance(kwargs.get("target"), Mapping):
        kwargs["target"] = _from_state(kwargs["target"])
    if cls is Product and isinstance(kwargs.get("factors"), Sequence):
        kwargs["factors"] = [_from_state(f) if isinstance(f, Mapping) else f for f in kwargs["factors"]]
    return _build(cls, kwargs, "load_state_dict")
