"""Choose auxiliary tasks before a full experiment: ``auxloss probe CONFIG``.

Each variant of the config is a candidate. The probe runs a short **paired race**: the baseline and every candidate
train for the same number of steps, on one seed, from the same initial weights and in the same batch order (the
experiment's own pairing), and each reads the main task's loss and metric on the *validation* split at three points
in the second half of its run. A candidate's score is the change of the held-out main metric against the
baseline's at the same steps, averaged over the three points (the relative fall of the held-out main loss breaks
ties, and scores a main task without a metric); it is recommended when the score is positive. This is the full
experiment's question, asked on a shorter run of one seed.

Along the way, every few steps and on the current batch, it also measures diagnostics that say *why*:

- the **gradient cosine** between the main task's and the auxiliary task's gradients on the shared parameters;
- the **look-ahead affinity** of Fifty et al. 2021 ("Efficiently Identifying Task Groupings", TAG): take one SGD
  step on the shared parameters with the auxiliary loss alone, θ' = θ − η·∇θ L_aux, and measure
  ``Z = 1 − L_main(θ') / L_main(θ)``; positive means a step on the auxiliary task lowers the main loss;
- how fast the auxiliary task is **learned**: the fall of its loss, and its metric early and at the end. A task
  learned almost at once is *too easy* (it stops shaping the features); one whose loss barely moves is *too
  hard* (or unrelated to what the trunk can represent).

The affinity and the cosine used to be the score. Checked against full experiments
(``benchmarks/probe_validation.py``) they ranked the candidates no better than chance: one look-ahead step early in
training barely moves the main loss, and deep supervision's benefit builds up over many steps.

When the same output folder (or ``--results``) holds a finished experiment's ``results.json``, the probe's ranking
is compared with the full experiment's deltas (Spearman's rank correlation).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from auxloss.errors import AuxLossError
from auxloss.experiment.config import ExperimentConfig
from auxloss.taps import AuxModel, Outputs
from auxloss.tasks import batch_as_dict
from auxloss.train.callbacks import Callback
from auxloss.weighting.base import Weighting

__all__ = ["DEFAULT_BUDGET", "experiment_steps", "plan_probe", "probe_variant", "race", "run_probe",
           "run_steps"]


def _shared_grads(model: nn.Module, main_loss: Tensor, aux_loss: Tensor
                  ) -> tuple[list[tuple[str, nn.Parameter]], list[Tensor], list[Tensor]]:
    """The parameters both losses reach (the ones an auxiliary task shapes for the main task) and each loss's
    gradient there: one backward pass per loss."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    g0 = torch.autograd.grad(main_loss, params, retain_graph=True, allow_unused=True)
    gk = torch.autograd.grad(aux_loss, params, retain_graph=True, allow_unused=True)
    keep = [i for i, (a, b) in enumerate(zip(g0, gk)) if a is not None and b is not None]
    return [named[i] for i in keep], [g0[i] for i in keep], [gk[i] for i in keep]


def _main_loss(objective: Any, outputs: Any, batch: Any) -> float:
    """The main task's loss alone. The look-ahead scores only this: computing every task's loss there would run
    the auxiliary losses on outputs made with the shifted parameters (a truncated Trinh loss recomputes the RNN
    with the module's own, unshifted weights, and refused the mismatch) and would feed the weighting's
    ``multipliers`` a batch that is not a training step (DWA's and the uncertainty weights' running state)."""
    if not isinstance(outputs, Outputs):
        outputs = Outputs(main=outputs)
    task = objective.main
    pred = task.prediction(outputs)
    target = task.resolve_target(batch_as_dict(batch, objective.batch_keys), task.target)
    return float(task.loss_value(pred, target))


#: Where the race reads the held-out main loss, as fractions of the run's steps. Three readings in the second half,
#: averaged, damp the noise of a single late reading; the first half is left out because every run starts from the
#: same weights, so its readings say mostly how fast the runs start, not where they are heading.
RACE_POINTS = (0.5, 0.75, 1.0)


