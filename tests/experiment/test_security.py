"""Security of the experiment runner: no password written to any file, output folders of other people read
without trust. (Checkpoints that could run code: tests/train/test_resume.py.)"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest
import yaml

from auxloss._redact import (
    argv_without_passwords,
    command_without_passwords,
    mask_password,
    mask_passwords,
    without_password,
)
from auxloss.cli import main
from auxloss.errors import AuxLossError
from auxloss.experiment.config import parse_config
from auxloss.experiment.runner import STORE_URL_FILE, run_experiment

PG_URL = os.environ.get("AUXLOSS_TEST_POSTGRES_URL")

TINY = """
name: {name}
seeds: 1
data: {{name: shapes, n_train: 32, n_val: 16, n_test: 16, batch_size: 16, params: {{image_size: 16}}}}
model: {{name: small_cnn, params: {{width: 4}}}}
train: {{epochs: 1, lr: 0.01, eval_train: false}}
variants:
  - name: deep
    taps: {{aux1: {{layer: block1, head: {{type: linear}}}}}}
    tasks: [{{name: aux1, source: aux1, weight: 0.3}}]
"""


def tiny(name="sec"):
    return parse_config(yaml.safe_load(TINY.format(name=name)))


def files_holding(folder: Path, secret: str) -> list[str]:
    """Every file under ``folder`` (binary ones too: SQLite, checkpoints) whose bytes contain ``secret``."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


# -- the redaction itself ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url, expected", [
    ("postgresql://alice:pa55@db.example:5432/exp", "postgresql://alice@db.example:5432/exp"),
    ("postgresql+psycopg2://alice:p@ss@db/exp", "postgresql+psycopg2://alice@db/exp"),  # '@' in the password
    ("postgresql://db/exp?user=alice&password=pa55&sslmode=require", "postgresql://db/exp?user=alice&sslmode=require"),
    ("postgresql://alice@db/exp", "postgresql://alice@db/exp"),  # nothing to remove: unchanged
    ("sqlite:///runs/optuna.sqlite", "sqlite:///runs/optuna.sqlite"),
])
def test_a_url_is_recorded_without_its_password(url, expected):
    assert without_password(url) == expected


def test_a_command_line_loses_the_password_of_every_url_in_it():
    argv = ["c.yaml", "--store", "postgresql://a:S1 x@h/db", "--storage=postgresql://b:S2@h/db", "--seeds", "2"]
    assert argv_without_passwords(argv) == ["c.yaml", "--store", "postgresql://a@h/db", "--storage=postgresql://b@h/db",
                                 "--seeds", "2"]
    assert command_without_passwords("auxloss run c.yaml --store postgresql://a:S3@h/db --workers 2") == \
        "auxloss run c.yaml --store postgresql://a@h/db --workers 2"


def test_results_and_report_never_hold_the_password_of_the_recorded_command(tmp_path, capsys):
    secret = f"pw-{uuid.uuid4().hex}"
    out = tmp_path / "out"
    command = f"auxloss run c.yaml --store postgresql://alice:{secret}@db.example/exp"
    results = run_experiment(tiny(), out, command=command)
    assert results["config"]["command"] == "auxloss run c.yaml --store postgresql://alice@db.example/exp"
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert "postgresql://alice@db.example/exp" in (out / "report.md").read_text()  # the command is still there
    assert files_holding(out, secret) == []
    # A results.json written by an older version, with the password in it: the rebuilt report drops it.
    old = (out / "results.json").read_text().replace("alice@db", f"alice:{secret}@db")
    (out / "results.json").write_text(old)
    assert main(["report", str(out)]) == 0
    assert files_holding(out, secret) == []


def test_the_store_url_file_is_private_and_has_no_password(tmp_path):
    secret = f"pw-{uuid.uuid4().hex}"
    out = tmp_path / "out"
    # Port 1 on the loopback: nothing listens, so the connection fails after the folder names its store.
    with pytest.raises(AuxLossError, match="cannot connect to the results store"):
        run_experiment(tiny(), out, store=f"postgresql://alice:{secret}@127.0.0.1:1/exp?connect_timeout=2")
    text = (out / STORE_URL_FILE).read_text()
    assert text.strip() == "postgresql://alice@127.0.0.1:1/exp?connect_timeout=2"
    assert stat.S_IMODE((out / STORE_URL_FILE).stat().st_mode) == 0o600
    assert files_holding(out, secret) == []


