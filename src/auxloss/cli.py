"""The ``auxloss`` command line: demo | run | report | layers | sweep | probe.

Every subcommand has ``--help``. Errors in the user's input print one clear message (no traceback) and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from auxloss.errors import AuxLossError

__all__ = ["main"]

#: ``--keep``: the values of the config's ``keep`` (see :class:`auxloss.experiment.config.ExperimentConfig`).
KEEP_CHOICES = ("none", "best", "all")


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
    from auxloss.train.batches import resolve_device

    for device in {args.device or cfg.train.device, *(cfg.train_for(v).device for v in cfg.variant_names[1:])}:
        resolve_device(device)  # a device that does not exist stops here, before the output folder is touched
    out = Path(args.out)
    started = time.perf_counter()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{cfg.name}: baseline + {len(cfg.variants)} variants x {cfg.seeds} seeds -> {out} "
              f"({args.workers} worker{'s' if args.workers > 1 else ''})", flush=True)
    devices = None
    if getattr(args, "gpus", None):
        import torch

        from auxloss.experiment.devices import parse_gpus, worker_devices

        explicit = args.workers if args.workers_given else None
        devices = worker_devices(parse_gpus(args.gpus, torch.cuda.device_count()), args.per_gpu, explicit)
        args.workers = len(devices)
    results = run_experiment(cfg, out, workers=args.workers, device=args.device, force=args.force,
                             command=command, progress=args.workers == 1 and sys.stderr.isatty(),
                             store=getattr(args, "store", None), devices=devices,
                             checkpoint_dir=getattr(args, "checkpoint_dir", None), mlflow=getattr(args, "mlflow", None),
                             rerun_stale=getattr(args, "rerun_stale", False))
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
    cfg = demo_config(args.name, quick=args.quick, seeds=args.seeds, keep=args.keep)
    if args.out is None:
        args.out = f"runs/demo-{args.name}{'-quick' if args.quick else ''}"
    command = "auxloss demo " + args.name + (" --quick" if args.quick else "") + (
        f" --seeds {args.seeds}" if args.seeds else "") + (f" --keep {args.keep}" if args.keep else "")
    return _run_config(cfg, args, command)


def cmd_run(args: argparse.Namespace) -> int:
    from auxloss.experiment.config import load_config

    # `is not None`: --seeds 0 must reach the validation (and be refused), not fall back on the config's seeds.
    overrides = {"seeds": args.seeds} if args.seeds is not None else {}
    if args.compile:
        overrides["train.compile"] = True
    if args.keep is not None:
        overrides["keep"] = args.keep  # not part of the fingerprint: the same --out folder resumes
    cfg = load_config(args.config, overrides)
    if args.out is None:
        args.out = f"runs/{cfg.name}"
    from auxloss._redact import argv_without_passwords

    # The command is recorded (results.json, the report): any password in a URL argument is left out of it.
    return _run_config(cfg, args, "auxloss run " + " ".join(shlex.quote(a) for a in argv_without_passwords(sys.argv[2:])))


def cmd_report(args: argparse.Namespace) -> int:
    from auxloss.experiment.config import load_config
    from auxloss.experiment.report import build_report
    from auxloss.experiment.runner import (
        EXPERIMENT_FILE,
        RESULTS_FILE,
        STORE_FILE,
        STORE_URL_FILE,
        aggregate,
        load_histories,
        open_experiment_store,
        write_atomic,
    )
    from auxloss.experiment.store import Store

    # The folder may be someone else's: its store is only read (SQLite mode=ro), a database URL it names is never
    # connected to unless passed with --store, and the report can go to another folder (--out) when it is read-only.
    out = Path(args.dir)
    if not (out / STORE_FILE).exists() and not (out / STORE_URL_FILE).exists():
        raise AuxLossError(f"{str(out)!r} holds no auxloss results ({STORE_FILE} is missing); give the --out folder "
                           "of an `auxloss run` or `auxloss demo`.")
    has_config = (out / "config.yaml").is_file()
    if not has_config and not (out / EXPERIMENT_FILE).is_file():
        raise AuxLossError(f"{str(out)!r} has a results store but no config.yaml (nor the {EXPERIMENT_FILE} of an "
                           "auxloss.compare call): it is not (or no longer) a complete auxloss output folder. Give the "
                           "--out folder of an `auxloss run`, or run its config again with that --out.")
    dest = Path(args.out) if args.out else out
    if args.out is None and not os.access(out, os.W_OK):
        raise AuxLossError(f"{str(out)!r} is read-only; pass --out FOLDER to write the report somewhere else.")
    if has_config:
        from auxloss.experiment.build import experiment_from_config

        expected = experiment_from_config(load_config(out / "config.yaml"))
        name, fingerprint, summary = expected.name, expected.identity(), expected.summary()
    else:  # an auxloss.compare folder: the experiment is described by what it stored, no code of the user's runs
        described = json.loads((out / EXPERIMENT_FILE).read_text())
        name, fingerprint, summary = described.get("name", "experiment"), None, None
    if args.store:
        # Only read: a database that does not hold this experiment is an error, never given a new schema.
        store = open_experiment_store(out, name, args.store, readonly=True)
        if store.get_meta("config_hash") is None or not store.status():
            raise AuxLossError(f"the results store {store.location!r} holds no runs of experiment {name!r}; nothing "
                               f"was written. Pass the --store database the runs of {str(out)!r} were written to "
                               "(its store_url.txt names it).")
    elif (out / STORE_URL_FILE).exists():
        store = open_experiment_store(out, name)  # raises: the URL must come from the user
    else:
        store = Store(out / STORE_FILE, stale_after=1.0, readonly=True)
    stored_name, stored_fingerprint = store.get_meta("name"), store.get_meta("config_hash")
    if (stored_name is not None and stored_name != name) or (
            fingerprint is not None and stored_fingerprint is not None and stored_fingerprint != fingerprint):
        if args.store:  # the database may be the wrong one, not the folder
            raise AuxLossError(f"the results store {store.location!r} holds experiment {stored_name!r} with another "
                               f"config ({stored_fingerprint}) than {str(out)!r} ({name!r}, config {fingerprint}); "
                               "nothing was written. Pass the --store database the runs of this folder were "
                               "written to (its store_url.txt names it).")
        raise AuxLossError(f"the results store of {str(out)!r} holds the runs of another experiment ({stored_name!r}, "
                           f"config {stored_fingerprint}) than its config.yaml ({name!r}, config {fingerprint}); "
                           "the folder was mixed up by hand. Give the --out folder of a single `auxloss run`.")
    summary = summary or store.get_meta("summary")
    if summary is None:
        raise AuxLossError(f"the results store of {str(out)!r} does not describe its experiment; it was not written "
                           "by auxloss run or auxloss.compare.")
    try:
        previous = json.loads((out / RESULTS_FILE).read_text()) if (out / RESULTS_FILE).exists() else {}
    except (ValueError, OSError):
        previous = {}  # only the command and the timing are taken from it: recomputed without them
    previous = previous if isinstance(previous, dict) else {}
    results = aggregate(summary, store, command=(previous.get("config") or {}).get("command"),
                        seconds=(previous.get("timing") or {}).get("total_seconds"))
    dest.mkdir(parents=True, exist_ok=True)
    write_atomic(dest / RESULTS_FILE, json.dumps(results, indent=2))
    path = build_report(dest, results, *load_histories(store, summary.get("seeds")), root=out)
    print(f"Report: {path.resolve()}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from auxloss.taps import list_layers

    if args.model is None and args.config is None:
        raise AuxLossError("give a model (a built-in name, torchvision:NAME, timm:NAME or package.module:function) "
                           "or --config CONFIG.yaml (its model and a batch of its data).")
    if args.config is not None:
        model, x, label = _layers_from_config(args)
    elif is_user_model(args.model):
        model, x, label = _layers_user_model(args, None)
    elif ":" in args.model:
        from auxloss.integrations.models import example_input, resolve_model

        model = resolve_model(args.model, num_classes=args.num_classes)
        x, label = example_input(args.model, size=args.size), args.model
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
        x, label = zoo_example(args.model, **shape_kwargs), args.model
    try:
        with torch.no_grad():
            infos = list_layers(model, x, leaves=args.leaves, max_depth=args.depth)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise AuxLossError(f"running {label} on an example input of shape {_shape(x)} failed ({type(exc).__name__}: "
                           f"{detail}). Give the input your model expects with --input-shape (and --input-dtype), "
                           "or --config with your data.") from None
    print(f"{'layer':<40} {'type':<22} {'output':<28} {'params':>11}")
    for info in infos:
        print(info)
    print(f"\n{len(infos)} tappable layers for input {_shape(x)}. Tap one with auxloss.Tap('<layer>', head).")
    return 0


def is_user_model(name: str) -> bool:
    """``pkg.mod:fn`` (the user's code), not ``torchvision:``/``timm:``: decided here without importing the
    experiment stack, so that listing a built-in model's layers needs only the core."""
    from auxloss.integrations.models import PREFIXES

    module, sep, _ = name.partition(":")
    return bool(sep) and module.strip().lower() not in PREFIXES


def _shape(x: Any) -> Any:
    return tuple(x.shape) if hasattr(x, "shape") else type(x).__name__


def _parse_params(items: list[str]) -> dict[str, Any]:
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AuxLossError(f"--param {item!r} must look like key=value (e.g. --param width=64).")
        params[key] = yaml.safe_load(value)  # 64 -> int, 0.5 -> float, true -> bool, [1, 2] -> list
    return params


def _example_from_shape(args: argparse.Namespace) -> Any:
    import torch

    try:
        shape = tuple(int(s) for s in args.input_shape.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise AuxLossError(f"--input-shape {args.input_shape!r} must be positive integers separated by commas, such "
                           "as 1,3,32,32 (batch, channels, height, width) or 1,64.")
    dtype = {"float32": torch.float32, "float64": torch.float64, "long": torch.long}[args.input_dtype]
    return torch.zeros(shape, dtype=dtype)


def _layers_user_model(args: argparse.Namespace, config_dir: str | None,
                       params: dict[str, Any] | None = None) -> tuple[Any, Any, str]:
    if args.input_shape is None:
        raise AuxLossError(f"{args.model} is your own model: give an example input's shape with --input-shape "
                           "(e.g. --input-shape 1,3,32,32), or --config CONFIG.yaml to take one batch of its data.")
    return _call_user_model(args.model, params or _parse_params(args.param), config_dir), \
        _example_from_shape(args), args.model


def _call_user_model(name: str, params: dict[str, Any], config_dir: str | None) -> Any:
    import torch
    from torch import nn

    from auxloss.experiment.usercode import call_with_seed, import_callable

    fn = import_callable(name, what="model", search=[config_dir] if config_dir else [])
    torch.manual_seed(0)
    model = call_with_seed(fn, 0, params, what=f"model {name!r}")
    if not isinstance(model, nn.Module):
        raise AuxLossError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _layers_from_config(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The config's model (or MODEL), and the first validation sample of the config's data as the input."""
    import torch

    from auxloss.experiment.assemble import check_splits, example_input, make_loaders
    from auxloss.experiment.build import experiment_from_config
    from auxloss.experiment.config import load_config

    cfg = load_config(args.config)
    # MODEL named as in the config gets the config's params, unless --param gives others.
    params = _parse_params(args.param) or (dict(cfg.model.params) if args.model == cfg.model.name else {})
    if args.model is not None and is_user_model(args.model) and args.input_shape is not None:
        return _layers_user_model(args, cfg._config_dir, params)
    exp = experiment_from_config(cfg)
    if args.input_shape is not None:
        x = _example_from_shape(args)
    else:
        splits = check_splits(exp.data(0))
        loaders = make_loaders(splits, batch_size=1, eval_batch_size=1, options={}, seed=0)
        x = example_input(exp, loaders)
    if args.model is not None and is_user_model(args.model):
        return _call_user_model(args.model, params, cfg._config_dir), x, args.model
    if args.model is not None:
        raise AuxLossError("with --config, the model is the config's (model.name); give a package.module:function "
                           "MODEL to list another one, or drop --config.")
    torch.manual_seed(0)
    return exp.model(0), x, cfg.model.name


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
        p.add_argument("--workers", type=int, default=None,
                       help=f"processes training runs in parallel (default: {_default_workers()}, or GPUs x "
                            "--per-gpu with --gpus)")
        p.add_argument("--gpus", default=None, metavar="IDS",
                       help="pin each worker to one of these GPUs, round-robin: 'all' or indices such as '0,1'")
        p.add_argument("--per-gpu", type=int, default=1, metavar="K",
                       help="with --gpus: how many runs may share one GPU (default: 1)")
        p.add_argument("--device", default=None, help="torch device (default: CUDA when available, else CPU)")
        p.add_argument("--force", action="store_true",
                       help="reuse an output folder that holds another experiment's results (discarding them)")
        p.add_argument("--rerun-stale", action="store_true",
                       help="train again the finished runs that another auxloss or torch version trained")
        # The config's `keep` values, spelled out so that --help imports no torch (a test checks they agree).
        p.add_argument("--keep", choices=KEEP_CHOICES, default=None,
                       help="trained weights each run keeps under OUT/runs/: best (the best-validation trunk and "
                            "heads, about 4 bytes per parameter per file), all (also the last epoch's) or none "
                            "(default: the config's keep, best). Applies to the runs trained from now on; the "
                            "same folder resumes whatever the keep")
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
    p.add_argument("--store", default=None, metavar="URL",
                   help="the PostgreSQL database that holds DIR's runs (the folder's store_url.txt names it; a URL "
                        "without a password reads it from PGPASSWORD or ~/.pgpass)")
    p.add_argument("--out", default=None, metavar="FOLDER",
                   help="write results.json and the report there instead of DIR (for a read-only DIR)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("layers", help="list a model's tappable layers with their output shapes",
                       description="List the layers of a model, with output shapes: a built-in model (small_cnn, "
                                   "deep_mlp, googlenet, googlenet32), torchvision:NAME / timm:NAME, or your own "
                                   "package.module:function (with --input-shape, or --config to run it on a batch "
                                   "of the config's data). Naming a function runs that code.")
    p.add_argument("model", nargs="?", default=None,
                   help="model name, or package.module:function returning your nn.Module (default with --config: "
                        "the config's model)")
    p.add_argument("--config", default=None, help="an experiment YAML: its model (and params) and the first "
                                                  "validation sample of its data as the example input")
    p.add_argument("--input-shape", default=None, metavar="SHAPE",
                   help="example input shape for your own model, batch first: 1,3,32,32 or 1,64")
    p.add_argument("--input-dtype", default="float32", choices=["float32", "float64", "long"],
                   help="dtype of the --input-shape example (long for token ids)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of your model function (repeatable; values read as YAML)")
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

    p = sub.add_parser("probe", help="rank candidate auxiliary tasks with a short paired race",
                       description="Each variant of CONFIG is a candidate. The baseline and every candidate train "
                                   "the same short run (one seed, same weights and batches); candidates are ranked "
                                   "by the main task's held-out metric against the baseline's. Gradient cosine, "
                                   "look-ahead affinity (Fifty et al. 2021) and learnability are reported as "
                                   "diagnostics.")
    p.add_argument("config", nargs="?", default=None, help="YAML config file (or --demo NAME)")
    p.add_argument("--demo", default=None, help="probe a built-in demo's config (auxloss demo --list)")
    p.add_argument("--quick", action="store_true", help="with --demo: the demo's quick config")
    p.add_argument("--budget", type=float, default=0.2,
                   help="the most the probe may cost, as a fraction of the experiment's training steps (default 0.2)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per run (default: as many as the budget allows, at most one run of "
                        "the experiment)")
    p.add_argument("--every", type=int, default=None,
                   help="measure the diagnostics every N steps (default: 5 times per candidate)")
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
    if hasattr(args, "workers") and hasattr(args, "gpus"):
        args.workers_given = args.workers is not None
        if args.workers is None:
            args.workers = _default_workers()
    try:
        if getattr(args, "workers", None) is not None and args.workers < 1:
            raise AuxLossError(f"--workers must be at least 1 (the number of processes training runs in "
                               f"parallel), got {args.workers}.")
        code = int(args.func(args) or 0)
        from auxloss.train.distributed import shutdown

        shutdown()  # under torchrun: every rank leaves the process group together
        # Flush here rather than at interpreter exit: with a buffered stdout (a pipe) a reader that is gone
        # shows up now, as the BrokenPipeError below, and not as "Exception ignored" at exit.
        sys.stdout.flush()
        return code
    except AuxLossError as exc:
        print(f"auxloss: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_is_broken():
            raise  # a pipe of something else (a worker, a socket): not a reader of ours that left
        # The reader of stdout is gone (`auxloss run ... | head -1`); the runs are stored whatever is printed.
        # As the Python docs advise (signal module, "Note on SIGPIPE"): point stdout at devnull so that the flush
        # at exit fails no more, and leave quietly.
        _quiet_stdout()
        return 1
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


def _stdout_is_broken() -> bool:
    """Whether stdout's reader is gone, so that a BrokenPipeError of another pipe is not taken for it.

    A buffered stdout still holds the text that failed, and flushing it fails again. An unbuffered one
    (``PYTHONUNBUFFERED``) holds nothing, so the pipe itself is asked: poll() reports an error on the write end of
    a pipe whose reader has closed it.
    """
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), or no file descriptor (captured)
        return False
    return any(event & select.POLLERR for _, event in events)


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured): nothing is flushed to a pipe
        pass


if __name__ == "__main__":
    sys.exit(main())
