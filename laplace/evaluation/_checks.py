"""Argument checks shared by the metrics: each raises where the value enters.

Wrong types raise ``TypeError``, wrong shapes and values ``ValueError``; every message names
the argument, what it got and what is accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_classification",
    "check_count",
    "check_levels",
    "check_probs",
    "check_regression",
    "check_regression_mean",
]


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum``.

    Raises:
        TypeError: If ``value`` is not an integer (``bool`` is not one).
        ValueError: If ``value`` is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return value


def _check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_finite(value: Tensor, name: str) -> None:
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or Inf entries; all entries must be finite")


def check_probs(probs: object) -> Tensor:
    """Probabilities ``(n, classes)``, checked.

    Raises:
        TypeError: If ``probs`` is not a floating tensor.
        ValueError: For another shape, no samples, non-finite entries or entries outside
            ``[0, 1]``.

    Shapes:
        ``probs (n, classes)``
    """
    probs = _check_tensor(probs, "probs")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating tensor of probabilities, got {probs.dtype}")
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(
            f"probs must have shape (n, classes) with n >= 1, got {tuple(probs.shape)}"
        )
    _check_finite(probs, "probs")
    slack = 8 * torch.finfo(probs.dtype).eps  # round-off of a normalisation
    if (probs < -slack).any() or (probs > 1 + slack).any():
        raise ValueError("probs must lie in [0, 1] (class probabilities, not logits)")
    return probs


def check_classification(probs: object, targets: object) -> tuple[Tensor, Tensor]:
    """Probabilities ``(n, classes)`` and integer labels ``(n,)``, checked.

    Raises:
        TypeError: If either is not a tensor, ``probs`` is not floating or ``targets`` not
            integer.
        ValueError: For wrong shapes, no samples, non-finite probabilities, probabilities
            outside ``[0, 1]`` or labels outside ``[0, classes)``.

    Shapes:
        ``probs (n, classes), targets (n,)``
    """
    probs, targets = check_probs(probs), _check_tensor(targets, "targets")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of class labels, got {targets.dtype}")
    if targets.shape != probs.shape[:1]:
        raise ValueError(
            "probs must have shape (n, classes) and targets shape (n,), got "
            f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)}"
        )
    if (targets < 0).any() or (targets >= probs.shape[1]).any():
        raise ValueError(
            f"targets must be class labels in [0, {probs.shape[1]}), got values from "
            f"{int(targets.min())} to {int(targets.max())}"
        )
    return probs, targets


def check_regression_mean(mean: object, targets: object) -> tuple[Tensor, Tensor]:
    """Predictive means and targets of the same shape, ``(n,)`` or ``(n, outputs)``.

    Targets ``(n,)`` are accepted for a single-output mean ``(n, 1)``, and ``(n, 1)`` for a
    mean ``(n,)``; they are reshaped to the mean's shape. Both are promoted to a common
    floating dtype.

    Raises:
        TypeError: If either is not a tensor.
        ValueError: For other shapes, no samples, or non-finite entries.

    Shapes:
        ``mean (n,) | (n, outputs), targets like mean``
    """
    mean, targets = _check_tensor(mean, "mean"), _check_tensor(targets, "targets")
    if mean.ndim not in (1, 2) or mean.shape[0] == 0:
        raise ValueError(
            f"mean must have shape (n,) or (n, outputs) with n >= 1, got {tuple(mean.shape)}"
        )
    single_output = ((mean.shape[0],), (mean.shape[0], 1))
    if mean.shape in single_output and targets.shape in single_output:
        targets = targets.reshape(mean.shape)
    if targets.shape != mean.shape:
        raise ValueError(
            f"targets must have the mean's shape {tuple(mean.shape)}, got {tuple(targets.shape)}"
        )
    dtype = torch.promote_types(mean.dtype, targets.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    mean, targets = mean.to(dtype), targets.to(dtype)
    _check_finite(mean, "mean")
    _check_finite(targets, "targets")
    return mean, targets


def check_regression(mean: object, var: object, targets: object) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian predictive moments and targets, checked; a covariance becomes its diagonal.

    Args:
        mean: Predictive means.
        var: Predictive variances of the mean's shape, or for a mean ``(n, outputs)`` the
            output covariances ``(n, outputs, outputs)``, of which the diagonal is used.
        targets: Observed values (see :func:`check_regression_mean`).

    Returns:
        ``(mean, var, targets)``, all of the mean's shape and one floating dtype.

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: For mismatched shapes, no samples, non-finite entries, or variances that
            are not positive.

    Shapes:
        ``mean (n,) | (n, outputs), var like mean | (n, outputs, outputs)``
    """
    mean, targets = check_regression_mean(mean, targets)
    var = _check_tensor(var, "var")
    if mean.ndim == 2 and var.shape == (*mean.shape, mean.shape[1]):
        var = var.diagonal(dim1=-2, dim2=-1)
    if var.shape != mean.shape:
        raise ValueError(
            f"var must have the mean's shape {tuple(mean.shape)} (or be the output covariance "
            f"{(*mean.shape, mean.shape[-1])}), got {tuple(var.shape)}"
        )
    var = var.to(mean.dtype)
    _check_finite(var, "var")
    if (var <= 0).any():
        raise ValueError(f"var must be positive, got a smallest entry of {var.min().item()!r}")
    return mean, var, targets


def check_levels(levels: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """Coverage levels as a 1-D tensor of ``like``'s dtype and device, each in ``[0, 1]``.

    Raises:
        ValueError: For no levels, a non-finite level or one outside ``[0, 1]``.
    """
    levels = torch.as_tensor(levels, dtype=like.dtype, device=like.device).reshape(-1)
    if levels.numel() == 0:
        raise ValueError("levels must contain at least one coverage level in [0, 1]")
    if not torch.isfinite(levels).all() or (levels < 0).any() or (levels > 1).any():
        raise ValueError(f"levels must lie in [0, 1], got {levels.tolist()}")
    return levels
