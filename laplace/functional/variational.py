"""The variational objective of :class:`~laplace.functional.valla.VaLLA` and its
trainable hyperparameters.

- :class:`TrainableHyperparameters`: the prior precision and the noise as trainable
  log-parameters.
- :func:`alpha_log_likelihood`: the power (alpha-divergence) data term
  ``sum_n (1/alpha) log E_q[p(y_n | f_n)^alpha]`` for Gaussian marginals of the outputs.
- :func:`targets`: the targets checked against the outputs.

Everything is computed in the dtype of its inputs; VaLLA passes the accumulation dtype.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor, nn

from laplace.hyperparameters import HyperparameterMixin
from laplace.utils.enums import Likelihood

__all__ = [
    "TrainableHyperparameters",
    "alpha_log_likelihood",
    "fresh_parameter",
    "labels",
    "targets",
]


class TrainableHyperparameters:
    """``prior_precision`` (a scalar) and ``sigma_noise`` kept as trainable log-parameters
    ``log_prior_precision`` ``(1,)`` and ``log_noise_variance`` ``()`` (regression; else None)
    in the accumulation dtype, and ``prior_mean`` fixed at zero. The setters check values as
    :class:`~laplace.hyperparameters.HyperparameterMixin` does (which must follow this class
    in the method order) and replace the parameters, keeping their ``requires_grad``.
    """

    def _check_prior_structure(self, value: Tensor) -> None:
        if value.numel() != 1:
            raise ValueError(
                f"prior_precision must be a scalar for {type(self).__name__} (it is trained "
                f"as one log precision), got {value.numel()} entries"
            )

    @property
    def prior_precision(self) -> Tensor:
        """The scalar prior precision ``exp(log_prior_precision)``, ``(1,)``."""
        return self.log_prior_precision.detach().exp().to(self._dtype)

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        HyperparameterMixin.prior_precision.fset(self, value)
        log = self._prior_precision.detach().to(self._accumulation_dtype).log()
        self.log_prior_precision = fresh_parameter(log, getattr(self, "log_prior_precision", None))

    @property
    def sigma_noise(self) -> Tensor:
        """The noise standard deviation ``exp(log_noise_variance / 2)`` (1 outside regression)."""
        log = getattr(self, "log_noise_variance", None)
        return self._sigma_noise if log is None else (0.5 * log.detach()).exp().to(self._dtype)

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        HyperparameterMixin.sigma_noise.fset(self, value)
        if self.likelihood == Likelihood.REGRESSION:
            log = 2 * self._sigma_noise.detach().to(self._accumulation_dtype).log()
            self.log_noise_variance = fresh_parameter(
                log, getattr(self, "log_noise_variance", None)
            )
        else:
            self.log_noise_variance = None

    @property
    def prior_mean(self) -> Tensor:
        """The prior mean: zero (the GP is centred on the network)."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float | Tensor) -> None:
        if isinstance(value, (Real, Tensor)) and bool(torch.as_tensor(value).ne(0).any()):
            raise ValueError(
                f"prior_mean must be 0 for {type(self).__name__} (its GP prior is centred on "
                f"the network output), got {torch.as_tensor(value).flatten()[:5].tolist()}"
            )
        HyperparameterMixin.prior_mean.fset(self, value)


def fresh_parameter(value: Tensor, previous: Tensor | None) -> nn.Parameter:
    """A new parameter holding a copy of ``value``, trainable like ``previous``."""
    trainable = True if previous is None else previous.requires_grad
    return nn.Parameter(value.detach().clone(), requires_grad=trainable)


