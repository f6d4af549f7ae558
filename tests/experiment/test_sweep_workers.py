"""`auxloss sweep` workers in separate OS processes share one Optuna study through a real database.

SQLite always; PostgreSQL when AUXLOSS_TEST_POSTGRES_URL is set (.ci/run installs and starts Debian's server).
"""

import json
import os
import subprocess
import sys
import uuid

import pytest

from auxloss.cli import main

TINY_YAML = """
name: sweep-workers
seeds: 1
data: {name: shapes, n_train: 48, n_val: 32, n_test: 32, batch_size: 16, params: {image_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train: {epochs: 1, lr: 0.01}
variants:
  - name: deep
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: 0.3}]
"""

WORKER = """
import sys
from auxloss.experiment.config import load_config
from auxloss.experiment.sweep import sweep_worker
cfg = load_config(sys.argv[1])
n = sweep_worker(cfg, sys.argv[2], sys.argv[3], None, int(sys.argv[4]), sampler_seed=int(sys.argv[5]), threads=1)
print("ran", n)
"""

URLS = [pytest.param("sqlite", id="sqlite")]
if os.environ.get("AUXLOSS_TEST_POSTGRES_URL"):
    URLS.append(pytest.param(os.environ["AUXLOSS_TEST_POSTGRES_URL"], id="postgresql"))


@pytest.mark.parametrize("url", URLS)
def test_three_processes_lose_no_trial_and_repeat_none(tmp_path, url, capsys):
    import optuna

    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY_YAML)
    storage = f"sqlite:///{tmp_path / 'study.sqlite'}" if url == "sqlite" else url
    study = f"workers-{uuid.uuid4().hex[:10]}"  # a database outlives a test run: never reuse a study name
    trials = 6
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(cfg), storage, study, str(trials), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    ran = [int(o.strip().split()[-1]) for o, _ in outs]
    assert sum(ran) == trials  # every trial ran in exactly one process
    loaded = optuna.load_study(study_name=study, storage=storage)
    done = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(loaded.trials) == trials and len(done) == trials
    assert sorted(t.number for t in loaded.trials) == list(range(trials))
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == trials  # no proposal repeated

    # The coordinator reports the best result once: the study is full, so no new trial runs, and the
    # held-out evaluation happens only here.
    out = tmp_path / "report"
    assert main(["sweep", str(cfg), "--trials", str(trials), "--storage", storage, "--study", study,
                 "--eval-seeds", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["n_trials"] == trials
    assert len(optuna.load_study(study_name=study, storage=storage).trials) == trials
    best = max(done, key=lambda t: t.value)
    assert summary["best_value"] == pytest.approx(best.value)
    capsys.readouterr()
