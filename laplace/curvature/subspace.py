"""Top eigenpairs of a positive semi-definite matrix by randomized subspace iteration.

:func:`subspace_eigh` needs only products ``V -> H V`` of a symmetric ``(params, params)``
matrix ``H`` with a block ``V`` of ``b = k + oversampling`` vectors. With the curvature of a
data set (:func:`~laplace.curvature.lanczos.curvature_matvec` takes a block too) each such
product is one pass over the data, in which every batch runs one forward pass and the
Jacobian-vector products of the whole block at once (``curvlinops`` vectorises them with
``torch.func.vmap``). The iteration makes a fixed, small number of products:

1. ``Q_0 = orth(Omega)`` for a Gaussian ``(n, b)`` block ``Omega``;
2. ``Q_i = orth(H Q_{i-1})`` for ``i = 1 .. q`` (``q = n_power_iterations`` passes), so that
   ``Q_q`` spans ``H^q Omega``, the range of ``H`` sharpened towards its top eigenvectors;
3. the Rayleigh-Ritz step, one more pass: ``Y = H Q_q``, ``Q_q^T Y = S diag(theta) S^T``;
   the Ritz pairs ``(theta_j, Q_q s_j)`` are returned, largest first, with their residuals
   ``||H u_j - theta_j u_j|| = ||Y s_j - theta_j Q_q s_j||``, which need no further product.

``q + 1`` passes in all (Halko et al.'s Algorithm 4.4 with power parameter ``q - 1``,
followed by their Algorithm 5.3), and ``O(n b)`` memory. Orthonormalising after every
product keeps the small eigenvalues from drowning in round-off. The angle between the
``j``-th eigenvector and ``span(Q_q)`` shrinks like ``(lambda_{b+1} / lambda_j)^q`` and the
error of the ``j``-th Ritz value like its square (Saad, 2011, Theorem 5.2): fast for the top
of a spectrum that decays quickly, as a GGN's does; the oversampling widens the gap for the
``k``-th pair. The iteration converges to the eigenvalues of largest magnitude, which are
the largest only for a positive semi-definite ``H`` (a GGN or Fisher, not a Hessian).

References:
    Halko, N., Martinsson, P.-G., Tropp, J. A. Finding structure with randomness:
    probabilistic algorithms for constructing approximate matrix decompositions. SIAM
    Review, 2011.
    Saad, Y. Numerical Methods for Large Eigenvalue Problems, 2nd ed., ch. 5. SIAM, 2011.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_OVERSAMPLING",
    "DEFAULT_POWER_ITERATIONS",
    "check_subspace_options",
    "subspace_eigh",
    "subspace_passes",
]

Matmat = Callable[[Tensor], Tensor]

DEFAULT_POWER_ITERATIONS = 3
"""The default ``q``: four passes over the data with the Rayleigh-Ritz step."""

DEFAULT_OVERSAMPLING = 10
"""The default number of vectors beyond ``k`` in the block."""


def check_subspace_options(n_power_iterations: object, oversampling: object) -> tuple[int, int]:
    """``(n_power_iterations, oversampling)`` checked: a positive and a non-negative integer.

    Raises:
        ValueError: For another value, naming the argument.
    """
    for name, value, lowest in (
        ("n_power_iterations", n_power_iterations, 1),
        ("oversampling", oversampling, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
    return n_power_iterations, oversampling  # type: ignore[return-value]


def subspace_passes(n: int, k: int, oversampling: int, n_power_iterations: int) -> int:
    """The number of products with ``H`` that :func:`subspace_eigh` makes.

    ``n_power_iterations + 1``; a single one when the block of ``k + oversampling`` vectors
    spans all ``n`` dimensions (then the Rayleigh-Ritz step alone is exact).
    """
    return 1 if k + oversampling >= n else n_power_iterations + 1


def _product(matmat: Matmat, Q: Tensor) -> Tensor:
    Y = matmat(Q)
    if not bool(torch.isfinite(Y).all()):
        raise ValueError(
            "the curvature-vector product contains NaN or Inf values; check the model "
            "and the data for NaN, Inf or overflow"
        )
    return Y


def subspace_eigh(
    matmat: Matmat,
    n: int,
    k: int,
    *,
    oversampling: int = DEFAULT_OVERSAMPLING,
    n_power_iterations: int = DEFAULT_POWER_ITERATIONS,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest eigenpairs of a positive semi-definite ``H``, approximately.

    Args:
        matmat: ``V -> H V`` for blocks ``(n, b)`` of ``dtype`` on ``device``.
        n: Size of ``H``.
        k: Number of eigenpairs.
        oversampling: Vectors beyond ``k`` in the block (``b = min(k + oversampling, n)``).
        n_power_iterations: Products that sharpen the block before the Rayleigh-Ritz one
            (:func:`subspace_passes` counts them all).
        device: Device of the block and the results.
        dtype: Floating dtype of the block and the results (the small ``b x b`` eigenproblem
            is solved in float64).
        generator: Random generator of the start block.

    Returns:
        ``(eigenvalues, eigenvectors, residuals)``, largest first: the Ritz pairs, with
        orthonormal eigenvectors, and their relative residual norms
        ``||H u_j - l_j u_j|| / |l_1|`` (``l_1`` the largest Ritz value).

    Shapes:
        ``-> (k,), (n, k), (k,)``

    Raises:
        ValueError: For ``k`` outside ``[1, n]``, a bad option, or a non-finite product.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}], got {k!r}")
    check_subspace_options(n_power_iterations, oversampling)
    block = min(k + oversampling, n)
    start = torch.randn(n, block, generator=generator, device=device, dtype=dtype)
    Q = torch.linalg.qr(start).Q
    for _ in range(subspace_passes(n, k, oversampling, n_power_iterations) - 1):
        Q = torch.linalg.qr(_product(matmat, Q)).Q
    return _rayleigh_ritz(Q, _product(matmat, Q), k)


def _rayleigh_ritz(Q: Tensor, Y: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``k`` Ritz pairs of ``H`` on ``span(Q)`` from ``Y = H Q``, and their relative
    residuals.

    Shapes:
        ``Q, Y: (n, b) -> (k,), (n, k), (k,)``
    """
    projected = (Q.mT @ Y).to(torch.float64)
    values, vectors = torch.linalg.eigh((projected + projected.mT) / 2)
    scale = values.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    values, vectors = values.flip(0)[:k].to(Q.dtype), vectors.flip(1)[:, :k].to(Q.dtype)
    eigenvectors = Q @ vectors
    residuals = (Y @ vectors - eigenvectors * values).norm(dim=0)
    return values, eigenvectors, residuals / scale.to(Q.dtype)
