"""Hyperparameters of a Laplace approximation: prior precision and mean, noise, temperature.

Values enter through property setters that check them once, at the boundary, and keep tensors
that require gradients attached to their graph (the marginal likelihood is differentiated
through them).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from laplace.errors import HyperparameterTypeError
from laplace.posterior.base import expand_prior
from laplace.utils.enums import Likelihood

__all__ = ["HyperparameterMixin"]


def _as_tensor(value: object, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            value = value.to(dtype)
        return value.to(device=device, dtype=dtype)
    if isinstance(value, Real) and not isinstance(value, bool):
        return torch.tensor(float(value), device=device, dtype=dtype)
    raise HyperparameterTypeError(
        f"{name} must be a number or a torch.Tensor, got {type(value).__name__}"
    )


def _check_positive(value: Tensor, name: str) -> None:
    with torch.no_grad():
        low, high = torch.aminmax(value.detach().reshape(-1))
        if not bool((low > 0) & (high < math.inf)):
            shown = value.detach().flatten()[:5].tolist()
            raise ValueError(f"{name} must be positive and finite, got {shown}")


class HyperparameterMixin:
    """Properties ``prior_precision``, ``prior_mean``, ``sigma_noise`` and ``temperature``.

    The host class provides ``likelihood``, ``_n_posterior``, ``_n_blocks``, ``subset.sizes``,
    ``_device``, ``_dtype`` and ``_accumulation_dtype``.
    """

    _posterior_cache: object | None = None

    @property
    def _parameters_known(self) -> bool:
        """Whether the parameters are known; while they are not (a last layer found on the
        first batch of ``fit``), the checks of the prior against them wait until they are."""
        return True

    def _init_hyperparameters(
        self,
        sigma_noise: float | Tensor,
        prior_precision: float | Tensor,
        prior_mean: float | Tensor,
        temperature: float,
    ) -> None:
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self.sigma_noise = sigma_noise
        self.temperature = temperature

    @property
    def prior_precision(self) -> Tensor:
        """Prior precision of shape ``(1,)``, ``(layers,)`` or ``(params,)``."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        value = _as_tensor(value, "prior_precision", self._device, self._dtype)
        if value.ndim > 1:
            raise ValueError(
                f"prior_precision must be a scalar or a 1-d tensor, got shape {tuple(value.shape)}"
            )
        value = value.reshape(-1)
        _check_positive(value, "prior_precision")
        if self._parameters_known:
            if value.numel() not in (1, self._n_blocks, self._n_posterior):
                raise ValueError(
                    f"prior_precision must have 1 (scalar), {self._n_blocks} (layerwise) or "
                    f"{self._n_posterior} (diagonal) entries, got {value.numel()}"
                )
            self._check_prior_structure(value)
        self._prior_precision = value
        self._posterior_cache = None

    def _check_prior_structure(self, value: Tensor) -> None:
        """Hook for structures that support only some prior shapes."""

    @property
    def prior_precision_diag(self) -> Tensor:
        """The prior precision expanded to one value per parameter, ``(params,)``."""
        return expand_prior(self.prior_precision, self.subset.sizes)

    @property
    def log_det_prior_precision(self) -> Tensor:
        """``log det P0``, from the scalar or per-layer values without expanding them."""
        return self._log_det_prior_precision().to(self._dtype)

    def _log_det_prior_precision(self) -> Tensor:
        """:attr:`log_det_prior_precision` in the accumulation precision."""
        prior = self.prior_precision.to(self._accumulation_dtype)
        if prior.numel() == self._n_posterior:
            return prior.log().sum()
        if prior.numel() == 1:
            return self._n_posterior * prior.log().sum()
        return (self._prior_counts(prior) * prior.log()).sum()

    def _prior_counts(self, prior: Tensor) -> Tensor:
        """Number of parameters each entry of a scalar or per-layer ``prior`` covers."""
        sizes = [self._n_posterior] if prior.numel() == 1 else self.subset.sizes
        return torch.as_tensor(sizes, device=prior.device, dtype=prior.dtype)

    @property
    def prior_mean(self) -> Tensor:
        """Prior mean, a scalar or ``(params,)`` tensor."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float | Tensor) -> None:
        value = _as_tensor(value, "prior_mean", self._device, self._dtype)
        if value.ndim > 1:
            raise ValueError(
                f"prior_mean must be a scalar or a 1-d tensor, got shape {tuple(value.shape)}"
            )
        if value.numel() == 1:
            value = value.reshape(())
        elif self._parameters_known and value.numel() != self._n_posterior:
            raise ValueError(
                f"prior_mean must be a scalar or have shape ({self._n_posterior},), "
                f"got shape {tuple(value.shape)}"
            )
        if not torch.isfinite(value).all():
            raise ValueError("prior_mean contains NaN or Inf")
        self._prior_mean = value

    @property
    def sigma_noise(self) -> Tensor:
        """Observation noise standard deviation (a 0-d tensor)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        value = _as_tensor(value, "sigma_noise", self._device, self._dtype)
        if value.ndim > 1 or value.numel() != 1:
            raise ValueError(
                "sigma_noise must be a scalar (only homoscedastic noise is supported), "
                f"got shape {tuple(value.shape)}"
            )
        value = value.reshape(())
        _check_positive(value, "sigma_noise")
        if self.likelihood != Likelihood.REGRESSION and float(value) != 1.0:
            raise ValueError(
                f"sigma_noise must be 1 for likelihood={self.likelihood.value!r}, "
                f"got {float(value)!r}"
            )
        self._sigma_noise = value
        self._posterior_cache = None

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (Real, Tensor)):
            raise HyperparameterTypeError(f"temperature must be a positive number, got {value!r}")
        if not float(value) > 0 or not math.isfinite(float(value)):
            raise ValueError(f"temperature must be positive and finite, got {value!r}")
        self._temperature = float(value)
        self._posterior_cache = None

    @property
    def _H_factor(self) -> Tensor:
        """Likelihood factor ``1 / (sigma_noise^2 * temperature)`` of the curvature, in the
        accumulation precision."""
        sigma = self.sigma_noise.to(self._accumulation_dtype)
        return 1.0 / (sigma.square() * self.temperature)
