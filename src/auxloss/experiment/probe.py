"""Choose auxiliary tasks before a full experiment: ``auxloss probe CONFIG``.

Each variant of the config is a candidate. For each one, a short run (a few hundred steps, one seed) trains the
main task with the candidate's auxiliary tasks and measures, every few steps, on the current batch:

- the **gradient cosine** between the main task's and the auxiliary task's gradients on the shared parameters;
- the **look-ahead affinity** of Fifty et al. 2021 ("Efficiently Identifying Task Groupings", TAG): take one SGD
  step on the shared parameters with the auxiliary loss alone, θ' = θ − η·∇θ L_aux, and measure
  ``Z = 1 − L_main(θ') / L_main(θ)``; positive means a step on the auxiliary task lowers the main loss;
- how fast the auxiliary task is **learned**: the fall of its loss, and its metric early and at the end. A task
  learned almost at once is *too easy* (it stops shaping the features); one whose loss barely moves is *too
  hard* (or unrelated to what the trunk can represent).

Candidates are ranked by affinity and the ones worth a full experiment are recommended. When the same output
folder (or ``--results``) holds a finished experiment's ``results.json``, the probe's ranking is compared with the
full experiment's deltas (Spearman's rank correlation).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from auxloss.errors import AuxLossError
from auxloss.experiment.config import ExperimentConfig
from auxloss.taps import AuxModel, Outputs
from auxloss.tasks import batch_as_dict

__all__ = ["DEFAULT_BUDGET", "experiment_steps", "plan_probe", "probe_variant", "run_probe"]


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


def probe_variant(cfg: ExperimentConfig, variant: str, *, steps: int = 200, every: int = 10, seed: int = 0,
                  lookahead_lr: float = 0.1) -> dict[str, Any]:
    """Probe one candidate variant; returns its measurements per auxiliary task."""
    from auxloss.experiment.build import build_run
    from auxloss.train.batches import move_to

    built = build_run(cfg, variant, seed, device="cpu", check_weights=False)  # a shortened run on purpose
    model, objective = built.model, built.objective
    if not isinstance(model, AuxModel) or not objective.aux_tasks:
        raise AuxLossError(f"variant {variant!r} has no auxiliary task to probe.")
    optimizer = built.trainer.build_optimizer(list(model.parameters()) + list(objective.parameters()))
    names = [t.name for t in objective.aux_tasks]
    cos: dict[str, list[float]] = {n: [] for n in names}
    affinity: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    metrics: dict[str, list[float]] = {n: [] for n in names}
    shared_names: dict[str, list[str]] = {}
    started = time.perf_counter()
    step = measurements = 0
    model.train()
    while step < steps:
        for batch in built.loaders["train"]:
            if step >= steps:
                break
            batch = move_to(batch, "cpu")
            x = objective.inputs(batch)
            report = objective(model(x), batch)
            main_loss = report.losses[objective.main.name]
            if step % every == 0:
                measurements += 1
                for name in names:
                    aux_loss = report.losses[name]
                    shared, g0, gk = _shared_grads(model, main_loss, aux_loss)
                    if not shared:
                        raise AuxLossError(f"task {name!r} shares no parameter with the main task: it cannot "
                                           "affect it. Tap a layer of the trunk.")
                    shared_names[name] = [n for n, _ in shared]
                    v0 = torch.cat([g.flatten() for g in g0])
                    vk = torch.cat([g.flatten() for g in gk])
                    denom = float(v0.norm() * vk.norm())
                    cos[name].append(float(v0 @ vk) / denom if denom > 0 else 0.0)
                    affinity[name].append(_lookahead(model, objective, batch, x, shared, gk, lookahead_lr,
                                                     float(main_loss.detach())))
            for name in names:
                losses[name].append(float(report.losses[name].detach()))
                if name in report.metrics:
                    metrics[name].append(float(report.metrics[name]))
            optimizer.zero_grad(set_to_none=True)
            objective.backward(report)  # the configured method (a gradient-aware weighting refuses total.backward())
            optimizer.step()
            objective.advance()
            step += 1
    seconds = time.perf_counter() - started
    tasks = {}
    for name in names:
        task = next(t for t in objective.aux_tasks if t.name == name)
        tasks[name] = _summarise(cos[name], affinity[name], losses[name], metrics[name],
                                 bounded_accuracy=task.higher_is_better and task.metric_name in
                                 ("accuracy", "binary_accuracy"))
        tasks[name]["shared_parameters"] = len(shared_names.get(name, []))
    try:
        batches = len(built.loaders["train"])
    except TypeError:  # a stream: the full experiment's length is unknown
        batches = None
    return {"variant": variant, "steps": steps, "measurements": measurements, "every": every,
            "step_equivalents": steps + measurements * _measurement_cost(len(names)), "seconds": seconds,
            "batches_per_epoch": batches, "tasks": tasks}


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
    n_train, batch = cfg.data.n_train, cfg.data.batch_size
    per_epoch = n_train // batch if n_train > batch else 1  # the loader drops a last partial batch (build_run)
    return per_epoch * cfg.train.epochs * cfg.seeds * (len(cfg.variants) + 1)


#: The probe's default budget: its cost, counted in training steps (measurements included, see
#: :func:`_measurement_cost`), is at most this fraction of the full experiment's training steps.
DEFAULT_BUDGET = 0.2
MAX_STEPS = 200  # a bigger budget buys no more than this per candidate: the measurements have settled by then
MIN_STEPS = 10   # below this the learning curve says nothing; a config too small for it is probed over budget


def plan_probe(cfg: ExperimentConfig, budget: float = DEFAULT_BUDGET, *, steps: int | None = None,
               every: int | None = None) -> dict[str, Any]:
    """Steps per candidate and measurement interval that keep the probe within ``budget`` of the experiment.

    Every candidate gets the same number of steps (a fair ranking). With ``steps`` given it is used as it is (the
    cost is then only reported). Otherwise the largest ``steps`` (at most :data:`MAX_STEPS`) whose cost,
    ``Σ_c steps + measurements · 2·K_c`` over the candidates, fits ``budget · experiment_steps``, with about 10
    measurements per candidate (5, then 3, when the budget is tight). A config so small that not even
    :data:`MIN_STEPS` fit is probed with :data:`MIN_STEPS` and 3 measurements, and ``over_budget`` says so.
    """
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise AuxLossError(f"budget must be a fraction of the experiment's training steps in (0, 1], got {budget!r};"
                           " the default is 0.2.")
    ks = [len(v.tasks) for v in cfg.variants if v.tasks]
    full = experiment_steps(cfg)
    allowance = budget * full
    over = False
    if steps is None:
        for n_meas in (10, 5, 3):
            fit = int((allowance - sum(n_meas * _measurement_cost(k) for k in ks)) // max(1, len(ks)))
            if fit >= max(MIN_STEPS, n_meas):
                break
        steps = min(MAX_STEPS, fit)
        if steps < MIN_STEPS:
            steps, n_meas, over = MIN_STEPS, 3, True
        every = every if every is not None else -(-steps // n_meas)
    elif every is None:
        every = 10
    if not isinstance(steps, int) or steps < 1 or not isinstance(every, int) or every < 1:
        raise AuxLossError(f"steps and every must be positive integers, got steps={steps!r}, every={every!r}.")
    measurements = -(-steps // every)
    cost = sum(steps + measurements * _measurement_cost(k) for k in ks)
    return {"steps": steps, "every": every, "budget": budget, "experiment_steps": full, "probe_steps": cost,
            "cost_fraction": cost / full if full else None, "over_budget": over or cost > allowance}


def run_probe(cfg: ExperimentConfig, out: str | Path, *, steps: int | None = None, every: int | None = None,
              seed: int = 0, lookahead_lr: float = 0.1, results: str | Path | None = None,
              budget: float = DEFAULT_BUDGET) -> dict[str, Any]:
    """Probe every variant of ``cfg``, rank the candidates, and write ``probe.json`` and ``probe.md``.

    By default the probe costs at most ``budget`` (20%) of the full experiment's training steps
    (:func:`plan_probe`); ``steps``/``every`` override the plan.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.variants:
        raise AuxLossError("the config lists no variants: each variant is a candidate auxiliary task to probe.")
    plan = plan_probe(cfg, budget, steps=steps, every=every)
    steps, every = plan["steps"], plan["every"]
    started = time.perf_counter()
    candidates = []
    for variant in cfg.variants:
        if not variant.tasks:
            continue
        probed = probe_variant(cfg, variant.name, steps=steps, every=every, seed=seed, lookahead_lr=lookahead_lr)
        tasks = probed["tasks"].values()
        score = sum(t["affinity"] for t in tasks) / len(tasks)
        cosine = sum(t["cosine"] for t in tasks) / len(tasks)
        learning = sorted({t["learning"] for t in tasks})
        recommend = score > 0 and cosine > 0 and "too hard" not in learning
        candidates.append({"variant": variant.name, "score": score, "cosine": cosine, "learning": learning,
                           "recommended": recommend, **probed})
    candidates.sort(key=lambda c: c["score"], reverse=True)
    for rank, c in enumerate(candidates, 1):
        c["rank"] = rank
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {"name": cfg.name, "steps": steps, "every": every, "seed": seed,
                               "lookahead_lr": lookahead_lr, "seconds": seconds, "candidates": candidates, **plan}
    # Counted, not estimated: the steps and measurements actually made, against the experiment's steps.
    summary["probe_steps"] = sum(c["step_equivalents"] for c in candidates)
    full = plan["experiment_steps"]
    measured = [c["batches_per_epoch"] for c in candidates if c.get("batches_per_epoch")]
    if measured:  # the training loader's own length (the user's data ignores data.n_train)
        full = measured[0] * cfg.train.epochs * cfg.seeds * (len(cfg.variants) + 1)
        summary["experiment_steps"] = full
    summary["cost_fraction"] = summary["probe_steps"] / full if full else None
    summary["cost_fraction_estimate"] = summary["cost_fraction"]  # the former key
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
    both = [(c["score"], deltas[c["variant"]]) for c in candidates if c["variant"] in deltas]
    entry: dict[str, Any] = {"variants": [c["variant"] for c in candidates if c["variant"] in deltas],
                             "deltas": [d for _, d in both], "scores": [s for s, _ in both]}
    if len(both) >= 3:
        rho = spearmanr([s for s, _ in both], [d for _, d in both])
        entry["spearman_rho"], entry["p_value"] = float(rho.statistic), float(rho.pvalue)
    else:
        entry["spearman_rho"], entry["p_value"] = None, None
        entry["note"] = "fewer than 3 candidates in both: no rank correlation"
    if "timing" in results and results["timing"].get("total_seconds"):
        entry["full_experiment_seconds"] = results["timing"]["total_seconds"]
    return entry


