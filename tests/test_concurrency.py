"""Several processes on one experiment and one SQLite store: no run lost, duplicated or corrupted.

Workers share a store with ``AUXLOSS_SHARED_STORE=1`` (so that a new one does not reset the others' claims). A
worker keeps its claim alive with heartbeats while it trains; a claim without a heartbeat for ``stale_after``
seconds (``AUXLOSS_STALE_AFTER``) is taken over by another worker, which resumes the run from its checkpoint.

The fast tests drive the store and the heartbeat directly; the slow one starts 4 `auxloss run` processes, kills
workers in the middle of their runs at random, starts new ones, and checks that every run ends done exactly once,
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import threading
import time

import pytest
import torch
from _reliability import check_store, env, outcome, run_command, store_rows, summary, write_config

from auxloss import AuxLossError
from auxloss.experiment import runner, worker
from auxloss.experiment.store import Store


def test_a_claim_without_heartbeat_is_taken_over_and_finished_once(tmp_path):
    store = Store(tmp_path / "s.sqlite", stale_after=0.3)
    store.add_runs([("a", 0)])
    assert store.claim("w1") == ("a", 0)
    assert store.claim("w2") is None  # fresh claim: nobody may take it
    assert store.heartbeat("a", 0, "w1")
    time.sleep(0.4)  # w1 stops sending heartbeats (it died, or stalled)
    assert store.claim("w2") == ("a", 0)
    assert not store.heartbeat("a", 0, "w1")  # w1 learns its claim is gone
    assert store.finish("a", 0, {"main": 1.0}, [{"epoch": 1}], worker="w2")
    assert not store.finish("a", 0, {"main": 2.0}, [{"epoch": 1}], worker="w1")  # never a second result
    (row,) = store.runs(None)
    assert row["status"] == "done" and row["attempts"] == 2 and row["result"] == {"main": 1.0}


def test_the_heartbeat_callback_keeps_a_claim_and_stops_a_run_taken_over(tmp_path):
    store = Store(tmp_path / "s.sqlite", stale_after=0.2)
    store.add_runs([("a", 0)])
    store.claim("w1")
    beat = worker._Heartbeat(store, "a", 0, "w1", parent=None)
    for _ in range(4):  # a training loop that calls its hooks more often than stale_after
        time.sleep(0.1)
        beat.on_train_batch_end(None, None, 0)
    assert store.claim("w2") is None  # still alive
    time.sleep(0.3)
    assert store.claim("w2") == ("a", 0)
    with pytest.raises(worker._Stop, match="taken over"):
        beat.beat(force=True)


def test_concurrent_claims_from_many_threads_hand_out_each_run_once(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    runs = [(f"v{i}", s) for i in range(5) for s in range(4)]
    store.add_runs(runs)
    got: list = []

    def worker(name):
        mine = Store(tmp_path / "s.sqlite")
        while (job := mine.claim(name)) is not None:
            got.append(job)
            mine.finish(*job, {"main": 0.5}, [], worker=name)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(runs)
    assert all(r["attempts"] == 1 for r in store.runs("done")) and len(store.runs("done")) == len(runs)


def test_stale_after_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("AUXLOSS_STALE_AFTER", "2.5")
    assert worker.stale_after() == 2.5
    monkeypatch.setenv("AUXLOSS_STALE_AFTER", "soon")
    with pytest.raises(AuxLossError, match="positive number of seconds"):
        worker.stale_after()


# -- slow: 4 processes, random kills ---------------------------------------------------------------------------------
SEEDS, EPOCHS, WORKERS, STALE = 4, 3, 4, 5


def start(config, out):
    return subprocess.Popen(run_command(config, out), env=env(AUXLOSS_SHARED_STORE="1",
                                                              AUXLOSS_STALE_AFTER=str(STALE)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def claimed_by_live_worker(procs, out):
    """(process, run) pairs: a run that one of this test's live processes holds a claim on right now."""
    by_pid = {p.pid: p for p in procs if p.poll() is None}
    prefix = socket.gethostname() + ":"
    found = []
    for row in store_rows(out):
        worker = row["worker"] or ""
        if row["status"] == "running" and worker.startswith(prefix) and int(worker[len(prefix):]) in by_pid:
            found.append((by_pid[int(worker[len(prefix):])], (row["variant"], row["seed"])))
    return found


