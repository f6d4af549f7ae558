"""Exact resume: a run interrupted at any point and restarted ends bit-identical to an uninterrupted one."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss import schedules
from auxloss.train import Callback, Trainer
from auxloss.train.checkpoint import MAGIC, load_checkpoint, save_checkpoint


class Kill(Exception):
    pass


class KillAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, report, batch_idx):
        if trainer.global_step == self.step:
            raise Kill()


def setup(seed=0, own_generator=True):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16), nn.BatchNorm1d(16),
                        nn.ReLU(), nn.Linear(16, 3))
    model = al.attach(net, {"aux": al.Tap("3", al.LinearHead(3))}, example_input=torch.randn(2, 6))
    objective = al.Objective(aux=[al.Task("aux", source="aux", weight=schedules.Linear(0.0, 0.5, 0, 20))])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    gen = torch.Generator().manual_seed(1) if own_generator else None
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen)
    return model, objective, loader


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def train(tmp, kill_step=None, every=None, own_generator=True):
    model, objective, loader = setup(own_generator=own_generator)
    cbs = [KillAt(kill_step)] if kill_step else []
    trainer = Trainer(epochs=4, lr=0.01, lr_schedule="cosine", checkpoint_dir=tmp, checkpoint_every=every,
                      callbacks=cbs, log_dir=tmp / "logs")
    return trainer.fit(model, objective, loader, loader), model


@pytest.mark.parametrize("kill_step, every", [(9, None), (14, 4), (20, 5)])
def test_resume_after_a_crash_is_bit_identical(tmp_path, kill_step, every):
    reference, ref_model = train(tmp_path / "ref")
    with pytest.raises(Kill):
        train(tmp_path / "run", kill_step=kill_step, every=every)
    resumed, model = train(tmp_path / "run", every=every)  # the same command again
    assert torch.equal(flat(model), flat(ref_model))
    assert resumed.best_epoch == reference.best_epoch
    assert [r["val/metric/main"] for r in resumed.history] == [r["val/metric/main"] for r in reference.history]
    assert [r["train/loss"] for r in resumed.history] == [r["train/loss"] for r in reference.history]
    lines = (tmp_path / "run" / "logs" / "epochs.jsonl").read_text().splitlines()
    assert len(lines) == 4  # no epoch logged twice or lost


def test_mid_epoch_resume_with_a_plain_shuffling_loader(tmp_path):
    # No generator of its own: the epoch's shuffle comes from the global RNG, which the checkpoint replays.
    torch.manual_seed(123)
    reference, ref_model = train(tmp_path / "ref", every=4, own_generator=False)
    torch.manual_seed(123)
    with pytest.raises(Kill):
        train(tmp_path / "run", kill_step=14, every=4, own_generator=False)
    resumed, model = train(tmp_path / "run", every=4, own_generator=False)
    assert torch.equal(flat(model), flat(ref_model))
    assert [r["train/loss"] for r in resumed.history] == [r["train/loss"] for r in reference.history]


def test_torn_checkpoint_falls_back_on_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, {"n": 1})
    save_checkpoint(tmp_path, {"n": 2})
    assert load_checkpoint(tmp_path)["n"] == 2
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])  # torn write
    with pytest.warns(RuntimeWarning, match="unusable"):
        assert load_checkpoint(tmp_path)["n"] == 1
    (tmp_path / "last.pt").write_bytes(MAGIC + b"0" * 64 + b"\n" + b"garbage")
    with pytest.warns(RuntimeWarning, match="checksum"):
        assert load_checkpoint(tmp_path)["n"] == 1


def test_checkpoint_from_another_model_is_refused(tmp_path):
    train(tmp_path)
    torch.manual_seed(0)
    other = al.attach(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), {})
    _, objective, loader = setup()
    with pytest.raises(al.AuxLossError, match="does not fit"):
        Trainer(epochs=4, checkpoint_dir=tmp_path).fit(other, objective, loader)
