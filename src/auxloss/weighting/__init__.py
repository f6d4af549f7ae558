"""Weighting strategies: adaptive (loss-based) and gradient-aware (main task as primary)."""

from auxloss.weighting.base import GradientWeighting, LossWeighting, Weighting

__all__ = ["GradientWeighting", "LossWeighting", "Weighting"]
