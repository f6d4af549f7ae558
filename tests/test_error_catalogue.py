"""Every bad input of docs/errors.md, one test each: the project's own error, a message naming the problem and
saying how to fix it, and through the command line exit code 2 with one line on stderr and no traceback.

The rows' ids (C1, M1, ...) are the first column of the table in docs/errors.md; the last test checks that the
page and this file list the same rows.
"""

from __future__ import annotations

import errno
import math
import re
import sqlite3
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss import schedules as S
from auxloss.cli import main
from auxloss.experiment.store import Store
from auxloss.train import Trainer
from auxloss.zoo.data import DictDataset
from auxloss.zoo.models import SmallCNN

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"

GOOD = """\
name: catalogue
seeds: 1
data: {name: shapes, n_train: 32, n_val: 16, n_test: 16, batch_size: 16, params: {image_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train: {epochs: 1, lr: 0.01, eval_train: false}
variants:
  - name: deep
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: 0.3}]
"""


# -- how a row is provoked -----------------------------------------------------------------------------------------
def cli(env, yaml_text=None, *args, out=None):
    """`auxloss run` on a config; must fail with exit 2 and exactly one line on stderr. Returns that line."""
    tmp, capsys = env["tmp"], env["capsys"]
    argv = list(args)
    if yaml_text is not None:
        cfg = tmp / "c.yaml"
        cfg.write_text(yaml_text)
        argv = ["run", str(cfg), "--out", str(out or tmp / "out"), "--workers", "1", *args]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("auxloss: error: "), err
    assert "Traceback" not in err
    return lines[0]


def api(fn):
    with pytest.raises(al.AuxLossError) as info:
        fn()
    return str(info.value)


def tiny_model(**taps):
    torch.manual_seed(0)
    return al.attach(SmallCNN(3, width=4), taps, example_input=torch.randn(1, 3, 16, 16))


def batch(n=4, **extra):
    return {"input": torch.randn(n, 3, 16, 16), "target": torch.randint(0, 3, (n,)), **extra}


def _total_backward_with_gating():
    from auxloss.weighting import CosineGating

    model = tiny_model(a=al.Tap("block1", al.LinearHead(3)))
    objective = al.Objective(aux=[al.Task("a", source="a", weight=0.3)], weighting=CosineGating())
    b = batch()
    objective(model(b["input"]), b).total.backward()


def objective_error(model, objective, b):
    return api(lambda: objective(model(b["input"]), b))


def fit(model, objective, x, y, **trainer):
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    return Trainer(epochs=1, device="cpu", eval_train=False, **trainer).fit(model, objective, loader)


class Looped(nn.Module):
    """A cell called three times per forward, like an RNN cell in a loop."""

    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(4, 4)

    def forward(self, x):
        for _ in range(3):
            x = torch.tanh(self.cell(x))
        return x


def _compiled(model):
    return torch.compile(model, backend="eager")


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.spare = nn.Linear(4, 4)  # never called in forward

    def forward(self, x):
        return self.body(x)


def bad_grad_loss(pred, target):
    """Cross entropy plus sqrt(0): the loss is finite, its gradient is NaN (d sqrt(u)/du at 0 is inf, times 0)."""
    return nn.functional.cross_entropy(pred, target) + torch.sqrt(((pred - pred.detach()) ** 2).sum())


class _FsyncFull:
    """The os module of the checkpoint writer, with a disk that is full when the file is flushed to it."""

    def __getattr__(self, name):
        import os

        return getattr(os, name)

    @staticmethod
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")


def full_store_connect(real):
    def connect(*args, **kwargs):  # SQLite's own SQLITE_FULL: the database may not grow by a single page
        con = real(*args, **kwargs)
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count={max(pages, 1)}")
        return con
    return connect


