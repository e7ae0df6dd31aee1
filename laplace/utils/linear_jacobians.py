"""Kronecker-factored Jacobians of networks whose trainable parameters sit in linear layers.

For ``nn.Linear`` applied to one vector per sample, the Jacobian of output ``c`` w.r.t. the
weight is the outer product ``g_c a^T`` of the gradient at the layer's output and the layer's
input, and w.r.t. the bias it is ``g_c``. Keeping the factors ``(g, a)`` instead of the
``(batch, outputs, params)`` Jacobian is what lets a Kronecker-factored posterior evaluate the
GLM variance layer by layer in its eigenbasis (see ``KronDecomposed.inv_square_form_factored``),
and what gives the diagonal of a GGN from a few backward passes instead of the per-sample
Jacobians (:func:`factored_gram_diagonal`). On request (``convolutions=True``, for the
diagonal fit and the predictive) ``nn.Conv2d`` layers are factored too, with per-position
factors (:mod:`laplace.utils.conv_jacobians`). The affine parameters of normalisation
layers get dense per-sample rows from the same backward passes
(:mod:`laplace.utils.norm_jacobians`).

The dense GGN ``sum_n J_n^T R_n^T R_n J_n`` (``k`` rows ``R_n`` per sample) has a weight block
``sum_n (U_in^T U_jn) ⊗ (a_in a_jn^T)`` for two linear layers, with ``U_n = R_n G_n``: the
``k`` rows are contracted per sample first, so the block costs ``N P_i P_j`` products instead
of the ``k N P_i P_j`` of the Gram of the Jacobian rows (:func:`factored_gram`; 9 times fewer
for ten classes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from laplace.utils.conv_jacobians import (
    conv_gram_diagonal,
    conv_patches,
    factored_conv,
    factored_conv_form,
)
from laplace.utils.data import Inputs
from laplace.utils.norm_jacobians import (
    factored_norm,
    normalized_input,
    position_sums,
    uses_batch_statistics,
)
from laplace.utils.norm_jacobians import sees_one_sample_each as norm_sees_one_sample_each
from laplace.utils.precision import gram

__all__ = [
    "factored_diagonal_variance",
    "factored_gram",
    "factored_gram_diagonal",
    "linear_jacobian_factors",
    "map_factors",
    "partial_linear_factors",
]

Factors = tuple[Tensor | tuple[Tensor, ...], ...]
"""One parameter's Jacobian factors: ``(G, a)`` or ``(G,)``; ``G`` of a convolution's weight
is a tuple with one tensor per output (:func:`linear_jacobian_factors`)."""

_KINDS = ("weight", "bias")
"""The names of a layer's parameters, in the order of its factors."""

_CHUNK_ENTRIES = 2**22
"""Most entries of the intermediate products of :func:`factored_gram` (chunked over samples)."""


