"""Heads: initial weights depend on the run's seed only, never on when the head object was built."""

import pytest
import torch
from torch import nn

import auxloss as al
from auxloss.sequence import TrinhDecoderHead

HEADS = {
    "linear": lambda: al.LinearHead(3),
    "mlp": lambda: al.MLPHead(3, hidden=(8, 6)),
    "mlp-no-hidden": lambda: al.MLPHead(3, hidden=()),
    "inception": lambda: al.InceptionAuxHead(3, conv_channels=4, hidden=16),
    "dense": lambda: al.DenseHead(3, hidden=4),
    "dense-no-hidden": lambda: al.DenseHead(3, hidden=None),
    "sequence": lambda: al.SequenceHead(3, hidden=5, mode="mean"),
}


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x)))


def _input_of(name):
    # A sequence head reads (N, T, D) tokens; the others a conv map. The trunk's output is (N, 4, 4, 4) either way.
    return (lambda f: f.flatten(2)) if name == "sequence" else None


@pytest.mark.parametrize("name", list(HEADS))
def test_building_a_head_draws_nothing_from_the_global_random_stream(name):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    HEADS[name]()
    assert torch.equal(torch.random.get_rng_state(), state)


def _run(name, build_seed):
    """One 'run': the head is built at some random state, the run seeds, attaches, and takes one SGD step."""
    torch.manual_seed(build_seed)
    torch.rand(build_seed + 1)  # whatever else happened before this run seeded
    head = HEADS[name]()
    torch.manual_seed(0)  # the run's seed
    trunk = Trunk()
    x = torch.randn(3, 2, 8, 8)
    model = al.attach(trunk, {"h": al.Tap("pool", head, select=_input_of(name))}, example_input=x[:1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x).aux["h"]
    out.square().mean().backward()
    opt.step()
    return out.detach(), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(HEADS))
def test_a_head_built_before_seeding_gives_the_same_run_for_the_same_seed(name):
    out_a, state_a = _run(name, build_seed=1)
    out_b, state_b = _run(name, build_seed=2)
    assert torch.equal(out_a, out_b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_trinh_decoder_weights_come_from_its_seed_alone():
    def build(global_seed, seed):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        head = TrinhDecoderHead(3, 5, 4, hidden=6, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), before)  # the global stream is untouched
        return {k: v for k, v in head.state_dict().items() if k != "_extra_state"}

    a, b, other = build(1, seed=7), build(2, seed=7), build(1, seed=8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)  # the seed does choose the weights