# -- the rows ----------------------------------------------------------------------------------------------------
ROWS = {
    # config
    "C1": (lambda e: cli(e, "name: x\nseeds: 1\ntrain:\n  epochs: 1\n  learnin_rate: 0.1\n"), r"c\.yaml:5: unknown key 'train\.learnin_rate'", r"valid keys: \[.*'lr'|Fix that key"),
    "C2": (lambda e: cli(e, "name: x\nseeds: two\n"), r"c\.yaml:2: seeds: .*integer.*'two'", r"Fix that key"),
    "C3": (lambda e: cli(e, None, "run", str(e["tmp"] / "nope.yaml")), r"nope\.yaml' does not exist",
           r"give the path of a YAML file"),
    "C4": (lambda e: cli(e, "name: x\ntrain: [1, 2\nseeds: 1\n"), r"c\.yaml:3: YAML syntax error",
           r"Fix the file's syntax"),
    "C5": (lambda e: cli(e, "- name: x\n- seeds: 2\n"), r"must be a YAML mapping", r"\(key: value\)"),
    "C6": (lambda e: cli(e, GOOD.replace("source: aux1", "source: aux2")),
           r"task 'aux1' reads source 'aux2', which is not one of this variant's taps \['aux1'\]",
           r"Fix that key"),
    "C7": (lambda e: cli(e, "- name: x\n", "--seeds", "3"), r"cannot set 'seeds' from the command line",
           r"Fix the file, or drop the option"),
    "C8": (lambda e: cli(e, GOOD.replace("name: shapes", "name: shape")), r"unknown data\.name 'shape'",
           r"use 'shapes'.*package\.module:function"),
    "C9": (lambda e: cli(e, GOOD.replace("name: small_cnn", "name: smal_cnn")), r"Unknown model 'smal_cnn'",
           r"Did you mean 'small_cnn'"),
    "C10": (lambda e: cli(e, GOOD + "    weighting: {type: dwaa}\n"), r"unknown weighting type 'dwaa'",
            r"Did you mean 'dwa'"),
    "C11": (lambda e: _binary_config(e), r"c\.yaml: not a text file \(byte 0 is not UTF-8\)",
            r"give a YAML config file, saved as UTF-8"),
    "C12": (lambda e: cli(e, GOOD.replace("name: catalogue", "name: ../../X")),
            r"experiment name '\.\./\.\./X' cannot name a folder: it holds a path separator",
            r"use letters, digits, '-', '_' and single dots"),
    "C13": (lambda e: cli(e, GOOD.replace("weight: 0.3", "weight: .inf")),
            r"c\.yaml:\d+: variants\.0\.tasks\.0: task 'aux1': Constant: value must be finite and >= 0, got inf",
            r"Pass e\.g\. value=0\.1"),
    "C14": (lambda e: cli(e, GOOD.replace("lr: 0.01", "lr: inf")),
            r"c\.yaml:5: train: lr must be a positive finite number, got inf", r"Fix that key"),
    "C15": (lambda e: cli(e, GOOD, "--device", "gpu"), r"unknown device 'gpu'", r"use 'auto', 'cpu', 'cuda'"),
    "C16": (lambda e: _cuda_on_cpu_torch(e), r"device 'cuda': this torch \(.*\) is a CPU-only build",
            r"use --device cpu \(or 'auto'\), or install a CUDA build"),
    "C17": (lambda e: cli(e, GOOD + "train: {epochs: 2}\n"),
            r"c\.yaml:10: duplicate key 'train' at the same level: first on line 5, again on line 10",
            r"Merge the two into one"),
    "C18": (lambda e: cli(e, GOOD + "  - name: headless\n    taps: {x: {layer: block1}}\n"),
            r"variant 'headless' has taps \['x'\] but no task", r"Add a task reading each tap, or remove the variant"),
    "C19": (lambda e: cli(e, GOOD, "--seeds", "0"), r"seeds: Input should be greater than or equal to 1 \(got 0\)",
            r"Fix that key"),
    "C20": (lambda e: cli(e, GOOD.replace("weight: 0.3", "weight: {type: curriculum, value: 0.3, start: 1000}")),
            r"task 'aux1' never gets a nonzero weight in this run: .* 0 at every one of the run's 2 optimizer steps",
            r"Make it start earlier \(before step 2\), or train for more epochs"),
    "C21": (lambda e: cli(e, GOOD.replace("lr: 0.01", "lr: 1e300")),
            r"c\.yaml:5: train: lr must be at most 3\.403e\+38, the largest float32", r"Fix that key"),
    "C22": (lambda e: cli(e, GOOD, "--device", "meta"), r"device 'meta': auxloss does not train on 'meta' devices",
            r"use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    "C23": (lambda e: cli(e, GOOD.replace("batch_size: 16", "batch_size: " + "1" + "0" * 30)),
            r"c\.yaml:3: data\.batch_size: Input should be less than or equal to 9223372036854775807",
            r"Fix that key"),
    "C24": (lambda e: cli(e, GOOD, "--workers", "-1"), r"--workers must be at least 1 .*got -1",
            r"processes training runs in parallel"),
    "C25": (lambda e: cli(e, ""), r"c\.yaml: the config is empty \(it sets no key\)",
            r"Write the experiment's keys \(name, data, model, train, variants\)"),
    # model
    "M1": (lambda e: api(lambda: tiny_model(a=al.Tap("blok1", al.LinearHead(3)))),
           r"no layer named 'blok1'.*Closest names: \['block1'", r"list_layers"),
    "M2": (lambda e: api(lambda: al.attach(Unused(), {"a": al.Tap("spare", al.LinearHead(2))},
                                           example_input=torch.randn(1, 4))),
           r"tap 'a': layer 'spare' never ran", r"Tap a layer that the model's forward actually calls"),
    "M3": (lambda e: objective_error(
               tiny_model(a=al.Tap("block1", al.LinearHead(3))),
               al.Objective(aux=[al.Task("a", source="a", target="box", loss="mse")]),
               batch(box=torch.randn(4, 2))),
           r"head output shape \(4, 3\) does not fit target shape \(4, 2\)", r"make the head output \(2,\)"),
    "M4": (lambda e: objective_error(
               tiny_model(a=al.Tap("block1", al.LinearHead(3))),
               al.Objective(aux=[al.Task("a", source="a", target="size")]), batch(size=torch.rand(4))),
           r"cross entropy needs integer class labels", r"use loss='mse'.*or cast it with \.long\(\)"),
    "M5": (lambda e: cli(e, GOOD.replace("layer: block1", "layer: block9")), r"no layer named 'block9'",
           r"Closest names|list_layers"),
    "M6": (lambda e: api(lambda: al.attach(Looped(), {"a": al.Tap("cell", al.LinearHead(2))},
                                           example_input=torch.randn(1, 4))),
           r"tap 'a': layer 'cell' ran 3 times in one forward pass", r"call='last'.*call='all'"),
    "M7": (lambda e: api(lambda: al.attach(_compiled(Unused()), {"a": al.Tap("body", al.LinearHead(2))})),
           r"the model was compiled with torch.compile before attach\(\)",
           r"Attach first, then compile: model = torch.compile\(auxloss.attach\(net, taps\)\)"),
    "M8": (lambda e: api(lambda: al.Task("main", metric="mse", higher_is_better=True)),
           r"metric 'mse' is lower is better, but higher_is_better=True was given", r"drop higher_is_better"),
    "M9": (lambda e: _trinh_behind_a_projection(),
           r"the Trinh task's target has 3 features per step but the tapped RNN reads 8: .*input projection",
           r"Tap an RNN that reads the batch's sequence directly, or give the task a target function"),
    # data
    "D1": (lambda e: objective_error(
               tiny_model(a=al.Tap("block1", al.LinearHead(3))),
               al.Objective(aux=[al.Task("a", source="a", target="colour")]), batch(shape=torch.zeros(4))),
           r"no target key 'colour'; the keys present are \['input', 'shape', 'target'\]",
           r"Set the task's `target` to one of them"),
    "D2": (lambda e: objective_error(tiny_model(), al.Objective(),
                                     {"input": torch.randn(4, 3, 16, 16), "target": torch.tensor([0, 1, 2, 7])}),
           r"labels out of range: they span \[0, 7\] but the head predicts 3 classes",
           r"Give the head as many outputs as there are classes"),
    "D3": (lambda e: api(lambda: fit(tiny_model(), al.Objective(),
                                     torch.randn(8, 3, 16, 16).index_fill_(0, torch.tensor([5]), math.nan),
                                     torch.randint(0, 3, (8,)))),
           r"non-finite loss at step 1 .*this batch's \['input'\] hold NaN or Inf", r"Clean the data"),
    "D4": (lambda e: api(lambda: DictDataset({"input": torch.zeros(0, 3), "target": torch.zeros(0)})),
           r"DictDataset has 0 items", r"give it at least one item"),
    "D5": (lambda e: api(lambda: Trainer(epochs=1).fit(
               tiny_model(), al.Objective(),
               DataLoader(TensorDataset(torch.randn(3, 3, 16, 16), torch.zeros(3).long()), batch_size=4,
                          drop_last=True))),
           r"the training data is empty \(0 batches\)", r"at least batch_size samples"),
    "D6": (lambda e: cli(e, GOOD.replace("name: shapes,", f"name: folder, root: {e['tmp'] / 'no-such'},")
                         .replace("params: {image_size: 16}", "params: {}")),
           r"Image folder .*no-such does not exist", r"Give the folder that holds one subfolder per class"),
    "D7": (lambda e: cli(e, GOOD.replace("name: shapes,", f"name: fashion-mnist, root: {e['tmp']},")
                         .replace("params: {image_size: 16}", "params: {}")),
           r"Fashion-MNIST train images and labels not found", r"apt-get install dataset-fashion-mnist|pass root="),
    "D8": (lambda e: cli(e, GOOD.replace("name: shapes, n_train: 32", "name: digits, n_train: 3000")
                         .replace("params: {image_size: 16}", "params: {}")),
           r"the digits data has 1797 samples but the splits ask for 3032", r"lower data\.n_train"),
    "D9": (lambda e: api(lambda: al.Objective().inputs((torch.zeros(2), torch.zeros(2), torch.zeros(2)))),
           r"a tuple batch has 3 items but only 2 names", r"pass batch_keys="),
    "D10": (lambda e: api(lambda: Trainer(epochs=1).evaluate(tiny_model(), al.Objective(), [])),
            r"an evaluation split is empty", r"give it at least one sample"),
    # training
    "T1": (lambda e: objective_error(
               tiny_model(a=al.Tap("block1", al.LinearHead(3))),
               al.Objective(aux=[al.Task("a", source="a", loss=lambda p, t: p.sum() * math.nan)]), batch()),
           r"non-finite loss at step 0 in task\(s\) \['a'\] \(a=nan\)",
           r"Lower the learning rate or that task's weight.*nonfinite='skip'"),
    "T2": (lambda e: objective_error(
               tiny_model(a=al.Tap("block1", al.LinearHead(3))),
               al.Objective(aux=[al.Task("a", source="a", loss=lambda p, t: p.sum() * math.inf)]), batch()),
           r"non-finite loss at step 0 in task\(s\) \['a'\]", r"nonfinite='skip'"),
    "T3": (lambda e: api(lambda: fit(tiny_model(), al.Objective(al.Task("main", loss=bad_grad_loss)),
                                     torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,)), check_grads=True)),
           r"non-finite gradient norm \(nan\) at step 0 \(epoch 1, batch 0\) although the loss was finite",
           r"Lower the learning rate.*Objective\(nonfinite='skip'\)"),
    "T4": (lambda e: api(lambda: Trainer(lr=-0.1)), r"lr must be a positive finite number, got -0\.1",
           r"positive finite number"),
    "T5": (lambda e: api(lambda: _other_models_checkpoint(e["tmp"])), r"does not fit this model/objective",
           r"use another output folder, or delete the checkpoint"),
    "T6": (lambda e: api(lambda: _total_backward_with_gating()),
           r"CosineGating is gradient-aware.*report\.total\.backward\(\) cannot do",
           r"Call objective\.backward\(report\) instead"),
    "T7": (lambda e: api(lambda: _planted_checkpoint(e["tmp"])),
           r"checkpoint .*last\.pt' holds objects other than tensors and plain data .*GLOBAL .*system",
           r"delete the checkpoint folder"),
    "T8": (lambda e: api(lambda: fit(tiny_model(), al.Objective(), torch.randn(8, 3, 16, 16),
                                     torch.randint(0, 3, (8,)), lr=1e38)),
           r"the optimizer step at step 0 \(epoch 1\) cannot be computed in float32 .*lr=1e\+38 is far too large",
           r"Lower the learning rate"),
    # weights
    "W1": (lambda e: api(lambda: al.Task("a", weight=-0.3)),
           r"task 'a': Constant: value must be finite and >= 0, got -0\.3", r"Pass e\.g\. value=0\.1"),
    "W2": (lambda e: api(lambda: al.Task("a", weight=math.nan)), r"must be finite and >= 0, got nan",
           r"Pass e\.g\. value=0\.1"),
    "W3": (lambda e: cli(e, GOOD.replace("weight: 0.3", "weight: -1")), r"task 'aux1'.* must be finite and >= 0",
           r"Pass e\.g\."),
    "W4": (lambda e: api(lambda: S.Curriculum(0.3, start=100, ramp=50, stop=120)),
           r"the schedule ends before it starts: stop \(120\) is before start \+ ramp", r"set stop >= 150"),
    "W5": (lambda e: api(lambda: S.Linear(0.0, 0.3, begin=500, stop=100)), r"begin \(500\) is after stop \(100\)",
           r"Swap them"),
    "W6": (lambda e: cli(e, GOOD.replace("weight: 0.3", "weight: {type: linear, start: 0, end: 0.3, begn: 0, "
                                                        "stop: 10}")),
           r"unknown key 'begn' for Linear", r"Did you mean 'begin'"),
    # output folder
    "O1": (lambda e: _another_experiment(e), r"holds the results of another experiment \('someone-else'",
           r"Use another --out folder, or pass --force"),
    "O2": (lambda e: _read_only(e), r"cannot write the results store .*(unable to open|readonly)",
           r"Choose a writable --out folder"),
    "O3": (lambda e: _full_disk_checkpoint(e), r"cannot write a checkpoint in .*No space left on device",
           r"Free some disk space"),
    "O4": (lambda e: _full_disk_store(e), r"cannot write the results store .*database or disk is full",
           r"Free some disk space"),
    "O5": (lambda e: _full_disk_results(e), r"cannot write .*results\.json.*No space left on device",
           r"Free some disk space"),
    "O6": (lambda e: _full_disk_logs(e), r"No space left on device \(.*epochs\.jsonl\)", r"Free some disk space"),
    "O7": (lambda e: cli(e, None, "report", str(e["tmp"])), r"holds no auxloss results",
           r"give the --out folder of an `auxloss run`"),
    "O9": (lambda e: _folder_without_config(e), r"has a results store but no config\.yaml",
           r"Give the --out folder of an `auxloss run`"),
    "O10": (lambda e: _foreign_sqlite(e), r"is an SQLite file but not an auxloss results store \(missing",
            r"not another program's database"),
    "O11": (lambda e: _second_run_on_one_folder(e), r"another `auxloss run` is working on",
            r"wait for it to finish .*AUXLOSS_SHARED_STORE=1"),
    "O12": (lambda e: _second_run_on_one_folder(e, "shared"),
            r"workers started with AUXLOSS_SHARED_STORE=1 are working on .*this command was started without it",
            r"Start it with AUXLOSS_SHARED_STORE=1 to share the runs with them"),
    "O13": (lambda e: _second_run_on_one_folder(e, "exclusive", AUXLOSS_SHARED_STORE="1"),
            r"a plain `auxloss run` \(without AUXLOSS_SHARED_STORE=1\) is working on .*may not join it",
            r"start every process on one folder with AUXLOSS_SHARED_STORE=1, or none"),
    "O14": (lambda e: _force_with_a_broken_config(e), r"no layer named 'blok1'", r"Closest names"),
    "O15": (lambda e: cli(e, GOOD, "--store", "host=db dbname=x user=u password=hunter2-catalogue"),
            r"--store looks like a libpq keyword connection string \(keys \['dbname', 'host', 'password', 'user'\]; "
            + r"values not shown\)(?!.*hunter2)", r"give a postgresql:// URL .*PGPASSWORD or ~/\.pgpass"),
    "O16": (lambda e: cli(e, GOOD, "--store", "mysql://u:hunter2-catalogue@h/db"),
            r"--store 'mysql://u:\*\*\*@h/db' is not a results store auxloss can use(?!.*hunter2)",
            r"give a PostgreSQL URL \(postgresql://"),
    "O17": (lambda e: _shared_store_other_config(e),
            r"the shared store '.*:\*\*\*@.*' holds experiment 'catalogue-\w+' with a different config .* written "
            + r"from another --out folder; it is left untouched, --force included",
            r"Rename this experiment \(its config's name:\) or use another database"),
    "O18": (lambda e: _report_from_a_database_without_it(e),
            r"the results store '.*:\*\*\*@.*' holds no experiment 'catalogue-\w+' \(no schema 'auxloss_catalogue_"
            + r"\w+' of it\); nothing was written", r"Pass the --store database its runs were written to"),
    "O8": (lambda e: _postgres_folder(e), r"are kept in a PostgreSQL database \('postgresql://u@db\.example/x'",
           r"pass it with --store URL"),
}


