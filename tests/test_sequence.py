"""Sequences and transformers: RNN taps, the Trinh et al. 2018 losses, transformer deep supervision."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import auxloss as al
from auxloss import recipes
from auxloss import schedules as S
from auxloss.sequence import TrinhDecoderHead, TrinhSample, target_replication_loss, trinh_auxiliary
from auxloss.zoo.models import LSTMClassifier, TinyTransformer, build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Tagger(nn.Module):
    """An RNN over (N, T, D) classifying from the last step: the shape of every model here."""

    def __init__(self, cell=nn.LSTM, layers=1, d=3, hidden=8, classes=4, scale=1.0):
        super().__init__()
        self.rnn = cell(d, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, classes)
        self.scale = scale

    def forward(self, x):
        out, _ = self.rnn(x * self.scale)
        return self.fc(out[:, -1])


# -- 1. RNN taps --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_tapping_per_step_and_last_step_of_gru_and_two_layer_lstm(cell):
    net = Tagger(cell, layers=2)
    x = torch.randn(5, 7, 3)
    model = al.attach(net, {
        "per_step": al.Tap("rnn", al.SequenceHead(2, mode="all"), select=0),     # (N, T, 2)
        "last": al.Tap("rnn", al.SequenceHead(4, mode="last"), select=0),        # (N, 4)
        # h_n of the first layer: (1, 0) for an LSTM's (out, (h, c)), 1 for a GRU's (out, h).
        "h_layer0": al.Tap("rnn", nn.Identity(), select=(1, 0, 0) if cell is nn.LSTM else (1, 0)),
    }, example_input=x[:1])
    out = model(x)
    seq, _ = net.rnn(x)
    assert out.aux["per_step"].shape == (5, 7, 2) and out.aux["last"].shape == (5, 4)
    head = model.heads["per_step"].net
    assert torch.allclose(out.aux["per_step"], head(seq))           # the head at every step of the top layer
    assert torch.allclose(out.aux["last"], model.heads["last"].net(seq[:, -1]))
    # The first layer's last state is what a one-layer RNN with layer 0's weights computes.
    first = cell(3, 8, num_layers=1, batch_first=True)
    first.load_state_dict({k: v for k, v in net.rnn.state_dict().items() if k.endswith("_l0")})
    ref_out, _ = first(x)
    assert torch.allclose(out.aux["h_layer0"], ref_out[:, -1], atol=1e-6)
    # Per-step regression targets train through the objective.
    objective = al.Objective(aux=[al.Task("per_step", source="per_step", target="steps", loss="mse")])
    batch = {"input": x, "target": torch.randint(0, 4, (5,)), "steps": torch.randn(5, 7, 2)}
    report = objective(out, batch)
    report.total.backward()
    assert net.rnn.weight_hh_l0.grad.abs().sum() > 0
    assert model.strip() is net


# -- 2. Trinh et al. 2018 -----------------------------------------------------------------------------------------
def test_segment_positions_and_anchor_ranges_by_hand():
    rec = TrinhDecoderHead(2, 8, segment=3, mode="reconstruct")
    pred = TrinhDecoderHead(2, 8, segment=3, mode="predict")
    anchors = torch.tensor([[3], [5], [10]])
    assert rec.segment_positions(anchors).tolist() == [[[0, 1, 2]], [[2, 3, 4]], [[7, 8, 9]]]
    assert pred.segment_positions(anchors).tolist() == [[[3, 4, 5]], [[5, 6, 7]], [[10, 11, 12]]]
    assert rec.anchor_range(10) == (3, 10) and pred.anchor_range(10) == (1, 7)
    for head, length in ((rec, 10), (pred, 10)):
        a = head(torch.zeros(2000, length, 8)).anchors
        lo, hi = head.anchor_range(length)
        assert int(a.min()) == lo and int(a.max()) == hi  # every valid anchor drawn, none outside
    with pytest.raises(al.AuxLossError, match="too short"):
        pred(torch.zeros(1, 3, 8))


@pytest.mark.parametrize("mode", ["reconstruct", "predict"])
def test_decoder_targets_and_teacher_forcing_inputs(mode):
    net = Tagger()
    taps, _ = trinh_auxiliary(net, "rnn", segment=4, mode=mode, anchors=2)
    model = al.attach(net, taps, example_input=torch.zeros(1, 9, 3))
    head = model.heads["trinh"]
    x = torch.randn(3, 9, 3)
    sample = model(x).aux["trinh"]
    assert isinstance(sample, TrinhSample) and sample.anchors.shape == (3, 2)
    seen = {}
    handle = head.decoder.register_forward_hook(lambda m, args, out: seen.update(inp=args[0]))
    prediction, target = head.decode(sample, x)
    handle.remove()
    assert prediction.shape == target.shape == (6, 4, 3)
    for i in range(3):
        for j in range(2):
            a = int(sample.anchors[i, j])
            start = a - 4 if mode == "reconstruct" else a
            row = 2 * i + j
            assert torch.equal(target[row], x[i, start:start + 4])
            assert torch.equal(seen["inp"][row, 0], torch.zeros(3))         # a zero start vector,
            assert torch.equal(seen["inp"][row, 1:], x[i, start:start + 3])  # then the segment shifted by one
    assert torch.equal(head.loss(sample, x), F.mse_loss(prediction, target))


@pytest.mark.parametrize("cell,layers", [(nn.LSTM, 1), (nn.LSTM, 2), (nn.GRU, 1)])
def test_truncation_gradient_reaches_only_the_last_k_inputs_before_the_anchor(cell, layers):
    k = 3
    net = Tagger(cell, layers)
    taps, tasks = trinh_auxiliary(net, "rnn", segment=4, truncate=k, anchors=1)
    model = al.attach(net, taps, example_input=torch.zeros(1, 12, 3))
    x = torch.randn(6, 12, 3, requires_grad=True)
    out = model(x)
    objective = al.Objective(aux=tasks)
    report = objective(out, {"input": x, "target": torch.randint(0, 4, (6,))})
    report.losses["trinh"].backward()  # the auxiliary loss alone
    g = x.grad.abs().sum(dim=-1)
    for i in range(6):
        a = int(out.aux["trinh"].anchors[i, 0])
        assert torch.all(g[i, : max(0, a - k)] == 0)   # exactly zero before the window
        assert torch.all(g[i, max(0, a - k): a] > 0)   # every input of the window gets a gradient
        assert torch.all(g[i, a:] == 0)                # nothing from after the anchor (the RNN is causal)
    # The main RNN's weights learn from the window; the tapped graph gets nothing from the auxiliary loss.
    assert net.rnn.weight_ih_l0.grad.abs().sum() > 0 and net.fc.weight.grad is None


def test_without_truncation_the_gradient_reaches_the_whole_prefix_and_matches_a_long_window():
    net = Tagger()
    x = torch.randn(4, 10, 3)
    grads, losses = [], []
    for truncate in (None, 10):  # a window as long as the sequence is no truncation at all
        torch.manual_seed(1)  # the same decoder weights for both
        taps, _ = trinh_auxiliary(net, "rnn", segment=3, truncate=truncate, seed=5, anchors=2)
        model = al.attach(net, taps, example_input=x[:1])
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        loss = model.heads["trinh"].loss(out.aux["trinh"], xg)
        loss.backward()
        grads.append(xg.grad.clone())
        losses.append(loss.detach())
        anchors = out.aux["trinh"].anchors
        model.strip()
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    g = grads[0].abs().sum(dim=-1)
    for i in range(4):
        a = int(anchors[i].max())
        assert torch.all(g[i, :a] > 0) and torch.all(g[i, a:] == 0)


def test_recomputed_state_must_match_the_tapped_one():
    net = Tagger(scale=2.0)  # the RNN reads 2·x, not the batch input: truncation cannot recompute it
    taps, tasks = trinh_auxiliary(net, "rnn", segment=3, truncate=2)
    model = al.attach(net, taps, example_input=torch.zeros(1, 8, 3))
    x = torch.randn(2, 8, 3)
    with pytest.raises(al.AuxLossError, match="truncate=None"):
        al.Objective(aux=tasks)(model(x), {"input": x, "target": torch.tensor([0, 1])})
    taps, tasks = trinh_auxiliary(net, "rnn", segment=3)  # untruncated: it decodes the tapped state itself
    model = al.attach(model.strip(), taps, example_input=torch.zeros(1, 8, 3))
    al.Objective(aux=tasks)(model(x), {"input": x, "target": torch.tensor([0, 1])}).total.backward()


def test_anchors_are_reproducible_and_resume_exactly_from_the_state_dict():
    def draws(head, n=3):
        head.train()
        return [head(torch.zeros(4, 20, 8)).anchors for _ in range(n)]

    a, b = TrinhDecoderHead(2, 8, 5, seed=3), TrinhDecoderHead(2, 8, 5, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(draws(a), draws(b)))
    assert not torch.equal(draws(TrinhDecoderHead(2, 8, 5, seed=4), 1)[0], draws(TrinhDecoderHead(2, 8, 5), 1)[0])

    net = Tagger(d=2, hidden=8)
    taps, _ = trinh_auxiliary(net, "rnn", segment=5, seed=11)
    model = al.attach(net, taps, example_input=torch.zeros(1, 20, 2))
    model.train()
    for _ in range(4):
        model(torch.zeros(4, 20, 2))
    state = copy.deepcopy(model.state_dict())
    after = [model(torch.zeros(4, 20, 2)).aux["trinh"].anchors for _ in range(3)]

    net2 = Tagger(d=2, hidden=8)
    taps2, _ = trinh_auxiliary(net2, "rnn", segment=5, seed=11)
    resumed = al.attach(net2, taps2, example_input=torch.zeros(1, 20, 2))
    resumed.load_state_dict(state)
    resumed.train()
    again = [resumed(torch.zeros(4, 20, 2)).aux["trinh"].anchors for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(after, again))


def test_trainer_resume_is_bit_identical_with_the_trinh_head(tmp_path):
    from torch.utils.data import DataLoader

    from auxloss.train import Trainer
    from auxloss.zoo.data import DictDataset

    data = DictDataset({"input": torch.randn(48, 10, 3), "target": torch.randint(0, 4, (48,))})

    def fit(epochs, folder):
        torch.manual_seed(0)
        net = LSTMClassifier(3, 4, hidden=8)
        taps, tasks = trinh_auxiliary(net, "rnn", segment=3, truncate=3, seed=7)
        model = al.attach(net, taps, example_input=data.tensors["input"][:1])
        loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        Trainer(epochs=epochs, lr=1e-2, eval_train=False, checkpoint_dir=folder).fit(
            model, al.Objective(aux=tasks), loader, DataLoader(data, batch_size=48))
        return model

    straight = fit(3, tmp_path / "a")
    fit(1, tmp_path / "b")                 # interrupted after one epoch ...
    resumed = fit(3, tmp_path / "b")       # ... and resumed: the head's generator state comes back with it
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        if name.endswith("_extra_state"):
            assert torch.equal(a["generator"], b["generator"])
        else:
            assert torch.equal(a, b), name


def test_eval_anchors_repeat_and_leave_the_training_generator_alone():
    head = TrinhDecoderHead(2, 8, 4, seed=0)
    before = head.generator.get_state()
    head.eval()
    first = head(torch.zeros(6, 12, 8)).anchors
    assert torch.equal(first, head(torch.zeros(6, 12, 8)).anchors)
    assert torch.equal(before, head.generator.get_state())


@pytest.mark.parametrize("loss", ["bce", "cross_entropy"])
def test_other_losses_by_hand(loss):
    net = Tagger(d=4)
    taps, _ = trinh_auxiliary(net, "rnn", segment=3, loss=loss, cell="gru", layers=2, hidden=5)
    model = al.attach(net, taps, example_input=torch.zeros(1, 8, 4))
    x = F.one_hot(torch.randint(0, 4, (3, 8)), 4).float()
    sample = model(x).aux["trinh"]
    head = model.heads["trinh"]
    pred, target = head.decode(sample, x)
    if loss == "bce":
        ref = -(target * F.logsigmoid(pred) + (1 - target) * F.logsigmoid(-pred)).mean()
    else:
        ref = -(target * pred.log_softmax(dim=-1)).sum(dim=-1).mean()
    assert torch.allclose(head.loss(sample, x), ref, atol=1e-6)
    assert isinstance(head.decoder, nn.GRU) and head.decoder.num_layers == 2 and head.decoder.hidden_size == 5


def test_without_teacher_forcing_the_decoder_reads_zeros():
    net = Tagger()
    taps, _ = trinh_auxiliary(net, "rnn", segment=4, teacher_forcing=False)
    model = al.attach(net, taps, example_input=torch.zeros(1, 9, 3))
    head = model.heads["trinh"]
    seen = {}
    head.decoder.register_forward_hook(lambda m, args, out: seen.update(inp=args[0]))
    x = torch.randn(2, 9, 3)
    head.decode(model(x).aux["trinh"], x)
    assert torch.equal(seen["inp"], torch.zeros(2, 4, 3))


def test_trinh_task_trains_and_reports_through_the_objective():
    net = LSTMClassifier(3, 4, hidden=8)
    taps, tasks = trinh_auxiliary(net, "rnn", segment=4, truncate=4, weight=S.Linear(0.0, 1.0, 0, 2))
    model = al.attach(net, taps, example_input=torch.zeros(1, 10, 3))
    objective = al.Objective(aux=tasks)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 10, 3), torch.randint(0, 4, (8,))
    first = None
    for _ in range(30):
        report = objective(model(x), {"input": x, "target": y})
        optimizer.zero_grad()
        report.total.backward()
        optimizer.step()
        objective.advance()
        first = first if first is not None else report.losses["trinh"].item()
    flat = report.as_dict()
    assert flat["weight/trinh"] == 1.0 and "metric/trinh" not in flat and "loss/trinh" in flat
    assert report.losses["trinh"].item() < first  # the decoder learns


def test_bad_input_is_named():
    with pytest.raises(al.AuxLossError, match="mode"):
        TrinhDecoderHead(2, 8, 3, mode="past")
    with pytest.raises(al.AuxLossError, match="rnn="):
        TrinhDecoderHead(2, 8, 3, truncate=2)
    with pytest.raises(al.AuxLossError, match="bidirectional"):
        trinh_auxiliary(nn.Sequential(nn.LSTM(2, 4, batch_first=True, bidirectional=True)), "0", 3)
    with pytest.raises(al.AuxLossError, match="batch_first"):
        trinh_auxiliary(nn.Sequential(nn.GRU(2, 4)), "0", 3)
    with pytest.raises(al.AuxLossError, match="closest"):
        trinh_auxiliary(Tagger(), "rn", 3)
    with pytest.raises(al.AuxLossError, match="nn.LSTM"):
        trinh_auxiliary(Tagger(), "fc", 3)
    net = Tagger()
    taps, tasks = trinh_auxiliary(net, "rnn", 3)
    model = al.attach(net, taps, example_input=torch.zeros(1, 6, 3))
    x = torch.randn(2, 6, 3)
    with pytest.raises(al.AuxLossError, match="target='input'"):
        al.Objective(aux=[al.Task("t", source="trinh", target="target", loss=tasks[0].loss, metric=None)])(
            model(x), {"input": x, "target": torch.tensor([0, 1])})
    with pytest.raises(al.AuxLossError, match="select=0"):
        TrinhDecoderHead(3, 8, 2)((torch.zeros(1, 5, 8), None))


def test_target_replication_by_hand():
    pred = torch.randn(2, 3, 4)
    target = torch.tensor([1, 3])
    ref = sum(F.cross_entropy(pred[:, t], target) for t in range(3)) / 3
    assert torch.allclose(target_replication_loss(pred, target), ref)
    with pytest.raises(al.AuxLossError, match="mode='all'"):
        target_replication_loss(pred[:, 0], target)


def test_lstm_classifier_from_the_registry():
    model = build_model("lstm_classifier", input_size=5, num_classes=3, cell="gru", layers=2)
    assert model(torch.randn(2, 7, 5)).shape == (2, 3) and isinstance(model.rnn, nn.GRU)
    with pytest.raises(al.AuxLossError, match="sequence"):
        model(torch.randn(2, 1, 7, 5))


# -- 3. Transformers ----------------------------------------------------------------------------------------------
def test_tiny_transformer_blocks_feed_cls_and_mean_token_heads():
    net = TinyTransformer(6, image_size=16, patch_size=4, dim=16, depth=3, heads=2)
    x = torch.randn(3, 1, 16, 16)
    model = al.attach(net, {
        "cls1": al.Tap("blocks.1", al.LinearHead(6, pool="cls")),
        "mean0": al.Tap("blocks.0", al.LinearHead(6, pool="mean_tokens")),
        "tokens": al.Tap("blocks.2", nn.Identity()),
    }, example_input=x[:1])
    model.eval()
    out = model(x)
    assert out.aux["tokens"].shape == (3, 1 + 16, 16)   # class token + 4x4 patches
    # Recompute the blocks by hand.
    h = torch.cat([net.cls_token.expand(3, -1, -1), net.embed(x).flatten(2).transpose(1, 2)], 1) + net.pos_embed
    h0 = net.blocks[0](h)
    h1 = net.blocks[1](h0)
    assert torch.allclose(out.aux["cls1"], model.heads["cls1"].fc(h1[:, 0]), atol=1e-5)
    assert torch.allclose(out.aux["mean0"], model.heads["mean0"].fc(h0.mean(dim=1)), atol=1e-5)
    assert torch.allclose(out.main, net.fc(net.norm(net.blocks[2](h1)[:, 0])), atol=1e-5)


def test_tiny_transformer_on_tokens():
    net = build_model("tiny_transformer", num_classes=2, vocab_size=11, max_len=9, dim=8, depth=2, heads=2)
    ids = torch.randint(0, 11, (4, 9))
    assert net(ids).shape == (4, 2)
    with pytest.raises(al.AuxLossError, match="positions"):
        net(torch.randint(0, 11, (4, 10)))


class _TimmBlock(nn.Module):
    """A timm ViT-style block: x + attn(norm(x)), x + mlp(norm(x)); returns a tensor."""

    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _HFLayer(_TimmBlock):
    """A Hugging Face-style layer: returns a tuple (hidden_states, attentions)."""

    def forward(self, x):
        return (super().forward(x), None)


class _Encoder(nn.Module):
    def __init__(self, d, n, hf):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        if hf:
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(_HFLayer(d) for _ in range(n))
        else:
            self.blocks = nn.ModuleList(_TimmBlock(d) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        for block in (self.encoder.layer if hasattr(self, "encoder") else self.blocks):
            h = block(h)
            h = h[0] if isinstance(h, tuple) else h
        return self.head(h[:, 0])


@pytest.mark.parametrize("hf", [False, True])
def test_transformer_deep_supervision_on_timm_and_hf_style_block_lists(hf):
    net = _Encoder(8, 3, hf)
    x = torch.randn(4, 6, 5)
    names = ["encoder.layer.0", "encoder.layer.1"] if hf else ["blocks.0", "blocks.1"]
    weights = [S.ProgressiveDrop(0.5, layer=i + 1, n_layers=3, total=30) for i in range(2)]
    model, objective = recipes.transformer_deep_supervision(
        net, names, 3, token="mean", weight=weights, select=0 if hf else None, example_input=x[:1])
    expected = [n.replace(".", "_") for n in names]
    assert list(model.taps) == expected and [t.name for t in objective.aux_tasks] == expected
    assert all(model.heads[n].pool == "mean_tokens" for n in expected)
    report = objective(model(x), {"input": x, "target": torch.randint(0, 3, (4,))})
    assert set(report.losses) == {"main", *expected}
    report.total.backward()
    # The lower block's loss goes first: at step 5 both are on, at 5 only the top one, at 10 neither.
    assert objective.weights(step=4) == {expected[0]: 0.5, expected[1]: 0.5}
    assert objective.weights(step=5) == {expected[0]: 0.0, expected[1]: 0.5}
    assert objective.weights(step=10) == {expected[0]: 0.0, expected[1]: 0.0}
    assert model.strip() is net


def test_transformer_deep_supervision_cls_heads_and_errors():
    net = TinyTransformer(4, image_size=8, patch_size=4, dim=8, depth=2, heads=2)
    x = torch.randn(2, 1, 8, 8)
    model, objective = recipes.transformer_deep_supervision(net, {"early": "blocks.0"}, 4, example_input=x[:1])
    assert model.heads["early"].pool == "cls" and objective.aux_tasks[0].schedule == S.Constant(0.3)
    with pytest.raises(al.AuxLossError, match="token"):
        recipes.transformer_deep_supervision(net, ["blocks.0"], 4, token="first")
    with pytest.raises(al.AuxLossError, match="one weight per block"):
        recipes.transformer_deep_supervision(TinyTransformer(4, image_size=8, patch_size=4, dim=8, depth=2, heads=2),
                                             ["blocks.0", "blocks.1"], 4, weight=[0.1])


# -- 4. The sequences demo and its config -------------------------------------------------------------------------
def test_sequences_demo_builds_every_variant_from_its_config():
    pytest.importorskip("sklearn")
    from auxloss.experiment.build import build_run
    from auxloss.experiment.demos import demo_config
    from auxloss.sequence import TrinhDecoderHead

    cfg = demo_config("sequences", quick=True)
    assert cfg.seeds >= 3 and demo_config("sequences").seeds >= 5
    for variant in cfg.variant_names:
        built = build_run(cfg, variant, seed=1)
        assert built.data["train"].tensors["input"].shape == (cfg.data.n_train, 64, 1)  # 8x8 pixels, one per step
        batch = next(iter(built.loaders["train"]))
        report = built.objective(built.model(batch["input"]), batch)
        report.total.backward()
        if variant in ("aux-task", "curriculum"):
            head = built.model.heads["trinh"]
            assert isinstance(head, TrinhDecoderHead) and head.truncate == 16 and head.seed == 1
            assert set(report.losses) == {"main", "trinh"} and "trinh" not in report.metrics
        if variant == "deep-supervision":
            assert report.losses["replicated"].item() > 0  # target replication, a 'module:function' loss
    assert built.model.heads["replicated"].mode == "all"
