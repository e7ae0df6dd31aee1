"""Brute-force float64 references that every test compares against.

Everything here is deliberately naive: dense matrices built from ``torch.func`` on the
flattened parameter vector, per-sample loops instead of vectorisation. The loss
convention matches the library: the summed cross-entropy for classification and
``0.5 * sum((f - y) ** 2)`` for regression.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev


def random_spd(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random symmetric positive definite ``(n, n)`` matrix, ``R R^T + I``."""
    root = torch.randn(n, n, generator=generator)
    return root @ root.T + torch.eye(n)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require gradients, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable(model).values()])


def flat_model_fn(model: nn.Module):
    """Return ``f(theta, x)`` evaluating ``model`` at the flat trainable vector ``theta``."""
    named = trainable(model)
    names = list(named)
    shapes = [p.shape for p in named.values()]
    sizes = [p.numel() for p in named.values()]

    def f(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(theta, sizes)
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(model, params, (x,))

    return f


def loss_fn(f: torch.Tensor, y: torch.Tensor, likelihood: str) -> torch.Tensor:
    if likelihood == "classification":
        return nn.functional.cross_entropy(f, y, reduction="sum")
    return 0.5 * ((f - y) ** 2).sum()


def dense_jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians ``(batch, outputs, params)`` by a loop over samples."""
    f = flat_model_fn(model)
    theta = flat_params(model)
    rows = [jacrev(lambda t, xi=xi: f(t, xi.unsqueeze(0))[0])(theta) for xi in x]
    return torch.stack(rows)


def output_hessians(fx: torch.Tensor, y: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Per-sample Hessians of the loss w.r.t. the outputs, ``(batch, outputs, outputs)``."""
    return torch.stack(
        [
            hessian(lambda fi, yi=yi: loss_fn(fi.unsqueeze(0), yi.unsqueeze(0), likelihood))(fi)
            for fi, yi in zip(fx.detach(), y)
        ]
    )


def dense_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str) -> torch.Tensor:
    """``sum_n J_n^T Lambda_n J_n`` with the exact output Hessian ``Lambda_n``."""
    Js = dense_jacobians(model, x)
    lams = output_hessians(model(x), y, likelihood)
    return torch.einsum("nkp,nkl,nlq->pq", Js, lams, Js)


def per_sample_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str
) -> torch.Tensor:
    """Gradients of each sample's loss, ``(batch, params)``, by a loop."""
    f = flat_model_fn(model)
    theta = flat_params(model)
    grads = [
        jacrev(lambda t, xi=xi, yi=yi: loss_fn(f(t, xi[None]), yi[None], likelihood))(theta)
        for xi, yi in zip(x, y)
    ]
    return torch.stack(grads)


def dense_ef(model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Empirical Fisher ``sum_n g_n g_n^T``."""
    G = per_sample_gradients(model, x, y, likelihood)
    return G.T @ G


def dense_hessian(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str
) -> torch.Tensor:
    """Hessian of the summed loss w.r.t. the flat trainable parameters."""
    f = flat_model_fn(model)
    theta = flat_params(model)
    return hessian(lambda t: loss_fn(f(t, x), y, likelihood))(theta)


def total_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, likelihood: str
) -> torch.Tensor:
    with torch.no_grad():
        return loss_fn(model(x), y, likelihood)
