"""Cost of each weighting strategy's training step against the fixed-weight step, measured side by side.

The model is a :class:`~auxloss.zoo.models.SmallCNN` trunk with one main task and two auxiliary heads on two
different blocks (``block1``, ``block2``), a batch of 32 images of 32×32. A step is forward, objective, backward
and optimizer step. Reported, each as the median of per-round ratios:

- loss-based strategies (``main_progress``, ``uncertainty``, ``dwa``, ``gradnorm``): ``vs_fixed``.
- gradient-aware strategies (``gating``, ``projection``, ``olaux``, ``metabalance``): ``exact``,
  ``amortized10`` (``mode="amortized", every=10``) and ``representation`` (``mode="representation"``: the
  statistics at the taps' outputs, every step, in one backward pass; target ≤ 1.15), all against the fixed step,
  and ``exact_vs_raw``: the exact mode against a hand-written step that makes the same ``1 + K``
  :func:`torch.autograd.grad` calls and sums the gradients into ``.grad``, with no statistics. That ratio is the
  engine's own overhead (target ≤ 1.05); the raw step against the fixed one (``raw_vs_fixed``) is the price of the
  extra backward passes themselves. The representation step also makes the step protocol's
  ``objective.before_step(StepContext(model=model))`` call, which that mode needs (the fixed step does not).
- LibMTL's PCGrad and GradNorm on the same model, against the fixed step, when LibMTL is installed.
- ``control_fixed_vs_fixed``: the fixed step timed as if it were a strategy; its distance from 1 is the noise.

Each comparison is timed in a group: the strategy's variants with the fixed step (and the raw one), in adjacent
blocks of ``--iters`` steps (each after one untimed step), in an order that rotates round after round, so drift in
the machine's speed cancels out of the ratios; the fixed and raw steps are re-timed in every group. All variants
train one shared model (see :class:`Setup`). ``--iters`` is rounded up to a multiple of 10, so that every amortized
block holds the same number of refreshes. On the CPU the clock is the process's CPU time by default (``--clock
wall`` for elapsed time): on a machine shared with other jobs it is far steadier. With ``--device cuda`` it is
elapsed time, with the device synchronised around each block. Two runs of the same code on a busy 2-core machine
still differ by a few hundredths in a ratio. The last line printed is one JSON object.

    python benchmarks/weighting_cost.py [--rounds 10] [--iters 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import auxloss as al
from auxloss.step import StepContext
from auxloss.weighting import build_weighting
from auxloss.zoo.models import SmallCNN

EVERY = 10
LAMBDA = 0.3
LOSS_BASED = ("main_progress", "uncertainty", "dwa", "gradnorm")
GRADIENT = ("gating", "projection", "olaux", "metabalance")
TARGETS = {"exact_vs_raw": 1.05, "amortized10_vs_fixed": 1.10, "representation_vs_fixed": 1.15}


class Setup:
    """A variant: its own objective (and strategy) and optimizer, on the model that every variant shares.

    Sharing one model (plain SGD, so the optimizer objects hold no state) means every variant computes on the same
    weights in the same memory: separate copies drift apart and differ in memory placement, which alone moved
    identical steps apart by a few percent.
    """

    def __init__(self, model: al.AuxModel, weighting: Any = None) -> None:
        self.model = model
        self.objective = al.Objective(aux=[al.Task("aux1", source="aux1", weight=LAMBDA),
                                           al.Task("aux2", source="aux2", weight=LAMBDA)])
        if isinstance(weighting, dict):
            weighting = build_weighting(weighting, model=self.model)
        if weighting is not None:
            self.objective.set_weighting(weighting)
        params = list(self.model.parameters()) + list(self.objective.parameters())
        self.opt = torch.optim.SGD(params, lr=1e-3)


def auxloss_step(setup: Setup, x: torch.Tensor, batch: dict) -> Callable[[], None]:
    model, objective, opt = setup.model, setup.objective, setup.opt

    def step() -> None:
        report = objective(model(x), batch)
        opt.zero_grad(set_to_none=True)
        objective.backward(report)
        opt.step()
        objective.advance()

    return step


def protocol_step(setup: Setup, x: torch.Tensor, batch: dict) -> Callable[[], None]:
    """The step with the protocol's ``before_step`` call, as the Trainer makes it (representation mode needs it)."""
    model, objective, opt = setup.model, setup.objective, setup.opt
    ctx = StepContext(model=model)

    def step() -> None:
        objective.before_step(ctx)
        report = objective(model(x), batch)
        opt.zero_grad(set_to_none=True)
        objective.backward(report, ctx)
        opt.step()
        objective.advance()

    return step


