"""Hypothesis profiles: CI and `make test` run the property tests derandomized, so a failure reproduces on every
run and a green suite stays green; the slow fuzz targets (tests/test_fuzz.py, `make test-all`) keep drawing new
random cases on every run, which is their point.

The profile is chosen by HYPOTHESIS_PROFILE (`ci` or `dev`); without it, `ci` when the CI variable is `true`,
else `dev` (Hypothesis's own random default).
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or
                      ("ci" if os.environ.get("CI", "").lower() == "true" else "dev"))
