"""Weighting strategies on top of each task's scheduled weight λ_k(t).

Loss-based (adaptive): :class:`MainProgress`, :class:`Uncertainty` (Kendall et al. 2018), :class:`DWA` (Liu et
al. 2019), :class:`GradNorm` (Chen et al. 2018).

Gradient-aware, with the main task as primary (defined on the gradients of the shared parameters):
:class:`CosineGating` (Du et al. 2018), :class:`Projection` (the PCGrad rule, applied asymmetrically),
:class:`OLAux` (Lin et al. 2019), :class:`MetaBalance` (He et al. 2022), :class:`ARML` (Shi et al. 2020),
:class:`BLOOP` (ICML 2024), :class:`AutoLambda` (Liu et al. 2022, auxiliary mode),
:class:`AuxiLearn` (Navon et al. 2021).

Symmetric controls, which weight the main task like any other task: :class:`RLW` (Lin et al. 2022) and
:class:`FAMO` (Liu et al. 2023), and :class:`TorchJD`, the bridge to TorchJD's multi-task aggregators (UPGrad,
MGDA, CAGrad...; the ``torchjd`` extra).

``build_weighting({"type": ..., ...}, model=...)`` builds any of them from a config.
"""

from auxloss.weighting.arml import ARML
from auxloss.weighting.autolambda import AutoLambda
from auxloss.weighting.auxilearn import AuxiLearn
from auxloss.weighting.base import GradientWeighting, LossWeighting, Weighting
from auxloss.weighting.bloop import BLOOP
from auxloss.weighting.dwa import DWA
from auxloss.weighting.famo import FAMO
from auxloss.weighting.gating import CosineGating
from auxloss.weighting.gradnorm import GradNorm
from auxloss.weighting.metabalance import MetaBalance
from auxloss.weighting.olaux import OLAux
from auxloss.weighting.progress import MainProgress
from auxloss.weighting.projection import Projection
from auxloss.weighting.registry import WEIGHTINGS, build_weighting
from auxloss.weighting.rlw import RLW
from auxloss.weighting.torchjd import TorchJD
from auxloss.weighting.uncertainty import Uncertainty

__all__ = [
    "ARML",
    "BLOOP",
    "DWA",
    "FAMO",
    "RLW",
    "WEIGHTINGS",
    "AutoLambda",
    "AuxiLearn",
    "CosineGating",
    "GradNorm",
    "GradientWeighting",
    "LossWeighting",
    "MainProgress",
    "MetaBalance",
    "OLAux",
    "Projection",
    "TorchJD",
    "Uncertainty",
    "Weighting",
    "build_weighting",
]