def raw_step(setup: Setup, x: torch.Tensor, batch: dict) -> Callable[[], None]:
    """What exact mode cannot avoid: 1 + K autograd.grad calls over all trainable tensors, summed into .grad."""
    model, objective, opt = setup.model, setup.objective, setup.opt
    params = [p for p in model.parameters() if p.requires_grad]
    names = ["main", "aux1", "aux2"]

    def step() -> None:
        report = objective(model(x), batch)
        opt.zero_grad(set_to_none=True)
        losses = [report.losses[n] for n in names]
        coefs = [1.0] + [report.weights[n] for n in names[1:]]
        grads = [torch.autograd.grad(loss, params, retain_graph=j < len(losses) - 1, allow_unused=True)
                 for j, loss in enumerate(losses)]
        for i, p in enumerate(params):
            total = None
            for j, coef in enumerate(coefs):
                g = grads[j][i]
                if g is None:
                    continue
                term = g if coef == 1.0 else g * coef
                total = term if total is None else total + term
            if total is not None:
                p.grad = total
        opt.step()
        objective.advance()

    return step


# -- LibMTL (optional, never a dependency) ------------------------------------------------------------------------
def load_libmtl() -> tuple[dict[str, type] | None, str]:
    """LibMTL's PCGrad and GradNorm classes, or None and why not.

    LibMTL's top-level package imports its model zoo, which needs ``torchvision.models.utils`` (gone from current
    torchvision); the weighting modules need only torch and numpy. So the ``LibMTL.weighting`` modules are loaded
    from the installed files under a bare package entry, without running the top-level ``__init__``.
    """
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        return None, "not installed"
    root = Path(next(iter(spec.submodule_search_locations)))
    try:
        import LibMTL.weighting  # noqa: F401  (works where torchvision is there)
    except Exception as exc:  # noqa: BLE001
        for name in [n for n in sys.modules if n == "LibMTL" or n.startswith("LibMTL.")]:
            del sys.modules[name]
        reason = f"top-level import failed ({type(exc).__name__}: {exc}); weighting modules loaded directly"
        for name, path in (("LibMTL", root), ("LibMTL.weighting", root / "weighting")):
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    else:
        reason = "imported"
    try:
        from LibMTL.weighting.GradNorm import GradNorm
        from LibMTL.weighting.PCGrad import PCGrad
    except Exception as exc:  # noqa: BLE001
        return None, f"installed but unusable ({type(exc).__name__}: {exc})"
    return {"pcgrad": PCGrad, "gradnorm": GradNorm}, reason


