"""The keyword options of the backends' structure methods, and their checks.

Besides ``x, y, N, generator, out``, ``full``/``diag``/``kron`` of a backend take a few
keyword options; the Laplace classes pass their ``asdl_fisher_kwargs`` there, as
``laplace-torch`` does. Each backend class declares the options of each structure in
``structure_options`` (a class attribute); :meth:`CurvatureInterface.curvature_options
<laplace.curvature.interface.CurvatureInterface.curvature_options>` checks a call's options
against it with :func:`check_options`, which raises for an unknown keyword instead of
ignoring it and validates each value where it enters. The options:

- ``mc_samples``: the number of targets sampled per input by the Monte-Carlo Fisher
  (``stochastic=True``), for this call instead of the backend's ``num_samples``; the exact
  GGN accepts only ``1``, as ``curvlinops`` does.
- ``seed``: a fixed seed of the Monte-Carlo Fisher's sampler for this call, instead of one
  drawn from ``generator``.
- ``kfac_approx``: K-FAC's treatment of weight sharing (Eschenhagen et al., 2023),
  :class:`KFACApprox`.
- ``var``: ASDL's variance of the Gaussian its Monte-Carlo Fisher samples regression targets
  from.

References:
    Eschenhagen, R., Immer, A., Turner, R. E., Schneider, F., Hennig, P. Kronecker-factored
    approximate curvature for modern neural network architectures. NeurIPS, 2023.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from laplace.errors import UnknownOptionError
from laplace.utils.enums import _StrEnum, parse_enum

__all__ = [
    "ASDL_OPTIONS",
    "KFAC_OPTIONS",
    "SAMPLING_OPTIONS",
    "KFACApprox",
    "check_options",
]


class KFACApprox(_StrEnum):
    """K-FAC for a layer that shares its weight over ``R`` locations per sample.

    ``EXPAND`` treats the locations as ``R`` extra samples: ``A`` averages the inputs of all
    locations, ``B`` sums the outer products of their output gradients. ``REDUCE`` first
    averages a sample's inputs and sums its output gradients over the locations, then forms
    one outer product per sample (``A = 1/N sum_n abar_n abar_n^T``,
    ``B = sum_n gsum_n gsum_n^T``). The two agree for layers without weight sharing.
    """

    EXPAND = "expand"
    REDUCE = "reduce"


SAMPLING_OPTIONS: frozenset[str] = frozenset({"mc_samples", "seed"})
"""Options of the sampled (Monte-Carlo) Fisher."""

KFAC_OPTIONS: frozenset[str] = frozenset({"kfac_approx"})
"""Options of K-FAC."""

ASDL_OPTIONS: frozenset[str] = frozenset({"var", "seed"})
"""The ASDL ``FisherConfig`` options the ASDL backends take."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _seed(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer or None, got {value!r}")
    return value


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _kfac_approx(name: str, value: Any) -> KFACApprox:
    return parse_enum(KFACApprox, value, name)


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "mc_samples": _positive_int,
    "seed": _seed,
    "var": _positive_number,
    "kfac_approx": _kfac_approx,
}


def check_options(
    owner: str, accepted: frozenset[str], options: Mapping[str, Any]
) -> dict[str, Any]:
    """Check the keyword options of a structure method; return them validated.

    Args:
        owner: The method, for messages (``"CurvlinopsGGN.kron"``).
        accepted: The options it takes (a subset of the options of the module docstring).
        options: The keyword arguments it was given beyond its signature.

    Returns:
        The options with validated values (``kfac_approx`` as a :class:`KFACApprox`,
        ``var`` as a float).

    Raises:
        UnknownOptionError: For a keyword outside ``accepted`` (a ``TypeError`` and a
            ``ValueError``), naming the method and the options it accepts.
        ValueError: For a value of the wrong type or range.
    """
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UnknownOptionError(
            f"{owner}() got unknown keyword argument(s) {unknown}; the options it accepts "
            f"(for instance through asdl_fisher_kwargs) are {sorted(accepted)}"
        )
    return {name: _VALIDATORS[name](name, value) for name, value in options.items()}
