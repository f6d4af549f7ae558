import json
import os
import subprocess
import sys

import pytest

from auxloss.cli import main

TINY_YAML = """
name: cli-tiny
seeds: 2
data: {name: shapes, n_train: 48, n_val: 32, n_test: 32, batch_size: 16, params: {image_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train: {epochs: 1, lr: 0.01}
variants:
  - name: deep
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: 0.3}]
"""


@pytest.mark.parametrize("command", ["demo", "run", "report", "layers", "sweep", "probe"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: auxloss " + command in capsys.readouterr().out


def test_demo_list(capsys):
    assert main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    assert "shapes" in out and "fashion-mnist" in out


def test_layers_lists_shapes(capsys):
    assert main(["layers", "small_cnn", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "block1" in out and "Tensor(1, 32, 16, 16)" in out and "block1.conv1" not in out


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["layers", "smal_cnn"]) == 2
    assert "did you mean 'small_cnn'" in capsys.readouterr().err.lower()
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no auxloss results" in capsys.readouterr().err
    assert main(["demo", "shapez"]) == 2
    assert "did you mean 'shapes'" in capsys.readouterr().err


def test_run_then_report_rebuilds(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY_YAML)
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "deep" in printed and "report.html" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["command"].startswith("auxloss run")
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").exists()
    assert json.loads((out / "results.json").read_text())["variants"] == results["variants"]


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "auxloss", "demo", "--list"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and "shapes" in proc.stdout


@pytest.mark.parametrize("buffered", [True, False])
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, buffered):
    """Audit 2, row 58: `auxloss run ... | head -1` printed a BrokenPipeError traceback once the runs were stored.
    Buffered stdout (a pipe's default) fails at the flush, unbuffered (PYTHONUNBUFFERED=1) at the first print."""
    (tmp_path / "c.yaml").write_text(TINY_YAML.replace("seeds: 2", "seeds: 1"))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "auxloss", "run", str(tmp_path / "c.yaml"), "--out", str(out),
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline()  # what `head -1` reads before it exits
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=300)
    assert first.startswith("cli-tiny: baseline + 1 variants")
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 1  # as the Python docs' recipe for SIGPIPE: quiet, but not success
    assert json.loads((out / "results.json").read_text())["runs"]["done"] == 2  # the runs were stored first
