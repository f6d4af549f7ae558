"""``torch.compile`` on a real torchvision model with heads attached (attach first, then compile)."""

from __future__ import annotations

import copy

import pytest
import torch
from _real import require

import auxloss as al

pytestmark = pytest.mark.integration


def test_attach_then_compile_matches_eager_on_torchvision_resnet18():
    tv = require("torchvision")
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 3])
    eager = al.attach(tv.models.resnet18(weights=None, num_classes=4),
                      {"l2": al.Tap("layer2", al.LinearHead(4)), "l3": al.Tap("layer3", al.LinearHead(4))},
                      example_input=x[:1])
    twin = copy.deepcopy(eager)
    objective = al.Objective(aux=[al.Task("l2", source="l2", weight=0.3), al.Task("l3", source="l3", weight=0.1)])
    # backend="eager" traces with dynamo (hooks included) without inductor's long C++ compile
    compiled = torch.compile(twin, backend="eager", fullgraph=True)

    eager.train()
    compiled.train()
    out_e, out_c = eager(x), compiled(x)
    assert set(out_c.aux) == {"l2", "l3"}
    for name in ("l2", "l3"):
        torch.testing.assert_close(out_c.aux[name], out_e.aux[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_c.main, out_e.main, rtol=1e-6, atol=1e-6)
    total_e = objective(out_e, (x, y)).total
    total_c = objective(out_c, (x, y)).total
    torch.testing.assert_close(total_c, total_e, rtol=1e-6, atol=1e-6)
    total_e.backward()
    total_c.backward()
    grads_c = dict(twin.named_parameters())
    for name, p in eager.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(grads_c[name].grad, p.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
    # the deployable model is still the plain torchvision module
    assert type(twin.strip()) is type(tv.models.resnet18(weights=None))
