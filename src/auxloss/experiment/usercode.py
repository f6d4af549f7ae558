"""Importing the user's own code named in a config as ``"package.module:function"``.

A config that names a function runs that code when the experiment is built: configs are trusted input, like a
Python script (see docs/guide.md). The working directory and the config file's folder are importable, so a user
package next to the config needs no installation.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from auxloss.errors import AuxLossError

__all__ = ["call_with_seed", "import_callable", "is_user_reference"]



def is_user_reference(name: str) -> bool:
    """``"pkg.mod:fn"``, as opposed to a built-in name or a ``torchvision:``/``timm:`` model."""
    from auxloss.integrations.models import PREFIXES  # sources auxloss resolves itself (torchvision:, timm:)

    module, sep, _ = name.partition(":")
    return bool(sep) and module.strip().lower() not in PREFIXES


def import_callable(spec: str, *, what: str, search: Sequence[str | Path] = ()) -> Callable[..., Any]:
    """The callable ``spec`` (``"package.module:function"``, dotted attributes allowed after the colon).

    ``search`` folders (the config's folder) are put at the front of ``sys.path`` for the import, beside the
    working directory. A missing module or attribute raises an error naming both and the folders searched.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AuxLossError(f"{what} {spec!r} must look like 'package.module:function'.")
    folders = [str(Path(p).resolve()) for p in (*search, Path.cwd())]
    added = [p for p in dict.fromkeys(folders) if p not in sys.path]
    sys.path[:0] = added  # kept: a worker or a later call may import more of the same package
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AuxLossError(
                f"{what} {spec!r}: no module {exc.name!r} was found; searched {list(dict.fromkeys(folders))} and "
                "the installed packages. Put the package in the working directory or beside the config, or install "
                "it (pip install -e .)."
            ) from None
        raise AuxLossError(f"{what} {spec!r}: importing {module_name!r} failed: {exc}.") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_"))
            raise AuxLossError(f"{what} {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has "
                               f"no attribute {attr!r}; it defines {names[:20]}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise AuxLossError(f"{what} {spec!r} is a {type(obj).__name__}, not a function or class.")
    return obj


def call_with_seed(fn: Callable[..., Any], seed: int, params: dict[str, Any], *, what: str) -> Any:
    """``fn(seed=seed, **params)`` when ``fn`` takes a ``seed`` parameter, else ``fn(**params)``."""
    try:
        takes_seed = "seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        takes_seed = False
    kwargs = {"seed": seed, **params} if takes_seed else dict(params)
    try:
        return fn(**kwargs)
    except TypeError as exc:
        if "argument" in str(exc):
            raise AuxLossError(f"{what}: calling {getattr(fn, '__qualname__', fn)!r} with {sorted(kwargs)} failed: "
                               f"{exc}. Match its params: in the config to the function's parameters.") from exc
        raise
