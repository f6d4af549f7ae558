"""The results store in PostgreSQL: workers on several machines share one experiment.

Runs only where AUXLOSS_TEST_POSTGRES_URL points at a server (.ci/run installs and starts Debian's PostgreSQL).
"""

import os
import subprocess
import sys
import time
import uuid

import pytest

from auxloss.experiment.store import PostgresStore, open_store

URL = os.environ.get("AUXLOSS_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set AUXLOSS_TEST_POSTGRES_URL to a PostgreSQL database to run")

TINY_YAML = """
name: {name}
seeds: 3
data: {{name: shapes, n_train: 64, n_val: 32, n_test: 32, batch_size: 16, params: {{image_size: 16}}}}
model: {{name: small_cnn, params: {{width: 4}}}}
train: {{epochs: 3, lr: 0.01}}
variants:
  - name: deep
    taps: {{aux1: {{layer: block1, head: {{type: linear}}}}}}
    tasks: [{{name: aux1, source: aux1, weight: 0.3}}]
"""


def test_claims_takeover_and_single_finish():
    store = open_store(URL, namespace=f"t{uuid.uuid4().hex[:8]}", stale_after=0.3)
    assert isinstance(store, PostgresStore)
    store.add_runs([("a", 0), ("b", 0)])
    store.add_runs([("a", 0)])  # registering again changes nothing
    assert store.claim("w1") == ("a", 0) and store.claim("w2") == ("b", 0) and store.claim("w3") is None
    time.sleep(0.4)
    assert store.claim("w3") == ("a", 0)  # w1 went silent: taken over
    assert not store.heartbeat("a", 0, "w1")
    assert store.finish("a", 0, {"main": 1.0}, [{"epoch": 1}], worker="w3")
    assert not store.finish("a", 0, {"main": 2.0}, [], worker="w1")
    done = store.runs("done")
    assert len(done) == 1 and done[0]["result"] == {"main": 1.0} and done[0]["attempts"] == 2
    store.set_meta("k", [1]); store.set_meta("k", [2])
    assert store.get_meta("k") == [2]


def test_four_processes_with_a_kill_finish_every_run_once(tmp_path):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY_YAML.format(name=name))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUXLOSS_SHARED_STORE": "1", "AUXLOSS_STALE_AFTER": "4"}

    def start(i):
        return subprocess.Popen([sys.executable, "-m", "auxloss", "run", str(cfg), "--out", str(tmp_path / f"w{i}"),
                                 "--workers", "1", "--store", URL], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    procs = [start(i) for i in range(4)]
    time.sleep(6)
    procs[0].kill()  # one machine dies in the middle of its run
    procs[0].wait()
    procs.append(start(4))  # and another joins
    for p in procs[1:]:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    store = open_store(URL, namespace=name)
    rows = store.runs(None)
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    assert all(r["result"] is not None and len(r["history"]) == 3 for r in rows)

    # The same numbers as one process with its own SQLite store.
    from auxloss.experiment.config import load_config
    from auxloss.experiment.runner import run_one

    cfg_obj = load_config(cfg)
    for r in rows[:2]:
        alone = run_one(cfg_obj, r["variant"], r["seed"])
        assert alone["main"] == r["result"]["main"]
