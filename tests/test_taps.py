import pytest
import torch
from torch import nn

import auxloss as al


def iter_hooks(model: nn.Module):
    """(module name, number of forward hooks) for every module that has any; for checking ``strip()``."""
    for name, module in model.named_modules():
        n = len(module._forward_hooks) + len(module._forward_pre_hooks)
        if n:
            yield name, n


class Net(nn.Module):
    """A model of a user's own, with a branch that never runs (to check the never-fires error)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.ReLU())
        self.unused = nn.Linear(3, 3)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(4, 3, 16, 16)


def test_heads_infer_their_input_sizes_and_outputs_are_explicit_in_both_modes(x):
    net = Net()
    m = al.attach(
        net,
        {"a": al.Tap("layer1", al.LinearHead(7)), "b": ("layer2", al.InceptionAuxHead(3))},
        example_input=x[:1],
    )
    # layer1 has 16 channels and layer2 24: nobody told the heads.
    assert m.heads["a"].fc.weight.shape == (7, 16)
    assert m.heads["b"].conv.weight.shape == (128, 24, 1, 1)
    for mode in (True, False):
        m.train(mode)
        out = m(x)
        assert isinstance(out, al.Outputs)
        assert out.main.shape == (4, 5)
        assert out.aux["a"].shape == (4, 7) and out.aux["b"].shape == (4, 3)


def test_heads_are_submodules_seen_by_state_dict_and_to(x):
    m = al.attach(Net(), {"a": al.Tap("layer1", al.LinearHead(7))}, example_input=x[:1])
    keys = m.state_dict().keys()
    assert "heads.a.fc.weight" in keys and "model.fc.weight" in keys
    m = m.to(torch.float64)
    assert m.heads["a"].fc.weight.dtype == torch.float64
    assert m(x.double()).aux["a"].dtype == torch.float64
    # every parameter is reachable through .parameters(), so an optimizer built afterwards trains the heads
    ids = {id(p) for p in m.parameters()}
    assert all(id(p) in ids for p in m.heads.parameters())


def test_tap_reads_the_same_tensor_as_the_layer(x):
    net = Net()
    seen = {}
    net.layer1.register_forward_hook(lambda mod, a, out: seen.setdefault("layer1", out))
    probe = nn.Identity()
    m = al.attach(net, {"p": al.Tap("layer1", probe)})
    out = m(x)
    assert torch.equal(out.aux["p"], seen["layer1"])


def test_strip_gives_back_the_original_model_bit_identical_with_no_hook_left(x):
    torch.manual_seed(1)
    net = Net().eval()
    before = net(x)
    hooks_before = list(iter_hooks(net))
    m = al.attach(net, {"a": al.Tap("layer1", al.LinearHead(7)), "b": al.Tap("layer1", al.MLPHead(2))},
                  example_input=x[:1])
    assert len(net.layer1._forward_hooks) == 1  # one hook serves both taps on the layer
    plain = m.strip()
    assert plain is net
    assert list(iter_hooks(plain)) == hooks_before == []
    assert all(len(mod._forward_hooks) == 0 for mod in plain.modules())
    assert torch.equal(plain(x), before)
    with pytest.raises(al.AuxLossError, match="stripped"):
        m(x)


def test_strip_keeps_a_users_own_hooks(x):
    net = Net()
    calls = []
    net.fc.register_forward_hook(lambda *a: calls.append(1))
    m = al.attach(net, {"a": al.Tap("fc", nn.Identity())})
    m.strip()
    assert len(net.fc._forward_hooks) == 1
    net(x)
    assert calls == [1]


def test_lstm_tuple_output_tapped_with_selectors():
    torch.manual_seed(0)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(5, 12, num_layers=2, batch_first=True)
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out[:, -1])

    x = torch.randn(2, 9, 5)
    m = al.attach(
        Seq(),
        {
            "steps": al.Tap("rnn", al.SequenceHead(4, mode="all"), select=0),
            "h_last_layer": al.Tap("rnn", nn.Identity(), select=(1, 0)),
            "fn": al.Tap("rnn", nn.Identity(), select=lambda o: o[1][1][-1]),
        },
        example_input=x[:1],
    )
    out = m(x)
    assert out.aux["steps"].shape == (2, 9, 4)
    assert out.aux["h_last_layer"].shape == (2, 2, 12)  # (num_layers, N, H)
    assert out.aux["fn"].shape == (2, 12)
    _, (h, c) = m.model.rnn(x)
    assert torch.allclose(out.aux["h_last_layer"], h)
    assert torch.allclose(out.aux["fn"], c[-1])


def test_detached_tap_keeps_head_gradient_out_of_the_trunk(x):
    net = Net()
    m = al.attach(net, {"probe": al.Tap("layer1", al.LinearHead(2), detach=True)}, example_input=x[:1])
    m(x).aux["probe"].sum().backward()
    assert net.layer1[0].weight.grad is None
    assert m.heads["probe"].fc.weight.grad is not None


def test_unknown_layer_lists_the_closest_names():
    with pytest.raises(al.AuxLossError) as err:
        al.attach(Net(), {"a": al.Tap("layer3", al.LinearHead(2))})
    msg = str(err.value)
    assert "layer3" in msg and "layer1" in msg and "layer2" in msg and "list_layers" in msg


def test_tap_on_a_module_that_never_runs_is_named(x):
    with pytest.raises(al.AuxLossError, match="'unused' never ran"):
        al.attach(Net(), {"a": al.Tap("unused", al.LinearHead(2))}, example_input=x[:1])


def test_bad_tap_names_and_specs_are_refused():
    with pytest.raises(al.AuxLossError, match="not usable"):
        al.attach(Net(), {"main": al.Tap("layer1", nn.Identity())})
    with pytest.raises(al.AuxLossError, match="must be a Tap"):
        al.attach(Net(), {"a": "layer1"})
    with pytest.raises(al.AuxLossError, match="head must be an nn.Module"):
        al.attach(Net(), {"a": al.Tap("layer1", lambda t: t)})
    with pytest.raises(al.AuxLossError, match="already has heads"):
        al.attach(al.attach(Net(), {"a": al.Tap("layer1", nn.Identity())}), {})


def test_selector_error_describes_the_output():
    lstm = nn.Sequential(nn.LSTM(3, 4, batch_first=True))
    m = al.attach(lstm, {"a": al.Tap("0", nn.Identity(), select=5)})
    with pytest.raises(al.AuxLossError, match=r"cannot pick 5 .*tuple.*Tensor\(1, 2, 4\)"):
        m(torch.randn(1, 2, 3))


def test_list_layers_reports_output_shapes_in_call_order(x):
    infos = al.list_layers(Net(), x[:1])
    names = [i.name for i in infos]
    assert names.index("stem") < names.index("layer1") < names.index("layer2") < names.index("fc")
    assert "unused" not in names  # only layers that ran can be tapped
    by_name = {i.name: i for i in infos}
    assert by_name["layer1"].output == "Tensor(1, 16, 8, 8)"
    assert by_name["layer2"].output == "Tensor(1, 24, 4, 4)"
    assert by_name["fc"].params == 24 * 5 + 5
    leaves = {i.name for i in al.list_layers(Net(), x[:1], leaves=True)}
    assert "layer1" not in leaves and "layer1.0" in leaves


def test_list_layers_restores_training_mode(x):
    net = Net().train()
    al.list_layers(net, x[:1])
    assert all(m.training for m in net.modules())


@pytest.mark.integration
def test_torchvision_resnet18_if_installed():
    tv = pytest.importorskip("torchvision", reason="torchvision is an optional extra (auxloss[vision])")
    net = tv.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    m = al.attach(net, {"l3": al.Tap("layer3", al.LinearHead(10))}, example_input=x[:1])
    assert m.heads["l3"].fc.weight.shape == (10, 256)
    assert m(x).aux["l3"].shape == (2, 10)


def test_deepcopy_gives_an_independent_working_model(x):
    import copy

    m = al.attach(Net(), {"a": al.Tap("layer1", al.LinearHead(7))}, example_input=x[:1])
    twin = copy.deepcopy(m)
    out, out_twin = m(x), twin(x)  # the copy's hooks feed the copy's heads
    assert torch.equal(out.aux["a"], out_twin.aux["a"])
    with torch.no_grad():
        twin.model.layer1[0].weight.add_(1.0)
    assert not torch.equal(m(x).aux["a"], twin(x).aux["a"])
    twin.strip()
    assert len(twin.model.layer1._forward_hooks) == 0 and len(m.model.layer1._forward_hooks) == 1
    assert m(x).aux["a"].shape == (4, 7)


# -- captures and emitted losses belong to one forward: threads and nested models never mix them ---------------
class Gated(nn.Module):
    """A block that emits a loss and waits for a second thread twice: once before it runs (both forwards have
    started) and once after its tapped layer ran (both have captured), so two forwards interleave the same way
    on every run, with no timing involved."""

    def __init__(self, barrier) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.barrier = barrier

    def forward(self, x):
        self.barrier.wait()
        y = self.lin(x)
        al.emit("e", y.sum())
        self.barrier.wait()
        return 2 * y


def _in_threads(*jobs):
    """Run each job in its own thread; return their results, re-raising any thread's error."""
    import threading

    results, errors = [None] * len(jobs), []

    def work(i, job):
        try:
            results[i] = job()
        except BaseException as exc:  # noqa: BLE001 -- handed back to the test below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("shared", [True, False], ids=["one-model", "two-models"])
