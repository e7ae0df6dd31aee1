"""Metrics of predicted class probabilities: calibration, proper scores and accuracy.

Confidence is the largest predicted probability of a sample and the prediction its class
(the first of tied classes). The calibration metrics bin the confidences into ``n_bins``
equal-width bins with edges ``edges = linspace(0, 1, n_bins + 1)``: bin ``b`` holds the
confidences in ``(edges[b], edges[b + 1]]``, and the first bin also holds ``0`` (Guo et al.,
*On Calibration of Modern Neural Networks*, ICML 2017; Naeini et al., AAAI 2015, for the
maximum calibration error).

``torchmetrics.functional.classification.calibration_error`` bins the other way round
(``[edges[b], edges[b + 1])``, with a confidence of exactly 1 in a bin of its own), so the two
agree except for confidences that fall exactly on an interior edge; this module keeps the
convention of ``laplace.utils.metrics`` and bins itself. :func:`accuracy` is torchmetrics'
micro-averaged multiclass accuracy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy

from laplace.evaluation._checks import check_classification, check_count, check_probs

__all__ = [
    "CalibrationBins",
    "accuracy",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "mean_confidence",
    "negative_log_likelihood",
]

_LOG_CLAMP = 1e-30


class CalibrationBins(NamedTuple):
    """Per-bin summary of confidences and correctness (equal-width bins).

    Attributes:
        counts: Number of samples per bin.
        confidences: Mean confidence per bin (0 for an empty bin).
        accuracies: Fraction of correct predictions per bin (0 for an empty bin).
        edges: Bin edges ``linspace(0, 1, n_bins + 1)``.

    Shapes:
        ``counts, confidences, accuracies (n_bins,), edges (n_bins + 1,)``
    """

    counts: Tensor
    confidences: Tensor
    accuracies: Tensor
    edges: Tensor

    @property
    def proportions(self) -> Tensor:
        """Fraction of the samples per bin, ``counts / counts.sum()``.

        Shapes:
            ``(n_bins,)``
        """
        return self.counts / self.counts.sum()


def bin_sums(probs: Tensor, targets: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin counts, summed confidences and summed correct predictions of checked inputs.

    The additive form of :func:`calibration_bins`, which streaming metrics accumulate.

    Args:
        probs: Predicted class probabilities (checked by the caller).
        targets: Integer class labels (checked by the caller).
        n_bins: Number of equal-width confidence bins (checked by the caller).

    Returns:
        ``(counts, confidence_sums, correct_sums)`` in the dtype of ``probs``.

    Shapes:
        ``probs (n, classes), targets (n,) -> 3 x (n_bins,)``
    """
    confidence, prediction = probs.max(dim=-1)
    correct = (prediction == targets).to(probs.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)
    index = torch.bucketize(confidence, edges[1:-1])
    counts = probs.new_zeros(n_bins).index_add_(0, index, torch.ones_like(confidence))
    confidence_sums = probs.new_zeros(n_bins).index_add_(0, index, confidence)
    correct_sums = probs.new_zeros(n_bins).index_add_(0, index, correct)
    return counts, confidence_sums, correct_sums


def bins_from_sums(
    counts: Tensor, confidence_sums: Tensor, correct_sums: Tensor
) -> CalibrationBins:
    """:class:`CalibrationBins` from the sums of :func:`bin_sums`.

    Shapes:
        ``3 x (n_bins,)``
    """
    per_bin = counts.clamp(min=1)
    n_bins = counts.shape[0]
    edges = torch.linspace(0, 1, n_bins + 1, dtype=counts.dtype, device=counts.device)
    return CalibrationBins(counts, confidence_sums / per_bin, correct_sums / per_bin, edges)


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> CalibrationBins:
    """Counts, mean confidences and accuracies in equal-width confidence bins.

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.
        n_bins: Number of bins; bin ``b`` holds confidences in ``(b / n_bins, (b + 1) /
            n_bins]`` and the first also holds 0.

    Returns:
        The per-bin summary.

    Raises:
        TypeError: If the inputs are not tensors of the right kinds or ``n_bins`` is not an
            integer.
        ValueError: For mismatched shapes, invalid probabilities or labels, or ``n_bins < 1``.

    Shapes:
        ``probs (n, classes), targets (n,) -> (n_bins,) per field, edges (n_bins + 1,)``
    """
    probs, targets = check_classification(probs, targets)
    return bins_from_sums(*bin_sums(probs, targets, check_count(n_bins, "n_bins")))


