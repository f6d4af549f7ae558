"""Taps under ``nn.DataParallel``.

DataParallel copies the model onto each device (``replicate``) and runs one copy per thread
(``parallel_apply``). The copies share the hook objects, so the taps must keep each thread's captures and
emitted losses apart (the per-thread state in :mod:`auxloss.taps`). Without CUDA, and with one GPU, DataParallel
makes no copies and calls the module itself; only that path runs on a CPU machine. The replica tests need two
CUDA devices and are skipped otherwise.
"""

import copy

import pytest
import torch
from torch import nn

import auxloss as al

two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="DataParallel makes replicas only across >= 2 CUDA devices; on a CPU or one GPU it calls the module",
)


class Emitting(nn.Module):
    """A trunk with a tappable ``body`` that also emits a loss from inside its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        al.emit("act", h.pow(2).mean())
        return self.out(h)


def _aux_model() -> al.AuxModel:
    torch.manual_seed(0)
    return al.attach(Emitting(), {"t": al.Tap("body", nn.Linear(8, 2))})


def _by_hand(m: al.AuxModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(main, the tap's head output, the emitted loss), computed from the layers directly."""
    h = m.model.body(x)
    return m.model.out(h), m.heads["t"](h), h.pow(2).mean()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks DataParallel's fallback on a machine without CUDA")
def test_data_parallel_without_cuda_calls_the_aux_model_itself():
    m = _aux_model()
    x = torch.randn(5, 6)
    dp = nn.DataParallel(m)
    assert dp.device_ids == []  # nothing to replicate onto
    out = dp(x)
    assert isinstance(out, al.Outputs)
    with torch.no_grad():
        main, aux, act = _by_hand(m, x)
    torch.testing.assert_close(out.main, main)
    torch.testing.assert_close(out.aux["t"], aux)
    torch.testing.assert_close(out.losses["act"], act)


@two_gpus
def test_each_replica_captures_its_own_chunk_and_gradients_add_up_like_one_device():
    from torch.nn.parallel import parallel_apply, replicate, scatter

    devices = [0, 1]
    m = _aux_model().cuda(0)
    reference = copy.deepcopy(m)  # an AuxModel copy gets hooks of its own
    torch.manual_seed(1)
    x = torch.randn(8, 6, device="cuda:0")
    chunks = scatter(x, devices)
    outs = parallel_apply(replicate(m, devices), [(c,) for c in chunks], devices=devices)

    total = torch.zeros((), device="cuda:0")
    ref_total = torch.zeros((), device="cuda:0")
    for chunk, out in zip(chunks, outs):
        main, aux, act = _by_hand(reference, chunk.to("cuda:0"))
        torch.testing.assert_close(out.main.to("cuda:0"), main)
        torch.testing.assert_close(out.aux["t"].to("cuda:0"), aux)
        torch.testing.assert_close(out.losses["act"].to("cuda:0"), act)
        total = total + (out.main.sum() + out.aux["t"].sum() + out.losses["act"]).to("cuda:0")
        ref_total = ref_total + main.sum() + aux.sum() + act
    # Replication is differentiable: the replicas' gradients reduce onto the original parameters.
    total.backward()
    ref_total.backward()
    for (name, p), q in zip(m.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_gathering_outputs_the_way_data_parallel_does_is_a_clear_error():
    """DataParallel's gather (torch.nn.parallel.gather) rebuilds only tensors, dicts and namedtuples; on Outputs it
    used to return Outputs(main=<map object>, aux={}) silently. The same call on CPU now names the fix."""
    m = _aux_model()
    parts = [m(torch.randn(4, 6)), m(torch.randn(4, 6))]
    with pytest.raises(al.AuxLossError, match="DataParallel .* use DistributedDataParallel"):
        torch.nn.parallel.gather(parts, "cpu")
    with pytest.raises(al.AuxLossError, match="cannot be iterated or unpacked"):
        list(parts[0])


@two_gpus
def test_data_parallel_on_two_gpus_names_the_fix_instead_of_a_wrong_result():
    m = _aux_model().cuda(0)
    x = torch.randn(8, 6, device="cuda:0")
    with pytest.raises(al.AuxLossError, match="use DistributedDataParallel"):
        nn.DataParallel(m, device_ids=[0, 1])(x)
