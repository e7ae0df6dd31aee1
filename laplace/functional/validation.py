"""Tuning on validation data, for function-space classes without a marginal likelihood.

- :func:`mean_nll`: the mean negative log predictive density per validation example from
  Gaussian moments of the outputs (Gaussian for regression, a link approximation for
  classification).
- :func:`grid_search`: the candidate of a grid of prior precisions (or
  ``(prior_precision, sigma_noise)`` pairs) with the lowest validation score, each candidate
  recorded.

ELLA tunes with both (:meth:`~laplace.functional.ella.ELLA.optimize_hyperparameters`), as
laplace-torch does; VaLLA learns its hyperparameters in ``fit`` and records its own
validation NLL (the ``alpha = 1`` term of its objective, in the accumulation precision).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from laplace.predictive import apply_link
from laplace.utils.enums import Likelihood, LinkApprox

if TYPE_CHECKING:
    from laplace.base import BaseLaplace

__all__ = ["grid_search", "mean_nll"]


def mean_nll(
    likelihood: Likelihood,
    moments: Iterable[tuple[Tensor, Tensor, Tensor]],
    sigma_noise: Tensor,
    check_targets: Callable[[Tensor, Tensor], Tensor],
    link_approx: LinkApprox = LinkApprox.PROBIT,
    n_samples: int = 100,
) -> float:
    """Mean negative log predictive density per validation example.

    Regression: the Gaussian ``N(f, diag(f_var) + sigma^2)``, summed over the outputs.
    Classification and reward modelling (on pairs): the probabilities of ``link_approx``.

    Args:
        likelihood: The likelihood of the model.
        moments: ``(f, f_var, y)`` per batch: the mean and covariance of the outputs and
            the targets.
        sigma_noise: The observation noise (regression).
        check_targets: The backend's target check, ``(y, f) -> y``.
        link_approx: The approximation of ``E[softmax(f)]`` (classification).
        n_samples: Samples of the Monte Carlo link approximation.

    Shapes:
        ``f (batch, outputs), f_var (batch, outputs, outputs)``
    """
    total, count = 0.0, 0
    for f, f_var, y in moments:
        if likelihood == Likelihood.REGRESSION:
            y = check_targets(y[:, None] if y.ndim == 1 else y, f)
            var = f_var.diagonal(dim1=1, dim2=2) + sigma_noise.square()
            nll = 0.5 * ((y - f).square() / var + var.log() + math.log(2 * math.pi))
        else:
            y = y.argmax(-1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1)
            labels = check_targets(y, f)
            probs = apply_link(f, f_var, link_approx, n_samples)
            nll = -probs.gather(1, labels[:, None]).clamp_min(1e-30).log()
        total, count = total + float(nll.sum()), count + f.shape[0]
    return total / count


def grid_search(
    la: BaseLaplace, grid: Iterable, score: Callable[[], float], history: list[dict[str, Any]]
) -> None:
    """Set ``la``'s prior precision (and noise) to the candidate with the lowest ``score()``.

    Args:
        la: The Laplace approximation whose hyperparameters are searched.
        grid: Prior precisions, or ``(prior_precision, sigma_noise)`` pairs; the first of
            equal scores wins.
        score: The validation score of ``la`` at its current hyperparameters.
        history: Each candidate is appended as ``{"prior_precision", "sigma_noise",
            "val_nll"}``.

    Raises:
        ValueError: For an empty grid, or if no candidate has a finite score (the
            hyperparameters are then left as they were).
    """
    initial = (la.prior_precision, la.sigma_noise)
    best, best_score, n_candidates = None, float("inf"), 0
    for candidate in grid:
        n_candidates += 1
        _set_candidate(la, candidate)
        value = float(score())
        history.append(
            {
                "prior_precision": _plain(la.prior_precision),
                "sigma_noise": float(la.sigma_noise),
                "val_nll": value,
            }
        )
        if value < best_score:
            best, best_score = candidate, value
    la.prior_precision, la.sigma_noise = initial
    if best is None:
        reason = "is empty" if n_candidates == 0 else "gave no finite validation score"
        raise ValueError(f"the hyperparameter grid {reason}")
    _set_candidate(la, best)


def _set_candidate(la: BaseLaplace, candidate: Any) -> None:
    if isinstance(candidate, (tuple, list)):
        la.prior_precision, la.sigma_noise = candidate
    else:
        la.prior_precision = candidate


def _plain(value: Tensor) -> float | list[float]:
    """A scalar tensor as a float, a vector as a list of floats."""
    return value.item() if value.numel() == 1 else value.tolist()