def _other_models_checkpoint(tmp):
    model = tiny_model()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    fit(model, al.Objective(), x, y, checkpoint_dir=tmp / "ckpt")
    other = al.attach(nn.Sequential(nn.Flatten(), nn.Linear(768, 3)), {})
    fit(other, al.Objective(), x, y, checkpoint_dir=tmp / "ckpt")


class _Planted:
    def __reduce__(self):
        import os

        return (os.system, ("echo planted",))


def _planted_checkpoint(tmp):
    import hashlib
    import io

    from auxloss.train.checkpoint import MAGIC

    buffer = io.BytesIO()
    torch.save({"model": _Planted()}, buffer)
    payload = buffer.getvalue()
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "last.pt").write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    fit(tiny_model(), al.Objective(), torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,)), checkpoint_dir=tmp / "ckpt")


def _cuda_on_cpu_torch(e):
    e["monkeypatch"].setattr(torch.version, "cuda", None)  # the same message on a machine with a CUDA build
    e["monkeypatch"].setattr(torch.version, "hip", None, raising=False)
    return cli(e, GOOD, "--device", "cuda")


def _second_run_on_one_folder(e, held="exclusive", **env):
    """`auxloss run` (with ``env``) while another process holds the folder's lock as a plain command does
    (``exclusive``) or as AUXLOSS_SHARED_STORE=1 workers do (``shared``)."""
    import fcntl
    import os
    import subprocess
    import sys

    out = e["tmp"] / "out"
    out.mkdir()
    with open(out / ".run.lock", "a") as lock:  # what the first `auxloss run` on this folder holds while it works
        fcntl.flock(lock, fcntl.LOCK_EX if held == "exclusive" else fcntl.LOCK_SH)
        other = subprocess.run(  # flock locks are per open file: the second command is another process
            [sys.executable, "-m", "auxloss", "run", str(_write(e, GOOD)), "--out", str(out), "--workers", "1"],
            capture_output=True, text=True, timeout=300, check=False,
            env={**{k: v for k, v in os.environ.items() if k != "AUXLOSS_SHARED_STORE"},
                 "PYTHONPATH": str(Path(al.__file__).parents[1]), **env})
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr
    assert sorted(p.name for p in out.iterdir()) == [".run.lock"]  # nothing touched
    return other.stderr.strip()


