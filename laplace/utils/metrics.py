"""Metrics for predictive distributions: running negative log-likelihood and calibration.

The laplace-torch-compatible names, kept with their signatures and return types; the
implementations are those of :mod:`laplace.evaluation` (equal-width confidence bins, Guo et
al., ICML 2017), which has more metrics, streaming versions and diagrams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric

from laplace.evaluation import classification, plots

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["RunningNLLMetric", "expected_calibration_error", "reliability_diagram"]


class RunningNLLMetric(Metric):
    """Mean negative log-likelihood of integer targets, accumulated over batches.

    Leading dimensions of the probabilities (tokens of a sequence, say) are flattened, and
    targets are cast to integers; :class:`laplace.evaluation.NegativeLogLikelihood` is the
    checked ``(batch, classes)`` version.

    Args:
        ignore_index: Targets equal to this value are skipped.
        **kwargs: Options of ``torchmetrics.Metric`` (``sync_on_compute``, say).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("nll_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_targets", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch of predicted probabilities and targets.

        Args:
            probs: Predicted class probabilities.
            targets: Class labels, or ``ignore_index``.

        Shapes:
            ``probs (..., classes), targets (...)``
        """
        probs = probs.reshape(-1, probs.shape[-1])
        targets = targets.reshape(-1).long()
        keep = targets != self.ignore_index
        self.nll_sum = self.nll_sum + classification.nll_sum(probs[keep], targets[keep])
        self.n_targets = self.n_targets + keep.sum()

    def compute(self) -> Tensor:
        """The mean negative log-likelihood over the counted targets.

        Shapes:
            ``()``
        """
        return self.nll_sum / self.n_targets


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error ``sum_b (n_b / n) |acc_b - conf_b|``.

    :func:`laplace.evaluation.expected_calibration_error` as a Python float.

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.
        n_bins: Number of equal-width confidence bins.

    Returns:
        The ECE in ``[0, 1]``.

    Shapes:
        ``probs (batch, classes), targets (batch,)``

    Raises:
        TypeError: If ``targets`` is not an integer tensor or ``n_bins`` not an integer.
        ValueError: If ``n_bins`` is not positive or the shapes do not match.
    """
    return float(classification.expected_calibration_error(probs, targets, n_bins))


def reliability_diagram(
    probs: Tensor, targets: Tensor, n_bins: int = 15, ax: Axes | None = None
) -> Axes:
    """Plot accuracy against confidence per bin, with the diagonal of perfect calibration.

    One bar per bin (height 0 for an empty bin); :func:`laplace.evaluation.reliability_diagram`
    draws the same with the calibration gap shaded and returns the figure.

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.
        n_bins: Number of equal-width confidence bins.
        ax: Matplotlib axes to draw on (default: a new ``pyplot`` figure).

    Returns:
        The axes.

    Shapes:
        ``probs (batch, classes), targets (batch,)``
    """
    classification.calibration_bins(probs, targets, n_bins)  # raise before making a figure
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
    plots.reliability_diagram(probs, targets, n_bins, ax=ax, show_gap=False)
    return ax
