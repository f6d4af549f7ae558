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

import numpy as np
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
from auxloss.zoo.data import DictDataset

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
    """The train/val/test splits for ``seed`` (identical for every variant)."""
    d = cfg.data
    s = data_seed(cfg, seed)
    if d.name == "shapes":
        from auxloss.zoo.data import make_shapes_splits

        return make_shapes_splits(d.n_train, d.n_val, d.n_test, seed=s, **d.params)
    if d.name == "digits":
        from auxloss.zoo.data import load_digits_dataset

        full = load_digits_dataset(**d.params)
        return _split(full, None, d.n_train, d.n_val, d.n_test, s, "digits")
    if d.name == "digits-sequence":
        from auxloss.zoo.data import load_digits_dataset

        return _split(_pixel_sequences(load_digits_dataset(), **d.params), None, d.n_train, d.n_val, d.n_test, s,
                      "digits-sequence")
    if d.name == "fashion-mnist":
        from auxloss.zoo.data import FASHION_MNIST_DEFAULT_ROOT, load_fashion_mnist

        root = d.root or FASHION_MNIST_DEFAULT_ROOT
        train = load_fashion_mnist(root, split="train")
        test = load_fashion_mnist(root, split="test")
        return _split(train, test, d.n_train, d.n_val, d.n_test, s, "fashion-mnist")
    if d.name == "folder":
        from auxloss.zoo.data import load_image_folder

        if not d.root:
            raise AuxLossError("data.name 'folder' needs data.root: the folder holding one subfolder per class.")
        full = load_image_folder(d.root, **d.params)
        return _split(full, None, d.n_train, d.n_val, d.n_test, s, "folder")
    raise AuxLossError(f"unknown data.name {d.name!r}; use 'shapes', 'digits', 'digits-sequence', 'fashion-mnist' "
                       "or 'folder'.")


def _pixel_sequences(images: DictDataset, step: int = 1) -> DictDataset:
    """Images ``(N, 1, H, W)`` read in raster order, ``step`` pixels per time step: ``(N, H·W/step, step)``."""
    x = images.tensors["input"]
    pixels = int(math.prod(x.shape[1:]))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or pixels % step:
        raise AuxLossError(f"data.params.step must be a positive divisor of the {pixels} pixels, got {step!r}.")
    tensors = dict(images.tensors, input=x.reshape(len(x), pixels // step, step))
    return DictDataset(tensors, num_classes=images.num_classes, class_names=images.class_names,
                       info={**images.info, "sequence_step": step})


def _split(full: DictDataset, test: DictDataset | None, n_train: int, n_val: int, n_test: int, seed: int,
           name: str) -> dict[str, DictDataset]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(full))
    need = n_train + n_val + (0 if test is not None else n_test)
    if need > len(full):
        raise AuxLossError(f"the {name} data has {len(full)} samples but the splits ask for {need}; lower "
                           "data.n_train/n_val/n_test.")
    out = {"train": full.subset(order[:n_train].tolist()), "val": full.subset(order[n_train:n_train + n_val].tolist())}
    if test is None:
        out["test"] = full.subset(order[n_train + n_val:need].tolist())
    else:
        if n_test > len(test):
            raise AuxLossError(f"the {name} test split has {len(test)} samples, fewer than data.n_test={n_test}.")
        out["test"] = test.subset(np.random.default_rng(seed + 1).permutation(len(test))[:n_test].tolist())
    return out


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

    tcfg = cfg.train_for(variant_name)
    trainer = Trainer(
        epochs=tcfg.epochs, optimizer=tcfg.optimizer, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
        lr_schedule=tcfg.lr_schedule, grad_clip=tcfg.grad_clip, accumulate=tcfg.accumulate, amp=tcfg.amp,
        compile=tcfg.compile, patience=tcfg.patience, device=device or tcfg.device, eval_train=tcfg.eval_train,
        log_dir=log_dir, progress=progress, checkpoint_every=tcfg.checkpoint_every,
    )
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
    _check_weights_ever_on(objective, tcfg.epochs, math.ceil(len(train_loader) / tcfg.accumulate))
    torch.manual_seed(seed + 1)
    return Built(model=model, objective=objective, trainer=trainer, loaders=loaders, data=data)


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


def final_metric(values: dict[str, float], split: str) -> float:
    key = f"{split}/metric/main"
    if key not in values:
        raise AuxLossError(f"the run has no {key!r}; it has {sorted(values)}.")
    return float(values[key])
