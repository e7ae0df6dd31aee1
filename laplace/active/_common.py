"""Checks and small helpers shared by the acquisition functions of :mod:`laplace.active`."""

from __future__ import annotations

from numbers import Integral, Real
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = ["GreedySelection", "Kernel"]

# Relative width of the window within which two greedy scores count as tied (then the lowest
# index wins): 2**10 machine epsilons of the largest initial score. Two algorithms that compute
# the same scores with different rounding (GPA by solves, fast GPA by rank-one updates) differ
# by a few epsilons per step, so ties resolve identically in both over many steps.
TIE_EPSILONS = 2.0**10


class GreedySelection(NamedTuple):
    """The result of a greedy batch selection.

    Attributes:
        indices: Indices of the selected candidates, in the order they were picked, ``(k,)``.
        scores: The criterion value at which each was picked, ``(k,)``: the joint mutual
            information of the batch so far (BatchBALD) or the conditional variance (GPA).
    """

    indices: Tensor
    scores: Tensor


class Kernel(Protocol):
    """What the criteria need of a posterior kernel (``la.posterior_kernel()``).

    ``kernel(X1, X2)`` is ``(n1, n2, outputs, outputs)`` with ``k(x1, x2) = J(x1) P^-1 J(x2)^T``,
    ``kernel(X1)`` is ``kernel(X1, X1)``, and ``kernel.diagonal(X)`` is ``(n, outputs, outputs)``.
    """

    def __call__(self, X1: Tensor, X2: Tensor | None = None) -> Tensor:
        """The kernel between every input of ``X1`` and every input of ``X2``."""
        ...

    def diagonal(self, X: Tensor) -> Tensor:
        """``k(x, x)`` for each input of ``X``."""
        ...


def check_count(value: object, name: str) -> int:
    """``value`` as a positive ``int``.

    Raises:
        ValueError: If ``value`` is not a positive integer (``bool`` is refused).
    """
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_tensor(value: object, name: str, ndims: tuple[int, ...]) -> Tensor:
    """``value`` as a floating tensor with one of the dimension counts ``ndims``.

    Raises:
        TypeError: If ``value`` is not a floating-point tensor.
        ValueError: If it has another number of dimensions.
    """
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(value).__name__}")
    if value.ndim not in ndims:
        accepted = " or ".join(str(d) for d in ndims)
        raise ValueError(f"{name} must have {accepted} dimensions, got shape {tuple(value.shape)}")
    return value


def check_probability_samples(value: object, name: str = "prob_samples") -> Tensor:
    """``value`` as probability samples ``(n_samples, n, classes)``.

    Raises:
        TypeError: If ``value`` is not a floating-point tensor.
        ValueError: If it does not have three dimensions.
    """
    return check_tensor(value, name, (3,))


def check_positive(value: object, name: str, like: Tensor) -> Tensor:
    """A positive finite number or tensor as a tensor on ``like``'s device and dtype.

    Raises:
        TypeError: If ``value`` is neither a real number nor a tensor.
        ValueError: If any entry is not positive and finite.
    """
    if isinstance(value, bool) or not isinstance(value, (Real, Tensor)):
        raise TypeError(f"{name} must be a positive number or tensor, got {type(value).__name__}")
    tensor = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if not bool(torch.all(torch.isfinite(tensor) & (tensor > 0))):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return tensor


def check_mask(mask: object, n: int, name: str = "forbidden") -> Tensor | None:
    """A boolean mask over ``n`` candidates, or ``None``.

    Raises:
        TypeError: If ``mask`` is neither ``None`` nor a boolean tensor.
        ValueError: If its shape is not ``(n,)``.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean tensor or None, got {mask!r}")
    if mask.shape != (n,):
        raise ValueError(
            f"{name} must have shape ({n},) (one entry per candidate), got {tuple(mask.shape)}"
        )
    return mask


def forbid(scores: Tensor, forbidden: Tensor | None) -> Tensor:
    """``scores`` with the forbidden candidates set to ``-inf`` (never selected).

    Shapes:
        ``scores (n,), forbidden (n,) -> (n,)``
    """
    if forbidden is None:
        return scores
    return scores.masked_fill(forbidden.to(scores.device), float("-inf"))


def check_selectable(k: int, n: int, unavailable: Tensor | None) -> None:
    """Refuse ``k`` larger than the number of candidates that may be selected.

    Raises:
        ValueError: If fewer than ``k`` candidates are not forbidden.
    """
    allowed = n if unavailable is None else n - int(unavailable.sum())
    if k > allowed:
        raise ValueError(
            f"k must be at most the number of selectable candidates ({allowed}), got {k}"
        )


def argmax_lowest(scores: Tensor, tolerance: float) -> int:
    """Index of the largest score; scores within ``tolerance`` of it count as tied and the lowest
    index among them wins.

    Shapes:
        ``scores (n,) -> int``
    """
    best = scores.max()
    tied = scores >= best - tolerance
    return int(torch.nonzero(tied)[0, 0])


def tie_tolerance(scale: Tensor) -> float:
    """The tie window for greedy scores of magnitude ``scale`` (see ``TIE_EPSILONS``)."""
    return float(TIE_EPSILONS * torch.finfo(scale.dtype).eps * scale.abs().max().clamp_min(0))
