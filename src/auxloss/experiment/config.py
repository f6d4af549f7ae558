"""The experiment config: a YAML file validated with pydantic.

It describes the data, the model, the main task, the training, the list of variants (each with its taps and
auxiliary tasks) and the number of seeds. The baseline, the same model and training without any auxiliary loss,
is always added: it is not listed among the variants. An unknown key or a wrong type is an error naming the key
and, where the YAML gives it, the file line.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from auxloss._checks import folder_name
from auxloss.errors import AuxLossError
from auxloss.train.options import TrainOptions, option_specs

__all__ = ["DataConfig", "ExperimentConfig", "HeadConfig", "LightningConfig", "ModelConfig", "TaskConfig", "TrainConfig",
           "VariantConfig", "config_hash", "load_config", "parse_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_name(kind: str, name: str) -> str:
    """``name`` if it can safely become a folder name (see :func:`auxloss._checks.folder_name`)."""
    return folder_name(kind, name)


class DataConfig(_Strict):
    """Which dataset, how big each split is, and the batch size.

    ``name``: ``shapes`` (generated), ``digits`` (scikit-learn), ``digits-sequence`` (digits read pixel by pixel,
    for RNNs), ``fashion-mnist`` (IDX files under ``root``), ``folder`` (a user's image folder under ``root``),
    ``hf`` (a Hugging Face dataset saved to disk, or parquet files, under ``root``), ... (the registry
    :data:`auxloss.zoo.data.DATASETS` lists them all). ``params`` go to the dataset's builder.
    """

    name: str = "shapes"
    n_train: int = Field(500, ge=1)
    n_val: int = Field(500, ge=1)
    n_test: int = Field(2000, ge=1)
    #: At most sys.maxsize (2**63 - 1): the DataLoader slices its sampler by it, and Python slices by no larger
    #: number. A batch size above the split's size is one batch of the whole split.
    batch_size: int = Field(64, ge=1, le=sys.maxsize)
    root: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    #: Seed of the data itself. ``None`` draws a new training subset per seed (the default: seeds then cover
    #: data variability too); an integer keeps one fixed dataset for every seed.
    data_seed: int | None = None
    #: Batch size of the validation and test loaders (evaluation needs no gradients: larger is faster).
    eval_batch_size: int = Field(512, ge=1, le=sys.maxsize)
    #: Names of the positions of a tuple batch (``(x, y)`` is ``input``, ``target``); dict batches keep their keys.
    batch_keys: list[str] = Field(default_factory=lambda: ["input", "target"], min_length=1)
    #: The batch key holding the model input.
    input_key: str = "input"
    #: DataLoader worker processes (0 loads in the training process); workers are seeded from the run's seed.
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = False
    persistent_workers: bool = False


class ModelConfig(_Strict):
    """A built-in model (``small_cnn``, ``deep_mlp``, ``googlenet``, ``googlenet32``), or ``torchvision:NAME`` /
    ``timm:NAME`` where those extras are installed. ``params`` go to its constructor."""

    name: str = "small_cnn"
    params: dict[str, Any] = Field(default_factory=dict)


class HeadConfig(_Strict):
    """A head: ``type`` is ``linear``, ``mlp``, ``inception_aux``, ``dense``, ``sequence`` or ``trinh``. ``out`` is its
    output size; when omitted it is the number of classes of the task's target. A ``trinh`` head (Trinh et al.
    2018, :func:`auxloss.sequence.trinh_auxiliary`) takes ``segment``, ``mode``, ``truncate``, ... as ``params``; its
    task needs no ``loss`` and reads the input sequence."""

    type: Literal["linear", "mlp", "inception_aux", "dense", "sequence", "trinh"] = "linear"
    out: int | None = Field(None, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)


class TapConfig(_Strict):
    layer: str
    head: HeadConfig = Field(default_factory=HeadConfig)
    select: int | str | list[int | str] | None = None
    detach: bool = False
    #: For a layer that runs several times per forward: ``first``, ``last``, ``all`` (stacked on dim 1) or an index.
    call: int | Literal["first", "last", "all"] | None = None


class TaskConfig(_Strict):
    """An auxiliary task. ``target``: a batch key, ``null`` for the main label, or ``module:function`` computing
    it from the batch. ``loss``: a built-in name or ``module:function``. ``weight``: a number or a schedule such as
    ``{type: curriculum, value: 0.3, start: 100}``."""

    name: str
    source: str
    target: str | None = None
    loss: str = "cross_entropy"
    metric: str | None = "auto"
    weight: float | dict[str, Any] = 1.0
    #: Replace this task's targets by one fixed random permutation of them per split: labels unrelated to the
    #: input (a harmful task, for safety checks).
    shuffle_target: bool = False

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_name("task", v)

    @model_validator(mode="after")
    def _weight_ok(self) -> TaskConfig:
        # Built once here, so an infinite, negative or misspelt weight stops the config at load, not after runs
        # have started (the build makes the same schedule again for each run).
        from auxloss.schedules import Constant, from_config

        try:
            from_config(self.weight) if isinstance(self.weight, dict) else Constant(float(self.weight))
        except (AuxLossError, TypeError) as exc:
            raise ValueError(f"task {self.name!r}: {str(exc).rstrip('.')}") from None
        return self


class MainConfig(_Strict):
    #: The main task's name (in logs, metrics and the report): any plain name.
    name: str = "main"
    target: str = "target"
    loss: str = "cross_entropy"
    #: The metric variants are compared on: ``auto`` follows the loss (accuracy for cross entropy, mae for l1...).
    metric: str = "auto"

    def resolved_metric(self) -> tuple[str, bool]:
        """The main metric's name and whether higher is better, exactly as the main Task resolves them."""
        from auxloss.tasks import Task

        task = Task(self.name, target=self.target, loss=self.loss, metric=self.metric)
        if task.metric_name is None:
            raise AuxLossError(f"main.loss {self.loss!r} has no default metric; set main.metric to one of "
                               "'accuracy', 'binary_accuracy', 'mse', 'mae'.")
        return task.metric_name, task.higher_is_better


