"""The marginal likelihood (evidence) of a Laplace approximation and the posterior density.

The Laplace approximation of the log marginal likelihood is

    log p(D) ~ log p(D | theta_MAP) - 0.5 (log det P - log det P0 + scatter),
    scatter = (theta_MAP - mu0)^T P0 (theta_MAP - mu0)

(MacKay, 1992; Immer et al., ICML 2021). Its terms are large and nearly cancel, so they are
formed and combined in the accumulation precision (:mod:`laplace.utils.precision`) and only the
result is cast to the model's dtype; the public properties of each term are cast likewise.
``scatter`` reuses ``|theta_MAP - mu0|^2`` (per prior block) while neither mean changes: a
marginal-likelihood step only changes the prior precision.

:class:`EvidenceMixin` needs ``posterior``, ``mean``, ``prior_mean``, ``prior_precision``,
``sigma_noise``, ``_H_factor``, ``_loss``, ``likelihood``, ``n_data``, ``n_outputs``,
``subset.sizes``, ``_n_posterior``, ``_dtype``, ``_accumulation_dtype`` and
``_log_det_prior_precision`` from its host (a :class:`~laplace.baselaplace.ParametricLaplace`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from laplace.utils.enums import Likelihood

__all__ = ["EvidenceMixin"]


class EvidenceMixin:
    """The log marginal likelihood, its terms, and the posterior log density."""

    @property
    def log_det_posterior_precision(self) -> Tensor:
        return self.posterior.logdet().to(self._dtype)

    @property
    def log_det_ratio(self) -> Tensor:
        return self._log_det_ratio().to(self._dtype)

    def _log_det_ratio(self) -> Tensor:
        """``log det P - log det P0`` in the accumulation precision."""
        return self.posterior.logdet() - self._log_det_prior_precision()

    @property
    def scatter(self) -> Tensor:
        """``(theta - mu0)^T P0 (theta - mu0)``."""
        return self._scatter().to(self._dtype)

    def _scatter(self) -> Tensor:
        """:attr:`scatter` in the accumulation precision."""
        prior = self.prior_precision.to(self._accumulation_dtype)
        squares = self._squared_distance(prior.numel())
        return prior @ squares

    _squares_cache: tuple[Tensor, Tensor, int, int, int, Tensor] | None = None

    def _squared_distance(self, n_prior: int) -> Tensor:
        """``|mean - prior_mean|^2`` in the accumulation precision, summed over the blocks
        of a prior with ``n_prior`` entries (scalar, layerwise or per parameter); kept while
        neither mean changes (a marginal-likelihood step only changes the prior precision).

        Shapes:
            ``-> (n_prior,)``
        """
        mean, prior_mean = self.mean, self.prior_mean
        key = (mean._version, prior_mean._version, n_prior)
        cache = self._squares_cache
        if cache is not None and cache[0] is mean and cache[1] is prior_mean and cache[2:5] == key:
            return cache[5]
        squares = (mean - prior_mean).to(self._accumulation_dtype).square()
        if n_prior == 1:
            squares = squares.sum().reshape(1)
        elif n_prior != squares.numel():
            squares = torch.stack([part.sum() for part in squares.split(self.subset.sizes)])
        if not squares.requires_grad:
            self._squares_cache = (mean, prior_mean, *key, squares)
        return squares

    @property
    def log_likelihood(self) -> Tensor:
        """``log p(D | theta_MAP)``, differentiable in ``sigma_noise``."""
        return self._log_likelihood().to(self._dtype)

    def _log_likelihood(self) -> Tensor:
        """:attr:`log_likelihood` in the accumulation precision."""
        self._check_fitted()
        log_lik = -self._H_factor * self._loss
        if self.likelihood == Likelihood.REGRESSION:
            sigma = self.sigma_noise.to(self._accumulation_dtype)
            norm = self.n_data * self.n_outputs * torch.log(sigma * math.sqrt(2 * math.pi))
            log_lik = log_lik - norm
        return log_lik

    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """Laplace approximation of ``log p(D)``; values passed in replace the stored ones.

        Differentiable w.r.t. ``prior_precision`` and ``sigma_noise``. Its terms are
        combined in the accumulation precision (they are large and nearly cancel) and the
        result is returned in the model's dtype.
        """
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            self.sigma_noise = sigma_noise
        value = self._log_likelihood() - 0.5 * (self._log_det_ratio() + self._scatter())
        return value.to(self._dtype)

    def square_norm(self, value: Tensor) -> Tensor:
        """``(value - mean)^T P (value - mean)``."""
        return self._square_norm(value).to(self._dtype)

    def _square_norm(self, value: Tensor) -> Tensor:
        """:meth:`square_norm` in the accumulation precision."""
        return self.posterior.quad(value - self.mean)

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """Log density of ``value`` under the posterior."""
        log_prob = -0.5 * self._square_norm(value)
        if normalized:
            log_prob = log_prob + 0.5 * (
                self.posterior.logdet() - self._n_posterior * math.log(2 * math.pi)
            )
        return log_prob.to(self._dtype)
