"""Small numerical and bookkeeping helpers shared across the package.

Linear algebra for symmetric positive (semi-)definite matrices, Gaussian sampling, the
layout of prior precisions over a model's parameters, and a validation loop for prior tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from laplace.utils.enums import Likelihood, LinkApprox, PredType, PriorStructure, parse_enum

__all__ = [
    "symeig",
    "psd_eigh",
    "stable_eigh",
    "invsqrt_precision",
    "diagonal_add_scalar",
    "normal_samples",
    "parameters_per_layer",
    "fix_prior_prec_structure",
    "expand_prior_precision",
    "get_nll",
    "validate",
]

_EIGH_JITTER = 1e-6
_LOG_CLAMP = 1e-30


def _solver_precision(M: Tensor) -> Tensor:
    """``M`` in float64 if it is a lower-precision matrix on the CPU, else ``M`` itself.

    LAPACK's single-precision symmetric eigensolver is several times slower than the
    double-precision one on the rank-deficient matrices typical of curvature (measured: 4.2 s
    vs 1.0 s for a rank-200 785 x 785 K-FAC factor), and less accurate. On accelerators the
    input precision is kept.
    """
    if M.device.type == "cpu" and M.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return M.double()
    return M


def stable_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in the precision of :func:`_solver_precision`, cast back.

    Shapes:
        ``M (n, n) -> eigenvalues (n,), eigenvectors (n, n)``
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(_solver_precision(M))
    return eigenvalues.to(M.dtype), eigenvectors.to(M.dtype)


def _with_jitter(solve: Callable[[Tensor], Any], M: Tensor) -> tuple[Any, float]:
    """``(solve(M), 0)``, or ``(solve(M + jitter I), jitter)`` if the solver fails."""
    try:
        return solve(M), 0.0
    except RuntimeError:
        jitter = torch.eye(M.shape[-1], device=M.device, dtype=M.dtype) * _EIGH_JITTER
        return solve(M + jitter), _EIGH_JITTER


def psd_eigenvalues(M: Tensor) -> Tensor:
    """Eigenvalues of a symmetric positive semi-definite matrix, ascending, clamped at zero.

    The eigenvalues of :func:`psd_eigh` without the eigenvectors (``torch.linalg.eigvalsh``,
    about half the time of ``eigh``), in the same precision and with the same jittered retry.

    Shapes:
        ``M (n, n) -> (n,)``
    """
    eigenvalues, jitter = _with_jitter(lambda A: torch.linalg.eigvalsh(_solver_precision(A)), M)
    return (eigenvalues - jitter).clamp(min=0.0).to(M.dtype)


def psd_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric positive semi-definite matrix, for internal use.

    In the precision of :func:`_solver_precision` (float64 for float32 matrices on the CPU),
    cast back to ``M``'s dtype. If ``torch.linalg.eigh`` fails to converge, it is retried on
    ``M + 1e-6 I`` and the jitter is subtracted from the eigenvalues again. Eigenvalues are
    clamped at zero.

    Returns:
        ``(eigenvalues, eigenvectors)`` in ascending order, eigenvectors as columns.

    Shapes:
        ``M (n, n) -> eigenvalues (n,), eigenvectors (n, n)``
    """
    (eigenvalues, eigenvectors), jitter = _with_jitter(stable_eigh, M)
    return (eigenvalues - jitter).clamp(min=0.0), eigenvectors


