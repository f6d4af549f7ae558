"""Inception v3's auxiliary classifier, attached by auxloss, against torchvision's own wiring of it.

torchvision's ``inception_v3`` runs ``AuxLogits`` on the output of ``Mixed_6e`` in training mode. auxloss builds
the trunk without it (``aux_logits=False``) and attaches torchvision's ``InceptionAux`` there with the same weights.
The auxiliary weight is 0.4: torchvision's reference training scripts do not combine the two outputs (the
published weights were ported), and 0.4 is what PyTorch's own "Finetuning Torchvision Models" tutorial uses
(``loss = loss1 + 0.4 * loss2``). As for GoogLeNet, dropout is 0 because the head runs after the trunk's forward
in auxloss and in the middle of it in torchvision.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _real import assert_grads_close, require

import auxloss as al

pytestmark = pytest.mark.integration

NUM_CLASSES = 10
AUX_WEIGHT = 0.4
# AuxLogits pools 5x5/3 and then convolves 5x5 without padding, so it needs Mixed_6e's 17x17 map: 299 pixels.
SIZE = 299


@pytest.fixture(scope="module")
def pair():
    tv = require("torchvision")
    from torchvision.models.inception import InceptionAux

    torch.manual_seed(0)
    reference = tv.models.inception_v3(weights=None, aux_logits=True, init_weights=True, num_classes=NUM_CLASSES,
                                       dropout=0.0)
    trunk = tv.models.inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=NUM_CLASSES,
                                   dropout=0.0)
    trunk.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("AuxLogits.")})
    head = InceptionAux(768, NUM_CLASSES)
    head.load_state_dict(reference.AuxLogits.state_dict())
    return reference.double(), trunk.double(), head.double()


def _batch():
    g = torch.Generator().manual_seed(2)
    # two samples: AuxLogits' last BatchNorm sees a 1x1 map, and batch statistics need more than one value
    return torch.randn(2, 3, SIZE, SIZE, generator=g, dtype=torch.float64), torch.tensor([4, 9])


def test_training_loss_and_every_gradient_equal_torchvisions(pair):
    reference, trunk, head = copy.deepcopy(pair)
    x, y = _batch()
    reference.train()
    out = reference(x)  # InceptionOutputs(logits, aux_logits)
    ref_loss = F.cross_entropy(out.logits, y) + AUX_WEIGHT * F.cross_entropy(out.aux_logits, y)
    ref_loss.backward()

    model = al.attach(trunk, {"AuxLogits": al.Tap("Mixed_6e", head)})
    objective = al.Objective(aux=[al.Task("AuxLogits", source="AuxLogits", weight=AUX_WEIGHT)])
    model.train()
    outputs = model(x)
    report = objective(outputs, (x, y))
    report.total.backward()

    assert torch.equal(outputs.main, out.logits) and torch.equal(outputs.aux["AuxLogits"], out.aux_logits)
    torch.testing.assert_close(report.total, ref_loss, rtol=1e-12, atol=0)
    # model.Mixed_6e.conv.weight -> Mixed_6e.conv.weight; heads.AuxLogits.fc.bias -> AuxLogits.fc.bias
    grads = {n.split(".", 1)[1]: p.grad for n, p in model.named_parameters()}
    assert_grads_close(grads, {n: p.grad for n, p in reference.named_parameters()})


def test_stripped_model_evaluates_bit_identically(pair):
    reference, trunk, head = copy.deepcopy(pair)
    x, _ = _batch()
    model = al.attach(trunk, {"AuxLogits": al.Tap("Mixed_6e", head)})
    stripped = model.strip()
    stripped.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(stripped(x), reference(x))
