"""Backends named after the legacy ``asdfghjkl`` module (shipped by asdfghjkl <= 0.1a2).

The ASDL library was first published as the module ``asdfghjkl``; from asdfghjkl 0.1a4 on the
distribution installs the module ``asdl`` instead, whose adapters are
:class:`~laplace.curvature.asdl.AsdlGGN`, :class:`~laplace.curvature.asdl.AsdlEF` and
:class:`~laplace.curvature.asdl.AsdlHessian`. The classes here keep the old names importable
and declare the same capabilities. They work only where both modules are importable, and
then compute exactly what the ``Asdl`` classes compute (they delegate to them); otherwise
constructing one raises an ``ImportError`` that says what to install. This module imports
either way.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils.enums import HessianStructure

try:
    from laplace.curvature.asdl import AsdlEF, AsdlGGN, AsdlHessian, AsdlInterface
except ImportError:  # the maintained ``asdl`` module is missing as well
    # stand-ins that keep the hierarchy (``*GGN`` are GGNInterface, ``*EF`` EFInterface)
    AsdlInterface = AsdlHessian = CurvatureInterface
    AsdlGGN, AsdlEF = GGNInterface, EFInterface
    _ASDL_IMPORTABLE = False
else:
    _ASDL_IMPORTABLE = True

__all__ = ["AsdfghjklInterface", "AsdfghjklGGN", "AsdfghjklEF", "AsdfghjklHessian"]

_FISHER_STRUCTURES = frozenset(
    {HessianStructure.FULL, HessianStructure.DIAG, HessianStructure.KRON}
)


def _legacy_module_installed() -> bool:
    """Whether the legacy module ``asdfghjkl`` can be imported (without importing it)."""
    return importlib.util.find_spec("asdfghjkl") is not None


def _require_modules(name: str) -> None:
    """Raise unless the legacy ``asdfghjkl`` and the maintained ``asdl`` modules are present.

    Raises:
        ImportError: Saying what is missing, what to install, and the maintained classes.
    """
    maintained = (
        "The maintained equivalents are AsdlGGN, AsdlEF and AsdlHessian from "
        "laplace.curvature.asdl (module `asdl`, installed by asdfghjkl 0.1a4)."
    )
    if not _legacy_module_installed():
        raise ImportError(
            f"{name} needs the legacy `asdfghjkl` module, which is not installed: it ships "
            "with `pip install asdfghjkl==0.1a2` (that replaces asdfghjkl 0.1a4 and its "
            f"`asdl` module). {maintained}"
        )
    if not _ASDL_IMPORTABLE:
        raise ImportError(
            f"{name} delegates to the `asdl` module of asdfghjkl 0.1a4, which cannot be "
            f"imported next to the legacy `asdfghjkl` module found here. {maintained}"
        )


class AsdfghjklInterface(AsdlInterface):
    """Legacy-named counterpart of :class:`~laplace.curvature.asdl.AsdlInterface`.

    ``*args``, ``**kwargs`` are as for the corresponding ``Asdl`` class.

    Raises:
        ImportError: If the legacy ``asdfghjkl`` or the ``asdl`` module is not importable.
    """

    supports_dict_inputs: ClassVar[bool] = True
    supports_backprop: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _require_modules(type(self).__name__)
        super().__init__(*args, **kwargs)


class AsdfghjklGGN(AsdfghjklInterface, AsdlGGN):
    """Legacy-named :class:`~laplace.curvature.asdl.AsdlGGN` (same arguments)."""

    structures: ClassVar[frozenset[HessianStructure]] = _FISHER_STRUCTURES


class AsdfghjklEF(AsdfghjklInterface, AsdlEF):
    """Legacy-named :class:`~laplace.curvature.asdl.AsdlEF` (same arguments)."""

    structures: ClassVar[frozenset[HessianStructure]] = _FISHER_STRUCTURES


class AsdfghjklHessian(AsdfghjklInterface, AsdlHessian):
    """Legacy-named :class:`~laplace.curvature.asdl.AsdlHessian` (same arguments)."""

    structures: ClassVar[frozenset[HessianStructure]] = frozenset(
        {HessianStructure.FULL, HessianStructure.DIAG}
    )
    psd_curvature: ClassVar[bool] = False
