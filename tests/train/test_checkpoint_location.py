"""Where checkpoints live: a folder, ``file://``, or an fsspec URL (``memory://`` stands in for S3 and the like).

The atomic write and checksum protocol must hold through fsspec, a resume through a URL must stay bit-identical,
and a run's checkpoint folder must be unique per experiment, config, variant and seed.
"""

from __future__ import annotations

import importlib.util
import uuid

import fsspec
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
import auxloss.train.checkpoint as ckpt
from auxloss.errors import AuxLossError
from auxloss.train import Callback, Trainer
from auxloss.train.checkpoint import (
    MAGIC,
    checkpoint_location,
    join_location,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def memory_url():
    """A fresh folder of fsspec's in-process memory filesystem, removed afterwards."""
    root = f"/auxloss-test-{uuid.uuid4().hex}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_locations_keep_urls_and_fold_file_urls_into_paths(tmp_path):
    assert checkpoint_location("memory://bucket/ckpt/") == "memory://bucket/ckpt"
    assert checkpoint_location(f"file://{tmp_path}/ckpt") == tmp_path / "ckpt"
    assert checkpoint_location(str(tmp_path)) == tmp_path
    # Path would fold "s3://b" into "s3:/b"; join keeps the URL whole.
    assert join_location("memory://bucket/ckpt", "exp-abc", "deep", "seed3") == "memory://bucket/ckpt/exp-abc/deep/seed3"
    assert join_location(tmp_path, "exp", "deep", "seed3") == tmp_path / "exp" / "deep" / "seed3"


def test_unknown_or_uninstalled_filesystems_are_clear_errors():
    with pytest.raises(AuxLossError, match="not a folder nor an fsspec URL"):
        checkpoint_location("nosuchfs://bucket/x")
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(AuxLossError, match="s3fs"):
            checkpoint_location("s3://bucket/x")


def test_save_load_and_fallback_through_fsspec(memory_url):
    fs = fsspec.filesystem("memory")
    save_checkpoint(memory_url, {"n": 1})
    save_checkpoint(memory_url, {"n": 2})
    root = memory_url[len("memory://"):]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False)) == ["last.pt", "prev.pt"]
    assert load_checkpoint(memory_url)["n"] == 2
    data = fs.cat_file(f"{root}/last.pt")
    fs.pipe_file(f"{root}/last.pt", data[: len(data) // 2])  # a torn object
    with pytest.warns(RuntimeWarning, match="checksum"):
        assert load_checkpoint(memory_url)["n"] == 1
    fs.pipe_file(f"{root}/last.pt", MAGIC + b"0" * 64 + b"\n" + b"garbage")
    with pytest.warns(RuntimeWarning, match="unusable"):
        assert load_checkpoint(memory_url)["n"] == 1
    remove_checkpoint(memory_url)
    assert load_checkpoint(memory_url) is None
    remove_checkpoint(memory_url)  # already gone: not an error


def test_a_crash_between_the_moves_leaves_the_previous_checkpoint(memory_url, monkeypatch):
    save_checkpoint(memory_url, {"n": 1})

    class Crash(Exception):
        pass

    def crash_at(point):
        if point == "checkpoint-prev":  # last.pt already moved to prev.pt, the new one not yet in place
            raise Crash

    monkeypatch.setattr(ckpt, "fault_point", crash_at)
    with pytest.raises(AuxLossError, match="cannot write a checkpoint"):
        save_checkpoint(memory_url, {"n": 2})
    monkeypatch.undo()
    assert load_checkpoint(memory_url)["n"] == 1
    save_checkpoint(memory_url, {"n": 3})
    assert load_checkpoint(memory_url)["n"] == 3


def test_run_folders_are_unique_per_experiment_config_variant_and_seed(tmp_path):
    from auxloss.experiment.config import parse_config
    from auxloss.experiment.runner import run_checkpoint_dir

    base = {"name": "exp one", "variants": [{"name": "deep", "taps": {}, "tasks": []}]}
    cfg = parse_config(base)
    other_name = parse_config({**base, "name": "exp two"})
    other_config = parse_config({**base, "alpha": 0.01})
    more_seeds = parse_config({**base, "seeds": 9})  # more seeds only add runs: the same folders
    root = "memory://shared/ckpt"
    places = {(i, v, s): run_checkpoint_dir(c, v, s, tmp_path, root)
              for i, c in enumerate((cfg, other_name, other_config)) for v in ("baseline", "deep") for s in (0, 1)}
    assert len(set(places.values())) == len(places) == 12
    for place in places.values():
        assert place.startswith(root + "/")
    assert run_checkpoint_dir(cfg, "deep", 1, tmp_path, root) == run_checkpoint_dir(more_seeds, "deep", 1, None, root)
    assert run_checkpoint_dir(cfg, "deep", 1, tmp_path, root).endswith("/deep/seed1")
    # no shared root: under the output folder, as before
    assert run_checkpoint_dir(cfg, "deep", 1, tmp_path) == tmp_path / "runs" / "deep" / "seed1" / "checkpoint"


# -- a Trainer resuming through a URL ------------------------------------------------------------------------------
class Kill(Exception):
    pass


class KillAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, report, batch_idx):
        if trainer.global_step == self.step:
            raise Kill()


def _fit(checkpoint_dir, kill_step=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    model = al.attach(net, {"aux": al.Tap("1", al.LinearHead(3))}, example_input=torch.randn(2, 6))
    objective = al.Objective(aux=[al.Task("aux", source="aux", weight=0.3)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    trainer = Trainer(epochs=3, lr=0.01, lr_schedule="cosine", checkpoint_dir=checkpoint_dir, checkpoint_every=4,
                      callbacks=[KillAt(kill_step)] if kill_step else [])
    fit = trainer.fit(model, objective, loader, loader)
    return fit, torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def test_a_resume_through_an_fsspec_url_is_bit_identical(memory_url, tmp_path):
    reference, ref_weights = _fit(tmp_path / "local")
    with pytest.raises(Kill):
        _fit(memory_url, kill_step=10)  # mid-epoch 2; the last checkpoint is the one of step 8
    assert load_checkpoint(memory_url)["global_step"] == 8
    resumed, weights = _fit(memory_url)
    assert torch.equal(weights, ref_weights)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in reference.history]
    assert [{k: v for k, v in r.items() if k != "time"} for r in resumed.history] == strip
