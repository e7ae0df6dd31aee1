"""Laplace approximations for deep learning.

Turn a trained PyTorch network into a Bayesian one after the fact: fit a Gaussian posterior
around the trained weights from the curvature of the loss, then predict with calibrated
uncertainty, select hyperparameters by the marginal likelihood, and sample.

Example:
    >>> la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    >>> la.fit(train_loader)
    >>> la.optimize_prior_precision()
    >>> probs = la(x_test)
"""

from laplace import active as active
from laplace.baselaplace import (
    ELLA,
    BaseFunctionalLaplace,
    BaseLaplace,
    DiagLaplace,
    FullLaplace,
    FunctionalLaplace,
    KronLaplace,
    LowRankLaplace,
    ParametricLaplace,
    VaLLA,
)
from laplace.laplace import Laplace
from laplace.lllaplace import (
    DiagLLLaplace,
    FullLLLaplace,
    FunctionalLLLaplace,
    KronLLLaplace,
    LLLaplace,
)
from laplace.marglik_training import marglik_training
from laplace.subnetlaplace import DiagSubnetLaplace, FullSubnetLaplace, SubnetLaplace
from laplace.utils.enums import (
    FunctionalApproximation,
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
)

__all__ = [
    "ELLA",
    "BaseFunctionalLaplace",
    "BaseLaplace",
    "FunctionalLaplace",
    "FunctionalLLLaplace",
    "DiagLaplace",
    "DiagLLLaplace",
    "FullLLLaplace",
    "KronLLLaplace",
    "LLLaplace",
    "DiagSubnetLaplace",
    "FullSubnetLaplace",
    "SubnetLaplace",
    "FullLaplace",
    "FunctionalApproximation",
    "HessianStructure",
    "KronLaplace",
    "Laplace",
    "Likelihood",
    "LowRankLaplace",
    "LinkApprox",
    "marglik_training",
    "ParametricLaplace",
    "PredType",
    "PriorStructure",
    "SubsetOfWeights",
    "TuningMethod",
    "VaLLA",
]
