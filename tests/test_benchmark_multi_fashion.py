"""A smoke run of benchmarks/multi_fashion.py (slow: it trains; not part of `make test`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from auxloss.zoo.data.idx import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not fashion_mnist_available(FASHION_MNIST_DEFAULT_ROOT),
                    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
def test_quick_fixed_runs_and_reports_paired_results(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_fashion.py"), "--quick", "--methods",
                           "fixed", "--seeds", "2", "--no-libmtl", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=1800, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"baseline", "auxloss:fixed"}
    assert rows["auxloss:fixed"]["step_vs_fixed"] == 1.0 and rows["auxloss:fixed"]["n"] == 2
    # the paired delta is the mean of the per-seed differences of the two accuracies
    fixed, base = rows["auxloss:fixed"], rows["baseline"]
    assert fixed["delta"] == pytest.approx(fixed["accuracy"] - base["accuracy"], abs=1e-9)
    assert 0.1 < base["accuracy"] <= 1.0  # ten classes: above chance after two epochs
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["comparisons"] == [{"variant": "auxloss:fixed", "delta": fixed["delta"]}]


@pytest.mark.slow
@pytest.mark.skipif(not fashion_mnist_available(FASHION_MNIST_DEFAULT_ROOT),
                    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
def test_seeds_in_worker_processes_give_the_serial_accuracies(tmp_path):
    # --jobs 2 trains each seed in its own process: the same data, initial weights and batch order as the serial
    # run, so the same accuracies to the last bit (one thread per process in both).
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    accuracies = []
    for jobs in ("1", "2"):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_fashion.py"), "--quick", "--methods",
                               "fixed", "--seeds", "2", "--no-libmtl", "--jobs", jobs],
                              capture_output=True, text=True, env=env, timeout=1800, check=True)
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["jobs"] == int(jobs) and summary["cpu_seconds"] > 0
        accuracies.append({r["method"]: (r["accuracy"], r["n"]) for r in summary["rows"]})
    assert accuracies[0] == accuracies[1]
    assert accuracies[0]["auxloss:fixed"][1] == 2
