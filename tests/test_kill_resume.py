"""Exact resume under real kills: `auxloss run` killed with SIGKILL, then run again, ends bit-identical.

Each test starts real processes (`python -m auxloss run tiny.yaml --out DIR`) and kills them: at chosen points
inside a checkpoint write or inside the store's commit (the ``AUXLOSS_FAULT`` hook makes the process SIGKILL
itself there), or at random times from outside. After every kill the store is checked: it never holds half a run.
The same command run again must finish with the main metrics, best-epoch metrics and per-epoch histories
bit-identical to an uninterrupted run's (no torch.use_deterministic_algorithms needed on CPU: one thread per
process, and the checkpoint restores every RNG and the loader's shuffle).

The fast test kills twice; the slow ones kill dozens of times (`make test-all`).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from _reliability import check_store, env, in_process_reference, outcome, run_command, summary, write_config

KILLED = -signal.SIGKILL
EPOCHS = 3


def run(config, out, fault=None, workers=1, timeout=300):
    extra = {"AUXLOSS_FAULT": fault} if fault else {}
    return subprocess.run(run_command(config, out, workers), env=env(**extra), capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_killed_inside_a_checkpoint_write_resumes_bit_identically(tmp_path):
    config = write_config(tmp_path, seeds=1, epochs=2)
    out = tmp_path / "out"
    # killed on the 3rd checkpoint of the first run, after last.pt became prev.pt and before the new last.pt
    proc = run(config, out, fault="checkpoint-prev:3")
    assert proc.returncode == KILLED, proc.stderr
    ckpt = out / "runs" / "baseline" / "seed0" / "checkpoint"
    assert (ckpt / "prev.pt").exists() and not (ckpt / "last.pt").exists()
    assert check_store(out, 2) == {"running": 1, "pending": 1}
    # the same command again resumes from prev.pt and completes
    proc = run(config, out)
    assert proc.returncode == 0, proc.stderr
    assert check_store(out, 2) == {"done": 2}
    assert outcome(out) == in_process_reference(config)
    assert summary(out)["runs"] == {"done": 2, "failed": 0, "pending": 0}


@pytest.mark.slow
def test_killed_inside_the_commit_leaves_no_half_written_run(tmp_path):
    config = write_config(tmp_path, seeds=1, epochs=2)
    out = tmp_path / "out"
    proc = run(config, out, fault="store-finish:1")  # the first run trained, killed inside its transaction
    assert proc.returncode == KILLED, proc.stderr
    assert check_store(out, 2) == {"running": 1, "pending": 1}  # rolled back
    proc = run(config, out)
    assert proc.returncode == 0, proc.stderr
    assert outcome(out) == in_process_reference(config)


# -- slow: many kills -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted `auxloss run` of the 2-seed experiment, and how long it took."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder)
    started = time.monotonic()
    proc = run(config, folder / "out")
    assert proc.returncode == 0, proc.stderr
    return config, folder / "out", time.monotonic() - started


def assert_same_as_reference(out, ref_out):
    assert check_store(out, EPOCHS) == {"done": 4}
    assert outcome(out) == outcome(ref_out)
    assert summary(out) == summary(ref_out)


FAULTS = ["checkpoint-tmp:1", "checkpoint-prev:2", "checkpoint-tmp:4", "store-finish:1", "checkpoint-prev:1",
          "checkpoint-tmp:3", "checkpoint-prev:5", "store-finish:2", "checkpoint-tmp:2", "checkpoint-prev:3"]


@pytest.mark.slow
def test_killed_at_every_kind_of_point_again_and_again(reference, tmp_path):
    config, ref_out, _ = reference
    out = tmp_path / "out"
    kills = 0
    for fault in FAULTS:
        proc = run(config, out, fault=fault)
        if proc.returncode == 0:  # nothing left to do before that point: finished
            break
        assert proc.returncode == KILLED, proc.stderr
        kills += 1
        check_store(out, EPOCHS)
    proc = run(config, out)
    assert proc.returncode == 0, proc.stderr
    assert kills >= 8
    assert_same_as_reference(out, ref_out)
    print(f"\n{kills} kills at checkpoint/commit points, then the same command: bit-identical")


def kill_at_random_times(config, out, duration, workers, rng, max_kills=15):
    """Start the command, SIGKILL its whole process group at a random moment, check the store, repeat."""
    kills = 0
    while True:
        proc = subprocess.Popen(run_command(config, out, workers), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        if kills < max_kills:
            try:
                proc.wait(timeout=rng.uniform(0.5, duration))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                check_store(out, EPOCHS)
                continue
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        return kills


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_killed_at_random_times_again_and_again(reference, tmp_path, workers):
    config, ref_out, duration = reference
    rng = random.Random(1234 + workers)
    kills = kill_at_random_times(config, tmp_path / "out", duration, workers, rng)
    assert kills >= 2  # how many land before the run finishes depends on the machine's speed
    assert_same_as_reference(tmp_path / "out", ref_out)
    print(f"\n{kills} random kills with {workers} worker(s), then the same command: bit-identical")


@pytest.mark.slow
def test_killing_only_the_parent_stops_its_pool_workers(reference, tmp_path):
    """`kill -9` of the command alone: its worker processes stop too instead of training on as orphans."""
    config, ref_out, _ = reference
    out = tmp_path / "out"
    proc = subprocess.Popen(run_command(config, out, 2), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any((out / "runs").glob("*/*/checkpoint/*.pt")):  # the workers are training
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while True:
        try:
            os.killpg(proc.pid, 0)  # any process left in the command's group?
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the pool workers outlived their parent"
        time.sleep(0.2)
    check_store(out, EPOCHS)
    proc = run(config, out)
    assert proc.returncode == 0, proc.stderr
    assert_same_as_reference(out, ref_out)