def alpha_log_likelihood(
    likelihood: Likelihood,
    f_mu: Tensor,
    f_cov: Tensor,
    y: Tensor,
    alpha: float,
    noise_variance: Tensor | None = None,
    mc_samples: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``sum_n (1/alpha) log E[p(y_n | f_n)^alpha]`` for ``f_n ~ N(f_mu_n, f_cov_n)``.

    ``alpha = 0`` is the limit ``sum_n E[log p(y_n | f_n)]``. Regression (Gaussian noise of
    variance ``noise_variance``) is in closed form,
    ``-((y - mu)^2 / (s2 + alpha v) + log(1 + alpha v / s2) / alpha + log(2 pi s2)) / 2``
    per output. Classification averages ``mc_samples`` reparametrised draws (Cholesky roots
    of ``f_cov``, noise from ``generator``) or, with none, takes the probit approximation
    ``log softmax(f_mu / sqrt(1 + pi/8 diag f_cov))_y`` for every ``alpha``.

    Shapes:
        ``f_mu (batch, outputs), f_cov (batch, outputs, outputs)``, ``y (batch, outputs)``
        (regression) or ``(batch,)`` (labels) ``-> ()``
    """
    var = f_cov.diagonal(dim1=1, dim2=2)
    if likelihood == Likelihood.REGRESSION:
        squares = (y - f_mu).square()
        if alpha == 0:
            energy = (squares + var) / noise_variance
        else:
            spread = torch.log1p(alpha * var / noise_variance) / alpha
            energy = squares / (noise_variance + alpha * var) + spread
        return -0.5 * (energy + torch.log(2 * math.pi * noise_variance)).sum()
    if mc_samples == 0:
        scaled = f_mu / torch.sqrt(1 + math.pi / 8 * var)
        return -nn.functional.cross_entropy(scaled, y, reduction="sum")
    S = mc_samples
    noise = torch.randn(
        (S, *f_mu.shape), generator=generator, device=f_mu.device, dtype=f_mu.dtype
    )
    draws = f_mu + torch.einsum("bcd,sbd->sbc", _cholesky(f_cov), noise)
    picked = draws.log_softmax(-1).gather(-1, y[None, :, None].expand(S, -1, 1))[..., 0]
    if alpha == 0:
        return picked.mean(0).sum()
    return ((torch.logsumexp(alpha * picked, 0) - math.log(S)) / alpha).sum()


def _cholesky(cov: Tensor) -> Tensor:
    """Cholesky factors of ``(batch, C, C)`` covariances, with growing jitter if needed."""
    root, info = torch.linalg.cholesky_ex(cov)
    jitter = 1e-10 * cov.diagonal(dim1=1, dim2=2).mean().detach().clamp_min(1e-30)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    while bool(info.any()) and jitter < 1:
        root, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        jitter = jitter * 100
    return root


def labels(y: Tensor) -> Tensor:
    """Class indices ``(batch,)`` from labels ``(batch,)``, ``(batch, 1)`` or one-hot rows."""
    if y.ndim == 2:
        y = y[:, 0] if y.shape[1] == 1 else y.argmax(-1)
    return y.long()


def targets(y: Tensor, f: Tensor, likelihood: Likelihood) -> Tensor:
    """``y`` checked against the outputs ``f``: floats of ``f``'s shape (regression; also
    ``(batch,)`` for one output) or class indices ``(batch,)``.

    Raises:
        ValueError: For targets of the wrong shape, type or label range.
    """
    if likelihood == Likelihood.REGRESSION:
        if y.ndim == 1 and f.shape[1] == 1:
            y = y[:, None]
        if not y.is_floating_point() or y.shape != f.shape:
            raise ValueError(
                f"regression targets y must be floating with the output's shape "
                f"{tuple(f.shape)}, got {y.dtype} of shape {tuple(y.shape)}"
            )
        return y.to(f.dtype)
    y = labels(y)
    if y.shape != f.shape[:1] or bool((y < 0).any() | (y >= f.shape[1]).any()):
        raise ValueError(
            f"classification targets y must be {f.shape[0]} labels in [0, {f.shape[1]}), got "
            f"shape {tuple(y.shape)}"
        )
    return y
