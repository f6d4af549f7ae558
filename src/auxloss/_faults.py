"""Fault injection for the reliability tests: kill this process at a named point, as a crash or ``kill -9`` would.

Set ``AUXLOSS_FAULT`` to ``<point>:<n>`` (several separated by commas) and the process sends itself ``SIGKILL`` the
n-th time (1-based) it reaches ``point``. Points:

- ``checkpoint-tmp``: inside :func:`~auxloss.train.checkpoint.save_checkpoint`, the temporary file written and
  fsynced, nothing renamed yet;
- ``checkpoint-prev``: ``last.pt`` already renamed to ``prev.pt``, the new ``last.pt`` not yet in place;
- ``store-finish``: inside the transaction that writes a finished run, before it commits.

Unset (the normal case) every call is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["fault_point"]

_counts: dict[str, int] = {}


def fault_point(point: str) -> None:
    spec = os.environ.get("AUXLOSS_FAULT")
    if not spec:
        return
    _counts[point] = _counts.get(point, 0) + 1
    for item in spec.split(","):
        name, _, n = item.strip().partition(":")
        if name == point and n.strip().isdigit() and int(n) == _counts[point]:
            if hasattr(signal, "SIGKILL"):
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(137)  # pragma: no cover - platforms without SIGKILL