@pytest.mark.parametrize("dsn", [
    "host=127.0.0.1 dbname=x user=u password={secret}",
    "dbname=x password={secret}",
    "host=127.0.0.1 port=1 dbname=x",
])
def test_a_libpq_keyword_string_is_refused_without_echoing_its_password(dsn, tmp_path, monkeypatch, capsys):
    secret = f"pw-{uuid.uuid4().hex}"
    monkeypatch.chdir(tmp_path)  # the old behaviour made an SQLite file named after the string, in the cwd
    (tmp_path / "c.yaml").write_text(TINY.format(name="dsn"))
    capsys.readouterr()
    assert main(["run", "c.yaml", "--out", "out", "--workers", "1", "--store", dsn.format(secret=secret)]) == 2
    err = capsys.readouterr().err
    assert "looks like a libpq keyword connection string" in err and "postgresql://" in err
    assert "PGPASSWORD or ~/.pgpass" in err and secret not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing created, no out folder either


@pytest.mark.parametrize("location, expected", [
    ("POSTGRESQL://u:p@h/db", "postgresql://u:p@h/db"),
    ("Postgres://u@h/db", "postgresql://u@h/db"),
    ("PostgreSQL+Psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
    ("sqlite:///runs/s.sqlite", Path("runs/s.sqlite")),
    ("SQLite:////abs/s.sqlite", Path("/abs/s.sqlite")),
    ("runs/a=b/results.sqlite", Path("runs/a=b/results.sqlite")),  # a plain path may hold a '='
])
def test_store_locations_are_read_case_insensitively(location, expected):
    from auxloss.experiment.storage import store_location

    assert store_location(location) == expected


@pytest.mark.parametrize("location", ["mysql://u:hunter2xyz@h/db", "sqlite://", "sqlite:///:memory:"])
def test_a_store_url_of_another_kind_is_refused(location):
    from auxloss.experiment.storage import store_location

    with pytest.raises(AuxLossError, match="is not a results store auxloss can use") as info:
        store_location(location)
    assert "hunter2xyz" not in str(info.value)


def test_an_upper_case_scheme_is_postgres_and_its_password_lands_nowhere(tmp_path, monkeypatch):
    secret = f"pw-{uuid.uuid4().hex}"
    monkeypatch.chdir(tmp_path)
    # Port 1 on the loopback: nothing listens. Read as PostgreSQL, it fails to connect (not an SQLite folder).
    with pytest.raises(AuxLossError, match="cannot connect to the results store"):
        run_experiment(tiny(), tmp_path / "out", store=f"POSTGRESQL://alice:{secret}@127.0.0.1:1/exp?connect_timeout=2")
    assert (tmp_path / "out" / STORE_URL_FILE).read_text().strip() == "postgresql://alice@127.0.0.1:1/exp?connect_timeout=2"
    assert files_holding(tmp_path, secret) == []
    assert [str(p) for p in tmp_path.rglob("*") if secret in str(p)] == []


def test_report_never_connects_to_the_url_a_folder_names_by_itself(tmp_path, capsys):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(tiny().model_dump(mode="json")))
    (out / STORE_URL_FILE).write_text("postgresql://mallory@attacker.example/x\n")
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "kept in a PostgreSQL database ('postgresql://mallory@attacker.example/x'" in err
    assert "pass it with --store URL" in err