def test_two_threads_running_at_once_never_mix_captures_or_emitted_losses(shared):
    import threading

    torch.manual_seed(0)
    barrier = threading.Barrier(2, timeout=60)  # the timeout only turns a deadlock into an error
    net = Gated(barrier)
    head = nn.Linear(4, 3)
    models = [al.attach(net, {"t": al.Tap("lin", head)})]
    if not shared:
        net2 = Gated(barrier)
        net2.load_state_dict(net.state_dict())
        models.append(al.attach(net2, {"t": al.Tap("lin", head)}))
    xs = [torch.randn(5, 4), torch.randn(5, 4) + 10.0]
    outs = _in_threads(*(lambda i=i: models[i % len(models)](xs[i]) for i in range(2)))
    with torch.no_grad():
        for x, out in zip(xs, outs):
            feature = net.lin(x)  # the hand reference, single-threaded
            torch.testing.assert_close(out.aux["t"], head(feature))
            torch.testing.assert_close(out.losses["e"], feature.sum())
            torch.testing.assert_close(out.main, 2 * feature)


def test_emit_from_a_thread_without_a_forward_does_nothing_and_reaches_no_other_thread():
    import threading

    torch.manual_seed(0)
    barrier = threading.Barrier(2, timeout=60)
    m = al.attach(Gated(barrier), {"t": al.Tap("lin", nn.Identity())})
    x = torch.randn(3, 4)

    def stray():
        barrier.wait()  # the model's forward has started in the other thread
        al.emit("e", torch.tensor(1000.0))
        al.emit("stray", torch.tensor(1.0))
        barrier.wait()

    out, _ = _in_threads(lambda: m(x), stray)
    assert set(out.losses) == {"e"}
    torch.testing.assert_close(out.losses["e"], m.model.lin(x).sum())


