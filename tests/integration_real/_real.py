"""What the integration tests share: import a real library, or skip where it is missing.

`make test-integration` sets ``AUXLOSS_INTEGRATION=1``: there a missing library is a failure, not a skip, so the
suite cannot pass by skipping. Elsewhere (``make test`` deselects these tests anyway; a bare ``pytest`` collects
them) they skip with the reason.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

STRICT = os.environ.get("AUXLOSS_INTEGRATION") == "1"


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - PyPI's torchvision beside a CPU-only torch raises RuntimeError
        reason = (f"{module} cannot be imported here ({type(exc).__name__}: {str(exc)[:160]}); these tests run in "
                  "`make test-integration`")
        if STRICT:
            pytest.fail(reason)
        pytest.skip(reason)


def assert_grads_close(model_params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Every parameter's gradient equals the reference's, to float64 round-off.

    The gradient flowing into a tapped layer is a sum over its consumers (the next block and the head), which
    autograd may add in another order than the reference model, so equality is to a relative 1e-9 of each
    tensor's largest entry rather than bitwise.
    """
    assert model_params.keys() == reference.keys()
    for name, grad in model_params.items():
        ref = reference[name]
        assert grad is not None and ref is not None, name
        scale = float(ref.abs().max())
        torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-9 * scale, msg=lambda m, n=name: f"{n}: {m}")
