"""Turn a config into data, a model with heads, an objective and a trainer, for one (variant, seed).

The pairing guarantee lives here. For seed *s*, the baseline and every variant get:
- the same data subset (the data are drawn from *s*, or from ``data.data_seed`` when fixed);
- the same initial weights of the shared model (the trunk is built right after ``torch.manual_seed(s)``,
  before any head exists, so the heads' initialisation cannot shift it);
- the same batch order (the training loader shuffles with its own ``torch.Generator`` seeded with *s*).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from auxloss.errors import AuxLossError
from auxloss.experiment import assemble
from auxloss.experiment.assemble import Built, check_splits
from auxloss.experiment.config import ExperimentConfig, HeadConfig, TaskConfig, VariantConfig, config_hash
from auxloss.experiment.spec import Experiment, Resolved, Variant
from auxloss.experiment.usercode import call_with_seed, import_callable, is_user_reference
from auxloss.heads import DenseHead, InceptionAuxHead, LinearHead, MLPHead, SequenceHead
from auxloss.schedules import from_config as schedule_from_config
from auxloss.taps import Tap
from auxloss.tasks import Task
from auxloss.zoo.data import DataRequest, DictDataset, build_splits

__all__ = ["Built", "ConfigVariant", "build_data", "build_model", "build_run", "experiment_from_config"]


def data_seed(cfg: ExperimentConfig, seed: int) -> int:
    return cfg.data.data_seed if cfg.data.data_seed is not None else seed


def build_data(cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """The train/val/test splits for ``seed`` (identical for every variant): the user's own function
    (``package.module:function``), or a built-in dataset from the registry."""
    d = cfg.data
    s = data_seed(cfg, seed)
    if is_user_reference(d.name):
        fn = import_callable(d.name, what="data.name", search=_search(cfg))
        params = dict(d.params) | ({"root": d.root} if d.root else {})
        return check_splits(call_with_seed(fn, s, params, what=f"data {d.name!r}"))
    request = DataRequest(n_train=d.n_train, n_val=d.n_val, n_test=d.n_test, seed=s, root=d.root,
                          params=dict(d.params))
    return build_splits(d.name, request)


def _num_classes(data: DictDataset, key: str) -> int | None:
    known = getattr(data, "num_classes", {}) or {}
    if key in known:
        return int(known[key])
    t = data.tensors.get(key)
    # A column read lazily (images, arrays of a Hugging Face dataset) has no max(): its count must be given.
    if isinstance(t, Tensor) and not t.dtype.is_floating_point:
        return int(t.max()) + 1
    return None


def _search(cfg: ExperimentConfig) -> list[str]:
    return [cfg._config_dir] if cfg._config_dir else []


def build_model(cfg: ExperimentConfig, train: Any, seed: int = 0) -> nn.Module:
    """The trunk (no heads), with the number of classes and input size read from the data when not given."""
    from auxloss.zoo import models

    name, params = cfg.model.name, dict(cfg.model.params)
    if is_user_reference(name):
        net = call_with_seed(import_callable(name, what="model.name", search=_search(cfg)), seed, params,
                             what=f"model {name!r}")
        if not isinstance(net, nn.Module):
            raise AuxLossError(f"model {name!r} returned a {type(net).__name__}, not a torch.nn.Module.")
        return net
    if not isinstance(train, DictDataset):
        raise AuxLossError(f"the built-in model {name!r} reads its input size from built-in data; with your own data "
                           "give your own model too (model.name: 'package.module:function').")
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
    return import_callable(spec, what="the function")


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


class ConfigVariant(Variant):
    """A variant read from YAML: its heads are sized from the data of the run (classes of the target, target
    shape) and Trinh decoders need the trunk, so taps and tasks are built per run in :meth:`resolve`."""

    def __init__(self, cfg: ExperimentConfig, variant: VariantConfig) -> None:
        # Validated by pydantic already; the tasks are named here for the report, the objects built per run.
        object.__setattr__(self, "name", variant.name)
        object.__setattr__(self, "taps", {})
        object.__setattr__(self, "tasks", ())
        object.__setattr__(self, "weighting", variant.weighting)
        object.__setattr__(self, "train", _trainer_options(cfg.train_for(variant.name)) if variant.train else {})
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_variant", variant)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self._variant.tasks]

    def describe(self) -> dict[str, Any]:
        return self._variant.model_dump(mode="json")

    def resolve(self, trunk: nn.Module, splits: Mapping[str, Any], seed: int) -> Resolved:
        cfg, variant = self._cfg, self._variant
        main_key = cfg.main.target
        _add_shuffled_targets(splits, variant, main_key, seed)
        train = splits["train"]
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
            target = _column(train, key)
            if out is None and not isinstance(train, DictDataset):
                raise AuxLossError(f"variant {variant.name!r}, tap {name!r}: give head.out (the head's output size); "
                                   "it is read from the data only for the built-in datasets.")
            if out is None:
                out = _num_classes(train, key) if task is None or task.loss in ("cross_entropy", "ce") else None
                if out is None:
                    out = int(math.prod(target.shape[1:])) if target is not None and target.dim() > 1 else 1
                    if tap_cfg.head.type == "dense" and target is not None and target.dim() == 4:
                        out = int(target.shape[1])
            select = tuple(tap_cfg.select) if isinstance(tap_cfg.select, list) else tap_cfg.select
            shape = tuple(target.shape[1:]) if target is not None else ()
            extra = {"call": tap_cfg.call} if tap_cfg.call is not None else {}
            taps[name] = Tap(tap_cfg.layer, _head(tap_cfg.head, out, shape), select=select, detach=tap_cfg.detach,
                             **extra)
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
        factory = None
        if variant.weighting:
            spec = dict(variant.weighting)

            def factory(model: nn.Module) -> Any:
                from auxloss.weighting.registry import build_weighting

                return build_weighting(spec, model=model)
        return Resolved(taps=taps, tasks=tasks, weighting=factory)


def _column(data: Any, key: str) -> torch.Tensor | None:
    tensors = getattr(data, "tensors", None)
    return tensors.get(key) if isinstance(tensors, Mapping) else None


class _SeedData:
    """``seed -> splits`` for a config, remembering the last seed's splits: the model factory reads their shapes,
    and each call hands out fresh dataset objects so a variant's extra columns never reach another run."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self._last: tuple[int, dict[str, DictDataset]] | None = None

    def raw(self, seed: int) -> dict[str, DictDataset]:
        if self._last is None or self._last[0] != seed:
            self._last = (seed, build_data(self.cfg, seed))
        return self._last[1]

    def __call__(self, seed: int) -> dict[str, Any]:
        if is_user_reference(self.cfg.data.name):
            return build_data(self.cfg, seed)  # the user's own objects, fresh per run
        return {k: DictDataset(dict(ds.tensors), num_classes=ds.num_classes, class_names=ds.class_names,
                               info=ds.info) for k, ds in self.raw(seed).items()}