def test_nested_aux_models_each_get_their_own_captures_and_the_inner_one_the_emitted_loss():
    torch.manual_seed(0)

    class Emitter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            al.emit("inner_loss", y.square().mean())
            return y

    inner_head, outer_head = nn.Linear(4, 2), nn.Linear(4, 6)
    inner = al.attach(Emitter(), {"i": al.Tap("lin", inner_head)})

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.post = nn.Linear(4, 5)

        def forward(self, x):
            self.seen = self.inner(x)
            return self.post(torch.relu(self.seen.main))

    outer_net = Outer()
    # the outer model taps the very layer the inner one taps: two hooks on one module, each with its own captures
    outer = al.attach(outer_net, {"o": al.Tap("inner.model.lin", outer_head), "p": al.Tap("post", nn.Identity())})
    x = torch.randn(3, 4)
    out = outer(x)
    with torch.no_grad():
        feature = inner.model.lin(x)
        torch.testing.assert_close(outer_net.seen.aux["i"], inner_head(feature))
        torch.testing.assert_close(outer_net.seen.losses["inner_loss"], feature.square().mean())
        torch.testing.assert_close(out.aux["o"], outer_head(feature))
        torch.testing.assert_close(out.aux["p"], outer_net.post(torch.relu(feature)))
    assert out.losses == {}  # emitted losses go to the innermost running AuxModel only


