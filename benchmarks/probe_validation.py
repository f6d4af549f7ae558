"""Does `auxloss probe` pick what the full experiment then finds? Checked where the answer is known.

For each case a full experiment is run (every variant against the baseline, paired by seed) and the probe is run on
the same config at its default budget (20% of the experiment's training steps). Reported per case: the probe's
cost, Spearman's ρ between the probe's ranking and the measured deltas (with 3 or more candidates), and the hit rate
of its recommendation: a candidate is a hit when the probe recommends it and its measured delta is positive, or
does not recommend it and the delta is not positive.

Cases:

- ``shapes``: the shapes demo (quick config): the mask task helps, the shuffled-label task hurts;
- ``deep-mlp`` and ``shallow-mlp``: deep supervision (heads on intermediate layers at GoogLeNet's 0.3) on a 12-layer
  tanh MLP whose early layers starve for gradient, where it should help, and on a 2-layer one, where it should not;
- ``multi-fashion``: the right garment as the auxiliary task of the left one, tapped after each of the three blocks,
  and the same labels shuffled (a task that says nothing).

    python benchmarks/probe_validation.py [--cases shapes,deep-mlp,...] [--out DIR] [--fresh]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

import torch

from auxloss.experiment.config import parse_config
from auxloss.experiment.demos import demo_config
from auxloss.experiment.probe import run_probe
from auxloss.experiment.runner import run_experiment
from auxloss.zoo.data.idx import fashion_mnist_available


def _mlp(depth: int, layers: list[int]) -> dict[str, Any]:
    heads = {f"aux{i}": {"layer": f"layers.{layer}", "head": {"type": "linear"}} for i, layer in enumerate(layers)}
    return {
        "name": f"mlp-depth{depth}", "seeds": 3,
        "data": {"name": "digits", "n_train": 300, "n_val": 300, "n_test": 1000, "batch_size": 32,
                 "params": {"flatten": True}},
        "model": {"name": "deep_mlp", "params": {"hidden": 32, "depth": depth}},
        "train": {"epochs": 10, "lr": 0.001, "optimizer": "adam", "eval_train": False},
        "variants": [{"name": f"ds-{name}", "taps": {name: tap},
                      "tasks": [{"name": name, "source": name, "weight": 0.3}]} for name, tap in heads.items()]
        + [{"name": "ds-all", "taps": heads,
            "tasks": [{"name": n, "source": n, "weight": 0.3} for n in heads]}],
    }


def _multi_fashion() -> dict[str, Any]:
    def variant(name: str, layer: str, shuffle: bool = False) -> dict[str, Any]:
        task = {"name": "right", "source": "right", "target": "right", "weight": 1.0}
        if shuffle:
            task["shuffle_target"] = True
        return {"name": name, "taps": {"right": {"layer": layer, "head": {"type": "linear"}}}, "tasks": [task]}

    return {
        "name": "multi-fashion-probe", "seeds": 3,
        "data": {"name": "multi-fashion", "n_train": 2000, "n_val": 500, "n_test": 2000, "batch_size": 64},
        "model": {"name": "small_cnn", "params": {"width": 4}},
        "train": {"epochs": 3, "lr": 0.001, "optimizer": "adam", "eval_train": False},
        "variants": [variant("right-block1", "block1"), variant("right-block2", "block2"),
                     variant("right-block3", "block3"), variant("shuffled-block3", "block3", shuffle=True)],
    }


def cases() -> dict[str, Any]:
    out: dict[str, Any] = {
        "shapes": lambda: demo_config("shapes", quick=True),
        "deep-mlp": lambda: parse_config(_mlp(12, [2, 5, 8])),
        "shallow-mlp": lambda: parse_config(_mlp(2, [0, 1])),
    }
    if fashion_mnist_available():
        out["multi-fashion"] = lambda: parse_config(_multi_fashion())
    return out


def validate(name: str, cfg: Any, out: Path, *, fresh: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    # Without --fresh, a folder that already holds this experiment's finished runs is reused (a second look at the
    # probe costs only the probe).
    results = run_experiment(cfg, out / name, force=fresh)
    experiment_s = time.perf_counter() - started
    deltas = {c["variant"]: c["delta"] for c in results["comparisons"]}
    verdicts = {c["variant"]: c["verdict"] for c in results["comparisons"]}
    summary = run_probe(cfg, out / name / "probe", results=out / name)
    hits = [(c["recommended"] == (deltas[c["variant"]] > 0)) for c in summary["candidates"]]
    best_measured = max(deltas, key=deltas.get)
    return {
        "case": name,
        "candidates": [{"variant": c["variant"], "score": c["score"], "loss_gain": c["loss_gain"],
                        "affinity": c["affinity"], "cosine": c["cosine"],
                        "recommended": c["recommended"], "delta": deltas[c["variant"]],
                        "verdict": verdicts[c["variant"]]} for c in summary["candidates"]],
        "spearman_rho": summary["agreement"]["spearman_rho"],
        "hit_rate": sum(hits) / len(hits),
        "top_is_best": summary["candidates"][0]["variant"] == best_measured,
        "cost_fraction": summary["cost_fraction"],
        "steps_per_candidate": summary["steps"],
        "probe_seconds": summary["seconds"],
        "experiment_seconds": experiment_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="", help="comma-separated (default: all)")
    parser.add_argument("--out", default="runs/probe-validation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="retrain the experiments even if --out holds them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    available = cases()
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()] or list(available)
    rows = []
    for name in chosen:
        row = validate(name, available[name](), Path(args.out), fresh=args.fresh)
        rows.append(row)
        print(f"{name}: rho {row['spearman_rho']}, hit rate {row['hit_rate']:.2f}, cost {row['cost_fraction']:.1%}",
              flush=True)
    print()
    print("| case | candidate | probe: main metric Δ | probe: held-out loss fall | affinity | cosine | recommended "
          "| measured Δ | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for c in row["candidates"]:
            print(f"| {row['case']} | {c['variant']} | {100 * c['score']:+.2f} | {100 * c['loss_gain']:+.1f}% | "
                  f"{c['affinity']:+.4f} | {c['cosine']:+.3f} | {'yes' if c['recommended'] else 'no'} | "
                  f"{100 * c['delta']:+.2f} | {c['verdict']} |")
    print()
    print("| case | Spearman ρ | hit rate | top-ranked is the best measured | probe cost |")
    print("|---|---|---|---|---|")
    for row in rows:
        rho = f"{row['spearman_rho']:+.2f}" if row["spearman_rho"] is not None else "n/a"
        print(f"| {row['case']} | {rho} | {row['hit_rate']:.0%} | {'yes' if row['top_is_best'] else 'no'} | "
              f"{row['cost_fraction']:.1%} |")
    print(json.dumps({"date": datetime.date.today().isoformat(), "cases": rows}, default=str))


if __name__ == "__main__":
    main()
