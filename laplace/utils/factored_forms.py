"""The GLM variance ``J M^-1 J^T`` of a Kronecker-factored precision from Jacobian factors.

Kept apart from :mod:`laplace.utils.matrix` (which represents Kronecker-factored matrices):
this is the predictive's use of them, for Linear layers (``(G, a)``) and convolutions
(:mod:`laplace.utils.conv_jacobians`), never forming the ``(batch, outputs, params)``
Jacobian.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from laplace.utils.conv_jacobians import factored_conv_form

if TYPE_CHECKING:
    from laplace.utils.matrix import KronDecomposed

__all__ = ["kron_factored_form"]


def kron_factored_form(
    decomposed: KronDecomposed, factors: Sequence[tuple[Tensor | tuple[Tensor, ...], ...]]
) -> Tensor:
    """``J M^-1 J^T`` per batch element from Kronecker-factored Jacobians.

    For a linear layer the Jacobian of output ``c`` w.r.t. the weight is the outer
    product ``g_c a^T`` of the gradient at the layer's output and its input, so a
    two-factor block contributes ``G^T diag(w) G`` with ``G = Q_0^T g`` and
    ``w_i = sum_j (Q_1^T a)_j^2 / lambda_ij``: the ``(batch, k, params)`` Jacobian is
    never formed. For a convolution it is a sum of such products over the output
    positions; ``Q_0^T G`` and ``Q_1^T a`` then give the layer's own Jacobian in the
    eigenbasis, formed for chunks of samples
    (:func:`~laplace.utils.conv_jacobians.factored_conv_form`). A one-factor block
    takes its Jacobian ``G`` directly; a linear layer's bias, whose block has the
    eigenvectors of its weight's output factor (K-FAC's), adds its inverse eigenvalues
    to the weight's ``w`` and shares one rotation of ``G``.

    Args:
        decomposed: The eigendecomposed precision ``M``.
        factors: Per block, ``(G, a)`` for two-factor blocks and ``(G,)`` for one-factor
            blocks, with ``G`` of shape ``(batch, k, d0)`` and ``a`` of shape
            ``(batch, d1)``, or for a convolution a tuple of ``k`` gradients
            ``(batch, d0, L)`` and the patches ``(batch, d1, L)`` at its ``L`` output
            positions.

    Shapes:
        ``-> (batch, k, k)``

    Raises:
        ValueError: If there is not one entry of ``factors`` per block.
    """
    if len(factors) != len(decomposed):
        raise ValueError(
            f"factors must have one entry per block ({len(decomposed)}), got {len(factors)}"
        )
    result, index = None, 0
    while index < len(decomposed):
        block, vectors = factors[index], decomposed.eigenvectors[index]
        inverse = 1 / decomposed._block_eigenvalues(index)
        if len(vectors) == 2 and isinstance(block[0], tuple):
            inverse = inverse.reshape(vectors[0].shape[0], -1)
            term = factored_conv_form(*block, inverse, bases=(vectors[0], vectors[1]))
        else:
            rotated = block[0] @ vectors[0]
            weights = inverse
            if len(vectors) == 2:
                inputs = (block[1] @ vectors[1]).square()
                weights = inputs @ inverse.reshape(vectors[0].shape[0], -1).mT
                if decomposed._bias_shares_rotation(factors, index):
                    index += 1
                    weights = weights + 1 / decomposed._block_eigenvalues(index)
            term = (rotated * weights.unsqueeze(-2)) @ rotated.mT
        result = term if result is None else result + term
        index += 1
    return result
