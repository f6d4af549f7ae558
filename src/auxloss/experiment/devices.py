"""Which device each worker process trains on, on a machine with several GPUs.

Workers are pinned round-robin: worker *i* gets GPU ``gpus[i % len(gpus)]``, so with ``per_gpu`` workers per
device every GPU holds the same number of concurrent runs (small models leave a GPU mostly idle: several runs
share it well). The logic is pure, so it is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from auxloss.errors import AuxLossError

__all__ = ["parse_gpus", "worker_devices"]


def parse_gpus(spec: str, available: int) -> list[int]:
    """``"all"`` or a comma list such as ``"0,2"`` -> GPU indices, checked against the ``available`` count."""
    if spec.strip().lower() == "all":
        if available == 0:
            raise AuxLossError("--gpus all: torch sees no CUDA device here (torch.cuda.device_count() is 0); run "
                               "without --gpus to train on the CPU.")
        return list(range(available))
    try:
        ids = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise AuxLossError(f"--gpus takes 'all' or GPU indices such as '0,1', got {spec!r}.") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise AuxLossError(f"--gpus takes distinct non-negative GPU indices such as '0,1', got {spec!r}.")
    bad = [i for i in ids if i >= available]
    if bad:
        raise AuxLossError(f"--gpus {spec}: GPU {bad[0]} does not exist; torch sees {available} CUDA device(s) "
                           f"(indices 0..{available - 1})." if available else
                           f"--gpus {spec}: torch sees no CUDA device here; run without --gpus to train on the CPU.")
    return ids


def worker_devices(gpus: Sequence[int], per_gpu: int = 1, workers: int | None = None) -> list[str]:
    """The device of each worker: ``per_gpu`` workers per GPU by default, or ``workers`` spread round-robin."""
    if isinstance(per_gpu, bool) or not isinstance(per_gpu, int) or per_gpu < 1:
        raise AuxLossError(f"--per-gpu must be a positive integer (runs sharing one GPU), got {per_gpu!r}.")
    if not gpus:
        raise AuxLossError("no GPU given: pass GPU indices, or train on the CPU without --gpus.")
    n = len(gpus) * per_gpu if workers is None else workers
    if n < 1:
        raise AuxLossError(f"workers must be at least 1, got {n}.")
    if n > len(gpus) * per_gpu:
        raise AuxLossError(f"{n} workers on {len(gpus)} GPU(s) would put more than --per-gpu {per_gpu} runs on a "
                           "device; raise --per-gpu or lower --workers.")
    return [f"cuda:{gpus[i % len(gpus)]}" for i in range(n)]
