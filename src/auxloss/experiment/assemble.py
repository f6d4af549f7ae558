"""Turn an :class:`~auxloss.experiment.spec.Experiment` into one run: data loaders, the model with its heads, the
objective and the trainer, for one (variant, seed).

The pairing guarantee lives here. For seed *s*, the baseline and every variant get:
- the same data (the user's ``data(s)``);
- the same initial trunk (``model(s)`` is called right after ``torch.manual_seed(s)``, before any head exists, so
  the heads' initialisation cannot shift it);
- the same batch order (the training loader shuffles with its own ``torch.Generator`` seeded with *s*, and
  loader workers are seeded from it);
- the global RNG reseeded after the heads, so dropout starts from the same state in every variant.

Pairing is also *checked*: the trunk's initial weights and the first training batch are hashed, and every run of a
seed must match the first one stored, or the run stops with an error instead of publishing an unpaired comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler

from auxloss.errors import AuxLossError
from auxloss.experiment.spec import Experiment
from auxloss.objective import Objective
from auxloss.taps import AuxModel, attach
from auxloss.tasks import Task, batch_as_dict
from auxloss.train.callbacks import Callback
from auxloss.train.trainer import Trainer

__all__ = ["Built", "build_run", "make_loaders", "state_hash"]

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Built:
    """Everything one run needs."""

    model: nn.Module
    objective: Objective
    trainer: Trainer
    loaders: dict[str, DataLoader]
    data: dict[str, Any]
    init_hash: str


def state_hash(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers, bit for bit, in ``state_dict`` order."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def batch_hash(batch: Any) -> str:
    """sha256 of every tensor in a (nested) batch, in key order."""
    h = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, Tensor):
            t = x.detach().cpu().contiguous()
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, Mapping):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                visit(x[k])
        elif isinstance(x, (tuple, list)):
            for v in x:
                visit(v)
        else:
            h.update(repr(x).encode())

    visit(batch)
    return h.hexdigest()[:24]


def check_splits(splits: Any) -> dict[str, Any]:
    """The user's ``data(seed)`` result: a mapping with ``train``, ``val`` and ``test`` datasets or loaders."""
    if not isinstance(splits, Mapping):
        raise AuxLossError(f"data(seed) must return a dict with 'train', 'val' and 'test' (torch Datasets or "
                           f"DataLoaders), got {type(splits).__name__}.")
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise AuxLossError(f"data(seed) returned no {missing} split(s) (it gave {sorted(map(str, splits))}); the "
                           "runner needs 'train', 'val' (to choose the best epoch) and 'test' (to compare on).")
    for name in SPLITS:
        value = splits[name]
        if not isinstance(value, (Dataset, DataLoader)):
            raise AuxLossError(f"data(seed)[{name!r}] must be a torch Dataset or DataLoader, got "
                               f"{type(value).__name__}; wrap tensors in torch.utils.data.TensorDataset.")
    return dict(splits)


def _seed_worker(worker_id: int) -> None:
    # Each loader worker's torch seed is drawn from the loader's generator; numpy and random follow it, so
    # augmentations drawn from them are paired too, whatever the number of workers.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _chain(user: Callable[[int], None] | None) -> Callable[[int], None]:
    if user is None:
        return _seed_worker
    return _ChainedInit(user)


class _ChainedInit:
    """Our worker seeding, then the user's own ``worker_init_fn`` (picklable for spawned workers)."""

    def __init__(self, user: Callable[[int], None]) -> None:
        self.user = user

    def __call__(self, worker_id: int) -> None:
        _seed_worker(worker_id)
        self.user(worker_id)


def _loader_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(options)
    if not out.get("num_workers"):
        out.pop("persistent_workers", None)
        out.pop("prefetch_factor", None)
    return out


def _rebuilt(loader: DataLoader, generator: torch.Generator, shuffle: bool) -> DataLoader:
    """The same loader with our generator (a user's shuffling loader draws its order from the global RNG)."""
    kwargs: dict[str, Any] = {
        "batch_size": loader.batch_size, "shuffle": shuffle, "drop_last": loader.drop_last,
        "collate_fn": loader.collate_fn, "num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
        "timeout": loader.timeout, "worker_init_fn": _chain(loader.worker_init_fn), "generator": generator,
    }
    if loader.num_workers:
        kwargs.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor,
                      multiprocessing_context=loader.multiprocessing_context)
    return DataLoader(loader.dataset, **kwargs)


