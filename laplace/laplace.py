"""The ``Laplace(...)`` factory: pick the class of the grid from option strings."""

from __future__ import annotations

from typing import Any

from torch import nn

from laplace.base import BaseLaplace
from laplace.baselaplace import (
    DiagLaplace,
    FullLaplace,
    KronLaplace,
    LowRankLaplace,
)
from laplace.functional import ELLA, FunctionalLaplace, FunctionalLLLaplace, VaLLA
from laplace.lllaplace import DiagLLLaplace, FullLLLaplace, KronLLLaplace
from laplace.subnetlaplace import DiagSubnetLaplace, FullSubnetLaplace
from laplace.utils.enums import (
    FunctionalApproximation,
    HessianStructure,
    Likelihood,
    SubsetOfWeights,
    parse_enum,
)

__all__ = ["Laplace"]

_GRID: dict[tuple[SubsetOfWeights, HessianStructure], type[BaseLaplace]] = {
    (SubsetOfWeights.ALL, HessianStructure.FULL): FullLaplace,
    (SubsetOfWeights.ALL, HessianStructure.KRON): KronLaplace,
    (SubsetOfWeights.ALL, HessianStructure.DIAG): DiagLaplace,
    (SubsetOfWeights.ALL, HessianStructure.LOWRANK): LowRankLaplace,
    (SubsetOfWeights.LAST_LAYER, HessianStructure.FULL): FullLLLaplace,
    (SubsetOfWeights.LAST_LAYER, HessianStructure.KRON): KronLLLaplace,
    (SubsetOfWeights.LAST_LAYER, HessianStructure.DIAG): DiagLLLaplace,
    (SubsetOfWeights.SUBNETWORK, HessianStructure.FULL): FullSubnetLaplace,
    (SubsetOfWeights.SUBNETWORK, HessianStructure.DIAG): DiagSubnetLaplace,
    (SubsetOfWeights.ALL, HessianStructure.GP): FunctionalLaplace,
    (SubsetOfWeights.LAST_LAYER, HessianStructure.GP): FunctionalLLLaplace,
}

_FUNCTIONAL: dict[FunctionalApproximation, type[BaseLaplace]] = {
    FunctionalApproximation.NYSTROM: ELLA,
    FunctionalApproximation.VARIATIONAL: VaLLA,
}
"""The all-weights function-space classes other than subset of data, by approximation."""


def Laplace(
    model: nn.Module,
    likelihood: Likelihood | str,
    subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.LAST_LAYER,
    hessian_structure: HessianStructure | str = HessianStructure.KRON,
    *args: Any,
    functional_approximation: FunctionalApproximation | str = FunctionalApproximation.SOD,
    **kwargs: Any,
) -> BaseLaplace:
    """Build the Laplace approximation for a subset of weights and a Hessian structure.

    Args:
        model: The trained network.
        likelihood: ``"classification"``, ``"regression"`` or ``"reward_modeling"``.
        subset_of_weights: ``"all"``, ``"last_layer"`` or ``"subnetwork"``.
        hessian_structure: ``"full"``, ``"kron"``, ``"diag"``, ``"lowrank"`` or ``"gp"``.
        *args: Passed on to the class.
        functional_approximation: For ``"gp"``: ``"sod"``, ``"nystrom"`` or ``"variational"``.
        **kwargs: Passed on to the class.

    Returns:
        An instance of the matching class, e.g. ``KronLaplace`` for ``("all", "kron")``; for
        ``"gp"``: ``FunctionalLaplace`` / ``FunctionalLLLaplace`` (``"sod"``), ``ELLA``
        (``"nystrom"``) or ``VaLLA`` (``"variational"``, all weights only).

    Raises:
        ValueError: For unknown strings or a combination the library does not offer.
    """
    subset = parse_enum(SubsetOfWeights, subset_of_weights, "subset_of_weights")
    structure = parse_enum(HessianStructure, hessian_structure, "hessian_structure")
    approximation = parse_enum(
        FunctionalApproximation, functional_approximation, "functional_approximation"
    )
    if structure == HessianStructure.GP and approximation != FunctionalApproximation.SOD:
        if subset != SubsetOfWeights.ALL or approximation not in _FUNCTIONAL:
            raise ValueError(
                f"functional_approximation={approximation.value!r} is offered for "
                f"subset_of_weights='all' only, got {subset.value!r}"
            )
        return _FUNCTIONAL[approximation](model, likelihood, *args, **kwargs)
    cls = _GRID.get((subset, structure))
    if cls is None:
        offered = ", ".join(f"({s.value!r}, {h.value!r})" for s, h in _GRID)
        raise ValueError(
            f"no Laplace approximation for subset_of_weights={subset.value!r} with "
            f"hessian_structure={structure.value!r}; available: {offered}"
        )
    return cls(model, likelihood, *args, **kwargs)
