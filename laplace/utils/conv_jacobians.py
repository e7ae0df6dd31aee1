"""Jacobian factors of ``nn.Conv2d`` layers and the GLM variance computed from them.

A convolution applies its weight ``W`` (flattened to ``(out, in * kh * kw)`` as
``weight.reshape(out, -1)``) to every patch of its input: with ``a = unfold(input)``, the
patches ``(batch, in * kh * kw, L)`` in the channel-major order of the flattened weight,
the output at position ``l`` is ``W a[:, l] + b``. The Jacobian of network output ``c``
w.r.t. the weight is therefore a sum of outer products over the ``L`` output positions,
``J_c = sum_l G_c[:, l] a[:, l]^T``, with ``G`` the gradient at the layer's output, and
w.r.t. the bias it is ``sum_l G_c[:, l]`` (Grosse & Martens, ICML 2016, for the same
factors in K-FAC). Keeping ``(G, a)`` lets the predictive form ``J_c`` one layer at a time
(:func:`factored_conv_form`), never the whole model's ``(batch, outputs, params)``
Jacobian.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["conv_patches", "factored_conv", "factored_conv_form"]

_CHUNK_ENTRIES = 2**20
"""Most entries of a chunk of the per-sample layer Jacobians ``M`` in :func:`factored_conv_form`
(measured: larger chunks are no faster, and above a few MiB each fresh chunk costs page
faults)."""


def _same_padding(layer: nn.Conv2d) -> tuple[int, int] | None:
    """The symmetric padding that ``padding="same"`` amounts to, or None where torch pads
    one side more (an odd ``dilation * (kernel - 1)``)."""
    totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    if any(total % 2 for total in totals):
        return None
    return totals[0] // 2, totals[1] // 2


def factored_conv(layer: nn.Module) -> dict[str, tuple[int, int]] | None:
    """The ``unfold`` arguments of a convolution whose Jacobian factors are supported.

    Supported: an ``nn.Conv2d`` (or a subclass keeping its forward) with ``groups == 1``,
    ``padding_mode == "zeros"`` and numeric padding, ``"valid"``, or ``"same"`` where it is
    symmetric.

    Args:
        layer: Any module.

    Returns:
        ``{"kernel_size", "dilation", "padding", "stride"}`` for :func:`conv_patches`, or
        None if ``layer`` is not a supported convolution.
    """
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1 or layer.padding_mode != "zeros":
        return None
    kind = type(layer)
    if kind.forward is not nn.Conv2d.forward or kind._conv_forward is not nn.Conv2d._conv_forward:
        return None
    padding = layer.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        padding = _same_padding(layer)
    if padding is None or isinstance(padding, str):
        return None
    return {
        "kernel_size": tuple(layer.kernel_size),
        "dilation": tuple(layer.dilation),
        "padding": tuple(padding),
        "stride": tuple(layer.stride),
    }


def conv_patches(inputs: Tensor, arguments: dict[str, tuple[int, int]]) -> Tensor:
    """The input patches of a convolution, channel-major like ``weight.reshape(out, -1)``.

    Args:
        inputs: The convolution's input.
        arguments: Its ``unfold`` arguments (:func:`factored_conv`).

    Returns:
        The patches.

    Shapes:
        ``(batch, in, H, W) -> (batch, in * kh * kw, L)``
    """
    return nn.functional.unfold(inputs, **arguments)


def _rotate_patches(patches: Tensor, Q: Tensor) -> Tensor:
    """``Q^T a[:, l]`` for every sample and position, positions first (one matrix product
    over all of them).

    Shapes:
        ``patches (batch, in, L), Q (in, in) -> (batch, L, in)``
    """
    b, i, L = patches.shape
    return (patches.mT.reshape(b * L, i) @ Q).view(b, L, i)


class _LayerJacobian:
    """The per-sample Jacobian of a convolution's weight, ``M_c = Q_0^T (G_c a^T) Q_1``,
    for chunks of samples and outputs.

    Each side is rotated where it is cheaper: the output gradients before the sum over the
    ``L`` positions if ``L < in`` (``C o^2 L`` against ``C o^2 in`` products per sample), the
    patches before it if ``L < C out`` (``L in^2`` against ``C out in^2``); the other
    rotations are applied to ``M``. The gradients of the outputs are stacked one chunk at
    a time, never as one ``(batch, outputs, out, L)`` tensor.

    Args:
        G: The output gradients, one tensor per network output.
        patches: The input patches.
        bases: ``(Q_0, Q_1)``, or None for no rotation.

    Shapes:
        ``G [(batch, out, L)] * outputs, patches (batch, in, L), Q_0 (out, out),
        Q_1 (in, in)``
    """

    def __init__(
        self, G: Sequence[Tensor], patches: Tensor, bases: tuple[Tensor, Tensor] | None
    ) -> None:
        C, (o, L), i = len(G), G[0].shape[1:], patches.shape[1]
        Q_out, Q_in = (None, None) if bases is None else bases
        self.Q_out = None if Q_out is None or i > L else Q_out  # rotate M, not G
        self.Q_in = None if Q_in is None or C * o > L else Q_in  # rotate M, not a
        rotate_first = Q_out is not None and self.Q_out is None
        self.G = [torch.matmul(Q_out.mT, g) for g in G] if rotate_first else list(G)
        rotate_first = Q_in is not None and self.Q_in is None
        self.S = _rotate_patches(patches, Q_in) if rotate_first else patches.mT

    def flat_weight(self, weight: Tensor) -> Tensor:
        """``weight (out, in)`` flattened in the order of :meth:`__call__`'s entries."""
        return (weight if self.Q_out is None else weight.mT).reshape(-1)

    def __call__(self, samples: slice, outputs: slice, scale: Tensor) -> Tensor:
        """``M`` for some samples and outputs, its entries multiplied by ``scale`` (in place,
        no second tensor of its size), flattened ``(n, c, out * in)`` (or ``in * out`` when
        the output side is rotated last).

        Shapes:
            ``scale (P,) -> (n, c, P)``
        """
        R = torch.stack([g[samples] for g in self.G[outputs]], 1)
        n, c, o, L = R.shape
        M = (R.view(n, c * o, L) @ self.S[samples]).view(n, c, o, -1)
        if self.Q_in is not None:
            M = M @ self.Q_in
        if self.Q_out is not None:
            M = M.mT @ self.Q_out
        return M.reshape(n, c, -1).mul_(scale)