def _race_steps(steps: int) -> list[int]:
    """The steps (1-based counts of finished steps) after which the race evaluates, for a run of ``steps``."""
    return sorted({max(1, math.ceil(f * steps)) for f in RACE_POINTS})


def _evaluation_cost(n_val: int, batch_size: int) -> int:
    """One evaluation of the validation split, in training steps: a forward pass over ``n_val`` samples, and a
    training step (forward and backward) on ``batch_size`` samples costs about three forwards."""
    return max(1, math.ceil(n_val / (3 * batch_size)))


def _validation_size(built: Any, cfg: ExperimentConfig) -> int:
    try:
        return len(built.loaders["val"].dataset)
    except (TypeError, AttributeError):  # a stream: the config's size
        return cfg.data.n_val


class _RaceOver(Exception):
    """Raised by :class:`_Race` after the race's last step: the Trainer has no way to stop inside an epoch."""


class _Race(Callback):
    """Drives one probe run inside the experiment's own Trainer, so that the race is the first ``steps`` optimizer
    steps of the experiment's run: the same optimizer, learning-rate schedule (built for the whole run), gradient
    clipping, accumulation, AMP and weighting protocol.

    After each optimizer step it records the auxiliary losses; at :func:`_race_steps` it reads the main task on the
    validation split; with ``every`` it measures the diagnostics on the step's first micro-batch. Every reading and
    measurement runs under ``torch.random.fork_rng``: the validation loader's seed draw (and anything else random)
    must not shift the run's random stream, or a candidate's dropout would differ from the baseline's and the race
    would no longer be paired.
    """

    def __init__(self, steps: int, val_loader: Any, *, every: int | None, names: list[str], lookahead_lr: float,
                 read_start: bool) -> None:
        self.steps, self.val_loader, self.every, self.names = steps, val_loader, every, names
        self.lookahead_lr, self.read_start = lookahead_lr, read_start
        self.checkpoints = set(_race_steps(steps))
        self.validation: list[dict[str, Any]] = []
        self.start: dict[str, Any] | None = None
        self.cos: dict[str, list[float]] = {n: [] for n in names}
        self.affinity: dict[str, list[float]] = {n: [] for n in names}
        self.losses: dict[str, list[float]] = {n: [] for n in names}
        self.metrics: dict[str, list[float]] = {n: [] for n in names}
        self.shared_names: dict[str, list[str]] = {}
        self.measurements = self.epoch_ends = 0
        self._measured_at = -1
        self._batch: Any = None

    def _read(self, trainer: Any) -> dict[str, Any]:
        main = trainer.objective.main.name
        with torch.random.fork_rng(devices=[]):
            values = trainer.evaluate(trainer.model, trainer.objective, self.val_loader)
        return {"step": trainer.global_step, "loss": values[f"loss/{main}"], "metric": values.get(f"metric/{main}")}

    def on_fit_start(self, trainer: Any) -> None:
        if self.read_start:  # the baseline is also read before training: how far the race got from the start
            self.start = self._read(trainer)

    def on_train_batch_start(self, trainer: Any, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if metrics:  # the Trainer evaluated validation at this epoch's end: counted in the probe's cost
            self.epoch_ends += 1

    def on_before_backward(self, trainer: Any, report: Any) -> None:
        step = trainer.global_step
        if self.every is None or step % self.every or step == self._measured_at:
            return
        self._measured_at = step
        self.measurements += 1
        model, objective = trainer.model, trainer.objective
        main_loss = report.losses[objective.main.name]
        x = objective.inputs(self._batch)
        with torch.random.fork_rng(devices=[]):
            for name in self.names:
                shared, g0, gk = _shared_grads(model, main_loss, report.losses[name])
                if not shared:
                    raise AuxLossError(f"task {name!r} shares no parameter with the main task: it cannot affect it. "
                                       "Tap a layer of the trunk.")
                self.shared_names[name] = [n for n, _ in shared]
                v0 = torch.cat([g.flatten() for g in g0])
                vk = torch.cat([g.flatten() for g in gk])
                denom = float(v0.norm() * vk.norm())
                self.cos[name].append(float(v0 @ vk) / denom if denom > 0 else 0.0)
                self.affinity[name].append(_lookahead(model, objective, self._batch, x, shared, gk,
                                                      self.lookahead_lr, float(main_loss.detach())))

    def on_train_batch_end(self, trainer: Any, report: Any, batch_idx: int) -> None:
        for name in self.names:
            self.losses[name].append(float(report.losses[name].detach()))
            if name in report.metrics:
                self.metrics[name].append(float(report.metrics[name]))
        if trainer.global_step in self.checkpoints:
            self.validation.append(self._read(trainer))
        if trainer.global_step >= self.steps:
            raise _RaceOver


def _short_run(cfg: ExperimentConfig, variant: str, *, steps: int, seed: int, every: int | None = None,
               lookahead_lr: float = 0.1) -> dict[str, Any]:
    """The first ``steps`` optimizer steps of ``variant``'s (or the baseline's) run on ``seed``, in the
    experiment's own Trainer, reading the main task's validation loss and metric at :func:`_race_steps`; with
    ``every``, measuring the diagnostics every ``every`` steps."""
    from auxloss.experiment.build import build_run

    built = build_run(cfg, variant, seed, device="cpu", check_weights=False)  # a shortened run on purpose
    model, objective, trainer = built.model, built.objective, built.trainer
    probing = every is not None
    if probing and (not isinstance(model, AuxModel) or not objective.aux_tasks):
        raise AuxLossError(f"variant {variant!r} has no auxiliary task to probe.")
    try:
        batches: int | None = len(built.loaders["train"])
    except TypeError:  # a stream: the full experiment's length is unknown
        batches = None
    if batches is not None:  # never past the end of the experiment's run (its settings, not a variant's own)
        steps = min(steps, cfg.train.epochs * max(1, math.ceil(batches / cfg.train.accumulate)))
    # The diagnostics take their own gradients from the step's losses. In representation mode the heads reach the
    # trunk only through the kept representations, which a diagnostic forward would clear: no diagnostics there.
    measurable = getattr(objective.weighting, "mode", None) != "representation"
    names = [t.name for t in objective.aux_tasks] if probing else []
    race = _Race(steps, built.loaders["val"], every=every if measurable else None, names=names,
                 lookahead_lr=lookahead_lr, read_start=not probing)
    val = built.loaders["val"]
    if isinstance(val, DataLoader) and val.generator is None:
        # Starting a loader's iterator draws its workers' base seed from the global random stream. Here it draws from
        # the loader's own generator instead, so that validation, read by some runs more often than by others,
        # leaves the training's random stream (dropout, augmentation) the same in every run: the race stays paired.
        val.generator = torch.Generator().manual_seed(seed)
    # The Trainer's own evaluation at each epoch end is kept for the weightings that use it (main_progress reads its
    # metrics, Auto-Lambda and AuxiLearn learn from validation batches) and skipped for the others: it would cost a
    # validation pass per epoch, shortening the race, without changing their training. Early stopping and the
    # train-split evaluation are off: they would end runs at different steps, or cost without changing training.
    weighting = objective.weighting
    uses_val = weighting is not None and (weighting.needs_validation or
                                          type(weighting).on_validation_end is not Weighting.on_validation_end)
    trainer.callbacks.append(race)
    trainer.eval_train, trainer.patience = False, None
    started = time.perf_counter()
    with contextlib.suppress(_RaceOver):
        trainer.fit(model, objective, built.loaders["train"], val if uses_val else None)
    seconds = time.perf_counter() - started
    n_val = _validation_size(built, cfg)
    evaluation = _evaluation_cost(n_val, cfg.data.batch_size)
    reads = len(race.validation) + (race.start is not None) + race.epoch_ends
    out: dict[str, Any] = {
        "variant": variant, "steps": steps, "validation": race.validation, "seconds": seconds,
        "higher_is_better": objective.main.higher_is_better, "batches_per_epoch": batches,
        "step_equivalents": steps * trainer.accumulate + race.measurements * _measurement_cost(len(names))
        + reads * evaluation}
    if race.start is not None:
        out["start"] = race.start
    if probing:
        tasks = {}
        for name in names:
            task = next(t for t in objective.aux_tasks if t.name == name)
            tasks[name] = _summarise(race.cos[name], race.affinity[name], race.losses[name], race.metrics[name],
                                     bounded_accuracy=task.higher_is_better and task.metric_name in
                                     ("accuracy", "binary_accuracy"))
            tasks[name]["shared_parameters"] = len(race.shared_names.get(name, []))
        out.update(measurements=race.measurements, every=every, tasks=tasks, diagnostics=measurable)
    return out


def probe_variant(cfg: ExperimentConfig, variant: str, *, steps: int = 200, every: int = 10, seed: int = 0,
                  lookahead_lr: float = 0.1) -> dict[str, Any]:
    """Probe one candidate variant: its short run's held-out main loss at the race's points, and the diagnostics
    per auxiliary task."""
    return _short_run(cfg, variant, steps=steps, seed=seed, every=every, lookahead_lr=lookahead_lr)


def race(baseline: list[dict[str, Any]], candidate: list[dict[str, Any]], *,
         higher_is_better: bool = True) -> dict[str, Any]:
    """The candidate against the baseline at the same steps: the mean relative fall of the held-out main loss,
    ``mean_i (L_base,i − L_cand,i) / L_base,i`` (positive: the candidate generalises better), and the mean change
    of the main metric, signed so that positive is better."""
    if [b["step"] for b in baseline] != [c["step"] for c in candidate] or not baseline:
        raise AuxLossError("the race compares the baseline and a candidate at the same steps; they were read at "
                           f"{[b['step'] for b in baseline]} and {[c['step'] for c in candidate]}.")
    gains = [(b["loss"] - c["loss"]) / abs(b["loss"]) if b["loss"] else 0.0 for b, c in zip(baseline, candidate)]
    sign = 1.0 if higher_is_better else -1.0
    if all(b["metric"] is not None and c["metric"] is not None for b, c in zip(baseline, candidate)):
        deltas = [sign * (c["metric"] - b["metric"]) for b, c in zip(baseline, candidate)]
        metric_delta: float | None = sum(deltas) / len(deltas)
    else:
        metric_delta = None
    return {"loss_gain": sum(gains) / len(gains), "metric_delta": metric_delta,
            "steps": [b["step"] for b in baseline]}


def _lookahead(model: nn.Module, objective: Any, batch: Any, x: Any, shared: list[tuple[str, nn.Parameter]],
               grads: tuple[Tensor, ...], lr: float, base_loss: float) -> float:
    """TAG's affinity: 1 − L_main(θ − η·g_aux) / L_main(θ), on the same batch, without touching the model."""
    if base_loss <= 0:
        return 0.0
    was_training = model.training
    model.eval()  # no dropout noise and no BatchNorm statistics update in the look-ahead forward
    try:
        with torch.no_grad():
            params = {n: p - lr * g for (n, p), g in zip(shared, grads)}
            after = _main_loss(objective, functional_call(model, params, (x,), strict=False), batch)
            before = _main_loss(objective, model(x), batch)
    finally:
        model.train(was_training)
    # Both losses in eval mode, so the ratio measures the step, not the train/eval difference.
    return 1.0 - after / before if before > 0 else 0.0


def _summarise(cos: list[float], aff: list[float], losses: list[float], metrics: list[float], *,
               bounded_accuracy: bool = True) -> dict[str, Any]:
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    fall = 1.0 - last / first if first > 0 else 0.0
    early_metric = sum(metrics[: max(1, len(metrics) // 5)]) / max(1, len(metrics[: max(1, len(metrics) // 5)])) \
        if metrics else None
    final_metric = sum(metrics[-k:]) / len(metrics[-k:]) if metrics else None
    # "Too easy" reads an accuracy-like metric (in [0, 1], higher is better) near 1 early on; for other metrics
    # (an error, lower is better) only the fall of the loss is judged.
    if bounded_accuracy and early_metric is not None and early_metric > 0.97:
        learn = "too easy"
    elif fall < 0.1:
        learn = "too hard"
    else:
        learn = "learnable"
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan
    return {
        "cosine": mean(cos),
        "cosine_positive_fraction": sum(c > 0 for c in cos) / len(cos) if cos else math.nan,
        "affinity": mean(aff),
        "loss_fall": fall,
        "metric_early": early_metric,
        "metric_final": final_metric,
        "learning": learn,
    }


def _measurement_cost(n_aux: int) -> int:
    """A measurement's cost in training steps, for ``n_aux`` auxiliary tasks.

    Per task: the main and auxiliary gradients (two backward passes) and the look-ahead's two forward passes. A
    training step is one forward and one backward, and a backward costs about two forwards, so each task's
    measurement costs (2·2 + 2) / 3 = 2 training steps.
    """
    return 2 * n_aux


def experiment_steps(cfg: ExperimentConfig) -> int:
    """Training steps of the full experiment: every variant and the baseline, every seed, every epoch."""
    return run_steps(cfg) * cfg.seeds * (len(cfg.variants) + 1)


def _batches_per_epoch(cfg: ExperimentConfig) -> int:
    n_train, batch = cfg.data.n_train, cfg.data.batch_size
    return n_train // batch if n_train > batch else 1  # the loader drops a last partial batch (build_run)


def run_steps(cfg: ExperimentConfig) -> int:
    """Training steps (forward and backward passes on a batch) of one run of the experiment (one variant, one
    seed)."""
    return _batches_per_epoch(cfg) * cfg.train.epochs


def _run_optimizer_steps(cfg: ExperimentConfig) -> int:
    """Optimizer steps of one run: with accumulation, a last partial group of micro-batches still steps."""
    return math.ceil(_batches_per_epoch(cfg) / cfg.train.accumulate) * cfg.train.epochs


#: The probe's default budget: its cost, counted in training steps (measurements and evaluations included, see
#: :func:`_measurement_cost` and :func:`_evaluation_cost`), is at most this fraction of the full experiment's
#: training steps.
DEFAULT_BUDGET = 0.2
MIN_STEPS = 10   # below this the race says nothing; a config too small for it is probed over budget
#: The least relative fall of the baseline's held-out main loss over the race below which probe.md warns that the race
#: saw only the start of training.
MIN_PROGRESS = 0.1


def plan_probe(cfg: ExperimentConfig, budget: float = DEFAULT_BUDGET, *, steps: int | None = None,
               every: int | None = None) -> dict[str, Any]:
    """Steps per run and measurement interval that keep the probe within ``budget`` of the experiment.

    The race trains the baseline and every candidate for the same number of steps (a fair comparison), and
    evaluates each run's validation split :data:`RACE_POINTS` times. With ``steps`` given it is used as it is (the
    cost is then only reported). Otherwise ``steps`` (optimizer steps) is the largest number, at most one run of
    the experiment, whose cost ``(C + 1)·(steps·accumulate + 3·eval) + eval + Σ_c measurements · 2·K_c`` fits
    ``budget · experiment_steps`` (the baseline is also evaluated at step 0), with at most 5 diagnostic
    measurements per candidate, or at most 3 where 5 would take more than a tenth of the budget. A budget too small
    for even :data:`MIN_STEPS` steps per run is stretched to :data:`MIN_STEPS` (or the whole run, if shorter) with
    at most 3 measurements, and ``over_budget`` says so.
    """
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise AuxLossError(f"budget must be a fraction of the experiment's training steps in (0, 1], got {budget!r};"
                           " the default is 0.2.")
    ks = [len(v.tasks) for v in cfg.variants if v.tasks]
    runs = len(ks) + 1  # every candidate and the baseline
    accumulate = cfg.train.accumulate
    full = experiment_steps(cfg)
    allowance = budget * full
    evaluation = _evaluation_cost(cfg.data.n_val, cfg.data.batch_size)

    def cost(n: int, every_n: int) -> int:
        """What a race of ``n`` optimizer steps costs, in training steps: the runs' micro-batches; each run's
        readings and the baseline's read at step 0; the candidates' diagnostic measurements. (A weighting that
        reads validation at epoch ends adds those evaluations; they are counted when made, not planned.)"""
        reads = runs * len(_race_steps(n)) + 1
        return runs * n * accumulate + reads * evaluation + sum(-(-n // every_n) * _measurement_cost(k) for k in ks)

    over = False
    if steps is None:
        # The diagnostics may take at most a tenth of the budget: the race's steps are what rank the candidates.
        n_meas = 5 if sum(5 * _measurement_cost(k) for k in ks) <= 0.1 * allowance else 3
        length = _run_optimizer_steps(cfg)
        # The cost grows with the steps: the longest race, at most one run, that fits (a bisection).
        lo, hi = 0, length
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid, -(-mid // n_meas)) <= allowance else (lo, mid - 1)
        steps = lo
        if steps < min(MIN_STEPS, length):  # the budget, not the run's own length, is what is short
            steps, n_meas, over = min(MIN_STEPS, length), 3, True
        every = every if every is not None else -(-steps // n_meas)
    elif every is None:
        every = -(-steps // 5) if isinstance(steps, int) and steps > 0 else steps
    if not isinstance(steps, int) or steps < 1 or not isinstance(every, int) or every < 1:
        raise AuxLossError(f"steps and every must be positive integers, got steps={steps!r}, every={every!r}.")
    total = cost(steps, every)
    return {"steps": steps, "every": every, "budget": budget, "experiment_steps": full, "probe_steps": total,
            "cost_fraction": total / full if full else None, "over_budget": over or total > allowance}


def run_probe(cfg: ExperimentConfig, out: str | Path, *, steps: int | None = None, every: int | None = None,
              seed: int = 0, lookahead_lr: float = 0.1, results: str | Path | None = None,
              budget: float = DEFAULT_BUDGET) -> dict[str, Any]:
    """Race every variant of ``cfg`` against the baseline, rank the candidates, and write ``probe.json`` and
    ``probe.md``.

    By default the probe costs at most ``budget`` (20%) of the full experiment's training steps
    (:func:`plan_probe`); ``steps``/``every`` override the plan.
    """
    from auxloss.experiment.spec import BASELINE

    out = Path(out)
    if not cfg.variants:
        raise AuxLossError("the config lists no variants: each variant is a candidate auxiliary task to probe.")
    plan = plan_probe(cfg, budget, steps=steps, every=every)
    steps, every = plan["steps"], plan["every"]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = _short_run(cfg, BASELINE, steps=steps, seed=seed)
    steps = base["steps"]  # capped at one run of the experiment, for every candidate alike
    candidates = []
    for variant in cfg.variants:
        if not variant.tasks:
            continue
        probed = probe_variant(cfg, variant.name, steps=steps, every=every, seed=seed, lookahead_lr=lookahead_lr)
        raced = race(base["validation"], probed["validation"], higher_is_better=probed["higher_is_better"])
        tasks = probed["tasks"].values()
        cosine = sum(t["cosine"] for t in tasks) / len(tasks)
        learning = sorted({t["learning"] for t in tasks})
        # The score is the main metric's change, the quantity the full experiment compares; the held-out loss
        # stands in for a main task without a metric and breaks ties. The loss alone misled: on the shapes demo a
        # shuffled-label task lowered the held-out loss (its noise made the main head less confident) while it
        # cost accuracy, as it did in the full experiment (-23 points).
        score = raced["metric_delta"] if raced["metric_delta"] is not None else raced["loss_gain"]
        candidates.append({"variant": variant.name, "score": score, "loss_gain": raced["loss_gain"],
                           "metric_delta": raced["metric_delta"], "cosine": cosine,
                           "affinity": sum(t["affinity"] for t in tasks) / len(tasks), "learning": learning,
                           "recommended": score > 0, **probed})
    candidates.sort(key=lambda c: (c["score"], c["loss_gain"]), reverse=True)
    for rank, c in enumerate(candidates, 1):
        c["rank"] = rank
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {**plan, "name": cfg.name, "steps": steps, "every": every, "seed": seed,
                               "lookahead_lr": lookahead_lr, "seconds": seconds, "baseline": base,
                               "candidates": candidates}
    # How far the baseline got: a race too short for the main task to leave where it started ranks noise. Read on
    # the loss: a relative change of an accuracy that starts near zero is large after any step at all.
    first, last = base["start"]["loss"], base["validation"][-1]["loss"]
    summary["baseline_progress"] = 1.0 - last / first if first > 0 else None
    summary["too_short"] = summary["baseline_progress"] is not None and summary["baseline_progress"] < MIN_PROGRESS
    # Counted, not estimated: the steps, measurements and evaluations actually made, against the experiment's.
    summary["probe_steps"] = base["step_equivalents"] + sum(c["step_equivalents"] for c in candidates)
    full = plan["experiment_steps"]
    if base.get("batches_per_epoch"):  # the training loader's own length (the user's data ignores data.n_train)
        full = base["batches_per_epoch"] * cfg.train.epochs * cfg.seeds * (len(cfg.variants) + 1)
        summary["experiment_steps"] = full
    summary["cost_fraction"] = summary["probe_steps"] / full if full else None
    summary["cost_fraction_estimate"] = summary["cost_fraction"]  # the former key
    if summary["cost_fraction"] is not None:  # the count, not the plan's estimate (the user's data may differ)
        summary["over_budget"] = summary["cost_fraction"] > budget
    results_path = Path(results) / "results.json" if results else out / "results.json"
    if results_path.exists():
        summary["agreement"] = agreement(candidates, json.loads(results_path.read_text()))
    (out / "probe.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    (out / "probe.md").write_text(format_probe(summary))
    return summary


def agreement(candidates: list[dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    """How well the probe's scores rank the full experiment's deltas (Spearman's rho over shared variants)."""
    from scipy.stats import spearmanr

    deltas = {c["variant"]: c["delta"] for c in results.get("comparisons", [])}
    if not results.get("higher_is_better", True):
        deltas = {k: -v for k, v in deltas.items()}
    # The probe's ranking, ties in the score broken as the ranking breaks them (by the held-out loss).
    shared = [c for c in candidates if c["variant"] in deltas]
    both = [(-c["rank"] if "rank" in c else c["score"], deltas[c["variant"]]) for c in shared]
    entry: dict[str, Any] = {"variants": [c["variant"] for c in shared], "deltas": [d for _, d in both],
                             "scores": [c["score"] for c in shared]}
    if len(both) >= 3 and len({d for _, d in both}) == 1:
        entry["spearman_rho"], entry["p_value"] = None, None
        entry["note"] = "every measured delta is the same: no rank correlation"
    elif len(both) >= 3:
        rho = spearmanr([s for s, _ in both], [d for _, d in both])
        entry["spearman_rho"], entry["p_value"] = float(rho.statistic), float(rho.pvalue)
    else:
        entry["spearman_rho"], entry["p_value"] = None, None
        entry["note"] = "fewer than 3 candidates in both: no rank correlation"
    if "timing" in results and results["timing"].get("total_seconds"):
        entry["full_experiment_seconds"] = results["timing"]["total_seconds"]
    return entry


def _signed(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if value is None else f"{scale * value:+.{digits}f}"


def format_probe(summary: dict[str, Any]) -> str:
    steps = summary["steps"]
    points = _race_steps(steps)
    lines = [f"# Probe: {summary['name']}", "",
             (f"The baseline and every candidate trained {steps} steps on seed {summary['seed']}, from the same "
             f"weights and in the same batch order; the main task's validation loss and metric were read after "
             f"steps {', '.join(map(str, points))} and averaged. {summary['seconds']:.0f} s in all."), "",
             ("| rank | candidate | held-out main loss vs baseline | main metric Δ | recommended | task | affinity Z "
             "| cosine | cos > 0 | loss fall | learning |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in summary["candidates"]:
        for task, t in c["tasks"].items():
            lines.append(f"| {c['rank']} | {c['variant']} | {_signed(-c['loss_gain'], 100, 1)}% | "
                         f"{_signed(c.get('metric_delta'), 1.0, 4)} | {'yes' if c['recommended'] else 'no'} | "
                         f"{task} | {t['affinity']:+.4f} | {t['cosine']:+.3f} | {t['cosine_positive_fraction']:.0%} "
                         f"| {t['loss_fall']:.0%} | {t['learning']} |")
    rec = [c["variant"] for c in summary["candidates"] if c["recommended"]]
    lines += ["", "Recommended for a full experiment: " + (", ".join(rec) if rec else
              "none: no candidate raised the main task's held-out metric above the baseline's."),
              "", ("Candidates are ranked by the main metric's change (positive: better than the baseline at the "
                   "same steps; ties broken by the held-out loss, where negative is better). The affinity, cosine "
                   "and learning columns are diagnostics measured on training batches; they do not enter the "
                   "ranking."), ""]
    base = summary.get("baseline")
    if base and base.get("start"):
        start, end = base["start"], base["validation"][-1]
        moved = f"the baseline's held-out main loss went from {start['loss']:.4g} to {end['loss']:.4g}"
        if start["metric"] is not None and end["metric"] is not None:
            moved += f" and its metric from {start['metric']:.4g} to {end['metric']:.4g}"
        lines += [f"Over the race {moved}.", ""]
    if summary.get("too_short"):
        lines += [(f"**Early in training:** over the race the baseline's held-out main loss fell by less than "
                   f"{MIN_PROGRESS:.0%} of where it started, so the race saw the start of training only and its "
                   "ranking may not hold at the end. A larger --budget (or --steps) races further."), ""]
    if summary.get("cost_fraction") is not None:
        budget = summary.get("budget")
        lines.append(f"The probe cost {summary['cost_fraction']:.1%} of the full experiment's training steps "
                     f"({summary.get('probe_steps')} of {summary.get('experiment_steps')}, the baseline's run, "
                     "measurements and evaluations included)"
                     + (f"; budget {budget:.0%}." if budget is not None else "."))
        if summary.get("over_budget"):
            lines.append(f"Over budget: the experiment is too small for a probe of {MIN_STEPS} steps per run within "
                         "it; read the ranking as a rough guide.")
    ag = summary.get("agreement")
    if ag:
        rho = ag.get("spearman_rho")
        lines.append("")
        lines.append("Against the full experiment: " + (f"Spearman rho = {rho:+.2f} between the probe's scores and "
                     f"the measured deltas over {len(ag['variants'])} variants." if rho is not None else ag["note"]))
    return "\n".join(lines) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
