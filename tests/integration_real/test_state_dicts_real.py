"""State dicts across the strip boundary, with torchvision's models.

- Deploying: ``aux_model.strip()`` is the user's own model, so its checkpoint loads into a fresh plain model
  with ``strict=True`` and gives the same outputs.
- Starting from plain weights (pretrained ones have no auxiliary heads, pytorch/vision#3648): a plain model's
  checkpoint loads into an ``AuxModel``; the trunk gets every weight and the head keys come back as missing.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from _real import require

import auxloss as al
from auxloss.recipes import GOOGLENET_AUX_LAYERS

pytestmark = pytest.mark.integration


def _roundtrip(state: dict) -> dict:
    """Through bytes, as a checkpoint file would be (weights_only: never unpickle arbitrary objects)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_stripped_checkpoint_loads_strictly_into_a_fresh_torchvision_model():
    tv = require("torchvision")
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([1, 0, 3, 2])
    model = al.attach(tv.models.resnet18(weights=None, num_classes=4),
                      {"l2": al.Tap("layer2", al.LinearHead(4))}, example_input=x[:1])
    objective = al.Objective(aux=[al.Task("l2", source="l2", weight=0.3)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # trained weights and moved BatchNorm statistics, not the initial ones
        optimizer.zero_grad()
        objective(model(x), (x, y)).total.backward()
        optimizer.step()
    stripped = model.strip().eval()
    fresh = tv.models.resnet18(weights=None, num_classes=4)
    result = fresh.load_state_dict(_roundtrip(stripped.state_dict()), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), stripped(x))


def test_plain_googlenet_checkpoint_loads_into_an_aux_model_with_the_heads_missing():
    tv = require("torchvision")
    from torchvision.models.googlenet import InceptionAux

    torch.manual_seed(0)
    pretrained = tv.models.googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=10)
    checkpoint = _roundtrip(pretrained.state_dict())
    torch.manual_seed(1)  # other weights, to see that the checkpoint's are the ones loaded
    trunk = tv.models.googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=10)
    heads = {"aux1": InceptionAux(512, 10), "aux2": InceptionAux(528, 10)}
    model = al.attach(trunk, {n: al.Tap(layer, heads[n]) for n, layer in GOOGLENET_AUX_LAYERS.items()})
    head_weights = {k: v.clone() for k, v in model.heads.state_dict().items()}

    result = model.load_state_dict(checkpoint)  # strict=True: the trunk's keys must all match
    assert result.unexpected_keys == []
    assert result.missing_keys == [f"heads.{k}" for k in model.heads.state_dict()]
    # per head: the 1x1 conv, its BatchNorm (weight, bias, running mean and var, batch count), fc1 and fc2
    assert len(result.missing_keys) == 2 * (1 + 5 + 2 + 2)
    for key, value in checkpoint.items():
        assert torch.equal(trunk.state_dict()[key], value), key
    for key, value in model.heads.state_dict().items():
        assert torch.equal(value, head_weights[key]), key  # the heads keep their own initial weights

    x = torch.randn(2, 3, 112, 112)
    model.eval()
    pretrained.eval()
    with torch.no_grad():
        assert torch.equal(model(x).main, pretrained(x))
    model.train()
    out = model(x)
    loss = F.cross_entropy(out.main, torch.tensor([0, 1])) + 0.3 * sum(
        F.cross_entropy(out.aux[n], torch.tensor([0, 1])) for n in GOOGLENET_AUX_LAYERS)
    loss.backward()  # the heads train from their fresh weights
    assert all(p.grad is not None for p in model.heads.parameters())


def test_torchvision_checkpoint_with_its_own_aux_heads_names_the_extra_keys():
    tv = require("torchvision")
    torch.manual_seed(0)
    with_heads = tv.models.googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=10)
    trunk = tv.models.googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=10)
    model = al.attach(trunk, {"aux1": al.Tap("inception4a", al.LinearHead(10))})
    # torchvision's heads are not part of the plain trunk: strict loading says so, as it would for the plain model
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "aux1\.conv\.conv\.weight"'):
        model.load_state_dict(with_heads.state_dict())
    result = model.load_state_dict(with_heads.state_dict(), strict=False)
    assert result.unexpected_keys and all(k.startswith(("model.aux1.", "model.aux2.")) for k in result.unexpected_keys)
    assert result.missing_keys == [f"heads.{k}" for k in model.heads.state_dict()]
    assert torch.equal(trunk.fc.weight, with_heads.fc.weight)
