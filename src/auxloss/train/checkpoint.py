"""Atomic, verified checkpoints and the RNG state that makes a resumed run bit-identical.

A checkpoint file is ``MAGIC + sha256(payload) + payload``, where the payload is ``torch.save`` of the state. It is
written to a temporary file in the same folder, flushed and fsynced, then renamed over ``last.pt`` after the
previous ``last.pt`` has been renamed to ``prev.pt``; the folder is fsynced too. A kill at any moment therefore
leaves either a complete ``last.pt`` or a complete ``prev.pt``. A file found torn or corrupt (its hash does not
match) is skipped with a warning and the previous checkpoint is used.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auxloss._faults import fault_point
from auxloss.errors import AuxLossError

__all__ = ["get_rng_state", "load_checkpoint", "save_checkpoint", "set_rng_state"]

MAGIC = b"AUXLOSS-CKPT-1\n"
LAST, PREV = "last.pt", "prev.pt"


def get_rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically as ``directory/last.pt`` (the previous one kept as ``prev.pt``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    tmp = directory / f".last.pt.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + digest + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        fault_point("checkpoint-tmp")
        last = directory / LAST
        if last.exists():
            os.replace(last, directory / PREV)
            fault_point("checkpoint-prev")
        os.replace(tmp, last)
        _fsync_dir(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AuxLossError(f"cannot write a checkpoint in {str(directory)!r}: {exc.strerror or exc}. Free some disk "
                           "space or choose a writable output folder.") from exc
    return last


def _read(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError("not an auxloss checkpoint (bad header)")
    rest = data[len(MAGIC):]
    digest, _, payload = rest.partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise ValueError("torn or corrupt (its checksum does not match)")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The newest intact checkpoint under ``directory``, or ``None`` if there is none.

    A torn or corrupt ``last.pt`` is reported with a warning and ``prev.pt`` is used instead.
    """
    directory = Path(directory)
    for name in (LAST, PREV):
        path = directory / name
        if not path.exists():
            continue
        try:
            return _read(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file means: fall back to the previous one
            warnings.warn(f"checkpoint {path} is unusable ({exc}); falling back on the previous checkpoint.",
                          RuntimeWarning, stacklevel=2)
    return None
