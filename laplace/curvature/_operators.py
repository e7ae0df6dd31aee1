"""Entries of a square linear operator (a ``curvlinops`` curvature) from its products.

A dense submatrix or a diagonal is read by multiplying the operator onto blocks of the
identity's columns, at most ``_CHUNK_ENTRIES`` entries per block, so memory stays bounded
whatever the number of parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["operator_diagonal", "operator_submatrix"]

_CHUNK_ENTRIES = 2**22
"""Most entries in one block of identity columns (and in its product with the operator)."""


def _column_blocks(
    operator: Any, indices: Tensor, like: Tensor
) -> Iterator[tuple[Tensor, Tensor]]:
    """Multiply the operator onto blocks of the identity's columns ``indices``.

    Args:
        operator: A square ``curvlinops`` linear operator of size ``params``.
        indices: The columns to form.
        like: A tensor giving the device and dtype of the identity columns.

    Yields:
        ``(cols, operator @ E[:, cols])`` for consecutive blocks ``cols`` of ``indices``.

    Shapes:
        ``indices``: ``(k,)``; each product: ``(params, len(cols))``
    """
    n_params = operator.shape[1]
    chunk = max(1, _CHUNK_ENTRIES // n_params)
    for cols in indices.split(chunk):
        identity = torch.zeros(n_params, cols.numel(), device=like.device, dtype=like.dtype)
        identity[cols, torch.arange(cols.numel(), device=like.device)] = 1.0
        yield cols, operator @ identity


def operator_submatrix(operator: Any, indices: Tensor, like: Tensor) -> Tensor:
    """The symmetric submatrix ``H[indices][:, indices]`` of a self-adjoint operator.

    Shapes:
        ``indices``: ``(k,)`` -> ``(k, k)``
    """
    blocks = [
        block.index_select(0, indices) for _, block in _column_blocks(operator, indices, like)
    ]
    H = torch.cat(blocks, dim=1)
    return (H + H.T) / 2


def operator_diagonal(operator: Any, indices: Tensor, like: Tensor) -> Tensor:
    """The diagonal entries ``H[i, i]`` for ``i`` in ``indices``, one column block at a time.

    Shapes:
        ``indices``: ``(k,)`` -> ``(k,)``
    """
    return torch.cat(
        [
            block[cols, torch.arange(cols.numel(), device=like.device)]
            for cols, block in _column_blocks(operator, indices, like)
        ]
    )
