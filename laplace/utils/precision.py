"""The floating-point policy: which precision each stage of a Laplace approximation runs in.

A float32 network gives Jacobians, features and probabilities with a relative error of a
few units of float32 round-off (``eps = 6e-8``): that is what the input data allow. What is
built from them must not add more than that, and two stages would, in float32:

- **Sums over the data.** The curvature is a sum of ``N`` per-sample terms. Summed in
  float32 (a matrix product ``M^T M`` accumulates in float32), its error is about
  ``eps * lambda_max`` in *every* direction, including those where the exact curvature is
  zero or tiny. The posterior covariance there is ``1 / (lambda + delta)`` for a prior
  precision ``delta``, so its relative error is about ``eps * lambda_max / delta``: 2% for
  a curvature 1e5 times the prior, and the GLM predictive inherits it. The same sums in
  float64 leave only the error of the inputs, which for a Gram ``M^T M`` of perturbed
  factors is quadratic in ``eps`` in the directions where ``M`` is (nearly) zero.
- **Factorisations.** Eigendecompositions and Cholesky factors of the curvature and the
  posterior precision, and the log-determinants taken from them.

Both therefore run in :func:`accumulation_dtype` (float64 for every lower precision), and
the curvature objects keep their sums in it: they are small by construction (a dense
matrix for at most a few thousand parameters, Kronecker factors, a diagonal). Everything
handed back to the user (``la.H``, posterior covariances, predictive moments, the marginal
likelihood) is cast back to the model's dtype, and float64 models are computed in float64
throughout, as before.

Products of data-sized tensors with the (already accurate) factors — the GLM predictive's
``J V`` for a batch of Jacobians ``J`` and an eigenbasis ``V`` — run in
:func:`compute_dtype`, the model's dtype (float32 for half-precision models): an
orthogonal rotation of float32 rows adds an error of order ``eps`` relative to the rows
themselves, the round-off the rows already carry. Doing them in float64 would double the
predictive's cost on a CPU and cost far more on most GPUs, for no accuracy the inputs
could give.

Apple's MPS devices have no float64; there the accumulation precision is float32.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "compute_dtype", "gram"]

_GRAM_BLOCKS = 4
"""Column blocks of :func:`gram`: ``(b + 1) / (2 b)`` of the products of a full ``M^T M``."""

_GRAM_MIN_BLOCKED = 512
"""Fewest rows and columns for which :func:`gram` splits the product into blocks (measured:
below, the smaller products are no faster than the full one)."""


def accumulation_dtype(
    dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.dtype:
    """The dtype of curvature sums and factorisations for a model of ``dtype``.

    float64 for every floating dtype (float32 on MPS devices, which have no float64).
    """
    if torch.device(device or "cpu").type == "mps":
        return torch.float32
    return torch.float64 if dtype.is_floating_point else dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of products of data-sized tensors with the factors: the model's dtype,
    float32 for half-precision models."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def gram(
    M: Tensor, dtype: torch.dtype | None = None, out: Tensor | None = None, scale: float = 1.0
) -> Tensor:
    """``M^T M`` summed in ``dtype`` (default :func:`accumulation_dtype` of ``M``).

    The result is symmetric, so for large ``M`` only the blocks on and above the diagonal
    of a block partition of the columns are multiplied (``5/8`` of the products for four
    blocks) and the others are mirrored (25-35% faster from 512 rows and columns on).

    Args:
        M: The rows.
        dtype: The dtype of the sums.
        out: If given, ``scale * M^T M`` is added to it in place (no ``(cols, cols)``
            temporary of the full size) and it is returned.
        scale: The multiplier of the product added to ``out`` (ignored without ``out``).

    Shapes:
        ``(rows, cols) -> (cols, cols)``
    """
    dtype = accumulation_dtype(M.dtype, M.device) if dtype is None else dtype
    M = M.to(dtype)
    rows, cols = M.shape
    if min(rows, cols) < _GRAM_MIN_BLOCKED:
        return M.mT @ M if out is None else out.addmm_(M.mT, M, alpha=scale)
    edges = [cols * i // _GRAM_BLOCKS for i in range(_GRAM_BLOCKS + 1)]
    result = M.new_empty(cols, cols) if out is None else out
    for start, stop in itertools.pairwise(edges):
        block = M[:, start:stop].mT @ M[:, start:]
        if out is None:
            result[start:stop, start:] = block
            result[stop:, start:stop] = block[:, stop - start :].mT
        else:
            result[start:stop, start:].add_(block, alpha=scale)
            result[stop:, start:stop].add_(block[:, stop - start :].mT, alpha=scale)
    return result
