"""MLflow tracking, checked against the run's own logs: a local file store, and a real `mlflow server` process.

The numbers MLflow holds must be the numbers of ``epochs.jsonl``/``steps.jsonl`` and ``results.json``, one
parent run per experiment with a nested run per (variant, seed), and no password of any URI may reach MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from auxloss._redact import mask_passwords
from auxloss.integrations.mlflow import mlflow_keys

try:
    import mlflow  # noqa: F401
    from mlflow import MlflowClient
except ImportError:  # an optional extra (auxloss[mlflow]); `make test` installs it with the dev extra
    MlflowClient = None

needs_mlflow = pytest.mark.skipif(MlflowClient is None, reason="mlflow is not installed (pip install auxloss[mlflow])")

# 176 training images in batches of 8: 22 optimizer steps per epoch, so the trainer's step log (every 10 steps)
# has entries at steps 10, 20, 30 and 40 over 2 epochs.
CONFIG = """\
name: tracked tiny
seeds: 2
data: {name: shapes, n_train: 176, n_val: 32, n_test: 32, batch_size: 8, params: {image_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train: {epochs: 2, lr: 0.01, eval_train: false}
variants:
  - name: deep
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: 0.3}]
"""
SECRET = "pa55-w0rd"


def env(**extra: str) -> dict[str, str]:
    """A worker subprocess's environment: one torch thread (deterministic), no AUXLOSS_/MLFLOW_ settings of ours."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("AUXLOSS_", "MLFLOW_"))}
    out.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out.update(extra)
    return out


# -- pure helpers ----------------------------------------------------------------------------------------------
def test_redact_hides_the_password_of_every_url_and_keeps_the_rest():
    text = (f"auxloss run x.yaml --store postgresql://ana:{SECRET}@db.lan:5432/runs?sslmode=require "
            f"--mlflow http://bob:{SECRET}@mlflow:5000 --checkpoint-dir s3://bucket/ckpt?token={SECRET}&x=1")
    assert mask_passwords(text) == ("auxloss run x.yaml --store postgresql://ana:***@db.lan:5432/runs?sslmode=require "
                            "--mlflow http://bob:***@mlflow:5000 --checkpoint-dir s3://bucket/ckpt?token=***&x=1")
    # nothing to hide: unchanged (a user without a password, a plain path)
    for plain in ("postgresql://ana@db/runs", "file:/tmp/mlruns", "/shared/ckpt", "http://mlflow:5000"):
        assert mask_passwords(plain) == plain


def test_mlflow_keys_give_the_total_loss_its_own_name():
    record = {"loss": 3.0, "loss/main": 1.0, "loss/aux1": 2.0, "weight/aux1": 0.3, "lr": 0.1,
              "train/loss": 4.0, "train/loss/main": 1.5, "val/metric/main": 0.5}
    assert mlflow_keys(record) == {"loss/total": 3.0, "loss/main": 1.0, "loss/aux1": 2.0, "weight/aux1": 0.3,
                                   "lr": 0.1, "train/loss/total": 4.0, "train/loss/main": 1.5,
                                   "val/metric/main": 0.5}