def make_loaders(splits: Mapping[str, Any], *, batch_size: int, eval_batch_size: int, options: Mapping[str, Any],
                 seed: int, distributed: tuple[int, int] | None = None) -> dict[str, DataLoader]:
    """Loaders for the three splits; the training order is drawn from a generator seeded with ``seed``.

    ``distributed`` is ``(rank, world_size)`` under DDP: each rank then reads its shard of a map-style training set
    with ``batch_size / world_size`` samples, so that the global batch equals a single process's.
    """
    g = torch.Generator().manual_seed(seed)
    kwargs = _loader_kwargs(options)
    out: dict[str, DataLoader] = {}
    train = splits["train"]
    if isinstance(train, DataLoader):
        if distributed is not None:
            raise AuxLossError("under torchrun give the training split as a Dataset, not a DataLoader: the runner "
                               "shards it across processes with a DistributedSampler.")
        # A plain shuffling loader is rebuilt around our generator; a custom sampler is kept (the first-batch
        # check then tells whether it is paired).
        if isinstance(train.sampler, RandomSampler) and train.batch_sampler is not None \
                and not isinstance(train.dataset, IterableDataset):
            out["train"] = _rebuilt(train, g, shuffle=True)
        else:
            out["train"] = train
    elif isinstance(train, IterableDataset):
        out["train"] = DataLoader(train, batch_size=batch_size, generator=g, worker_init_fn=_seed_worker, **kwargs)
    else:
        n = len(train)
        if n == 0:
            raise AuxLossError("the training split is empty: give it at least one sample.")
        if distributed is not None:
            rank, ws = distributed
            if batch_size % ws:
                raise AuxLossError(f"the batch size {batch_size} is not divisible by the {ws} processes; make it a "
                                   "multiple.")
            sampler = DistributedSampler(train, num_replicas=ws, rank=rank, shuffle=True, seed=seed, drop_last=True)
            out["train"] = DataLoader(train, batch_size=batch_size // ws, sampler=sampler, drop_last=n > batch_size,
                                      generator=g, worker_init_fn=_seed_worker, **kwargs)
        else:
            out["train"] = DataLoader(train, batch_size=batch_size, shuffle=True, generator=g,
                                      drop_last=n > batch_size, worker_init_fn=_seed_worker, **kwargs)
    for name in ("val", "test"):
        split = splits[name]
        out[name] = split if isinstance(split, DataLoader) else DataLoader(
            split, batch_size=eval_batch_size, worker_init_fn=_seed_worker, **kwargs)
    return out


def example_input(exp: Experiment, loaders: Mapping[str, DataLoader]) -> Any:
    """One sample's model input, for the heads' lazy shapes: the first validation batch, cut to one item."""
    try:
        batch = next(iter(loaders["val"]))
    except StopIteration:
        raise AuxLossError("the validation split is empty: give it at least one sample.") from None
    named = batch_as_dict(batch, exp.batch_keys)
    if exp.input_key not in named:
        raise AuxLossError(f"a batch has no input key {exp.input_key!r}; its keys are {sorted(map(str, named))}. "
                           "Set batch_keys (the names of a tuple batch's positions) or input_key.")
    x = named[exp.input_key]
    return x[:1] if isinstance(x, Tensor) else x


