"""Utilities: Kronecker-factored matrices, metrics, prior helpers and enums."""

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
from laplace.utils.feature_extractor import FeatureExtractor, FeatureReduction
from laplace.utils.matrix import Kron, KronDecomposed, block_diag, kron
from laplace.utils.metrics import RunningNLLMetric
from laplace.utils.subnetmask import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    SubnetMask,
)
from laplace.utils.swag import fit_diagonal_swag_var
from laplace.utils.utils import (
    diagonal_add_scalar,
    expand_prior_precision,
    fix_prior_prec_structure,
    get_nll,
    invsqrt_precision,
    normal_samples,
    parameters_per_layer,
    symeig,
    validate,
)

__all__ = [
    "FeatureExtractor",
    "FeatureReduction",
    "LargestMagnitudeSubnetMask",
    "LargestVarianceDiagLaplaceSubnetMask",
    "LargestVarianceSWAGSubnetMask",
    "LastLayerSubnetMask",
    "ModuleNameSubnetMask",
    "ParamNameSubnetMask",
    "RandomSubnetMask",
    "SubnetMask",
    "fit_diagonal_swag_var",
    "FunctionalApproximation",
    "HessianStructure",
    "Kron",
    "KronDecomposed",
    "Likelihood",
    "LinkApprox",
    "PredType",
    "PriorStructure",
    "RunningNLLMetric",
    "SubsetOfWeights",
    "TuningMethod",
    "block_diag",
    "diagonal_add_scalar",
    "expand_prior_precision",
    "fix_prior_prec_structure",
    "get_nll",
    "invsqrt_precision",
    "kron",
    "normal_samples",
    "parameters_per_layer",
    "symeig",
    "validate",
]