def _force_with_a_broken_config(e):
    """Audit 2, row 38: --force with a config that fails to build must keep the old results whole."""
    import hashlib

    out = e["tmp"] / "out"
    e["capsys"].readouterr()
    assert main(["run", str(_write(e, GOOD)), "--out", str(out), "--workers", "1"]) == 0
    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    line = cli(e, GOOD.replace("layer: block1", "layer: blok1").replace("lr: 0.01", "lr: 0.02"), "--force", out=out)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.exists()}
    assert after == before  # the old runs, logs, weights, results.json and report: not one byte changed
    assert [r["status"] for r in Store(out / "results.sqlite").runs(None)] == ["done", "done"]
    return line


def test_force_discards_the_old_report_with_the_old_runs(tmp_path):
    """A report left after --force would describe runs that are gone until the new ones finish."""
    from auxloss.experiment import runner
    from auxloss.experiment.build import experiment_from_config
    from auxloss.experiment.config import load_config

    out = tmp_path / "out"
    store = Store(out / "results.sqlite")
    store.set_meta("config_hash", "0123456789abcdef")
    for name in ("results.json", "report.html", "report.md", "figures/seeds.png"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text("old")
    (tmp_path / "c.yaml").write_text(GOOD)
    runner._prepare_store(experiment_from_config(load_config(tmp_path / "c.yaml")), out, force=True)
    assert not any((out / name).exists() for name in ("results.json", "report.html", "report.md", "figures"))


def _write(e, text):
    (e["tmp"] / "c.yaml").write_text(text)
    return e["tmp"] / "c.yaml"


class _ProjectedLSTM(nn.Module):
    """An LSTM tagger whose inputs (3 features) are projected to 8 before the LSTM reads them."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.rnn = nn.LSTM(8, 12, batch_first=True)
        self.out = nn.Linear(12, 2)

    def forward(self, x):
        return self.out(self.rnn(self.proj(x))[0][:, -1])


def _trinh_behind_a_projection():
    from auxloss.sequence import trinh_auxiliary

    torch.manual_seed(0)
    net = _ProjectedLSTM()
    taps, tasks = trinh_auxiliary(net, "rnn", segment=3)
    model = al.attach(net, taps, example_input=torch.zeros(1, 9, 3))
    x = torch.randn(4, 9, 3)  # the batch's "input" is exactly what the model reads: the target key is right
    return objective_error(model, al.Objective(aux=tasks), {"input": x, "target": torch.randint(0, 2, (4,))})


def _folder_without_config(e):
    out = e["tmp"] / "partial"
    Store(out / "results.sqlite")
    return cli(e, None, "report", str(out))


def _foreign_sqlite(e):
    out = e["tmp"] / "foreign"
    out.mkdir()
    (out / "config.yaml").write_text("name: catalogue\n")
    con = sqlite3.connect(out / "results.sqlite")
    con.execute("CREATE TABLE runs (id INTEGER)")
    con.close()
    report = cli(e, None, "report", str(out), "--out", str(e["tmp"] / "rep"))
    # `auxloss run` into that folder meets the same check, before it writes anything (no tables, no WAL switch).
    before = (out / "results.sqlite").read_bytes()
    assert cli(e, GOOD, out=out) == report
    assert (out / "results.sqlite").read_bytes() == before
    return report


def _postgres_folder(e):
    out = e["tmp"] / "pg"
    out.mkdir()
    (out / "config.yaml").write_text("name: catalogue\n")
    (out / "store_url.txt").write_text("postgresql://u@db.example/x\n")
    return cli(e, None, "report", str(out))


def _shared_store_other_config(e):
    import os
    import uuid

    url = os.environ.get("AUXLOSS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set AUXLOSS_TEST_POSTGRES_URL to a PostgreSQL database to run")
    good = GOOD.replace("name: catalogue", f"name: catalogue-{uuid.uuid4().hex[:6]}")
    (e["tmp"] / "a.yaml").write_text(good)
    assert main(["run", str(e["tmp"] / "a.yaml"), "--out", str(e["tmp"] / "a"), "--workers", "1", "--store", url]) == 0
    return cli(e, good.replace("lr: 0.01", "lr: 0.02"), "--store", url, "--force", out=e["tmp"] / "b")


def _report_from_a_database_without_it(e):
    import os
    import uuid

    url = os.environ.get("AUXLOSS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set AUXLOSS_TEST_POSTGRES_URL to a PostgreSQL database to run")
    (e["tmp"] / "c.yaml").write_text(GOOD.replace("name: catalogue", f"name: catalogue-{uuid.uuid4().hex[:6]}"))
    assert main(["run", str(e["tmp"] / "c.yaml"), "--out", str(e["tmp"] / "out"), "--workers", "1"]) == 0
    return cli(e, None, "report", str(e["tmp"] / "out"), "--store", url)


def _binary_config(e):
    (e["tmp"] / "c.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return cli(e, None, "run", str(e["tmp"] / "c.yaml"))


def _another_experiment(e):
    store = Store(e["tmp"] / "out" / "results.sqlite")
    store.set_meta("config_hash", "0123456789abcdef")
    store.set_meta("name", "someone-else")
    return cli(e, GOOD)


def _read_only(e):
    out = e["tmp"] / "ro"
    out.mkdir()
    out.chmod(0o555)
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        # root writes anywhere: make SQLite meet the read-only folder as an ordinary user would
        def refuse(*args, **kwargs):
            raise sqlite3.OperationalError("unable to open database file")
        e["monkeypatch"].setattr("auxloss.experiment.store.sqlite3.connect", refuse)
    try:
        return cli(e, GOOD, out=out)
    finally:
        out.chmod(0o755)


def _full_disk_checkpoint(e):
    e["monkeypatch"].setattr("auxloss.train.checkpoint.os", _FsyncFull())
    return cli(e, GOOD)


def _full_disk_store(e):
    store = Store(e["tmp"] / "s.sqlite")
    store.add_runs([("deep", 0)])
    store.claim("w")
    e["monkeypatch"].setattr("auxloss.experiment.store.sqlite3.connect", full_store_connect(sqlite3.connect))
    try:
        return api(lambda: store.finish("deep", 0, {"main": 0.5}, [{"epoch": 1, "log": "x" * 20000}], worker="w"))
    finally:
        e["monkeypatch"].undo()
        (row,) = store.runs(None)
        assert row["status"] == "running" and row["result"] is None  # nothing half-written


def _full_disk_results(e):
    from auxloss.experiment import runner

    e["monkeypatch"].setattr("auxloss.experiment.runner.os", _FsyncFull())
    return api(lambda: runner.write_atomic(e["tmp"] / "results.json", "{}"))


def _full_disk_logs(e):
    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "epochs.jsonl"))

    e["monkeypatch"].setattr("auxloss.train.logging.RunLogger.log_epoch", full)
    return cli(e, GOOD)


# -- your model and data (auxloss.compare) --------------------------------------------------------------------------
def _u_data(seed, n=48, extra=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    parts = (x, y, y.clone()) if extra else (x, y)
    cut = (0, n // 2, 3 * n // 4, n)
    return {k: TensorDataset(*(t[cut[i]:cut[i + 1]] for t in parts)) for i, k in enumerate(("train", "val", "test"))}


def _u_model(seed):
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def _u_variant(**task):
    return al.Variant("v", taps={"h": al.Tap("1", al.LinearHead(2))}, tasks=[al.Task("h", source="h", **task)])


def _compare(e, **kwargs):
    args = {"model": _u_model, "data": _u_data, "variants": [_u_variant()], "seeds": 1, "out": e["tmp"] / "o",
            "train": {"epochs": 1, "device": "cpu", "eval_train": False}, **kwargs}
    message = api(lambda: al.compare(**args))
    assert not (e["tmp"] / "o" / "results.json").exists()  # nothing published
    return message


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(16):
            yield torch.randn(6), torch.tensor(i % 2)


def _drifting_model():
    calls = []

    def model(seed):
        calls.append(seed)
        net = _u_model(seed)
        with torch.no_grad():
            net[2].bias.add_(len(calls))
        return net

    return model


def _user_module(e, spec):
    pkg = e["tmp"] / "catalogue_pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text("def build():\n    pass\n")
    return cli(e, GOOD.replace("name: small_cnn", f"name: '{spec}'"))


ROWS.update({
    "U1": (lambda e: _compare(e, model=lambda seed: "not a module"), r"must return a torch\.nn\.Module .*got str",
           r"the trunk"),
    "U2": (lambda e: _compare(e, data=lambda seed: {"train": _u_data(seed)["train"]}),
           r"returned no \['val', 'test'\] split", r"needs 'train', 'val'"),
    "U3": (lambda e: _compare(e, data=lambda seed: _u_data(seed, extra=True)), r"tuple batch has 3 items",
           r"pass batch_keys="),
    "U4": (lambda e: _compare(e, variants=[_u_variant(target="colour")]), r"no target key 'colour'",
           r"Set the task's `target`"),
    "U5": (lambda e: _compare(e, data=lambda seed: {**_u_data(seed), "train": _Stream()},
                              train={"epochs": 1, "lr_schedule": "cosine", "eval_train": False}),
           r"no length", r"give the dataset a __len__"),
    "U6": (lambda e: _compare(e, model=_drifting_model()), r"different initial weights", r"seed it from `seed`"),
    "U7": (lambda e: _user_module(e, "nowhere_pkg.models:build"), r"no module 'nowhere_pkg' was found; searched",
           r"Put the package"),
    "U8": (lambda e: _user_module(e, "catalogue_pkg.models:buld"), r"has no attribute 'buld'; it defines \['build'\]",
           r"'buld'"),
    "U9": (lambda e: api(lambda: al.Variant("x", taps={"h": al.Tap("1", al.LinearHead(2))})),
           r"has taps but no task", r"Add a Task"),
})


# -- engines and tracking -------------------------------------------------------------------------------------------
def _lightning_option_before_any_run(e):
    pytest.importorskip("lightning")
    out = e["tmp"] / "out"
    line = cli(e, GOOD.replace("eval_train: false}", "eval_train: false, engine: lightning, checkpoint_every: 2}"),
               out=out)
    # Found while the runner checks every variant, before the folder is claimed: no config, no store, no run.
    assert not (out / "config.yaml").exists() and not (out / "results.sqlite").exists()
    return line


def _deleted_mlflow_experiment(e):
    client_cls = pytest.importorskip("mlflow").MlflowClient
    e["monkeypatch"].setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (e["tmp"] / "mlruns").as_uri()
    client = client_cls(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("catalogue"))
    return cli(e, GOOD, "--mlflow", uri)


ROWS.update({
    "L1": (_lightning_option_before_any_run,
           r"train option checkpoint_every=2 is not supported by the Lightning engine", r"drop checkpoint_every"),
    "L2": (lambda e: cli(e, GOOD.replace("eval_train: false}", "eval_train: false, lightning: {trainer: {}}}")),
           r"train\.lightning options are given but train\.engine is not 'lightning'", r"add `engine: lightning`"),
    "L3": (lambda e: cli(e, GOOD.replace("eval_train: false}",
                                         "eval_train: false, engine: lightning, lightning: {trainer: {max_epochs: 5}}}")),
           r"may not set 'max_epochs' \(set by train epochs\)", r"the experiment's settings decide them"),
    "L4": (_deleted_mlflow_experiment, r"the MLflow experiment 'catalogue' on .* is deleted",
           r"restore it \(mlflow experiments restore\) or rename"),
})


def _torchjd(e, spec, via_cli=True):
    """A TorchJD bridge row: through `auxloss run` on a config, or through the Python API."""
    pytest.importorskip("torchjd")
    if via_cli:
        return cli(e, GOOD + f"    weighting: {spec}\n")
    from auxloss.weighting import build_weighting

    return api(lambda: build_weighting(spec))


def _torchjd_missing(e):
    import sys

    e["monkeypatch"].setitem(sys.modules, "torchjd", None)  # what `import torchjd` meets when it is not installed
    return cli(e, GOOD + "    weighting: {type: torchjd, aggregator: UPGrad}\n")


ROWS.update({
    "W7": (lambda e: _torchjd(e, "{type: torchjd, aggregator: UPGrd}"),
           r"torchjd: unknown aggregator 'UPGrd'; the installed TorchJD offers \[.*'MGDA'.*\]",
           r"Did you mean 'UPGrad'\?"),
    "W8": (lambda e: _torchjd(e, "{type: torchjd, aggregator: CAGrad}"),
           r"aggregator CAGrad needs parameter\(s\) \['c'\]", r"give them under params, e\.g\. params: \{c: \.\.\.\}"),
    "W9": (lambda e: _torchjd(e, {"type": "torchjd", "aggregator": "CAGrad", "params": {"cc": 0.4}}, via_cli=False),
           r"aggregator CAGrad has no parameter\(s\) \['cc'\]", r"its parameters are \['c', 'norm_eps'\]"),
    "W10": (_torchjd_missing, r"torchjd is not installed", r"pip install auxloss\[torchjd\]"),
    "W11": (lambda e: _torchjd(e, {"type": "torchjd", "aggregator": "ConFIG", "mode": "amortized"}, via_cli=False),
            r"ConFIG has none", r"Use mode='exact', or one of \[.*'UPGrad'"),
    "W12": (lambda e: cli(e, GOOD + "    weighting: {type: arml, mode: representation}\n"),
            r"ARML: mode must be one of \['exact', 'amortized'\], got 'representation'", r"no representation mode: "),
    "W13": (lambda e: cli(e, GOOD.replace("source: aux1", "source: main")
                          + "    weighting: {type: gating, mode: representation}\n"),
            r"task 'aux1' reads 'main', not a tap", r"use mode='exact'"),
})


# -- Hugging Face datasets on disk (data.name: hf) ------------------------------------------------------------------
def _hf(e, root, params="{}"):
    """`auxloss run` with data.name hf on ``root``."""
    return cli(e, GOOD.replace("name: shapes,", f"name: hf, root: '{root}',")
               .replace("params: {image_size: 16}", f"params: {params}"))


def _hf_saved(e):
    """A saved dataset with an image and a class column, written by `datasets` itself."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    root = e["tmp"] / "saved"
    images = [Image.new("RGB", (16, 16), (i, 0, 0)) for i in range(80)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(80)]},
                               features=features).save_to_disk(str(root))
    return root


