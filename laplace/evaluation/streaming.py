"""Streaming metrics (``torchmetrics.Metric``) for validation loops and prior tuning.

Each metric accumulates additive sums batch by batch (``update``) and returns the same value
as its function in :mod:`laplace.evaluation` on the concatenated batches (``compute``), for
batches of any sizes. The sums are kept in float64 whatever the dtype of the predictions.

Metrics of Gaussian predictives declare ``needs_variance = True``:
:func:`laplace.utils.validate` (and so ``optimize_prior_precision(method="gridsearch")``) then
calls ``update(mean, var, targets)`` with the predictive variance of the targets. The others
are called as ``update(prediction, targets)``.

:func:`get_metric` turns the names accepted by ``optimize_prior_precision(loss=...)`` into
metric objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanSquaredError, Metric
from torchmetrics.classification import MulticlassAccuracy

from laplace.errors import UnknownOptionError
from laplace.evaluation._checks import (
    check_classification,
    check_count,
    check_regression,
    check_regression_mean,
)
from laplace.evaluation.classification import (
    bin_sums,
    brier_sum,
    calibration_errors_from_sums,
    nll_sum,
)
from laplace.evaluation.regression import crps_sum, gaussian_nll_sum
from laplace.utils.enums import Likelihood, parse_enum

__all__ = [
    "BrierScore",
    "ExpectedCalibrationError",
    "GaussianCRPS",
    "GaussianNLL",
    "MaximumCalibrationError",
    "NegativeLogLikelihood",
    "RootMeanSquaredError",
    "get_metric",
    "metric_names",
]


class _SumMetric(Metric):
    """A metric that is a ratio ``total / count`` of two running sums.

    Args:
        **kwargs: Options of ``torchmetrics.Metric`` (``sync_on_compute``, say).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    needs_variance = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, total: Tensor, count: int) -> None:
        self.total = self.total + total.detach().to(self.total)
        self.count = self.count + count

    def compute(self) -> Tensor:
        """The ratio of the accumulated sums (NaN before any update).

        Shapes:
            ``()``
        """
        return self.total / self.count


class _ClassificationScore(_SumMetric):
    """A per-sample score of predicted class probabilities, averaged over samples;
    subclasses name the per-batch sum in ``_batch_sum``."""

    _batch_sum: Callable[[Tensor, Tensor], Tensor]

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            probs: Predicted class probabilities.
            targets: Integer class labels.

        Raises:
            TypeError: If the inputs are not tensors of the right kinds.
            ValueError: For mismatched shapes or invalid probabilities or labels.

        Shapes:
            ``probs (batch, classes), targets (batch,)``
        """
        probs, targets = check_classification(probs, targets)
        self._add(type(self)._batch_sum(probs, targets), probs.shape[0])


class NegativeLogLikelihood(_ClassificationScore):
    """Mean negative log-likelihood of integer labels (see
    :func:`~laplace.evaluation.negative_log_likelihood`)."""

    _batch_sum = staticmethod(nll_sum)


class BrierScore(_ClassificationScore):
    """Mean Brier score (see :func:`~laplace.evaluation.brier_score`)."""

    _batch_sum = staticmethod(brier_sum)


class ExpectedCalibrationError(Metric):
    """Expected calibration error over equal-width confidence bins (see
    :func:`~laplace.evaluation.expected_calibration_error`); keeps ``3 * n_bins`` sums.

    Args:
        n_bins: Number of bins.
        **kwargs: Options of ``torchmetrics.Metric`` (``sync_on_compute``, say).

    Raises:
        TypeError: If ``n_bins`` is not an integer.
        ValueError: If ``n_bins < 1``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    needs_variance = False
    _maximum = False

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_bins = check_count(n_bins, "n_bins")
        for name in ("counts", "confidence_sums", "correct_sums"):
            default = torch.zeros(self.n_bins, dtype=torch.float64)
            self.add_state(name, default=default, dist_reduce_fx="sum")

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            probs: Predicted class probabilities.
            targets: Integer class labels.

        Raises:
            TypeError: If the inputs are not tensors of the right kinds.
            ValueError: For mismatched shapes or invalid probabilities or labels.

        Shapes:
            ``probs (batch, classes), targets (batch,)``
        """
        probs, targets = check_classification(probs, targets)
        counts, confidence_sums, correct_sums = bin_sums(probs, targets, self.n_bins)
        self.counts = self.counts + counts.detach().to(self.counts)
        self.confidence_sums = self.confidence_sums + confidence_sums.detach().to(self.counts)
        self.correct_sums = self.correct_sums + correct_sums.detach().to(self.counts)

    def compute(self) -> Tensor:
        """The calibration error of the accumulated bins (NaN before any update).

        Shapes:
            ``()``
        """
        if not self.counts.sum() > 0:
            return torch.full((), float("nan"), dtype=self.counts.dtype, device=self.device)
        ece, mce = calibration_errors_from_sums(
            self.counts, self.confidence_sums, self.correct_sums
        )
        return mce if self._maximum else ece


class MaximumCalibrationError(ExpectedCalibrationError):
    """Maximum calibration error over the non-empty bins (see
    :func:`~laplace.evaluation.maximum_calibration_error`).

    Args:
        n_bins: Number of bins.
        **kwargs: Options of ``torchmetrics.Metric`` (``sync_on_compute``, say).

    Raises:
        TypeError: If ``n_bins`` is not an integer.
        ValueError: If ``n_bins < 1``.
    """

    _maximum = True


class _GaussianScore(_SumMetric):
    """A proper score of Gaussian predictives, summed over outputs and averaged over samples;
    subclasses name the per-batch sum in ``_batch_sum``."""

    needs_variance = True
    _batch_sum: Callable[[Tensor, Tensor, Tensor], Tensor]

    def update(self, mean: Tensor, var: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            mean: Predictive means.
            var: Predictive variances of the targets (or output covariances).
            targets: Observed values.

        Raises:
            TypeError: If an argument is not a tensor.
            ValueError: For mismatched shapes, non-finite entries or variances that are not
                positive.

        Shapes:
            ``mean (batch,) | (batch, outputs), var like mean, targets like mean``
        """
        mean, var, targets = check_regression(mean, var, targets)
        self._add(type(self)._batch_sum(mean, var, targets), mean.shape[0])


