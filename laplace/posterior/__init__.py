"""The structure axis: curvature accumulators and posterior precisions per structure."""

from laplace.posterior.base import Curvature, NotPositiveDefiniteError, Posterior, expand_prior
from laplace.posterior.dense import DenseCurvature
from laplace.posterior.diag import DiagCurvature
from laplace.posterior.kron import KronCurvature

__all__ = [
    "Curvature",
    "DenseCurvature",
    "DiagCurvature",
    "KronCurvature",
    "NotPositiveDefiniteError",
    "Posterior",
    "expand_prior",
]
