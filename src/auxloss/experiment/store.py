"""The results store: one SQLite file under the output folder (or a PostgreSQL database), safe for many workers.

A run (variant, seed) is *claimed* inside an immediate transaction, so two workers never train the same run, and
its result is written in one transaction with its status, so the store never holds a half-written run. Running
the same experiment again skips finished runs and redoes unfinished ones (a claim whose worker stopped sending
heartbeats, or any claim when the caller says no other worker is alive).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from auxloss._faults import fault_point
from auxloss._redact import mask_password
from auxloss.errors import AuxLossError
from auxloss.experiment.storage import libpq_dsn, store_location

__all__ = ["PostgresStore", "Store", "open_store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    variant TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | running | done | failed
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,
    heartbeat REAL,
    finished REAL,
    result TEXT,       -- JSON: the best epoch's metrics, the main metric, timing
    history TEXT,      -- JSON: one record per epoch
    error TEXT,
    PRIMARY KEY (variant, seed)
);
"""


def _write_error(path: Path, exc: sqlite3.OperationalError) -> str:
    text = str(exc)
    if "full" in text:
        fix = "Free some disk space (or choose an --out folder on a disk with room) and run the same command again."
    elif "locked" in text or "busy" in text:
        fix = "Another process held it for over a minute; run the command again once the other one is done."
    else:
        fix = "Choose a writable --out folder with free space."
    return f"cannot write the results store {str(path)!r}: {text}. {fix}"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Store:
    """SQLite store of an experiment's runs.

    Args:
        path: the database file (created with its folder).
        stale_after: seconds without a heartbeat after which another worker may take over a claimed run.
    """

    def __init__(self, path: str | Path, *, stale_after: float = 120.0, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.stale_after = stale_after
        if readonly:
            self._check_readable()
            return
        if self.path.exists():
            # Another program's database (or a link to one) is refused before any write: the schema and the WAL
            # switch below would change it. An empty one (a store whose creation was cut short) is taken.
            self._check_readable(allow_empty=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuxLossError(f"cannot create the output folder {str(self.path.parent)!r}: {exc.strerror}. "
                               "Choose a writable --out folder.") from exc
        self.stale_after = stale_after
        try:
            with self._connect() as con:
                con.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            raise AuxLossError(f"cannot write the results store {str(self.path)!r}: {exc}. Choose a writable --out "
                               "folder with free space.") from exc
        except sqlite3.DatabaseError as exc:
            raise AuxLossError(f"{str(self.path)!r} is not a valid auxloss results store ({exc}). Use another "
                               "--out folder, or remove the file.") from exc

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            con = self._connect_readonly()
            try:
                yield con
            finally:
                con.close()
            return
        # A generous busy timeout: workers queue on the write lock instead of failing with "database is locked".
        con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            yield con
        finally:
            con.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._connect() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield con
                except BaseException:
                    if con.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                        con.execute("ROLLBACK")
                    raise
                else:
                    con.execute("COMMIT")
        except sqlite3.OperationalError as exc:  # a full disk, a read-only folder, a lock held for a minute
            raise AuxLossError(_write_error(self.path, exc)) from exc

    # -- reading someone else's folder (``auxloss report``) ------------------------------------------------------
    def _connect_readonly(self) -> sqlite3.Connection:
        # mode=ro: SQLite refuses every write, so a report can never alter the file (no schema, no WAL switch).
        uri = "file:" + quote(str(self.path.resolve())) + "?mode=ro"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None)
            con.execute("SELECT 1 FROM sqlite_master LIMIT 1")
            return con
        except sqlite3.OperationalError:
            # A WAL database on a read-only folder, closed cleanly (no -wal/-shm left): SQLite cannot create the
            # shared-memory file it needs. Nobody can be writing there, so the file is read as immutable.
            con = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)
            con.execute("SELECT 1 FROM sqlite_master LIMIT 1")
            return con

    def _check_readable(self, allow_empty: bool = False) -> None:
        """An auxloss store, with the tables and columns this version reads; else a message, never a traceback.

        Read through a ``mode=ro`` connection whatever ``readonly`` says, so the check itself never writes.
        ``allow_empty``: a database without any table passes (``auxloss run`` creates the tables)."""
        if not self.path.is_file():
            raise AuxLossError(f"{str(self.path)!r} does not exist; give the --out folder of a finished `auxloss run`.")
        try:
            con = self._connect_readonly()
            try:
                columns = {table: {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
                           for table in ("meta", "runs")}
                tables = con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
            finally:
                con.close()
        except sqlite3.DatabaseError as exc:
            raise AuxLossError(f"{str(self.path)!r} is not an auxloss results store ({exc}); give the --out folder "
                               "of an `auxloss run`.") from exc
        needed = {"meta": {"key", "value"},
                  "runs": {"variant", "seed", "status", "result", "history", "error", "attempts"}}
        missing = {t: sorted(needed[t] - columns[t]) for t in needed if needed[t] - columns[t]}
        if missing and not (allow_empty and tables == 0):
            raise AuxLossError(f"{str(self.path)!r} is an SQLite file but not an auxloss results store (missing "
                               f"{missing}); give the --out folder of an `auxloss run`, not another program's "
                               "database.")

    @property
    def location(self) -> str:
        """Where the store is, for messages: the file, or the database URL with its password masked."""
        return str(self.path)

    # -- metadata ------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        with self._connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        with self._transaction() as con:
            con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def set_meta_once(self, key: str, value: Any) -> Any:
        """Set ``key`` unless a worker set it first; return the value it holds (``value`` or the earlier one).

        Workers starting together on several machines agree on one value this way (e.g. one MLflow parent run).
        """
        with self._transaction() as con:
            con.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))
            row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0])

    # -- runs ----------------------------------------------------------------------------------------------
    def add_runs(self, runs: list[tuple[str, int]]) -> None:
        """Register runs as pending (existing ones are left as they are)."""
        with self._transaction() as con:
            con.executemany("INSERT OR IGNORE INTO runs(variant, seed) VALUES (?, ?)", runs)

    def reset_unfinished(self) -> int:
        """Mark every claimed-but-unfinished run pending again (when no other worker can be alive)."""
        with self._transaction() as con:
            cur = con.execute("UPDATE runs SET status='pending', worker=NULL WHERE status IN ('running', 'failed')")
            return cur.rowcount

    def claim(self, worker: str | None = None) -> tuple[str, int] | None:
        """Atomically take the next pending (or stale) run; ``None`` when nothing is left to do."""
        worker = worker or worker_id()
        now = time.time()
        with self._transaction() as con:
            row = con.execute(
                "SELECT variant, seed FROM runs WHERE status='pending' "
                "OR (status='running' AND heartbeat < ?) ORDER BY seed, rowid LIMIT 1",
                (now - self.stale_after,),
            ).fetchone()
            if row is None:
                return None
            con.execute(
                "UPDATE runs SET status='running', worker=?, started=?, heartbeat=?, attempts=attempts+1 "
                "WHERE variant=? AND seed=?",
                (worker, now, now, row[0], row[1]),
            )
        return row[0], int(row[1])

    def heartbeat(self, variant: str, seed: int, worker: str | None = None) -> bool:
        """Mark a claimed run alive. False when the claim is no longer this worker's (taken over, or finished)."""
        with self._transaction() as con:
            cur = con.execute("UPDATE runs SET heartbeat=? WHERE variant=? AND seed=? AND worker=? AND status='running'",
                              (time.time(), variant, seed, worker or worker_id()))
            return cur.rowcount > 0

    def finish(self, variant: str, seed: int, result: dict[str, Any], history: list[dict[str, Any]],
               worker: str | None = None) -> bool:
        """Write a finished run in one transaction. Returns False if another worker finished it first."""
        payload = (json.dumps(result), json.dumps(history))
        with self._transaction() as con:
            status = con.execute("SELECT status FROM runs WHERE variant=? AND seed=?", (variant, seed)).fetchone()
            if status is not None and status[0] == "done":
                return False
            con.execute(
                "INSERT INTO runs(variant, seed, status, worker, finished, result, history) "
                "VALUES (?, ?, 'done', ?, ?, ?, ?) ON CONFLICT(variant, seed) DO UPDATE SET status='done', "
                "worker=excluded.worker, finished=excluded.finished, result=excluded.result, "
                "history=excluded.history, error=NULL",
                (variant, seed, worker or worker_id(), time.time(), *payload),
            )
            fault_point("store-finish")  # tests: a kill here must leave the run unfinished, not half-written
        return True

    def reset_runs(self, runs: list[tuple[str, int]]) -> None:
        """Mark finished runs pending again, their results forgotten (``--rerun-stale``)."""
        with self._transaction() as con:
            con.executemany("UPDATE runs SET status='pending', worker=NULL, result=NULL, history=NULL, error=NULL "
                            "WHERE variant=? AND seed=?", runs)

    def fail(self, variant: str, seed: int, error: str) -> None:
        with self._transaction() as con:
            con.execute("UPDATE runs SET status='failed', error=? WHERE variant=? AND seed=?", (error, variant, seed))

    def clear(self) -> None:
        """Forget every run and all metadata (``--force`` on a store that held another config of this experiment).

        A PostgreSQL store keeps the record of which experiment owns its schema, checked on every open."""
        with self._transaction() as con:
            con.execute("DELETE FROM runs")
            if isinstance(self, PostgresStore):
                con.execute("DELETE FROM meta WHERE key <> 'experiment'")
            else:
                con.execute("DELETE FROM meta")

    def status(self) -> dict[str, int]:
        with self._connect() as con:
            rows = con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        return {s: int(n) for s, n in rows}

    def runs(self, status: str | None = "done") -> list[dict[str, Any]]:
        """Runs with their result and history decoded."""
        query = "SELECT variant, seed, status, result, history, error, attempts FROM runs"
        args: tuple = ()
        if status is not None:
            query += " WHERE status=?"
            args = (status,)
        with self._connect() as con:
            rows = con.execute(query + " ORDER BY variant, seed", args).fetchall()
        return [
            {"variant": v, "seed": int(s), "status": st, "result": json.loads(r) if r else None,
             "history": json.loads(h) if h else [], "error": e, "attempts": a}
            for v, s, st, r, h, e, a in rows
        ]


