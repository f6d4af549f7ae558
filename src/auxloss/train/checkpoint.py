"""Atomic, verified checkpoints and the RNG state that makes a resumed run bit-identical.

A checkpoint file is ``MAGIC + sha256(payload) + payload``, where the payload is ``torch.save`` of the state. It is
written to a temporary file in the same folder, flushed and fsynced, then renamed over ``last.pt`` after the
previous ``last.pt`` has been renamed to ``prev.pt``; the folder is fsynced too. A kill at any moment therefore
leaves either a complete ``last.pt`` or a complete ``prev.pt``. A file found torn or corrupt (its hash does not
match) is skipped with a warning and the previous checkpoint is used.

The payload is read with ``torch.load(weights_only=True)``: only tensors and plain data (numbers, strings, lists,
tuples, dicts) are rebuilt, never arbitrary objects. The SHA-256 header detects damage, not tampering (anyone can
recompute it), so a planted ``last.pt`` that asks pickle for anything else is refused with an error, never run.
The random generators' states are therefore stored as tensors and tuples of ints (numpy's array becomes a tensor).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
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
    # numpy's state is ('MT19937', uint32 array, pos, has_gauss, cached_gaussian); the array is kept as an int64
    # tensor so that the checkpoint holds no numpy object and loads with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
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
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The checksum matched, so the file is whole: it was written to hold objects other than tensors and plain
        # data. Unpickling those could run any code, so it is refused outright (no silent fall-back).
        # torch's message is a paragraph; the line naming the refused global is the useful one.
        lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line]
        first = lines[0] if lines else "disallowed object"
        raise _Refused(
            f"the checkpoint {str(path)!r} holds objects other than tensors and plain data ({first[:200]}); auxloss "
            "refuses to unpickle it, because loading such a file can run arbitrary code. auxloss never writes "
            "such checkpoints: if you did not put it there, treat the folder as tampered with; delete the "
            "checkpoint folder to start the run over."
        ) from None


class _Refused(AuxLossError):
    """A whole checkpoint file that asks to rebuild disallowed objects: an error, never a fall-back."""


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
        except _Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file means: fall back to the previous one
            warnings.warn(f"checkpoint {path} is unusable ({exc}); falling back on the previous checkpoint.",
                          RuntimeWarning, stacklevel=2)
    return None
