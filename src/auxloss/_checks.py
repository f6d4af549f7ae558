"""Argument checks shared by the constructors of heads, schedules, sequence tasks and the zoo.

Each check raises :class:`~auxloss.errors.AuxLossError` naming the argument, the value it got and what to
pass instead, and returns the value in the type the caller keeps (``float`` for weights, ``int``
steps stay ``int``). ``owner`` (``"Linear"``, ``"MoE"``) says *where* the bad value went; checks
that take it write ``"{owner}: {name} ..."``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from auxloss.errors import AuxLossError

__all__ = [
    "as_float",
    "decay_factor",
    "finite_above_zero",
    "folder_name",
    "fraction_below_one",
    "int_at_least",
    "int_in_range",
    "integer",
    "is_number",
    "open_fraction",
    "positive_finite",
    "positive_int",
    "positive_number_or_none",
    "probability",
    "time_point",
    "unit_fraction",
    "weight",
]


def is_number(x: object) -> bool:
    """A real number, but not a ``bool``: ``bool`` is an Integral in Python, yet ``weight=True`` is a mistake."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def as_float(x: Any) -> float:
    """``float(x)``, with an int too large for a float (``10**400``) as ±inf instead of an OverflowError."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _where(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def positive_int(name: str, value: Any, *, owner: str | None = None) -> int:
    """An ``int`` >= 1 (a size, a count); ``bool`` and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AuxLossError(f"{_where(owner)}{name} must be a positive integer, got {value!r}.")
    return value


def integer(name: str, value: Any, *, owner: str | None = None) -> int:
    """Any ``int`` (a seed); ``bool`` and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AuxLossError(f"{_where(owner)}{name} must be an integer, got {value!r}.")
    return value


def probability(name: str, value: Any, *, owner: str | None = None) -> float:
    """A number in ``[0, 1)``, such as a dropout rate (1 would drop everything)."""
    if not is_number(value) or not 0.0 <= float(value) < 1.0:
        raise AuxLossError(f"{_where(owner)}{name} must lie in [0, 1), got {value!r}.")
    return float(value)


def positive_number_or_none(name: str, value: Any, *, owner: str | None = None) -> float | None:
    """``None`` (no limit) or a finite number > 0."""
    if value is None:
        return None
    if not is_number(value) or not math.isfinite(as_float(value)) or value <= 0:
        raise AuxLossError(f"{_where(owner)}{name} must be a number > 0 or None, got {value!r}.")
    return value


def int_at_least(name: str, value: Any, minimum: int = 1, *, example: str | None = None) -> int:
    """An ``int`` >= ``minimum`` (a layer count, a number of trials); ``bool`` and floats are refused.

    ``example`` (``"trials=20 (--trials 20)"``) is the fix the message suggests; without it the message names the
    type that was passed instead."""
    # bool is a subclass of int; ``depth=True`` is almost certainly a mistake, not "depth 1".
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if example is not None:
        if not is_int or value < minimum:
            raise AuxLossError(f"{name} must be an integer >= {minimum}, got {value!r}; pass e.g. {example}.")
        return value
    if not is_int:
        raise AuxLossError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise AuxLossError(f"{name} must be >= {minimum}, got {value}.")
    return value


def int_in_range(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An integer in ``[low, high]`` (``high=None``: no upper bound), returned as a Python ``int``.

    NumPy integers are accepted (sizes often come out of arrays); ``bool`` and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise AuxLossError(f"{name} must be an integer; got {value!r} ({type(value).__name__}).")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise AuxLossError(f"{name} must be {bound}; got {value}.")
    return int(value)


def unit_fraction(name: str, value: Any) -> float:
    """A fraction in the closed ``[0, 1]`` (a noise rate, a share of the data); anything ``float()`` takes."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise AuxLossError(f"{name} must be a number in [0, 1]; got {value!r}.") from None
    if not 0.0 <= f <= 1.0:
        raise AuxLossError(f"{name} must be in [0, 1]; got {value}.")
    return f


