"""Multi-Fashion: every weighting auxloss offers, and LibMTL 1.1.5's versions of the same methods, side by side.

Each image holds two Fashion-MNIST garments overlaid with an offset (``auxloss.zoo.data.multi_fashion``): the left
one is the main task, the right one the auxiliary task. The model is a :class:`~auxloss.zoo.models.SmallCNN`
whose own classifier reads the left garment; a linear head on its last block (``block3``, the whole trunk shared)
reads the right one. Every method trains the same model from the same initial weights, on the same data and batch
order, for the same number of steps, with the same Trainer (Adam); only the weighting differs. The auxiliary
weight is λ = 1 (equal weights: auxloss's ``fixed`` is LibMTL's ``EW``).

Methods:

- ``baseline``: the main task alone (no head on the trunk), the reference of every paired delta;
- ``auxloss:<type>`` for every type of :data:`auxloss.weighting.WEIGHTINGS`, read from the registry at run time, so
  a method added there is benchmarked by name without touching this file (:data:`EXTRA_PARAMS` gives the few that
  need a parameter, e.g. GradNorm's layer);
- ``libmtl:<type>``: LibMTL 1.1.5's class for the same method (:data:`LIBMTL_CLASSES`), when LibMTL is importable.
  It runs inside auxloss's Trainer as a weighting whose backward is LibMTL's own ``backward(losses)``, so the loop,
  the data and the timing are the same and only the update differs.

Reported per method: main-task test accuracy (mean and 95% t-interval over seeds), the paired delta against the
baseline with its Holm-corrected verdict (:func:`auxloss.experiment.stats.compare`), and the time of a training
step (forward, objective, backward, optimizer step, on the process's CPU clock) relative to ``auxloss:fixed``'s
step: the median over seeds of the ratio within a seed. Methods run one seed at a time, in an order that rotates
from seed to seed, so drift in the machine's speed spreads over all methods.

    python benchmarks/multi_fashion.py [--quick] [--methods fixed,dwa,...] [--no-libmtl] [--out DIR]

LibMTL is never a dependency: install it into a separate environment (see benchmarks/README.md). Its top-level
package imports torchvision, which does not import beside a CPU torch 2.13, so its weighting modules are loaded
without it (:func:`weighting_cost.load_libmtl`'s approach). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import auxloss as al
from auxloss.errors import AuxLossError
from auxloss.experiment.stats import clip_interval, compare, mean_ci
from auxloss.train.callbacks import Callback
from auxloss.train.trainer import Trainer
from auxloss.weighting import WEIGHTINGS, build_weighting
from auxloss.weighting.base import GradientWeighting
from auxloss.weighting.registry import _split
from auxloss.zoo.data import DataRequest, build_splits
from auxloss.zoo.data.idx import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist_available
from auxloss.zoo.models import SmallCNN

#: The last shared layer, for the strategies whose config needs a ``layer`` (GradNorm's norms are taken there).
SHARED_LAYER = "block3.conv2"
#: Parameters a registry type needs beyond its defaults (none is tuned: the defaults are what a user gets).
EXTRA_PARAMS: dict[str, dict[str, Any]] = {}
#: auxloss type -> (LibMTL 1.1.5 weighting class, its backward's keyword arguments at the defaults of LibMTL's
#: ``config.py``: DWA's T = 2, GradNorm's alpha = 1.5, RLW's dist = "Normal"). LibMTL 1.1.5 has EW, UW, GradNorm,
#: GLS, RLW, DWA, MGDA, PCGrad, GradVac, IMTL, GradDrop and CAGrad; the others have no auxloss type of that name.
LIBMTL_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "fixed": ("EW", {}),
    "uncertainty": ("UW", {}),
    "dwa": ("DWA", {"T": 2.0}),
    "gradnorm": ("GradNorm", {"alpha": 1.5}),
    "rlw": ("RLW", {"dist": "Normal"}),
}
LAMBDA = 1.0

SIZES = {
    # quick: about 2 minutes of CPU time for 15 methods (under 5 on an idle 2-core machine); full: about 20 (under
    # 30). A step of the width-6 CNN on a 36x36 batch of 64 costs about 40 ms of one core.
    "quick": {"seeds": 3, "n_train": 2000, "n_val": 500, "n_test": 2000, "epochs": 2, "batch": 64, "width": 4},
    "full": {"seeds": 5, "n_train": 6000, "n_val": 1000, "n_test": 5000, "epochs": 3, "batch": 64, "width": 6},
}


# -- LibMTL, loaded without its torchvision-importing top level -----------------------------------------------------
def load_libmtl(names: list[str]) -> tuple[dict[str, type], str]:
    """The LibMTL weighting classes named, and how LibMTL was loaded (or why not)."""
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        return {}, "not installed"
    root = Path(next(iter(spec.submodule_search_locations)))
    try:
        import LibMTL.weighting  # noqa: F401  (works where torchvision imports)
        how = "imported"
    except Exception as exc:  # noqa: BLE001
        for name in [n for n in sys.modules if n == "LibMTL" or n.startswith("LibMTL.")]:
            del sys.modules[name]
        how = f"top-level import failed ({type(exc).__name__}); weighting modules loaded directly"
        for name, path in (("LibMTL", root), ("LibMTL.weighting", root / "weighting")):
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    classes = {}
    for name in names:
        if (root / "weighting" / f"{name}.py").is_file():  # a method this LibMTL lacks is simply not compared
            module = importlib.import_module(f"LibMTL.weighting.{name}")
            classes[name] = getattr(module, name)
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        how += f", LibMTL {version('LibMTL')}"
    return classes, how


class LibMTLWeighting(GradientWeighting):
    """LibMTL's weighting as an auxloss strategy: its ``backward(losses, **kwargs)`` writes the update.

    LibMTL treats the K tasks alike (the main task is task 0, λ folded into the auxiliary losses). It reads its
    shared parameters from ``get_share_params``, per-epoch mean losses from ``train_loss_buffer`` (tasks × epochs)
    and the 0-based epoch from ``epoch``, as its own Trainer sets them; those are kept here the same way.
    """

    def __init__(self, cls: type, kwargs: dict[str, Any], shared: list[nn.Parameter], epochs: int) -> None:
        super().__init__()
        self.cls, self.kwargs, self.epochs = cls, dict(kwargs), epochs
        self._shared = shared
        self._sums: list[float] = []
        self._count = 0

    def bind(self, main: str, aux: list[str]) -> None:
        super().bind(main, aux)
        shared, n_tasks, epochs = self._shared, 1 + len(aux), self.epochs

        class Adapter(self.cls):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                super().__init__()
                self.task_num, self.device, self.rep_grad, self.epoch = n_tasks, torch.device("cpu"), False, 0
                self.train_loss_buffer = torch.zeros(n_tasks, epochs).numpy()
                self.init_param()

            def get_share_params(self) -> list[nn.Parameter]:
                return shared

            def zero_grad_share_params(self) -> None:
                for p in shared:  # zeros, not None: the torch-1.x zero_grad() LibMTL was written against
                    if p.grad is not None:
                        p.grad.zero_()

        self.impl = Adapter()
        self._sums = [0.0] * n_tasks

    def backward(self, report: Any, ctx: Any) -> None:
        names = [self.main_name, *self.aux_names]
        losses = [report.losses[self.main_name]] + [report.weights[n] * report.losses[n] for n in self.aux_names]
        for i, n in enumerate(names):
            self._sums[i] += float(report.losses[n].detach())
        self._count += 1
        for p in self._shared:  # LibMTL assigns into .grad of the shared parameters: they must exist
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.impl.backward(torch.stack(losses), **self.kwargs)  # LibMTL's trainer passes one (K,) tensor

    def on_epoch_end(self, epoch: int) -> None:
        if self._count and epoch - 1 < self.epochs:
            self.impl.train_loss_buffer[:, epoch - 1] = [s / self._count for s in self._sums]
        self._sums, self._count = [0.0] * len(self._sums), 0
        self.impl.epoch = epoch  # LibMTL's epochs count from 0: the next epoch's index


def _children_cpu() -> float:
    """CPU seconds of the finished worker processes (``--jobs``), for the total the run cost."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- one run ---------------------------------------------------------------------------------------------------------
