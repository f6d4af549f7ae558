"""The ``auxloss`` command line: demo | run | report | layers | sweep | probe.

Every subcommand has ``--help``. Errors in the user's input print one clear message (no traceback) and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from auxloss.errors import AuxLossError

__all__ = ["main"]


_OS_FIXES = {
    errno.ENOSPC: "Free some disk space, then run the same command again: finished runs are kept.",
    errno.EDQUOT: "Free some space within your disk quota, then run the same command again: finished runs are kept.",
    errno.EROFS: "The folder is on a read-only file system; choose a writable --out folder.",
    errno.EACCES: "You may not write there; choose a writable --out folder (or fix its permissions).",
    errno.EPERM: "You may not write there; choose a writable --out folder (or fix its permissions).",
}


def _default_workers() -> int:
    # Small CPU models train fastest one process per core with one thread each: torch's intra-op threads barely
    # help them, and runs are independent.
    return max(1, min(2, os.cpu_count() or 1))


def _print_results(results: dict[str, Any], out: Path, seconds: float) -> None:
    from auxloss.experiment.report import format_table, summary_sentences

    print()
    print(format_table(results))
    print()
    for sentence in summary_sentences(results):
        print(" - " + sentence)
    print()
    print(f"{results['runs']['done']} runs in {seconds:.0f} s. Results: {out / 'results.json'}")
    print(f"Report: {(out / 'report.html').resolve()}")


def _run_config(cfg: Any, args: argparse.Namespace, command: str) -> int:
    from auxloss.experiment.runner import run_experiment

    out = Path(args.out)
    started = time.perf_counter()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{cfg.name}: baseline + {len(cfg.variants)} variants x {cfg.seeds} seeds -> {out} "
              f"({args.workers} worker{'s' if args.workers > 1 else ''})", flush=True)
    results = run_experiment(cfg, out, workers=args.workers, device=args.device, force=args.force,
                             command=command, progress=args.workers == 1 and sys.stderr.isatty(),
                             store=getattr(args, "store", None),
                             checkpoint_dir=getattr(args, "checkpoint_dir", None), mlflow=getattr(args, "mlflow", None))
    if not results:  # a torchrun rank other than 0: rank 0 prints
        return 0
    _print_results(results, out, time.perf_counter() - started)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from auxloss.experiment.demos import DEMOS, demo_config

    if args.list:
        for name, (description, _, _) in DEMOS.items():
            print(f"{name:<16} {description}")
        return 0
    if args.name == "fashion-mnist":
        from auxloss.zoo.data import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist_available

        if not fashion_mnist_available(FASHION_MNIST_DEFAULT_ROOT):
            print(f"The fashion-mnist demo reads the IDX files from {FASHION_MNIST_DEFAULT_ROOT}, which are not "
                  "there.\nInstall them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put "
                  "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                  "t10k-labels-idx1-ubyte.gz in a folder and run `auxloss run` with data.root set to it.",
                  file=sys.stderr)
            return 2
    cfg = demo_config(args.name, quick=args.quick, seeds=args.seeds)
    if args.out is None:
        args.out = f"runs/demo-{args.name}{'-quick' if args.quick else ''}"
    command = "auxloss demo " + args.name + (" --quick" if args.quick else "") + (
        f" --seeds {args.seeds}" if args.seeds else "")
    return _run_config(cfg, args, command)


def cmd_run(args: argparse.Namespace) -> int:
    from auxloss.experiment.config import load_config

    overrides = {"seeds": args.seeds} if args.seeds else {}
    if args.compile:
        overrides["train.compile"] = True
    cfg = load_config(args.config, overrides)
    if args.out is None:
        args.out = f"runs/{cfg.name}"
    return _run_config(cfg, args, "auxloss run " + " ".join(shlex.quote(a) for a in sys.argv[2:]))


def cmd_report(args: argparse.Namespace) -> int:
    from auxloss.experiment.config import parse_config
    from auxloss.experiment.report import build_report
    from auxloss.experiment.runner import (
        RESULTS_FILE,
        STORE_FILE,
        STORE_URL_FILE,
        aggregate,
        load_histories,
        open_experiment_store,
    )

    out = Path(args.dir)
    if not (out / STORE_FILE).exists() and not (out / STORE_URL_FILE).exists():
        raise AuxLossError(f"{str(out)!r} holds no auxloss results ({STORE_FILE} is missing); give the --out folder "
                           "of an `auxloss run` or `auxloss demo`.")
    previous = json.loads((out / RESULTS_FILE).read_text()) if (out / RESULTS_FILE).exists() else {}
    import yaml

    cfg = parse_config(yaml.safe_load((out / "config.yaml").read_text()), source=str(out / "config.yaml"))
    store = open_experiment_store(out, cfg.name)
    results = aggregate(cfg, store, command=previous.get("config", {}).get("command"),
                        seconds=previous.get("timing", {}).get("total_seconds"))
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    path = build_report(out, results, *load_histories(store))
    print(f"Report: {path.resolve()}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from auxloss.taps import list_layers

    if ":" in args.model:
        from auxloss.integrations.models import example_input, resolve_model

        model = resolve_model(args.model, num_classes=args.num_classes)
        x = example_input(args.model, size=args.size)
    else:
        from auxloss.zoo.models import MODELS, build_model
        from auxloss.zoo.models import example_input as zoo_example

        if args.model not in MODELS:
            build_model(args.model)  # raises with close names
        kwargs: dict[str, Any] = {"num_classes": args.num_classes}
        shape_kwargs: dict[str, Any] = {}
        if args.model == "deep_mlp":
            shape_kwargs = {"in_features": 64}
        elif args.model == "lstm_classifier":
            shape_kwargs = {"input_size": 1}
        model = build_model(args.model, **kwargs, **shape_kwargs)
        x = zoo_example(args.model, **shape_kwargs)
    with torch.no_grad():
        infos = list_layers(model, x, leaves=args.leaves, max_depth=args.depth)
    print(f"{'layer':<40} {'type':<22} {'output':<28} {'params':>11}")
    for info in infos:
        print(info)
    print(f"\n{len(infos)} tappable layers for input {tuple(x.shape)}. Tap one with auxloss.Tap('<layer>', head).")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from auxloss.experiment.config import load_config
    from auxloss.experiment.sweep import run_sweep

    cfg = load_config(args.config)
    out = Path(args.out or f"runs/{cfg.name}-sweep")
    summary = run_sweep(cfg, out, trials=args.trials, storage=args.storage, study_name=args.study,
                        variant=args.variant, eval_seeds=args.eval_seeds, workers=args.workers,
                        search_seeds=args.search_seeds, schedule=args.schedule)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from auxloss.experiment.config import load_config
    from auxloss.experiment.probe import format_probe, run_probe

    if (args.config is None) == (args.demo is None):
        raise AuxLossError("give a config file or --demo NAME (auxloss demo --list), not both and not neither.")
    if args.demo is not None:
        from auxloss.experiment.demos import demo_config

        cfg = demo_config(args.demo, quick=args.quick)
    else:
        cfg = load_config(args.config)
    out = Path(args.out or f"runs/{cfg.name}")
    summary = run_probe(cfg, out, steps=args.steps, every=args.every, seed=args.seed,
                        lookahead_lr=args.lookahead_lr, results=args.results, budget=args.budget)
    print(format_probe(summary))
    print(f"Probe: {(out / 'probe.json').resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auxloss",
        description="Train with auxiliary losses and find out whether they helped the main task.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", help="output folder (default: runs/<name>)")
        p.add_argument("--workers", type=int, default=_default_workers(),
                       help="processes training runs in parallel (default: %(default)s)")
        p.add_argument("--device", default=None, help="torch device (default: CUDA when available, else CPU)")
        p.add_argument("--force", action="store_true",
                       help="reuse an output folder that holds another experiment's results (discarding them)")
        p.add_argument("--store", default=None, metavar="URL",
                       help="keep the runs in a PostgreSQL database (postgresql://user@host/db) shared by workers "
                            "on several machines (set AUXLOSS_SHARED_STORE=1 on each), instead of "
                            "OUT/results.sqlite")
        p.add_argument("--checkpoint-dir", default=None, metavar="DIR|URL",
                       help="keep the runs' checkpoints in a folder on shared storage or at an fsspec URL "
                            "(s3://bucket/ckpt) instead of OUT/runs/, so that a worker on another machine resumes a "
                            "run whose worker died (default: under --out)")
        p.add_argument("--mlflow", default=None, metavar="URI",
                       help="also log to MLflow at this tracking URI (http://host:5000, file:/path/mlruns): one "
                            "parent run per experiment with the verdict and the report, a nested run per "
                            "variant and seed (needs pip install 'auxloss[mlflow]')")

    p = sub.add_parser("demo", help="run a built-in demo: baseline vs auxiliary-loss variants",
                       description="Run a built-in demo on data that needs no download, print the verdict table, "
                                   "write results.json and a report.")
    p.add_argument("name", nargs="?", default="shapes", help="demo name (default: shapes; see --list)")
    p.add_argument("--list", action="store_true", help="list the demos")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the demo's)")
    p.add_argument("--quick", action="store_true", help="a short smoke run (fewer seeds and epochs)")
    common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run an experiment from a YAML config",
                       description="Train the baseline and every variant of CONFIG on every seed; finished runs "
                                   "under --out are skipped, unfinished ones redone.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--seeds", type=int, default=None, help="override the config's number of seeds")
    p.add_argument("--compile", action="store_true", help="train with torch.compile")
    common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild the report of a finished output folder",
                       description="Recompute results.json and rebuild report.html/report.md from DIR's store.")
    p.add_argument("dir", help="an output folder of `auxloss run` or `auxloss demo`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("layers", help="list a model's tappable layers with their output shapes",
                       description="List the layers of a built-in model (small_cnn, deep_mlp, googlenet, "
                                   "googlenet32) or torchvision:NAME / timm:NAME, with output shapes.")
    p.add_argument("model", help="model name")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--size", type=int, default=224, help="input size for torchvision/timm models")
    p.add_argument("--leaves", action="store_true", help="only modules without children")
    p.add_argument("--depth", type=int, default=None, help="only names with at most this many dotted parts")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("sweep", help="search auxiliary weights with Optuna",
                       description="Search the auxiliary weights of a variant on the validation metric, then "
                                   "compare the best weights with the config's and the baseline on held-out seeds.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite under --out)")
    p.add_argument("--study", default=None, help="study name (default: the config's name)")
    p.add_argument("--variant", default=None, help="variant whose weights are searched (default: the first)")
    p.add_argument("--eval-seeds", type=int, default=3, help="held-out seeds for the final comparison")
    p.add_argument("--out", help="output folder")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--search-seeds", type=int, default=1, help="seeds averaged per trial (validation metric)")
    p.add_argument("--schedule", action="store_true", help="also search when each task enters (a curriculum)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("probe", help="rank candidate auxiliary tasks with a short run",
                       description="Each variant of CONFIG is a candidate. A short run per candidate measures its "
                                   "gradient cosine with the main task, its look-ahead affinity (Fifty et al. 2021) "
                                   "and how fast it is learned, then ranks the candidates.")
    p.add_argument("config", nargs="?", default=None, help="YAML config file (or --demo NAME)")
    p.add_argument("--demo", default=None, help="probe a built-in demo's config (auxloss demo --list)")
    p.add_argument("--quick", action="store_true", help="with --demo: the demo's quick config")
    p.add_argument("--budget", type=float, default=0.2,
                   help="the most the probe may cost, as a fraction of the experiment's training steps (default 0.2)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per candidate (default: as many as the budget allows, at most 200)")
    p.add_argument("--every", type=int, default=None, help="measure every N steps (default: about 10 per candidate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lookahead-lr", type=float, default=0.1, help="SGD step size of the look-ahead")
    p.add_argument("--results", default=None, help="a finished experiment folder to compare the ranking with")
    p.add_argument("--out", help="output folder (default: runs/<name>)")
    p.set_defaults(func=cmd_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = int(args.func(args) or 0)
        from auxloss.train.distributed import shutdown

        shutdown()  # under torchrun: every rank leaves the process group together
        return code
    except AuxLossError as exc:
        print(f"auxloss: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A full disk or an unwritable folder met outside the places that name it themselves (logs, the report).
        fix = _OS_FIXES.get(exc.errno or 0)
        if fix is None:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"auxloss: error: {exc.strerror or exc}{where}. {fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("auxloss: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
