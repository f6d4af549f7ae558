"""DDP under torchrun on CPU (gloo, 2 processes)."""

import json
import os
import subprocess
import sys

TINY_YAML = """
name: ddp-tiny
seeds: 2
data: {name: shapes, n_train: 64, n_val: 32, n_test: 32, batch_size: 16, params: {image_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train: {epochs: 2, lr: 0.01}
variants:
  - name: late
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: {type: curriculum, value: 0.3, start: 6, ramp: 1}}]
"""


def torchrun(args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_torchrun_two_processes_produce_results_json(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY_YAML)
    out = tmp_path / "out"
    proc = torchrun(["-m", "auxloss", "run", str(cfg), "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["variants"]] == ["baseline", "late"]
    assert all(v["seeds"] == [0, 1] for v in results["variants"])
    assert {"variant", "delta", "ci95", "p_value", "verdict"} <= set(results["comparisons"][0])
    # Only rank 0 wrote: one set of logs per run, and the report once.
    assert proc.stdout.count("Report: ") == 1
    logs = sorted(p.relative_to(out).as_posix() for p in out.glob("runs/*/*/epochs.jsonl"))
    assert logs == ["runs/baseline/seed0/epochs.jsonl", "runs/baseline/seed1/epochs.jsonl",
                    "runs/late/seed0/epochs.jsonl", "runs/late/seed1/epochs.jsonl"]
    # The curriculum keeps the head at weight 0 for the whole first epoch (steps 0-3 of 8): DDP
    # (find_unused_parameters=False) must not trip on its parameters. (A weight that is 0 for the whole run is
    # refused: a verdict about nothing.)
    history = [json.loads(line) for line in (out / "runs/late/seed0/epochs.jsonl").read_text().splitlines()]
    assert history[0]["train/weight/aux1"] == 0.0 and history[-1]["train/weight/aux1"] > 0.0


def test_torchrun_respects_the_folders_lock_and_claims_nothing_when_refused(tmp_path):
    # Another `auxloss run` holds the output folder (here: this test, holding the lock as a command does). A torchrun
    # job on the same folder must refuse to start, as a plain command does, instead of resetting the other's runs.
    import fcntl

    from auxloss.experiment.runner import LOCK_FILE

    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY_YAML)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = torchrun(["-m", "auxloss", "run", str(cfg), "--out", str(out)], cwd=tmp_path)
    assert proc.returncode != 0
    assert "another `auxloss run` is working on" in proc.stderr + proc.stdout
    assert not (out / "results.sqlite").exists() and not (out / "config.yaml").exists()
