"""torch.compile of a model with attached heads, and mixed precision in auxloss's Trainer, on CPU.

The fast tests compile with ``backend="aot_eager"``: Dynamo traces the whole forward in one graph
(``fullgraph=True`` fails on any graph break, so the forward hooks, the captured-feature dict, the ``emit`` stack and
the ``Outputs`` dataclass are all exercised) and AOTAutograd builds the backward graph, without inductor's C++
code generation, which costs 40+ s on this 2-core machine with a cold cache. The same checks with inductor, the
default backend, are marked slow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import auxloss as al
from auxloss.train import Callback, Trainer

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


class Router(nn.Module):
    """A block that contributes its own loss through auxloss.emit (as an MoE router would)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, stride=2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        al.emit("balance", y.mean(dim=(0, 2, 3)).var())
        return y


def build(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Router(8), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 5))
    x = torch.randn(6, 3, 8, 8)
    model = al.attach(net, {"early": al.Tap("1", al.LinearHead(5)),
                            "mid": al.Tap("2", al.MLPHead(3, hidden=(8,)))}, example_input=x[:1])
    objective = al.Objective(aux=[
        al.Task("early", source="early", weight=0.3),
        al.Task("mid", source="mid", target="colour", weight=0.2),
        al.Task.emitted("balance", weight=0.1),
    ])
    batch = {"input": x, "target": torch.randint(0, 5, (6,)), "colour": torch.randint(0, 3, (6,))}
    return model, objective, batch


def run(model, objective, batch):
    for p in model.parameters():
        p.grad = None
    out = model(batch["input"])
    report = objective(out, batch)
    report.total.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    return out, report, grads


def check_compiled_matches_eager(backend: str, atol: float) -> None:
    model, objective, batch = build()
    eager_out, eager_report, eager_grads = run(model, objective, batch)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out, report, grads = run(compiled, objective, batch)
    assert isinstance(out, al.Outputs) and set(out.aux) == {"early", "mid"} and set(out.losses) == {"balance"}
    torch.testing.assert_close(out.main, eager_out.main, atol=atol, rtol=0)
    for name in out.aux:
        torch.testing.assert_close(out.aux[name], eager_out.aux[name], atol=atol, rtol=0)
    torch.testing.assert_close(out.losses["balance"], eager_out.losses["balance"], atol=atol, rtol=0)
    torch.testing.assert_close(report.total, eager_report.total, atol=atol, rtol=0)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=atol, rtol=0, msg=name)
    # the hooks' side effects (captured features, the emit stack) do not make every call recompile
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = compiled(batch["input"] + 1.0)
    assert set(again.aux) == {"early", "mid"} and set(again.losses) == {"balance"}
    # eval mode (a recompile) still gives every output, and the eager model is untouched afterwards
    compiled.eval()
    with torch.no_grad():
        out_eval = compiled(batch["input"])
        model.eval()
        ref = model(batch["input"])
    torch.testing.assert_close(out_eval.aux["mid"], ref.aux["mid"], atol=atol, rtol=0)
    assert model.strip()(batch["input"]).shape == (6, 5)


def test_fullgraph_compile_matches_eager_aot_eager():
    torch._dynamo.reset()
    check_compiled_matches_eager("aot_eager", atol=1e-6)


@pytest.mark.slow
def test_fullgraph_compile_matches_eager_inductor():
    torch._dynamo.reset()
    check_compiled_matches_eager("inductor", atol=1e-5)


def tiny_loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 8, 8, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=16, shuffle=True, generator=g), DataLoader(ds, batch_size=48)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    model = al.attach(net, {"deep": al.Tap("1", al.LinearHead(2))}, example_input=torch.zeros(1, 3, 8, 8))
    return model, al.Objective(aux=[al.Task("deep", source="deep", weight=0.3)])


def test_trainer_compile_trains_one_epoch(monkeypatch):
    """Trainer(compile=True) through torch.compile; the backend is switched to aot_eager to stay fast."""
    torch._dynamo.reset()
    real_compile = torch.compile
    compiled = []

    def fast_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", fast_compile)
    model, objective = tiny_model()
    train, val = tiny_loaders()
    before = model.model[0].weight.detach().clone()
    result = Trainer(epochs=1, lr=1e-2, compile=True, device="cpu", eval_train=False).fit(model, objective, train, val)
    assert compiled == [model]
    assert not torch.equal(before, model.model[0].weight)
    assert 0.0 <= result.best["val/metric/main"] <= 1.0
    assert result.history[0]["train/weight/deep"] == pytest.approx(0.3)