def format_probe(summary: dict[str, Any]) -> str:
    lines = [f"# Probe: {summary['name']}", "",
             f"{summary['steps']} steps per candidate, seed {summary['seed']}, {summary['seconds']:.0f} s in all.",
             "", "| rank | candidate | task | affinity Z | cosine | cos > 0 | loss fall | learning | recommended |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in summary["candidates"]:
        for task, t in c["tasks"].items():
            lines.append(f"| {c['rank']} | {c['variant']} | {task} | {t['affinity']:+.4f} | {t['cosine']:+.3f} | "
                         f"{t['cosine_positive_fraction']:.0%} | {t['loss_fall']:.0%} | {t['learning']} | "
                         f"{'yes' if c['recommended'] else 'no'} |")
    rec = [c["variant"] for c in summary["candidates"] if c["recommended"]]
    lines += ["", "Recommended for a full experiment: " + (", ".join(rec) if rec else
              "none: every candidate's look-ahead step raises the main loss or is not learnable."), ""]
    if summary.get("cost_fraction") is not None:
        budget = summary.get("budget")
        lines.append(f"The probe cost {summary['cost_fraction']:.1%} of the full experiment's training steps "
                     f"({summary.get('probe_steps')} of {summary.get('experiment_steps')}, measurements included)"
                     + (f"; budget {budget:.0%}." if budget is not None else "."))
        if summary.get("over_budget"):
            lines.append(f"Over budget: the experiment is too small for a probe of {MIN_STEPS} steps per candidate "
                         "within it; read the ranking as a rough guide.")
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