def open_fraction(name: str, value: Any, *, example: str) -> float:
    """A fraction strictly inside ``(0, 1)`` (a confidence level, a test's alpha); ``example`` is what to pass."""
    value = float(value)
    if not (0.0 < value < 1.0):
        raise AuxLossError(f"{name} must lie strictly between 0 and 1, got {value!r}. E.g. use {example}.")
    return value


def fraction_below_one(name: str, value: Any) -> float:
    """An ``int`` or ``float`` in ``[0, 1)`` (a model's dropout rate); unlike :func:`probability`, only built-in
    numbers are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise AuxLossError(f"{name} must be a number in [0, 1), got {value!r}.")
    return float(value)


def finite_above_zero(name: str, value: Any) -> float:
    """An ``int`` or ``float`` that is finite and > 0 (a width multiplier), returned as ``float``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise AuxLossError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def positive_finite(
    name: str, value: Any, *, owner: str | None = None, zero_ok: bool = False, none_ok: bool = False
) -> float | None:
    """An ``int`` or ``float`` that is finite and > 0 (>= 0 with ``zero_ok``; ``None`` passes with ``none_ok``),
    such as a learning rate; returned as ``float``."""
    if none_ok and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value < 0 if zero_ok else value <= 0):
        raise AuxLossError(f"{_where(owner)}{name} must be a {'non-negative' if zero_ok else 'positive'} finite "
                           f"number{' or None' if none_ok else ''}, got {value!r}.")
    return float(value)


def weight(owner: str, name: str, x: object) -> float:
    """A weight: a finite number ``>= 0``, returned as ``float``."""
    if not is_number(x):
        raise AuxLossError(
            f"{owner}: {name} must be a number >= 0, got {x!r} ({type(x).__name__}); "
            f"pass a Python float such as {name}=0.1 (call .item() on a tensor)."
        )
    v = as_float(x)
    if not math.isfinite(v) or v < 0.0:
        raise AuxLossError(
            f"{owner}: {name} must be finite and >= 0, got {v!r}; a weight scales a loss and a "
            f"negative or infinite one would reward the model for doing worse. Pass e.g. {name}=0.1."
        )
    return v


def time_point(owner: str, name: str, x: object) -> int | float:
    """A point or length in training time: a finite number ``>= 0``; ints stay ints."""
    if not is_number(x):
        raise AuxLossError(
            f"{owner}: {name} must be a step or epoch count (a number >= 0), got {x!r} "
            f"({type(x).__name__}); pass e.g. {name}=100."
        )
    v = int(x) if isinstance(x, numbers.Integral) else float(x)  # type: ignore[arg-type]
    if not math.isfinite(as_float(v)) or v < 0:
        raise AuxLossError(
            f"{owner}: {name} must be finite and >= 0 (training time starts at 0), got {v!r}; "
            f"pass e.g. {name}=100."
        )
    return v


def decay_factor(owner: str, x: object, *, name: str = "gamma") -> float:
    """A decay factor in ``(0, 1]``."""
    if not is_number(x) or not 0.0 < as_float(x) <= 1.0:
        raise AuxLossError(
            f"{owner}: {name} must be a decay factor in (0, 1], got {x!r}; {name}=1 keeps the value "
            f"constant and smaller values decay faster (e.g. {name}=0.999 per step)."
        )
    return float(x)  # type: ignore[arg-type]


def folder_name(kind: str, name: Any) -> str:
    """``name`` if it can safely become a folder name (experiments, variants and tasks name folders and files).

    Refused: blank names, path separators, ``..`` (``../../X`` would write, and with ``--force`` delete, outside the
    output folder), and control characters."""
    problem = None
    if not isinstance(name, str):
        raise AuxLossError(f"{kind} name must be a string, got {type(name).__name__}.")
    if not name.strip():
        problem = "it is blank"
    elif name != name.strip():
        problem = "it starts or ends with a blank"
    elif "/" in name or "\\" in name:
        problem = "it holds a path separator ('/' or '\\')"
    elif ".." in name or name == ".":
        problem = "it holds '..' (or is '.')"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "it holds a control character"
    if problem:
        raise AuxLossError(f"{kind} name {name!r} cannot name a folder: {problem}; use letters, digits, '-', '_' and "
                         "single dots")
    return name
