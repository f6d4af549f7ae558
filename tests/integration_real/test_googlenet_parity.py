"""GoogLeNet's auxiliary classifiers, attached by auxloss, against torchvision's own wiring of them.

torchvision builds GoogLeNet with its two ``InceptionAux`` heads inside the network; auxloss builds the plain trunk
(``aux_logits=False``) and attaches torchvision's very ``InceptionAux`` modules with :func:`auxloss.attach`. With
the same weights, the training loss ``L_main + 0.3·L_aux1 + 0.3·L_aux2`` and every gradient must be torchvision's.

Dropout is set to 0 in both: torchvision runs each head in the middle of the trunk's forward, auxloss runs the
heads after it, so with dropout on the two draw their masks from the random stream in another order (the same
distribution, not the same masks).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _real import assert_grads_close, require

import auxloss as al
from auxloss.recipes import GOOGLENET_AUX_LAYERS

pytestmark = pytest.mark.integration

NUM_CLASSES = 10
# The parity holds at any input size; 112 keeps the float64 forward and backward cheap on a CPU (the heads' 4x4
# adaptive pool still has a 7x7 map to pool).
SIZE = 112
IN_CHANNELS = {"aux1": 512, "aux2": 528}  # the outputs of inception4a and inception4d


@pytest.fixture(scope="module")
def pair():
    """(torchvision's googlenet with its heads, the plain trunk, torchvision InceptionAux heads): same weights."""
    tv = require("torchvision")
    from torchvision.models.googlenet import InceptionAux

    torch.manual_seed(0)
    reference = tv.models.googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=NUM_CLASSES,
                                    dropout=0.0, dropout_aux=0.0)
    trunk = tv.models.googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=NUM_CLASSES,
                                dropout=0.0)
    trunk.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith(("aux1.", "aux2."))})
    heads = {}
    for name in GOOGLENET_AUX_LAYERS:
        heads[name] = InceptionAux(IN_CHANNELS[name], NUM_CLASSES, dropout=0.0)
        heads[name].load_state_dict(getattr(reference, name).state_dict())
    return reference.double(), trunk.double(), {n: h.double() for n, h in heads.items()}


def _attach(trunk, heads):
    model = al.attach(trunk, {name: al.Tap(layer, heads[name]) for name, layer in GOOGLENET_AUX_LAYERS.items()})
    objective = al.Objective(aux=[al.Task(name, source=name, weight=0.3) for name in GOOGLENET_AUX_LAYERS])
    return model, objective


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, SIZE, SIZE, generator=g, dtype=torch.float64), torch.tensor([3, 7, 0])


def test_training_loss_and_every_gradient_equal_torchvisions(pair):
    reference, trunk, heads = copy.deepcopy(pair)
    x, y = _batch()
    reference.train()
    out = reference(x)  # GoogLeNetOutputs(logits, aux_logits2, aux_logits1) in training mode
    ref_loss = (F.cross_entropy(out.logits, y) + 0.3 * F.cross_entropy(out.aux_logits1, y)
                + 0.3 * F.cross_entropy(out.aux_logits2, y))
    ref_loss.backward()

    model, objective = _attach(trunk, heads)
    model.train()
    outputs = model(x)
    report = objective(outputs, (x, y))
    report.total.backward()

    # the forward is the same computation on the same tensors: equal bit for bit
    assert torch.equal(outputs.main, out.logits)
    assert torch.equal(outputs.aux["aux1"], out.aux_logits1) and torch.equal(outputs.aux["aux2"], out.aux_logits2)
    torch.testing.assert_close(report.total, ref_loss, rtol=1e-12, atol=0)
    assert report.weights == {"main": 1.0, "aux1": 0.3, "aux2": 0.3}

    def tv_name(name: str) -> str:  # model.conv1.conv.weight -> conv1.conv.weight, heads.aux1.fc1.bias -> aux1.fc1.bias
        return name.split(".", 1)[1]

    grads = {tv_name(n): p.grad for n, p in model.named_parameters()}
    assert_grads_close(grads, {n: p.grad for n, p in reference.named_parameters()})
    # BatchNorm's running statistics moved the same way in both (one training forward each)
    ref_buffers = dict(reference.named_buffers())
    for name, buf in model.named_buffers():
        assert torch.equal(buf, ref_buffers[tv_name(name)]), name


