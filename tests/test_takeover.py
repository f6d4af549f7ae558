"""A run taken over across machines resumes from the shared checkpoint, not from scratch.

Two workers stand for two machines: each has its own ``--out`` folder (its local disk), and they share the
results store (a SQLite file in a shared folder; PostgreSQL in production) and ``--checkpoint-dir``. Worker A
is killed in the middle of a run; worker B takes the run over once A's heartbeat is stale, resumes it from A's
last checkpoint in the shared folder, and the results are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import subprocess

from _reliability import (
    check_store,
    env,
    in_process_reference,
    outcome,
    run_command,
    store_rows,
    write_config,
)

STALE = 2  # seconds without a heartbeat before B may take A's run over
EPOCHS = 3


def worker(config, out, shared, **extra):
    command = run_command(config, out) + ["--store", str(shared / "results.sqlite"),
                                          "--checkpoint-dir", str(shared / "ckpt")]
    return subprocess.run(command, env=env(AUXLOSS_SHARED_STORE="1", AUXLOSS_STALE_AFTER=str(STALE), **extra),
                          capture_output=True, text=True, timeout=600, check=False)


def test_a_second_worker_with_another_disk_resumes_the_shared_checkpoint(tmp_path):
    config = write_config(tmp_path, seeds=1, epochs=EPOCHS)
    shared = tmp_path / "shared"
    # A dies in its 4th checkpoint write of its first run (3 steps an epoch, a checkpoint every 2 steps and after
    # each epoch: steps 2, 3, 4, then 6), before renaming anything, as if its machine went down. The shared last.pt
    # is the one of step 4, inside epoch 2.
    a = worker(config, tmp_path / "disk-a", shared, AUXLOSS_FAULT="checkpoint-tmp:4")
    assert a.returncode == -signal.SIGKILL, a.stderr
    (running,) = [r for r in store_rows(shared) if r["status"] == "running"]
    variant = running["variant"]
    run_ckpt = [p for p in (shared / "ckpt").glob(f"*/{variant}/seed0") if p.is_dir()]
    assert len(run_ckpt) == 1 and (run_ckpt[0] / "last.pt").exists()
    epochs_a = [json.loads(line) for line in
                (tmp_path / "disk-a" / "runs" / variant / "seed0" / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs_a] == [1]

    b = worker(config, tmp_path / "disk-b", shared)  # another disk: nothing of A's run in it
    assert b.returncode == 0, b.stderr
    assert check_store(shared, EPOCHS) == {"done": 2}
    (row,) = [r for r in store_rows(shared) if r["variant"] == variant]
    assert row["attempts"] == 2 and row["worker"] != running["worker"]
    # Resumed, not restarted: epoch 1 of the stored history is A's record, wall-clock time included, which B
    # could only have read from A's checkpoint (a retrained epoch 1 would have taken another time).
    assert json.loads(row["history"])[0] == epochs_a[0]
    assert outcome(shared) == in_process_reference(config)  # bit-identical to uninterrupted runs
    assert not list((shared / "ckpt").rglob("*.pt"))  # finished runs leave no checkpoint behind
    assert json.loads((tmp_path / "disk-b" / "results.json").read_text())["runs"] == {
        "done": 2, "failed": 0, "pending": 0}
