"""Multi-process training under ``torchrun``: process-group setup and the few collectives auxloss needs.

The trainer wraps the model in ``DistributedDataParallel`` when a process group is up. Per-task gradients
taken with ``torch.autograd.grad`` bypass DDP's all-reduce, so gradient-aware weightings average them
explicitly with :func:`all_reduce_mean` (from :mod:`auxloss._distributed`) before computing cosines or
projections: the statistics are then those of the global batch, exactly as in one process over the same batch.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

# The collectives live in a low-level module that the weightings use too (they must not import train/).
from auxloss._distributed import all_reduce_mean, is_distributed, rank, sync_tensors, world_size

__all__ = ["all_reduce_mean", "barrier", "broadcast_object", "init_from_env", "is_distributed", "rank", "shutdown",
           "sync_tensors", "world_size"]


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
