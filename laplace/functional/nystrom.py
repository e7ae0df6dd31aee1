"""The Nyström feature map of ELLA (:class:`~laplace.functional.ella.ELLA`) and its posterior.

With ``J_S`` the ``(S, params)`` Jacobian rows of a subsample of the training data and the
top ``K`` eigenpairs ``K_SS = J_S P0^-1 J_S^T ~ V Lambda V^T``, the Nyström feature map of the
kernel ``k(x, x') = J(x) P0^-1 J(x')^T`` is

    ``psi(x) = k(x, S) V Lambda^-1/2 = J(x) U``,    ``U = P0^-1 J_S^T V Lambda^-1/2``,

``(outputs, K)`` per input. Each column of ``U`` is a direction in parameter space, so
``psi(x)`` is ``K`` Jacobian-vector products (:func:`jvp_features`). This module draws the
subsample (:func:`draw_subsample`), computes ``U`` (:func:`nystrom_directions`) and the
features, and holds the Gaussian posterior of the feature weights
(:class:`FeaturePosterior`).

References:
    Deng, Zhou, Zhu. Accelerated linearized Laplace approximation for Bayesian deep
    learning. NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from laplace.curvature._fallback import FastPath, cannot_take, run_with_fallback
from laplace.functional.base import PreciseMode, checked_data_size
from laplace.utils.data import Inputs, unpack_batch

__all__ = [
    "FeaturePosterior",
    "draw_subsample",
    "jvp_features",
    "lacks_forward_mode",
    "nystrom_directions",
]


class FeaturePosterior(PreciseMode):
    """The Gaussian posterior ``N(0, A^-1)`` of the ``K`` feature weights ``w``.

    Args:
        precision: ``A``, in the accumulation precision.
        dtype: The model's dtype, that of returned moments (outside :meth:`precise`).

    Shapes:
        ``precision (K, K)``
    """

    def __init__(self, precision: Tensor, dtype: torch.dtype) -> None:
        self.precision = precision
        chol = torch.linalg.cholesky(precision)
        eye = torch.eye(len(chol), dtype=chol.dtype, device=chol.device)
        self.inverse_root = torch.linalg.solve_triangular(chol, eye, upper=False)  # L^-1
        self.dtype = dtype

    def covariance(self, psi: Tensor, joint: bool = False) -> Tensor:
        """``psi A^-1 psi^T`` per input, or jointly over the batch.

        Shapes:
            ``psi (batch, outputs, K) -> (batch, outputs, outputs)``; with ``joint``
            ``(batch * outputs, batch * outputs)``
        """
        Z = psi.to(self.inverse_root.dtype) @ self.inverse_root.mT
        if joint:
            Z = Z.flatten(0, 1)
        cov = Z @ Z.mT
        return cov if self.precise_results else cov.to(self.dtype)


def draw_subsample(
    train_loader: Any, size: int, seed: int, balanced: bool, dict_keys: tuple[str, str]
) -> Tensor:
    """``size`` indices of ``train_loader.dataset`` drawn from ``seed``, in the order drawn.

    With ``balanced`` the draw is round-robin over the classes (the argmax of one-hot or
    probability targets), each class in an order drawn from ``seed``.

    Raises:
        ValueError: If the data set has fewer than ``size`` points (``subsample_size``).
    """
    n_data = checked_data_size(train_loader, size, "subsample_size")
    generator = torch.Generator().manual_seed(seed)
    if not balanced:
        return torch.randperm(n_data, generator=generator)[:size]
    dataset = train_loader.dataset
    labels = torch.tensor([_label(dataset[i], dict_keys) for i in range(n_data)])
    queues = []
    for label in labels.unique(sorted=True):
        members = torch.nonzero(labels == label).flatten()
        queues.append(members[torch.randperm(len(members), generator=generator)].tolist())
    rounds = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return torch.tensor(rounds[:size])


def _label(item: Any, dict_keys: tuple[str, str]) -> int:
    """The class of a dataset item (the argmax of a one-hot or probability target)."""
    _, y = unpack_batch(item, *dict_keys, torch.device("cpu"))
    return int(y.argmax()) if y.numel() > 1 else int(y)


def nystrom_directions(
    J_S: Tensor, variance: Tensor, n_eigenvalues: int, dtype: torch.dtype
) -> Tensor:
    """``U = P0^-1 J_S^T V Lambda^-1/2`` from the ``n_eigenvalues`` largest eigenpairs of
    ``K_SS = J_S P0^-1 J_S^T``, in the dtype of ``J_S``.

    Args:
        J_S: The subsample's Jacobian rows.
        variance: The prior variance ``P0^-1`` per parameter.
        n_eigenvalues: ``K``, at most the number of rows.
        dtype: The model's dtype, whose round-off bounds the numerically positive
            eigenvalues.

    Shapes:
        ``J_S (S, params), variance (params,) -> (params, K)``

    Raises:
        ValueError: If fewer than ``n_eigenvalues`` eigenvalues are above the round-off.
    """
    K_SS = (J_S * variance) @ J_S.mT
    values, vectors = torch.linalg.eigh(K_SS)
    values, vectors = values.flip(0), vectors.flip(1)
    tolerance = torch.finfo(dtype).eps * max(J_S.shape) * values.abs().max()
    rank = int((values > tolerance).sum())
    if rank < n_eigenvalues:
        raise ValueError(
            f"n_eigenvalues={n_eigenvalues} exceeds the numerical rank {rank} of the "
            f"subsample's kernel ({len(K_SS)} rows): reduce n_eigenvalues, increase "
            "subsample_size or use another seed"
        )
    values, vectors = values[:n_eigenvalues], vectors[:, :n_eigenvalues]
    return (variance[:, None] * J_S.mT) @ (vectors * values.rsqrt())


def jvp_features(
    model: nn.Module,
    named_params: Mapping[str, Tensor],
    sizes: list[int],
    directions: Tensor,
    X: Inputs,
    chunk_size: int,
    check_output: Callable[[Tensor], None],
) -> tuple[Tensor, Tensor]:
    """``psi(X) = J(X) U`` by ``torch.func.jvp``, one column of ``U`` per tangent, and the
    model output (checked by ``check_output``).

    ``named_params`` are the parameters ``U`` acts on, ``sizes`` their blocks in the rows of
    ``U``. ``vmap`` over chunks of ``chunk_size`` columns, or a loop over the columns where
    the model cannot be vmapped.

    Shapes:
        ``directions (params, K) -> (batch, outputs, K), (batch, outputs)``
    """
    params = {name: p.detach() for name, p in named_params.items()}

    def tangents(columns: Tensor) -> dict[str, Tensor]:  # (k, params) -> k tangents
        parts = columns.split(sizes, dim=1)
        return {n: t.reshape(-1, *p.shape) for (n, p), t in zip(params.items(), parts)}

    def push(tangent: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        def output(theta: dict[str, Tensor]) -> Tensor:
            return functional_call(model, theta, (X,))

        return jvp(output, (params,), (tangent,))

    def vmapped() -> tuple[Tensor, Tensor]:
        chunks = directions.mT.split(chunk_size)
        pushed = [vmap(push, out_dims=(None, 0))(tangents(chunk)) for chunk in chunks]
        return pushed[0][0], torch.cat([products for _, products in pushed])

    def looped() -> tuple[Tensor, Tensor]:
        pushed = [push({n: t[0] for n, t in tangents(u[None]).items()}) for u in directions.mT]
        return pushed[0][0], torch.stack([products for _, products in pushed])

    f, products = run_with_fallback(model, FastPath.VMAP, vmapped, looped)
    check_output(f)
    return products.permute(1, 2, 0), f


def lacks_forward_mode(error: BaseException) -> bool:
    """Whether ``error`` (or its cause) says the model has no forward-mode derivative, or
    has an ``autograd.Function`` that ``torch.func`` cannot transform."""
    causes = [e for e in (error, error.__cause__) if e is not None]
    return any(cannot_take(FastPath.FORWARD_MODE, e) or "setup_context" in str(e) for e in causes)
