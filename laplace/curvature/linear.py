"""Closed-form GGN of a linear layer ``f = W phi + b`` from its inputs ``phi``.

With ``J_n = [I ⊗ phi_n^T, I]`` (row-major weight, then the bias), the GGN of the layer is
``sum_n Lambda_n ⊗ [phi_n, 1][phi_n, 1]^T``, where ``Lambda_n`` is the Hessian of the loss
w.r.t. the output ``f_n``: the identity for the squared error, ``diag(p_n) - p_n p_n^T`` with
``p_n = softmax(f_n)`` for the cross-entropy, or ``R_n^T R_n`` for sampled rows ``R_n``
(the Monte-Carlo Fisher). The last-layer Laplace classes build their dense, diagonal and
Kronecker-factored curvature from these sums in one forward pass per batch.

Accuracy of the softmax Hessian sums. ``sum_n diag(p_n) - sum_n p_n p_n^T`` is the
difference of two sums of size ``N`` that must cancel exactly along the all-ones direction
(``Lambda_n 1 = 0``); in float32 that cancellation leaves about ``eps * N`` there, which a
Kronecker factor multiplies by the largest eigenvalue of the input factor: spurious
curvature of the order of the prior precision on an ordinary CNN. Here the sums are formed
the other way round. With ``sum_c p_nc = 1``,

    Lambda_n = sum_{c < d} p_nc p_nd (e_c - e_d)(e_c - e_d)^T,

a graph Laplacian with the non-negative edge weights ``w_cd = p_nc p_nd``: its
off-diagonal entries are ``-w_cd`` and its diagonal holds the row sums ``sum_{d != c} w_cd``
(which equal ``p_nc (1 - p_nc)`` without subtracting anything). Summed over the data the
weights stay non-negative, so float32 sums of them are accurate to a few ``eps`` *relative*
to each weight, and a Laplacian whose weights are perturbed by a relative ``delta`` lies
between ``(1 - delta)`` and ``(1 + delta)`` times the exact one in the Loewner order (its
quadratic form is ``sum_{c<d} w_cd (v_c - v_d)^2``): every eigenvalue, the zero ones
included, keeps its relative accuracy. The Laplacian itself is assembled from the weights
in the accumulation precision (:mod:`laplace.utils.precision`).

Sums of products of features (the input factor, the dense blocks) are Grams in the
accumulation precision as well.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron
from laplace.utils.precision import accumulation_dtype, gram

__all__ = [
    "OutputCurvature",
    "computes_ggn",
    "laplacian",
    "linear_diag_ggn",
    "linear_full_ggn",
    "linear_kron_ggn",
    "output_curvature",
    "softmax_hessian_diagonal",
]


def softmax_hessian_diagonal(p: Tensor) -> Tensor:
    """``p_c (1 - p_c)``, the diagonal of ``diag(p) - p p^T``, without cancellation.

    ``1 - p_c`` is exact to round-off for every class but the most probable one (others have
    ``p_c <= 1/2``); for that one it is the sum of the other probabilities.

    Shapes:
        ``(batch, outputs) -> (batch, outputs)``
    """
    top = p.argmax(dim=-1, keepdim=True)
    rest = p.scatter(-1, top, 0.0).sum(-1, keepdim=True)  # 1 - p_top without cancelling
    return (p * (1 - p)).scatter_(-1, top, p.gather(-1, top) * rest)


def laplacian(weights: Tensor) -> Tensor:
    """The graph Laplacian ``diag(W 1) - W`` of the off-diagonal entries of ``weights``.

    The diagonal of ``weights`` is ignored. Computed in the accumulation precision.

    Shapes:
        ``(outputs, outputs) -> (outputs, outputs)``
    """
    L = weights.to(accumulation_dtype(weights.dtype, weights.device), copy=True)
    L.diagonal(dim1=-2, dim2=-1).zero_()
    sums = L.sum(-1)
    L.neg_().diagonal(dim1=-2, dim2=-1).copy_(sums)
    return L


class OutputCurvature(NamedTuple):
    """Per-sample loss Hessians ``Lambda_n`` w.r.t. the outputs, in one of three forms.

    Exactly one of the attributes is set.

    Attributes:
        identity: The outputs ``f`` when ``Lambda_n = I`` (squared error).
        probs: ``p_n = softmax(f_n)`` when ``Lambda_n = diag(p_n) - p_n p_n^T``.
        root: ``R_n`` of shape ``(batch, k, outputs)`` when ``Lambda_n = R_n^T R_n``.
    """

    identity: Tensor | None = None
    probs: Tensor | None = None
    root: Tensor | None = None

    @property
    def _reference(self) -> Tensor:
        return next(t for t in self if t is not None)

    @property
    def n_outputs(self) -> int:
        return self._reference.shape[-1]

    def diag(self) -> Tensor:
        """The diagonals of ``Lambda_n``, shape ``(batch, outputs)``."""
        if self.identity is not None:
            return torch.ones_like(self.identity)
        if self.probs is not None:
            return softmax_hessian_diagonal(self.probs)
        return self.root.square().sum(1)

    def weights(self) -> Tensor:
        """``sum_n p_n p_n^T`` (softmax form): the Laplacian's edge weights, summed in the
        inputs' dtype (non-negative terms), shape ``(outputs, outputs)``."""
        return self.probs.mT @ self.probs

    def total(self) -> Tensor:
        """``sum_n Lambda_n`` in the accumulation precision, shape ``(outputs, outputs)``."""
        reference = self._reference
        if self.identity is not None:
            eye = torch.eye(self.n_outputs, device=reference.device)
            return eye.to(accumulation_dtype(reference.dtype, reference.device)) * len(reference)
        if self.probs is not None:
            return laplacian(self.weights())
        return gram(self.root.flatten(0, 1))


