"""Tests for the plain trunk models in ``auxloss.zoo.models``.

The references are independent of the implementation: layer shapes and channel columns are copied from
Table 1 of Szegedy et al. (2015), and parameter and multiply-accumulate counts are computed here by hand
formula rather than read back from the modules.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from auxloss.errors import AuxLossError
from auxloss.zoo.models import (
    MODELS,
    DeepMLP,
    GoogLeNet,
    GoogLeNet32,
    Inception,
    SmallCNN,
    build_model,
    count_parameters,
    example_input,
)

# Table 1 of the paper: layer -> output (channels, height, width) for a 224x224 input.
PAPER_SHAPES: dict[str, tuple[int, int, int]] = {
    "conv1": (64, 112, 112),
    "maxpool1": (64, 56, 56),
    "conv2": (64, 56, 56),
    "conv3": (192, 56, 56),
    "maxpool2": (192, 28, 28),
    "inception3a": (256, 28, 28),
    "inception3b": (480, 28, 28),
    "maxpool3": (480, 14, 14),
    "inception4a": (512, 14, 14),
    "inception4b": (512, 14, 14),
    "inception4c": (512, 14, 14),
    "inception4d": (528, 14, 14),
    "inception4e": (832, 14, 14),
    "maxpool4": (832, 7, 7),
    "inception5a": (832, 7, 7),
    "inception5b": (1024, 7, 7),
    "avgpool": (1024, 1, 1),
}

# Table 1 columns: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
PAPER_INCEPTION: dict[str, tuple[int, int, int, int, int, int]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}

TOP_LEVEL_NAMES = [
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
    "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
    "inception5a", "inception5b", "avgpool", "dropout", "fc",
]  # fmt: skip

# Computed once with the formulas below and pinned, so a silent change to the architecture shows up.
GOOGLENET_PARAMS = 6_998_552


def conv_params(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def inception_params(c_in: int, cols: tuple[int, int, int, int, int, int]) -> int:
    """Parameters of one Inception block with biased convs and real 5x5 kernels, by hand."""
    n1, r3, n3, r5, n5, pp = cols
    return (
        conv_params(c_in, n1, 1)
        + conv_params(c_in, r3, 1) + conv_params(r3, n3, 3)
        + conv_params(c_in, r5, 1) + conv_params(r5, n5, 5)
        + conv_params(c_in, pp, 1)
    )  # fmt: skip


def googlenet_params_by_hand(num_classes: int = 1000) -> int:
    total = conv_params(3, 64, 7) + conv_params(64, 64, 1) + conv_params(64, 192, 3)
    c_in = 192
    for cols in PAPER_INCEPTION.values():
        total += inception_params(c_in, cols)
        c_in = cols[0] + cols[2] + cols[4] + cols[5]
    return total + 1024 * num_classes + num_classes


def record_outputs(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    """Run ``model(x)`` once, capturing the output of each named submodule through a forward hook."""
    modules = dict(model.named_modules())
    outputs: dict[str, Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out)) for n in names
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


# --------------------------------------------------------------------------------------------------
# GoogLeNet (224x224)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def googlenet() -> GoogLeNet:
    torch.manual_seed(0)
    return GoogLeNet().eval()


@pytest.fixture(scope="module")
def googlenet_outputs(googlenet: GoogLeNet) -> dict[str, Tensor]:
    # The one 224x224 forward pass of the file; every shape test reads from it. Returned, not yielded
    # inside no_grad, so grad mode is not left switched off for the tests that run after it.
    with torch.no_grad():
        return record_outputs(googlenet, [*PAPER_SHAPES, "dropout", "fc"], torch.randn(1, 3, 224, 224))


def test_googlenet_top_level_names_are_the_paper_rows(googlenet: GoogLeNet) -> None:
    assert [name for name, _ in googlenet.named_children()] == TOP_LEVEL_NAMES


@pytest.mark.parametrize("layer", list(PAPER_SHAPES))
def test_googlenet_layer_shapes_match_table_1(googlenet_outputs: dict[str, Tensor], layer: str) -> None:
    assert tuple(googlenet_outputs[layer].shape) == (1, *PAPER_SHAPES[layer])


def test_googlenet_head_shapes(googlenet_outputs: dict[str, Tensor]) -> None:
    assert tuple(googlenet_outputs["dropout"].shape) == (1, 1024)
    assert tuple(googlenet_outputs["fc"].shape) == (1, 1000)
    assert torch.isfinite(googlenet_outputs["fc"]).all()


def test_googlenet_activations_are_post_relu(googlenet_outputs: dict[str, Tensor]) -> None:
    # A ReLU after every conv means every conv/inception output is non-negative, and not all zero.
    for name in ("conv1", "conv3", "inception4a", "inception5b"):
        out = googlenet_outputs[name]
        assert out.min() >= 0, name
        assert out.max() > 0, name


def test_googlenet_parameter_count(googlenet: GoogLeNet) -> None:
    n = count_parameters(googlenet)
    assert n == googlenet_params_by_hand() == GOOGLENET_PARAMS
    assert 6.6e6 <= n <= 7.0e6


def test_googlenet_num_classes_changes_only_fc() -> None:
    assert count_parameters(GoogLeNet(num_classes=10)) == googlenet_params_by_hand(num_classes=10)


def test_googlenet_uses_real_5x5_convs(googlenet: GoogLeNet) -> None:
    for name in PAPER_INCEPTION:
        conv = googlenet.get_submodule(f"{name}.branch5x5.conv.conv")
        assert isinstance(conv, nn.Conv2d)
        assert conv.kernel_size == (5, 5), name


def test_googlenet_batch_norm_variant_swaps_bias_for_bn() -> None:
    plain = GoogLeNet()
    bn = GoogLeNet(batch_norm=True)
    # Same tap points in both variants, so head configs carry over.
    assert [n for n, _ in bn.named_children()] == TOP_LEVEL_NAMES
    convs = [m for m in bn.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert n_bn == len(convs) == 57  # 3 stem convs + 9 blocks x 6 convs
    # Each conv's bias (c params) becomes a BatchNorm affine pair (2c): +c per conv.
    conv_channels = sum(c.out_channels for c in convs)
    assert count_parameters(bn) == count_parameters(plain) + conv_channels


def test_inception_block_params_by_hand() -> None:
    cols = PAPER_INCEPTION["inception3a"]
    block = Inception(192, *cols)
    # 64*192+64 + (96*192+96 + 128*96*9+128) + (16*192+16 + 32*16*25+32) + (32*192+32)
    assert count_parameters(block) == inception_params(192, cols) == 163_696
    assert block.out_channels == 256


def test_inception_block_preserves_resolution_and_concatenates() -> None:
    block = Inception(8, 2, 3, 4, 1, 5, 6)
    out = block(torch.randn(2, 8, 9, 7))
    assert out.shape == (2, 2 + 4 + 5 + 6, 9, 7)


def test_inception_rejects_zero_channels() -> None:
    with pytest.raises(AuxLossError, match="ch5x5"):
        Inception(8, 2, 3, 4, 1, 0, 6)


def test_googlenet_rejects_bad_args() -> None:
    with pytest.raises(AuxLossError, match="num_classes"):
        GoogLeNet(num_classes=0)
    with pytest.raises(AuxLossError, match="dropout"):
        GoogLeNet(dropout=1.5)


# --------------------------------------------------------------------------------------------------
# GoogLeNet32
# --------------------------------------------------------------------------------------------------


def test_googlenet32_shapes() -> None:
    model = GoogLeNet32().eval()
    names = ["stem", "inception3a", "inception3b", "inception4a", "inception4d", "inception5b", "fc"]
    with torch.no_grad():
        out = record_outputs(model, names, torch.randn(2, 3, 32, 32))
    assert out["stem"].shape == (2, 192, 32, 32)
    assert out["inception3b"].shape == (2, 480, 32, 32)
    assert out["inception4a"].shape == (2, 512, 16, 16)
    assert out["inception4d"].shape == (2, 528, 16, 16)
    assert out["inception5b"].shape == (2, 1024, 8, 8)
    assert out["fc"].shape == (2, 10)


def test_googlenet32_keeps_inception_names() -> None:
    names = [n for n, _ in GoogLeNet32().named_children()]
    assert names == ["stem", *TOP_LEVEL_NAMES[5:]]


def test_googlenet32_width_scales_channels_and_params() -> None:
    full = GoogLeNet32()
    quarter = GoogLeNet32(width=0.25)
    # Channels scale by width, so conv weights by width^2: about 1/16 of the parameters.
    assert count_parameters(quarter) < count_parameters(full) / 10
    assert quarter.stem.conv.out_channels == 48
    # inception5b at width 1 has 384 + 384 + 128 + 128 = 1024 outputs; a quarter of each column.
    assert quarter.fc.in_features == 96 + 96 + 32 + 32
    with torch.no_grad():
        assert quarter.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_googlenet32_tiny_width_keeps_at_least_one_channel() -> None:
    model = GoogLeNet32(width=0.01)
    # 16 * 0.01 rounds to 0; the 5x5 reduce of inception3a must still have one channel.
    assert model.inception3a.branch5x5.reduce.conv.out_channels == 1
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_googlenet32_rejects_bad_width() -> None:
    for width in (0, -1.0, float("nan")):
        with pytest.raises(AuxLossError, match="width"):
            GoogLeNet32(width=width)


# --------------------------------------------------------------------------------------------------
# SmallCNN
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "spatial"), [(32, (16, 8, 4)), (28, (14, 7, 3))])
def test_small_cnn_shapes(size: int, spatial: tuple[int, int, int]) -> None:
    model = SmallCNN(width=8, in_channels=1).eval()
    with torch.no_grad():
        out = record_outputs(
            model, ["block1", "block2", "block3", "pool", "fc"], torch.randn(2, 1, size, size)
        )
    assert out["block1"].shape == (2, 8, spatial[0], spatial[0])
    assert out["block2"].shape == (2, 16, spatial[1], spatial[1])
    assert out["block3"].shape == (2, 32, spatial[2], spatial[2])
    assert out["pool"].shape == (2, 32, 1, 1)
    assert out["fc"].shape == (2, 10)


def test_small_cnn_compute_budget() -> None:
    # Speed is guarded by a deterministic count of conv multiply-accumulates rather than a wall-clock
    # timing, which would be flaky on a loaded machine.
    model = SmallCNN(width=16).eval()
    macs = 0

    def count(module: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal macs
        assert isinstance(module, nn.Conv2d)
        k = module.kernel_size[0] * module.kernel_size[1]
        macs += out[0].numel() * module.in_channels * k

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    # By hand (pixels x c_out x c_in x 9): first conv of each block at the block's input resolution,
    # the second after its 2x2 pool.
    expected = (
        32 * 32 * 16 * 3 * 9 + 16 * 16 * 16 * 16 * 9
        + 16 * 16 * 32 * 16 * 9 + 8 * 8 * 32 * 32 * 9
        + 8 * 8 * 64 * 32 * 9 + 4 * 4 * 64 * 64 * 9
    )  # fmt: skip
    assert macs == expected == 4_571_136


def test_small_cnn_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = SmallCNN(width=8, dropout=0.5)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_small_cnn_rejects_bad_args() -> None:
    with pytest.raises(AuxLossError, match="width"):
        SmallCNN(width=0)
    with pytest.raises(AuxLossError, match="in_channels"):
        SmallCNN(in_channels=2.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# DeepMLP
# --------------------------------------------------------------------------------------------------


def hidden_output_grad_norms(model: DeepMLP, x: Tensor, y: Tensor) -> list[float]:
    """Norm of d(loss)/d(output of layers.i) for every hidden layer i."""
    outputs: list[Tensor] = []

    def keep(_m: nn.Module, _i: tuple[Tensor, ...], out: Tensor) -> None:
        out.retain_grad()
        outputs.append(out)

    handles = [layer.register_forward_hook(keep) for layer in model.layers]
    nn.functional.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    return [o.grad.norm().item() for o in outputs]  # type: ignore[union-attr]


def test_deep_mlp_layout() -> None:
    model = DeepMLP(20, 3, hidden=16, depth=10)
    names = dict(model.named_modules())
    assert [f"layers.{i}" in names for i in range(10)] == [True] * 10
    assert "layers.10" not in names
    assert isinstance(names["layers.3.linear"], nn.Linear)
    assert isinstance(names["layers.3.act"], nn.Tanh)
    assert model.fc.in_features == 16 and model.fc.out_features == 3
    # 20*16+16 in, 9 x (16*16+16) hidden, 16*3+3 out.
    assert count_parameters(model) == 336 + 9 * 272 + 51


def test_deep_mlp_tapped_layer_output_is_the_activation() -> None:
    model = DeepMLP(5, 2, hidden=7, depth=4, activation="sigmoid")
    out = record_outputs(model, ["layers.2"], torch.randn(3, 5))["layers.2"]
    assert out.shape == (3, 7)
    assert ((out > 0) & (out < 1)).all()


def test_deep_mlp_gradients_vanish_towards_the_input() -> None:
    torch.manual_seed(0)
    model = DeepMLP(20, 3, depth=10, activation="tanh")
    x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
    norms = hidden_output_grad_norms(model, x, y)
    assert len(norms) == 10
    # Measured ~150x; the backpropagated signal shrinks at every tanh layer on the way down.
    assert norms[0] < norms[-1] / 30
    assert all(a < b for a, b in itertools.pairwise(norms))
    first, last = model.layers[0].linear.weight.grad, model.layers[-1].linear.weight.grad
    assert first is not None and last is not None
    assert first.norm() < last.norm() / 5


def test_deep_mlp_batch_norm_keeps_gradients_alive() -> None:
    # Contrast with the test above: with BatchNorm the same net's first layer is not starved, which
    # shows that test measures depth-plus-init, not an artefact of how gradients are read.
    torch.manual_seed(0)
    model = DeepMLP(20, 3, depth=10, activation="tanh", batch_norm=True)
    assert isinstance(model.get_submodule("layers.0.norm"), nn.BatchNorm1d)
    norms = hidden_output_grad_norms(model, torch.randn(256, 20), torch.randint(0, 3, (256,)))
    assert norms[0] > norms[-1] / 3


def test_deep_mlp_sigmoid_vanishes_faster_than_tanh() -> None:
    x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
    ratios = {}
    for act in ("tanh", "sigmoid"):
        torch.manual_seed(0)
        norms = hidden_output_grad_norms(DeepMLP(20, 3, activation=act), x, y)  # type: ignore[arg-type]
        ratios[act] = norms[0] / norms[-1]
    assert ratios["sigmoid"] < ratios["tanh"] / 100


def test_deep_mlp_flattens_images_and_trains() -> None:
    torch.manual_seed(0)
    model = DeepMLP(1 * 4 * 4, 2, hidden=8, depth=8, activation="relu")
    x = torch.randn(6, 1, 4, 4)
    y = torch.randint(0, 2, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.layers[0].linear.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert model(x).shape == (6, 2)
    assert not torch.equal(before, model.layers[0].linear.weight)


def test_deep_mlp_wrong_input_size_is_a_clear_error() -> None:
    model = DeepMLP(10, 2, depth=2)
    with pytest.raises(AuxLossError, match="in_features=12"):
        model(torch.randn(3, 12))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"in_features": 0, "num_classes": 2}, "in_features"),
        ({"in_features": 4, "num_classes": 0}, "num_classes"),
        ({"in_features": 4, "num_classes": 2, "hidden": 0}, "hidden"),
        ({"in_features": 4, "num_classes": 2, "depth": 0}, "depth"),
        ({"in_features": 4, "num_classes": 2, "depth": True}, "depth"),
        ({"in_features": 4, "num_classes": 2, "activation": "gelu"}, "activation"),
    ],
)
def test_deep_mlp_rejects_bad_args(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        DeepMLP(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Helpers and registry
# --------------------------------------------------------------------------------------------------


def test_count_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # 12 + 4 weights/bias, 4 + 4 affine
    assert count_parameters(model) == 24
    model[1].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 20
    shared = nn.Linear(2, 2)
    assert count_parameters(nn.Sequential(shared, shared)) == 6


def test_registry_keys() -> None:
    assert {"googlenet", "googlenet32", "small_cnn", "deep_mlp", "lstm_classifier", "tiny_transformer"} <= set(MODELS)


@pytest.mark.parametrize(
    ("name", "kwargs", "cls", "out_shape"),
    [
        ("googlenet32", {"width": 0.125, "num_classes": 7}, GoogLeNet32, (1, 7)),
        ("small_cnn", {"width": 4, "in_channels": 1}, SmallCNN, (1, 10)),
        ("Small-CNN", {"width": 4}, SmallCNN, (1, 10)),
        ("deep_mlp", {"in_features": 12, "num_classes": 5}, DeepMLP, (1, 5)),
    ],
)
def test_build_model_and_example_input_fit(
    name: str, kwargs: dict[str, object], cls: type, out_shape: tuple[int, ...]
) -> None:
    model = build_model(name, **kwargs)
    assert isinstance(model, cls)
    with torch.no_grad():
        assert model.eval()(example_input(name, **kwargs)).shape == out_shape


def test_example_input_shapes() -> None:
    # googlenet is checked by shape only: building it is covered above and slow-ish.
    assert example_input("googlenet").shape == (1, 3, 224, 224)
    assert example_input("googlenet32").shape == (1, 3, 32, 32)
    assert example_input("small_cnn", in_channels=1).shape == (1, 1, 32, 32)
    assert example_input("deep_mlp", in_features=9, num_classes=2).shape == (1, 9)
    with pytest.raises(AuxLossError, match="in_features"):
        example_input("deep_mlp")


def test_build_model_unknown_name_suggests_close_names() -> None:
    with pytest.raises(AuxLossError) as info:
        build_model("googlenet33")
    message = str(info.value)
    assert "Did you mean" in message and "'googlenet32'" in message
    for name in MODELS:
        assert name in message
    with pytest.raises(AuxLossError, match="Unknown model"):
        example_input("resnet50")


def test_build_model_bad_kwarg_names_accepted_arguments() -> None:
    with pytest.raises(AuxLossError, match="Accepted arguments: num_classes, in_channels, width"):
        build_model("small_cnn", widht=8)
