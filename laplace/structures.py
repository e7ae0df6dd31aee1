"""The all-weights Laplace classes of the grid, one per Hessian structure.

Each declares its structure object (:mod:`laplace.posterior`) and, where the structure allows
it, the layer-by-layer GLM variance of networks of ``nn.Linear`` and ``nn.Conv2d`` layers;
the algorithm is :class:`~laplace.baselaplace.ParametricLaplace`'s. Split from
:mod:`laplace.baselaplace` to keep the shared algorithm and the per-structure details apart.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from laplace.baselaplace import ParametricLaplace
from laplace.posterior.base import Curvature
from laplace.posterior.dense import DenseCurvature
from laplace.posterior.diag import DiagCurvature
from laplace.posterior.kron import KronCurvature
from laplace.utils.enums import HessianStructure, Likelihood
from laplace.utils.linear_jacobians import factored_diagonal_variance, map_factors
from laplace.utils.matrix import Kron, KronDecomposed

__all__ = ["FullLaplace", "DiagLaplace", "KronLaplace"]


class FullLaplace(ParametricLaplace):
    """Laplace approximation with a dense posterior precision ``P`` (params x params)."""

    _structure = HessianStructure.FULL
    _curvature_cls = DenseCurvature


class DiagLaplace(ParametricLaplace):
    """Laplace approximation with a diagonal posterior precision."""

    _structure = HessianStructure.DIAG
    _curvature_cls = DiagCurvature
    _factored_predictive = True

    def _factored_variance(self, factors: list[tuple[Tensor, ...]]) -> Tensor:
        variance = self.posterior_variance  # the model's dtype, or higher when precise
        factors = map_factors(factors, lambda t: t.to(variance.dtype))
        return factored_diagonal_variance(factors, variance)


class KronLaplace(ParametricLaplace):
    """Laplace approximation with a Kronecker-factored (K-FAC) posterior precision.

    Each layer's block is ``B kron A`` (Martens & Grosse, 2015; Ritter et al., 2018); the
    prior is added in the factors' eigenbasis. With ``damping=True`` the prior is split
    evenly across the two factors (``(B + sqrt(d) I) kron (A + sqrt(d) I)``). Supports scalar
    and layerwise prior precisions.
    """

    _structure = HessianStructure.KRON
    _curvature_cls = KronCurvature
    _factored_predictive = True

    def _fitted_H(self) -> KronDecomposed:
        return self._curvature.public_decomposed()  # cached, as the posterior's

    @property
    def H_facs(self) -> Kron | None:
        """The accumulated Kronecker factors (``laplace-torch``'s ``H_facs``); None before
        :meth:`fit`."""
        return None if self._curvature is None else self._curvature.public()

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        damping: bool = False,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.damping = bool(damping)
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
        )

    def _make_curvature(self) -> Curvature:
        return KronCurvature.zeros(self.params, damping=self.damping)

    def _factored_variance(self, factors: list[tuple[Tensor, ...]]) -> Tensor:
        return self.posterior.inv_quad_factored(factors)

    def _check_prior_structure(self, value: Tensor) -> None:
        if value.numel() not in (1, self._n_blocks):
            raise ValueError(
                f"{type(self).__name__} supports a scalar or layerwise ({self._n_blocks} entries) "
                f"prior_precision, got {value.numel()} entries"
            )

    def _merge_fit(self, H_new: Curvature, n_data: int) -> None:
        """Combine with an earlier fit, weighting the data-averaged input factors by size."""
        n_old = self.n_data or 0
        if n_old:
            total = n_old + n_data
            _scale_input_factors(self._curvature.H, n_old / total)
            _scale_input_factors(H_new.H, n_data / total)
        self._curvature.add_(H_new.H)


def _scale_input_factors(kron: Kron, weight: float) -> None:
    for factors in kron.kfacs:
        if len(factors) == 2:
            factors[1].mul_(weight)