def computes_ggn(backend: Any) -> bool:
    """Whether ``backend`` computes a GGN: it has ``_output_root`` (``GGNInterface`` family)."""
    return callable(getattr(backend, "_output_root", None))


def output_curvature(
    backend: Any, f: Tensor, options: Mapping[str, Any] | None = None
) -> OutputCurvature:
    """``Lambda_n`` of a GGN backend at the outputs ``f``.

    For classification ``Lambda_n = diag(p_n) - p_n p_n^T`` with ``p_n = softmax(f_n)``, for
    regression the identity, and with ``stochastic=True`` the backend's sampled root, with
    the sampling ``options`` (``mc_samples``, ``seed``) of a structure method.

    Shapes:
        ``f (batch, outputs)``
    """
    sampling = backend._sampling(backend.generator, dict(options or {}))
    if backend.stochastic:
        return OutputCurvature(root=backend._output_root(f, *sampling))
    if backend.likelihood == Likelihood.REGRESSION:
        return OutputCurvature(identity=f)
    return OutputCurvature(probs=torch.softmax(f, dim=-1))


def _with_ones(phi: Tensor, bias: bool) -> Tensor:
    return torch.cat([phi, phi.new_ones(phi.shape[0], 1)], dim=1) if bias else phi


def _parameter_order(n_outputs: int, width: int, bias: bool, device: torch.device) -> Tensor:
    """Positions of the parameters (row-major weight, then bias) in the ``(output, width)``
    grid of ``Lambda ⊗ [phi, 1][phi, 1]^T``."""
    grid = torch.arange(n_outputs * width, device=device).view(n_outputs, width)
    return torch.cat([grid[:, : width - 1].reshape(-1), grid[:, -1]]) if bias else grid.view(-1)


def linear_full_ggn(phi: Tensor, lam: OutputCurvature, bias: bool, **_: Any) -> Tensor:
    """Dense GGN ``sum_n Lambda_n ⊗ [phi_n, 1][phi_n, 1]^T`` of a linear layer.

    Rows and columns are ordered as the parameters: the row-major weight, then the bias.
    For the softmax form the blocks are ``-W_cd`` off the diagonal and ``sum_{d != c} W_cd``
    on it, with ``W_cd = sum_n p_nc p_nd [phi_n, 1][phi_n, 1]^T`` (the block Laplacian of
    the module docstring); the result is in the accumulation precision.

    Shapes:
        ``phi (batch, features) -> (params, params)``
    """
    n_outputs, phi = lam.n_outputs, _with_ones(phi, bias)
    width = phi.shape[1]
    if lam.identity is not None:
        block = gram(phi)
        H = torch.zeros(n_outputs, width, n_outputs, width, device=phi.device, dtype=block.dtype)
        H.diagonal(dim1=0, dim2=2).copy_(block.unsqueeze(-1))
    elif lam.probs is not None:
        weighted = lam.probs.unsqueeze(-1) * phi.unsqueeze(1)  # (batch, outputs, width)
        W = gram(weighted.reshape(phi.shape[0], -1)).view(n_outputs, width, n_outputs, width)
        own = W.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (outputs, width, width)
        H = -W
        H.diagonal(dim1=0, dim2=2).copy_((W.sum(2) - own).permute(1, 2, 0))
    else:
        outer = lam.root.unsqueeze(-1) * phi[:, None, None, :]  # (batch, k, outputs, width)
        H = gram(outer.reshape(-1, n_outputs * width)).view(n_outputs, width, n_outputs, width)
    order = _parameter_order(n_outputs, width, bias, phi.device)
    return H.reshape(n_outputs * width, -1)[order][:, order]


def linear_diag_ggn(phi: Tensor, lam: OutputCurvature, bias: bool, **_: Any) -> Tensor:
    """Diagonal of the GGN of a linear layer, ``sum_n diag(Lambda_n) ⊗ [phi_n^2, 1]``.

    Every term is non-negative, so the sums run in the inputs' dtype; the result is in the
    accumulation precision.

    Shapes:
        ``phi (batch, features) -> (params,)``
    """
    diagonals = lam.diag()
    weight = (diagonals.mT @ phi.square()).reshape(-1)
    h = torch.cat([weight, diagonals.sum(0)]) if bias else weight
    return h.to(accumulation_dtype(h.dtype, h.device))


def linear_kron_ggn(
    phi: Tensor, lam: OutputCurvature, bias: bool, n_data: int, factor: float, **_: Any
) -> Kron:
    """K-FAC of a linear layer's GGN for one batch: ``[B, A]`` (weight) and ``[B]`` (bias).

    ``B = sum_n Lambda_n`` and ``A = sum_n phi_n phi_n^T / N`` in the convention of
    :mod:`laplace.curvature.curvlinops`: the loss ``factor`` is spread evenly over the two
    factors of the weight block (``B / sqrt(factor)`` and ``sqrt(factor) A`` since
    ``Lambda_n`` already includes it). Both are in the accumulation precision.

    Shapes:
        ``phi (batch, features)``; ``B``: ``(outputs, outputs)``; ``A``: ``(features, features)``
    """
    B, root_factor = lam.total(), math.sqrt(factor)
    A = gram(phi).mul_(root_factor / n_data)
    weight_B = B if factor == 1 else B / root_factor
    return Kron([[weight_B, A], [B]] if bias else [[weight_B, A]])
