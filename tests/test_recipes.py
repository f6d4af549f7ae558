"""recipes.deep_supervision: the published weightings, the off switch and the late drop, against hand values."""

import pytest
import torch
from torch import nn

from auxloss import recipes
from auxloss.errors import AuxLossError
from auxloss.heads import LinearHead
from auxloss.schedules import Warmup
from auxloss.zoo.models import DeepMLP

LAYERS = {"aux1": "layers.5", "aux2": "layers.3", "aux3": "layers.1"}  # from the output downwards


def _mlp() -> DeepMLP:
    torch.manual_seed(0)
    return DeepMLP(in_features=6, num_classes=4, hidden=8, depth=8)


def _build(**kwargs):
    return recipes.deep_supervision(_mlp(), LAYERS, 4, head=LinearHead, example_input=torch.randn(1, 6), **kwargs)


@pytest.mark.parametrize(("preset", "expected"), [
    ("googlenet", [0.3, 0.3, 0.3]),       # Szegedy et al. 2015 §5
    ("mmseg", [0.4, 0.4, 0.4]),           # auxiliary_head loss_weight=0.4
    ("torchvision", [0.5, 0.5, 0.5]),     # losses["out"] + 0.5 * losses["aux"]
    ("nnunet", [0.5, 0.25, 0.125]),       # 2^-i, i = 1, 2, 3 below the main output (i = 0)
])
def test_presets_give_the_published_weights(preset, expected):
    _, objective = _build(weights=preset)
    assert objective.weights(step=0, epoch=0) == {"aux1": pytest.approx(expected[0]),
                                                  "aux2": pytest.approx(expected[1]),
                                                  "aux3": pytest.approx(expected[2])}


def test_nnunet_preset_is_nnunets_normalised_weights_relative_to_the_main_output():
    # nnU-Net v2 with 5 outputs: w_i = 2^-i, the coarsest set to 0, divided by the sum; by hand:
    # (1, 1/2, 1/4, 1/8, 0) / (15/8) = (8/15, 4/15, 2/15, 1/15, 0). Relative to the main output (w_0): 1/2, 1/4, 1/8.
    w = [8 / 15, 4 / 15, 2 / 15, 1 / 15]
    assert recipes.deep_supervision_weights("nnunet", 3) == pytest.approx([w[1] / w[0], w[2] / w[0], w[3] / w[0]])


def test_total_loss_is_main_plus_weighted_heads():
    model, objective = _build(weights="nnunet")
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    out = model(x)
    report = objective(out, {"input": x, "target": y})
    ce = nn.functional.cross_entropy
    by_hand = ce(out.main, y) + 0.5 * ce(out.aux["aux1"], y) + 0.25 * ce(out.aux["aux2"], y) \
        + 0.125 * ce(out.aux["aux3"], y)
    assert float(report.total.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-6)


def test_default_stays_googlenets_and_the_old_weight_name_still_works():
    _, objective = _build()
    assert list(objective.weights(step=0, epoch=0).values()) == pytest.approx([0.3] * 3)
    _, objective = _build(weight=0.7)
    assert list(objective.weights(step=0, epoch=0).values()) == pytest.approx([0.7] * 3)
    with pytest.raises(AuxLossError, match="not both"):
        _build(weight=0.7, weights="mmseg")


def test_one_switch_turns_it_off():
    model, objective = _build(weights="mmseg", enabled=False)
    assert objective.aux_tasks == [] and dict(model.taps) == {}
    net = _mlp()
    x = torch.randn(3, 6)
    assert torch.equal(model(x).main, net(x))  # the same seed: the plain network, nothing attached
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in net.parameters())


def test_drop_late_zeroes_the_heads_after_the_fraction():
    _, objective = _build(weights="nnunet", drop_at=0.75, total=200)
    # on until step 150 = 0.75 * 200, off from there
    assert objective.weights(step=149, epoch=0)["aux2"] == pytest.approx(0.25)
    assert objective.weights(step=150, epoch=0) == {"aux1": 0.0, "aux2": 0.0, "aux3": 0.0}
    ramped = recipes.drop_late(0.4, 0.5, 100, ramp=10)
    assert ramped(50) == pytest.approx(0.4) and ramped(55) == pytest.approx(0.2) and ramped(60) == 0.0
    warm = recipes.drop_late(Warmup(1.0, 10), 0.5, 40, unit="step")  # a schedule keeps its shape until the drop
    assert warm(5) == pytest.approx(0.5) and warm(19) == pytest.approx(1.0) and warm(20) == 0.0
    epochs = recipes.drop_late(0.3, 0.8, 10, unit="epoch")
    assert epochs.value(epoch=7) == pytest.approx(0.3) and epochs.value(epoch=8) == 0.0


def test_per_head_weights_and_errors():
    _, objective = _build(weights=[0.1, 0.2, 0.3])
    assert objective.weights(step=0, epoch=0)["aux3"] == pytest.approx(0.3)
    with pytest.raises(AuxLossError, match="one weight per head"):
        _build(weights=[0.1, 0.2])
    with pytest.raises(AuxLossError, match="unknown deep-supervision preset 'mmsegg'"):
        _build(weights="mmsegg")
    with pytest.raises(AuxLossError, match="drop_at needs total"):
        _build(drop_at=0.8)
    with pytest.raises(AuxLossError, match="fraction of training"):
        _build(drop_at=1.5, total=100)
