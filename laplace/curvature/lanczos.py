"""Matrix-free top eigenpairs of a curvature matrix by the Lanczos method.

:func:`lanczos_eigh` needs only products ``v -> H v`` with a symmetric ``(params, params)``
matrix ``H``; the matrix is never formed. Each step extends an orthonormal Krylov basis
``Q`` by one vector, orthogonalised against the whole basis twice (full reorthogonalisation,
"twice is enough"), so that ``Q^T H Q = T`` is tridiagonal up to round-off. The eigenpairs
``(theta, s)`` of ``T`` give the Ritz pairs ``(theta, Q s)``, whose residual norms are
``beta * |s_last|`` (Lanczos, 1950; Paige, 1972; Golub & Van Loan, 2013). The basis grows
until the ``k`` largest Ritz pairs have residuals below ``tol * ||H||`` or ``max_iter``
vectors are stored.

A ``beta`` below ``tol * ||H||`` means the Krylov space is invariant (a rank-deficient GGN,
or repeated eigenvalues: one Krylov space holds a single copy of each). The iteration then
restarts from a random vector orthogonal to the basis, which makes ``T`` block-diagonal,
and the top ``k`` Ritz pairs are only accepted once the block after the last restart has
converged its largest Ritz value (the largest eigenvalue left in the complement) to at most
the ``k``-th one found before. Repeated eigenvalues are thus found with their
multiplicities, and with ``max_iter = params`` every eigenpair is found.

:func:`curvature_matvec` builds ``v -> H v`` for the curvature of a ``curvlinops`` backend
(GGN, Monte-Carlo Fisher, empirical Fisher or Hessian) summed over every batch of a data
loader, from the same public ``curvlinops`` operator the backend multiplies onto identity
columns for ``full``.

References:
    Lanczos, C. An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators. J. Res. Natl. Bur. Stand., 1950.
    Paige, C. C. Computational variants of the Lanczos method for the eigenproblem. IMA J.
    Appl. Math., 1972.
    Golub, G. H., Van Loan, C. F. Matrix Computations, 4th ed., ch. 10. Johns Hopkins, 2013.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from laplace.curvature._fallback import math_attention
from laplace.utils.data import Inputs, batch_size, cast_inputs, unpack_batch

__all__ = ["curvature_matvec", "default_max_iter", "lanczos_eigh"]

Matvec = Callable[[Tensor], Tensor]


def default_max_iter(n: int, k: int) -> int:
    """The default largest Krylov basis: ``min(n, max(3 k, k + 50))`` vectors."""
    return min(n, max(3 * k, k + 50))


def _check_positive_int(value: object, name: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{name} must be an integer in [1, {upper}], got {value!r}")
    return value


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """Remove the components of ``w`` in the span of the orthonormal columns of ``basis``."""
    for _ in range(2):
        w = w - basis @ (basis.mT @ w)
    return w


def _random_unit(basis: Tensor, generator: torch.Generator | None) -> Tensor:
    """A random unit vector orthogonal to the columns of ``basis``.

    Shapes:
        ``basis: (n, m)`` with ``m < n`` -> ``(n,)``
    """
    w = torch.randn(basis.shape[0], generator=generator, device=basis.device, dtype=basis.dtype)
    w = _orthogonalize(w, basis)
    return w / w.norm()


def _ritz(alphas: list[float], betas: list[float], device: torch.device) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the tridiagonal ``T`` in float64, eigenvalues in descending order."""
    T = torch.diag(torch.tensor(alphas, device=device, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, device=device, dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(T)
    return values.flip(0), vectors.flip(1)


def _residuals(vectors: Tensor, beta: float, k: int) -> Tensor:
    """Residual norms ``||H Q s - theta Q s|| = beta |s_last|`` of the top ``k`` Ritz pairs."""
    return beta * vectors[-1, :k].abs()


def lanczos_eigh(
    matvec: Matvec,
    n: int,
    k: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    max_iter: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` algebraically largest eigenpairs of a symmetric matrix ``H``.

    Args:
        matvec: ``v -> H v`` for vectors of length ``n`` of ``dtype`` on ``device``.
        n: Size of ``H``.
        k: Number of eigenpairs.
        device: Device of the Krylov basis and the results.
        dtype: Floating dtype of the basis and the results (``T`` is always float64).
        max_iter: Most basis vectors, in ``[k, n]`` (default :func:`default_max_iter`).
        tol: Converged when every top-``k`` residual is below ``tol * ||H||`` (estimated);
            default ``eps(dtype) ** 0.75`` (``1.8e-12`` for float64, ``6.6e-6`` for float32).
        generator: Random generator for the start vector (and restarts).

    Returns:
        ``(eigenvalues, eigenvectors)``, largest first; the eigenvectors are orthonormal.

    Shapes:
        ``-> (k,), (n, k)``

    Raises:
        ValueError: For ``k``, ``max_iter`` or ``tol`` out of range, or a non-finite product.

    Warns:
        RuntimeWarning: If ``max_iter`` vectors did not suffice for ``tol``; the best Ritz
            pairs are returned.
    """
    k = _check_positive_int(k, "k", n)
    max_iter = _check_positive_int(
        default_max_iter(n, k) if max_iter is None else max_iter, "max_iter", n
    )
    if max_iter < k:
        raise ValueError(f"max_iter must be at least k={k}, got {max_iter}")
    tol = torch.finfo(dtype).eps ** 0.75 if tol is None else tol
    if not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
    basis = torch.empty(n, max_iter, device=device, dtype=dtype)
    run = _lanczos_steps(matvec, basis, k, tol, generator)
    m = len(run.alphas)
    values, vectors = _ritz(run.alphas, run.betas, basis.device)
    if not run.converged:
        worst = (_residuals(vectors, run.beta, k).max() / run.norm).item()
        warnings.warn(
            f"Lanczos did not converge in max_iter={max_iter} steps to tol={tol:.3g} (largest "
            f"relative residual of the top {k} eigenpairs: {worst:.3g}); increase max_iter",
            RuntimeWarning,
            stacklevel=2,
        )
    eigenvectors = basis[:, :m] @ vectors[:, :k].to(dtype)
    return values[:k].to(dtype), eigenvectors


@dataclass
class _Krylov:
    """The tridiagonal ``T`` of a Lanczos run, block-diagonal where the iteration restarted.

    Attributes:
        alphas: Diagonal of ``T``.
        betas: Off-diagonal of ``T`` (``0`` at a restart).
        beta: Coupling of the last basis vector to the next one.
        norm: Running estimate of ``||H||`` (a Gershgorin bound on ``T``).
        start: Index of the first vector of the current block (after the last restart).
        converged: Whether the top-``k`` Ritz pairs are certified.
    """

    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    beta: float = 0.0
    norm: float = torch.finfo(torch.float64).tiny
    start: int = 0
    converged: bool = False


def _certified(run: _Krylov, k: int, tol: float, device: torch.device, invariant: bool) -> bool:
    """Whether the top ``k`` Ritz pairs of ``T`` are the top ``k`` eigenpairs of ``H``.

    Their residuals must be below ``tol * ||H||``. After an invariant subspace was found
    (a restart, or ``invariant`` now), its complement may hold further copies of degenerate
    eigenvalues: the block after the restart must then have converged its largest Ritz
    value (the largest eigenvalue of the complement) to at most the ``k``-th largest one of
    the earlier blocks.
    """
    bound = tol * run.norm
    _, vectors = _ritz(run.alphas, run.betas, device)
    if not bool((_residuals(vectors, run.beta, k) <= bound).all()):
        return False
    if run.start == 0 and not invariant:
        return True
    if run.start < k:
        return False
    earlier, _ = _ritz(run.alphas[: run.start], run.betas[: run.start - 1], device)
    current, current_vectors = _ritz(run.alphas[run.start :], run.betas[run.start :], device)
    return bool(
        _residuals(current_vectors, run.beta, 1)[0] <= bound
        and current[0] <= earlier[k - 1] + bound
    )


def _lanczos_steps(
    matvec: Matvec, basis: Tensor, k: int, tol: float, generator: torch.Generator | None
) -> _Krylov:
    """Fill ``basis`` column by column until certified, a complete basis or ``max_iter``.

    A ``beta`` below ``tol * ||H||`` marks an invariant subspace: the iteration restarts
    from a random vector orthogonal to the basis, with a zero coupling in ``T``.
    """
    n, max_iter = basis.shape
    run, q, next_check, m = _Krylov(), _random_unit(basis[:, :0], generator), k, 0
    while True:
        basis[:, m] = q
        w = matvec(q)
        alpha = float(q @ w)
        m += 1
        w = _orthogonalize(w, basis[:, :m])
        previous, run.beta = run.beta, float(w.norm())
        if not (math.isfinite(alpha) and math.isfinite(run.beta)):
            raise ValueError(
                "the curvature-vector product contains NaN or Inf values; check the model "
                "and the data for NaN, Inf or overflow"
            )
        run.alphas.append(alpha)
        run.norm = max(run.norm, abs(alpha) + run.beta + previous)
        if m == n:
            run.beta, run.converged = 0.0, True
            return run
        invariant = run.beta <= tol * run.norm
        if m >= k and (invariant or m in (next_check, max_iter)):
            next_check = m + max(1, m // 10)
            run.converged = _certified(run, k, tol, basis.device, invariant)
            if run.converged or m == max_iter:
                return run
        if invariant:
            q, run.beta, run.start = _random_unit(basis[:, :m], generator), 0.0, m
        else:
            q = w / run.beta
        run.betas.append(run.beta)


class _UnpackedBatches:
    """Re-iterable ``(X, y)`` batches of a data loader, unpacked as in ``fit``."""

    def __init__(
        self,
        loader: Iterable,
        dict_key_x: str,
        dict_key_y: str,
        device: Any,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.loader = loader
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        self.device = device
        self.dtype = dtype

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        for batch in self.loader:
            X, y = unpack_batch(batch, self.dict_key_x, self.dict_key_y, self.device)
            if self.dtype is not None:
                X, y = cast_inputs(X, self.dtype), cast_inputs(y, self.dtype)
            yield X, y


def curvature_matvec(
    backend: Any, loader: Iterable, n_data: int, options: dict[str, Any] | None = None
) -> Matvec:
    """``v -> H v`` for the curvature ``H`` of ``backend`` summed over ``loader``.

    ``H`` is the curvature of the library loss (``factor * sum_n loss_n``) over every batch,
    the sum of what ``backend.full`` returns per batch, without forming it; the products run
    in the backend's ``sum_dtype`` (on a copy of the model in it, see
    ``CurvatureInterface._promoted``), like the curvature the other structures sum. Sampled
    curvatures (``stochastic=True``) draw their targets from a fixed seed per product, so
    the loader must yield the batches in the same order every time (no shuffling).

    Args:
        backend: A ``curvlinops`` backend instance (``CurvlinopsGGN``, ``CurvlinopsEF`` or
            ``CurvlinopsHessian``) for all weights.
        loader: The training data loader; batches are ``(X, y)`` or dict-like.
        n_data: Number of data points.
        options: Keyword options of the backend's ``full`` (``mc_samples``, ``seed``),
            checked by ``backend.curvature_options``.

    Returns:
        The product, a function of a vector ``(params,)`` returning ``(params,)``, or of a
        block ``(params, b)`` returning ``(params, b)`` in one pass over ``loader`` (per
        batch one forward pass and the products of the whole block, vectorised by
        ``curvlinops``; the batch's activations are held ``b`` times).

    Raises:
        UnknownOptionError: For an option the backend's ``full`` does not take.
    """
    options = backend.curvature_options("full", options or {})
    operator_cls, extra = backend._operator_spec(None, options)
    model, _ = backend._promoted(backend.model, None)  # see CurvatureInterface._promoted
    params = backend._params_of(model)
    dtype = params[0].dtype if params[0].dtype != backend.params[0].dtype else None
    data = _UnpackedBatches(
        loader, backend.dict_key_x, backend.dict_key_y, backend.params[0].device, dtype
    )
    operator = operator_cls(
        model,
        backend.lossfunc,
        params,
        data,
        check_deterministic=False,
        num_data=n_data,
        batch_size_fn=lambda X: batch_size(X, backend.dict_key_x),
        **extra,
    )
    scale = backend._scale

    def matvec(v: Tensor) -> Tensor:  # forward-mode products: see math_attention
        product = math_attention(backend.model, lambda: operator @ v.to(params[0].dtype))
        return scale * product.to(v.dtype)

    return matvec