class GaussianNLL(_GaussianScore):
    """Gaussian negative log-likelihood, summed over outputs and averaged over samples (see
    :func:`~laplace.evaluation.gaussian_nll`)."""

    _batch_sum = staticmethod(gaussian_nll_sum)


class GaussianCRPS(_GaussianScore):
    """Closed-form Gaussian CRPS, summed over outputs and averaged over samples (see
    :func:`~laplace.evaluation.crps_gaussian`)."""

    _batch_sum = staticmethod(crps_sum)


class RootMeanSquaredError(_SumMetric):
    """Root mean squared error over all entries (see :func:`~laplace.evaluation.rmse`)."""

    def update(self, mean: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            mean: Predictive means.
            targets: Observed values.

        Raises:
            TypeError: If an argument is not a tensor.
            ValueError: For mismatched shapes or non-finite entries.

        Shapes:
            ``mean (batch,) | (batch, outputs), targets like mean``
        """
        mean, targets = check_regression_mean(mean, targets)
        self._add((targets - mean).square().sum(), mean.numel())

    def compute(self) -> Tensor:
        """The RMSE of the accumulated entries (NaN before any update).

        Shapes:
            ``()``
        """
        return super().compute().sqrt()


def _accuracy(n_outputs: int, **kwargs: Any) -> Metric:
    if n_outputs < 2:
        raise ValueError(f"loss='accuracy' needs at least 2 classes, got n_outputs={n_outputs}")
    return MulticlassAccuracy(num_classes=n_outputs, average="micro", **kwargs)


def _mse(n_outputs: int, **kwargs: Any) -> Metric:
    return MeanSquaredError(num_outputs=n_outputs, **kwargs)


def _ignoring_outputs(metric_class: type[Metric]) -> Callable[..., Metric]:
    def make(n_outputs: int, **kwargs: Any) -> Metric:
        return metric_class(**kwargs)

    return make


_CLASSIFICATION = {
    "ece": _ignoring_outputs(ExpectedCalibrationError),
    "mce": _ignoring_outputs(MaximumCalibrationError),
    "nll": _ignoring_outputs(NegativeLogLikelihood),
    "brier": _ignoring_outputs(BrierScore),
    "accuracy": _accuracy,
}
_REGRESSION = {
    "mse": _mse,
    "rmse": _ignoring_outputs(RootMeanSquaredError),
    "nll": _ignoring_outputs(GaussianNLL),
    "gaussian_nll": _ignoring_outputs(GaussianNLL),
    "crps": _ignoring_outputs(GaussianCRPS),
}


def metric_names(likelihood: Likelihood | str = Likelihood.CLASSIFICATION) -> tuple[str, ...]:
    """The metric names :func:`get_metric` accepts for a likelihood.

    Args:
        likelihood: ``"classification"``, ``"regression"`` or ``"reward_modeling"`` (whose
            names are the classification ones).

    Returns:
        The names, in a fixed order.

    Raises:
        ValueError: For an unknown likelihood.
    """
    likelihood = parse_enum(Likelihood, likelihood, "likelihood")
    return tuple(_REGRESSION if likelihood == Likelihood.REGRESSION else _CLASSIFICATION)


def get_metric(
    name: str,
    likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
    n_outputs: int = 1,
    **kwargs: Any,
) -> Metric:
    """A fresh streaming metric from its name.

    Classification: ``"ece"``, ``"mce"`` (15 bins), ``"nll"``, ``"brier"``, ``"accuracy"``
    (maximised by prior tuning: its ``higher_is_better`` is True). Regression: ``"mse"``
    (torchmetrics, one value per output, summed by the validation loop), ``"rmse"``,
    ``"nll"`` or ``"gaussian_nll"``, ``"crps"``. Names are case-insensitive.

    Args:
        name: The metric name.
        likelihood: The likelihood whose names apply (``"reward_modeling"``: classification).
        n_outputs: Number of model outputs (classes), for ``"mse"`` and ``"accuracy"``.
        **kwargs: Options of ``torchmetrics.Metric`` (``sync_on_compute``, say).

    Returns:
        The metric, on the CPU (move it with ``.to(device)``).

    Raises:
        TypeError: If ``name`` is not a string.
        UnknownOptionError: A ``ValueError``, for a name the likelihood does not accept;
            the message lists the accepted ones.
        ValueError: For an unknown likelihood, or ``"accuracy"`` with fewer than 2 classes.
    """
    if not isinstance(name, str):
        raise TypeError(f"a metric name must be a string, got {type(name).__name__}")
    likelihood = parse_enum(Likelihood, likelihood, "likelihood")
    table = _REGRESSION if likelihood == Likelihood.REGRESSION else _CLASSIFICATION
    factory = table.get(name.lower())
    if factory is None:
        accepted = ", ".join(repr(key) for key in table)
        raise UnknownOptionError(
            f"loss={name!r} is not a metric for likelihood={likelihood.value!r}; accepted "
            f"names: {accepted}, or a torchmetrics Metric (object or class) or a callable"
        )
    return factory(check_count(n_outputs, "n_outputs"), **kwargs)
