"""Metrics of Gaussian predictives ``N(mean, var)`` for regression targets.

Every function takes predictive means ``(n,)`` or ``(n, outputs)``, variances of the same
shape (or output covariances ``(n, outputs, outputs)``, of which the diagonal is used) and
targets of the mean's shape. The variance is the one of the *targets*: for a Laplace
predictive ``(f_mu, f_var)`` of a regression model with noise ``sigma``, pass
``f_var + sigma**2`` (prior tuning does this for you).

Conventions: the proper scores (:func:`gaussian_nll`, :func:`crps_gaussian`) are summed over
the outputs and averaged over the samples (the score of the joint diagonal Gaussian per
sample); :func:`rmse`, :func:`interval_coverage` and :func:`calibration_chi2` average over
all entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from laplace.evaluation._checks import (
    check_count,
    check_levels,
    check_regression,
    check_regression_mean,
)

__all__ = [
    "CoverageCurve",
    "calibration_chi2",
    "crps_gaussian",
    "gaussian_nll",
    "interval_coverage",
    "regression_calibration_curve",
    "rmse",
]


class CoverageCurve(NamedTuple):
    """Expected against observed coverage of central Gaussian intervals.

    Attributes:
        expected: Nominal coverage levels, ``linspace(0, 1, n_levels)``.
        observed: Fraction of the targets inside the central interval of each level.

    Shapes:
        ``expected, observed (n_levels,)``
    """

    expected: Tensor
    observed: Tensor


def gaussian_nll_sum(mean: Tensor, var: Tensor, targets: Tensor) -> Tensor:
    """Sum over all entries of ``0.5 log(2 pi var) + (y - mean)^2 / (2 var)`` (checked inputs).

    Shapes:
        ``mean, var, targets (n,) | (n, outputs) -> ()``
    """
    return 0.5 * ((targets - mean).square() / var + var.log() + math.log(2 * math.pi)).sum()


def gaussian_nll(mean: Tensor, var: Tensor, targets: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood ``0.5 log(2 pi var) + (y - mean)^2 / (2 var)``.

    Args:
        mean: Predictive means.
        var: Predictive variances of the targets (or output covariances).
        targets: Observed values.

    Returns:
        The NLL, summed over the outputs and averaged over the samples.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: For mismatched shapes, no samples, non-finite entries or variances that
            are not positive.

    Shapes:
        ``mean (n,) | (n, outputs), var like mean | (n, outputs, outputs), targets like mean
        -> ()``
    """
    mean, var, targets = check_regression(mean, var, targets)
    return gaussian_nll_sum(mean, var, targets) / mean.shape[0]


def rmse(mean: Tensor, targets: Tensor) -> Tensor:
    """Root mean squared error ``sqrt(mean (y - mean)^2)`` over all entries.

    Args:
        mean: Predictive means.
        targets: Observed values.

    Returns:
        The RMSE.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: For mismatched shapes, no samples or non-finite entries.

    Shapes:
        ``mean (n,) | (n, outputs), targets like mean -> ()``
    """
    mean, targets = check_regression_mean(mean, targets)
    return (targets - mean).square().mean().sqrt()


def _central_halfwidths(levels: Tensor) -> Tensor:
    """``z`` with ``P(|Z| <= z) = level`` for a standard normal ``Z``: ``sqrt(2) erfinv(l)``."""
    return math.sqrt(2.0) * torch.special.erfinv(levels)


def _coverage(mean: Tensor, var: Tensor, targets: Tensor, levels: Tensor) -> Tensor:
    standardized = ((targets - mean).abs() / var.sqrt()).reshape(-1)
    inside = standardized[None, :] <= _central_halfwidths(levels)[:, None]
    return inside.to(mean.dtype).mean(dim=-1)