def _owners(
    model: nn.Module, params: Mapping[str, Tensor], convolutions: bool = False
) -> list[tuple[nn.Module, str] | None]:
    """``(layer, "weight" | "bias")`` for each parameter of an ``nn.Linear``, of a supported
    normalisation layer (:func:`~laplace.utils.norm_jacobians.factored_norm`) and with
    ``convolutions`` of a supported ``nn.Conv2d`` (see
    :func:`~laplace.utils.conv_jacobians.factored_conv`), else None; also None for a
    parameter that several modules hold (tied weights)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for kind, p in module.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((module, kind))

    def supported(module: nn.Module) -> bool:
        if isinstance(module, nn.Linear) or factored_norm(module):
            return True
        return convolutions and factored_conv(module) is not None

    owners = [holders.get(id(p), []) for p in params.values()]
    return [o[0] if len(o) == 1 and supported(o[0][0]) else None for o in owners]


def _sees_one_sample_each(layer: nn.Module, inputs: Tensor, n: int) -> bool:
    """Whether ``layer`` saw one vector (a Linear), one image (a Conv2d) or one input of any
    shape (a normalisation layer) per sample."""
    if factored_norm(layer):
        return norm_sees_one_sample_each(layer, inputs, n)
    return inputs.shape[0] == n and inputs.ndim == (2 if isinstance(layer, nn.Linear) else 4)


def _layer_factors(
    model: nn.Module,
    owners: list[tuple[nn.Module, str] | None],
    X: Inputs,
    create_graph: bool,
) -> tuple[dict[int, dict[str, Factors]], Tensor]:
    """The factors of every layer in ``owners`` that sees one input per sample.

    One forward pass with hooks on those layers and one backward pass per output. A layer
    that runs more or less than once, or sees other than one ``(batch, in)`` input (a
    Linear), ``(batch, in, H, W)`` image (a Conv2d) or ``(batch, *)`` input (a
    normalisation layer), for example a sequence or rows folded into its batch, is left
    out. The hooks hand a copy of each output on, so that in-place operations after a
    layer (``ReLU(inplace=True)``) leave the captured output, and the gradients taken at
    it, as the layer computed it; a normalisation layer's input is normalised in its hook,
    before later operations can change it.

    Returns:
        ``({id(layer): {"weight": factors, "bias": factors}}, f)`` with the factors of
        :func:`linear_jacobian_factors`.
    """
    layers = {id(o[0]): o[0] for o in owners if o is not None}
    captured: dict[int, list[tuple[Tensor, Tensor]]] = {key: [] for key in layers}

    def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        kept = inputs[0]
        if factored_norm(layer):
            kept = normalized_input(layer, kept if create_graph else kept.detach())
        captured[id(layer)].append((kept, output))
        return output.clone()

    handles = [layer.register_forward_hook(hook) for layer in layers.values()]
    try:
        with torch.enable_grad():
            f = model(X)
    finally:
        for handle in handles:
            handle.remove()
    if f.ndim != 2:
        return {}, f
    kept = {
        key: calls[0]
        for key, calls in captured.items()
        if len(calls) == 1 and _sees_one_sample_each(layers[key], calls[0][0], f.shape[0])
    }
    if not kept:
        return {}, f
    outputs = [output for _, output in kept.values()]
    per_layer: list[list[Any]] = [[] for _ in kept]
    with torch.enable_grad():  # the caller may predict under torch.no_grad()
        for c in range(f.shape[1]):
            grads = torch.autograd.grad(
                f[:, c].sum(), outputs, retain_graph=True, create_graph=create_graph
            )
            for parts, (key, (inputs, _)), g in zip(per_layer, kept.items(), grads):
                parts.append(_reduced_gradient(layers[key], g, inputs))
    factors = {
        key: _assembled(layers[key], parts, inputs, create_graph)
        for parts, (key, (inputs, _)) in zip(per_layer, kept.items())
    }
    return factors, f


def _reduced_gradient(
    layer: nn.Module, g: Tensor, inputs: Tensor
) -> Tensor | tuple[Tensor, Tensor]:
    """What a layer keeps of one output's gradient ``g`` at its output: ``g`` (a Linear),
    ``g`` flattened over the positions (a Conv2d, ``(batch, out, L)``), or the Jacobian rows
    of ``gamma`` and ``beta`` (a normalisation layer, :mod:`laplace.utils.norm_jacobians`;
    ``inputs`` is then ``xhat``), reduced at once so that no gradient of its size is kept."""
    if factored_norm(layer):
        return position_sums(layer, g * inputs), position_sums(layer, g)
    return g if isinstance(layer, nn.Linear) else g.flatten(2)


def _assembled(
    layer: nn.Module, parts: list[Any], inputs: Tensor, create_graph: bool
) -> dict[str, Factors]:
    """A layer's weight and bias factors from its reduced gradients (one entry of ``parts``
    per output, from :func:`_reduced_gradient`) and its input (``xhat`` of a
    normalisation layer)."""
    if factored_norm(layer):
        return {kind: (torch.stack([p[i] for p in parts], 1),) for i, kind in enumerate(_KINDS)}
    conv = factored_conv(layer)
    if conv is None:
        G = torch.stack(parts, 1)
        return {"weight": (G, inputs), "bias": (G,)}
    # not stacked: one (batch, outputs, out, L) tensor would double the memory
    patches = conv_patches(inputs if create_graph else inputs.detach(), conv)
    bias = torch.stack([g.sum(-1) for g in parts], 1)
    return {"weight": (tuple(parts), patches), "bias": (bias,)}


def linear_jacobian_factors(
    model: nn.Module,
    params: Mapping[str, Tensor],
    X: Inputs,
    create_graph: bool = False,
    convolutions: bool = False,
) -> tuple[list[Factors], Tensor] | None:
    """Per-parameter Jacobian factors of ``model`` at ``X``, or None where they do not exist.

    Args:
        model: The network; its output has shape ``(batch, outputs)``.
        params: The trainable parameters, by name, in posterior order.
        X: The inputs.
        create_graph: Keep the factors differentiable w.r.t. the inputs.
        convolutions: Also factor ``nn.Conv2d`` layers (see
            :mod:`laplace.utils.conv_jacobians`); only consumers that handle their
            per-position factors may ask for them.

    Returns:
        ``(factors, f)``: per parameter ``(G, a)`` for a weight and ``(G,)`` for a bias, with
        ``G`` of shape ``(batch, outputs, out_features)`` and ``a`` of shape
        ``(batch, in_features)``; for a Conv2d weight ``G`` is a tuple of one
        ``(batch, out, L)`` gradient per output and ``a`` the patches
        ``(batch, in * kh * kw, L)`` at the ``L`` output positions, and its bias gets ``G``
        summed over them and stacked, ``(batch, outputs, out)``; the ``gamma`` and ``beta``
        of a normalisation layer get their dense rows ``(G,)``, ``(batch, outputs,
        channels)`` (:mod:`laplace.utils.norm_jacobians`); ``f`` the outputs. None if a
        parameter is not a supported layer's or is tied to another module, a layer runs more
        than once, a layer sees more (or fewer) than one input per sample, also when they are
        folded into its batch dimension, or a batch normalisation layer normalises with the
        batch's statistics (:func:`~laplace.utils.norm_jacobians.uses_batch_statistics`;
        checked before any forward pass, so that its running statistics stay unchanged).

    Shapes:
        ``-> [(batch, outputs, out), (batch, in)] or [(batch, outputs, out)]``,
        ``(batch, outputs)``
    """
    if uses_batch_statistics(model):
        return None  # the samples' outputs depend on each other
    owners = _owners(model, params, convolutions)
    if any(o is None for o in owners):
        return None
    layer_factors, f = _layer_factors(model, owners, X, create_graph)
    if f.ndim != 2 or len(layer_factors) != len({id(layer) for layer, _ in owners}):
        return None  # e.g. a layer that sees several vectors per sample, folded into its batch
    factors = [layer_factors[id(layer)][kind] for layer, kind in owners]
    if not create_graph:
        factors = map_factors(factors, Tensor.detach)
        f = f.detach()
    return factors, f


def map_factors(factors: list[Factors], fn: Callable[[Tensor], Tensor]) -> list[Factors]:
    """``fn`` applied to every tensor of ``factors`` (to each output's gradient of a
    convolution too), for example a cast to another dtype. A tensor that several blocks
    share (a layer's ``G``, for its weight and its bias) is mapped once and stays shared."""
    done: dict[int, Tensor] = {}

    def apply(t: Tensor) -> Tensor:
        if id(t) not in done:
            done[id(t)] = fn(t)
        return done[id(t)]

    return [
        tuple(tuple(apply(g) for g in t) if isinstance(t, tuple) else apply(t) for t in block)
        for block in factors
    ]


def partial_linear_factors(
    model: nn.Module, params: Mapping[str, Tensor], X: Inputs
) -> tuple[dict[str, tuple[Tensor, ...]], Tensor]:
    """Detached Jacobian factors of those ``params`` that belong to Linear layers seeing one
    vector per sample, ``(G, a)`` and ``(G,)``, or to normalisation layers, ``(G,)`` (see
    :func:`linear_jacobian_factors`); the other parameters are left out.

    Returns:
        ``({name: (G, a) or (G,)}, f)`` with the detached outputs ``f``.
    """
    owners = _owners(model, params)
    layer_factors, f = _layer_factors(model, owners, X, create_graph=False)
    kept = [(name, o) for name, o in zip(params, owners) if o and id(o[0]) in layer_factors]
    blocks = map_factors([layer_factors[id(o[0])][o[1]] for _, o in kept], Tensor.detach)
    return {name: block for (name, _), block in zip(kept, blocks)}, f.detach()


def factored_gram_diagonal(factors: list[Factors], root: Tensor | None) -> Tensor:
    """Diagonal of ``sum_n J_n^T R_n^T R_n J_n`` from the Jacobian factors of each parameter.

    With ``M_n = R_n G_n`` (rows ``k``), a linear weight's Jacobian rows are ``M_nk a_n^T``,
    so the diagonal is ``sum_n (sum_k M_nk^2) (a_n^2)^T``: one ``(out, batch) @ (batch, in)``
    product per layer, without a ``(batch, outputs, params)`` tensor. Dense rows (a bias, a
    normalisation layer's parameters) give ``sum_n sum_k M_nk^2``, a convolution's weight
    :func:`~laplace.utils.conv_jacobians.conv_gram_diagonal`.

    Args:
        factors: Per parameter ``(G, a)`` or ``(G,)`` as :func:`linear_jacobian_factors`
            returns them.
        root: ``R`` per sample, or None for the identity.

    Returns:
        The diagonal, parameters concatenated in the order of ``factors``.

    Shapes:
        ``G``: ``(batch, outputs, out)``; ``a``: ``(batch, in)``; ``root``:
        ``(batch, k, outputs)`` (a Conv2d weight: ``G [(batch, out, L)] * outputs``,
        ``a (batch, in, L)``) -> ``(params,)``
    """
    parts = []
    for block in factors:
        G = block[0]
        if isinstance(G, tuple):
            parts.append(conv_gram_diagonal(G, block[1], root).flatten())
            continue
        rows = G if root is None else root @ G
        weights = rows.square().sum(1)
        if len(block) == 2:
            parts.append((weights.T @ block[1].square()).flatten())
        else:
            parts.append(weights.sum(0))
    return torch.cat(parts)


def factored_diagonal_variance(factors: list[Factors], variance: Tensor) -> Tensor:
    """``J_n diag(v) J_n^T`` per sample from the Jacobian factors of each parameter.

    A linear weight contributes ``sum_o G_nco G_ndo (sum_i a_ni^2 v_oi)``: the inputs are
    reduced against the variances first, so no ``(batch, outputs, params)`` tensor is
    formed. A convolution's weight forms its own per-sample Jacobian, one layer and a chunk
    of samples at a time (:func:`~laplace.utils.conv_jacobians.factored_conv_form`).

    Args:
        factors: Per parameter ``(G, a)`` or ``(G,)`` as :func:`linear_jacobian_factors`
            returns them.
        variance: The posterior variance of every parameter, in the order of ``factors``.

    Returns:
        The output covariances.

    Shapes:
        ``G``: ``(batch, outputs, out)``; ``a``: ``(batch, in)``; ``variance``: ``(params,)``
        (a Conv2d weight: ``G [(batch, out, L)] * outputs``, ``a (batch, in, L)``)
        -> ``(batch, outputs, outputs)``
    """
    total, start = None, 0
    for block in factors:
        G = block[0]
        n_out = G[0].shape[1] if isinstance(G, tuple) else G.shape[2]
        size = n_out * (block[1].shape[1] if len(block) == 2 else 1)
        v = variance[start : start + size]
        start += size
        if len(block) == 1:
            part = (G * v) @ G.mT
        elif isinstance(G, tuple):
            part = factored_conv_form(G, block[1], v.view(n_out, -1))
        else:
            scale = block[1].square() @ v.view(n_out, -1).T
            part = (G * scale[:, None]) @ G.mT
        total = part if total is None else total + part
    return total


def _kron_sum(K: Tensor, a_i: Tensor, a_j: Tensor) -> Tensor:
    """``sum_n K_n ⊗ (a_in a_jn^T)``, rows ``(o, p)`` and columns ``(o', q)`` row-major.

    One product ``vec(K)^T vec(a_i a_j^T)`` over the samples (``n (o_i o_j) (q_i q_j)``
    multiply-adds, chunked over samples), then a transpose of the result.

    Shapes:
        ``K (n, o_i, o_j), a_i (n, q_i), a_j (n, q_j) -> (o_i * q_i, o_j * q_j)``
    """
    n, o_i, o_j = K.shape
    q_i, q_j = a_i.shape[1], a_j.shape[1]
    flat = K.reshape(n, o_i * o_j)
    total = K.new_zeros(o_i * o_j, q_i * q_j)
    chunk = max(1, _CHUNK_ENTRIES // (q_i * q_j))
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        outer = (a_i[rows, :, None] * a_j[rows, None, :]).reshape(-1, q_i * q_j)
        total.addmm_(flat[rows].mT, outer)
    return total.view(o_i, o_j, q_i, q_j).permute(0, 2, 1, 3).reshape(o_i * q_i, o_j * q_j)


def factored_gram(
    blocks: list[tuple[Tensor, ...]], dtype: torch.dtype | None = None, out: Tensor | None = None
) -> Tensor:
    """``sum_n J_n^T R_n^T R_n J_n`` from per-parameter rows of ``M_n = R_n J_n``.

    A parameter's rows are given either densely, ``(D,)`` with ``D_n = R_n J_n`` restricted
    to its entries, or for a linear layer's weight as ``(U, a)`` with ``U_n = R_n G_n``, the
    rows being ``U_nk ⊗ a_n``. The dense parameters before the first weight form one Gram
    of their rows (:func:`~laplace.utils.precision.gram`) in the leading corner; every
    later parameter is factored (a dense one as ``(D, 1)``): blocks between two of them are
    Kronecker sums (:func:`_kron_sum`, ``N P_i P_j`` products instead of the
    ``k N P_i P_j`` of the rows' Gram) and blocks with the leading ones are
    ``sum_n (D_n^T U_n) ⊗ a_n``. Everything is summed in ``dtype``.

    Args:
        blocks: Per parameter, in order, ``(D,)`` or ``(U, a)``.
        dtype: The dtype of the sums (default the rows').
        out: If given, the curvature is added to it in place (and it is returned).

    Returns:
        The dense curvature, parameters in the order of ``blocks``.

    Shapes:
        ``D (n, k, P_i)``; ``U (n, k, o_i)``, ``a (n, q_i)`` with ``P_i = o_i q_i`` ->
        ``(params, params)``
    """
    dtype = blocks[0][0].dtype if dtype is None else dtype
    n = blocks[0][0].shape[0]
    ones = blocks[0][0].new_ones(n, 1)
    n_leading = 0  # the leading parameters given densely form one Gram
    while n_leading < len(blocks) and len(blocks[n_leading]) == 1:
        n_leading += 1
    kept = [
        block if len(block) == 2 or i < n_leading else (block[0], ones)
        for i, block in enumerate(blocks)
    ]
    dense, factored = list(range(n_leading)), list(range(n_leading, len(kept)))
    sizes = [b[0].shape[-1] * (b[1].shape[-1] if len(b) == 2 else 1) for b in kept]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    span = {i: slice(start, start + sizes[i]) for i, start in enumerate(starts)}
    total = sum(sizes)
    H = blocks[0][0].new_zeros(total, total, dtype=dtype) if out is None else out
    n_dense = sum(sizes[i] for i in dense)
    D = None
    if dense:
        D = torch.cat([kept[i][0].to(dtype) for i in dense], dim=-1)
        gram(D.flatten(0, 1), dtype, out=H[:n_dense, :n_dense])
    for position, j in enumerate(factored):
        U_j, a_j = (t.to(dtype) for t in kept[j])
        if D is not None:
            X = torch.einsum("nkp,nko->npo", D, U_j)
            cross = (X.reshape(n, -1).mT @ a_j).reshape(n_dense, sizes[j])
            H[:n_dense, span[j]].add_(cross)
            H[span[j], :n_dense].add_(cross.mT)
        for i in factored[: position + 1]:
            U_i, a_i = (t.to(dtype) for t in kept[i])
            block = _kron_sum(U_i.mT @ U_j, a_i, a_j)
            H[span[i], span[j]].add_(block)
            if i != j:
                H[span[j], span[i]].add_(block.mT)
    return H