class StepTimer(Callback):
    """CPU time of each training step, from the batch's start to the end of its optimizer step."""

    def __init__(self) -> None:
        self.total, self.steps, self._start = 0.0, 0, 0.0

    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
        self._start = time.process_time()

    def on_train_batch_end(self, trainer: Trainer, report: Any, batch_idx: int) -> None:
        self.total += time.process_time() - self._start
        self.steps += 1


def run_method(method: str, seed: int, data: dict, size: dict, libmtl: dict[str, type]) -> dict[str, Any]:
    """Train one method on one seed; returns the main task's test accuracy and the mean step time."""
    torch.manual_seed(seed)  # the same initial weights for every method of this seed
    trunk = SmallCNN(10, in_channels=1, width=size["width"])
    if method == "baseline":
        model = al.attach(trunk, {})
        objective = al.Objective()
    else:
        model = al.attach(trunk, {"right": al.Tap("block3", al.LinearHead(10))},
                          example_input=data["train"][0]["input"][None])
        objective = al.Objective(aux=[al.Task("right", source="right", target="right", weight=LAMBDA)])
        source, kind = method.split(":")
        if source == "auxloss":
            spec = {"type": kind, **EXTRA_PARAMS.get(kind, {})}
            cls, _ = _split(WEIGHTINGS[kind])
            if getattr(cls, "layer_required", False):
                spec["layer"] = SHARED_LAYER
            weighting = build_weighting(spec, model=model)
        else:
            name, kwargs = LIBMTL_CLASSES[kind]
            shared = [p for n, p in trunk.named_parameters() if n.startswith("block")]
            weighting = LibMTLWeighting(libmtl[name], kwargs, shared, size["epochs"])
        if weighting is not None:
            objective.set_weighting(weighting)
    timer = StepTimer()
    trainer = Trainer(epochs=size["epochs"], optimizer="adam", lr=1e-3, device="cpu", eval_train=False,
                      callbacks=[timer])
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(data["train"], batch_size=size["batch"], shuffle=True, generator=g, drop_last=True)
    # Validation batches as large as the training ones: Auto-Lambda's look-ahead takes one validation batch per
    # step, so a larger one would bill it for more samples than the step trains on (evaluation is unchanged: its
    # metrics are means over the whole split).
    result = trainer.fit(model, objective, train, DataLoader(data["val"], batch_size=size["batch"]),
                         DataLoader(data["test"], batch_size=512))
    return {"accuracy": result.main_metric("test"), "step_s": timer.total / max(1, timer.steps),
            "steps": timer.steps}


