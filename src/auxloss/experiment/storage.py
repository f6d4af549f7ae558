"""Where experiments keep their state: database URLs and the lock shared by sweep workers.

Two stores use database URLs. The results store (:mod:`auxloss.experiment.store`) takes a file path or a
``postgresql://`` URL and talks to PostgreSQL through psycopg2. The weight sweep (:mod:`auxloss.experiment.sweep`)
keeps its Optuna study in any SQLAlchemy URL (SQLite, PostgreSQL, MySQL) and serialises its workers with
:class:`StudyLock`. Both write URLs into messages and result files, always through
:func:`auxloss._redact.mask_password`.

SQLAlchemy comes with Optuna; it is imported only by the functions that parse SQLAlchemy URLs, so the results
store never needs it.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

from auxloss._redact import mask_password
from auxloss.errors import AuxLossError

__all__ = ["StudyLock", "libpq_dsn", "optuna_storage", "parse_url", "postgres_url",
           "sqlite_file", "store_location"]

#: URL schemes of a PostgreSQL results store (compared lower-cased: schemes are case-insensitive, RFC 3986), and
#: the one each is read as. ``postgres`` is Heroku's spelling; SQLAlchemy's ``+psycopg2`` is kept for
#: :func:`libpq_dsn` to drop when connecting.
_PG_SCHEMES = {"postgresql": "postgresql", "postgres": "postgresql", "postgresql+psycopg2": "postgresql+psycopg2"}
_SQLITE_SCHEME = "sqlite"
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>.*)$", re.DOTALL)
# libpq's keyword/value connection string ("host=db dbname=x password=..."). auxloss takes URLs only: taken as a
# file path, such a string named a new SQLite file after the password, and the password went into the results.
_LIBPQ_KEYWORD = re.compile(r"(?:^|\s)(?P<key>[A-Za-z_]+)\s*=")
_LIBPQ_FIRST_KEY = re.compile(r"^\s*(?P<key>[A-Za-z_]+)\s*=")
_LIBPQ_PASSWORD = re.compile(r"password\s*=", re.IGNORECASE)
_LIBPQ_KEYS = frozenset({"host", "hostaddr", "port", "dbname", "user", "password", "passfile", "sslmode",
                         "service", "connect_timeout", "options", "application_name", "target_session_attrs"})


def store_location(location: str | Path) -> str | Path:
    """What ``--store`` names: a PostgreSQL URL (``str``, scheme normalised) or an SQLite file (``Path``).

    Accepted: ``postgresql://``, ``postgres://`` and ``postgresql+psycopg2://`` URLs, in any letter case;
    ``sqlite:///relative/path`` and ``sqlite:////absolute/path``; a plain file path. Refused before anything is
    written: any other scheme, in-memory SQLite, and a libpq keyword string (``host=... password=...``), whose
    message names its keys but never echoes a value.
    """
    if isinstance(location, Path):
        return location
    text = str(location)
    match = _SCHEME.match(text)
    if match is not None:
        scheme, rest = match["scheme"].lower(), match["rest"]
        if scheme in _PG_SCHEMES:
            return f"{_PG_SCHEMES[scheme]}://{rest}"
        if scheme == _SQLITE_SCHEME and rest.startswith("/") and rest.strip("/") and rest != "/:memory:":
            return Path(rest[1:])  # SQLAlchemy's form: sqlite:///rel/x.sqlite, sqlite:////abs/x.sqlite
        raise AuxLossError(
            f"--store {mask_password(text)!r} is not a results store auxloss can use: give a PostgreSQL URL "
            "(postgresql://user@host:5432/db, the password in PGPASSWORD or ~/.pgpass), an SQLite file "
            "(sqlite:///path/results.sqlite), or a file path.")
    keys = sorted({m["key"].lower() for m in _LIBPQ_KEYWORD.finditer(text)})
    known = [key for key in keys if key in _LIBPQ_KEYS]  # only libpq's own words are shown: never a value
    first = _LIBPQ_FIRST_KEY.match(text)
    if _LIBPQ_PASSWORD.search(text) or (keys and any(c.isspace() for c in text)) or (
            first is not None and first["key"].lower() in _LIBPQ_KEYS):
        raise AuxLossError(
            f"--store looks like a libpq keyword connection string (keys {known}; values not shown), "
            "which auxloss does not take: give a postgresql:// URL instead, e.g. "
            "postgresql://user@host:5432/dbname, with the password in PGPASSWORD or ~/.pgpass (never on the "
            "command line).")
    return Path(text)


def postgres_url(location: str | Path) -> str | None:
    """The ``postgresql://`` URL when ``location`` names a PostgreSQL database, ``None`` for an SQLite file.

    ``postgres://`` (Heroku's spelling) is read as ``postgresql://``; ``postgresql+psycopg2://`` (SQLAlchemy's)
    is kept, and :func:`libpq_dsn` drops the driver when connecting. Schemes are case-insensitive. A location
    :func:`store_location` refuses raises its error.
    """
    where = store_location(location)
    return where if isinstance(where, str) else None


def libpq_dsn(url: str) -> str:
    """A PostgreSQL URL as libpq accepts it: without SQLAlchemy's ``+psycopg2`` driver suffix."""
    prefix = "postgresql+psycopg2://"
    return "postgresql://" + url[len(prefix):] if url.startswith(prefix) else url


