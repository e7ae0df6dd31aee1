"""Diagonal curvature and posterior precision.

``H`` is stored as its diagonal, a vector with one entry per parameter (summed in the
accumulation precision, :mod:`laplace.utils.precision`), and the posterior precision
``p = factor * h + prior`` is a vector too, so every operation is elementwise and any prior
shape (scalar, layerwise, per-parameter) is supported. Every entry of ``p`` is needed only to
relative accuracy and every quadratic form is a sum of non-negative terms, so the posterior
vector is held in the model's dtype (float32 for half precision); ``log det P`` and
``v^T P v`` are returned in the accumulation precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from laplace.posterior.base import Curvature, NotPositiveDefiniteError, Posterior, expand_prior
from laplace.posterior.dense import linear_layer_outputs
from laplace.utils.data import all_finite
from laplace.utils.enums import HessianStructure
from laplace.utils.precision import accumulation_dtype, compute_dtype, long_matmul

__all__ = ["DiagCurvature", "DiagPosterior"]


def _check_rows(rows: Tensor, ndims: tuple[int, ...], n_params: int, name: str) -> None:
    if rows.ndim not in ndims or rows.shape[-1] != n_params:
        raise ValueError(
            f"{name} must have {' or '.join(map(str, ndims))} dimensions ending in "
            f"params={n_params}, got shape {tuple(rows.shape)}"
        )


class DiagPosterior(Posterior):
    """Diagonal posterior precision ``p = factor * h + prior``.

    Args:
        precision: The positive diagonal ``p``.
        dtype: The model's dtype, of every returned tensor (default ``p``'s).
        check: Check that ``p`` is positive (its caller may know it is).

    Shapes:
        ``precision: (params,)``

    Raises:
        ValueError: If an entry of ``p`` is not positive.
    """

    def __init__(
        self, precision: Tensor, dtype: torch.dtype | None = None, check: bool = True
    ) -> None:
        smallest = precision.detach().min() if check else None
        if check and smallest <= 0:
            raise NotPositiveDefiniteError(
                "the posterior precision factor * H + prior_precision must be positive, got "
                f"smallest entry {smallest.item():.4g}; increase the prior precision"
            )
        self._precision = precision
        self.dtype = precision.dtype if dtype is None else dtype
        self._work_inverse: Tensor | None = None

    def _inverse(self, like: Tensor) -> Tensor:
        """``1 / p`` in the dtype of ``like`` (cast once per posterior)."""
        if like.dtype == self._precision.dtype:
            return self._precision.reciprocal()
        if self._work_inverse is None or self._work_inverse.dtype != like.dtype:
            self._work_inverse = self._precision.reciprocal().to(like.dtype)
        return self._work_inverse

    @property
    def n_params(self) -> int:
        return self._precision.shape[0]

    @property
    def _sum_dtype(self) -> torch.dtype:
        return accumulation_dtype(self._precision.dtype, self._precision.device)

    def logdet(self) -> Tensor:
        """``log det P``: the terms carry the round-off of the work dtype, and the cascade
        summation of them adds no more than that; returned in the accumulation precision."""
        return self._precision.log().sum().to(self._sum_dtype)

    def quad(self, v: Tensor) -> Tensor:
        _check_rows(v, (1, 2), self.n_params, "v")
        terms = v.to(self._precision.dtype).square() * self._precision
        return terms.sum(-1, dtype=self._sum_dtype)

    def inv_quad(self, Js: Tensor) -> Tensor:
        _check_rows(Js, (3,), self.n_params, "Js")
        Js = Js.to(self._work_dtype)
        return self._out(long_matmul(Js, Js.mT, self._inverse(Js)))

    def inv_quad_joint(self, Js: Tensor) -> Tensor:
        _check_rows(Js, (2,), self.n_params, "Js")
        Js = Js.to(self._work_dtype)
        return self._out(long_matmul(Js, Js.mT, self._inverse(Js)))

    def inv_bilinear(self, A: Tensor, B: Tensor) -> Tensor:
        _check_rows(A, (2,), self.n_params, "A")
        _check_rows(B, (2,), self.n_params, "B")
        A, B = A.to(self._work_dtype), B.to(self._work_dtype)
        return self._out(long_matmul(A, B.mT, self._inverse(A)))

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        reference = self._precision
        noise = torch.randn(
            n_samples,
            self.n_params,
            generator=generator,
            device=reference.device,
            dtype=reference.dtype,
        )
        return self._out(noise * self._precision.rsqrt())

    def precision(self) -> Tensor:
        """The diagonal ``p``, shape ``(params,)``."""
        return self._out(self._precision)

    def covariance(self) -> Tensor:
        """The diagonal ``1 / p``, shape ``(params,)``."""
        return self._out(self._precision.reciprocal())

    def scale(self) -> Tensor:
        """The diagonal ``p^-1/2``, shape ``(params,)``."""
        return self._out(self._precision.rsqrt())

    def variance(self) -> Tensor:
        return self._out(self._precision.reciprocal())

    def to_dense(self) -> Tensor:
        return torch.diag(self.precision())

    def _linear_variances(self, phi: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
        """Posterior variances of a linear layer's weight ``(outputs, features)`` and bias,
        in the dtype of ``phi``."""
        n_outputs = linear_layer_outputs(self.n_params, phi, bias)
        variance = self._inverse(phi)
        n_weights = n_outputs * phi.shape[1]
        weight = variance[:n_weights].view(n_outputs, phi.shape[1])
        return weight, variance[n_weights:] if bias else None

    def inv_quad_linear(self, phi: Tensor, bias: bool, diagonal: bool = False) -> Tensor:
        """``J P^-1 J^T`` for the Jacobians of a linear layer, never forming them.

        With ``J_n = [I ⊗ phi_n^T, I]`` (row-major weight, then the optional bias) and a
        diagonal ``P``, the outputs are independent with variance
        ``sum_i phi_ni^2 / p_ci + 1 / p_c``.

        Args:
            phi: The layer's input features.
            bias: Whether the parameters end with the bias.
            diagonal: Return only the diagonal.

        Shapes:
            ``phi (batch, features) -> (batch, outputs, outputs)`` or ``(batch, outputs)``

        Raises:
            ValueError: If ``phi`` does not match the number of parameters.
        """
        phi = phi.to(self._work_dtype)
        weight, bias_variance = self._linear_variances(phi, bias)
        variance = phi.square() @ weight.mT
        if bias_variance is not None:
            variance = variance + bias_variance
        return self._out(variance if diagonal else torch.diag_embed(variance))

    def inv_quad_linear_joint(self, phi: Tensor, bias: bool) -> Tensor:
        """Joint ``J P^-1 J^T`` across a batch for the Jacobians of a linear layer.

        Shapes:
            ``phi (batch, features) -> (batch * outputs, batch * outputs)``

        Raises:
            ValueError: If ``phi`` does not match the number of parameters.
        """
        phi = phi.to(self._work_dtype)
        weight, bias_variance = self._linear_variances(phi, bias)
        per_output = torch.einsum("ni,ci,mi->nmc", phi, weight, phi)
        if bias_variance is not None:
            per_output = per_output + bias_variance
        joint = torch.diag_embed(per_output).permute(0, 2, 1, 3)
        return self._out(joint.reshape(phi.shape[0] * weight.shape[0], -1))


class DiagCurvature(Curvature):
    """Accumulated diagonal curvature ``h``.

    Args:
        H: The curvature diagonal; kept in the accumulation precision of its dtype.
        sizes: Number of parameters per layer (parameter tensor).
        dtype: The model's dtype (default ``H``'s).

    Shapes:
        ``H: (params,)``

    Raises:
        ValueError: If ``H`` is not ``(sum(sizes),)``.
    """

    structure = HessianStructure.DIAG

    def __init__(self, H: Tensor, sizes: Sequence[int], dtype: torch.dtype | None = None) -> None:
        super().__init__(sizes, H.dtype if dtype is None else dtype)
        if tuple(H.shape) != (self.n_params,):
            raise ValueError(f"H must have shape ({self.n_params},), got {tuple(H.shape)}")
        self.H = H.to(accumulation_dtype(self.dtype, H.device))

    @classmethod
    def zeros(cls, params: Sequence[Tensor]) -> DiagCurvature:
        """Zero ``h`` for ``params`` on their device and dtype.

        Raises:
            ValueError: If ``params`` is empty.
        """
        if len(params) == 0:
            raise ValueError("params must contain at least one tensor, got none")
        sizes = [p.numel() for p in params]
        H = torch.zeros(sum(sizes), **cls._storage(params[0]))
        return cls(H, sizes, dtype=params[0].dtype)

    def add_(self, H_batch: Tensor) -> None:
        """Add one batch's curvature diagonal in place.

        Shapes:
            ``H_batch: (params,)``

        Raises:
            TypeError: If ``H_batch`` is not a tensor.
            ValueError: If its shape differs from ``h``.
        """
        if not isinstance(H_batch, Tensor):
            raise TypeError(f"H_batch must be a Tensor, got {type(H_batch).__name__}")
        if H_batch.shape != self.H.shape:
            raise ValueError(
                f"H_batch must have shape {tuple(self.H.shape)}, got {tuple(H_batch.shape)}"
            )
        self.H.add_(H_batch.to(device=self.H.device))

    def with_prior(self, prior_precision: Tensor, factor: Tensor | float) -> DiagPosterior:
        """The posterior diagonal ``factor * h + prior`` for any prior shape.

        Raises:
            ValueError: If the prior has a wrong length, ``factor`` is not a scalar, or an
                entry of the posterior precision is not positive.
        """
        H, non_negative = self._cached_work()
        factor = torch.as_tensor(factor, device=H.device).to(H.dtype)
        if factor.numel() != 1:
            raise ValueError(f"factor must be a scalar, got shape {tuple(factor.shape)}")
        prior = torch.as_tensor(prior_precision, device=H.device).to(H.dtype)
        precision = factor.reshape(()) * H + expand_prior(prior, self.sizes)
        # a non-negative h, factor and prior with a positive prior give a positive p
        known = non_negative and bool((prior.detach().min() > 0) & (factor >= 0))
        return DiagPosterior(precision, dtype=self.dtype, check=not known)

    _work: tuple[Tensor, int, Tensor, bool] | None = None

    def _cached_work(self) -> tuple[Tensor, bool]:
        """``h`` in the posterior's work dtype (see the module docstring) and whether every
        entry is non-negative; kept until ``h`` changes."""
        work = self._work
        if work is None or work[0] is not self.H or work[1] != self.H._version:
            H_work = self.H.to(compute_dtype(self.dtype))
            self._work = work = (self.H, self.H._version, H_work, bool((self.H >= 0).all()))
        return work[2], work[3]

    def public(self) -> Tensor:
        """``h`` in the model's dtype."""
        return self.H.to(self.dtype)

    def to_dense(self) -> Tensor:
        return torch.diag(self.H)

    def is_finite(self) -> bool:
        return all_finite(self.H)

    def summands(self) -> list[Tensor]:
        return [self.H]

    def state_dict(self) -> dict[str, Tensor | list]:
        return {"H": self.H}

    def load_state_dict(self, state: dict[str, Tensor | list]) -> None:
        if "H" not in state:
            raise ValueError(f"state must hold 'H' for a diag curvature, got keys {list(state)}")
        H = torch.as_tensor(state["H"])
        if H.shape != self.H.shape:
            raise ValueError(
                f"state 'H' must have shape {tuple(self.H.shape)}, got {tuple(H.shape)}"
            )
        self.H = H.to(device=self.H.device, dtype=self.H.dtype, copy=True)
