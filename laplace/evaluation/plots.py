"""Diagrams of calibration and of regression predictives (matplotlib, imported when used).

Each function draws on the given ``ax`` or on a new ``matplotlib.figure.Figure`` (not
registered with ``pyplot``, so nothing is shown or kept open; save it with
``fig.savefig(path)``, or show it in a notebook by returning it) and returns the figure.

- :func:`reliability_diagram`: accuracy against confidence per bin, with the gap to the
  diagonal shaded (Guo et al., ICML 2017).
- :func:`proportion_diagram`: the fraction of samples per confidence bin (where the
  reliability diagram's bars carry weight).
- :func:`regression_proportion_diagram`: observed against expected coverage of central
  Gaussian intervals, the regression counterpart.
- :func:`regression_band_plot`: a one-dimensional predictive mean with bands of
  ``n_std`` standard deviations and, optionally, the training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from laplace.evaluation._checks import check_probs
from laplace.evaluation.classification import calibration_bins
from laplace.evaluation.regression import regression_calibration_curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "proportion_diagram",
    "regression_band_plot",
    "regression_proportion_diagram",
    "reliability_diagram",
]


def _axes(ax: Axes | None) -> Axes:
    """``ax``, or the axes of a new figure."""
    if ax is not None:
        return ax
    from matplotlib.figure import Figure

    return Figure().subplots()


def _list(values: Tensor) -> list[float]:
    return values.detach().to("cpu", torch.float64).tolist()


def reliability_diagram(
    probs: Tensor,
    targets: Tensor,
    n_bins: int = 15,
    ax: Axes | None = None,
    show_gap: bool = True,
    show_counts: bool = False,
) -> Figure:
    """Accuracy against confidence per equal-width bin, with the diagonal of calibration.

    Args:
        probs: Predicted class probabilities.
        targets: Integer class labels.
        n_bins: Number of bins (see :func:`~laplace.evaluation.calibration_bins`).
        ax: Axes to draw on (default: those of a new figure).
        show_gap: Shade the gap between each non-empty bin's accuracy and its mean
            confidence.
        show_counts: Draw the fraction of samples per bin on a second y-axis.

    Returns:
        The figure of the axes.

    Raises:
        TypeError: See :func:`~laplace.evaluation.calibration_bins`.
        ValueError: See :func:`~laplace.evaluation.calibration_bins`.

    Shapes:
        ``probs (n, classes), targets (n,)``
    """
    bins = calibration_bins(probs, targets, n_bins)
    ax = _axes(ax)
    lefts, width = _list(bins.edges[:-1]), 1.0 / n_bins
    accuracies = _list(bins.accuracies)
    ax.bar(lefts, accuracies, width=width, align="edge", edgecolor="black", label="accuracy")
    if show_gap:
        filled = [i for i, count in enumerate(_list(bins.counts)) if count > 0]
        gaps = _list(bins.confidences - bins.accuracies)
        ax.bar(
            [lefts[i] for i in filled],
            [gaps[i] for i in filled],
            bottom=[accuracies[i] for i in filled],
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.3,
            hatch="//",
            edgecolor="tab:red",
            label="gap to confidence",
        )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.legend(loc="upper left")
    if show_counts:
        counts_ax = ax.twinx()
        proportions = _list(bins.proportions)
        counts_ax.step(
            [*lefts, 1.0], [*proportions, proportions[-1]], where="post", color="tab:orange"
        )
        counts_ax.set_ylim(0, 1)
        counts_ax.set_ylabel("fraction of samples (line)", color="tab:orange")
    return ax.figure


def proportion_diagram(probs: Tensor, n_bins: int = 15, ax: Axes | None = None) -> Figure:
    """The fraction of samples in each equal-width confidence bin.

    Args:
        probs: Predicted class probabilities.
        n_bins: Number of bins (see :func:`~laplace.evaluation.calibration_bins`).
        ax: Axes to draw on (default: those of a new figure).

    Returns:
        The figure of the axes.

    Raises:
        TypeError: If ``probs`` is not a floating tensor or ``n_bins`` not an integer.
        ValueError: For invalid probabilities or ``n_bins < 1``.

    Shapes:
        ``probs (n, classes)``
    """
    probs = check_probs(probs)
    labels = torch.zeros(probs.shape[:1], dtype=torch.long, device=probs.device)
    bins = calibration_bins(probs, labels, n_bins)
    ax = _axes(ax)
    ax.bar(
        _list(bins.edges[:-1]),
        _list(bins.proportions),
        width=1.0 / n_bins,
        align="edge",
        edgecolor="black",
    )
    ax.set(xlim=(0, 1), xlabel="confidence", ylabel="fraction of samples")
    return ax.figure


def regression_proportion_diagram(
    mean: Tensor, var: Tensor, targets: Tensor, n_levels: int = 21, ax: Axes | None = None
) -> Figure:
    """Observed against expected coverage of central Gaussian intervals.

    Args:
        mean: Predictive means.
        var: Predictive variances of the targets (or output covariances).
        targets: Observed values.
        n_levels: Number of nominal levels ``linspace(0, 1, n_levels)``.
        ax: Axes to draw on (default: those of a new figure).

    Returns:
        The figure of the axes.

    Raises:
        TypeError: See :func:`~laplace.evaluation.regression_calibration_curve`.
        ValueError: See :func:`~laplace.evaluation.regression_calibration_curve`.

    Shapes:
        ``mean (n,) | (n, outputs), var like mean, targets like mean``
    """
    curve = regression_calibration_curve(mean, var, targets, n_levels)
    ax = _axes(ax)
    expected, observed = _list(curve.expected), _list(curve.observed)
    ax.plot(expected, observed, marker="o", label="observed")
    ax.fill_between(expected, expected, observed, color="tab:red", alpha=0.2)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="expected coverage", ylabel="observed coverage")
    ax.legend(loc="upper left")
    return ax.figure


def _curve(value: object, name: str, length: int | None = None) -> Tensor:
    """A finite one-dimensional tensor (``(n, 1)`` is flattened) of the given length."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim != 1 or value.numel() == 0 or (length is not None and len(value) != length):
        expected = "(n,) or (n, 1)" if length is None else f"({length},) or ({length}, 1)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or Inf entries; all entries must be finite")
    return value.detach()