# -- SQLAlchemy URLs (the sweep's Optuna storage) ---------------------------------------------------------------
def parse_url(url: str) -> Any:
    """``url`` as a SQLAlchemy URL object, or an error showing the form a storage URL takes."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not isinstance(url, str) or not url:
        raise AuxLossError(f"the storage must be a database URL string such as 'sqlite:///sweep.sqlite' or "
                           f"'postgresql://user:password@host/db', got {url!r}.")
    try:
        return make_url(url)
    except ArgumentError:
        raise AuxLossError(f"storage {mask_password(url)!r} is not a database URL; use e.g. "
                           "'sqlite:///path/optuna.sqlite' or 'postgresql://user:password@host/db'.") from None


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL; ``None`` for other databases and in-memory SQLite."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def optuna_storage(url: str, *, heartbeat_s: int, grace_s: int) -> Any:
    """An Optuna ``RDBStorage`` for ``url`` whose trials send a heartbeat every ``heartbeat_s`` seconds.

    A trial silent for ``grace_s`` seconds counts as dead (its process was killed). SQLite files get their folder
    created and a long busy timeout; in-memory SQLite is refused, since no other worker could see it.
    """
    import optuna

    parsed = parse_url(url)
    engine_kwargs: dict[str, Any] = {}
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Workers wait for each other's writes instead of failing with "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif parsed.get_backend_name() == "sqlite":
        raise AuxLossError(f"storage {url!r} is an in-memory SQLite database, which no other process (and no "
                           "resumed sweep) can see; give a file, e.g. 'sqlite:///sweep/optuna.sqlite'.")
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and have been since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                              grace_period=grace_s)
    except ImportError as exc:
        raise AuxLossError(f"storage {mask_password(url)!r} needs a database driver that is not installed "
                           f"({exc}); e.g. `pip install auxloss[postgres]` for PostgreSQL.") from None


class StudyLock:
    """A lock shared by every process (on every machine) working on one study.

    SQLite: an exclusive ``flock`` on ``<database>.lock``. PostgreSQL: a session advisory lock. MySQL/MariaDB:
    ``GET_LOCK``. Elsewhere (no ``fcntl``, other databases) it does nothing, and concurrent workers could
    overshoot the number of trials by at most one per worker.

    ``release`` may be called when not held (it then does nothing), so the objective can release the lock as
    soon as Optuna has created its trial.
    """

    def __init__(self, url: str, study_name: str) -> None:
        self._held = False
        self._fd: int | None = None
        self._conn: Any = None
        self._engine: Any = None
        self._kind = "none"
        digest = hashlib.sha256(f"auxloss-sweep:{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        self._name = "auxloss:" + digest.hex()[:40]
        path = sqlite_file(url)
        backend = parse_url(url).get_backend_name()
        if path is not None:
            try:
                import fcntl  # noqa: F401
            except ImportError:  # Windows: best effort only
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            self._path = Path(str(path) + ".lock")
            self._kind = "file"
        elif backend in ("postgresql", "mysql", "mariadb"):
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            self._engine = sqlalchemy.create_engine(url, poolclass=NullPool)
            self._kind = "pg" if backend == "postgresql" else "mysql"

    def acquire(self) -> None:
        if self._held:
            return
        if self._kind == "file":
            import fcntl

            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd
        elif self._kind in ("pg", "mysql"):
            from sqlalchemy import text

            conn = self._engine.connect()
            if self._kind == "pg":
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            else:
                got = conn.execute(text("SELECT GET_LOCK(:n, 600)"), {"n": self._name}).scalar()
                if got != 1:
                    conn.close()
                    raise AuxLossError("could not take the sweep's lock on the MySQL server within 10 minutes; "
                                       "is another worker stuck? Restart the workers.")
            self._conn = conn
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._conn is not None:
            from sqlalchemy import text

            try:
                if self._kind == "pg":
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                else:
                    self._conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": self._name})
            finally:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
