"""The inducing points of :class:`~laplace.functional.valla.VaLLA`.

- :class:`InducingPosterior`: ``q(u) = N(0, S)`` at ``M`` inducing points for a variational
  factor ``L``, a scalar prior precision and the inducing Jacobians; the predictive
  covariance and ``KL(q(u) || p(u))`` (the formulas are in :mod:`laplace.functional.valla`).
- :func:`parse_inducing`: the check of VaLLA's inducing arguments.
- :func:`choose_inducing`: the ``random`` and ``kmeans`` choice of inducing inputs from a
  training data set, reproducible from a seed (the same points as laplace-torch 0.3).

Everything is computed in the dtype of its inputs; VaLLA passes the accumulation dtype.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from laplace.functional.base import PreciseMode, is_count, subset_loader
from laplace.functional.variational import labels
from laplace.utils.data import Inputs, batch_size, dataset_size, unpack_batch
from laplace.utils.enums import Likelihood
from laplace.utils.precision import accumulation_dtype

__all__ = [
    "InducingPosterior",
    "choose_inducing",
    "copy_inputs",
    "kmeans_nearest",
    "parse_inducing",
]

STRATEGIES = ("random", "kmeans")


class InducingPosterior(PreciseMode):
    """``q(u)`` for a fixed factor ``L``, prior precision ``lambda`` and inducing Jacobians.

    With ``K_ZZ = J_Z J_Z^T / lambda`` and ``B = I + L^T K_ZZ L = R R^T`` (positive definite
    for any ``L``, even where ``K_ZZ`` is singular), the output covariance at Jacobians
    ``J*`` is ``J* J*^T / lambda - W^T W`` with ``W = R^-1 L^T J_Z J*^T / lambda``.

    :meth:`covariance` is in ``J_Z``'s dtype; VaLLA casts it to the model's dtype unless
    ``precise_results`` (within :meth:`precise`).

    Args:
        J_Z: Jacobians of the selected output at the inducing points, ``(M, params)``.
        L: The lower-triangular variational factor, ``(M, M)``.
        prior: The scalar prior precision ``lambda``, ``()``.
    """

    def __init__(self, J_Z: Tensor, L: Tensor, prior: Tensor) -> None:
        self.J_Z, self.prior = J_Z, prior
        self.K = J_Z @ J_Z.mT / prior
        eye = torch.eye(len(L), dtype=L.dtype, device=L.device)
        self.chol = torch.linalg.cholesky(eye + L.mT @ self.K @ L)
        self.project = torch.linalg.solve_triangular(self.chol, L.mT, upper=False) / prior

    def kl(self) -> Tensor:
        """``KL(q(u) || p(u)) = sum log diag R - (M - ||R^-1||_F^2) / 2``, a scalar."""
        eye = torch.eye(len(self.chol), dtype=self.chol.dtype, device=self.chol.device)
        inverse = torch.linalg.solve_triangular(self.chol, eye, upper=False)
        return self.chol.diagonal().log().sum() - 0.5 * (len(eye) - inverse.square().sum())

    def covariance(self, Js: Tensor, joint: bool) -> Tensor:
        """Posterior covariance of the outputs with Jacobians ``Js``, in ``J_Z``'s dtype.

        Shapes:
            ``(batch, outputs, params) -> (batch, outputs, outputs)``; with ``joint``
            ``(batch * outputs, batch * outputs)``
        """
        batch, C = Js.shape[:2]
        J = Js.to(self.J_Z.dtype).flatten(0, 1)
        W = self.project @ (self.J_Z @ J.mT)  # (M, batch * C)
        if joint:
            cov = J @ J.mT / self.prior - W.mT @ W
            return (cov + cov.mT) / 2
        J, W = J.reshape(batch, C, -1), W.reshape(-1, batch, C)
        prior_cov = torch.einsum("bcp,bdp->bcd", J, J) / self.prior
        return prior_cov - torch.einsum("mbc,mbd->bcd", W, W)


# --------------------------------------------------------------------- inducing inputs
def parse_inducing(
    locations: Any,
    num_inducing: Any,
    classes: Any,
    dict_key_x: str,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[str | None, Inputs | None, int, Tensor]:
    """Check VaLLA's inducing arguments: ``(strategy, inputs, M, classes)``, with a copy
    of explicit inputs (``strategy`` None) or ``inputs`` None for a strategy.

    Raises:
        ValueError: For an unknown strategy, a ``num_inducing`` that is not a positive
            integer (strategies) or differs from the number of inputs, no inputs, or
            ``inducing_classes`` that are not ``M`` non-negative integers.
    """
    if isinstance(locations, str):
        if locations not in STRATEGIES:
            raise ValueError(
                "inducing_locations must be inputs (a tensor or dict-like batch), "
                f"'random' or 'kmeans', got {locations!r}"
            )
        if not is_count(num_inducing):
            raise ValueError(
                f"num_inducing must be a positive integer with inducing_locations="
                f"{locations!r}, got {num_inducing!r}"
            )
        strategy, inputs, M = locations, None, int(num_inducing)
    else:
        strategy, inputs = None, copy_inputs(locations, device, dtype)
        M = batch_size(inputs, dict_key_x)
        if M == 0:
            raise ValueError("inducing_locations must hold at least one input, got none")
        if num_inducing is not None and (not is_count(num_inducing) or num_inducing != M):
            raise ValueError(
                f"num_inducing must match the {M} inducing_locations given, got {num_inducing!r}"
            )
    classes = torch.zeros(M, dtype=torch.long) if classes is None else classes
    classes = torch.as_tensor(classes, device=device)
    if classes.shape != (M,) or classes.is_floating_point() or bool((classes < 0).any()):
        raise ValueError(
            f"inducing_classes must be {M} non-negative output indices (one per inducing "
            f"point), got {classes.dtype} of shape {tuple(classes.shape)}"
        )
    return strategy, inputs, M, classes.long().to(device)


def copy_inputs(inputs: Any, device: torch.device | None, dtype: torch.dtype | None) -> Inputs:
    """A detached copy of inputs on ``device``, floating tensors in ``dtype`` (tensors,
    array-likes, and dict-like batches of them; None keeps the device or dtype)."""
    if isinstance(inputs, MutableMapping):
        return {
            key: copy_inputs(value, device, dtype) if isinstance(value, Tensor) else value
            for key, value in inputs.items()
        }
    tensor = torch.as_tensor(inputs).detach().to(device)
    floating = tensor.is_floating_point() and dtype is not None
    return tensor.to(dtype).clone() if floating else tensor.clone()


def choose_inducing(
    train_loader: Any,
    strategy: str,
    num_inducing: int,
    seed: int,
    likelihood: Likelihood,
    dict_keys: tuple[str, str],
    device: torch.device,
) -> tuple[Inputs, Tensor]:
    """Inducing inputs and classes from the training data set.

    ``random``: ``num_inducing`` rows drawn by ``torch.randperm`` from ``seed`` (for reward
    models ``ceil(num_inducing / 2)`` pairs, split into items), shuffled again by a fresh
    draw from ``seed``. ``kmeans``: the training input nearest to each of ``num_inducing``
    k-means centres (:func:`kmeans_nearest`). Classes are the labels for classification and
    0 otherwise. The data set is read in index order, whatever the loader's sampler.

    Raises:
        ValueError: If the data set has fewer inputs than ``num_inducing``, or ``kmeans`` is
            asked of non-floating (or dict-like) inputs.
    """
    M, n_rows = num_inducing, dataset_size(train_loader)
    rows = torch.arange(n_rows)
    if strategy == "random":
        needed = (M + 1) // 2 if likelihood == Likelihood.REWARD_MODELING else M
        rows = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))[:needed]
    X, classes = _read_rows(train_loader, rows, likelihood, dict_keys, device)
    available = len(classes)
    if available < M:
        raise ValueError(f"num_inducing={M} exceeds the {available} training inputs")
    if strategy == "kmeans":
        if not isinstance(X, Tensor) or not X.is_floating_point():
            raise ValueError("inducing_locations='kmeans' needs floating tensor inputs")
        points = X.flatten(1).to(accumulation_dtype(X.dtype, X.device))
        chosen = kmeans_nearest(points, M, seed)
    else:
        chosen = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:M]
    chosen = chosen.to(device)
    return _select_rows(X, chosen, available), classes[chosen]


def _read_rows(
    train_loader: Any,
    rows: Tensor,
    likelihood: Likelihood,
    dict_keys: tuple[str, str],
    device: torch.device,
) -> tuple[Inputs, Tensor]:
    """The inputs and classes of data set ``rows`` in order, reward pairs split into items."""
    inputs, classes = [], []
    for batch in subset_loader(train_loader, rows):
        X, y = unpack_batch(batch, *dict_keys, device)
        if likelihood == Likelihood.REWARD_MODELING:
            X = _split_pairs(X, dict_keys[0])
        if likelihood == Likelihood.CLASSIFICATION:
            classes.append(labels(y).to(device))
        else:
            n_items = batch_size(X, dict_keys[0])
            classes.append(torch.zeros(n_items, dtype=torch.long, device=device))
        inputs.append(X)
    return _concat_rows(inputs), torch.cat(classes)


def kmeans_nearest(points: Tensor, k: int, seed: int, iterations: int = 10) -> Tensor:
    """Indices of the points nearest to ``k`` k-means centres.

    Lloyd's algorithm for at most ``iterations`` steps (an empty cluster keeps its centre)
    from ``k`` distinct points drawn by ``numpy.random.RandomState(seed)``: the draw and
    the steps of SciPy's ``kmeans2(points, k, minit="points", seed=seed)``, which
    laplace-torch uses, so both choose the same inducing points.

    Shapes:
        ``points (n, d) -> (k,)``
    """
    start = np.random.RandomState(seed).permutation(len(points))[:k]
    centres = points[torch.as_tensor(start, device=points.device)]
    assignment = None
    for _ in range(iterations):
        nearest = _distances(points, centres).argmin(1)
        if assignment is not None and torch.equal(nearest, assignment):
            break
        assignment = nearest
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return _distances(points, centres).argmin(0)


def _distances(A: Tensor, B: Tensor) -> Tensor:
    """Exact pairwise Euclidean distances (no matrix-product shortcut, which rounds ties)."""
    return torch.cdist(A, B, compute_mode="donot_use_mm_for_euclid_dist")


def _split_pairs(X: Inputs, dict_key_x: str) -> Inputs:
    """Reward-model pairs ``(batch, 2, ...)`` as single items ``(2 batch, ...)``; other
    per-pair entries of a dict-like batch are repeated."""
    if isinstance(X, Tensor):
        return X.flatten(0, 1)
    pairs = len(X[dict_key_x])

    def split(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        if value.shape[:2] == (pairs, 2):
            return value.flatten(0, 1)
        return value.repeat_interleave(2, 0)

    return {key: split(value) for key, value in X.items()}


def _concat_rows(chunks: list[Inputs]) -> Inputs:
    if isinstance(chunks[0], Tensor):
        return torch.cat(chunks)
    return {
        key: torch.cat([chunk[key] for chunk in chunks]) if isinstance(value, Tensor) else value
        for key, value in chunks[0].items()
    }


def _select_rows(X: Inputs, index: Tensor, n_rows: int) -> Inputs:
    if isinstance(X, Tensor):
        return X[index.to(X.device)]
    return {
        key: value[index.to(value.device)]
        if isinstance(value, Tensor) and value.ndim and len(value) == n_rows
        else value
        for key, value in X.items()
    }
