"""Diagonal SWAG: parameter variances from the trajectory of SGD (Maddox et al., 2019).

Starting from the trained weights, SGD with a constant learning rate keeps moving around the
optimum; the first and second moments of the weights collected along the way give a
diagonal Gaussian ``N(mean, sq_mean - mean^2)``. Subnetwork selection
(:class:`~laplace.utils.subnetmask.LargestVarianceSWAGSubnetMask`) ranks parameters by that
variance.

Reference:
    Maddox, Garipov, Izmailov, Vetrov, Wilson. A simple baseline for Bayesian uncertainty in
    deep learning. NeurIPS, 2019.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from numbers import Real

import torch
from torch import Tensor, nn

from laplace.utils.data import unpack_batch

__all__ = ["fit_diagonal_swag_var"]


def _flat(params: list[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_number(value: object, name: str, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _train_epoch(
    model: nn.Module,
    train_loader: Iterable,
    criterion: Callable[[Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> None:
    """One pass of SGD over ``train_loader``; batches are ``(X, y)`` or dict-like."""
    n_batches = 0
    for batch in train_loader:
        X, y = unpack_batch(batch, "input_ids", "labels", device)
        optimizer.zero_grad()
        criterion(model(X), y).backward()
        optimizer.step()
        n_batches += 1
    if n_batches == 0:
        raise ValueError("train_loader yielded no batches")


def fit_diagonal_swag_var(
    model: nn.Module,
    train_loader: Iterable,
    criterion: Callable[[Tensor, Tensor], Tensor],
    n_snapshots_total: int = 40,
    snapshot_freq: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 3e-4,
    min_var: float = 1e-30,
) -> Tensor:
    """Diagonal SWAG variance of the trainable parameters of ``model``.

    A deep copy of ``model`` is trained with SGD (in training mode) for
    ``n_snapshots_total * snapshot_freq`` epochs; after every ``snapshot_freq`` epochs the
    trainable parameters are recorded. ``model`` itself is not changed.

    Args:
        model: The trained network.
        train_loader: Yields ``(X, y)`` batches (or dict-like ones with the targets under
            ``"labels"``).
        criterion: Loss ``criterion(model(X), y)`` to descend, e.g. ``nn.CrossEntropyLoss()``.
        n_snapshots_total: Number of recorded snapshots.
        snapshot_freq: Epochs between snapshots.
        lr: Constant SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        min_var: Lower bound of the returned variances.

    Returns:
        ``max(mean(theta^2) - mean(theta)^2, min_var)`` over the snapshots, one entry per
        trainable parameter (``named_parameters`` order).

    Shapes:
        ``-> (params,)``

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or a rate is not a number.
        ValueError: For non-positive counts or rates, a model without trainable parameters
            or an empty ``train_loader``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_positive_int(n_snapshots_total, "n_snapshots_total")
    _check_positive_int(snapshot_freq, "snapshot_freq")
    _check_number(lr, "lr", positive=True)
    _check_number(momentum, "momentum", positive=False)
    _check_number(weight_decay, "weight_decay", positive=False)
    _check_number(min_var, "min_var", positive=False)
    swag_model = copy.deepcopy(model).train()
    params = [p for p in swag_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    mean = torch.zeros_like(_flat(params))
    sq_mean = torch.zeros_like(mean)
    for snapshot in range(n_snapshots_total):
        for _ in range(snapshot_freq):
            _train_epoch(swag_model, train_loader, criterion, optimizer, mean.device)
        theta = _flat(params)
        weight = 1.0 / (snapshot + 1)
        mean = mean + weight * (theta - mean)
        sq_mean = sq_mean + weight * (theta.square() - sq_mean)
    return (sq_mean - mean.square()).clamp(min=min_var)