def factored_conv_form(
    G: Sequence[Tensor],
    patches: Tensor,
    weight: Tensor,
    bases: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``sum_{pq} M_c[p, q] M_d[p, q] w[p, q]`` per sample for a convolution's weight.

    ``M_c = sum_l G_c[:, l] a[:, l]^T`` is the layer's Jacobian for output ``c``; with
    ``bases`` it is rotated into a Kronecker block's eigenbasis, ``Q_0^T M_c Q_1``. So this
    is ``J diag(w) J^T`` for variances ``w``, or ``J (B ⊗ A)^-1 J^T`` with the eigenvectors
    of ``B`` and ``A`` and ``w`` the inverse eigenvalues. ``M`` is formed for chunks of
    samples of at most ``2**20`` entries (also counting the gradients stacked for it), and
    where one sample's exceeds that, for chunks of outputs (every pair of chunks in turn).

    Args:
        G: The gradients at the layer's output positions, one tensor per network output.
        patches: The layer's input patches (:func:`conv_patches`).
        weight: The weight of each entry of the layer's weight matrix (non-negative).
        bases: The eigenvectors ``(Q_0, Q_1)`` of the output- and input-side factors.

    Returns:
        The ``(outputs, outputs)`` form of every sample.

    Shapes:
        ``G [(batch, o, L)] * outputs, patches (batch, i, L), weight (o, i), Q_0 (o, o),
        Q_1 (i, i) -> (batch, outputs, outputs)``
    """
    b, C = patches.shape[0], len(G)
    jacobian = _LayerJacobian(G, patches, bases)
    root = jacobian.flat_weight(weight).sqrt()  # M_c diag(w) M_d^T from M diag(sqrt(w))
    per_output = max(root.numel(), G[0][0].numel())
    width = max(1, min(C, _CHUNK_ENTRIES // per_output))
    if width < C:
        rows = [_output_chunked_form(jacobian, root, n, width, C) for n in range(b)]
        return torch.cat(rows)
    samples = max(1, _CHUNK_ENTRIES // (per_output * C))
    parts = []
    for start in range(0, b, samples):
        M = jacobian(slice(start, start + samples), slice(None), root)
        parts.append(M @ M.mT)
    return torch.cat(parts)


def _output_chunked_form(
    jacobian: _LayerJacobian, root: Tensor, sample: int, width: int, n_outputs: int
) -> Tensor:
    """:func:`factored_conv_form` for one sample, ``width`` outputs of ``M`` at a time.

    Shapes:
        ``root (o * i,) -> (1, outputs, outputs)``
    """
    rows = slice(sample, sample + 1)
    starts = range(0, n_outputs, width)
    blocks: dict[tuple[int, int], Tensor] = {}
    for first in starts:
        M_c = jacobian(rows, slice(first, first + width), root)
        for second in starts:
            if second < first:
                blocks[first, second] = blocks[second, first].mT
            else:
                M_d = (
                    M_c if second == first else jacobian(rows, slice(second, second + width), root)
                )
                blocks[first, second] = M_c @ M_d.mT
    return torch.cat([torch.cat([blocks[c, d] for d in starts], 2) for c in starts], 1)
