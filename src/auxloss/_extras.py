"""Optional packages: which ``pip install auxloss[...]`` extra brings each, and the error when one is missing.

``pip install auxloss`` installs the core (torch and numpy): taps, heads, tasks, the objective, schedules,
weightings and the Trainer. The experiment stack (configs, runner, statistics, report, sweep, and the CLI
commands built on them) is the ``experiment`` extra; torchvision, timm, Lightning and psycopg2 have extras of
their own. Nothing in the core imports an optional package.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from types import ModuleType

from auxloss.errors import AuxLossError

__all__ = ["EXPERIMENT_PACKAGES", "MissingExtraError", "require", "require_all"]

#: The experiment extra, module -> distribution name (what pip installs). Keep in step with pyproject.toml's
#: ``experiment`` extra: tests/test_dependencies.py compares the two.
EXPERIMENT_PACKAGES: Mapping[str, str] = {
    "scipy": "scipy",
    "pydantic": "pydantic",
    "yaml": "PyYAML",
    "matplotlib": "matplotlib",
    "rich": "rich",
    "optuna": "optuna",
    "sqlalchemy": "SQLAlchemy",
}


class MissingExtraError(AuxLossError, ImportError):
    """An optional package is missing (or cannot be imported). Both an :class:`AuxLossError` (the CLI prints it as
    one line) and an ``ImportError`` (so ``try: ... except ImportError`` guards work)."""


def require(module: str, extra: str, *, note: str = "") -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` saying ``pip install auxloss[extra]``.

    Any failure to import counts, not only a missing package: a torchvision wheel built for another torch fails
    with a ``RuntimeError`` (``operator torchvision::nms does not exist``), and the message carries it.
    """
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken install fails with RuntimeError/OSError as well
        missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == module.split(".")[0]
        what = "is not installed" if missing else f"cannot be imported ({type(exc).__name__}: {exc})"
        raise MissingExtraError(
            f"{module} {what}. Install it with `pip install auxloss[{extra}]`." + (f" {note}" if note else "")
        ) from exc


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or one without a spec
        return True


def require_all(packages: Mapping[str, str], extra: str, *, what: str) -> None:
    """Raise :class:`MissingExtraError` naming every absent package of ``extra`` and the command that installs it.

    Only looks the packages up (``find_spec``), without importing them, so the check costs no import time.
    """
    missing = [dist for module, dist in packages.items() if _absent(module)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingExtraError(
            f"{what} needs {', '.join(missing)}, which {verb} not installed. Install the {extra} extra: "
            f"pip install 'auxloss[{extra}]'"
        )