# -- PostgreSQL ----------------------------------------------------------------------------------------------
_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    ord SERIAL,
    variant TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started DOUBLE PRECISION,
    heartbeat DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    result TEXT,
    history TEXT,
    error TEXT,
    PRIMARY KEY (variant, seed)
)
"""


def _pg_sql(query: str) -> str:
    """The store's SQLite statements in PostgreSQL's dialect (the store uses only these few forms)."""
    q = query.replace("?", "%s").replace("rowid", "ord")
    if q.startswith("INSERT OR IGNORE INTO "):
        q = "INSERT INTO " + q[len("INSERT OR IGNORE INTO "):] + " ON CONFLICT DO NOTHING"
    elif q.startswith("INSERT OR REPLACE INTO meta"):
        q = "INSERT INTO meta" + q[len("INSERT OR REPLACE INTO meta"):] + \
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
    elif q.startswith("SELECT variant, seed FROM runs WHERE status='pending'"):
        # Row locks instead of SQLite's database lock: concurrent claimers skip each other's rows.
        q += " FOR UPDATE SKIP LOCKED"
    elif q.startswith("SELECT status FROM runs WHERE variant="):
        q += " FOR UPDATE"
    return q


class _PgConnection:
    """The slice of sqlite3's connection API the store uses, over a psycopg2 connection."""

    def __init__(self, con: Any) -> None:
        self.con = con

    def execute(self, query: str, args: tuple = ()) -> Any:
        cur = self.con.cursor()
        cur.execute(_pg_sql(query), args)
        return cur

    def executemany(self, query: str, rows: list[tuple]) -> Any:
        cur = self.con.cursor()
        cur.executemany(_pg_sql(query), rows)
        return cur

    @property
    def in_transaction(self) -> bool:
        import psycopg2.extensions as ext

        return self.con.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE


class PostgresStore(Store):
    """The same store in a PostgreSQL database, so workers on many machines share one experiment.

    Each experiment gets its own schema (``namespace``, from the config's name), so one database can hold many.
    Claims use ``SELECT ... FOR UPDATE SKIP LOCKED``; a finished run is written in one transaction, as with SQLite.
    """

    def __init__(self, url: str, *, namespace: str, stale_after: float = 120.0, readonly: bool = False) -> None:
        try:
            import psycopg2  # noqa: F401
        except ImportError as exc:
            raise AuxLossError("a PostgreSQL results store needs psycopg2: pip install 'auxloss[postgres]'.") from exc
        self.url = url
        self.path = Path(mask_password(url))  # kept for callers; messages use `location` (a Path drops a '/')
        self.namespace = namespace
        self.schema = schema_name(namespace)
        self.stale_after = stale_after
        self.readonly = readonly
        if readonly:
            self._check_holds_experiment()
            return
        with self._connect() as con:
            con.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        with self._transaction() as con:
            # Concurrent first workers would race on CREATE TABLE IF NOT EXISTS: serialise on an advisory lock.
            con.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (self.schema,))
            for statement in _PG_SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            # The schema's owner, recorded by the first open and checked by every later one: a schema is never
            # shared by two experiments, so `--force` (which clears this schema) clears only the one asked for.
            row = con.execute("SELECT value FROM meta WHERE key='experiment'").fetchone()
            if row is None:
                con.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", ("experiment", json.dumps(namespace)))
            elif json.loads(row[0]) != namespace:
                raise AuxLossError(
                    f"the PostgreSQL schema {self.schema!r} in {self.location!r} holds the runs of experiment "
                    f"{json.loads(row[0])!r}, not {namespace!r}; it is left untouched. Rename this experiment "
                    "(its config's name:), or use another database.")

    @property
    def location(self) -> str:
        return mask_password(self.url)

    def _check_holds_experiment(self) -> None:
        """``auxloss report``: the database holds this experiment's schema, with its tables and owner; else an
        error. Nothing is created: a report given the wrong database must not leave a schema there."""
        with self._connect() as con:
            tables = {row[0] for row in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", (self.schema,))}
            owner = None
            if {"meta", "runs"} <= tables:
                row = con.execute("SELECT value FROM meta WHERE key='experiment'").fetchone()
                owner = json.loads(row[0]) if row else None
        if owner != self.namespace:
            raise AuxLossError(
                f"the results store {self.location!r} holds no experiment {self.namespace!r} (no schema "
                f"{self.schema!r} of it); nothing was written. Pass the --store database its runs were written to "
                "(the folder's store_url.txt names it).")

    @contextmanager
    def _connect(self) -> Iterator[Any]:
        import psycopg2

        try:
            raw = psycopg2.connect(libpq_dsn(self.url), connect_timeout=30)
        except psycopg2.OperationalError as exc:
            raise AuxLossError(f"cannot connect to the results store {self.location!r}: {str(exc).strip()}. Check "
                               "the URL, that the server runs, and the user's password.") from exc
        raw.autocommit = True  # transactions are opened explicitly, as with SQLite
        try:
            con = _PgConnection(raw)
            if self.readonly:  # the server itself refuses any write from a report's connection
                con.execute("SET default_transaction_read_only = on")
            if self._schema_ready(con):
                con.execute(f'SET search_path TO "{self.schema}"')
            yield con
        finally:
            raw.close()

    def _schema_ready(self, con: _PgConnection) -> bool:
        row = con.execute("SELECT 1 FROM pg_namespace WHERE nspname = ?", (self.schema,)).fetchone()
        return row is not None

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        import psycopg2

        try:
            with self._connect() as con:
                con.execute("BEGIN")
                try:
                    yield con
                except BaseException:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    raise
                else:
                    con.execute("COMMIT")
        except psycopg2.Error as exc:
            raise AuxLossError(f"cannot write the results store {self.location!r}: {str(exc).strip()}.") from exc


def schema_name(experiment: str) -> str:
    """The PostgreSQL schema of an experiment: a readable prefix and a hash of the exact name.

    Two names that read alike (``Team-Exp``, ``team.exp``) or share their first characters get different schemas,
    and the name fits PostgreSQL's 63-byte limit, which would otherwise cut long (or accented) names silently.
    """
    readable = "".join(c if c.isascii() and c.isalnum() else "_" for c in experiment.lower())[:38]
    digest = hashlib.sha256(experiment.encode("utf-8")).hexdigest()[:16]
    return f"auxloss_{readable}_{digest}"  # at most 8 + 38 + 1 + 16 = 63 ASCII bytes


def open_store(location: str | Path, *, namespace: str = "default", stale_after: float = 120.0,
               readonly: bool = False) -> Store:
    """A SQLite store for a file path (or ``sqlite:///`` URL), a PostgreSQL one for a ``postgresql://`` URL.

    ``readonly``: only read an existing store (``auxloss report``); nothing is created or written."""
    where = store_location(location)
    if isinstance(where, str):
        return PostgresStore(where, namespace=namespace, stale_after=stale_after, readonly=readonly)
    return Store(where, stale_after=stale_after, readonly=readonly)