def test_emit_outside_any_forward_is_a_no_op_and_the_wrapped_model_alone_keeps_nothing(x):
    m = al.attach(Net(), {"a": al.Tap("layer1", nn.Identity())})
    al.emit("orphan", torch.tensor(1.0))  # no forward running: nothing to collect it, and no error
    m.model(x + 1.0)  # the plain model called directly: the hook keeps nothing, so the next forward sees one call
    out = m(x)
    assert out.losses == {}
    torch.testing.assert_close(out.aux["a"], m.model.layer1(m.model.stem(x)))


def test_a_pickled_or_copied_model_starts_with_captures_of_its_own(x):
    import io

    m = al.attach(Net(), {"a": al.Tap("layer1", al.LinearHead(7))}, example_input=x[:1])
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)  # our own bytes, written just above
    torch.testing.assert_close(back(x).aux["a"], m(x).aux["a"])


# -- a layer that runs more than once per forward ----------------------------------------------------------------
class Loop(nn.Module):
    """An RNN-like cell called in a loop: the tapped layer runs ``steps`` times per forward."""

    def __init__(self, steps: int = 4) -> None:
        super().__init__()
        self.cell = nn.Linear(3, 3)
        self.steps = steps

    def forward(self, x):
        for _ in range(self.steps):
            x = torch.tanh(self.cell(x))
        return x

    def cell_outputs(self, x):
        """The hand reference: every call's output of ``cell``, in order."""
        outs = []
        for _ in range(self.steps):
            outs.append(self.cell(x))
            x = torch.tanh(outs[-1])
        return outs


def test_a_layer_that_runs_more_than_once_is_an_error_until_the_tap_says_which_call():
    torch.manual_seed(0)
    x = torch.randn(2, 3)
    with pytest.raises(al.AuxLossError, match=r"layer 'cell' ran 4 times in one forward pass.*call='last'"):
        al.attach(Loop(), {"c": al.Tap("cell", nn.Identity())}, example_input=x)
    once = al.attach(Loop(steps=1), {"c": al.Tap("cell", nn.Identity())})  # one call: no choice to make
    torch.testing.assert_close(once(x).aux["c"], once.model.cell(x))


@pytest.mark.parametrize("call, pick", [
    ("first", lambda outs: outs[0]),
    ("last", lambda outs: outs[-1]),
    (0, lambda outs: outs[0]),
    (2, lambda outs: outs[2]),
    (-2, lambda outs: outs[-2]),
    ("all", lambda outs: torch.stack(outs, dim=1)),
])
def test_tap_call_picks_that_call_or_stacks_all_of_them_along_dim_1(call, pick):
    torch.manual_seed(0)
    net = Loop()
    m = al.attach(net, {"c": al.Tap("cell", nn.Identity(), call=call)})
    x = torch.randn(2, 3)
    out = m(x).aux["c"]
    ref = pick(net.cell_outputs(x))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    if call == "all":
        assert out.shape == (2, 4, 3)
    # the gradient reaches the cell through the chosen call(s) only, as the hand reference's does
    (w,) = torch.autograd.grad(out.square().sum(), net.cell.weight)
    (w_ref,) = torch.autograd.grad(pick(net.cell_outputs(x)).square().sum(), net.cell.weight)
    torch.testing.assert_close(w, w_ref)