def calibration_errors_from_sums(
    counts: Tensor, confidence_sums: Tensor, correct_sums: Tensor
) -> tuple[Tensor, Tensor]:
    """ECE and MCE from per-bin sums.

    ``ECE = sum_b |correct_b - confidence_b| / n`` (sums per bin), and ``MCE`` the largest
    ``|accuracy_b - confidence_b|`` over the non-empty bins.

    Shapes:
        ``3 x (n_bins,) -> (), ()``
    """
    gaps = (correct_sums - confidence_sums).abs()
    ece = gaps.sum() / counts.sum()
    mce = (gaps / counts.clamp(min=1))[counts > 0].max()
    return ece, mce


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """Expected calibration error ``sum_b (n_b / n) |acc_b - conf_b|``.

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.
        n_bins: Number of equal-width confidence bins (see the module docstring).

    Returns:
        The ECE in ``[0, 1]``.

    Raises:
        TypeError: See :func:`calibration_bins`.
        ValueError: See :func:`calibration_bins`.

    Shapes:
        ``probs (n, classes), targets (n,) -> ()``
    """
    probs, targets = check_classification(probs, targets)
    sums = bin_sums(probs, targets, check_count(n_bins, "n_bins"))
    return calibration_errors_from_sums(*sums)[0]


def maximum_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """Maximum calibration error ``max_b |acc_b - conf_b|`` over the non-empty bins.

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.
        n_bins: Number of equal-width confidence bins (see the module docstring).

    Returns:
        The MCE in ``[0, 1]``.

    Raises:
        TypeError: See :func:`calibration_bins`.
        ValueError: See :func:`calibration_bins`.

    Shapes:
        ``probs (n, classes), targets (n,) -> ()``
    """
    probs, targets = check_classification(probs, targets)
    sums = bin_sums(probs, targets, check_count(n_bins, "n_bins"))
    return calibration_errors_from_sums(*sums)[1]


def brier_sum(probs: Tensor, targets: Tensor) -> Tensor:
    """Sum over samples of ``sum_c (p_c - onehot_c)^2`` for checked inputs.

    Shapes:
        ``probs (n, classes), targets (n,) -> ()``
    """
    picked = probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return probs.square().sum() - 2 * picked.sum() + probs.shape[0]


def brier_score(probs: Tensor, targets: Tensor) -> Tensor:
    """Brier score: the mean over samples of ``sum_c (p_c - 1[c = y])^2``.

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.

    Returns:
        The score in ``[0, 2]``; 0 for certain correct predictions.

    Raises:
        TypeError: See :func:`calibration_bins`.
        ValueError: See :func:`calibration_bins`.

    Shapes:
        ``probs (n, classes), targets (n,) -> ()``
    """
    probs, targets = check_classification(probs, targets)
    return brier_sum(probs, targets) / probs.shape[0]


def nll_sum(probs: Tensor, targets: Tensor) -> Tensor:
    """Sum over samples of ``-log p_y`` for checked inputs (``p_y`` clamped at 1e-30).

    Shapes:
        ``probs (n, classes), targets (n,) -> ()``
    """
    picked = probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return -picked.clamp(min=_LOG_CLAMP).log().sum()


def negative_log_likelihood(probs: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood ``-mean_i log p_i[y_i]``.

    A probability of 0 for the true class counts as ``1e-30`` (a loss of about 69), so the
    result stays finite.

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.

    Returns:
        The mean NLL.

    Raises:
        TypeError: See :func:`calibration_bins`.
        ValueError: See :func:`calibration_bins`.

    Shapes:
        ``probs (n, classes), targets (n,) -> ()``
    """
    probs, targets = check_classification(probs, targets)
    return nll_sum(probs, targets) / probs.shape[0]


def accuracy(probs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of samples whose most probable class is the target (torchmetrics).

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.

    Returns:
        The accuracy in ``[0, 1]``.

    Raises:
        TypeError: See :func:`calibration_bins`.
        ValueError: See :func:`calibration_bins`.

    Shapes:
        ``probs (n, classes), targets (n,) -> ()``
    """
    probs, targets = check_classification(probs, targets)
    n_classes = probs.shape[1]
    if n_classes == 1:  # torchmetrics needs two classes; one class is always right
        return probs.new_ones(())
    result = multiclass_accuracy(probs, targets, num_classes=n_classes, average="micro")
    return result.to(probs.dtype)


def mean_confidence(probs: Tensor) -> Tensor:
    """Mean over samples of the largest predicted probability.

    Args:
        probs: Predicted class probabilities.

    Returns:
        The mean confidence in ``[0, 1]``.

    Raises:
        TypeError: If ``probs`` is not a floating tensor.
        ValueError: For a shape other than ``(n, classes)`` or invalid probabilities.

    Shapes:
        ``probs (n, classes) -> ()``
    """
    return check_probs(probs).max(dim=-1).values.mean()