def regression_band_plot(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    x_train: Tensor | None = None,
    y_train: Tensor | None = None,
    n_std: Sequence[float] = (1, 2),
    ax: Axes | None = None,
) -> Figure:
    """A one-dimensional predictive mean with shaded bands of ``k`` standard deviations.

    Args:
        x: Inputs at which the predictive was evaluated (any order; sorted for drawing).
        mean: Predictive means at ``x``.
        std: Predictive standard deviations at ``x``.
        x_train: Training inputs, drawn as points with ``y_train``.
        y_train: Training targets.
        n_std: The widths ``k`` of the bands ``mean +- k std``, each positive.
        ax: Axes to draw on (default: those of a new figure).

    Returns:
        The figure of the axes.

    Raises:
        TypeError: If an array is not a tensor.
        ValueError: For shapes other than ``(n,)`` or ``(n, 1)``, mismatched lengths,
            non-finite values, negative ``std``, a non-positive ``k``, or only one of
            ``x_train`` and ``y_train``.

    Shapes:
        ``x, mean, std (n,) | (n, 1), x_train, y_train (m,) | (m, 1)``
    """
    x = _curve(x, "x")
    mean, std = _curve(mean, "mean", len(x)), _curve(std, "std", len(x))
    if (std < 0).any():
        raise ValueError(f"std must be non-negative, got a smallest entry of {std.min().item()}")
    widths = [float(k) for k in n_std]
    if not widths or any(not k > 0 for k in widths):
        raise ValueError(f"n_std must be one or more positive numbers, got {n_std!r}")
    if (x_train is None) != (y_train is None):
        raise ValueError("x_train and y_train must be given together")
    order = torch.argsort(x)
    xs, mus, sigmas = (_list(t[order]) for t in (x, mean, std))
    ax = _axes(ax)
    for k in sorted(widths, reverse=True):
        lower = [m - k * s for m, s in zip(mus, sigmas)]
        upper = [m + k * s for m, s in zip(mus, sigmas)]
        alpha = 0.15 + 0.25 / k
        ax.fill_between(xs, lower, upper, color="tab:blue", alpha=min(alpha, 0.6), lw=0)
        ax.plot([], [], color="tab:blue", alpha=min(alpha, 0.6), lw=6, label=f"±{k:g} std")
    ax.plot(xs, mus, color="tab:blue", label="predictive mean")
    if x_train is not None:
        x_points = _curve(x_train, "x_train")
        y_points = _curve(y_train, "y_train", len(x_points))
        ax.scatter(_list(x_points), _list(y_points), s=10, color="black", label="training data")
    ax.set(xlabel="x", ylabel="y")
    ax.legend(loc="best")
    return ax.figure
