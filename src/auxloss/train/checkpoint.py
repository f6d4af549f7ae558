"""Atomic, verified checkpoints and the RNG state that makes a resumed run bit-identical.

A checkpoint file is ``MAGIC + sha256(payload) + payload``, where the payload is ``torch.save`` of the state. It is
written to a temporary file in the same folder, flushed and fsynced, then renamed over ``last.pt`` after the
previous ``last.pt`` has been renamed to ``prev.pt``; the folder is fsynced too. A kill at any moment therefore
leaves either a complete ``last.pt`` or a complete ``prev.pt``. A file found torn or corrupt (its hash does not
match) is skipped with a warning and the previous checkpoint is used.

Where checkpoints live: ``directory`` is a local (or network-mounted) folder, or an fsspec URL such as
``s3://bucket/ckpt`` or ``memory://ckpt``, so that a worker on another machine can resume a run that a dead one
started. What is atomic where:

- a local or mounted folder (NFS, Lustre, GPFS, CephFS; also ``file://``): the full protocol above. ``rename``
  inside one folder is atomic on these filesystems, so a reader on any machine sees a complete ``last.pt`` or the
  previous one;
- any other fsspec filesystem: the same steps through fsspec (write a temporary object, move ``last.pt`` to
  ``prev.pt``, move the temporary object to ``last.pt``). Object stores (S3, GCS, Azure) write an object whole or
  not at all, but their "move" is a copy then a delete, so the switch to the new ``last.pt`` is not one atomic
  step: a kill in between can leave only ``prev.pt``, or a ``last.pt`` beside a leftover temporary object. The
  sha256 check and the fall-back on ``prev.pt`` cover both; nothing ever loads a torn file.

The payload is read with ``torch.load(weights_only=True)``: only tensors and plain data (numbers, strings, lists,
tuples, dicts) are rebuilt, never arbitrary objects. The SHA-256 header detects damage, not tampering (anyone can
recompute it), so a planted ``last.pt`` that asks pickle for anything else is refused with an error, never run.
The random generators' states are therefore stored as tensors and tuples of ints (numpy's array becomes a tensor).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import random
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auxloss._faults import fault_point
from auxloss.errors import AuxLossError

__all__ = ["checkpoint_location", "get_rng_state", "join_location", "load_checkpoint", "remove_checkpoint",
           "save_checkpoint", "set_rng_state"]

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


def checkpoint_location(location: str | os.PathLike[str]) -> Path | str:
    """``location`` as the checkpoint functions take it: a local ``Path``, or the URL text of an fsspec filesystem.

    ``file://`` URLs become local paths (so they get the local, fully atomic protocol). A URL whose filesystem
    fsspec does not know, or whose package is not installed (``s3fs`` for ``s3://``), is an ``AuxLossError``.
    """
    text = os.fspath(location)
    if "://" not in text:
        return Path(text)
    fs, path = _filesystem(text)
    return Path(path) if fs is None else text.rstrip("/")


def join_location(base: str | os.PathLike[str], *parts: str) -> Path | str:
    """``base/part/...`` for a folder or an fsspec URL (``Path`` would fold the ``//`` of a URL)."""
    loc = checkpoint_location(base)
    if isinstance(loc, Path):
        return loc.joinpath(*parts)
    return "/".join([loc, *parts])


def _filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL, or ``(None, local path)`` for the local filesystem."""
    import fsspec.core
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise AuxLossError(f"checkpoint location {url!r} needs a package that is not installed ({exc}). Install it "
                           "(e.g. `pip install s3fs` for s3://, `pip install gcsfs` for gs://), or give a folder on "
                           "a shared filesystem instead.") from exc
    except ValueError as exc:
        raise AuxLossError(f"checkpoint location {url!r} is not a folder nor an fsspec URL fsspec knows ({exc}). Give "
                           "a folder (a shared mount for several machines) or a URL such as s3://bucket/ckpt.") \
            from exc
    if isinstance(fs, LocalFileSystem):
        return None, path
    return fs, path


def _split(directory: str | os.PathLike[str]) -> tuple[Any, Path | str]:
    loc = checkpoint_location(directory)
    if isinstance(loc, Path):
        return None, loc
    return _filesystem(loc)


def _tmp_name() -> str:
    # Host and pid: on a folder shared by machines, two workers with the same pid must not share a temporary file.
    return f".last.pt.tmp-{socket.gethostname()}-{os.getpid()}"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | os.PathLike[str], state: dict[str, Any]) -> Path | str:
    """Write ``state`` atomically as ``directory/last.pt`` (the previous one kept as ``prev.pt``).

    ``directory`` is a folder or an fsspec URL (see the module's docstring for what is atomic where). Returns the
    path (or URL) of the new ``last.pt``.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    blob = MAGIC + digest + b"\n" + payload
    fs, where = _split(directory)
    if fs is not None:
        _save_fs(fs, str(where), blob, str(directory))
        return f"{checkpoint_location(directory)}/{LAST}"
    directory = Path(where)
    tmp = directory / _tmp_name()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(blob)
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


def _save_fs(fs: Any, directory: str, blob: bytes, shown: str) -> None:
    """The same protocol through fsspec: temporary object, ``last`` -> ``prev``, temporary -> ``last``."""
    tmp, last = f"{directory}/{_tmp_name()}", f"{directory}/{LAST}"
    try:
        fs.makedirs(directory, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(blob)
        fault_point("checkpoint-tmp")
        fs.invalidate_cache(directory)  # a cached listing could hide the last.pt another worker wrote
        if fs.exists(last):
            fs.mv(last, f"{directory}/{PREV}")
            fault_point("checkpoint-prev")
        fs.mv(tmp, last)
    # Backends raise their own types (botocore, aiohttp...), not only OSError.
    except Exception as exc:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise AuxLossError(f"cannot write a checkpoint to {shown!r}: {exc}. Check that the location is writable "
                           "(credentials, bucket, free space), or choose another --checkpoint-dir.") from exc


def _read_bytes(fs: Any, where: Path | str, name: str) -> bytes | None:
    if fs is None:
        path = Path(where) / name
        return path.read_bytes() if path.exists() else None
    try:
        return fs.cat_file(f"{where}/{name}")
    except FileNotFoundError:
        return None


def _read(data: bytes, path: str) -> dict[str, Any]:
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


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The newest intact checkpoint under ``directory`` (a folder or an fsspec URL), or ``None`` if there is none.

    A torn or corrupt ``last.pt`` is reported with a warning and ``prev.pt`` is used instead.
    """
    fs, where = _split(directory)
    if fs is not None:
        fs.invalidate_cache(str(where))  # another machine may have written since this process last looked
    shown = checkpoint_location(directory)
    for name in (LAST, PREV):
        path = f"{shown}/{name}"
        try:
            data = _read_bytes(fs, where, name)
        except OSError as exc:
            raise AuxLossError(f"cannot read the checkpoint {path!r}: {exc}. Check that the location is reachable "
                               "and readable from this machine.") from exc
        if data is None:
            continue
        try:
            return _read(data, path)
        except _Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file means: fall back to the previous one
            warnings.warn(f"checkpoint {path} is unusable ({exc}); falling back on the previous checkpoint.",
                          RuntimeWarning, stacklevel=2)
    return None


def remove_checkpoint(directory: str | os.PathLike[str]) -> None:
    """Delete a run's checkpoints (once its result is stored); a missing folder is not an error."""
    fs, where = _split(directory)
    if fs is None:
        shutil.rmtree(where, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        fs.rm(str(where), recursive=True)