@pytest.mark.slow
def test_four_workers_with_random_kills_lose_and_duplicate_nothing(tmp_path):
    from auxloss.experiment.config import load_config

    config = write_config(tmp_path, seeds=SEEDS, epochs=EPOCHS)
    out = tmp_path / "out"
    rng = random.Random(7)
    procs = [start(config, out) for _ in range(WORKERS)]
    kills, killed_runs, started = 0, set(), WORKERS
    deadline = time.monotonic() + 900
    while kills < 6 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.5, 2.0))
        busy = claimed_by_live_worker(procs, out)
        if not busy:
            if all(p.poll() is not None for p in procs):
                break
            continue
        victim, run = rng.choice(busy)
        victim.send_signal(signal.SIGKILL)  # in the middle of `run`
        victim.wait()
        kills += 1
        killed_runs.add(run)
        check_store(out, EPOCHS)
        procs.append(start(config, out))  # a new worker joins
        started += 1
    for p in procs:
        _, err = p.communicate(timeout=max(60, deadline - time.monotonic()))
        assert p.returncode in (0, -signal.SIGKILL), err
    assert kills >= 2, "the runs finished before enough workers could be killed"

    rows = store_rows(out)
    assert len(rows) == SEEDS * 2 and {(r["variant"], r["seed"]) for r in rows} == {
        (v, s) for v in ("baseline", "deep") for s in range(SEEDS)}
    assert check_store(out, EPOCHS) == {"done": SEEDS * 2}
    attempts = {(r["variant"], r["seed"]): r["attempts"] for r in rows}
    for run in killed_runs:  # each run whose worker was killed was taken over
        assert attempts[run] >= 2, (run, attempts)
    assert sum(attempts.values()) >= SEEDS * 2 + len(killed_runs)

    # Bit-identical to uninterrupted runs trained here with one thread, like each worker.
    cfg = load_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = outcome(out)
        for (variant, seed), found in got.items():
            ref = runner.run_one(cfg, variant, seed)
            assert found["main"] == ref["main"] and found["best"] == ref["best"]
            assert found["history"] == [{k: v for k, v in r.items() if k != "time"} for r in ref["history"]]
    finally:
        torch.set_num_threads(threads)
    results = summary(out)
    assert results["runs"] == {"done": SEEDS * 2, "failed": 0, "pending": 0}
    assert [len(v["main"]) for v in results["variants"]] == [SEEDS, SEEDS]
    assert json.loads((out / "results.json").read_text())["name"] == "reliability-tiny"
    print(f"\n{started} worker processes, {kills} killed mid-run, attempts {sorted(attempts.values())}: "
          "every run done exactly once, bit-identical")


def test_results_json_is_replaced_whole(tmp_path):
    path = tmp_path / "results.json"
    runner.write_atomic(path, json.dumps({"a": 1}))
    runner.write_atomic(path, json.dumps({"a": 2}))
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _epochs(path):
    """The epochs logged in ``path``; a last line torn by a kill is left out."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        json.loads(lines[-1])
    except ValueError:
        lines = lines[:-1]
    return [json.loads(line)["epoch"] for line in lines]


LONG_RUN = 100_000


@pytest.mark.parametrize("first_shared", [True, False])
def test_lock_a_plain_command_and_shared_store_workers_exclude_each_other(tmp_path, first_shared):
    """Audit 2, row 31: one process with AUXLOSS_SHARED_STORE=1 and one without on one fresh --out. The second
    must be refused with nothing of the first's touched, and no epoch may be trained twice."""
    # Far more epochs than the test waits for: the first is still training when the second starts and ends on any
    # machine, and it is killed at the end.
    config = write_config(tmp_path, seeds=1, epochs=LONG_RUN)
    out = tmp_path / "out"
    first_env, second_env = (env(AUXLOSS_SHARED_STORE="1"), env()) if first_shared else \
        (env(), env(AUXLOSS_SHARED_STORE="1"))
    first = subprocess.Popen(run_command(config, out), env=first_env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    log = out / "runs" / "baseline" / "seed0" / "epochs.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not log.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        second = subprocess.run(run_command(config, out), env=second_env, capture_output=True, text=True,
                                timeout=600, check=False)
        assert first.poll() is None, first.communicate()[1]  # the two overlapped: the test means something
    finally:
        first.kill()
        first.communicate()
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert ("workers started with AUXLOSS_SHARED_STORE=1 are working on" if first_shared else
            "a plain `auxloss run` (without AUXLOSS_SHARED_STORE=1) is working on") in second.stderr
    logged = _epochs(log)
    assert logged and logged == list(range(1, len(logged) + 1))  # each epoch once, in order
    assert (out / "config.yaml").exists() and set(check_store(out, LONG_RUN)) <= {"pending", "running"}
