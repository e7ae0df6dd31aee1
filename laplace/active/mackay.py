"""MacKay's information-based criteria for active data selection in regression.

MacKay (1992), *Information-based objective functions for active data selection*, Neural
Computation 4(4). The model is the linearised (GLM) posterior of the network outputs: a
Gaussian with covariance ``k(x, x') = J(x) P^-1 J(x')^T``, observed through Gaussian noise of
precision ``beta`` (``1 / sigma_noise**2`` for a regression Laplace approximation).

- **Total information gain** (his eq. 3.6): the entropy decrease of the weight posterior when
  ``y`` is measured at ``x``, ``0.5 log(1 + beta k(x, x))``; for several outputs
  ``0.5 logdet(I + beta K(x, x))``.
- **Marginal information gain** about a point of interest ``x_u`` (eq. 4.1): the entropy
  decrease of ``f(x_u)``, ``0.5 log(var_u / var_u')`` with the variance after the measurement
  ``var_u' = var_u - k(x_u, x)^2 / (k(x, x) + 1 / beta)``.
- **Mean marginal information gain** about a set of points of interest (eq. 4.4): the mean of
  the per-point gains.

The first three functions take kernel values (tensors); the ``mackay_*`` functions take a
posterior kernel (``la.posterior_kernel()``) and the candidate inputs. All return one score
per candidate. Single-output kernels may be given as scalars per entry (``(n,)``,
``(n, m)``); several outputs as blocks ``(n, outputs, outputs)``, the layout of
``la.posterior_kernel()``. A boolean ``forbidden`` mask (a region where no measurement can
be taken) sets those candidates' scores to ``-inf``, so that no argmax picks them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from laplace.active._common import Kernel, check_mask, check_positive, check_tensor, forbid

__all__ = [
    "total_information_gain",
    "marginal_information_gain",
    "mean_marginal_information_gain",
    "mackay_total_information_gain",
    "mackay_marginal_information_gain",
    "mackay_mean_marginal_information_gain",
]


def _blocks(value: object, name: str, batch_ndim: int) -> Tensor:
    """Kernel values as output blocks: ``batch_ndim`` batch dimensions then ``(o, o)``."""
    tensor = check_tensor(value, name, (batch_ndim, batch_ndim + 2))
    if tensor.ndim == batch_ndim:
        return tensor[..., None, None]
    if tensor.shape[-1] != tensor.shape[-2]:
        raise ValueError(
            f"{name} must end in square output blocks, got shape {tuple(tensor.shape)}"
        )
    return tensor


def _precision(noise_precision: float | Tensor, like: Tensor) -> Tensor:
    """The noise precision broadcast to one value per candidate, ``(n,)``."""
    beta = check_positive(noise_precision, "noise_precision", like)
    n = like.shape[0]
    if beta.ndim > 1 or beta.numel() not in (1, n):
        raise ValueError(
            f"noise_precision must be a scalar or have shape ({n},), got shape {tuple(beta.shape)}"
        )
    return beta.expand(n)


def total_information_gain(
    variance: Tensor, noise_precision: float | Tensor, forbidden: Tensor | None = None
) -> Tensor:
    """Total information gain of measuring at each candidate (MacKay 1992, eq. 3.6).

    ``0.5 logdet(I + beta K(x, x))``, computed from the eigenvalues of the output block as
    ``0.5 sum log1p(beta lambda)``, which keeps small gains accurate.

    Args:
        variance: Posterior covariance ``k(x, x)`` of each candidate's outputs.
        noise_precision: Observation-noise precision ``beta``, a scalar or one per candidate.
        forbidden: Candidates where no measurement can be taken; their score is ``-inf``.

    Returns:
        The gain of each candidate in nats.

    Shapes:
        ``variance (n,) or (n, outputs, outputs), forbidden (n,) -> (n,)``

    Raises:
        TypeError: If ``variance`` is not a floating tensor or ``forbidden`` not boolean.
        ValueError: If a shape does not fit or ``noise_precision`` is not positive.
    """
    blocks = _blocks(variance, "variance", 1)
    beta = _precision(noise_precision, blocks)
    forbidden = check_mask(forbidden, blocks.shape[0])
    eigenvalues = torch.linalg.eigvalsh(0.5 * (blocks + blocks.mT)).clamp_min(0)
    gain = 0.5 * torch.log1p(beta[:, None] * eigenvalues).sum(-1)
    return forbid(gain, forbidden)


def _gains_about(variance: Tensor, covariance: Tensor, target: Tensor, beta: Tensor) -> Tensor:
    """Gain about each target from measuring at each candidate, ``(n, m)``.

    With ``S = K(x, x) + I / beta`` and ``C = K(x, x_u)``, the target covariance after the
    measurement is ``V_u - C^T S^-1 C``; the gain ``0.5 [logdet V_u - logdet(V_u - C^T S^-1 C)]``
    is ``-0.5 sum log1p(-lambda)`` over the eigenvalues ``lambda`` of the whitened
    ``B^T B``, ``B = L_S^-1 C L_u^-T`` (``L`` Cholesky factors).
    """
    outputs = variance.shape[-1]
    eye = torch.eye(outputs, device=variance.device, dtype=variance.dtype)
    noisy = variance + eye / beta[:, None, None]
    L_S = torch.linalg.cholesky(noisy)[:, None]  # (n, 1, o, o)
    L_u = torch.linalg.cholesky(target)[None]  # (1, m, o, o)
    B = torch.linalg.solve_triangular(L_S, covariance, upper=False)
    B = torch.linalg.solve_triangular(L_u.mT, B, upper=True, left=False)
    eigenvalues = torch.linalg.eigvalsh(B.mT @ B)
    # exactly below one for finite beta (Cauchy-Schwarz); rounding may touch the bounds
    eigenvalues = eigenvalues.clamp(0, 1 - torch.finfo(variance.dtype).eps)
    return -0.5 * torch.log1p(-eigenvalues).sum(-1)


def mean_marginal_information_gain(
    variance: Tensor,
    covariance: Tensor,
    target_variance: Tensor,
    noise_precision: float | Tensor,
    forbidden: Tensor | None = None,
) -> Tensor:
    """Mean marginal information gain about a set of points of interest (MacKay 1992, eq. 4.4).

    The mean over the points of interest ``x_u`` of :func:`marginal_information_gain`.

    Args:
        variance: Posterior covariance ``k(x, x)`` of each candidate.
        covariance: Cross-covariance ``k(x, x_u)`` of each candidate with each point of interest.
        target_variance: Posterior covariance ``k(x_u, x_u)`` of each point of interest
            (positive definite).
        noise_precision: Observation-noise precision ``beta``, a scalar or one per candidate.
        forbidden: Candidates where no measurement can be taken; their score is ``-inf``.

    Returns:
        The mean gain of each candidate in nats.

    Shapes:
        ``variance (n,), covariance (n, m), target_variance (m,) -> (n,)``; with output blocks
        ``(n, o, o), (n, m, o, o), (m, o, o) -> (n,)``

    Raises:
        TypeError: If a kernel value is not a floating tensor or ``forbidden`` not boolean.
        ValueError: If the shapes do not fit together or ``noise_precision`` is not positive.
    """
    variance = _blocks(variance, "variance", 1)
    covariance = _blocks(covariance, "covariance", 2)
    target = _blocks(target_variance, "target_variance", 1)
    n, m, outputs = variance.shape[0], target.shape[0], variance.shape[-1]
    if covariance.shape != (n, m, outputs, outputs) or target.shape[-1] != outputs:
        raise ValueError(
            f"covariance must have shape {(n, m, outputs, outputs)} for variance of shape "
            f"{tuple(variance.shape)} and target_variance of shape {tuple(target.shape)}, "
            f"got {tuple(covariance.shape)}"
        )
    beta = _precision(noise_precision, variance)
    forbidden = check_mask(forbidden, n)
    gains = _gains_about(variance, covariance, target, beta)
    return forbid(gains.mean(-1), forbidden)


def marginal_information_gain(
    variance: Tensor,
    covariance: Tensor,
    target_variance: Tensor,
    noise_precision: float | Tensor,
    forbidden: Tensor | None = None,
) -> Tensor:
    """Marginal information gain about one point of interest (MacKay 1992, eq. 4.1).

    ``-0.5 log(1 - k(x, x_u)^2 / (k(x_u, x_u) (k(x, x) + 1 / beta)))``: half the log ratio of
    the variance of ``f(x_u)`` before and after measuring ``y`` at ``x``.

    Args:
        variance: Posterior covariance ``k(x, x)`` of each candidate.
        covariance: Cross-covariance ``k(x, x_u)`` of each candidate with the point of interest.
        target_variance: Posterior covariance ``k(x_u, x_u)`` of the point of interest
            (positive definite).
        noise_precision: Observation-noise precision ``beta``, a scalar or one per candidate.
        forbidden: Candidates where no measurement can be taken; their score is ``-inf``.

    Returns:
        The gain of each candidate in nats.

    Shapes:
        ``variance (n,), covariance (n,), target_variance () -> (n,)``; with output blocks
        ``(n, o, o), (n, o, o), (o, o) -> (n,)``

    Raises:
        TypeError: If a kernel value is not a floating tensor or ``forbidden`` not boolean.
        ValueError: If the shapes do not fit together or ``noise_precision`` is not positive.
    """
    covariance = check_tensor(covariance, "covariance", (1, 3))
    target = check_tensor(target_variance, "target_variance", (0, 2))
    return mean_marginal_information_gain(
        variance, covariance.unsqueeze(1), target.unsqueeze(0), noise_precision, forbidden
    )


def _check_targets(targets: object, name: str) -> Tensor:
    if not isinstance(targets, Tensor) or targets.ndim == 0 or len(targets) == 0:
        raise ValueError(f"{name} must be a non-empty batch of inputs, got {targets!r}")
    return targets


def mackay_total_information_gain(
    kernel: Kernel, X: Tensor, noise_precision: float | Tensor, forbidden: Tensor | None = None
) -> Tensor:
    """:func:`total_information_gain` at the candidates ``X`` from a posterior kernel.

    Args:
        kernel: Posterior kernel, for example ``la.posterior_kernel()``.
        X: Candidate inputs.
        noise_precision: Observation-noise precision ``beta`` (``1 / la.sigma_noise**2``).
        forbidden: Candidates where no measurement can be taken; their score is ``-inf``.

    Returns:
        The gain of each candidate in nats.

    Shapes:
        ``X (n, ...), forbidden (n,) -> (n,)``

    Raises:
        ValueError: If ``noise_precision`` is not positive or ``forbidden`` does not fit.
    """
    return total_information_gain(kernel.diagonal(X), noise_precision, forbidden)


def mackay_marginal_information_gain(
    kernel: Kernel,
    X: Tensor,
    target: Tensor,
    noise_precision: float | Tensor,
    forbidden: Tensor | None = None,
) -> Tensor:
    """:func:`marginal_information_gain` about one point of interest from a posterior kernel.

    Args:
        kernel: Posterior kernel, for example ``la.posterior_kernel()``.
        X: Candidate inputs.
        target: The point of interest ``x_u``, a batch of one input.
        noise_precision: Observation-noise precision ``beta`` (``1 / la.sigma_noise**2``).
        forbidden: Candidates where no measurement can be taken; their score is ``-inf``.

    Returns:
        The gain of each candidate in nats.

    Shapes:
        ``X (n, ...), target (1, ...), forbidden (n,) -> (n,)``

    Raises:
        ValueError: If ``target`` is not one input, ``noise_precision`` is not positive or
            ``forbidden`` does not fit.
    """
    target = _check_targets(target, "target")
    if len(target) != 1:
        raise ValueError(
            f"target must be a batch of one input, got {len(target)}; "
            "mackay_mean_marginal_information_gain takes several"
        )
    return mackay_mean_marginal_information_gain(kernel, X, target, noise_precision, forbidden)


def mackay_mean_marginal_information_gain(
    kernel: Kernel,
    X: Tensor,
    targets: Tensor,
    noise_precision: float | Tensor,
    forbidden: Tensor | None = None,
) -> Tensor:
    """:func:`mean_marginal_information_gain` about points of interest from a posterior kernel.

    Args:
        kernel: Posterior kernel, for example ``la.posterior_kernel()``.
        X: Candidate inputs.
        targets: The points of interest ``x_u``.
        noise_precision: Observation-noise precision ``beta`` (``1 / la.sigma_noise**2``).
        forbidden: Candidates where no measurement can be taken; their score is ``-inf``.

    Returns:
        The mean gain of each candidate in nats.

    Shapes:
        ``X (n, ...), targets (m, ...), forbidden (n,) -> (n,)``

    Raises:
        ValueError: If ``targets`` is empty, ``noise_precision`` is not positive or
            ``forbidden`` does not fit.
    """
    targets = _check_targets(targets, "targets")
    return mean_marginal_information_gain(
        kernel.diagonal(X),
        kernel(X, targets),
        kernel.diagonal(targets),
        noise_precision,
        forbidden,
    )
