"""Batches and where they go, shared by every training loop (the Trainer and the Lightning integration).

:func:`resolve_device` turns ``"auto"``/``"cuda:1"`` into a device that exists, :func:`move_to` puts a nested
batch on it, and :class:`ValidationStream` hands look-ahead weightings an endless, resumable stream of validation
batches that leaves the global RNG as it found it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from auxloss.errors import AuxLossError
from auxloss.train.options import check_device

__all__ = ["ValidationStream", "move_to", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (``"auto"``/``None``: CUDA when available, else CPU), checked to exist here.

    A misspelt name (``gpu``) or a CUDA device on a CPU-only torch is an error naming the fix, before any run
    starts, instead of torch's traceback from the first tensor moved there."""
    resolved = None if device is None else check_device(device)  # None for "auto"
    if resolved is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resolved.type == "cuda":
        if torch.version.cuda is None and not getattr(torch.version, "hip", None):
            raise AuxLossError(f"device {device!r}: this torch ({torch.__version__}) is a CPU-only build; use "
                               "--device cpu (or 'auto'), or install a CUDA build of torch.")
        count = torch.cuda.device_count()
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            raise AuxLossError(f"device {device!r}: {count} CUDA device(s) visible; use --device cpu or 'auto', or "
                               f"one of cuda:0..cuda:{max(count - 1, 0)}.")
    elif resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise AuxLossError(f"device {device!r}: MPS is not available here; use --device cpu or 'auto'.")
    return resolved


def move_to(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


class ValidationStream:
    """An endless iterator over a validation loader's batches, moved to ``device``: what look-ahead weightings
    (``needs_validation``) get in ``StepContext.validation``.

    It leaves the global RNG as it found it (each pass's iterator is created and advanced under
    :func:`torch.random.fork_rng`), so that the training batches and dropout masks match those of a run without it,
    and ``position`` (batches taken in the current pass) checkpoints with the trainer: a resumed run continues with
    the same validation batch when the loader's order is fixed (``shuffle=False``, the usual for validation).
    """

    def __init__(self, loader: Iterable[Any], device: torch.device | str, position: int = 0) -> None:
        self.loader, self.device, self.position = loader, device, int(position)
        self._iterator: Any = None

    def __iter__(self) -> ValidationStream:
        return self

    def __next__(self) -> Any:
        with torch.random.fork_rng(devices=[]):
            if self._iterator is None:
                self._iterator = iter(self.loader)
                for _ in range(self.position):  # resuming inside a pass
                    next(self._iterator, None)
            batch = next(self._iterator, _END)
            if batch is _END:  # a pass is over: start the next one
                self._iterator, self.position = iter(self.loader), 0
                batch = next(self._iterator, _END)
                if batch is _END:
                    raise AuxLossError("the validation split is empty: a look-ahead weighting needs at least one batch.")
        self.position += 1
        return move_to(batch, self.device)


_END = object()