def symeig(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric positive semi-definite matrix (the public utility).

    The contract of ``laplace-torch``'s ``symeig``: ``torch.linalg.eigh`` on the upper
    triangle of ``M`` in ``M``'s own dtype; if it fails to converge, one retry on ``M + I``
    with 1 subtracted from the eigenvalues again; eigenvalues clamped at zero. Unlike
    ``laplace-torch`` (which ends the process when the retry fails, and turns NaN into zeros),
    a matrix with NaN or Inf entries or a failed retry raises an error. The library itself
    uses :func:`psd_eigh`, which solves float32 matrices in float64.

    Args:
        M: Symmetric matrix.

    Returns:
        ``(eigenvalues, eigenvectors)`` in ascending order, eigenvectors as columns.

    Shapes:
        ``M (n, n) -> eigenvalues (n,), eigenvectors (n, n)``

    Raises:
        ValueError: If ``M`` is not a square matrix or has NaN or Inf entries.
        torch.linalg.LinAlgError: If ``eigh`` fails on ``M + I`` too.
    """
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square matrix, got shape {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise ValueError("M contains NaN or Inf entries; it has no eigendecomposition")
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(M, UPLO="U")
    except RuntimeError:
        shifted = M + torch.eye(M.shape[0], device=M.device, dtype=M.dtype)
        eigenvalues, eigenvectors = torch.linalg.eigh(shifted, UPLO="U")
        eigenvalues = eigenvalues - 1.0
    return eigenvalues.clamp(min=0.0), eigenvectors


def invsqrt_precision(M: Tensor) -> Tensor:
    """Lower-triangular ``L`` with ``L L^T = M^-1`` for a positive definite precision ``M``.

    With the exchange matrix ``E`` (the identity with its columns reversed), let
    ``E M E = C C^T`` be a Cholesky factorisation. Then ``L = E C^-T E`` is lower triangular
    and ``L L^T = E (E M E)^-1 E = M^-1``; only a triangular solve is needed, never ``M^-1``.

    Args:
        M: Positive definite matrix (or a batch of them).

    Returns:
        The lower-triangular factor ``L``.

    Shapes:
        ``(..., n, n) -> (..., n, n)``
    """
    flipped = M.flip(-2, -1)
    chol = torch.linalg.cholesky(flipped)
    eye = torch.eye(M.shape[-1], device=M.device, dtype=M.dtype)
    chol_inv_t = torch.linalg.solve_triangular(chol.mT, eye, upper=True)
    return chol_inv_t.flip(-2, -1)


def diagonal_add_scalar(X: Tensor, value: float | Tensor) -> Tensor:
    """``X + value * I`` as a new tensor (differentiable in both arguments).

    Shapes:
        ``(n, n) -> (n, n)``
    """
    return X + value * torch.eye(X.shape[-1], device=X.device, dtype=X.dtype)


def _covariance_factor(cov: Tensor) -> Tensor:
    """A factor ``S`` with ``S S^T = cov``: Cholesky, or an eigen-factor if it is singular."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if not bool((info != 0).any()):
        return chol
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    return eigenvectors * eigenvalues.clamp(min=0.0).sqrt().unsqueeze(-2)


def normal_samples(
    mean: Tensor, var: Tensor, n_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Samples of ``N(mean, var)`` for every batch row.

    Args:
        mean: Means.
        var: Either a diagonal variance with the shape of ``mean`` or one full covariance per
            row, with one more dimension. Singular covariances fall back from Cholesky to an
            eigendecomposition.
        n_samples: Number of samples.
        generator: Random number generator.

    Returns:
        The samples.

    Shapes:
        ``mean (batch, k), var (batch, k) or (batch, k, k) -> (n_samples, batch, k)``

    Raises:
        ValueError: If ``var`` has neither ``mean.ndim`` nor ``mean.ndim + 1`` dimensions.
    """
    noise = torch.randn(
        (n_samples, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype
    )
    if var.ndim == mean.ndim:
        return mean + var.sqrt() * noise
    if var.ndim == mean.ndim + 1:
        factor = _covariance_factor(var)
        return mean + (factor @ noise.unsqueeze(-1)).squeeze(-1)
    raise ValueError(
        f"var must have {mean.ndim} (diagonal) or {mean.ndim + 1} (full) dimensions for a mean "
        f"of shape {tuple(mean.shape)}, got shape {tuple(var.shape)}"
    )


def _trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def parameters_per_layer(model: nn.Module) -> list[int]:
    """Number of entries of each trainable parameter tensor of ``model``, in order."""
    return [p.numel() for p in _trainable(model)]


def fix_prior_prec_structure(
    prior_prec_init: float | Tensor,
    prior_structure: PriorStructure | str,
    n_layers: int,
    n_params: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """An initial prior precision with the shape of ``prior_structure``.

    Args:
        prior_prec_init: A number (or one-element tensor) to fill with, or a tensor that
            already has the structure's shape (returned as is, moved to ``device``/``dtype``
            where given).
        prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diag"``.
        n_layers: Number of parameter tensors.
        n_params: Number of parameters.
        device: Device of a filled tensor.
        dtype: Dtype of a filled tensor.

    Returns:
        The prior precision.

    Shapes:
        ``-> (1,)``, ``(n_layers,)`` or ``(n_params,)``

    Raises:
        ValueError: For an unknown structure or a tensor of another shape.
    """
    structure = parse_enum(PriorStructure, prior_structure, "prior_structure")
    length = {
        PriorStructure.SCALAR: 1,
        PriorStructure.LAYERWISE: n_layers,
        PriorStructure.DIAG: n_params,
    }[structure]
    if isinstance(prior_prec_init, Tensor) and prior_prec_init.numel() != 1:
        if tuple(prior_prec_init.shape) != (length,):
            raise ValueError(
                f"prior_prec_init must have shape ({length},) for prior_structure="
                f"{structure.value!r}, got shape {tuple(prior_prec_init.shape)}"
            )
        return prior_prec_init.to(device=device, dtype=dtype)
    if isinstance(prior_prec_init, Tensor):
        device = prior_prec_init.device if device is None else device
        dtype = prior_prec_init.dtype if dtype is None else dtype
    value = float(prior_prec_init)
    return torch.full((length,), value, device=device, dtype=dtype)


def expand_prior_precision(prior_prec: Tensor, model: nn.Module) -> Tensor:
    """One prior precision per trainable parameter of ``model``.

    Args:
        prior_prec: Scalar ``(1,)``, per-layer ``(n_layers,)`` or per-parameter
            ``(n_params,)`` prior precision.
        model: The model whose trainable parameters the prior covers.

    Returns:
        The per-parameter prior precision.

    Shapes:
        ``(1 | n_layers | n_params,) -> (n_params,)``

    Raises:
        ValueError: If the length is none of the accepted ones.
    """
    sizes = parameters_per_layer(model)
    n_params = sum(sizes)
    flat = prior_prec.reshape(-1)
    if flat.numel() == 1:
        return flat.expand(n_params)
    if flat.numel() == n_params:
        return flat
    if flat.numel() == len(sizes):
        counts = torch.tensor(sizes, device=flat.device)
        return flat.repeat_interleave(counts)
    raise ValueError(
        f"prior_prec must have 1, {len(sizes)} (layers) or {n_params} (parameters) entries, "
        f"got {flat.numel()}"
    )


def get_nll(out_dist: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood of integer ``targets`` under probability rows.

    Shapes:
        ``out_dist (batch, classes), targets (batch,) -> ()``
    """
    picked = out_dist.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return -picked.clamp(min=_LOG_CLAMP).log().mean()


def _split_batch(batch: Any, dict_key_y: str) -> tuple[Any, Tensor]:
    if isinstance(batch, MutableMapping):
        return batch, batch[dict_key_y]
    X, y = batch
    return X, y


def _input_device(laplace: Callable) -> torch.device | None:
    device = getattr(laplace, "_device", None)
    return device if isinstance(device, torch.device) else None


def _noise_variance(laplace: Callable) -> Tensor | float:
    """``sigma_noise**2`` of a regression ``laplace``; 0 for other likelihoods and callables."""
    sigma = getattr(laplace, "sigma_noise", None)
    if getattr(laplace, "likelihood", None) != Likelihood.REGRESSION or sigma is None:
        return 0.0
    return torch.as_tensor(sigma).detach().square()


def _target_moments(
    output: Tensor | tuple[Tensor, Tensor], noise_var: Tensor | float
) -> tuple[Tensor, Tensor]:
    """``(f_mu, diag(f_var) + noise_var)``: the marginal predictive moments of the targets.

    Raises:
        ValueError: If ``output`` is not a ``(f_mu, f_var)`` pair.

    Shapes:
        ``f_mu (batch, outputs), f_var (batch, outputs[, outputs]) -> 2 x (batch, outputs)``
    """
    if not isinstance(output, tuple):
        raise ValueError(
            "the loss needs the predictive variance (needs_variance=True), but the predictive "
            "returns a single tensor (class probabilities); use it with a regression predictive"
        )
    f_mu, f_var = output
    if f_var.ndim == f_mu.ndim + 1:
        f_var = f_var.diagonal(dim1=-2, dim2=-1)
    return f_mu, f_var + noise_var


def _update_metric(
    metric: Metric, output: Tensor | tuple[Tensor, Tensor], y: Tensor, with_var: bool = False
) -> None:
    if not isinstance(output, tuple):
        metric.update(output, y)
        return
    f_mu, f_var = output
    if with_var:
        metric.update(f_mu, f_var, y)
        return
    try:
        metric.update(f_mu, f_var, y)
    except TypeError:
        metric.update(f_mu, y)


def _callable_loss(
    loss: Callable, outputs: list, targets: list[Tensor], loss_with_var: bool
) -> float:
    y = torch.cat(targets)
    if isinstance(outputs[0], tuple):
        means = torch.cat([out[0] for out in outputs])
        variances = torch.cat([out[1] for out in outputs])
    else:
        means, variances = torch.cat(outputs), None
    if not loss_with_var:
        return float(loss(means, y))
    if variances is None:
        raise ValueError("loss_with_var=True needs a predictive that returns (f_mu, f_var)")
    return float(loss(means, variances, y))


@torch.no_grad()
def validate(
    laplace: Callable,
    val_loader: Iterable,
    loss: Metric | Callable,
    pred_type: PredType | str = PredType.GLM,
    link_approx: LinkApprox | str = LinkApprox.PROBIT,
    n_samples: int = 100,
    loss_with_var: bool = False,
    dict_key_y: str = "labels",
) -> float:
    """Loss of the predictive of ``laplace`` on a validation set (used by prior tuning).

    Args:
        laplace: A fitted Laplace object (any callable with its predictive signature).
            Classification predictives return probabilities, regression ``(f_mu, f_var)``.
            Tensor inputs are moved to its ``_device`` when it has one.
        val_loader: Yields ``(X, y)`` or dict-like batches with the targets under
            ``dict_key_y`` (the whole dict is then the input).
        loss: A ``torchmetrics.Metric`` (updated batch by batch, reset first) or a callable
            ``loss(means, targets)`` evaluated once on the concatenated outputs. A loss with
            a true ``needs_variance`` attribute (the Gaussian metrics of
            :mod:`laplace.evaluation`) is given ``(means, variances, targets)`` instead,
            where the variances are the marginal predictive variances of the targets: the
            diagonal of ``f_var``, plus ``sigma_noise**2`` when ``laplace`` has a
            regression likelihood.
        pred_type: ``"glm"`` or ``"nn"``.
        link_approx: Link approximation for GLM classification.
        n_samples: Number of samples for sampling-based predictives.
        loss_with_var: Call the callable as ``loss(means, variances, targets)``.
        dict_key_y: Key of the targets in dict-like batches.

    Returns:
        The loss; a vector-valued metric is summed.

    Raises:
        ValueError: If the loader yields no batches, or ``loss`` needs the variance and the
            predictive returns none (a classifier).
    """
    pred_type = parse_enum(PredType, pred_type, "pred_type")
    link_approx = parse_enum(LinkApprox, link_approx, "link_approx")
    is_metric = isinstance(loss, Metric)
    if is_metric:
        loss.reset()
    noise_var = _noise_variance(laplace) if getattr(loss, "needs_variance", False) else None
    device = _input_device(laplace)
    outputs, targets, n_batches = [], [], 0
    for batch in val_loader:
        X, y = _split_batch(batch, dict_key_y)
        if isinstance(X, Tensor) and device is not None:
            X = X.to(device)
        output = laplace(X, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples)
        first = output[0] if isinstance(output, tuple) else output
        y = torch.as_tensor(y).to(first.device)
        n_batches += 1
        if noise_var is not None:
            output = _target_moments(output, noise_var)
        if is_metric:
            _update_metric(loss, output, y, with_var=noise_var is not None)
        else:
            outputs.append(output)
            targets.append(y)
    if n_batches == 0:
        raise ValueError("val_loader yielded no batches")
    if is_metric:
        return float(loss.compute().sum().item())
    return _callable_loss(loss, outputs, targets, loss_with_var or noise_var is not None)
