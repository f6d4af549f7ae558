"""The one error type auxloss raises for input a user gave.

Every message says what was wrong *and* how to fix it, so that no raw traceback from deep inside torch
reaches the user for a mistake in their own model, config or data.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["AuxLossError", "close_matches"]


class AuxLossError(ValueError):
    """Raised for bad input: an unknown layer, a missing target key, a bad weight, a NaN loss, ...

    It subclasses ``ValueError`` so that code which already guards against bad values keeps working.
    """


def close_matches(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates closest to ``word``, best first, for "did you mean" hints."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(word, candidates, n=n, cutoff=0.5)
    if len(matches) < n:
        # Also offer names that contain the word or its last dotted part (``4a`` -> ``inception4a``).
        tail = word.rsplit(".", 1)[-1].lower()
        for c in candidates:
            if c not in matches and tail and tail in c.lower():
                matches.append(c)
            if len(matches) >= n:
                break
    return matches
