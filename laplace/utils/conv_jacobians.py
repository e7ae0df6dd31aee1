"""Jacobian factors of ``nn.Conv2d`` layers and the GLM variance computed from them.

A convolution applies its weight ``W`` (flattened to ``(out, in * kh * kw)`` as
``weight.reshape(out, -1)``) to every patch of its input: with ``a = unfold(input)``, the
patches ``(batch, in * kh * kw, L)`` in the channel-major order of the flattened weight,
the output at position ``l`` is ``W a[:, l] + b``. The Jacobian of network output ``c``
w.r.t. the weight is therefore a sum of outer products over the ``L`` output positions,
``J_c = sum_l G_c[:, l] a[:, l]^T``, with ``G`` the gradient at the layer's output, and
w.r.t. the bias it is ``sum_l G_c[:, l]`` (Grosse & Martens, ICML 2016, for the same
factors in K-FAC). Keeping ``(G, a)`` lets the predictive form ``J_c`` one layer at a time
(:func:`factored_conv_form`) and the diagonal of the GGN (:func:`conv_gram_diagonal`),
never the whole model's ``(batch, outputs, params)`` Jacobian.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["conv_gram_diagonal", "conv_patches", "factored_conv", "factored_conv_form"]

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


def _left_rotate(Q: Tensor, X: Tensor) -> Tensor:
    """``Q^T X`` over the second-to-last dimension of ``X``, as one matrix product.

    ``Q.mT @ X`` broadcast over the leading dimensions runs one ``(o, o) @ (o, L)`` product
    per leading index, matrix-vector products for ``L = 1`` (the last stage of a ResNet on
    32x32 inputs): measured (2 CPU threads, 1,000 leading indices) 28 times slower there
    than one ``(o, o) @ (o, rest)`` product, 4 times at ``L = 4``; at ``L = 16`` the two
    copies of the single product already cost more (1.7 times), so from ``L = 8`` on the
    broadcast product is kept.

    Shapes:
        ``Q (o, o), X (..., o, L) -> (..., o, L)``
    """
    if X.shape[-1] >= 8:
        return Q.mT @ X
    moved = X.movedim(-2, 0)
    return (Q.mT @ moved.reshape(Q.shape[0], -1)).view(moved.shape).movedim(0, -2)


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
        self.G = [_left_rotate(Q_out, g) for g in G] if rotate_first else list(G)
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
    of ``B`` and ``A`` and ``w`` the inverse eigenvalues. Where few positions make it the
    cheaper (:func:`_pairs_are_cheaper`, ``k`` the outputs), the pair expansion
    ``sum_{p, l, l'} G_c[p, l] G_d[p, l'] T[p, l, l']`` with
    ``T[p, l, l'] = sum_q w[p, q] a[q, l] a[q, l']`` never forms ``M`` (:func:`_pair_form`).
    Otherwise ``M`` is formed for chunks of samples of at most ``2**20`` entries (also
    counting the gradients stacked for it), and where one sample's exceeds that, for chunks
    of outputs (every pair of chunks in turn).

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
    if _pairs_are_cheaper(patches.shape[2], C):
        return _pair_form(G, patches, weight, bases)
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


def _pairs_are_cheaper(L: int, k: int) -> bool:
    """Whether the pair expansion over the ``L`` positions beats forming ``M`` for ``k``
    rows (outputs) per sample.

    The pairs take ``o i L^2`` multiply-adds per sample in one large matrix product;
    forming ``M`` takes ``k o i L`` in products with an inner dimension of only ``L`` and
    writes ``k o i`` entries that are read again. Measured on ResNet-18's layers (2 CPU
    threads), forming ``M`` takes as long as ``k o i max(20, 1.5 L)`` multiply-adds of the
    pair expansion: the pairs win for ``L^2 < k max(20, 1.5 L)``, by 10 to 600 times at
    ``L = 4`` and ``1`` (the last two stages at 32x32 inputs) for ``k = 9``.
    """
    pairs, forming = L * L, k * max(20, 1.5 * L)
    return pairs < forming


def _pair_form(
    G: Sequence[Tensor], patches: Tensor, weight: Tensor, bases: tuple[Tensor, Tensor] | None
) -> Tensor:
    """:func:`factored_conv_form` by the pair expansion, for chunks of samples: the rotated
    factors ``Q_0^T G_c`` and ``Q_1^T a``, ``T = (a a') w^T`` (one ``(n L^2, i) @ (i, o)``
    product), then ``Z[p, d, l] = sum_l' G_d[p, l'] T[p, l, l']`` and the form
    ``sum_{p, l} G_c[p, l] Z[p, d, l]``.

    Shapes:
        as :func:`factored_conv_form`
    """
    b, C, (o, L), i = patches.shape[0], len(G), G[0].shape[1:], patches.shape[1]
    Q_out, Q_in = (None, None) if bases is None else bases
    samples = max(1, _CHUNK_ENTRIES // (2 * C * o * L + L * L * (i + o) + L * i))
    parts = []
    for start in range(0, b, samples):
        rows = slice(start, start + samples)
        R = torch.stack([g[rows] for g in G], 1)  # (n, C, o, L)
        if Q_out is not None:
            R = _left_rotate(Q_out, R)
        a = patches[rows].mT if Q_in is None else _rotate_patches(patches[rows], Q_in)
        n = a.shape[0]
        T = ((a[:, :, None] * a[:, None]).reshape(-1, i) @ weight.mT).view(n, L, L, o)
        per_output = R.permute(0, 2, 1, 3)  # (n, o, C, L)
        Z = per_output @ T.permute(0, 3, 2, 1)  # (n, o, C, L): T is symmetric in (l, l')
        parts.append(R.reshape(n, C, o * L) @ Z.permute(0, 1, 3, 2).reshape(n, o * L, C))
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


def _stacked_rows(G: Sequence[Tensor], root: Tensor | None, samples: slice) -> Tensor:
    """``U_nk = sum_c R_nkc G_c`` (``G_c`` itself without ``root``) for some samples.

    Shapes:
        ``G [(batch, o, L)] * outputs, root (batch, k, outputs) -> (n, k, o, L)``
    """
    stacked = torch.stack([g[samples] for g in G], 1)
    if root is None:
        return stacked
    n, C, o, L = stacked.shape
    return (root[samples] @ stacked.view(n, C, o * L)).view(n, -1, o, L)


def conv_gram_diagonal(G: Sequence[Tensor], patches: Tensor, root: Tensor | None) -> Tensor:
    """Diagonal of ``sum_n J_n^T R_n^T R_n J_n`` for a convolution's weight.

    With ``U_nk = sum_c R_nkc G_c``, the ``k`` rows of sample ``n`` are
    ``M_nk = sum_l U_nk[:, l] a_n[:, l]^T`` and the diagonal is ``sum_nk M_nk^2``. Where it
    is the cheaper (:func:`_pairs_are_cheaper`) this is the pair expansion
    ``sum_{n, l, l'} (sum_k U_nk[p, l] U_nk[p, l']) (a_n[q, l] a_n[q, l'])``, one
    ``(o, n L^2) @ (n L^2, i)`` product; otherwise ``M`` is formed and squared. Chunks of
    samples (and of rows, where one sample's ``M`` is larger) hold at most ``2**20``
    entries.

    Args:
        G: The gradients at the layer's output positions, one tensor per network output.
        patches: The layer's input patches (:func:`conv_patches`).
        root: ``R`` per sample, or None for the identity.

    Returns:
        The diagonal, shaped like the flattened weight.

    Shapes:
        ``G [(batch, o, L)] * outputs, patches (batch, i, L), root (batch, k, outputs)
        -> (o, i)``
    """
    k = len(G) if root is None else root.shape[1]
    if _pairs_are_cheaper(patches.shape[2], k):
        return _pair_diagonal(G, patches, root, k)
    return _direct_diagonal(G, patches, root, k)


def _pair_diagonal(G: Sequence[Tensor], patches: Tensor, root: Tensor | None, k: int) -> Tensor:
    """:func:`conv_gram_diagonal` by the pair expansion, for chunks of samples."""
    b, (o, L), i = patches.shape[0], G[0].shape[1:], patches.shape[1]
    total = patches.new_zeros(o, i)
    samples = max(1, _CHUNK_ENTRIES // (L * L * (o + i) + k * o * L))
    for start in range(0, b, samples):
        rows = slice(start, start + samples)
        U = _stacked_rows(G, root, rows)
        pairs = torch.einsum("nkpl,nkpm->pnlm", U, U).reshape(o, -1)
        a = patches[rows].mT
        total.addmm_(pairs, (a[:, :, None] * a[:, None]).reshape(-1, i))
    return total


def _direct_diagonal(G: Sequence[Tensor], patches: Tensor, root: Tensor | None, k: int) -> Tensor:
    """:func:`conv_gram_diagonal` from ``M``, for chunks of samples and rows."""
    b, (o, L), i = patches.shape[0], G[0].shape[1:], patches.shape[1]
    total = patches.new_zeros(o, i)
    samples = max(1, _CHUNK_ENTRIES // (k * o * (i + L)))
    width = max(1, min(k, _CHUNK_ENTRIES // (o * i)))
    for start in range(0, b, samples):
        rows = slice(start, start + samples)
        U, a = _stacked_rows(G, root, rows), patches[rows].mT.unsqueeze(1)
        for first in range(0, k, width):
            total.add_((U[:, first : first + width] @ a).square_().sum((0, 1)))
    return total
