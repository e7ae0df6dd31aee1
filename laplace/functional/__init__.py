"""Function-space (Gaussian-process) Laplace approximations; see :mod:`laplace.functional.base`."""

from laplace.functional.base import BaseFunctionalLaplace
from laplace.functional.sod import FunctionalLaplace, FunctionalLLLaplace

__all__ = ["BaseFunctionalLaplace", "FunctionalLaplace", "FunctionalLLLaplace"]
