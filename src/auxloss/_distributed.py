"""The few collectives auxloss needs, and state declared once with how it combines across processes.

A low-level module: the weightings, the objective's step protocol, the trainer and the Lightning module all sync
through it, so none of them imports another for it. Everything is a no-op without a process group.

**Declared state** (as torchmetrics' ``add_state(..., dist_reduce_fx=...)``): a module that mixes in
:class:`SyncedState` declares each synced buffer once with :meth:`SyncedState.add_state` and its reduction
(``"sum"``, ``"mean"``, ``"max"``, ``"min"``); :meth:`SyncedState.sync_state` then all-reduces every declared
buffer in place, one flat all-reduce per reduction. Values that live for one call only (per-task gradients, the
evaluation's running sums) go through :func:`sync_tensors`, the one helper that performs every sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from auxloss.errors import AuxLossError

__all__ = ["REDUCTIONS", "Reduce", "SyncedState", "all_reduce_mean", "is_distributed", "rank", "sync_tensors",
           "world_size"]

Reduce = Literal["sum", "mean", "max", "min"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean", "max", "min")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def sync_tensors(tensors: Sequence[Tensor | None], reduce: Reduce) -> list[Tensor | None]:
    """``tensors`` combined over the processes with ``reduce``, in one flat all-reduce; ``None`` passes through.

    Every rank must pass tensors of the same shapes in the same order. The flat buffer has the tensors' common
    dtype (float64 holds integer counts exactly up to 2**53), and each result comes back in its own dtype.
    Without a process group the tensors are returned as they are.
    """
    if reduce not in REDUCTIONS:
        raise AuxLossError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}.")
    if not is_distributed():
        return list(tensors)
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in present])
    op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
          "min": dist.ReduceOp.MIN}[reduce]
    dist.all_reduce(flat, op=op)
    if reduce == "mean":
        flat /= dist.get_world_size()
    out: list[Tensor | None] = []
    offset = 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        n = t.numel()
        piece = flat[offset:offset + n].view_as(t)
        if t.dtype != dtype:
            # integer state (counts) summed in floating point: round back rather than truncate
            piece = (piece.round() if not t.is_floating_point() else piece).to(t.dtype)
        out.append(piece)
        offset += n
    return out


def all_reduce_mean(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The mean over the processes of each tensor, in one flat all-reduce (``None`` entries are passed through)."""
    return sync_tensors(tensors, "mean")


class SyncedState:
    """Mix into an ``nn.Module`` to declare buffers with the reduction that syncs them across processes.

    Declared buffers are ordinary buffers (``state_dict``, ``.to()``); only :meth:`sync_state` treats them apart.
    """

    def add_state(self, name: str, default: Tensor, *, reduce: Reduce, persistent: bool = True) -> None:
        """Register buffer ``name`` (a copy of ``default``) that :meth:`sync_state` combines with ``reduce``."""
        if reduce not in REDUCTIONS:
            raise AuxLossError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}.")
        if not isinstance(self, nn.Module):
            raise TypeError("SyncedState must be mixed into an nn.Module.")
        self.register_buffer(name, default.detach().clone(), persistent=persistent)
        self.__dict__.setdefault("_synced_state", {})[name] = reduce

    @property
    def synced_state(self) -> dict[str, str]:
        """The declared buffers and their reductions, in declaration order."""
        return dict(self.__dict__.get("_synced_state", {}))

    def sync_state(self) -> None:
        """All-reduce every declared buffer in place (one all-reduce per reduction); a no-op in one process."""
        if not is_distributed():
            return
        groups: dict[str, list[str]] = {}
        for name, reduce in self.synced_state.items():
            groups.setdefault(reduce, []).append(name)
        for reduce, names in groups.items():
            values = [getattr(self, n) for n in names]
            for name, synced in zip(names, sync_tensors(values, reduce)):  # type: ignore[arg-type]
                assert synced is not None
                getattr(self, name).copy_(synced)
