"""String enums for every option of the public API.

All enums derive from ``str``, so plain strings are accepted wherever an enum is expected
and compare equal to their members. :func:`parse_enum` converts a user value at the API
boundary and raises a ``ValueError`` that names the argument and the accepted values.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = [
    "SubsetOfWeights",
    "HessianStructure",
    "FunctionalApproximation",
    "Likelihood",
    "PredType",
    "LinkApprox",
    "TuningMethod",
    "PriorStructure",
    "Eigensolver",
    "parse_enum",
]


class _StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value


class SubsetOfWeights(_StrEnum):
    ALL = "all"
    LAST_LAYER = "last_layer"
    SUBNETWORK = "subnetwork"


class HessianStructure(_StrEnum):
    FULL = "full"
    KRON = "kron"
    DIAG = "diag"
    LOWRANK = "lowrank"
    GP = "gp"


class FunctionalApproximation(_StrEnum):
    SOD = "sod"
    NYSTROM = "nystrom"
    VARIATIONAL = "variational"


class Likelihood(_StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    REWARD_MODELING = "reward_modeling"


class PredType(_StrEnum):
    GLM = "glm"
    NN = "nn"
    GP = "gp"


class LinkApprox(_StrEnum):
    MC = "mc"
    PROBIT = "probit"
    BRIDGE = "bridge"
    BRIDGE_NORM = "bridge_norm"


class TuningMethod(_StrEnum):
    MARGLIK = "marglik"
    GRIDSEARCH = "gridsearch"


class PriorStructure(_StrEnum):
    SCALAR = "scalar"
    DIAG = "diag"
    LAYERWISE = "layerwise"


class Eigensolver(_StrEnum):
    """How ``LowRankLaplace`` finds the top eigenpairs of the curvature.

    ``LANCZOS``: one curvature-vector product per step, to a tolerance
    (:mod:`laplace.curvature.lanczos`). ``SUBSPACE``: randomized subspace iteration, a fixed
    few products with a block of vectors each (:mod:`laplace.curvature.subspace`). ``AUTO``:
    subspace iteration where each product is a pass over the data and the curvature is
    positive semi-definite, Lanczos otherwise.
    """

    LANCZOS = "lanczos"
    SUBSPACE = "subspace"
    AUTO = "auto"


E = TypeVar("E", bound=_StrEnum)


def parse_enum(enum_cls: type[E], value: object, name: str) -> E:
    """Convert ``value`` to a member of ``enum_cls`` or raise a clear error.

    Args:
        enum_cls: The target enum class.
        value: A member of ``enum_cls`` or its string value.
        name: The argument name, used in the error message.

    Returns:
        The enum member.

    Raises:
        ValueError: If ``value`` is not one of the accepted values.
    """
    try:
        return enum_cls(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{name} must be one of {accepted}; got {value!r}") from None