def run_seed(seed: int, task: dict[str, Any], libmtl: dict[str, type] | None = None,
             skip: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Every method on one seed (but ``skip``, the ones that already failed on an earlier seed), in an order that
    rotates with the seed; a method that fails is recorded, not raised (one failure must not lose the others'
    results). Runs in a worker process with ``--jobs``."""
    torch.set_num_threads(task["threads"])
    if libmtl is None:  # a fresh worker process: LibMTL's modules are loaded again there
        libmtl = load_libmtl(task["libmtl"])[0] if task["libmtl"] else {}
    size, methods = task["size"], task["methods"]
    data = build_splits("multi-fashion", DataRequest(size["n_train"], size["n_val"], size["n_test"], seed,
                                                     root=task["root"]))
    shift = seed % len(methods)
    results: dict[str, dict[str, Any]] = {}
    for m in methods[shift:] + methods[:shift]:
        if m in skip:
            continue
        try:
            out = run_method(m, seed, data, size, libmtl)
        except Exception as exc:  # noqa: BLE001
            results[m] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            continue
        results[m] = out
        print(f"seed {seed} {m:28s} acc {out['accuracy']:.4f}  step {1000 * out['step_s']:.1f} ms", flush=True)
    return results


def method_list(selected: list[str] | None, libmtl: dict[str, type]) -> list[str]:
    """``baseline``, every registry type (or the ones selected), and LibMTL's where it has the same method."""
    kinds = list(WEIGHTINGS) if not selected else selected
    unknown = [k for k in kinds if k not in WEIGHTINGS]
    if unknown:
        raise AuxLossError(f"unknown method(s) {unknown}; the registry has {sorted(WEIGHTINGS)}.")
    methods = ["baseline"] + [f"auxloss:{k}" for k in kinds]
    methods += [f"libmtl:{k}" for k in kinds if k in LIBMTL_CLASSES and LIBMTL_CLASSES[k][0] in libmtl]
    return methods


def summarise(methods: list[str], acc: dict[str, dict[int, float]], step: dict[str, dict[int, float]],
              errors: dict[str, str]) -> list[dict[str, Any]]:
    ran = [m for m in methods if m != "baseline" and m in acc and acc[m]]
    comparisons = {c.variant: c for c in compare(acc["baseline"], {m: acc[m] for m in ran})} if ran else {}
    rows = []
    for m in methods:
        if m in errors:
            rows.append({"method": m, "error": errors[m]})
            continue
        mean, ci = mean_ci(list(acc[m].values()))
        fixed = step.get("auxloss:fixed", {})
        ratios = [step[m][s] / fixed[s] for s in step[m] if s in fixed and fixed[s] > 0]
        row: dict[str, Any] = {"method": m, "accuracy": mean, "ci95": list(ci), "n": len(acc[m]),
                               "step_ms": 1000 * statistics.median(step[m].values()),
                               "step_vs_fixed": statistics.median(ratios) if ratios else None}
        if m in comparisons:
            c = comparisons[m]
            row.update(delta=c.delta, delta_ci95=list(c.ci95), p_holm=c.p_holm, verdict=c.verdict)
        rows.append(row)
    return rows


def libmtl_agreement(rows: list[dict[str, Any]], acc: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """For each method both implement: the paired accuracy difference (auxloss − LibMTL) and the step-time ratio."""
    by = {r["method"]: r for r in rows}
    out = []
    for m, r in by.items():
        if not m.startswith("libmtl:") or "error" in r:
            continue
        kind = m.split(":")[1]
        mine = by.get(f"auxloss:{kind}")
        if mine is None or "error" in mine:
            continue
        c = compare(acc[m], {f"auxloss:{kind}": acc[f"auxloss:{kind}"]}, baseline_name=m)[0]
        lo, hi = c.ci95
        # Within noise: the paired 95% interval of the difference holds 0 (identical runs: a zero difference).
        agree = lo <= 0 <= hi if c.n >= 2 and all(map(math.isfinite, c.ci95)) else c.delta == 0
        out.append({"method": kind, "delta_auxloss_minus_libmtl": c.delta, "ci95": [lo, hi], "p": c.p_value,
                    "agree_within_noise": bool(agree),
                    "step_auxloss_vs_libmtl": (mine["step_vs_fixed"] / r["step_vs_fixed"])
                    if mine.get("step_vs_fixed") and r.get("step_vs_fixed") else None})
    return out


def fmt_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | main test acc. (95% CI) | Δ vs baseline (95% CI) | verdict | step / fixed |",
             "|---|---|---|---|---|"]
    any_clipped = False
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | not run: {r['error']} | | | |")
            continue
        # An accuracy lies in [0, 1]: the t-interval is clipped there for display (marked *), as auxloss's reports do.
        ci, clipped = clip_interval(r["ci95"], (0.0, 1.0))
        any_clipped |= clipped
        acc = f"{100 * r['accuracy']:.2f} ({100 * ci[0]:.2f}–{100 * ci[1]:.2f}){'*' if clipped else ''}" \
            if math.isfinite(ci[0]) else f"{100 * r['accuracy']:.2f}"
        if "delta" in r:
            dl, dh = r["delta_ci95"]
            delta = f"{100 * r['delta']:+.2f} ({100 * dl:+.2f}, {100 * dh:+.2f})"
            verdict = r["verdict"]
        else:
            delta, verdict = "—", "(reference)"
        ratio = f"{r['step_vs_fixed']:.2f}" if r.get("step_vs_fixed") is not None else "—"
        lines.append(f"| {r['method']} | {acc} | {delta} | {verdict} | {ratio} |")
    if any_clipped:
        lines.append("\n\\* the interval reached past [0, 100] and is shown clipped there.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, 2 epochs on 2,000 images, a narrower CNN (under 5 minutes)")
    parser.add_argument("--methods", default="", help="comma-separated registry types (default: all of them)")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--no-libmtl", action="store_true", help="skip LibMTL even when it is installed")
    parser.add_argument("--root", default=str(FASHION_MNIST_DEFAULT_ROOT), help="the Fashion-MNIST IDX folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds trained at once, one process each (default 1; 2 on a 2-core machine)")
    parser.add_argument("--out", default=None, help="write results.json (for `auxloss probe --results`) here")
    args = parser.parse_args()
    if not fashion_mnist_available(args.root):
        sys.exit(f"Fashion-MNIST IDX files not found under {args.root}: apt-get install dataset-fashion-mnist, or "
                 "pass --root.")
    torch.set_num_threads(args.threads)
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.seeds is not None:
        size["seeds"] = args.seeds
    selected = [m.strip() for m in args.methods.split(",") if m.strip()] or None
    libmtl, how = ({}, "skipped (--no-libmtl)") if args.no_libmtl else \
        load_libmtl(sorted({name for name, _ in LIBMTL_CLASSES.values()}))
    methods = method_list(selected, libmtl)
    started = time.perf_counter()
    acc: dict[str, dict[int, float]] = {m: {} for m in methods}
    step: dict[str, dict[int, float]] = {m: {} for m in methods}
    errors: dict[str, str] = {}
    jobs = max(1, min(args.jobs, size["seeds"]))
    task = {"methods": methods, "size": size, "root": args.root, "threads": args.threads,
            "libmtl": [] if args.no_libmtl else sorted({name for name, _ in LIBMTL_CLASSES.values()})}
    if jobs == 1:
        per_seed = []
        for seed in range(size["seeds"]):
            failed = {m for results in per_seed for m, out in results.items() if "error" in out}
            per_seed.append(run_seed(seed, task, libmtl, skip=failed))
    else:
        # One process per seed, `jobs` at a time, each with its own thread count: every ratio is still taken
        # between methods of one seed, run back to back in one process.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_seed = list(pool.map(run_seed, range(size["seeds"]), [task] * size["seeds"]))
    for seed, results in enumerate(per_seed):
        for m, out in results.items():
            if "error" in out:
                errors.setdefault(m, out["error"])
            else:
                acc[m][seed], step[m][seed] = out["accuracy"], out["step_s"]
    for m in errors:  # a method that failed on any seed is reported as failed, not on fewer seeds
        acc[m], step[m] = {}, {}
    rows = summarise(methods, acc, step, errors)
    agreement = libmtl_agreement(rows, acc)
    seconds = time.perf_counter() - started
    print()
    print(fmt_table(rows))
    if agreement:
        print()
        print("| method | auxloss − LibMTL acc. (95% CI) | agree within noise | auxloss step / LibMTL step |")
        print("|---|---|---|---|")
        for a in agreement:
            lo, hi = a["ci95"]
            ratio = f"{a['step_auxloss_vs_libmtl']:.2f}" if a["step_auxloss_vs_libmtl"] else "—"
            print(f"| {a['method']} | {100 * a['delta_auxloss_minus_libmtl']:+.2f} ({100 * lo:+.2f}, {100 * hi:+.2f}) "
                  f"| {'yes' if a['agree_within_noise'] else 'no'} | {ratio} |")
    summary = {"date": datetime.date.today().isoformat(), "seconds": round(seconds, 1), "size": size,
               "lambda": LAMBDA, "libmtl": how, "rows": rows, "libmtl_agreement": agreement,
               "torch": torch.__version__, "machine": platform.machine(), "threads": args.threads, "jobs": jobs,
               "cpu_seconds": round(time.process_time() + _children_cpu(), 1)}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        # The shape `auxloss probe --results` reads: per-variant deltas of the main metric against the baseline.
        comparisons = [{"variant": r["method"], "delta": r["delta"]} for r in rows if "delta" in r]
        (out / "results.json").write_text(json.dumps({"higher_is_better": True, "comparisons": comparisons,
                                                      "benchmark": summary}, indent=2, default=str))
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
