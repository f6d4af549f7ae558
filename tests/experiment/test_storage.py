"""The storage URLs shared by the results store and the sweep: redaction, recognition, and the study lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from auxloss import AuxLossError
from auxloss._redact import mask_password
from auxloss.experiment.storage import (
    StudyLock,
    libpq_dsn,
    optuna_storage,
    postgres_url,
    sqlite_file,
)

# Well-formed URLs, on which SQLAlchemy's own redaction is the reference.
WELL_FORMED = [
    "postgresql://alice:s3cret@db.example.org:5432/runs",
    "postgresql+psycopg2://alice:s3cret@localhost/runs",
    "mysql://bob:pw@10.0.0.1/sweeps?charset=utf8mb4",
    "postgresql://alice@db.example.org/runs",
    "sqlite:////tmp/out/optuna.sqlite",
    "sqlite:///relative/optuna.sqlite",
]


@pytest.mark.parametrize("url", WELL_FORMED)
def test_mask_password_matches_sqlalchemy(url: str) -> None:
    from sqlalchemy.engine import make_url

    assert mask_password(url) == make_url(url).render_as_string(hide_password=True)


@pytest.mark.parametrize(("url", "expected"), [
    # A raw '@' inside the password is hidden with the rest of it.
    ("postgresql://alice:p@ss@host/db", "postgresql://alice:***@host/db"),
    # A '@' in the path or the query does not end the credentials early, nor exposes the host as a password.
    ("postgresql://alice:pw@host/db?application_name=a@b", "postgresql://alice:***@host/db?application_name=a@b"),
    ("sqlite:////data/team@lab/optuna.sqlite", "sqlite:////data/team@lab/optuna.sqlite"),
    # libpq also reads a password from the query string.
    ("postgresql://host/db?user=alice&password=s3cret&sslmode=require",
     "postgresql://host/db?user=alice&password=***&sslmode=require"),
    ("/plain/path/results.sqlite", "/plain/path/results.sqlite"),
])
def test_mask_password_by_hand(url: str, expected: str) -> None:
    assert mask_password(url) == expected
    assert "s3cret" not in mask_password(url) and "p@ss" not in mask_password(url)


def test_postgres_urls_are_recognised_and_normalised() -> None:
    assert postgres_url("postgres://u:p@h/db") == "postgresql://u:p@h/db"
    assert postgres_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert postgres_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert postgres_url(Path("runs/results.sqlite")) is None
    assert postgres_url("sqlite:///x.sqlite") is None
    assert libpq_dsn("postgresql+psycopg2://u@h/db") == "postgresql://u@h/db"
    assert libpq_dsn("postgresql://u@h/db") == "postgresql://u@h/db"


def test_sqlite_file_and_in_memory_storage(tmp_path: Path) -> None:
    assert sqlite_file(f"sqlite:///{tmp_path}/a/optuna.sqlite") == tmp_path / "a" / "optuna.sqlite"
    assert sqlite_file("sqlite://") is None
    assert sqlite_file("postgresql://u@h/db") is None
    with pytest.raises(AuxLossError, match="in-memory SQLite"):
        optuna_storage("sqlite:///:memory:", heartbeat_s=30, grace_s=120)
    with pytest.raises(AuxLossError, match="not a database URL"):
        sqlite_file("not a url at all")


_TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("busy")
else:
    print("free")
"""


def _other_process_sees(lock_file: Path) -> str:
    out = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(lock_file)], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_study_lock_on_sqlite_excludes_other_processes(tmp_path: Path) -> None:
    pytest.importorskip("fcntl")
    url = f"sqlite:///{tmp_path}/sweep/optuna.sqlite"
    lock_file = tmp_path / "sweep" / "optuna.sqlite.lock"
    lock = StudyLock(url, "study")
    lock.release()  # releasing a lock not held does nothing (the objective relies on it)
    with lock:
        assert _other_process_sees(lock_file) == "busy"
        lock.acquire()  # re-entrant for the holder: no deadlock
    assert _other_process_sees(lock_file) == "free"