class LightningConfig(_Strict):
    """Options of the Lightning engine (``train: {engine: lightning, lightning: {...}}``)."""

    #: ``package.module:Class``: your LightningModule built on AuxLossMixin, called as ``Class(model, objective)``;
    #: its ``configure_optimizers`` then chooses the optimizer. ``null``: auxloss's ``AuxLossModule``.
    module: str | None = None
    #: More ``lightning.Trainer`` keyword arguments (``deterministic``, ``detect_anomaly``, ...).
    trainer: dict[str, Any] = Field(default_factory=dict)


def _training_fields() -> dict[str, Any]:
    """The ``train:`` keys, one per setting of :class:`~auxloss.train.TrainOptions`, with its bounds and choices.

    Deriving them keeps the config and the Trainer from drifting apart: a new Trainer setting is a config key at
    once, with the same default, and the bounds give pydantic's located messages ("train.lr: Input should be
    greater than 0 (got -1)") before :class:`TrainConfig`'s own check runs the Trainer's.
    """
    fields: dict[str, Any] = {}
    for spec in option_specs():
        bounds = {k: v for k, v in (("ge", spec.ge), ("gt", spec.gt)) if v is not None}
        fields[spec.name] = (spec.config_type, Field(spec.default, **bounds))
    return fields


_TrainingSettings = create_model("_TrainingSettings", __base__=_Strict, **_training_fields())


class TrainConfig(_TrainingSettings):  # type: ignore[misc, valid-type]
    """``train:``: every setting of :class:`auxloss.train.TrainOptions` (epochs, optimizer, lr, ...), plus how
    variants are compared."""

    #: Which split's main metric is compared between variants: the test split (the best epoch is still chosen on
    #: validation).
    compare_on: Literal["test", "val"] = "test"
    #: What trains each run: ``auxloss`` (auxloss's Trainer, with checkpoints and resume) or ``lightning``
    #: (``lightning.Trainer``, through the Lightning engine; see docs/your-model.md, "Lightning").
    engine: Literal["auxloss", "lightning"] = "auxloss"
    #: Options of the Lightning engine; only with ``engine: lightning``.
    lightning: LightningConfig | None = None

    @model_validator(mode="after")
    def _lightning_options(self) -> TrainConfig:
        if self.lightning is not None and self.engine != "lightning":
            raise ValueError("train.lightning options are given but train.engine is not 'lightning'; add "
                             "`engine: lightning` or drop them")
        return self

    @model_validator(mode="after")
    def _trainer_accepts(self) -> TrainConfig:
        try:  # the Trainer's own checks (e.g. a finite lr): a config it would refuse fails here, located
            self.options()
        except AuxLossError as exc:
            raise ValueError(str(exc).rstrip(".")) from None
        return self

    def options(self) -> TrainOptions:
        """These settings as the Trainer takes them."""
        return TrainOptions(**{spec.name: getattr(self, spec.name) for spec in option_specs()})


