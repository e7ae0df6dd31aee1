"""Prior-precision calibration on a validation metric, through the public tuning method."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from torch import Tensor
from torchmetrics import Metric

if TYPE_CHECKING:
    from laplace.base import BaseLaplace

__all__ = ["calibrate_prior_precision"]


def calibrate_prior_precision(
    la: BaseLaplace,
    val_loader: Iterable,
    metric: str | Metric | type[Metric] | Callable = "ece",
    pred_type: str = "glm",
    link_approx: str = "probit",
    grid_size: int = 100,
    log_prior_prec_min: float = -4,
    log_prior_prec_max: float = 4,
    refine: int = 0,
    n_samples: int = 100,
    progress_bar: bool = False,
) -> Tensor:
    """Set ``la.prior_precision`` to the grid value with the best ``metric`` on validation data.

    A shorthand for ``la.optimize_prior_precision(method="gridsearch", loss=metric, ...)``:
    the fitted curvature is kept, and the prior-independent part of the predictive is
    computed once per validation batch.

    Args:
        la: A fitted Laplace approximation.
        val_loader: Validation batches ``(X, y)`` or dict-like.
        metric: A metric name (see :func:`~laplace.evaluation.get_metric`), a
            ``torchmetrics.Metric`` object or class, or a callable ``loss(means, targets)``.
        pred_type: The predictive scored, ``"glm"`` or ``"nn"``.
        link_approx: The link approximation of the GLM classification predictive.
        grid_size: Number of log-spaced prior precisions.
        log_prior_prec_min: ``log10`` of the smallest prior precision.
        log_prior_prec_max: ``log10`` of the largest prior precision.
        refine: Points of a finer log grid between the neighbours of the best grid value.
        n_samples: Samples of sampling-based predictives.
        progress_bar: Show a progress bar.

    Returns:
        The chosen prior precision (also set on ``la``).

    Raises:
        ValueError: For the errors of ``optimize_prior_precision`` (unknown metric names,
            bad grid options, an unfitted ``la``).
        NotImplementedError: For classes that tune on their own criterion (``ELLA`` scores
            by the validation NLL, ``VaLLA`` learns its prior in ``fit``).
    """
    la.optimize_prior_precision(
        pred_type=pred_type,
        method="gridsearch",
        val_loader=val_loader,
        loss=metric,
        log_prior_prec_min=log_prior_prec_min,
        log_prior_prec_max=log_prior_prec_max,
        grid_size=grid_size,
        link_approx=link_approx,
        n_samples=n_samples,
        progress_bar=progress_bar,
        **({"refine": refine} if refine else {}),  # classes without refine get refine=0
    )
    return la.prior_precision