# -- a real PostgreSQL server (.ci/run starts one) -----------------------------------------------------------------
@pytest.mark.skipif(not PG_URL, reason="set AUXLOSS_TEST_POSTGRES_URL to a PostgreSQL database to run")
def test_no_output_file_holds_the_postgres_password(tmp_path, capsys, monkeypatch):
    from urllib.parse import unquote, urlsplit

    password = unquote(urlsplit(PG_URL).password or "")
    assert password, "AUXLOSS_TEST_POSTGRES_URL must carry a password for this test to mean anything"
    # The test searches every output file for the password's bytes, so a word the files hold anyway (the user
    # name, 'auxloss', 'main') would be found without any leak: the check needs a distinctive password.
    assert len(password) >= 12 and password.lower() not in "auxloss baseline deep main accuracy report", (
        "AUXLOSS_TEST_POSTGRES_URL needs a distinctive password of 12+ characters (.ci/run makes a random one)")
    name = f"sec-{uuid.uuid4().hex[:8]}"
    (tmp_path / "c.yaml").write_text(TINY.format(name=name))
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["auxloss", "run", str(tmp_path / "c.yaml"), "--out", str(out),
                                     "--workers", "1", "--store", PG_URL])
    assert main(None) == 0
    assert files_holding(out, password) == []
    assert stat.S_IMODE((out / STORE_URL_FILE).stat().st_mode) == 0o600
    assert "--store" in (out / "report.md").read_text()
    # The report with a URL without password: libpq takes it from PGPASSWORD (psycopg2 passes the URL on).
    monkeypatch.setenv("PGPASSWORD", password)
    assert main(["report", str(out), "--store", without_password(PG_URL)]) == 0
    assert files_holding(out, password) == []


# -- config names become folder names ------------------------------------------------------------------------------
@pytest.mark.parametrize("where, name", [
    ("experiment", "../../X"), ("experiment", "a/b"), ("experiment", "  "), ("experiment", "..\\x"),
    ("variant", "../v"), ("variant", ".."), ("task", "t/../../u"), ("task", ""),
])
def test_names_that_are_not_plain_folder_names_are_refused_at_load(where, name):
    data = yaml.safe_load(TINY.format(name="ok"))
    if where == "experiment":
        data["name"] = name
    elif where == "variant":
        data["variants"][0]["name"] = name
    else:
        data["variants"][0]["tasks"][0]["name"] = name
    with pytest.raises(AuxLossError, match=f"{where} name .* cannot name a folder"):
        parse_config(data)


@pytest.mark.parametrize("name", ["exp-1", "Team.Exp_2", "ünïcode", "a.b.c"])
def test_plain_names_are_accepted(name):
    assert tiny(name).name == name


# -- PostgreSQL schemas --------------------------------------------------------------------------------------------
def test_schema_names_are_collision_free_and_fit_postgres_limit():
    from auxloss.experiment.store import schema_name

    long_a, long_b = "é" * 40 + "a", "é" * 40 + "b"  # 81 UTF-8 bytes each, equal in their first 80
    names = ["Team-Exp", "team.exp", "team_exp", "TEAM EXP", long_a, long_b, "x" * 200, "x" * 201]
    schemas = [schema_name(n) for n in names]
    assert len(set(schemas)) == len(names)
    for name, schema in zip(names, schemas):
        assert schema.isascii() and len(schema.encode()) <= 63, schema
        assert schema.startswith("auxloss_")
    assert schema_name("Team-Exp").startswith("auxloss_team_exp_")  # still readable in psql's \dn
    assert schema_name("Team-Exp") == schema_name("Team-Exp")  # stable: every worker finds the same schema


@pytest.mark.skipif(not PG_URL, reason="set AUXLOSS_TEST_POSTGRES_URL to a PostgreSQL database to run")
def test_force_on_one_experiment_never_clears_a_look_alike(tmp_path, monkeypatch):
    from auxloss.experiment.store import open_store

    tag = uuid.uuid4().hex[:6]
    a, b = f"Team-Exp-{tag}", f"team.exp-{tag}"  # one schema each since the hash; the same before
    run_experiment(tiny(a), tmp_path / "a", store=PG_URL)
    changed = tiny(b).model_copy(update={"alpha": 0.1})
    run_experiment(tiny(b), tmp_path / "b", store=PG_URL)
    run_experiment(changed, tmp_path / "b", store=PG_URL, force=True)  # clears b's runs, and only b's
    assert len(open_store(PG_URL, namespace=a).runs("done")) == 2
    # Had two names met in one schema anyway, the recorded owner stops the second before it touches anything.
    monkeypatch.setattr("auxloss.experiment.store.schema_name", lambda name: f"auxloss_clash_{tag}")
    open_store(PG_URL, namespace=a)
    with pytest.raises(AuxLossError, match=f"holds the runs of experiment '{a}', not '{b}'; it is left untouched"):
        open_store(PG_URL, namespace=b)


