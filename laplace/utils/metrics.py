"""Metrics for predictive distributions: running negative log-likelihood and calibration.

The expected calibration error and the reliability diagram bin predictions by confidence
into equal-width bins (Guo et al., ICML 2017).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchmetrics import Metric

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["RunningNLLMetric", "expected_calibration_error", "reliability_diagram"]

_LOG_CLAMP = 1e-30


class RunningNLLMetric(Metric):
    """Mean negative log-likelihood of integer targets, accumulated over batches.

    Args:
        ignore_index: Targets equal to this value are skipped.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.add_state("nll_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_targets", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch of predicted probabilities and targets.

        Shapes:
            ``probs (batch, classes), targets (batch,)``
        """
        probs = probs.reshape(-1, probs.shape[-1])
        targets = targets.reshape(-1).long()
        keep = targets != self.ignore_index
        picked = probs[keep].gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
        self.nll_sum = self.nll_sum + -picked.clamp(min=_LOG_CLAMP).log().sum()
        self.n_targets = self.n_targets + keep.sum()

    def compute(self) -> Tensor:
        """The mean negative log-likelihood over the counted targets."""
        return self.nll_sum / self.n_targets


def _calibration_bins(
    probs: Tensor, targets: Tensor, n_bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin counts, summed accuracies and summed confidences.

    Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]``; the first also holds 0.

    Raises:
        ValueError: If ``n_bins`` is not positive or the shapes do not match.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if probs.ndim != 2 or targets.shape != probs.shape[:1]:
        raise ValueError(
            f"probs must have shape (batch, classes) and targets (batch,), got "
            f"{tuple(probs.shape)} and {tuple(targets.shape)}"
        )
    confidence, prediction = probs.max(dim=-1)
    correct = (prediction == targets).to(probs.dtype)
    inner_edges = torch.linspace(0, 1, n_bins + 1, device=probs.device, dtype=probs.dtype)[1:-1]
    index = torch.bucketize(confidence, inner_edges)
    counts = torch.bincount(index, minlength=n_bins).to(probs.dtype)
    accuracy_sum = probs.new_zeros(n_bins).index_add_(0, index, correct)
    confidence_sum = probs.new_zeros(n_bins).index_add_(0, index, confidence)
    return counts, accuracy_sum, confidence_sum


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error ``sum_b (n_b / n) |acc_b - conf_b|``.

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.
        n_bins: Number of equal-width confidence bins.

    Returns:
        The ECE in ``[0, 1]``.

    Shapes:
        ``probs (batch, classes), targets (batch,)``

    Raises:
        ValueError: If ``n_bins`` is not positive or the shapes do not match.
    """
    counts, accuracy_sum, confidence_sum = _calibration_bins(probs, targets, n_bins)
    return float((accuracy_sum - confidence_sum).abs().sum() / counts.sum())


def reliability_diagram(
    probs: Tensor, targets: Tensor, n_bins: int = 15, ax: Axes | None = None
) -> Axes:
    """Plot accuracy against confidence per bin, with the diagonal of perfect calibration.

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.
        n_bins: Number of equal-width confidence bins.
        ax: Matplotlib axes to draw on (default: a new figure).

    Returns:
        The axes.

    Shapes:
        ``probs (batch, classes), targets (batch,)``
    """
    import matplotlib.pyplot as plt

    counts, accuracy_sum, _ = _calibration_bins(probs, targets, n_bins)
    accuracy = (accuracy_sum / counts.clamp(min=1)).detach().tolist()
    if ax is None:
        _, ax = plt.subplots()
    width = 1.0 / n_bins
    lefts = [b * width for b in range(n_bins)]
    ax.bar(lefts, accuracy, width=width, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.legend(loc="upper left")
    return ax
