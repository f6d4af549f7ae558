"""Under DDP every rank must take the same step: for exact, amortized and representation-level gradient-aware weightings
and for DWA."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

KINDS = ("exact", "amortized", "representation", "dwa", "torchjd")


def _worker(rank, world, init_file, out, kind):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import auxloss as al
        from auxloss.train import Trainer
        from auxloss.weighting import DWA, CosineGating, MetaBalance, TorchJD

        torch.manual_seed(0)
        x = torch.randn(64, 8)
        ds = TensorDataset(x, (x[:, 0] > 0).long(), (x[:, 1] > 0).long(), (x[:, 2] > 0).long())
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
        model = al.attach(net, {"a": al.Tap("1", al.LinearHead(2)), "b": al.Tap("3", al.LinearHead(2))},
                          example_input=x[:1])
        weighting = {"exact": lambda: CosineGating(), "amortized": lambda: CosineGating(mode="amortized", every=3),
                     # statistics at the taps, summed over the ranks inside the backward: the same state everywhere
                     "representation": lambda: MetaBalance(mode="representation"),
                     "dwa": lambda: DWA(),
                     # symmetric, on the all-reduced matrix: every rank's aggregator sees the same J
                     "torchjd": lambda: TorchJD("UPGrad")}[kind]()
        objective = al.Objective(aux=[al.Task("a", source="a", target="c1", weight=0.5),
                                      al.Task("b", source="b", target="c2", weight=0.5)],
                                 batch_keys=("input", "target", "c1", "c2"), weighting=weighting)
        loader = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, num_replicas=world, rank=rank, seed=0))
        Trainer(epochs=4, lr=0.05, optimizer="sgd", eval_train=False, device="cpu").fit(model, objective, loader)
        state = {k: v for k, v in objective.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save({"params": torch.cat([p.detach().flatten() for p in model.parameters()]), "state": state},
                   os.path.join(out, f"{kind}-{rank}.pt"))
        dist.barrier()  # no rank leaves while the other still talks to it (gloo would abort it)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_stay_identical(tmp_path, kind):
    if kind == "torchjd":
        pytest.importorskip("torchjd")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), kind), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{kind}-{r}.pt") for r in (0, 1))
    assert torch.equal(a["params"], b["params"])
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key
