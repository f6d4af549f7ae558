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


class _RunsCode:
    """What a planted checkpoint would hold: unpickling it calls a function of the attacker's choice."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if it were ever unpickled


def plant(directory, payload_obj):
    """A checkpoint with a valid header: its SHA-256 recomputed, as anyone can."""
    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save(payload_obj, buffer)
    payload = buffer.getvalue()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "last.pt").write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def test_a_planted_pickle_with_a_valid_checksum_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(Kill):
        train(tmp_path / "run", kill_step=9)
    good = (tmp_path / "run" / "last.pt").read_bytes()
    plant(tmp_path / "run", {"model": _RunsCode(marker)})
    with pytest.raises(al.AuxLossError, match=r"refuses to unpickle.*arbitrary code") as info:
        train(tmp_path / "run")
    assert "open" in str(info.value)  # names the global it refused
    assert not marker.exists()
    # The checkpoint auxloss itself wrote (RNG states included) loads under the same restriction.
    (tmp_path / "run" / "last.pt").write_bytes(good)
    assert load_checkpoint(tmp_path / "run")["global_step"] == 6  # the end of epoch 1


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    import random

    import numpy as np

    from auxloss.train.checkpoint import get_rng_state, set_rng_state

    np.random.seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state, which must come back too
    random.seed(7)
    save_checkpoint(tmp_path, {"rng": get_rng_state()})
    expected = (np.random.standard_normal(3), np.random.randint(0, 2**31, 3), random.random(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path)["rng"])
    again = (np.random.standard_normal(3), np.random.randint(0, 2**31, 3), random.random(), torch.rand(3))
    assert np.array_equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])