def build_run(exp: Experiment, variant_name: str, seed: int, *, device: str | None = None,
              log_dir: str | None = None, progress: bool = False, check_weights: bool = True) -> Built:
    """Data, model (trunk + this variant's heads), objective and trainer for one run.

    ``check_weights``: refuse a task whose weight is 0 at every step of the run (a verdict about nothing). A probe
    trains a shortened run on purpose, where a late curriculum has not started yet, and turns it off.
    """
    from auxloss.train.distributed import is_distributed, rank, world_size

    variant = exp.variant(variant_name)
    splits = check_splits(exp.data(seed))
    loaders = make_loaders(splits, batch_size=exp.batch_size, eval_batch_size=exp.eval_batch_size,
                           options=exp.loader, seed=seed,
                           distributed=(rank(), world_size()) if is_distributed() else None)

    torch.manual_seed(seed)
    trunk = exp.model(seed)  # built first: identical across variants for this seed
    if not isinstance(trunk, nn.Module):
        raise AuxLossError(f"model(seed) must return a torch.nn.Module (the trunk), got {type(trunk).__name__}.")
    if isinstance(trunk, AuxModel):
        raise AuxLossError("model(seed) must return the plain model (the trunk): the runner attaches each variant's "
                           "heads itself, and the baseline has none.")
    init = state_hash(trunk)

    main = _fresh_main(exp)
    model: nn.Module = trunk
    tasks: list[Task] = []
    weighting = None
    if variant is not None:
        resolved = variant.resolve(trunk, splits, seed)
        tasks = resolved.tasks
        if resolved.taps:
            model = attach(trunk, resolved.taps, example_input=example_input(exp, loaders))
        if resolved.weighting is not None:
            weighting = resolved.weighting(model)
    objective = Objective(main, tasks, batch_keys=exp.batch_keys, input_key=exp.input_key)
    if weighting is not None:
        objective.set_weighting(weighting)

    options = exp.train_for(variant_name)
    options.setdefault("device", device or "auto")
    if device is not None:
        options["device"] = device
    trainer = Trainer(**options, log_dir=log_dir, progress=progress)
    try:
        steps: int | None = len(loaders["train"])
    except TypeError:  # a stream: no length, and no way to know the run's steps in advance
        steps = None
    if steps is not None and check_weights:
        _check_weights_ever_on(objective, trainer.epochs, max(1, math.ceil(steps / trainer.accumulate)))
    torch.manual_seed(seed + 1)
    return Built(model=model, objective=objective, trainer=trainer, loaders=loaders, data=splits, init_hash=init)


def _check_weights_ever_on(objective: Objective, epochs: int, steps_per_epoch: int) -> None:
    """Refuse a task whose weight is 0 at every optimizer step of the run (a curriculum starting after the last
    step): it would train nothing and be reported as "no detectable effect", a verdict about nothing."""
    total = epochs * steps_per_epoch
    for task in objective.aux_tasks:
        if any(task.schedule.value(step=t, epoch=t // steps_per_epoch) > 0 for t in range(total)):
            continue
        raise AuxLossError(
            f"task {task.name!r} never gets a nonzero weight in this run: its weight {task.schedule!r} is 0 at every "
            f"one of the run's {total} optimizer steps ({epochs} epochs x {steps_per_epoch} steps, epochs "
            f"0..{epochs - 1}). Make it start earlier (before step {total}), or train for more epochs.")


def _fresh_main(exp: Experiment) -> Task:
    import copy

    assert exp.main is not None
    return copy.deepcopy(exp.main)


class PairingCheck(Callback):
    """Stops a run whose first training batch differs from the one the seed's first run saw.

    ``record(key, value)`` stores a value the first time and returns the stored one (a store's meta table), so the
    first run of a seed sets the reference, and every later run of that seed, in any variant, is compared to it.
    """

    def __init__(self, record: Callable[[str, str], str], seed: int, init_hash: str, keys: tuple[str, ...],
                 batch_keys: tuple[str, ...]) -> None:
        self.record, self.seed, self.keys, self.batch_keys = record, seed, keys, batch_keys
        self.checked = False
        stored = record(f"pairing/seed{seed}/init", init_hash)
        if stored != init_hash:
            raise AuxLossError(
                f"model(seed={seed}) returned different initial weights than in an earlier run of the same seed "
                f"(hash {init_hash} vs {stored}): the comparison would not be paired. Build every random part of the "
                "model inside model(seed) from torch's global RNG (the runner seeds it), or seed it from `seed`."
            )

    def on_train_batch_start(self, trainer: Any, batch: Any, batch_idx: int) -> None:
        if self.checked or trainer.epoch != 1 or batch_idx != 0:
            return
        self.checked = True
        # Only the model input and the main target: a variant may add columns of its own (a shuffled target).
        named = batch_as_dict(batch, self.batch_keys)
        h = batch_hash({k: named[k] for k in self.keys if k in named})
        stored = self.record(f"pairing/seed{self.seed}/first_batch", h)
        if stored != h:
            raise AuxLossError(
                f"the first training batch of seed {self.seed} differs from an earlier run of the same seed: the data "
                "or its order is not a function of the seed, so the comparison would not be paired. Make data(seed) "
                "deterministic, and give the training split as a Dataset (the runner shuffles it with a seeded "
                "generator) or as a DataLoader with shuffle=True and no custom sampler."
            )

