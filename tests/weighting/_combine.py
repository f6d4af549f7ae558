"""The gradient-aware rules on flat vectors: ``g_0`` ``(D,)`` and the auxiliary gradients ``(K, D)``.

A reference for the property tests, not the production path: the engine (``auxloss/weighting/grads.py``) applies
the same rules per shared tensor from the task-to-task dot products, and
``test_the_strategies_write_the_pure_combination_on_the_shared_trunk`` checks that both agree. They moved here from
``src/`` because only the tests used them; the coefficient functions they call stay in the strategies' modules.
"""

from torch import Tensor

from auxloss.weighting.gating import gating_coefficients
from auxloss.weighting.grads import cosine
from auxloss.weighting.metabalance import metabalance_factor
from auxloss.weighting.projection import projection_coefficients


def combine_weighted(g0: Tensor, gks: Tensor, coefs: Tensor) -> Tensor:
    """``g_0 + Σ_k coefs_k·g_k`` for flat ``g0`` ``(D,)``, ``gks`` ``(K, D)`` and ``coefs`` ``(K,)``."""
    return g0 + (coefs.to(gks.dtype)[:, None] * gks).sum(0)


def combine_gating(g0: Tensor, gks: Tensor, lambdas: Tensor, weighted: bool = False) -> tuple[Tensor, Tensor]:
    """The gated update of flat gradients: ``g0`` ``(D,)``, ``gks`` ``(K, D)``, ``lambdas`` ``(K,)``.

    Returns the update ``g_0 + Σ c_k·λ_k·g_k`` and the coefficients ``c`` ``(K,)``.
    """
    cos = cosine(gks @ g0, g0 @ g0, (gks * gks).sum(1))
    c = gating_coefficients(cos, weighted)
    return combine_weighted(g0, gks, c * lambdas.to(c.dtype)), c


def combine_projection(g0: Tensor, gks: Tensor, lambdas: Tensor) -> tuple[Tensor, Tensor]:
    """The projected update of flat gradients: ``g0`` ``(D,)``, ``gks`` ``(K, D)``, ``lambdas`` ``(K,)``.

    Returns ``g_0 + Σ λ_k·g_k'`` and the projected gradients ``g_k'`` ``(K, D)``.
    """
    a = projection_coefficients(gks @ g0, g0 @ g0)
    projected = gks - a[:, None].to(gks.dtype) * g0[None, :]
    return g0 + (lambdas.to(gks.dtype)[:, None] * projected).sum(0), projected


def combine_metabalance(g0: Tensor, gks: Tensor, lambdas: Tensor, m0: Tensor, mks: Tensor, relax: float,
                        adapt: str = "both") -> tuple[Tensor, Tensor]:
    """One tensor's update from flat ``g0`` ``(D,)``, ``gks`` ``(K, D)``, ``lambdas`` ``(K,)`` and the (already
    updated) moving averages ``m0`` (scalar) and ``mks`` ``(K,)``. Returns the update and the factors ``f`` ``(K,)``."""
    f = metabalance_factor(m0.expand_as(mks), mks, relax, adapt)
    return g0 + ((lambdas * f).to(gks.dtype)[:, None] * gks).sum(0), f
