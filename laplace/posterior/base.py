"""The structure axis: how the likelihood curvature and the posterior precision are stored.

Two small interfaces, one implementation of each per structure (dense, diagonal, Kronecker,
low-rank):

- :class:`Curvature` accumulates the likelihood curvature ``H`` during ``fit`` (a sum over
  batches of what a curvature backend returns) and knows nothing about priors.
- :class:`Posterior` is the Gaussian posterior precision ``P = factor * H + diag(p0)`` for one
  choice of prior precision ``p0`` and likelihood factor ``factor = 1 / (sigma^2 T)``. It is
  built by :meth:`Curvature.with_prior`, which is differentiable in both and cheap: every
  expensive decomposition of ``H`` is computed once and cached on the curvature object, so
  prior tuning re-uses it (the staging of laplax, in one class per structure).

Neither knows about models or data; the Laplace classes combine them with a subset of weights
and a curvature backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from laplace.utils.enums import HessianStructure
from laplace.utils.precision import accumulation_dtype, compute_dtype

__all__ = ["Curvature", "NotPositiveDefiniteError", "Posterior", "expand_prior"]


class NotPositiveDefiniteError(ValueError):
    """The posterior precision ``factor * H + diag(prior)`` is not positive definite.

    Raised where a factorisation needs it to be (a curvature with negative eigenvalues, such
    as the exact Hessian away from a minimum, and too small a prior precision). A grid search
    over prior precisions skips such values instead of failing.
    """


def expand_prior(prior_precision: Tensor, sizes: Sequence[int]) -> Tensor:
    """Expand a scalar, per-layer or per-parameter prior precision to one value per parameter.

    Args:
        prior_precision: Prior precision of shape ``(1,)``, ``(len(sizes),)`` or
            ``(sum(sizes),)``.
        sizes: Number of parameters in each layer (parameter tensor).

    Returns:
        The per-parameter prior precision.

    Shapes:
        ``(1 | layers | params,) -> (params,)``

    Raises:
        ValueError: If the length matches none of the three structures.
    """
    n_params = sum(sizes)
    if prior_precision.numel() == 1:
        return prior_precision.reshape(1).expand(n_params)
    if prior_precision.numel() == n_params:
        return prior_precision.reshape(n_params)
    if prior_precision.numel() == len(sizes):
        counts = torch.as_tensor(sizes, device=prior_precision.device)
        return prior_precision.reshape(-1).repeat_interleave(counts)
    raise ValueError(
        f"prior_precision must have 1, {len(sizes)} (layers) or {n_params} (parameters) "
        f"entries, got {prior_precision.numel()}"
    )


class Posterior(ABC):
    """Gaussian posterior precision ``P`` with the prior applied.

    All methods are differentiable in the prior precision and the likelihood factor the
    posterior was built with. ``P`` is held in the curvature's accumulation precision
    (float64 for float32 models, see :mod:`laplace.utils.precision`). Every method takes
    tensors of the model's dtype, :attr:`dtype`, and returns that dtype, except the two
    scalar reductions that enter the marginal likelihood, :meth:`logdet` and :meth:`quad`:
    they return the accumulation precision, and their callers cast the final result.

    Attributes:
        dtype: The model's dtype, that of every returned tensor.
    """

    dtype: torch.dtype = torch.float64
    _precise: bool = False

    def _out(self, tensor: Tensor) -> Tensor:
        """``tensor`` cast to the model's dtype (differentiably); unchanged in
        :meth:`precise` mode."""
        return tensor if self._precise else tensor.to(self.dtype)

    @property
    def _work_dtype(self) -> torch.dtype:
        """The dtype of products with data-sized inputs (:func:`compute_dtype`), the
        accumulation precision in :meth:`precise` mode."""
        if self._precise:
            return accumulation_dtype(self.dtype)
        return compute_dtype(self.dtype)

    @contextmanager
    def precise(self) -> Iterator[None]:
        """Within this context every product runs, and every result is returned, in the
        accumulation precision: for consumers that cancel, such as the Laplace bridge's
        conditioning on ``sum(f) = 0``, which subtracts the large variance of the
        softmax-invariant direction."""
        previous, self._precise = self._precise, True
        try:
            yield
        finally:
            self._precise = previous

    @abstractmethod
    def logdet(self) -> Tensor:
        """``log det P`` as a scalar tensor, in the accumulation precision."""

    @abstractmethod
    def quad(self, v: Tensor) -> Tensor:
        """``v^T P v`` for each row of ``v``, in the accumulation precision.

        Shapes:
            ``(params,) -> ()`` or ``(n, params) -> (n,)``
        """

    @abstractmethod
    def inv_quad(self, Js: Tensor) -> Tensor:
        """Per-sample ``J P^-1 J^T``, the GLM functional variance.

        Shapes:
            ``(batch, outputs, params) -> (batch, outputs, outputs)``
        """

    @abstractmethod
    def inv_quad_joint(self, Js: Tensor) -> Tensor:
        """Joint ``J P^-1 J^T`` across all rows, the GLM functional covariance.

        Shapes:
            ``(rows, params) -> (rows, rows)``
        """

    def inv_bilinear(self, A: Tensor, B: Tensor) -> Tensor:
        """Cross ``A P^-1 B^T`` between two sets of rows, the GLM posterior kernel.

        This default takes the off-diagonal block of :meth:`inv_quad_joint` of the stacked
        rows; the structures override it with products that do not square the row count.

        Shapes:
            ``A (n, params), B (m, params) -> (n, m)``
        """
        joint = self.inv_quad_joint(torch.cat([A, B.to(A.dtype)]))
        return joint[: A.shape[0], A.shape[0] :]

    @abstractmethod
    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n_samples`` zero-mean samples with covariance ``P^-1``.

        Shapes:
            ``-> (n_samples, params)``
        """

    @abstractmethod
    def precision(self) -> object:
        """``P`` in the structure's public representation (dense, diagonal or Kronecker)."""

    @abstractmethod
    def covariance(self) -> Tensor:
        """``P^-1`` (a vector for diagonal structures, else dense)."""

    @abstractmethod
    def scale(self) -> Tensor:
        """A square root of ``P^-1`` (a vector for diagonal structures, else dense)."""

    @abstractmethod
    def variance(self) -> Tensor:
        """The diagonal of ``P^-1``, shape ``(params,)``."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """``P`` as a dense ``(params, params)`` matrix, for tests and small models."""


class Curvature(ABC):
    """Accumulated likelihood curvature ``H`` of one structure.

    The sums are kept in the accumulation precision of the model's dtype (float64 for
    float32 models, :func:`~laplace.utils.precision.accumulation_dtype`); :meth:`public`
    returns them in the model's dtype, :attr:`dtype`.

    Attributes:
        structure: The Hessian structure this class stores.
        sizes: Number of parameters per layer (parameter tensor), in order.
        dtype: The model's dtype, that of :meth:`public` and of the posteriors' results.
        assume_psd: Whether ``H`` is positive semi-definite by construction (GGN, Fisher), so
            that negative eigenvalues can only be round-off.
        memo: While ``H`` is fixed and only the prior changes (a gridsearch), an object with
            ``get(kind, tensor, compute)`` that posteriors may use to keep prior-independent
            products with their inputs; None otherwise.
    """

    structure: ClassVar[HessianStructure]
    assume_psd: bool = True
    memo: Any = None

    def __init__(self, sizes: Sequence[int], dtype: torch.dtype | None = None) -> None:
        self.sizes = list(sizes)
        self.dtype = dtype

    def _invalidate(self) -> None:
        """Drop what is cached from ``H`` (decompositions, casts); structures with caches
        override this."""
        return None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the sums without the caches (recomputed on demand), so a whole-object
        ``torch.save`` of a Laplace approximation is about the size of its state dict."""
        shadow = object.__new__(type(self))
        shadow.__dict__ = dict(self.__dict__)
        shadow._invalidate()
        shadow.__dict__.pop("memo", None)
        return shadow.__dict__

    @staticmethod
    def _storage(reference: Tensor) -> dict[str, object]:
        """``device`` and ``dtype`` of the sums for parameters like ``reference``."""
        return {
            "device": reference.device,
            "dtype": accumulation_dtype(reference.dtype, reference.device),
        }

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    @classmethod
    @abstractmethod
    def zeros(cls, params: Sequence[Tensor]) -> Curvature:
        """An empty accumulator for ``params`` on their device and dtype."""

    @abstractmethod
    def add_(self, H_batch: object) -> None:
        """Add one batch's curvature, as returned by the backend method for this structure."""

    @abstractmethod
    def with_prior(self, prior_precision: Tensor, factor: Tensor) -> Posterior:
        """The posterior precision ``factor * H + diag(prior)``.

        Args:
            prior_precision: Scalar ``(1,)``, per-layer ``(layers,)`` or per-parameter
                ``(params,)`` prior precision.
            factor: Scalar likelihood factor ``1 / (sigma_noise^2 * temperature)``.

        Raises:
            ValueError: If the structure does not support the prior's shape.
        """

    @abstractmethod
    def public(self) -> object:
        """``H`` in the public representation of ``la.H`` (tensor, vector or ``Kron``)."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """``H`` as a dense ``(params, params)`` matrix."""

    @abstractmethod
    def is_finite(self) -> bool:
        """Whether every stored number of ``H`` is finite."""

    def summands(self) -> list[Tensor]:
        """The stored tensors whose entrywise sums over fits on disjoint data sets are the
        fit on their union, in a fixed order.

        A fit across processes sums them over the ranks in place
        (:mod:`laplace.utils.distributed`) and then calls :meth:`_invalidate`.

        Raises:
            TypeError: For a structure whose storage is not a sum over the data (low rank).
        """
        raise TypeError(
            f"{type(self).__name__} stores no sums over the data: its fits on several data "
            "sets do not add up"
        )

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor | list]:
        """Plain tensors (and lists of them) that restore this curvature."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Tensor | list]) -> None:
        """Restore from :meth:`state_dict`; raises ``ValueError`` on shape mismatch."""
