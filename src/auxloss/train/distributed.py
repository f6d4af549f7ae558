"""Multi-process training under ``torchrun``: process-group setup and the few collectives auxloss needs.

The trainer wraps the model in ``DistributedDataParallel`` when a process group is up. Per-task gradients taken
with ``torch.autograd.grad`` bypass DDP's all-reduce, so gradient-aware weightings average them explicitly with
:func:`all_reduce_mean` before computing cosines or projections: the statistics are then those of the global
batch, exactly as in one process over the same batch.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_reduce_mean", "barrier", "broadcast_object", "init_from_env", "is_distributed", "rank", "shutdown",
           "world_size"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env() -> bool:
    """Start the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); gloo on CPU, NCCL on CUDA."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("AUXLOSS_DIST_BACKEND") != "gloo" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return True


def shutdown() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it.

    A rank that exits (or destroys its group) while another still talks to it can make gloo abort the other one.
    """
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Average tensors across processes in one flat all-reduce (``None`` entries are passed through).

    Every rank must pass tensors of the same shapes in the same order, which holds for per-task gradients of the
    same model.
    """
    if not is_distributed():
        return list(tensors)
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    out: list[torch.Tensor | None] = []
    offset = 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        n = t.numel()
        out.append(flat[offset:offset + n].view_as(t))
        offset += n
    return out
