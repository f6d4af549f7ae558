"""What one paired comparison is: the user's factories, the variants, the main task and the training options.

An :class:`Experiment` is the single input of the runner. The Python API (:func:`auxloss.compare`) builds one
from the user's own callables; ``auxloss run`` builds one from a YAML file
(:func:`auxloss.experiment.build.experiment_from_config`). Everything after that (the seed loop, the pairing,
the store, the statistics and the report) is the same code.

A :class:`Variant` is made of the library's own objects (:class:`~auxloss.taps.Tap`, :class:`~auxloss.tasks.Task`,
a weighting): it is not a second configuration language. The runner deep-copies them for every run, so no head
and no weighting state ever carries over from one run to the next.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from torch import nn

from auxloss._checks import folder_name
from auxloss.errors import AuxLossError
from auxloss.taps import Tap
from auxloss.tasks import Task

__all__ = ["BASELINE", "Experiment", "Resolved", "Variant"]

#: The name of the variant without any auxiliary loss, which every experiment trains.
BASELINE = "baseline"

def check_name(kind: str, name: Any) -> str:
    """Experiment, variant and task names become folder and table names (one rule with the YAML config)."""
    return folder_name(kind, name)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """One variant made concrete for one run: fresh taps and tasks, and a weighting factory."""

    taps: dict[str, Tap]
    tasks: list[Task]
    weighting: Callable[[nn.Module], Any] | None


@dataclasses.dataclass(frozen=True)
class Variant:
    """An auxiliary-loss setup to compare against the baseline.

    Args:
        name: a plain name (it becomes a folder name and a table row).
        taps: tap name -> :class:`~auxloss.Tap` (a layer of the trunk and a head).
        tasks: the auxiliary :class:`~auxloss.Task` objects; each reads the main output or one of ``taps``.
        weighting: ``None`` (the tasks' own weights and schedules), a weighting object, or a callable
            ``model -> weighting`` for strategies that need the attached model (GradNorm's shared layer).
        train: overrides of the experiment's training options for this variant only (e.g. ``{"epochs": 20}``).

    The runner deep-copies ``taps``, ``tasks`` and a weighting object for every run, and re-initialises the heads
    from the run's random stream, so a head built once here starts from a seed-determined state in each run.
    """

    name: str
    taps: Mapping[str, Tap] = dataclasses.field(default_factory=dict)
    tasks: Sequence[Task] = ()
    weighting: Any = None
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("variant", self.name)
        if self.name == BASELINE:
            raise AuxLossError("'baseline' is added for you (the model without auxiliary losses); give your variant "
                               "another name.")
        if not isinstance(self.taps, Mapping):
            raise AuxLossError(f"variant {self.name!r}: taps must be a dict name -> auxloss.Tap, got "
                               f"{type(self.taps).__name__}.")
        for tap_name, tap in self.taps.items():
            if not isinstance(tap, Tap):
                raise AuxLossError(f"variant {self.name!r}: tap {tap_name!r} must be an auxloss.Tap, got "
                                   f"{type(tap).__name__}.")
        names = set()
        for task in self.tasks:
            if not isinstance(task, Task):
                raise AuxLossError(f"variant {self.name!r}: tasks must be auxloss.Task objects, got "
                                   f"{type(task).__name__}.")
            check_name("task", task.name)
            if task.name in names:
                raise AuxLossError(f"variant {self.name!r}: two tasks are named {task.name!r}; give each its own.")
            names.add(task.name)
            if task.source not in (None, "main") and task.source not in self.taps:
                raise AuxLossError(f"variant {self.name!r}: task {task.name!r} reads {task.source!r}, which is not "
                                   f"one of its taps {sorted(self.taps)} (or the main output).")
        if self.taps and not self.tasks:
            raise AuxLossError(f"variant {self.name!r} has taps but no task: its heads would not be trained and it "
                               "would be compared as if it added an auxiliary loss. Add a Task per tap.")

    def resolve(self, trunk: nn.Module, splits: Mapping[str, Any], seed: int) -> Resolved:
        """Fresh copies for one run (the global RNG has been seeded for the heads by the caller)."""
        taps = copy.deepcopy(dict(self.taps))
        for tap in taps.values():
            reset_parameters(tap.head)
        weighting = self.weighting
        factory: Callable[[nn.Module], Any] | None
        if weighting is None:
            factory = None
        elif isinstance(weighting, nn.Module) or not callable(weighting):
            def factory(model: nn.Module, _w: Any = weighting) -> Any:
                return copy.deepcopy(_w)
        else:
            factory = weighting
        return Resolved(taps=taps, tasks=copy.deepcopy(list(self.tasks)), weighting=factory)

    def describe(self) -> dict[str, Any]:
        """A JSON description (its fingerprint changes when the variant does)."""
        return {"name": self.name, "taps": {k: repr(v) for k, v in self.taps.items()},
                "tasks": [repr(t) for t in self.tasks], "weighting": _describe_callable(self.weighting),
                "train": dict(self.train)}

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def reset_parameters(module: nn.Module) -> None:
    """Draw every materialised layer's parameters again from the global RNG (lazy ones draw when first run).

    A head built by the user before the seed loop would otherwise start every run from the same weights, drawn
    from whatever the global stream was at construction: its initialisation must follow the run's seed.
    """
    from torch.nn.parameter import UninitializedParameter

    for sub in module.modules():
        own = list(sub.parameters(recurse=False))
        if any(isinstance(p, UninitializedParameter) for p in own):
            continue
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset) and own:
            reset()


def _describe_callable(obj: Any) -> Any:
    if obj is None:
        return None
    if isinstance(obj, nn.Module) or not callable(obj):
        return repr(obj)
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


@dataclasses.dataclass
class Experiment:
    """A paired comparison: a baseline and variants, trained on the same seeds, splits, initialisation and order.

    Args:
        model: ``seed -> nn.Module``, a fresh trunk (the model without auxiliary heads). It is called right after
            ``torch.manual_seed(seed)``; it must return the same initial weights for the same seed, or the
            comparison is not paired (detected: the run stops with an error).
        data: ``seed -> {"train": ..., "val": ..., "test": ...}``, each a ``torch.utils.data.Dataset`` (map-style
            or iterable) or a ``DataLoader``. Datasets are streamed through a ``DataLoader`` built with ``loader``
            options; the training order is drawn from a generator seeded with the seed.
        variants: the :class:`Variant` objects (the baseline is added).
        main: the main :class:`~auxloss.Task` (any name); cross entropy against the batch key ``"target"`` by
            default.
        name: the experiment's name (a plain word).
        seeds: seeds ``0..seeds-1``.
        train: keyword options of :class:`~auxloss.Trainer` (``epochs``, ``lr``, ``optimizer``, ...).
        batch_size, eval_batch_size: training and evaluation batch sizes for datasets given as ``Dataset``.
        loader: extra ``DataLoader`` options for datasets: ``num_workers``, ``pin_memory``,
            ``persistent_workers``, ``prefetch_factor``.
        batch_keys: names of the positions of a tuple batch: ``(x, y)`` is ``input``, ``target`` by default.
        input_key: the batch key holding the model input.
        compare_on: the split whose main metric is compared (``"test"``; the best epoch is chosen on ``val``).
        alpha: the significance level of the verdict (Holm-corrected).
        keep: which trained weights to keep: ``"best"`` (default: the best-validation weights of every run),
            ``"all"`` (also the last epoch's), or ``"none"``.
        engine: what trains each run: ``None``/``"auxloss"`` (auxloss's :class:`~auxloss.Trainer`, the default),
            ``"lightning"`` or a :class:`~auxloss.experiment.engines.LightningEngine` (``lightning.Trainer``), or
            another :class:`~auxloss.experiment.engines.FitEngine`.
        config: a JSON-able description recorded in ``results.json`` (the YAML config for ``auxloss run``).
        fingerprint: identity of the experiment in the store (default: a hash of its description); a folder
            holding another fingerprint is not reused without ``force``.
    """

    model: Callable[[int], nn.Module]
    data: Callable[[int], Mapping[str, Any]]
    variants: Sequence[Variant]
    main: Task | None = None
    name: str = "experiment"
    seeds: int = 5
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 64
    eval_batch_size: int = 512
    loader: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    batch_keys: Sequence[str] = ("input", "target")
    input_key: str = "input"
    compare_on: Literal["test", "val"] = "test"
    alpha: float = 0.05
    keep: Literal["none", "best", "all"] = "best"
    engine: Any = None
    config: Mapping[str, Any] | None = None
    fingerprint: str | None = None
    #: ``(function, args)`` that rebuilds this experiment in a worker process (set for YAML configs, whose
    #: factories are closures); ``None`` pickles the object itself, so its factories must be importable.
    rebuild: tuple[Callable[..., Experiment], tuple] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        from auxloss.experiment.engines import as_engine

        check_name("experiment", self.name)
        self.engine = as_engine(self.engine)
        if self.main is None:
            self.main = Task("main", target="target")
        if not isinstance(self.main, Task):
            raise AuxLossError(f"main must be an auxloss.Task, got {type(self.main).__name__}.")
        for what, fn in (("model", self.model), ("data", self.data)):
            if not callable(fn):
                raise AuxLossError(f"{what} must be a callable taking the seed, got {type(fn).__name__}; e.g. "
                                   f"{what}=lambda seed: ...")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise AuxLossError(f"seeds must be a positive integer (the seeds are 0..seeds-1), got {self.seeds!r}.")
        variants = list(self.variants)
        for v in variants:
            if not isinstance(v, Variant):
                raise AuxLossError(f"variants must be auxloss.Variant objects, got {type(v).__name__}.")
            clash = {self.main.name} & set(v.task_names)
            if clash:
                raise AuxLossError(f"variant {v.name!r}: a task is named like the main task {sorted(clash)}; "
                                   "rename it.")
        names = [v.name for v in variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise AuxLossError(f"duplicate variant names {dupes}; give each variant its own name.")
        self.variants = variants
        for key, value in (("batch_size", self.batch_size), ("eval_batch_size", self.eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AuxLossError(f"{key} must be a positive integer, got {value!r}.")
        if self.compare_on not in ("test", "val"):
            raise AuxLossError(f"compare_on must be 'test' or 'val', got {self.compare_on!r}.")
        if not (isinstance(self.alpha, float | int) and 0 < self.alpha < 1):
            raise AuxLossError(f"alpha must lie in (0, 1), got {self.alpha!r}.")
        if self.keep not in ("none", "best", "all"):
            raise AuxLossError(f"keep must be 'none', 'best' or 'all', got {self.keep!r}.")
        unknown = set(self.loader) - {"num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}
        if unknown:
            raise AuxLossError(f"unknown loader options {sorted(unknown)}; use num_workers, pin_memory, "
                               "persistent_workers or prefetch_factor.")

    def __reduce__(self) -> Any:
        if self.rebuild is not None:
            return self.rebuild
        return super().__reduce__()

    # -- what the runner asks --------------------------------------------------------------------------------
    @property
    def variant_names(self) -> list[str]:
        return [BASELINE] + [v.name for v in self.variants]

    def variant(self, name: str) -> Variant | None:
        """The variant called ``name``; ``None`` for the baseline."""
        if name == BASELINE:
            return None
        for v in self.variants:
            if v.name == name:
                return v
        raise AuxLossError(f"no variant {name!r}; the variants are {self.variant_names}.")

    def train_for(self, name: str) -> dict[str, Any]:
        """The Trainer options of variant ``name``: the experiment's, with the variant's overrides."""
        v = self.variant(name)
        return {**dict(self.train), **(dict(v.train) if v is not None else {})}

    def main_metric(self) -> tuple[str, bool]:
        """The main task's metric name and whether higher is better."""
        assert self.main is not None
        if self.main.metric_name is None:
            raise AuxLossError(f"the main task {self.main.name!r} has no metric; give it metric= (accuracy, mse, ...),"
                               " the number variants are compared on.")
        return self.main.metric_name, self.main.higher_is_better

    def describe(self) -> dict[str, Any]:
        if self.config is not None:
            return dict(self.config)
        return {"name": self.name, "model": _describe_callable(self.model), "data": _describe_callable(self.data),
                "main": repr(self.main), "variants": [v.describe() for v in self.variants],
                "train": {k: repr(v) for k, v in dict(self.train).items()}, "batch_size": self.batch_size,
                "batch_keys": list(self.batch_keys), "input_key": self.input_key, "compare_on": self.compare_on,
                "alpha": self.alpha, **self._engine_description()}

    def _engine_description(self) -> dict[str, Any]:
        # Only another engine than the default is named, so that the fingerprints of existing experiments hold.
        from auxloss.experiment.engines import TrainerEngine

        return {} if isinstance(self.engine, TrainerEngine) else {"engine": self.engine.describe()}

    def identity(self) -> str:
        """The store's fingerprint: what changes the runs (not the number of seeds, which only adds runs, nor
        ``keep``, which only decides which files a run leaves: changing it resumes the same experiment)."""
        if self.fingerprint is not None:
            return self.fingerprint
        data = {k: v for k, v in self.describe().items() if k != "seeds"}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=repr).encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """What the statistics and the report need, kept in the store so ``auxloss report`` needs no code."""
        metric, higher = self.main_metric()
        assert self.main is not None
        return {"name": self.name, "main_task": self.main.name, "metric": metric, "higher_is_better": higher,
                "variants": [{"name": BASELINE, "aux_tasks": []}]
                + [{"name": v.name, "aux_tasks": v.task_names} for v in self.variants],
                "compare_on": self.compare_on, "alpha": self.alpha, "seeds": self.seeds, "keep": self.keep,
                "config": self.describe()}
