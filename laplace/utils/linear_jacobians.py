"""Kronecker-factored Jacobians of networks whose trainable parameters sit in linear layers.

For ``nn.Linear`` applied to one vector per sample, the Jacobian of output ``c`` w.r.t. the
weight is the outer product ``g_c a^T`` of the gradient at the layer's output and the layer's
input, and w.r.t. the bias it is ``g_c``. Keeping the factors ``(g, a)`` instead of the
``(batch, outputs, params)`` Jacobian is what lets a Kronecker-factored posterior evaluate the
GLM variance layer by layer in its eigenbasis (see ``KronDecomposed.inv_square_form_factored``),
and what gives the diagonal of a GGN from a few backward passes instead of the per-sample
Jacobians (:func:`factored_gram_diagonal`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from laplace.utils.data import Inputs

__all__ = ["linear_jacobian_factors", "factored_gram_diagonal", "factored_diagonal_variance"]


def _owners(model: nn.Module, params: Mapping[str, Tensor]) -> list[tuple[nn.Linear, str]] | None:
    """``(layer, "weight" | "bias")`` for each parameter, or None if one is not a Linear's."""
    found = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for kind, p in module.named_parameters(recurse=False):
                found[id(p)] = (module, kind)
    owners = [found.get(id(p)) for p in params.values()]
    return None if any(o is None for o in owners) else owners


def linear_jacobian_factors(
    model: nn.Module, params: Mapping[str, Tensor], X: Inputs, create_graph: bool = False
) -> tuple[list[tuple[Tensor, ...]], Tensor] | None:
    """Per-parameter Jacobian factors of ``model`` at ``X``, or None where they do not exist.

    Args:
        model: The network; its output has shape ``(batch, outputs)``.
        params: The trainable parameters, by name, in posterior order.
        X: The inputs.
        create_graph: Keep the factors differentiable w.r.t. the inputs.

    Returns:
        ``(factors, f)``: per parameter ``(G, a)`` for a weight and ``(G,)`` for a bias, with
        ``G`` of shape ``(batch, outputs, out_features)`` and ``a`` of shape
        ``(batch, in_features)``; ``f`` the outputs. None if a parameter is not a Linear's, a
        layer runs more than once, or a layer sees more (or fewer) than one vector per
        sample, also when they are folded into its batch dimension.
    """
    owners = _owners(model, params)
    if owners is None:
        return None
    layers = list({id(layer): layer for layer, _ in owners}.values())
    captured: dict[int, list[tuple[Tensor, Tensor]]] = {id(layer): [] for layer in layers}

    def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        captured[id(layer)].append((inputs[0], output))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.enable_grad():
            f = model(X)
    finally:
        for handle in handles:
            handle.remove()
    calls = list(captured.values())
    if f.ndim != 2 or any(
        len(c) != 1 or c[0][0].ndim != 2 or c[0][0].shape[0] != f.shape[0] for c in calls
    ):
        return None  # e.g. a layer that sees several vectors per sample, folded into its batch
    outputs = [c[0][1] for c in calls]
    with torch.enable_grad():  # the caller may predict under torch.no_grad()
        per_output = [
            torch.autograd.grad(
                f[:, c].sum(), outputs, retain_graph=True, create_graph=create_graph
            )
            for c in range(f.shape[1])
        ]
    G = {id(layer): torch.stack([g[i] for g in per_output], 1) for i, layer in enumerate(layers)}
    factors = []
    for layer, kind in owners:
        grads = G[id(layer)]
        a = captured[id(layer)][0][0]
        factors.append(
            (grads, a if create_graph else a.detach()) if kind == "weight" else (grads,)
        )
    if not create_graph:
        factors = [tuple(t.detach() for t in block) for block in factors]
        f = f.detach()
    return factors, f


def factored_gram_diagonal(factors: list[tuple[Tensor, ...]], root: Tensor | None) -> Tensor:
    """Diagonal of ``sum_n J_n^T R_n^T R_n J_n`` from the Jacobian factors of each parameter.

    With ``M_n = R_n G_n`` (rows ``k``), a weight's Jacobian rows are ``M_nk a_n^T``, so the
    diagonal is ``sum_n (sum_k M_nk^2) (a_n^2)^T``: one ``(out, batch) @ (batch, in)`` product
    per layer, without a ``(batch, outputs, params)`` tensor. A bias gives ``sum_n sum_k M_nk^2``.

    Args:
        factors: Per parameter ``(G, a)`` or ``(G,)`` as :func:`linear_jacobian_factors`
            returns them.
        root: ``R`` per sample, or None for the identity.

    Returns:
        The diagonal, parameters concatenated in the order of ``factors``.

    Shapes:
        ``G``: ``(batch, outputs, out)``; ``a``: ``(batch, in)``; ``root``:
        ``(batch, k, outputs)`` -> ``(params,)``
    """
    parts = []
    for block in factors:
        rows = block[0] if root is None else torch.einsum("bkc,bco->bko", root, block[0])
        weights = rows.square().sum(1)
        if len(block) == 2:
            parts.append((weights.T @ block[1].square()).flatten())
        else:
            parts.append(weights.sum(0))
    return torch.cat(parts)


def factored_diagonal_variance(factors: list[tuple[Tensor, ...]], variance: Tensor) -> Tensor:
    """``J_n diag(v) J_n^T`` per sample from the Jacobian factors of each parameter.

    A weight contributes ``sum_o G_nco G_ndo (sum_i a_ni^2 v_oi)``: the inputs are reduced
    against the variances first, so no ``(batch, outputs, params)`` tensor is formed.

    Args:
        factors: Per parameter ``(G, a)`` or ``(G,)`` as :func:`linear_jacobian_factors`
            returns them.
        variance: The posterior variance of every parameter, in the order of ``factors``.

    Returns:
        The output covariances.

    Shapes:
        ``G``: ``(batch, outputs, out)``; ``a``: ``(batch, in)``; ``variance``: ``(params,)``
        -> ``(batch, outputs, outputs)``
    """
    total, start = None, 0
    for block in factors:
        G = block[0]
        if len(block) == 2:
            a = block[1]
            size = G.shape[-1] * a.shape[-1]
            v = variance[start : start + size].view(G.shape[-1], a.shape[-1])
            scale = a.square() @ v.T
        else:
            size = G.shape[-1]
            scale = variance[start : start + size].expand(G.shape[0], size)
        start += size
        part = torch.einsum("bco,bo,bdo->bcd", G, scale, G)
        total = part if total is None else total + part
    return total
