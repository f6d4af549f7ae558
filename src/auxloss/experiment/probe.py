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
from auxloss.taps import AuxModel

__all__ = ["probe_variant", "run_probe"]


def _shared(model: nn.Module, main_loss: Tensor, aux_loss: Tensor) -> list[tuple[str, nn.Parameter]]:
    """Parameters that both losses reach (the ones an auxiliary task shapes for the main task)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    g0 = torch.autograd.grad(main_loss, params, retain_graph=True, allow_unused=True)
    gk = torch.autograd.grad(aux_loss, params, retain_graph=True, allow_unused=True)
    return [(n, p) for (n, p), a, b in zip(named, g0, gk) if a is not None and b is not None]


def probe_variant(cfg: ExperimentConfig, variant: str, *, steps: int = 200, every: int = 10, seed: int = 0,
                  lookahead_lr: float = 0.1) -> dict[str, Any]:
    """Probe one candidate variant; returns its measurements per auxiliary task."""
    from auxloss.experiment.build import build_run
    from auxloss.train.trainer import move_to

    built = build_run(cfg, variant, seed, device="cpu")
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
    step = 0
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
                for name in names:
                    aux_loss = report.losses[name]
                    shared = _shared(model, main_loss, aux_loss)
                    if not shared:
                        raise AuxLossError(f"task {name!r} shares no parameter with the main task: it cannot "
                                           "affect it. Tap a layer of the trunk.")
                    shared_names[name] = [n for n, _ in shared]
                    params = [p for _, p in shared]
                    g0 = torch.autograd.grad(main_loss, params, retain_graph=True)
                    gk = torch.autograd.grad(aux_loss, params, retain_graph=True)
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
    return {"variant": variant, "steps": steps, "seconds": seconds, "batches_per_epoch": batches, "tasks": tasks}


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
            out = functional_call(model, params, (x,), strict=False)
            after = float(objective(out, batch).losses[objective.main.name])
            out0 = model(x)
            before = float(objective(out0, batch).losses[objective.main.name])
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


def run_probe(cfg: ExperimentConfig, out: str | Path, *, steps: int = 200, every: int = 10, seed: int = 0,
              lookahead_lr: float = 0.1, results: str | Path | None = None) -> dict[str, Any]:
    """Probe every variant of ``cfg``, rank the candidates, and write ``probe.json`` and ``probe.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.variants:
        raise AuxLossError("the config lists no variants: each variant is a candidate auxiliary task to probe.")
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
                               "lookahead_lr": lookahead_lr, "seconds": seconds, "candidates": candidates}
    # Cost relative to a full experiment: the same per-step cost over every run's steps.
    # The training loader's own length (the user's data ignores data.n_train), else the config's sizes.
    measured = [c["batches_per_epoch"] for c in candidates if c.get("batches_per_epoch")]
    from auxloss.experiment.usercode import is_user_reference

    steps_per_epoch = measured[0] if measured else \
        0 if is_user_reference(cfg.data.name) else max(1, cfg.data.n_train // cfg.data.batch_size)
    full_steps = steps_per_epoch * cfg.train.epochs * cfg.seeds * (len(cfg.variants) + 1)
    probe_steps = steps * len(candidates)
    summary["cost_fraction_estimate"] = probe_steps / full_steps if full_steps else None
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
    if summary.get("cost_fraction_estimate") is not None:
        lines.append(f"The probe costs about {summary['cost_fraction_estimate']:.1%} of the full experiment's "
                     "training steps.")
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
