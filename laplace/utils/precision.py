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

One kind of these products is the exception: those whose inner dimension is the number of
parameters of a big model (``J diag(v) J^T`` for a diagonal posterior, ``J U`` for a
low-rank one). A float32 matrix product sums its inner dimension in float32, and over
millions of terms the round-off grows well past ``eps`` (measured: 5e-4 relative for the GLM
variance of an 11M-parameter ResNet-18 under a diagonal posterior, against 2e-6 for the
factored path that sums per layer). :func:`long_matmul` splits such an inner dimension into
chunks of ``2**16``, multiplies each in the compute dtype and adds the partial products in
the accumulation dtype: the cost is that of the plain product, the error that of a product of
``2**16`` terms.

Apple's MPS devices have no float64; there the accumulation precision is float32.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "compute_dtype", "gram", "long_matmul"]

_INNER_CHUNK = 2**16
"""Longest inner dimension :func:`long_matmul` multiplies in one product."""

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


def long_matmul(A: Tensor, B: Tensor, scale: Tensor | None = None) -> Tensor:
    """``(A * scale) @ B`` with the inner dimension summed in chunks of ``2**16`` whose
    products are added in :func:`accumulation_dtype`.

    Below ``2**16`` inner entries it is the plain product (in the inputs' dtype). The result
    is in the accumulation dtype otherwise; callers cast it back to the model's dtype. Each
    chunk's temporaries (``A * scale`` included) are chunk-sized.

    Args:
        A: The left factor.
        B: The right factor (broadcast against ``A`` like ``@``).
        scale: Optional multiplier of ``A``'s columns, ``(inner,)``.

    Shapes:
        ``A (..., m, K), B (..., K, n), scale (K,) -> (..., m, n)``
    """
    inner = A.shape[-1]
    if inner <= _INNER_CHUNK:
        return (A if scale is None else A * scale) @ B
    total = None
    for start in range(0, inner, _INNER_CHUNK):
        part = A[..., start : start + _INNER_CHUNK]
        if scale is not None:
            part = part * scale[start : start + _INNER_CHUNK]
        product = part @ B[..., start : start + _INNER_CHUNK, :]
        product = product.to(accumulation_dtype(product.dtype, product.device))
        total = product if total is None else total + product
    assert total is not None
    return total