@pytest.mark.skipif(not PG_URL, reason="set AUXLOSS_TEST_POSTGRES_URL to a PostgreSQL database to run")
def test_another_config_of_the_same_name_in_a_shared_store_is_never_cleared(tmp_path, capsys):
    from auxloss.experiment.store import open_store

    name = f"same-name-{uuid.uuid4().hex[:6]}"
    run_experiment(tiny(name), tmp_path / "a", store=PG_URL)
    other = tiny(name).model_copy(update={"alpha": 0.1})  # another config, the same experiment name
    for force in (False, True):  # the old advice was "--force", which deleted a's runs
        with pytest.raises(AuxLossError) as info:
            run_experiment(other, tmp_path / "b", store=PG_URL, force=force)
        message = str(info.value)
        assert f"the shared store '{mask_password(PG_URL)}' holds" in message
        assert f"holds experiment '{name}' with a different config" in message
        assert "Rename this experiment" in message and "use another database" in message
    assert len(open_store(PG_URL, namespace=name).runs("done")) == 2
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a"), "--store", PG_URL]) == 0  # a's folder and runs still agree


def test_force_on_a_local_folder_still_discards_its_old_config(tmp_path):
    run_experiment(tiny("local"), tmp_path / "out")
    other = tiny("local").model_copy(update={"alpha": 0.1})
    with pytest.raises(AuxLossError, match="holds the results of another experiment .*pass --force"):
        run_experiment(other, tmp_path / "out")
    assert run_experiment(other, tmp_path / "out", force=True)["runs"]["done"] == 2


def _pg_schemas(prefix_of: str) -> list[str]:
    import psycopg2

    from auxloss.experiment.storage import libpq_dsn
    from auxloss.experiment.store import schema_name

    con = psycopg2.connect(libpq_dsn(PG_URL))
    try:
        cur = con.cursor()
        cur.execute("SELECT nspname FROM pg_namespace WHERE nspname = %s", (schema_name(prefix_of),))
        return [row[0] for row in cur.fetchall()]
    finally:
        con.close()


@pytest.mark.skipif(not PG_URL, reason="set AUXLOSS_TEST_POSTGRES_URL to a PostgreSQL database to run")
def test_report_with_a_store_that_lacks_the_experiment_writes_nothing_anywhere(tmp_path, capsys):
    import shutil

    name = f"elsewhere-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "out"
    run_experiment(tiny(name), out)  # its runs are in out/results.sqlite, not in the database
    before = snapshot(out)
    capsys.readouterr()
    assert main(["report", str(out), "--store", PG_URL]) == 2
    err = capsys.readouterr().err
    assert f"the results store '{mask_password(PG_URL)}' holds no experiment '{name}'" in err
    assert "nothing was written" in err and "Traceback" not in err
    assert snapshot(out) == before  # results.json and the report are the finished run's, not an empty one
    assert _pg_schemas(name) == []  # and the database got no schema
    # The database holds the name, with another config: the store is named, and again nothing is written.
    run_experiment(tiny(name), tmp_path / "pg", store=PG_URL)
    shutil.rmtree(out)
    shutil.copytree(tmp_path / "pg", out)
    (out / "config.yaml").write_text(yaml.safe_dump(tiny(name).model_copy(update={"alpha": 0.1}).model_dump(mode="json")))
    before = snapshot(out)
    assert main(["report", str(out), "--store", PG_URL]) == 2
    assert f"the results store '{mask_password(PG_URL)}' holds experiment '{name}' with another config" in \
        capsys.readouterr().err
    assert snapshot(out) == before


# -- `auxloss report` on a folder someone else made ----------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    run_experiment(tiny(), out)
    return out