def test_stripped_model_evaluates_bit_identically(pair):
    reference, trunk, heads = copy.deepcopy(pair)
    x, _ = _batch()
    model, _ = _attach(trunk, heads)
    model.train()
    model(x)  # a training forward with the heads (BatchNorm statistics move) ...
    reference.train()
    reference(x)  # ... and the same for torchvision's
    stripped = model.strip()
    assert stripped is trunk and not any(m._forward_hooks for m in stripped.modules())
    stripped.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(stripped(x), reference(x))  # in eval mode torchvision returns the logits alone


def test_the_heads_sit_where_torchvision_puts_them(pair):
    reference, _, _ = copy.deepcopy(pair)
    seen = {}
    for name, layer in GOOGLENET_AUX_LAYERS.items():
        getattr(reference, layer).register_forward_hook(lambda m, a, o, layer=layer: seen.__setitem__(layer, o))
        getattr(reference, name).register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0]))
    reference.train()
    reference(_batch()[0])
    for name, layer in GOOGLENET_AUX_LAYERS.items():
        assert seen[name] is seen[layer]  # torchvision's head reads exactly the tapped block's output


# Table 1 of Szegedy et al. 2015: (#5x5 reduce, #5x5) of each Inception block.
_FIVE_BY_FIVE = {"inception3a": (16, 32), "inception3b": (32, 96), "inception4a": (16, 48), "inception4b": (24, 64),
                 "inception4c": (24, 64), "inception4d": (32, 64), "inception4e": (32, 128),
                 "inception5a": (32, 128), "inception5b": (48, 128)}


def test_auxloss_googlenet_has_torchvisions_layers_and_parameters():
    tv = require("torchvision")
    from torchvision.models.googlenet import InceptionAux

    from auxloss.recipes import googlenet
    from auxloss.zoo.models import count_parameters

    x = torch.zeros(1, 3, 224, 224)
    torch.manual_seed(0)
    reference = tv.models.googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=NUM_CLASSES)
    # batch_norm=True: torchvision's convolutions are all conv + BatchNorm without bias, like auxloss's variant
    model, objective = googlenet(NUM_CLASSES, batch_norm=True, example_input=x)
    ours = [(i.name, i.output) for i in al.list_layers(model.model, x, max_depth=1)]
    theirs = [(i.name, i.output) for i in al.list_layers(reference, x, max_depth=1)]
    assert ours == theirs  # same top-level blocks, in the same order, with the same output shapes
    assert ("inception4a", "Tensor(1, 512, 14, 14)") in ours and ("inception4d", "Tensor(1, 528, 14, 14)") in ours

    # torchvision's "5x5" branch convolves 3x3 (a known deviation from the paper, pytorch/vision#906); auxloss's
    # is the paper's 5x5. That is the whole difference in parameters.
    for block in _FIVE_BY_FIVE:
        assert getattr(reference, block).branch3[1].conv.kernel_size == (3, 3)
        assert getattr(model.model, block).branch5x5.conv.conv.kernel_size == (5, 5)
    extra = sum(reduce * out * (5 * 5 - 3 * 3) for reduce, out in _FIVE_BY_FIVE.values())
    assert count_parameters(model.model) == count_parameters(reference) + extra

    # The heads: same layers and output; torchvision's 1x1 conv has BatchNorm (weight and bias, 256 parameters)
    # where auxloss's has a bias (128).
    assert {t.name: t.source for t in objective.aux_tasks} == {"aux1": "aux1", "aux2": "aux2"}
    assert objective.weights() == {"aux1": 0.3, "aux2": 0.3}
    outputs = model(torch.zeros(2, 3, 224, 224))
    for name, layer in GOOGLENET_AUX_LAYERS.items():
        assert model.taps[name].layer == layer
        theirs_head = InceptionAux(IN_CHANNELS[name], NUM_CLASSES)
        assert count_parameters(model.heads[name]) == count_parameters(theirs_head) - 128
        assert outputs.aux[name].shape == (2, NUM_CLASSES)
