"""K-FAC factors of a batch in one forward pass and one batched backward pass.

For the exact GGN (Fisher type ``type-2``) and the empirical Fisher, the output-side factor of
a layer is ``B = sum_{n, r, k} g_nrk g_nrk^T``, where ``g_nrk`` is the gradient at the layer's
output (location ``r``) of ``f_n . R_nk`` and ``R_nk`` the rows of a root of the loss Hessian
w.r.t. the outputs (or the loss gradient, for the empirical Fisher). All rows ``k`` of all
samples go back through the network in one vectorised backward pass
(``torch.autograd.grad(..., is_grads_batched=True)``) instead of one pass per row, and the
softmax root has one row fewer than the number of classes. The input-side factor
``A = 1 / (N R) sum_{n, r} a_nr a_nr^T`` comes from the layer inputs seen by forward hooks
(unfolded patches for ``nn.Conv2d``), with the "expand" treatment of weight sharing
(Eschenhagen et al., 2023): a linear layer that sees a sequence per sample counts its
positions as ``R``; one that sees them folded into its first dimension counts every row as a
data point (``R = 1``), as ``curvlinops`` and therefore ``laplace-torch`` do.

The convention is that of :mod:`laplace.curvature.curvlinops` (its module docstring), whose
``kron`` uses this path where it applies and ``curvlinops.KFACLinearOperator`` otherwise:
sampled Fishers, layers called more than once per forward pass, grouped or non-zero-padded
convolutions, string paddings.

The references are those of :mod:`laplace.curvature.curvlinops`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from laplace.utils.data import Inputs

_MAX_GRAD_ENTRIES = 2**24
"""Most entries of layer-output gradients held at once; the rows ``k`` are split to fit."""


def _supported(layer: nn.Module) -> bool:
    """Whether the patches of ``layer`` are those of ``nn.functional.unfold``."""
    if isinstance(layer, nn.Linear):
        return True
    return (
        isinstance(layer, nn.Conv2d)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def _layer_owners(
    model: nn.Module, params: Sequence[Tensor]
) -> list[tuple[nn.Module, str]] | None:
    """``(layer, "weight" | "bias")`` per parameter, or None if a parameter has no such layer."""
    found = {}
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and _supported(layer):
            for kind, p in layer.named_parameters(recurse=False):
                found[id(p)] = (layer, kind)
    owners = [found.get(id(p)) for p in params]
    return None if any(o is None for o in owners) else owners


def _input_rows(layer: nn.Module, a: Tensor) -> tuple[Tensor, int]:
    """Layer inputs as rows that multiply the flattened weight, and the weight-sharing size.

    The size ``R`` is the product of the input's dimensions between the first and the last
    (the output pixels of a convolution): a layer that sees its inputs folded into the
    first dimension (``(batch * R, in)``) counts each row as a data point, as
    ``curvlinops`` does.

    Shapes:
        ``-> (rows, in)``
    """
    if isinstance(layer, nn.Conv2d):
        cols = nn.functional.unfold(
            a, layer.kernel_size, layer.dilation, layer.padding, layer.stride
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), cols.shape[2]
    return a.reshape(-1, a.shape[-1]), a.shape[1:-1].numel()


def _output_rows(layer: nn.Module, g: Tensor) -> Tensor:
    """Output gradients ``(k, batch, out, ...)`` or ``(k, batch, ..., out)`` as rows."""
    if isinstance(layer, nn.Conv2d):
        return g.movedim(2, -1).reshape(-1, g.shape[2])
    return g.reshape(-1, g.shape[-1])


def _batched_grad(f: Tensor, outputs: list[Tensor], directions: Tensor) -> tuple[Tensor, ...]:
    """Gradients at ``outputs`` of ``f . d`` for every row ``d`` of ``directions``, stacked.

    One vectorised backward pass; operations without a batching rule for it (custom autograd
    functions, for instance) get one backward pass per row instead.

    Shapes:
        ``directions``: ``(k, *f.shape)`` -> each gradient ``(k, *output.shape)``
    """
    try:
        return torch.autograd.grad(
            f, outputs, grad_outputs=directions, retain_graph=True, is_grads_batched=True
        )
    except RuntimeError:
        per_row = [
            torch.autograd.grad(f, outputs, grad_outputs=d, retain_graph=True) for d in directions
        ]
        return tuple(torch.stack(parts) for parts in zip(*per_row))


def batch_kfac(
    model: nn.Module,
    params: Sequence[Tensor],
    inputs: Inputs,
    n_data: int,
    rows: Callable[[Tensor], Tensor | None],
) -> tuple[list[list[Tensor]], Tensor] | None:
    """K-FAC factors of one batch, or None where this path does not apply.

    Args:
        model: The network; its output has shape ``(batch, outputs)``.
        params: The trainable parameters, in posterior order.
        inputs: The batch, passed to ``model`` whole.
        n_data: Size of the data set ``N``.
        rows: Maps the detached outputs ``f`` to the rows ``R`` whose Gram
            ``sum_k R_nk^T R_nk`` is the loss curvature w.r.t. ``f_n``, or to None for the
            identity.

    Returns:
        ``(kfacs, f)``: per parameter ``[B, A]`` for a weight and ``[B]`` for a bias, and the
        detached outputs. None if a parameter is not one of a supported ``nn.Linear`` /
        ``nn.Conv2d`` layer or a layer runs other than once.

    Shapes:
        ``f``: ``(batch, outputs)``; ``R``: ``(batch, k, outputs)``
    """
    owners = _layer_owners(model, params)
    if owners is None:
        return None
    layers = list({id(layer): layer for layer, _ in owners}.values())
    seen: dict[int, list[tuple[Tensor, Tensor]]] = {id(layer): [] for layer in layers}

    def hook(layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        seen[id(layer)].append((args[0].detach(), output))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.enable_grad():
            f = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if f.ndim != 2 or any(len(calls) != 1 for calls in seen.values()):
        return None
    batch, n_out = f.shape
    root = rows(f.detach())
    if root is None:
        root = torch.eye(n_out, dtype=f.dtype, device=f.device).expand(batch, n_out, n_out)
    outputs = [seen[id(layer)][0][1] for layer in layers]
    per_row = sum(out.numel() for out in outputs)
    chunk = max(1, _MAX_GRAD_ENTRIES // max(per_row, 1))
    B: list[Tensor | None] = [None] * len(layers)
    with torch.enable_grad():
        directions = root.transpose(0, 1)  # (k, batch, outputs)
        for start in range(0, directions.shape[0], chunk):
            part = directions[start : start + chunk]
            grads = _batched_grad(f, outputs, part)
            for i, (layer, g) in enumerate(zip(layers, grads)):
                g_rows = _output_rows(layer, g.detach())
                gram = g_rows.T @ g_rows
                B[i] = gram if B[i] is None else B[i] + gram
    A = {}
    for layer in layers:
        a_rows, sharing = _input_rows(layer, seen[id(layer)][0][0])
        A[id(layer)] = (a_rows.T @ a_rows) / (n_data * sharing)
    B_of = {id(layer): b for layer, b in zip(layers, B)}
    kfacs = [
        [B_of[id(layer)], A[id(layer)]] if kind == "weight" else [B_of[id(layer)]]
        for layer, kind in owners
    ]
    return kfacs, f.detach()