def interval_coverage(
    mean: Tensor,
    var: Tensor,
    targets: Tensor,
    levels: Sequence[float] | Tensor = (0.5, 0.9, 0.95),
) -> Tensor:
    """Fraction of targets inside the central Gaussian interval of each level.

    The interval of level ``l`` is ``mean +- z_l sqrt(var)`` with ``z_l = sqrt(2)
    erfinv(l)`` (``1.645`` for 0.9); a calibrated predictive covers a fraction ``l``.

    Args:
        mean: Predictive means.
        var: Predictive variances of the targets (or output covariances).
        targets: Observed values.
        levels: Nominal coverage levels in ``[0, 1]``.

    Returns:
        The observed coverage per level, over all entries.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: For mismatched shapes, non-finite entries, variances that are not
            positive, no levels or a level outside ``[0, 1]``.

    Shapes:
        ``mean (n,) | (n, outputs), var like mean, targets like mean -> (levels,)``
    """
    mean, var, targets = check_regression(mean, var, targets)
    return _coverage(mean, var, targets, check_levels(levels, mean))


def calibration_chi2(mean: Tensor, var: Tensor, targets: Tensor) -> Tensor:
    """Reduced chi-squared statistic: the mean of the squared normalised residuals.

    ``mean_i (y_i - mean_i)^2 / var_i`` over all entries. Under a calibrated Gaussian
    predictive each term is chi-squared with one degree of freedom, so the statistic is 1 in
    expectation: larger means over-confident variances, smaller under-confident ones.

    Args:
        mean: Predictive means.
        var: Predictive variances of the targets (or output covariances).
        targets: Observed values.

    Returns:
        The statistic.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: For mismatched shapes, non-finite entries or variances that are not
            positive.

    Shapes:
        ``mean (n,) | (n, outputs), var like mean, targets like mean -> ()``
    """
    mean, var, targets = check_regression(mean, var, targets)
    return ((targets - mean).square() / var).mean()


def crps_sum(mean: Tensor, var: Tensor, targets: Tensor) -> Tensor:
    """Sum over all entries of the Gaussian CRPS (checked inputs).

    Shapes:
        ``mean, var, targets (n,) | (n, outputs) -> ()``
    """
    sigma = var.sqrt()
    z = (targets - mean) / sigma
    cdf = 0.5 * (1 + torch.special.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    return (sigma * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))).sum()


def crps_gaussian(mean: Tensor, var: Tensor, targets: Tensor) -> Tensor:
    """Continuous ranked probability score of a Gaussian predictive, in closed form.

    ``CRPS(N(mu, sigma^2), y) = sigma [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)]`` with
    ``z = (y - mu) / sigma`` (Gneiting and Raftery, JASA 2007), the integral of
    ``(F(x) - 1[x >= y])^2`` over ``x``. It has the units of the targets; 0 is best.

    Args:
        mean: Predictive means.
        var: Predictive variances of the targets (or output covariances).
        targets: Observed values.

    Returns:
        The CRPS, summed over the outputs and averaged over the samples.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: For mismatched shapes, non-finite entries or variances that are not
            positive.

    Shapes:
        ``mean (n,) | (n, outputs), var like mean, targets like mean -> ()``
    """
    mean, var, targets = check_regression(mean, var, targets)
    return crps_sum(mean, var, targets) / mean.shape[0]


def regression_calibration_curve(
    mean: Tensor, var: Tensor, targets: Tensor, n_levels: int = 21
) -> CoverageCurve:
    """Observed coverage of central Gaussian intervals at evenly spaced nominal levels.

    The data of the regression proportion diagram: a calibrated predictive lies on the
    diagonal, an over-confident one below it.

    Args:
        mean: Predictive means.
        var: Predictive variances of the targets (or output covariances).
        targets: Observed values.
        n_levels: Number of levels ``linspace(0, 1, n_levels)``, at least 2.

    Returns:
        Expected and observed coverage.

    Raises:
        TypeError: If an argument is not a tensor or ``n_levels`` not an integer.
        ValueError: For mismatched shapes, non-finite entries, variances that are not
            positive, or ``n_levels < 2``.

    Shapes:
        ``mean (n,) | (n, outputs), var like mean, targets like mean -> 2 x (n_levels,)``
    """
    n_levels = check_count(n_levels, "n_levels", minimum=2)
    mean, var, targets = check_regression(mean, var, targets)
    expected = torch.linspace(0, 1, n_levels, dtype=mean.dtype, device=mean.device)
    return CoverageCurve(expected, _coverage(mean, var, targets, expected))
