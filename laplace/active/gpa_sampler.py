"""The GPA sampler: greedy selection by the posterior variance of a Gaussian process.

Tsymbalov, Makarychev, Shapeev & Panov (2019), *Deeper Connections between Neural Networks and
Gaussian Processes Speed-up Active Learning* (IJCAI). The posterior of the network outputs is a
Gaussian process with covariance ``K`` over the pool (for a Laplace approximation the
linearised kernel ``J(x) P^-1 J(x')^T``). GPA picks the candidate of largest variance, then
conditions ``K`` on a noisy observation there (noise variance ``sigma^2``; the value of the
observation does not change the covariance) and repeats, so a batch spreads over the pool
instead of piling up where the variance is largest.

- :func:`gpa` is the reference: each step recomputes the variance given all selected points,
  ``diag(K) - diag(K_{:,A} (K_{A,A} + sigma^2 I)^-1 K_{A,:})``, by a Cholesky solve of the
  selected block.
- :func:`fast_gpa` updates ``K`` by the rank-one step
  ``K <- K - K_{:,i} K_{i,:} / (K_{i,i} + sigma^2)`` and never solves (the "fast GPA" of
  Erlenbach's thesis, 2021).
- :func:`fast_gpa_from_kernel` is the same update in factored form: it needs the pool's
  variances and one kernel column ``k(pool, x_i)`` per selected point, never the ``n x n``
  matrix, so it scales to large pools.

All three select the same points: scores within ``2**10`` machine epsilons (of the largest
initial variance) of the maximum count as tied, and the lowest index wins, so the different
rounding of the three computations does not change the selection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from laplace.active._common import (
    GreedySelection,
    argmax_lowest,
    check_count,
    check_mask,
    check_positive,
    check_selectable,
    check_tensor,
    tie_tolerance,
)

__all__ = ["gpa", "fast_gpa", "fast_gpa_from_kernel"]


def _check_covariance(covariance: object) -> Tensor:
    covariance = check_tensor(covariance, "covariance", (2,))
    if covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"covariance must be square, got shape {tuple(covariance.shape)}")
    return covariance


def _start(
    variance: Tensor, k: object, noise_variance: object, forbidden: object
) -> tuple[int, Tensor, Tensor, float]:
    """Checked ``k``, noise, mask of unavailable candidates, tie tolerance."""
    k = check_count(k, "k")
    noise = check_positive(noise_variance, "noise_variance", variance)
    if noise.ndim:
        raise ValueError(f"noise_variance must be a scalar, got shape {tuple(noise.shape)}")
    n = variance.shape[0]
    unavailable = check_mask(forbidden, n)
    check_selectable(k, n, unavailable)
    if unavailable is None:
        unavailable = torch.zeros(n, dtype=torch.bool, device=variance.device)
    return k, noise, unavailable.to(variance.device).clone(), tie_tolerance(variance)


def _pick(variance: Tensor, unavailable: Tensor, tolerance: float) -> int:
    best = argmax_lowest(variance.masked_fill(unavailable, float("-inf")), tolerance)
    unavailable[best] = True
    return best


def gpa(
    covariance: Tensor,
    k: int,
    noise_variance: float | Tensor,
    *,
    forbidden: Tensor | None = None,
    progress_bar: bool = False,
) -> GreedySelection:
    """GPA sampler, the reference: the conditional variance recomputed by solves at every step.

    Args:
        covariance: Posterior covariance ``K`` of the outputs over the pool.
        k: Number of points to select.
        noise_variance: Observation-noise variance ``sigma^2`` (``la.sigma_noise**2``).
        forbidden: Candidates that must not be selected.
        progress_bar: Show a tqdm progress bar over the ``k`` steps.

    Returns:
        The selected indices and each one's variance when it was picked.

    Shapes:
        ``covariance (n, n), forbidden (n,) -> indices (k,), scores (k,)``

    Raises:
        TypeError: If ``covariance`` is not a floating tensor or ``forbidden`` not boolean.
        ValueError: If a shape does not fit, ``k`` is not a positive integer, the noise is not
            a positive scalar, or fewer than ``k`` candidates may be selected.
    """
    covariance = _check_covariance(covariance)
    prior = covariance.diagonal()
    k, noise, unavailable, tolerance = _start(prior, k, noise_variance, forbidden)
    chosen: list[int] = []
    scores = []
    for _ in tqdm(range(k), desc="GPA", disable=not progress_bar):
        variance = prior
        if chosen:
            block = covariance[chosen][:, chosen]
            eye = torch.eye(len(chosen), device=block.device, dtype=block.dtype)
            factor = torch.linalg.cholesky(block + noise * eye)
            whitened = torch.linalg.solve_triangular(factor, covariance[chosen], upper=False)
            variance = prior - whitened.square().sum(0)
        best = _pick(variance, unavailable, tolerance)
        chosen.append(best)
        scores.append(variance[best])
    return GreedySelection(torch.tensor(chosen, device=prior.device), torch.stack(scores))


def fast_gpa(
    covariance: Tensor,
    k: int,
    noise_variance: float | Tensor,
    *,
    forbidden: Tensor | None = None,
    progress_bar: bool = False,
) -> GreedySelection:
    """Fast GPA sampler: rank-one updates, no solves and no ``n x n`` update.

    The rank-one updates of the joint covariance after each pick are kept as factor rows
    (:func:`fast_gpa_from_kernel` with the columns of ``K``): ``O(n k^2)`` time instead of
    the ``O(n^2 k)`` of updating ``K`` itself. Selects the same points as :func:`gpa`.

    Args:
        covariance: Posterior covariance ``K`` of the outputs over the pool.
        k: Number of points to select.
        noise_variance: Observation-noise variance ``sigma^2`` (``la.sigma_noise**2``).
        forbidden: Candidates that must not be selected.
        progress_bar: Show a tqdm progress bar over the ``k`` steps.

    Returns:
        The selected indices and each one's variance when it was picked.

    Shapes:
        ``covariance (n, n), forbidden (n,) -> indices (k,), scores (k,)``

    Raises:
        TypeError: If ``covariance`` is not a floating tensor or ``forbidden`` not boolean.
        ValueError: If a shape does not fit, ``k`` is not a positive integer, the noise is not
            a positive scalar, or fewer than ``k`` candidates may be selected.
    """
    covariance = _check_covariance(covariance)
    return fast_gpa_from_kernel(
        covariance.diagonal(),
        lambda index: covariance[:, index],
        k,
        noise_variance,
        forbidden=forbidden,
        progress_bar=progress_bar,
    )


def fast_gpa_from_kernel(
    variance: Tensor,
    column: Callable[[int], Tensor],
    k: int,
    noise_variance: float | Tensor,
    *,
    forbidden: Tensor | None = None,
    progress_bar: bool = False,
) -> GreedySelection:
    """Fast GPA from the pool's variances and kernel columns, without the ``n x n`` matrix.

    The conditional covariance after ``t`` steps is ``K - V^T V`` with one row
    ``v_j = K_{j-1}[:, i_j] / sqrt(K_{j-1}[i_j, i_j] + sigma^2)`` per selected point, so each
    step needs the one kernel column ``column(i) = k(pool, x_i)``: memory ``O(n k)``, time
    ``O(n k^2)`` plus ``k`` kernel columns. Selects the same points as :func:`gpa`.

    Args:
        variance: Prior variances ``k(x, x)`` of the pool.
        column: Maps a pool index ``i`` to the kernel column ``k(pool, x_i)``, ``(n,)``.
        k: Number of points to select.
        noise_variance: Observation-noise variance ``sigma^2`` (``la.sigma_noise**2``).
        forbidden: Candidates that must not be selected.
        progress_bar: Show a tqdm progress bar over the ``k`` steps.

    Returns:
        The selected indices and each one's variance when it was picked.

    Shapes:
        ``variance (n,), column: int -> (n,), forbidden (n,) -> indices (k,), scores (k,)``

    Raises:
        TypeError: If ``variance`` is not a floating tensor or ``forbidden`` not boolean.
        ValueError: If a shape does not fit (a column included), ``k`` is not a positive
            integer, the noise is not a positive scalar, or fewer than ``k`` candidates may be
            selected.
    """
    conditional = check_tensor(variance, "variance", (1,)).clone()
    k, noise, unavailable, tolerance = _start(conditional, k, noise_variance, forbidden)
    rows = conditional.new_zeros(k, conditional.shape[0])
    chosen: list[int] = []
    scores = []
    for step in tqdm(range(k), desc="fast GPA", disable=not progress_bar):
        best = _pick(conditional, unavailable, tolerance)
        kernel_column = column(best)
        if kernel_column.shape != conditional.shape:
            raise ValueError(
                f"column({best}) must have shape {tuple(conditional.shape)}, "
                f"got {tuple(kernel_column.shape)}"
            )
        current = kernel_column.to(rows.dtype) - rows[:step].T @ rows[:step, best]
        chosen.append(best)
        scores.append(conditional[best].clone())
        rows[step] = current / (conditional[best] + noise).sqrt()
        conditional -= rows[step].square()
    return GreedySelection(torch.tensor(chosen, device=rows.device), torch.stack(scores))