@pytest.mark.slow
def test_trainer_compile_inductor_matches_eager_training():
    torch._dynamo.reset()
    results = []
    for compile_ in (False, True):
        model, objective = tiny_model()
        train, val = tiny_loaders()
        results.append((Trainer(epochs=1, lr=1e-2, compile=compile_, device="cpu", eval_train=False)
                        .fit(model, objective, train, val), model))
    (eager, m_eager), (comp, m_comp) = results
    for (name, a), b in zip(m_eager.named_parameters(), m_comp.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    assert comp.best["val/loss/main"] == pytest.approx(eager.best["val/loss/main"], abs=1e-5)


# -- mixed precision --------------------------------------------------------------------------------------------
class Dtypes(Callback):
    """Records the dtype of the model's main output and the trainer's GradScaler at each training batch."""

    def __init__(self):
        self.seen = []

    def on_before_backward(self, trainer, report):
        self.seen.append((report.total.dtype, trainer.scaler))


def main_output_dtypes(model):
    dtypes = []
    handle = model.model.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    return dtypes, handle


def test_bf16_autocast_on_cpu_trains_with_fixed_weights():
    model, objective = tiny_model()
    train, val = tiny_loaders()
    dtypes, handle = main_output_dtypes(model)
    record = Dtypes()
    result = Trainer(epochs=1, lr=1e-2, amp="bf16", device="cpu", eval_train=False, callbacks=[record]).fit(
        model, objective, train, val)
    handle.remove()
    assert set(dtypes) == {torch.bfloat16}  # the forward ran under CPU autocast (training and evaluation)
    assert [s for _, s in record.seen] == [None] * 3  # bf16 needs no GradScaler
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32
    record_ = result.history[0]
    assert record_["train/weight/deep"] == pytest.approx(0.3)
    for key in ("train/loss", "val/loss/main", "val/loss/deep"):
        assert torch.isfinite(torch.tensor(record_[key])), key
    # the logged total is still exactly L_main + 0.3·L_deep of the bf16 forward
    x, y = val.dataset.tensors
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()
        out = model(x)
        expected = F.cross_entropy(out.main, y) + 0.3 * F.cross_entropy(out.aux["deep"], y)
    assert result.best["val/loss"] == pytest.approx(float(expected), rel=1e-5)


def test_fp16_on_cpu_falls_back_to_float32_without_scaler():
    model, objective = tiny_model()
    train, _ = tiny_loaders()
    dtypes, handle = main_output_dtypes(model)
    record = Dtypes()
    trainer = Trainer(epochs=1, lr=1e-2, amp="fp16", device="cpu", eval_train=False, callbacks=[record])
    trainer.fit(model, objective, train)
    handle.remove()
    assert set(dtypes) == {torch.float32}
    assert record.seen == [(torch.float32, None)] * 3
    assert trainer.scaler is None
    # and it trains exactly like amp=False
    model2, objective2 = tiny_model()
    train2, _ = tiny_loaders()
    Trainer(epochs=1, lr=1e-2, device="cpu", eval_train=False).fit(model2, objective2, train2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# -- the order of attach() and torch.compile ---------------------------------------------------------------------
def test_attach_after_compile_is_refused_with_the_order_to_use():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = torch.compile(net, backend="eager")
    compiled(torch.randn(2, 4))
    for layer in ("1", "_orig_mod.1"):
        with pytest.raises(al.AuxLossError, match=r"compiled with torch.compile before attach\(\).*"
                                                  r"torch.compile\(auxloss.attach\(net, taps\)\)"):
            al.attach(compiled, {"a": al.Tap(layer, al.LinearHead(3))})
    # a compiled submodule is refused for the taps inside it, and only for those
    outer = nn.Sequential(nn.Linear(4, 4), torch.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), backend="eager"))
    with pytest.raises(al.AuxLossError, match=r"tap 'a': its submodule '1' was compiled"):
        al.attach(outer, {"a": al.Tap("1._orig_mod.0", nn.Identity())})
    x = torch.randn(2, 4)
    m = al.attach(outer, {"a": al.Tap("0", nn.Identity())})
    torch.testing.assert_close(m(x).aux["a"], outer[0](x))
    # the plain model inside works, and compiling the AuxModel afterwards matches eager
    eager = al.attach(compiled._orig_mod, {"a": al.Tap("1", nn.Identity())})
    want = eager(x)
    got = torch.compile(eager, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got.aux["a"], torch.relu(net[0](x)))
    torch.testing.assert_close(got.main, want.main)


def test_a_tap_on_a_looped_cell_compiles_in_one_graph_and_matches_eager():
    torch.manual_seed(0)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.Linear(3, 3)

        def forward(self, x):
            for _ in range(3):
                x = torch.tanh(self.cell(x))
            return x

    m = al.attach(Loop(), {"all": al.Tap("cell", al.SequenceHead(2, mode="mean"), call="all"),
                           "two": al.Tap("cell", nn.Identity(), call=-2)}, example_input=torch.randn(1, 3))
    x = torch.randn(4, 3)
    want = m(x)
    got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    for name in ("all", "two"):
        torch.testing.assert_close(got.aux[name], want.aux[name], atol=1e-6, rtol=0)