def experiment_from_config(cfg: ExperimentConfig | dict[str, Any], config_dir: str | None = None) -> Experiment:
    """The :class:`~auxloss.experiment.spec.Experiment` a YAML config describes: ``auxloss run`` is this, then
    the same runner as :func:`auxloss.compare`."""
    if not isinstance(cfg, ExperimentConfig):
        cfg = ExperimentConfig.model_validate(cfg)
        cfg._config_dir = config_dir
    data = _SeedData(cfg)

    def model(seed: int) -> nn.Module:
        if is_user_reference(cfg.model.name):  # needs no data: do not load it twice
            return build_model(cfg, None, seed)
        return build_model(cfg, data.raw(seed)["train"], seed)

    tcfg = cfg.train
    engine: Any = None
    if tcfg.engine == "lightning":
        from auxloss.experiment.engines import LightningEngine

        lit = tcfg.lightning
        module = import_callable(lit.module, what="train.lightning.module", search=_search(cfg)) \
            if lit is not None and lit.module else None
        engine = LightningEngine(module=module, trainer_kwargs=lit.trainer if lit is not None else None)
    return Experiment(
        model=model, data=data, variants=[ConfigVariant(cfg, v) for v in cfg.variants],
        main=Task(cfg.main.name, target=cfg.main.target, loss=cfg.main.loss, metric=cfg.main.metric),
        name=cfg.name, seeds=cfg.seeds, train=_trainer_options(tcfg), batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size, batch_keys=tuple(cfg.data.batch_keys),
        input_key=cfg.data.input_key, keep=cfg.keep, engine=engine,
        loader={"num_workers": cfg.data.num_workers, "pin_memory": cfg.data.pin_memory,
                "persistent_workers": cfg.data.persistent_workers},
        compare_on=tcfg.compare_on, alpha=cfg.alpha, config=cfg.model_dump(mode="json"),
        fingerprint=config_hash(cfg), rebuild=(experiment_from_config, (cfg.model_dump(mode="json"), cfg._config_dir)),
    )


def _trainer_options(tcfg: Any) -> dict[str, Any]:
    """Every training setting of the config (:class:`~auxloss.train.TrainOptions`), by name."""
    return dict(tcfg.options().items())


def build_run(cfg: ExperimentConfig, variant_name: str, seed: int, *, device: str | None = None,
              log_dir: str | None = None, progress: bool = False, check_weights: bool = True) -> Built:
    """Data, model (trunk + this variant's heads), objective and trainer for one run of a config."""
    return assemble.build_run(experiment_from_config(cfg), variant_name, seed, device=device, log_dir=log_dir,
                              progress=progress, check_weights=check_weights)


def final_metric(values: dict[str, float], split: str, task: str = "main") -> float:
    """The main task's (``task``) metric on ``split`` among a run's ``best`` values."""
    key = f"{split}/metric/{task}"
    if key not in values:
        raise AuxLossError(f"the run has no {key!r}; it has {sorted(values)}.")
    return float(values[key])
