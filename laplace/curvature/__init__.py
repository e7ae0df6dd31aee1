"""Curvature backends: adapters from curvature libraries to one interface.

Each backend class declares what it computes through class attributes (``structures``,
``supports_dict_inputs``, ``supports_backprop``); :data:`BACKENDS` lists them so that error
messages can name the backends that would work.
"""

from laplace.curvature.asdfghjkl import (
    AsdfghjklEF,
    AsdfghjklGGN,
    AsdfghjklHessian,
    AsdfghjklInterface,
)
from laplace.curvature.asdl import AsdlEF, AsdlGGN, AsdlHessian, AsdlInterface
from laplace.curvature.backpack import BackPackEF, BackPackGGN, BackPackInterface
from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.curvature.curvlinops import (
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    CurvlinopsInterface,
)

BACKENDS: tuple[type[CurvatureInterface], ...] = (
    CurvlinopsGGN,
    CurvlinopsEF,
    CurvlinopsHessian,
    BackPackGGN,
    BackPackEF,
    AsdlGGN,
    AsdlEF,
    AsdlHessian,
    GGNInterface,
    EFInterface,
)

__all__ = [
    "BACKENDS",
    "AsdfghjklEF",
    "AsdfghjklGGN",
    "AsdfghjklHessian",
    "AsdfghjklInterface",
    "AsdlEF",
    "AsdlGGN",
    "AsdlHessian",
    "AsdlInterface",
    "BackPackEF",
    "BackPackGGN",
    "BackPackInterface",
    "CurvatureInterface",
    "CurvlinopsEF",
    "CurvlinopsGGN",
    "CurvlinopsHessian",
    "CurvlinopsInterface",
    "EFInterface",
    "GGNInterface",
]