class VariantConfig(_Strict):
    name: str
    taps: dict[str, TapConfig] = Field(default_factory=dict)
    tasks: list[TaskConfig] = Field(default_factory=list)
    weighting: dict[str, Any] | None = None
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        check_name("variant", v)
        if v == "baseline":
            raise ValueError("a variant name must be non-empty, without '/', and not 'baseline' (added for you)")
        return v

    @model_validator(mode="after")
    def _sources_exist(self) -> VariantConfig:
        if self.taps and not self.tasks:
            raise ValueError(
                f"variant {self.name!r} has taps {sorted(self.taps)} but no task: its heads get no loss, so it would "
                "be compared with the baseline as if it were an auxiliary variant. Add a task reading each tap, or "
                "remove the variant")
        for task in self.tasks:
            if task.source != "main" and task.source not in self.taps:
                raise ValueError(
                    f"task {task.name!r} reads source {task.source!r}, which is not one of this variant's taps "
                    f"{sorted(self.taps)} (or 'main')"
                )
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate task names {dupes}: each task needs its own name")
        return self


class ExperimentConfig(_Strict):
    #: The folder of the YAML file (importable for ``module:function`` names); not part of the experiment.
    _config_dir: str | None = PrivateAttr(default=None)

    name: str = "experiment"
    seeds: int = Field(5, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    main: MainConfig = Field(default_factory=MainConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    variants: list[VariantConfig] = Field(default_factory=list)
    alpha: float = Field(0.05, gt=0, lt=1)
    #: Trained weights kept per run: ``best`` (the best-validation epoch's trunk and heads), ``all`` (also the
    #: last epoch's) or ``none``. Not part of the fingerprint: it changes no number, only the files a run leaves.
    keep: Literal["none", "best", "all"] = "best"

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_name("experiment", v)

    @model_validator(mode="after")
    def _unique_variants(self) -> ExperimentConfig:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate variant names {dupes}")
        for v in self.variants:
            engine = sorted({"engine", "lightning"} & set(v.train))
            if engine:
                raise ValueError(f"variant {v.name!r}: train.{engine[0]} cannot differ between variants (the "
                                 "baseline and every variant train with the same engine); set it under the "
                                 "top-level train:")
            if v.train:
                try:  # a variant's `train:` overrides get the same validation as the top-level `train:`
                    self.train_for(v.name)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    key = ".".join(str(p) for p in err["loc"])
                    what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                    raise ValueError(f"variant {v.name!r}: train.{key}: {what}") from None
        return self

    def train_for(self, variant: str) -> TrainConfig:
        """The training settings of ``variant``: the top-level ``train`` with the variant's overrides, validated."""
        overrides = self.variant(variant).train
        if not overrides:
            return self.train
        return TrainConfig.model_validate({**self.train.model_dump(), **overrides})

    def variant(self, name: str) -> VariantConfig:
        """The variant called ``name``; ``baseline`` is the variant with no taps and no tasks."""
        if name == "baseline":
            return VariantConfig.model_construct(name="baseline", taps={}, tasks=[], weighting=None, train={})
        for v in self.variants:
            if v.name == name:
                return v
        raise AuxLossError(f"no variant {name!r}; the variants are {['baseline'] + [v.name for v in self.variants]}.")

    @property
    def variant_names(self) -> list[str]:
        return ["baseline"] + [v.name for v in self.variants]


def config_hash(cfg: ExperimentConfig) -> str:
    """A fingerprint of everything that changes the runs (not the number of seeds, which only adds runs, nor
    ``keep``, which only decides which files a run leaves behind)."""
    data = cfg.model_dump(mode="json")
    data.pop("seeds", None)
    # `keep` is held at its default rather than dropped: `--keep` (or an edited `keep:`) resumes the same
    # experiment, and the fingerprints of folders written with the default, before this rule, still hold.
    data["keep"] = ExperimentConfig.model_fields["keep"].default
    # The default engine is left out, so that the fingerprints of configs written before it existed still hold.
    if data["train"].get("engine") == "auxloss" and data["train"].get("lightning") is None:
        data["train"].pop("engine", None)
        data["train"].pop("lightning", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# -- loading with line numbers -------------------------------------------------------------------------------
class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key, for error messages."""


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


#: The tag of YAML's merge key ``<<``, whose mapping's keys the explicit keys beside it may override.
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict[str, Any]:
    # Taken before construct_mapping, which splices the pairs of a `<<: *anchor` into node.value: only the keys
    # written at this level can be duplicates; a merged key that an explicit one overrides is YAML's merge.
    own = [key_node for key_node, _ in node.value if key_node.tag != _MERGE_TAG]
    mapping = loader.construct_mapping(node, deep=deep)
    lines: dict[Any, int] = {}
    for key_node in own:
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in lines:  # YAML keeps the last silently: a second `train:` would replace the first
            raise _DuplicateKey(f"duplicate key {key!r} at the same level: first on line {lines[key]}, again on line "
                                f"{line}", key_node.start_mark)
        lines[key] = line
    for key_node, _ in node.value:  # a merged key not overridden: its line in the anchor
        lines.setdefault(loader.construct_object(key_node), key_node.start_mark.line + 1)
    loader.lines[id(mapping)] = lines  # type: ignore[attr-defined]
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_of(data: Any, loc: tuple, lines: dict[int, dict[Any, int]]) -> int | None:
    line = None
    node = data
    for part in loc:
        if isinstance(node, dict):
            line = lines.get(id(node), {}).get(part, line)
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            break
    return line


def parse_config(data: Any, *, source: str = "<config>", lines: dict[int, dict[Any, int]] | None = None
                 ) -> ExperimentConfig:
    """Validate a config dict; errors name every bad key with its path and, when known, its line."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AuxLossError(f"{source}: the config must be a YAML mapping (key: value), got {type(data).__name__}.")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"])
            path = ".".join(str(p) for p in loc) or "(top level)"
            line = _line_of(data, loc, lines or {})
            where = f"{source}:{line}" if line else source
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {path!r}"
                parent = _parent_fields(loc)
                if parent:
                    from auxloss.errors import close_matches

                    hint = close_matches(str(loc[-1]), parent)
                    msg += f" (did you mean {hint[0]!r}?)" if hint else f" (valid keys: {sorted(parent)})"
            elif err["type"] == "value_error":  # our own validators: the message names what is wrong
                msg = f"{path}: {err['msg'].removeprefix('Value error, ')}"
            else:
                msg = f"{path}: {err['msg']}"
                if "input" in err and err["type"] != "missing":
                    msg += f" (got {err['input']!r})"
            problems.append(f"{where}: {msg}")
        docs = "docs/config.md lists every key, docs/errors.md the usual mistakes."
        if len(problems) == 1:
            raise AuxLossError(f"invalid config: {problems[0]}. Fix that key in the config; {docs}") from None
        raise AuxLossError("invalid config:\n  " + "\n  ".join(problems) + f"\nFix these keys in the config; {docs}") \
            from None


def _parent_fields(loc: tuple) -> list[str]:
    model: Any = ExperimentConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        for arg in list(candidates):
            candidates += list(getattr(arg, "__args__", ()))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate a YAML config file. ``overrides`` (dotted keys) are applied before validation."""
    path = Path(path)
    if not path.is_file():
        raise AuxLossError(f"config file {str(path)!r} does not exist; give the path of a YAML file "
                           "(see examples/ for ready-made ones).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AuxLossError(f"{path}: not a text file (byte {exc.start} is not UTF-8); give a YAML config file, "
                           "saved as UTF-8.") from None
    loader = None
    try:
        loader = _LineLoader(text)  # the reader rejects control characters here already
        loader.lines = {}  # type: ignore[attr-defined]
        data = loader.get_single_data()
    except _DuplicateKey as exc:
        raise AuxLossError(f"{path}:{exc.problem_mark.line + 1}: {exc.problem}. Merge the two into one (the second "
                           "would silently replace the first).") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise AuxLossError(f"{where}: YAML syntax error: {getattr(exc, 'problem', None) or exc}. Fix the file's "
                           "syntax (indentation, a missing ':' or an unclosed bracket, a stray control character)."
                           ) from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:  # an empty file (or only comments, or `null`): never the default experiment in its place
        raise AuxLossError(f"{path}: the config is empty (it sets no key), so it describes no experiment. Write the "
                           "experiment's keys (name, data, model, train, variants), e.g. starting from a file in "
                           "examples/; docs/config.md lists every key.")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    cfg = parse_config(data, source=str(path), lines=loader.lines)  # type: ignore[attr-defined]
    cfg._config_dir = str(path.resolve().parent)
    return cfg


def _set_dotted(data: Any, key: str, value: Any) -> None:
    parts = key.split(".")
    node, depth = data, 0
    while depth < len(parts) - 1 and isinstance(node, dict):
        node = node.setdefault(parts[depth], {})
        depth += 1
    if not isinstance(node, dict):  # the file gives a scalar or a list where the override needs a mapping
        where = ".".join(parts[:depth]) or "the top level"
        raise AuxLossError(f"cannot set {key!r} from the command line: {where} of the config is not a mapping "
                           "(key: value). Fix the file, or drop the option.")
    node[parts[-1]] = value
