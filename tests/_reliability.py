"""Helpers shared by the kill, concurrency and error tests: a tiny experiment, subprocess commands, store checks."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

# 48 training images of 16x16 in batches of 16: 3 optimizer steps per epoch, a checkpoint every 2 steps and after
# every epoch, so a run writes 5 checkpoints over its 3 epochs.
TINY_YAML = """\
name: reliability-tiny
seeds: {seeds}
data: {{name: shapes, n_train: 48, n_val: 32, n_test: 32, batch_size: 16, params: {{image_size: 16}}}}
model: {{name: small_cnn, params: {{width: 4}}}}
train: {{epochs: {epochs}, lr: 0.01, checkpoint_every: 2, eval_train: false}}
variants:
  - name: deep
    taps: {{aux1: {{layer: block1, head: {{type: linear}}}}}}
    tasks: [{{name: aux1, source: aux1, weight: 0.3}}]
"""


def write_config(folder: Path, seeds: int = 2, epochs: int = 3) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(TINY_YAML.format(seeds=seeds, epochs=epochs))
    return path


def env(**extra: str) -> dict[str, str]:
    """The environment of a worker subprocess: one torch thread (deterministic and fair on a shared machine)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("AUXLOSS_")}
    out.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out.update(extra)
    return out


def run_command(config: Path, out: Path, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "auxloss", "run", str(config), "--out", str(out), "--workers", str(workers)]


def store_rows(out: Path) -> list[dict[str, Any]]:
    """Every run row of the store under ``out``, read with a plain sqlite3 connection (as another process would)."""
    path = out / "results.sqlite"
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        rows = con.execute("SELECT variant, seed, status, attempts, result, history, error, worker FROM runs "
                           "ORDER BY variant, seed").fetchall()
    finally:
        con.close()
    return [{"variant": v, "seed": s, "status": st, "attempts": a, "result": r, "history": h, "error": e,
             "worker": w} for v, s, st, a, r, h, e, w in rows]


def check_store(out: Path, epochs: int) -> dict[str, int]:
    """The store never holds half a run: a 'done' row has its whole result and history, any other row neither.

    Returns the number of rows per status.
    """
    counts: dict[str, int] = {}
    for row in store_rows(out):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        assert row["status"] in ("pending", "running", "done"), row  # never 'failed' in these tests
        if row["status"] == "done":
            result, history = json.loads(row["result"]), json.loads(row["history"])
            assert isinstance(result["main"], float) and result["variant"] == row["variant"], row
            assert [r["epoch"] for r in history] == list(range(1, epochs + 1)), row
        else:
            assert row["result"] is None and row["history"] is None, row
    return counts


def outcome(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Each finished run's main metric, best-epoch metrics and history, without wall-clock times."""
    found = {}
    for row in store_rows(out):
        if row["status"] != "done":
            continue
        result = json.loads(row["result"])
        history = [{k: v for k, v in rec.items() if k != "time"} for rec in json.loads(row["history"])]
        found[(row["variant"], row["seed"])] = {"main": result["main"], "best": result["best"],
                                                "best_epoch": result["best_epoch"], "history": history}
    return found


def summary(out: Path) -> dict[str, Any]:
    """results.json without timings: per-variant metrics and the paired comparisons."""
    data = json.loads((out / "results.json").read_text())
    variants = [{k: v for k, v in var.items() if k != "seconds"} for var in data["variants"]]
    return {"variants": variants, "comparisons": data["comparisons"], "runs": data["runs"]}


def in_process_reference(config):
    """Each run trained here, uninterrupted, with one torch thread like the worker subprocesses."""
    import torch

    from auxloss.experiment.config import load_config
    from auxloss.experiment.runner import run_one

    cfg = load_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = {}
        for seed in range(cfg.seeds):
            for variant in cfg.variant_names:
                r = run_one(cfg, variant, seed)
                ref[(variant, seed)] = {"main": r["main"], "best": r["best"], "best_epoch": r["best_epoch"],
                                        "history": [{k: v for k, v in rec.items() if k != "time"}
                                                    for rec in r["history"]]}
        return ref
    finally:
        torch.set_num_threads(threads)
