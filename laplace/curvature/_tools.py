"""Helpers of the backend interface and the native backends
(:mod:`laplace.curvature.interface`, :mod:`laplace.curvature.curvature`): which parameters are
differentiated, how a batch is split into samples for ``torch.func.vmap``, and the square
root of the softmax output Hessian.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from laplace.utils.data import Inputs


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of ``module`` with ``requires_grad=True``, by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@contextmanager
def _features_attached(extractor: Any, attached: bool) -> Iterator[None]:
    """While ``attached``, let ``extractor`` keep its features on the autograd graph.

    A :class:`~laplace.utils.FeatureExtractor` detaches its features unless it was built
    with ``enable_backprop=True``; its flag is set for the call and restored afterwards.
    """
    previous = getattr(extractor, "enable_backprop", None)
    if not attached or previous is None or previous:
        yield
        return
    extractor.enable_backprop = True
    try:
        yield
    finally:
        extractor.enable_backprop = previous


def _split_samples(x: Inputs, n: int) -> tuple[Any, Callable[[Any], Inputs]]:
    """Separate what varies per sample in a batch ``x`` of size ``n`` from what is shared.

    Returns:
        ``(batched, rebuild)``: what to vmap over (``x`` itself, or the entries of a dict-like
        ``x`` that are tensors with leading dimension ``n``), and a function turning one
        sample of it into a batch of size one the model accepts.
    """
    if isinstance(x, Tensor):
        return x, lambda sample: sample.unsqueeze(0)
    batched = {
        key: value
        for key, value in x.items()
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n
    }

    def rebuild(sample: dict[str, Tensor]) -> Inputs:
        one = copy.copy(x)
        for key, value in sample.items():
            one[key] = value.unsqueeze(0)
        return one

    return batched, rebuild


def _softmax_hessian_root(f: Tensor) -> Tensor:
    """``R`` with ``R_n^T R_n = diag(p_n) - p_n p_n^T`` (``p = softmax(f)``), outputs - 1 rows.

    The Hessian has rank ``outputs - 1`` (it annihilates the ones vector), so one row fewer
    than a square root suffices, which saves a tenth of the Gram products for ten classes and
    half for two. With ``j`` the most probable class, ``q`` the probabilities with ``q_j = 0``
    and ``E = I - 1 e_j^T``: ``Lambda = E^T A E`` with ``A = diag(q) - q q^T``, and
    ``A = B^T B`` for ``B = diag(sqrt q) - a sqrt(q) q^T`` with ``a = 1 / (1 + sqrt(p_j))``
    (``(I - a u u^T)^2 = I - u u^T`` for ``u = sqrt q``, as ``|u|^2 = 1 - p_j``). ``R`` is
    ``B E`` without its zero row ``j``. Choosing the most probable ``j`` keeps ``a`` in
    ``[1/2, 1 / (1 + outputs^-1/2)]``; no entry is divided by a probability.

    Shapes:
        ``f``: ``(batch, outputs)`` -> ``(batch, outputs - 1, outputs)``
    """
    p = torch.softmax(f, dim=-1)
    batch, outputs = p.shape
    j = p.argmax(dim=-1, keepdim=True)
    q = p.scatter(-1, j, 0.0)
    a = 1.0 / (1.0 + p.gather(-1, j).sqrt())
    root_q = q.sqrt()
    B = torch.diag_embed(root_q) - (a * root_q).unsqueeze(-1) * q.unsqueeze(-2)
    R = B - B.sum(dim=-1, keepdim=True) * nn.functional.one_hot(j[:, 0], outputs).to(B)[:, None]
    rows = torch.arange(outputs, device=f.device).expand(batch, outputs)
    rows = rows[rows != j].view(batch, outputs - 1)
    return R.gather(1, rows.unsqueeze(-1).expand(batch, outputs - 1, outputs))
