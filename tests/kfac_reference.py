"""A naive K-FAC, written independently of every curvature library, for tests.

For each ``nn.Linear`` / ``nn.Conv2d`` with trainable parameters, the per-sample layer
inputs ``a`` (unfolded patches for convolutions) are captured with forward hooks, and the
per-sample output gradients ``g`` come from back-propagating, one sample at a time, the
columns of a square root of the output Hessian (GGN) or the loss gradient itself
(empirical Fisher). With ``R`` the number of weight-sharing locations (``1`` for a linear
layer, the number of output pixels for a convolution), ``M`` the batch size and ``N`` the
data-set size, the factors are

    A = 1 / (N R) * sum_{n, r} a_nr a_nr^T          (input side)
    B = sum_{n, r, c} g_nrc g_nrc^T                  (output side)

so the layer's curvature block for the row-major flattened weight is ``kron(B, A)`` and
the bias block is ``B``; summing the factors of the batches of a data set gives the
full-data K-FAC. Losses follow ``tests/groundtruth.py`` (summed cross-entropy,
``0.5 * sum((f - y) ** 2)``), so the factors are already likelihood scaled.
"""

from __future__ import annotations

import torch
from groundtruth import loss_fn
from torch import nn
from torch.func import hessian


def _patches(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Rows of layer inputs that multiply the weight, ``(locations, in_features)``."""
    if isinstance(module, nn.Conv2d):
        assert module.groups == 1 and isinstance(module.padding, tuple)
        cols = nn.functional.unfold(
            inputs, module.kernel_size, module.dilation, module.padding, module.stride
        )
        return cols[0].T
    return inputs.reshape(-1, inputs.shape[-1])


def _output_rows(module: nn.Module, grad_out: torch.Tensor) -> torch.Tensor:
    """Output gradients as rows ``(locations, out_features)`` for one sample."""
    if isinstance(module, nn.Conv2d):
        return grad_out[0].flatten(1).T
    return grad_out.reshape(-1, grad_out.shape[-1])


def _hessian_sqrt(f: torch.Tensor, y: torch.Tensor, likelihood: str) -> torch.Tensor:
    """A matrix ``S`` with ``S S^T`` the output Hessian of one sample's loss."""
    H = hessian(lambda fi: loss_fn(fi[None], y[None], likelihood))(f.detach())
    evals, evecs = torch.linalg.eigh(H)
    return evecs * evals.clamp(min=0).sqrt()


def _layers(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and any(p.requires_grad for p in m.parameters())
    ]


def naive_kfac(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    likelihood: str,
    kind: str = "ggn",
    n_data: int | None = None,
) -> list[list[torch.Tensor]]:
    """K-FAC factors of one batch, in the order of the trainable parameters.

    Args:
        model: Network whose trainable parameters all sit in Linear/Conv2d layers.
        x: Inputs of the batch.
        y: Targets of the batch.
        likelihood: ``"classification"`` or ``"regression"``.
        kind: ``"ggn"`` (exact output Hessian) or ``"ef"`` (empirical Fisher).
        n_data: Data-set size ``N``; defaults to the batch size.

    Returns:
        For each trainable parameter, ``[B, A]`` for a weight or ``[B]`` for a bias.
    """
    layers = _layers(model)
    n_data = x.shape[0] if n_data is None else n_data
    A = {m: 0.0 for m in layers}
    B = {m: 0.0 for m in layers}
    for xn, yn in zip(x, y):
        captured: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [
            m.register_forward_hook(lambda mod, inp, out: captured.update({mod: (inp[0], out)}))
            for m in layers
        ]
        f = model(xn[None])[0]
        for h in handles:
            h.remove()
        if kind == "ggn":
            columns = _hessian_sqrt(f, yn, likelihood).T
        else:
            loss = loss_fn(f[None], yn[None], likelihood)
            columns = torch.autograd.grad(loss, f, retain_graph=True)
        outputs = [captured[m][1] for m in layers]
        for column in columns:
            grads = torch.autograd.grad(f @ column, outputs, retain_graph=True)
            for m, g in zip(layers, grads):
                rows = _output_rows(m, g)
                B[m] = B[m] + rows.T @ rows
        for m in layers:
            a = _patches(m, captured[m][0].detach())
            A[m] = A[m] + a.T @ a / (n_data * a.shape[0])
    by_param = {}
    for m in layers:
        by_param[m.weight] = [B[m], A[m]]
        if m.bias is not None:
            by_param[m.bias] = [B[m]]
    return [by_param[p] for p in model.parameters() if p.requires_grad]


def kfac_blocks(factors: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Dense curvature block of each parameter: ``kron(B, A)`` or ``B``."""
    return [torch.kron(*f) if len(f) == 2 else f[0] for f in factors]
