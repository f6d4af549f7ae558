"""Dependencies by need: the core runs on torch and numpy alone; the experiment stack is an extra that says so.

Each check runs in a fresh interpreter, since this test session has long imported every package. A package is
"missing" there when ``sys.modules[name] = None``, which makes ``import name`` raise ``ImportError`` exactly as
when it is not installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import auxloss
from auxloss._extras import EXPERIMENT_PACKAGES

SRC = str(Path(auxloss.__file__).resolve().parents[1])
ROOT = Path(SRC).parent
# The experiment extra's packages, plus the data extra's scikit-learn: none of them may load with the core.
OPTIONAL = sorted({*EXPERIMENT_PACKAGES, "sklearn"})

CORE_USE = """
import json, sys, warnings
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
import auxloss.heads, auxloss.recipes, auxloss.sequence, auxloss.taps, auxloss.weighting
from auxloss import schedules as S
from auxloss.train import Callback, TrainOptions, Trainer
from auxloss.weighting import DWA

torch.set_default_dtype(torch.float64)  # for the hand formula below, heads included
torch.manual_seed(0)
x = torch.randn(48, 6)
y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
model = al.attach(net, {"aux": al.Tap("1", al.LinearHead(2))}, example_input=x[:1])

# The objective against a hand formula: L = CE(main) + 0.3 * CE(aux).
objective = al.Objective(aux=[al.Task("aux", source="aux", weight=0.3)])
out = model(x)
report = objective(out, {"input": x, "target": y})
expected = F.cross_entropy(out.main, y) + 0.3 * F.cross_entropy(out.aux["aux"], y)
assert torch.allclose(report.total, expected, rtol=1e-12, atol=0), (report.total, expected)
report.total.backward()

# A schedule, an adaptive weighting and the Trainer.
scheduled = al.Objective(aux=[al.Task("aux", source="aux", weight=S.Curriculum(0.3, start=1, ramp=2))],
                         weighting=DWA())
loader = DataLoader(TensorDataset(x, y), batch_size=16)
result = Trainer(TrainOptions(epochs=2, lr=1e-2), device="cpu", eval_train=False).fit(
    model, scheduled, loader, loader)
assert len(result.history) == 2 and result.best_epoch in (1, 2)
loaded = sorted(m for m in sys.argv[1:] if sys.modules.get(m) is not None)

# The progress bar is rich's, loaded only when asked for.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer = Trainer(epochs=1, device="cpu", progress=True, eval_train=False)
trainer.fit(model, scheduled, loader)
print(json.dumps({"loaded": loaded, "progress": trainer.progress, "warnings": [str(w.message) for w in caught]}))
"""

BLOCK = "import sys\nfor _name in {names!r}:\n    sys.modules[_name] = None\n"


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, env=env,
                          timeout=300)


def test_the_core_api_imports_no_optional_package() -> None:
    proc = _python(CORE_USE, *OPTIONAL)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["loaded"] == [], f"the core imported {seen['loaded']}"
    assert seen["progress"] is True and seen["warnings"] == []  # rich is installed here: the bar is drawn


def test_the_core_api_runs_without_optional_packages() -> None:
    proc = _python(BLOCK.format(names=OPTIONAL) + CORE_USE, *OPTIONAL)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    # Without rich the Trainer warns once and trains without a bar.
    assert seen["progress"] is False
    assert len(seen["warnings"]) == 1 and "pip install 'auxloss[experiment]'" in seen["warnings"][0]


@pytest.mark.parametrize(("module", "named"), [("optuna", "optuna"), ("yaml", "PyYAML"), ("scipy", "scipy")])
def test_a_missing_experiment_package_names_the_extra(module: str, named: str) -> None:
    code = BLOCK.format(names=[module]) + (
        "from auxloss.errors import AuxLossError\n"
        "try:\n"
        "    import auxloss.experiment.config\n"
        "except ImportError as exc:\n"
        "    print(isinstance(exc, AuxLossError), exc)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("True "), proc.stdout
    message = proc.stdout
    assert f"needs {named}, which is not installed" in message
    assert "pip install 'auxloss[experiment]'" in message


def test_the_cli_says_which_extra_a_command_needs() -> None:
    run = _python(BLOCK.format(names=["pydantic", "matplotlib"])
                  + "from auxloss.cli import main\nsys.exit(main(['run', 'missing.yaml']))")
    assert run.returncode == 2, run.stderr
    assert "auxloss: error:" in run.stderr and "pydantic, matplotlib, which are not installed" in run.stderr
    assert "pip install 'auxloss[experiment]'" in run.stderr and "Traceback" not in run.stderr
    # Listing a model's layers is core: it works with no optional package at all.
    layers = _python(BLOCK.format(names=OPTIONAL)
                     + "from auxloss.cli import main\nsys.exit(main(['layers', 'small_cnn', '--depth', '1']))")
    assert layers.returncode == 0, layers.stderr
    assert "block1" in layers.stdout


def test_pyproject_keeps_the_core_small_and_the_extra_in_step() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    assert names(project["dependencies"]) == {"torch", "numpy"}
    extras = project["optional-dependencies"]
    assert names(extras["experiment"]) == {d.lower() for d in EXPERIMENT_PACKAGES.values()}
    every = re.search(r"\[(.*)\]", extras["all"][0])
    assert every is not None and set(every.group(1).split(",")) == set(extras) - {"all", "dev", "integration"}  # test environments
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r'pip install --quiet -e "\.\[[^"]*experiment[^"]*\]"', makefile)  # make test/demo: all of it