def test_report_reads_a_read_only_folder_without_changing_a_byte(finished, tmp_path, monkeypatch):
    before = snapshot(finished)
    assert not any(name.endswith(("-wal", "-shm")) for name in before)
    # A cleanly closed WAL database on a read-only folder: SQLite cannot create its -shm file there. Refused here
    # as the read-only mount would (root writes anywhere, so chmod alone would not show it).
    import sqlite3

    real = sqlite3.connect

    def read_only_folder(target, *args, **kwargs):
        if kwargs.get("uri") and "immutable=1" not in str(target):
            raise sqlite3.OperationalError("unable to open database file")
        assert kwargs.get("uri") and "mode=ro" in str(target), "a report must never open the store for writing"
        return real(target, *args, **kwargs)

    monkeypatch.setattr("auxloss.experiment.store.sqlite3.connect", read_only_folder)
    finished.chmod(0o555)
    try:
        assert main(["report", str(finished), "--out", str(tmp_path / "rep")]) == 0
    finally:
        finished.chmod(0o755)
    assert snapshot(finished) == before
    assert (tmp_path / "rep" / "report.html").exists()
    import json

    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert results == {**json.loads((finished / "results.json").read_text()), "timing": results["timing"]}


def test_report_without_out_writes_into_the_folder_but_never_into_its_store(finished, capsys):
    store = finished / "results.sqlite"
    before = (store.read_bytes(), store.stat().st_mtime_ns)
    assert main(["report", str(finished)]) == 0
    assert (store.read_bytes(), store.stat().st_mtime_ns) == before
    # A reader of a WAL database may leave SQLite's empty companion files; it never writes a page to them.
    wal = finished / "results.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0


def test_report_refuses_a_foreign_sqlite_file_and_leaves_it_alone(tmp_path, capsys):
    import sqlite3

    out = tmp_path / "foreign"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(tiny().model_dump(mode="json")))
    con = sqlite3.connect(out / "results.sqlite")
    con.execute("CREATE TABLE runs (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    before = snapshot(out)
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "is an SQLite file but not an auxloss results store" in err and "Traceback" not in err
    assert snapshot(out) == before  # no meta table added, journal mode unchanged
    con = sqlite3.connect(f"file:{out / 'results.sqlite'}?mode=ro", uri=True)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()


@pytest.mark.parametrize("linked", [False, True])
def test_run_refuses_a_foreign_sqlite_file_and_leaves_it_byte_identical(tmp_path, capsys, linked):
    import hashlib
    import sqlite3

    foreign = tmp_path / "customers.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    con.execute("INSERT INTO customers VALUES (1, 'ada')")
    con.commit()
    con.close()
    out = tmp_path / "out"
    out.mkdir()
    if linked:
        (out / "results.sqlite").symlink_to(foreign)
    else:
        foreign = foreign.rename(out / "results.sqlite")
    digest = hashlib.sha256(foreign.read_bytes()).hexdigest()
    (tmp_path / "c.yaml").write_text(TINY.format(name="fdb"))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "is an SQLite file but not an auxloss results store" in err and "not another program's database" in err
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == digest
    assert not Path(str(foreign) + "-wal").exists() and not (out / "config.yaml").exists()
    con = sqlite3.connect(f"file:{foreign}?mode=ro", uri=True)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()


def test_run_takes_an_empty_results_file_left_by_an_interrupted_start(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.sqlite").touch()  # created, then killed before its tables were
    assert run_experiment(tiny(), tmp_path / "out")["runs"]["done"] == 2


def test_report_refuses_a_store_whose_runs_belong_to_another_config(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "mixed"
    shutil.copytree(finished, out)
    (out / "config.yaml").write_text(yaml.safe_dump(tiny("another").model_dump(mode="json")))
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "holds the runs of another experiment ('sec'" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["password", "passwd", "pwd", "sslpassword", "token", "secret"])
def test_masked_and_removed_query_secrets_are_the_same_keys(key):
    """Review: the masking of messages knew `token` and `sslpassword` while the removal for recorded URLs did not,
    so `--mlflow https://h/?token=X` reached results.json verbatim."""
    url = f"postgresql://u@h/db?sslmode=require&{key}=S3CRET-value"
    assert "S3CRET" not in without_password(url) and "sslmode=require" in without_password(url)
    assert "S3CRET" not in command_without_passwords(f"auxloss run c.yaml --store {url}")
    assert "S3CRET" not in mask_passwords(f"--store {url}")
