"""A tiny float64 problem shared by the gradient-aware weighting tests: a 3-layer trunk with two auxiliary heads."""

import torch
from torch import nn

import auxloss as al

AUX = ("aux1", "aux2")
LAMBDA = {"aux1": 0.3, "aux2": 0.5}


def build(weighting, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model = al.attach(net, {"aux1": al.Tap("1", nn.Linear(6, 3)), "aux2": al.Tap("3", nn.Linear(6, 3))}).double()
    objective = al.Objective(
        aux=[al.Task(n, source=n, target="t" + n[-1], weight=LAMBDA[n]) for n in AUX], weighting=weighting
    )
    return model, objective


def batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return {
        "input": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "target": torch.randint(0, 3, (n,), generator=g),
        "t1": torch.randint(0, 3, (n,), generator=g),
        "t2": torch.randint(0, 3, (n,), generator=g),
    }


def reference(model, objective, b):
    """The report of one forward and each task's gradient by separate autograd.grad calls (graph kept)."""
    report = objective(model(b["input"]), b)
    names, params = zip(*model.named_parameters())
    grads = {}
    for task, loss in report.losses.items():
        grads[task] = dict(zip(names, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)))
    return report, grads


def flat(g, names):
    return torch.cat([g[n].flatten() for n in names])