def libmtl_step(cls: type, model: al.AuxModel, x: torch.Tensor, batch: dict) -> Callable[[], None]:
    """LibMTL's weighting on the same model: the trunk (block1..3) is its shared encoder, the heads its decoders.

    The losses go in as a list (λ folded into the auxiliary ones), so each of its per-task backward passes runs
    through that task's graph only.
    """
    objective = Setup(model).objective
    trunk = model.model
    shared = [p for name, p in trunk.named_parameters() if not name.startswith("fc.")]

    class Adapter(cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.device, self.rep_grad, self.epoch = 3, x.device, False, 1
            self.train_loss_buffer = None
            self.init_param()

        def get_share_params(self) -> list[nn.Parameter]:
            return shared

        def zero_grad_share_params(self) -> None:
            for p in shared:  # zeros, not None: the torch-1.x `zero_grad()` LibMTL was written against
                if p.grad is not None:
                    p.grad.zero_()

    weighting = Adapter()
    opt = torch.optim.SGD(list(model.parameters()) + list(weighting.parameters()), lr=1e-3)
    first = objective(model(x), batch).losses
    weighting.train_loss_buffer = torch.tensor([[first[n].item()] for n in ("main", "aux1", "aux2")]).numpy()

    def step() -> None:
        report = objective(model(x), batch)
        opt.zero_grad(set_to_none=False)  # LibMTL writes into existing .grad tensors
        losses = [report.losses["main"], LAMBDA * report.losses["aux1"], LAMBDA * report.losses["aux2"]]
        weighting.backward(losses, alpha=1.5)
        opt.step()
        objective.advance()

    return step


# -- timing -------------------------------------------------------------------------------------------------------
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed(fn: Callable[[], None], iters: int, clock: Callable[[], float], sync: Callable[[], None]) -> float:
    """Mean time per step over ``iters`` consecutive steps, after one untimed step.

    The untimed step lets the variant settle: right after another variant (say an exact step, which holds more
    gradients at its peak) the allocator's state makes the first step pay for page faults that belong to the switch,
    not to the step. Any ``iters`` consecutive amortized steps, iters a multiple of 10, hold the same number of
    refreshes, wherever the block starts.
    """
    fn()
    sync()  # CUDA runs asynchronously: time the queued work, not the launches
    start = clock()
    for _ in range(iters):
        fn()
    sync()
    return (clock() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10, help="steps per timed block (rounded up to a multiple "
                                                               "of 10)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--clock", choices=["auto", *sorted(CLOCKS)], default="auto",
                        help="cpu: the process's CPU time (user + system, all threads), which other jobs on a shared "
                             "machine disturb far less than wall time; wall: elapsed time; auto (default): cpu on "
                             "the CPU, wall on an accelerator")
    parser.add_argument("--no-libmtl", action="store_true", help="skip LibMTL even when it is installed")
    parser.add_argument("--only", default=None, help="comma-separated strategies to time (default: all), e.g. "
                                                       "gating,projection")
    args = parser.parse_args()
    only = None if args.only is None else set(args.only.split(","))
    unknown = sorted((only or set()) - set(LOSS_BASED) - set(GRADIENT))
    if unknown:
        parser.error(f"--only: unknown strategies {unknown}; choose from {[*LOSS_BASED, *GRADIENT]}")
    loss_based = [n for n in LOSS_BASED if only is None or n in only]
    gradient = [n for n in GRADIENT if only is None or n in only]
    iters = -(-max(args.iters, 1) // EVERY) * EVERY
    device = torch.device(args.device)
    clock_name = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")
    if clock_name == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures host time only; use --clock wall on an accelerator")
    clock = CLOCKS[clock_name]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    batch = {"input": x, "target": y}
    model = al.attach(SmallCNN(10, width=args.width).to(device), {"aux1": al.Tap("block1", al.LinearHead(10)),
                                                       "aux2": al.Tap("block2", al.LinearHead(10))},
                      example_input=x[:1]).to(device)

    steps: dict[str, Callable[[], None]] = {
        "fixed": auxloss_step(Setup(model), x, batch),
        "fixed_again": auxloss_step(Setup(model), x, batch),  # a control: the same step timed as a variant
        "raw": raw_step(Setup(model), x, batch),
    }
    loss_specs: dict[str, Any] = {"main_progress": {"type": "main_progress"}, "uncertainty": {"type": "uncertainty"},
                                  "dwa": {"type": "dwa"}, "gradnorm": {"type": "gradnorm", "layer": "block1.conv2"}}
    for name in loss_based:
        steps[name] = auxloss_step(Setup(model, loss_specs[name]), x, batch)
    for name in gradient:
        extra = {"lr": 1e-3} if name == "olaux" else {}
        steps[f"{name}/exact"] = auxloss_step(Setup(model, {"type": name, "mode": "exact", **extra}), x, batch)
        steps[f"{name}/amortized10"] = auxloss_step(
            Setup(model, {"type": name, "mode": "amortized", "every": EVERY, **extra}), x, batch)
        steps[f"{name}/representation"] = protocol_step(
            Setup(model, {"type": name, "mode": "representation", **extra}), x, batch)
    libmtl, libmtl_note = (None, "skipped (--no-libmtl)") if args.no_libmtl else load_libmtl()
    if libmtl is not None:
        for name, cls in libmtl.items():
            steps[f"libmtl/{name}"] = libmtl_step(cls, model, x, batch)
    print(f"libmtl: {libmtl_note}")

    # Adjacent groups: each compared variant is timed next to the step(s) it is compared with.
    groups = [["fixed", name] for name in ("fixed_again", *loss_based)]
    groups += [["fixed", "raw", f"{name}/exact", f"{name}/amortized10", f"{name}/representation"] for name in gradient]
    if libmtl is not None:
        groups.append(["fixed", *(f"libmtl/{n}" for n in libmtl)])

    for fn in steps.values():  # warm-up: one full amortized cycle, first refresh included
        for _ in range(EVERY):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    ratios: dict[tuple[str, str], list[float]] = {}
    start = time.perf_counter()
    for r in range(args.rounds):
        for g, group in enumerate(groups):
            shift = (r + g) % len(group)  # rotate the order, so that no variant always runs first
            order = group[shift:] + group[:shift]
            measured = {name: timed(steps[name], iters, clock, sync) for name in order}
            for name, t in measured.items():
                times[name].append(t)
            for name in group[1:]:
                ratios.setdefault((name, "fixed"), []).append(measured[name] / measured["fixed"])
                if name.endswith("/exact"):
                    ratios.setdefault((name, "raw"), []).append(measured[name] / measured["raw"])
            if "raw" in group:
                ratios.setdefault(("raw", "fixed"), []).append(measured["raw"] / measured["fixed"])
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    def med(a: str, b: str) -> float:
        return round(statistics.median(ratios[(a, b)]), 4)

    def ms(name: str) -> float:
        return round(1e3 * statistics.median(times[name]), 3)

    result: dict[str, Any] = {"fixed_ms": ms("fixed"), "raw_ms": ms("raw"), "raw_vs_fixed": med("raw", "fixed"),
                              "control_fixed_vs_fixed": med("fixed_again", "fixed")}
    for name in loss_based:
        result[name] = {"vs_fixed": med(name, "fixed"), "ms": ms(name)}
    for name in gradient:
        result[name] = {"exact": med(f"{name}/exact", "fixed"), "amortized10": med(f"{name}/amortized10", "fixed"),
                        "representation": med(f"{name}/representation", "fixed"),
                        "exact_vs_raw": med(f"{name}/exact", "raw"),
                        "ms": {"exact": ms(f"{name}/exact"), "amortized10": ms(f"{name}/amortized10"),
                               "representation": ms(f"{name}/representation")}}
    if libmtl is None:
        result["libmtl"] = libmtl_note
    else:
        result["libmtl"] = {n: {"vs_fixed": med(f"libmtl/{n}", "fixed"), "ms": ms(f"libmtl/{n}")} for n in libmtl}
        result["libmtl"]["import"] = libmtl_note
    missed = [f"{n}.{key}" for n in gradient for key, target in
              (("exact_vs_raw", TARGETS["exact_vs_raw"]), ("amortized10", TARGETS["amortized10_vs_fixed"]),
               ("representation", TARGETS["representation_vs_fixed"]))
              if result[n][key] > target]
    result["targets"] = {**TARGETS, "missed": missed}
    result.update({"only": args.only, "rounds": args.rounds, "iters": iters, "batch": args.batch, "width": args.width,
                   "threads": args.threads, "clock": clock_name, "device": str(device), "torch": torch.__version__,
                   "machine": platform.machine()})

    print(f"fixed {result['fixed_ms']} ms, raw 1+K autograd.grad {result['raw_ms']} ms "
          f"(x{result['raw_vs_fixed']}); control fixed/fixed x{result['control_fixed_vs_fixed']}")
    for name in loss_based:
        print(f"  {name:<14} x{result[name]['vs_fixed']:<7} vs fixed")
    for name in gradient:
        res = result[name]
        print(f"  {name:<14} exact x{res['exact']:<7} amortized10 x{res['amortized10']:<7} "
              f"representation x{res['representation']:<7} exact/raw x{res['exact_vs_raw']}")
    if libmtl is not None:
        for n in libmtl:
            print(f"  libmtl {n:<14} x{result['libmtl'][n]['vs_fixed']} vs fixed")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