def _hf_without_datasets(e):
    import sys

    root = e["tmp"] / "saved"
    root.mkdir()
    (root / "state.json").write_text("{}")  # what save_to_disk writes: the folder is a saved dataset
    e["monkeypatch"].setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    return _hf(e, root)


def _hf_neither(e):
    (e["tmp"] / "notes").mkdir()
    (e["tmp"] / "notes" / "readme.txt").write_text("not data")
    return _hf(e, e["tmp"] / "notes")


ROWS.update({
    "D11": (lambda e: _hf(e, "ylecun/mnist"),
            r"data\.root 'ylecun/mnist' is not a local path .* auxloss never downloads",
            r"load_dataset\('ylecun/mnist'\)\.save_to_disk\(PATH\).*give that folder as data\.root"),
    "D12": (lambda e: _hf(e, e["tmp"] / "no-such"), r"Hugging Face dataset path .*no-such does not exist",
            r"Give data\.root a folder written by Dataset/DatasetDict\.save_to_disk, a \.parquet file"),
    "D13": (_hf_neither, r"notes is neither a saved Hugging Face dataset .* nor parquet data; it holds \['readme\.txt'\]",
            r"save_to_disk\(PATH\)` or `dataset\.to_parquet\(PATH/train\.parquet\)` write one"),
    "D14": (lambda e: _hf(e, _hf_saved(e), "{columns: {input: image, target: lable}}"),
            r"column\(s\) \['lable'\] are not in .* its columns are \['image', 'label'\] \(did you mean 'label'\?\)",
            r"columns: \{input: IMAGE_COLUMN, target: LABEL_COLUMN\} \(data\.params\.columns"),
    "D15": (_hf_without_datasets, r"datasets is not installed", r"pip install auxloss\[hf\]"),
})


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_named_with_its_fix(row, tmp_path, capsys, monkeypatch):
    provoke, problem, fix = ROWS[row]
    message = provoke({"tmp": tmp_path, "capsys": capsys, "monkeypatch": monkeypatch})
    assert re.search(problem, message), message
    assert re.search(fix, message), message


def test_nan_loss_and_nan_gradients_can_be_skipped_and_counted():
    model = tiny_model(a=al.Tap("block1", al.LinearHead(3)))
    objective = al.Objective(aux=[al.Task("a", source="a", loss=lambda p, t: p.sum() * math.nan)], nonfinite="skip")
    report = objective(model(batch()["input"]), batch())
    assert not report.finite and objective.skipped_steps == 1
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    result = fit(model, al.Objective(al.Task("main", loss=bad_grad_loss), nonfinite="skip"),
                 torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,)), grad_clip=1.0)
    assert result.skipped_steps == 2  # both steps: NaN gradients, update dropped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_page_lists_exactly_these_rows():
    text = DOC.read_text()
    ids = re.findall(r"^\| *([A-Z]\d+) *\|", text, flags=re.MULTILINE)
    assert len(ids) == len(set(ids)) >= 25
    assert set(ids) == set(ROWS)