# -- end to end ------------------------------------------------------------------------------------------------
def run_tracked(tmp_path: Path, uri: str) -> Path:
    from auxloss.experiment.config import load_config
    from auxloss.experiment.runner import run_experiment

    config = tmp_path / "tracked.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(load_config(config), out, workers=1, mlflow=uri,
                       command=f"auxloss run tracked.yaml --store postgresql://ana:{SECRET}@db/runs")
    finally:
        torch.set_num_threads(threads)
    return out


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_tracking(uri: str, out: Path) -> None:
    """Everything MLflow holds against the files of the run (independent of the code that logged it)."""
    client = MlflowClient(tracking_uri=uri)
    results = json.loads((out / "results.json").read_text())
    experiment = client.get_experiment_by_name("tracked tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = {(r.data.tags["auxloss.variant"], int(r.data.tags["auxloss.seed"])): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == [("baseline", 0), ("baseline", 1), ("deep", 0), ("deep", 1)]
    assert len(runs) == 5

    # The parent: config as params, verdict as tags, Δ as a metric, the report as artifacts, finished.
    assert parent.info.run_name == "tracked tiny" and parent.info.status == "FINISHED"
    assert parent.data.params["train.lr"] == "0.01" and parent.data.params["data.batch_size"] == "8"
    (comparison,) = results["comparisons"]
    assert parent.data.tags["auxloss.verdict.deep"] == comparison["verdict"]
    assert parent.data.metrics["delta/deep"] == pytest.approx(comparison["delta"], rel=1e-12, abs=1e-15)
    means = {v["name"]: v["mean"] for v in results["variants"]}
    assert parent.data.metrics["mean/baseline"] == pytest.approx(means["baseline"], rel=1e-12, abs=1e-15)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html", "results.json", "config.yaml", "figures"} <= artifacts
    local = client.download_artifacts(parent.info.run_id, "report.md", str(out.parent / "downloaded"))
    assert Path(local).read_text() == (out / "report.md").read_text()

    # No password of any URI anywhere in MLflow (the command's store URL carried one).
    assert parent.data.tags["auxloss.command"].endswith("--store postgresql://ana:***@db/runs")
    for run in runs:
        for value in [*run.data.tags.values(), *run.data.params.values()]:
            assert SECRET not in value

    # Each nested run: its epochs.jsonl and steps.jsonl, number for number, and its stored result.
    done = {(r["variant"], r["seed"]): r for r in _store_results(out)}
    for (variant, seed), run in children.items():
        assert run.info.status == "FINISHED" and run.info.run_name == f"{variant}/seed{seed}"
        assert run.data.params["seed"] == str(seed) and run.data.params["train.lr"] == "0.01"
        folder = out / "runs" / variant / f"seed{seed}"
        epochs = read_jsonl(folder / "epochs.jsonl")
        assert [e["epoch"] for e in epochs] == [1, 2]
        renamed = mlflow_keys({k: 0.0 for k in epochs[0]})
        for key, name in zip(epochs[0], renamed):
            if key == "epoch":
                continue
            name = "global_step" if key == "step" else name
            assert history(client, run.info.run_id, name) == [(e["epoch"], float(e[key])) for e in epochs], key
        steps = read_jsonl(folder / "steps.jsonl")
        assert [s["step"] for s in steps] == [10, 20, 30, 40]
        renamed = mlflow_keys({k: 0.0 for k in steps[0] if k != "step"})
        for key, name in zip([k for k in steps[0] if k != "step"], renamed):
            assert history(client, run.info.run_id, f"step/{name}") == [(s["step"], float(s[key])) for s in steps]
        result = done[(variant, seed)]
        assert run.data.metrics["main"] == result["main"]
        assert run.data.metrics["best_epoch"] == result["best_epoch"]
        assert run.data.metrics["best/test/metric/main"] == result["best"]["test/metric/main"]


def _store_results(out: Path) -> list[dict]:
    import sqlite3

    con = sqlite3.connect(out / "results.sqlite")
    try:
        return [json.loads(r) for (r,) in con.execute("SELECT result FROM runs WHERE status='done'")]
    finally:
        con.close()


@needs_mlflow
def test_file_store_holds_the_runs_numbers(tmp_path, monkeypatch):
    # MLflow 3 keeps the file store in maintenance mode and asks for this opt-in.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()  # file:///...
    out = run_tracked(tmp_path, uri)
    check_tracking(uri, out)


@needs_mlflow
def test_a_killed_run_continues_its_mlflow_run_without_duplicates(tmp_path, monkeypatch):
    """`auxloss run --mlflow` killed inside a checkpoint write, then run again: one nested run per (variant, seed),
    each step and epoch logged once, with the numbers of the final logs."""
    config = tmp_path / "tracked.yaml"
    # 3 epochs of 3 steps, a checkpoint every 2 steps and after every epoch: steps 2, 3, 4, 6, 6, 8, 9, 9.
    config.write_text(CONFIG.replace("seeds: 2", "seeds: 1").replace("n_train: 176", "n_train: 48")
                      .replace("batch_size: 8", "batch_size: 16")
                      .replace("epochs: 2,", "epochs: 3, checkpoint_every: 2,"))
    out = tmp_path / "out"
    uri = (tmp_path / "mlruns").as_uri()
    command = [sys.executable, "-m", "auxloss", "run", str(config), "--out", str(out), "--workers", "1",
               "--mlflow", uri]
    extra = {"MLFLOW_ALLOW_FILE_STORE": "true"}
    # Killed on the 4th checkpoint of the first run (step 4 of 9): epoch 1 is in MLflow, epoch 2 is not.
    proc = subprocess.run(command, env=env(AUXLOSS_FAULT="checkpoint-tmp:4", **extra), capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    proc = subprocess.run(command, env=env(**extra), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracked tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # the parent and two nested runs: the rerun found the killed worker's runs again
    for run in runs:
        if "auxloss.variant" not in run.data.tags:
            continue
        epochs = read_jsonl(out / "runs" / run.data.tags["auxloss.variant"] / "seed0" / "epochs.jsonl")
        assert history(client, run.info.run_id, "val/metric/main") == [
            (e["epoch"], float(e["val/metric/main"])) for e in epochs]
        assert run.info.status == "FINISHED"


# -- a real server ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and served artifacts; always terminated."""
    port = _free_port()
    with open(tmp_path / "server.log", "w") as log:
        yield from _serve(tmp_path, port, log)


def _serve(tmp_path, port, log):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    try:
        # Bounded wait: the first start runs the database migrations, slow on a busy machine.
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {(tmp_path / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer within 300 s: {(tmp_path / 'server.log').read_text()}")
            time.sleep(1)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and any worker it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@needs_mlflow
def test_real_server_holds_the_runs_numbers(tmp_path, mlflow_server):
    # Credentials in the URI (requests sends them as basic auth; this server ignores them) must not be recorded.
    uri = f"http://ana:{SECRET}@127.0.0.1:{mlflow_server}"
    out = run_tracked(tmp_path, uri)
    check_tracking(f"http://127.0.0.1:{mlflow_server}", out)
