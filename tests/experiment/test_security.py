"""Security of the experiment runner: no password written to any file, output folders of other people read
without trust. (Checkpoints that could run code: tests/train/test_resume.py.)"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest
import yaml

from auxloss.cli import main
from auxloss.errors import AuxLossError
from auxloss.experiment.config import parse_config
from auxloss.experiment.redact import redact_argv, redact_command, without_password
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
    assert redact_argv(argv) == ["c.yaml", "--store", "postgresql://a@h/db", "--storage=postgresql://b@h/db",
                                 "--seeds", "2"]
    assert redact_command("auxloss run c.yaml --store postgresql://a:S3@h/db --workers 2") == \
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