def test_tap_call_out_of_range_or_malformed_is_named():
    x = torch.randn(2, 3)
    for call in (4, -5):
        with pytest.raises(al.AuxLossError, match=rf"call={call} asks for a call of layer 'cell'.*ran 4 times"):
            al.attach(Loop(), {"c": al.Tap("cell", nn.Identity(), call=call)}, example_input=x)
    for bad in ("middle", True, 1.5):
        with pytest.raises(al.AuxLossError, match="call must be 'first', 'last', 'all'"):
            al.Tap("cell", nn.Identity(), call=bad)


def test_call_all_on_outputs_of_different_shapes_is_named():
    class Pyramid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.MaxPool1d(2)

        def forward(self, x):
            return self.pool(self.pool(x))

    with pytest.raises(al.AuxLossError, match=r"cannot stack .* 2 calls, whose shapes differ"):
        al.attach(Pyramid(), {"p": al.Tap("pool", nn.Identity(), call="all")}, example_input=torch.randn(1, 2, 8))

def test_a_plain_checkpoint_loads_into_the_trunk_and_reports_the_heads_missing(x):
    # pytorch/vision#3648: pretrained weights have no aux heads. Loading them must fill the trunk and list the
    # heads as missing, not raise (strict=True) nor silently load nothing (strict=False).
    torch.manual_seed(1)
    source = Net()
    plain = {k: v.clone() for k, v in source.state_dict().items()}
    torch.manual_seed(2)
    model = al.attach(Net(), {"a": al.Tap("layer1", al.LinearHead(5))}, example_input=x[:1])
    head_before = model.heads["a"].fc.weight.detach().clone()
    for strict in (True, False):
        result = model.load_state_dict(plain, strict=strict)
        assert result.missing_keys == ["heads.a.fc.weight", "heads.a.fc.bias"] and result.unexpected_keys == []
        for name, value in plain.items():
            assert torch.equal(model.model.state_dict()[name], value)
        assert torch.equal(model.heads["a"].fc.weight, head_before)
    torch.testing.assert_close(model(x).main, source(x), rtol=0, atol=0)
    # the trunk's keys are still checked: a wrong shape raises as for the plain model, and a missing trunk key
    # is reported under its AuxModel name
    with pytest.raises(RuntimeError, match="size mismatch for fc.weight"):
        model.load_state_dict({**plain, "fc.weight": torch.zeros(3, 24)})
    partial = {k: v for k, v in plain.items() if k != "fc.bias"}
    assert "model.fc.bias" in model.load_state_dict(partial, strict=False).missing_keys
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "fc.bias"'):
        model.load_state_dict(partial)


def test_an_aux_model_checkpoint_round_trips_and_the_stripped_one_loads_strictly(x):
    torch.manual_seed(3)
    model = al.attach(Net(), {"a": al.Tap("layer1", al.LinearHead(5))}, example_input=x[:1])
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(4)
    other = al.attach(Net(), {"a": al.Tap("layer1", al.LinearHead(5))}, example_input=x[:1])
    result = other.load_state_dict(saved)
    assert result.missing_keys == [] and result.unexpected_keys == []
    out, ref = other(x), model(x)
    assert torch.equal(out.main, ref.main) and torch.equal(out.aux["a"], ref.aux["a"])
    fresh = Net()
    fresh.load_state_dict(model.strip().state_dict(), strict=True)
    assert torch.equal(fresh(x), ref.main)
