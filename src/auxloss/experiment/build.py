"""Turn a config into data, a model with heads, an objective and a trainer, for one (variant, seed).

The pairing guarantee lives here. For seed *s*, the baseline and every variant get:
- the same data subset (the data are drawn from *s*, or from ``data.data_seed`` when fixed);
- the same initial weights of the shared model (the trunk is built right after ``torch.manual_seed(s)``,
  before any head exists, so the heads' initialisation cannot shift it);
- the same batch order (the training loader shuffles with its own ``torch.Generator`` seeded with *s*).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from auxloss.errors import AuxLossError
from auxloss.experiment.config import ExperimentConfig, HeadConfig, TaskConfig, VariantConfig
from auxloss.heads import DenseHead, InceptionAuxHead, LinearHead, MLPHead, SequenceHead
from auxloss.objective import Objective
from auxloss.schedules import from_config as schedule_from_config
from auxloss.taps import Tap, attach
from auxloss.tasks import Task
from auxloss.train.trainer import Trainer
from auxloss.zoo.data import DataRequest, DictDataset, build_splits

__all__ = ["Built", "build_data", "build_model", "build_run"]


@dataclasses.dataclass
class Built:
    """Everything one run needs."""

    model: nn.Module
    objective: Objective
    trainer: Trainer
    loaders: dict[str, DataLoader]
    data: dict[str, DictDataset]


def data_seed(cfg: ExperimentConfig, seed: int) -> int:
    return cfg.data.data_seed if cfg.data.data_seed is not None else seed


def build_data(cfg: ExperimentConfig, seed: int) -> dict[str, DictDataset]:
    """The train/val/test splits for ``seed`` (identical for every variant), from the dataset registry."""
    d = cfg.data
    request = DataRequest(n_train=d.n_train, n_val=d.n_val, n_test=d.n_test, seed=data_seed(cfg, seed),
                          root=d.root, params=dict(d.params))
    return build_splits(d.name, request)


def _num_classes(data: DictDataset, key: str) -> int | None:
    known = getattr(data, "num_classes", {}) or {}
    if key in known:
        return int(known[key])
    t = data.tensors.get(key)
    if t is not None and not t.dtype.is_floating_point:
        return int(t.max()) + 1
    return None


def build_model(cfg: ExperimentConfig, train: DictDataset) -> nn.Module:
    """The trunk (no heads), with the number of classes and input size read from the data when not given."""
    from auxloss.zoo import models

    name, params = cfg.model.name, dict(cfg.model.params)
    x = train.tensors["input"]
    n_classes = _num_classes(train, cfg.main.target)
    if ":" in name:
        from auxloss.integrations.models import resolve_model  # optional extras: torchvision/timm

        return resolve_model(name, num_classes=n_classes, **params)
    if name in ("small_cnn",) and "in_channels" not in params:
        params["in_channels"] = int(x.shape[1])
    if name == "deep_mlp" and "in_features" not in params:
        params["in_features"] = int(math.prod(x.shape[1:]))
    if name == "lstm_classifier" and "input_size" not in params:
        params["input_size"] = int(x.shape[-1])
    if name == "tiny_transformer" and params.get("vocab_size") is None:
        params.setdefault("in_channels", int(x.shape[1]))
        params.setdefault("image_size", int(x.shape[-1]))
    if n_classes is not None and "num_classes" not in params:
        params["num_classes"] = n_classes
    return models.build_model(name, **params)


def _head(cfg: HeadConfig, out: int, target_shape: tuple[int, ...]) -> nn.Module:
    p = dict(cfg.params)
    if cfg.type == "linear":
        return LinearHead(out, **p)
    if cfg.type == "mlp":
        return MLPHead(out, **p)
    if cfg.type == "inception_aux":
        return InceptionAuxHead(out, **p)
    if cfg.type == "dense":
        if "size" not in p and len(target_shape) >= 2:
            p["size"] = tuple(target_shape[-2:])
        return DenseHead(out, **p)
    if cfg.type == "sequence":
        return SequenceHead(out, **p)
    raise AuxLossError(f"unknown head type {cfg.type!r}.")


def _target_fn(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise AuxLossError(f"cannot import the target function {spec!r} ({exc}); give 'module:function'.") from exc


def _target_key(task: TaskConfig, main_key: str) -> str:
    return task.target if task.target is not None else main_key


def _add_shuffled_targets(data: dict[str, DictDataset], variant: VariantConfig, main_key: str, seed: int) -> None:
    """For tasks with ``shuffle_target``: a fixed random permutation of the target column, per split.

    The labels then carry no information about the input, but the network can still memorise them: the
    classic unrelated auxiliary task, which competes with the main task for the shared layers.
    """
    for task in variant.tasks:
        if not task.shuffle_target:
            continue
        key = _target_key(task, main_key)
        for i, (split, ds) in enumerate(sorted(data.items())):
            if key not in ds.tensors:
                raise AuxLossError(f"task {task.name!r}: no key {key!r} in the data; keys: {sorted(ds.tensors)}.")
            g = torch.Generator().manual_seed(10_007 * seed + i)
            ds.tensors[f"{key}__shuffled"] = ds.tensors[key][torch.randperm(len(ds), generator=g)]


def build_run(cfg: ExperimentConfig, variant_name: str, seed: int, *, device: str | None = None,
              log_dir: str | None = None, progress: bool = False) -> Built:
    """Data, model (trunk + this variant's heads), objective and trainer for one run."""
    variant = cfg.variant(variant_name)
    data = build_data(cfg, seed)
    main_key = cfg.main.target
    _add_shuffled_targets(data, variant, main_key, seed)
    train = data["train"]

    torch.manual_seed(seed)
    trunk = build_model(cfg, train)  # built first: identical across variants for this seed

    taps: dict[str, Tap] = {}
    tasks: list[Task] = []
    by_source = {t.source: t for t in variant.tasks}
    trinh_losses: dict[str, Any] = {}  # tap name -> its decoder's loss (auxloss.sequence)
    for name, tap_cfg in variant.taps.items():
        if tap_cfg.head.type == "trinh":
            from auxloss.sequence import trinh_auxiliary

            trinh_taps, trinh_tasks = trinh_auxiliary(trunk, tap_cfg.layer, name=name,
                                                      **{"seed": seed, **tap_cfg.head.params})
            taps[name] = trinh_taps[name]
            trinh_losses[name] = trinh_tasks[0].loss
            continue
        task = by_source.get(name)
        key = _target_key(task, main_key) if task is not None else main_key
        out = tap_cfg.head.out
        target = train.tensors.get(key)
        if out is None:
            out = _num_classes(train, key) if task is None or task.loss in ("cross_entropy", "ce") else None
            if out is None:
                out = int(math.prod(target.shape[1:])) if target is not None and target.dim() > 1 else 1
                if tap_cfg.head.type == "dense" and target is not None and target.dim() == 4:
                    out = int(target.shape[1])
        select = tuple(tap_cfg.select) if isinstance(tap_cfg.select, list) else tap_cfg.select
        shape = tuple(target.shape[1:]) if target is not None else ()
        taps[name] = Tap(tap_cfg.layer, _head(tap_cfg.head, out, shape), select=select, detach=tap_cfg.detach)
    for t in variant.tasks:
        target: Any = t.target
        if t.shuffle_target:
            target = f"{_target_key(t, main_key)}__shuffled"
        elif t.target is not None and ":" in t.target:
            target = _target_fn(t.target)
        weight = schedule_from_config(t.weight) if isinstance(t.weight, dict) else t.weight
        if t.source in trinh_losses:  # the decoder scores itself against the input sequence
            tasks.append(Task(t.name, source=t.source, target=target or "input", loss=trinh_losses[t.source],
                              metric=None, weight=weight))
            continue
        loss: Any = _target_fn(t.loss) if ":" in t.loss else t.loss  # a 'module:function' loss
        tasks.append(Task(t.name, source=t.source, target=target, loss=loss, metric=t.metric, weight=weight))

    example = train.tensors["input"][:1]
    model: nn.Module = attach(trunk, taps, example_input=example) if taps else trunk
    objective = Objective(Task("main", target=main_key, loss=cfg.main.loss, metric=cfg.main.metric), tasks)
    if variant.weighting:
        from auxloss.weighting.registry import build_weighting  # adaptive and gradient-aware weightings

        objective.set_weighting(build_weighting(variant.weighting, model=model))

    # Every training setting of the config reaches the Trainer whole; only the device may be overridden here.
    options = cfg.train_for(variant_name).options()
    trainer = Trainer(options, **({"device": device} if device else {}), log_dir=log_dir, progress=progress)
    # The loader's own generator fixes the batch order for this seed whatever the model consumed from the global
    # RNG; the global RNG is then reseeded so dropout starts from the same state in every variant.
    g = torch.Generator().manual_seed(seed)
    bs = cfg.data.batch_size
    from auxloss.train.distributed import is_distributed, rank, world_size

    if is_distributed():
        # Each rank trains on its shard with batch_size / world_size samples, so the global batch, and with it
        # the statistics of a gradient-aware weighting, equals a single-process run's.
        ws = world_size()
        if bs % ws:
            raise AuxLossError(f"data.batch_size={bs} is not divisible by the {ws} processes; make it a multiple.")
        sampler = DistributedSampler(train, num_replicas=ws, rank=rank(), shuffle=True, seed=seed,
                                     drop_last=True)
        train_loader = DataLoader(train, batch_size=bs // ws, sampler=sampler, drop_last=len(train) > bs)
    else:
        train_loader = DataLoader(train, batch_size=bs, shuffle=True, generator=g, drop_last=len(train) > bs)
    loaders = {
        "train": train_loader,
        "val": DataLoader(data["val"], batch_size=512),
        "test": DataLoader(data["test"], batch_size=512),
    }
    torch.manual_seed(seed + 1)
    return Built(model=model, objective=objective, trainer=trainer, loaders=loaders, data=data)


def final_metric(values: dict[str, float], split: str) -> float:
    key = f"{split}/metric/main"
    if key not in values:
        raise AuxLossError(f"the run has no {key!r}; it has {sorted(values)}.")
    return float(values[key])
