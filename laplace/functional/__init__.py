"""Function-space (Gaussian-process) Laplace approximations; see :mod:`laplace.functional.base`."""

from laplace.functional.base import BaseFunctionalLaplace
from laplace.functional.ella import ELLA
from laplace.functional.sod import FunctionalLaplace, FunctionalLLLaplace
from laplace.functional.valla import VaLLA

__all__ = ["BaseFunctionalLaplace", "ELLA", "FunctionalLaplace", "FunctionalLLLaplace", "VaLLA"]
