"""Dense curvature and posterior precision.

``H`` is stored as a ``(params, params)`` matrix in the accumulation precision (float64 for
float32 models, :mod:`laplace.utils.precision`). For a scalar prior precision ``delta`` the
posterior shares the eigenbasis of ``H = V diag(l) V^T``, which is computed once and cached on
the curvature, so ``P = V diag(factor * l + delta) V^T`` costs O(params) per new prior or
likelihood factor (the staging used for prior tuning in laplax). Layerwise and per-parameter
priors break the shared eigenbasis and use a Cholesky factorisation of ``P`` instead.

Precision of the predictive: with the eigenbasis, ``J P^-1 J^T`` is a sum of non-negative
terms ``(J v_i)^2 / (factor * l_i + delta)``, so the rotation ``J V`` runs in the model's
dtype (an error of order ``eps |J|`` per coordinate, the inputs' own). A triangular solve
with the Cholesky factor, or a quadratic form in an explicit ``P^-1`` (the last-layer
path), is not of that form: its float32 round-off is about ``eps * lambda_max`` relative to
``P``, which the small eigenvalues of ``P`` amplify. Those run in the accumulation
precision.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from laplace.posterior.base import Curvature, NotPositiveDefiniteError, Posterior, expand_prior
from laplace.utils.data import all_finite
from laplace.utils.enums import HessianStructure
from laplace.utils.precision import accumulation_dtype
from laplace.utils.utils import stable_eigh

__all__ = [
    "DenseCholeskyPosterior",
    "DenseCurvature",
    "DenseEigenPosterior",
    "DensePosterior",
    "linear_layer_outputs",
]

_CHUNK_ENTRIES = 2**24
"""Most entries of an intermediate tensor in the last-layer variances (chunked over rows)."""


def _scalar_factor(factor: Tensor | float, reference: Tensor) -> Tensor:
    """The likelihood factor as a 0-d tensor on the device and dtype of ``reference``."""
    factor = torch.as_tensor(factor, device=reference.device).to(reference.dtype)
    if factor.numel() != 1:
        raise ValueError(f"factor must be a scalar, got shape {tuple(factor.shape)}")
    return factor.reshape(())


def _cholesky(P: Tensor) -> Tensor:
    """Lower Cholesky factor of a symmetric positive definite ``P``.

    Raises:
        ValueError: If ``P`` is not positive definite.
    """
    lower, info = torch.linalg.cholesky_ex(P)
    if int(info) > 0:
        raise NotPositiveDefiniteError(
            "the posterior precision factor * H + diag(prior_precision) must be positive "
            f"definite, but its leading minor of order {int(info)} is not; increase the prior "
            "precision"
        )
    return lower


def _check_rows(rows: Tensor, ndims: tuple[int, ...], n_params: int, name: str) -> None:
    if rows.ndim not in ndims or rows.shape[-1] != n_params:
        raise ValueError(
            f"{name} must have {' or '.join(map(str, ndims))} dimensions ending in "
            f"params={n_params}, got shape {tuple(rows.shape)}"
        )


def linear_layer_outputs(n_params: int, phi: Tensor, bias: bool) -> int:
    """Number of outputs of a linear layer with ``n_params`` parameters applied to ``phi``.

    The parameters are the row-major weight ``(outputs, features)`` followed, with ``bias``,
    by the bias ``(outputs,)``.

    Shapes:
        ``phi``: ``(batch, features)``

    Raises:
        ValueError: If ``phi`` is not 2-D or ``n_params`` does not fit its feature count.
    """
    if phi.ndim != 2:
        raise ValueError(f"phi must have shape (batch, features), got {tuple(phi.shape)}")
    per_output = phi.shape[1] + int(bias)
    if n_params % per_output != 0:
        raise ValueError(
            f"a linear layer on {phi.shape[1]} features (bias={bias}) cannot have {n_params} "
            "parameters"
        )
    return n_params // per_output


def _with_ones(phi: Tensor, bias: bool) -> Tensor:
    """``[phi, 1]`` with a bias, else ``phi``; shape ``(batch, features + bias)``."""
    return torch.cat([phi, phi.new_ones(phi.shape[0], 1)], dim=1) if bias else phi


class DensePosterior(Posterior):
    """Dense posterior precision ``P = factor * H + diag(prior)``.

    Subclasses supply a whitening ``W = J R`` and a colouring ``z R^T`` for some ``R`` with
    ``R R^T = P^-1``; the inverse quadratic forms and samples follow from them.

    Args:
        H: Likelihood curvature, in the accumulation precision.
        factor: Likelihood factor, a 0-d tensor (of ``H``'s dtype).
        prior_diag: Per-parameter prior precision (of ``H``'s dtype).
        dtype: The model's dtype, of every returned tensor (default ``H``'s).

    Shapes:
        ``H: (params, params)``, ``prior_diag: (params,)``
    """

    def __init__(
        self, H: Tensor, factor: Tensor, prior_diag: Tensor, dtype: torch.dtype | None = None
    ) -> None:
        self._H = H
        self._factor = factor
        self._prior_diag = prior_diag
        self.dtype = H.dtype if dtype is None else dtype
        self._dense: Tensor | None = None
        self._covariance: Tensor | None = None

    @property
    def n_params(self) -> int:
        return self._H.shape[0]

    @abstractmethod
    def _whiten(self, Js: Tensor) -> Tensor:
        """``Js R`` with ``R R^T = P^-1``, so that ``J P^-1 J^T = W W^T``, in the precision
        the subclass needs (see the module docstring).

        Shapes:
            ``(..., rows, params) -> (..., rows, params)``
        """

    @abstractmethod
    def _color(self, noise: Tensor) -> Tensor:
        """Rows ``z`` mapped to ``z R^T`` with ``R R^T = P^-1`` (covariance ``P^-1``), in the
        accumulation precision.

        Shapes:
            ``(n_samples, params) -> (n_samples, params)``
        """

    def inv_quad(self, Js: Tensor) -> Tensor:
        _check_rows(Js, (3,), self.n_params, "Js")
        whitened = self._whiten(Js)
        return self._out(whitened @ whitened.mT)

    def inv_quad_joint(self, Js: Tensor) -> Tensor:
        _check_rows(Js, (2,), self.n_params, "Js")
        whitened = self._whiten(Js)
        return self._out(whitened @ whitened.mT)

    def inv_bilinear(self, A: Tensor, B: Tensor) -> Tensor:
        _check_rows(A, (2,), self.n_params, "A")
        _check_rows(B, (2,), self.n_params, "B")
        return self._out(self._whiten(A) @ self._whiten(B).mT)

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            n_samples,
            self.n_params,
            generator=generator,
            device=self._H.device,
            dtype=self._H.dtype,
        )
        return self._out(self._color(noise))

    def _precision(self) -> Tensor:
        """``P`` in the accumulation precision, ``(params, params)``."""
        if self._dense is None:
            self._dense = self._factor * self._H + torch.diag(self._prior_diag)
        return self._dense

    def precision(self) -> Tensor:
        return self._out(self._precision())

    def scale(self) -> Tensor:
        """Lower-triangular ``L`` with ``L L^T = P^-1``.

        With ``P = U U^T`` for an upper-triangular ``U`` (the Cholesky factor of the reversed
        ``P``, reversed back), ``L = U^-T``; only a triangular solve is needed.

        Shapes:
            ``-> (params, params)``
        """
        upper = _cholesky(self._precision().flip(-2, -1)).flip(-2, -1)
        identity = torch.eye(self.n_params, device=upper.device, dtype=upper.dtype)
        return self._out(torch.linalg.solve_triangular(upper, identity, upper=True).mT)

    def to_dense(self) -> Tensor:
        return self.precision()

    def _covariance_blocks(self, n_outputs: int, n_features: int, bias: bool) -> Tensor:
        """``P^-1`` of a linear layer reordered into per-output blocks of ``[W_c, b_c]``.

        Shapes:
            ``-> (outputs, features + bias, outputs, features + bias)``
        """
        if self._covariance is None:
            self._covariance = self._covariance_matrix()
        covariance = self._covariance
        device = covariance.device
        weight = torch.arange(n_outputs * n_features, device=device).view(n_outputs, n_features)
        if bias:
            offsets = torch.arange(n_outputs, device=device).view(n_outputs, 1)
            weight = torch.cat([weight, n_outputs * n_features + offsets], dim=1)
        order = weight.reshape(-1)
        shape = (n_outputs, weight.shape[1], n_outputs, weight.shape[1])
        return covariance[order][:, order].view(shape)

    def inv_quad_linear(self, phi: Tensor, bias: bool, diagonal: bool = False) -> Tensor:
        """``J P^-1 J^T`` for the Jacobians of a linear layer, never forming them.

        The parameters are the row-major weight and (with ``bias``) the bias of
        ``f = W phi + b``, so ``J_n = [I ⊗ phi_n^T, I]``; each entry of the result is a
        quadratic form ``[phi_n, 1] Sigma_cd [phi_n, 1]^T`` in a block of ``P^-1``.

        Args:
            phi: The layer's input features.
            bias: Whether the parameters end with the bias.
            diagonal: Return only the diagonal (memory linear in the outputs).

        Shapes:
            ``phi (batch, features) -> (batch, outputs, outputs)`` or ``(batch, outputs)``

        Raises:
            ValueError: If ``phi`` does not match the number of parameters.
        """
        n_outputs = linear_layer_outputs(self.n_params, phi, bias)
        blocks = self._covariance_blocks(n_outputs, phi.shape[1], bias)
        phi = _with_ones(phi, bias).to(blocks.dtype)
        if diagonal:
            diagonal_blocks = blocks.diagonal(dim1=0, dim2=2)
            return self._out(torch.einsum("ni,ijc,nj->nc", phi, diagonal_blocks, phi))
        rows = max(1, _CHUNK_ENTRIES * phi.shape[1] // blocks.numel())
        parts = [torch.einsum("ni,cidj,nj->ncd", part, blocks, part) for part in phi.split(rows)]
        return self._out(torch.cat(parts))

    def inv_quad_linear_joint(self, phi: Tensor, bias: bool) -> Tensor:
        """Joint ``J P^-1 J^T`` across a batch for the Jacobians of a linear layer.

        Args:
            phi: The layer's input features.
            bias: Whether the parameters end with the bias.

        Shapes:
            ``phi (batch, features) -> (batch * outputs, batch * outputs)``

        Raises:
            ValueError: If ``phi`` does not match the number of parameters.
        """
        n_outputs = linear_layer_outputs(self.n_params, phi, bias)
        blocks = self._covariance_blocks(n_outputs, phi.shape[1], bias)
        phi = _with_ones(phi, bias).to(blocks.dtype)
        joint = torch.einsum("ni,cidj,mj->ncmd", phi, blocks, phi)
        return self._out(joint.reshape(phi.shape[0] * n_outputs, -1))

    @abstractmethod
    def _covariance_matrix(self) -> Tensor:
        """``P^-1`` in the accumulation precision, ``(params, params)``."""

    def covariance(self) -> Tensor:
        return self._out(self._covariance_matrix())


class DenseCholeskyPosterior(DensePosterior):
    """Dense posterior through the Cholesky factor ``P = C C^T``, for any prior shape.

    Args:
        H: Likelihood curvature, in the accumulation precision.
        factor: Likelihood factor, a 0-d tensor.
        prior_diag: Per-parameter prior precision.
        dtype: The model's dtype (default ``H``'s).

    Shapes:
        ``H: (params, params)``, ``prior_diag: (params,)``

    Raises:
        ValueError: If ``P`` is not positive definite.
    """

    def __init__(
        self, H: Tensor, factor: Tensor, prior_diag: Tensor, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(H, factor, prior_diag, dtype)
        self._lower = _cholesky(self._precision())

    def logdet(self) -> Tensor:
        return 2 * self._lower.diagonal().log().sum()

    def quad(self, v: Tensor) -> Tensor:
        _check_rows(v, (1, 2), self.n_params, "v")
        v = v.to(self._H.dtype)
        return ((v @ self._precision()) * v).sum(-1)

    def _whiten(self, Js: Tensor) -> Tensor:
        Js = Js.to(self._H.dtype)
        return torch.linalg.solve_triangular(self._lower.mT, Js, upper=True, left=False)

    def _color(self, noise: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(self._lower, noise, upper=False, left=False)

    def _covariance_matrix(self) -> Tensor:
        return torch.cholesky_inverse(self._lower)

    def variance(self) -> Tensor:
        identity = torch.eye(self.n_params, device=self._H.device, dtype=self._H.dtype)
        inverse = torch.linalg.solve_triangular(self._lower, identity, upper=False)
        return self._out(inverse.square().sum(0))


class DenseEigenPosterior(DensePosterior):
    """Dense posterior ``V diag(factor * l + delta) V^T`` for a scalar prior ``delta``.

    Gradients flow through the shifted eigenvalues only; the eigenvectors are constants.

    Args:
        H: Likelihood curvature, in the accumulation precision.
        factor: Likelihood factor, a 0-d tensor.
        prior: Scalar prior precision, a 0-d tensor.
        eigenvalues: Eigenvalues ``l`` of ``H``.
        eigenvectors: Eigenvectors ``V`` of ``H`` (columns).
        rotate: ``Js -> Js V`` in the dtype of ``Js`` (the curvature's, which caches ``V``
            in that dtype); default ``Js @ V`` with ``V`` cast.
        dtype: The model's dtype (default ``H``'s).

    Shapes:
        ``H, eigenvectors: (params, params)``, ``eigenvalues: (params,)``

    Raises:
        ValueError: If some ``factor * l + delta`` is not positive (an indefinite ``H``).
    """

    def __init__(
        self,
        H: Tensor,
        factor: Tensor,
        prior: Tensor,
        eigenvalues: Tensor,
        eigenvectors: Tensor,
        rotate: Callable[[Tensor], Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(H, factor, prior.expand(H.shape[0]), dtype)
        self._rotate = rotate
        self._eigenvectors = eigenvectors
        self._eigenvalues = factor * eigenvalues + prior
        smallest = self._eigenvalues.detach().min()
        if smallest <= 0:
            raise NotPositiveDefiniteError(
                "the posterior precision factor * H + prior_precision must be positive "
                f"definite, got smallest eigenvalue {smallest.item():.4g} (H has eigenvalue "
                f"{eigenvalues.min().item():.4g}); increase the prior precision"
            )

    def logdet(self) -> Tensor:
        return self._eigenvalues.log().sum()

    def quad(self, v: Tensor) -> Tensor:
        _check_rows(v, (1, 2), self.n_params, "v")
        rotated = v.to(self._H.dtype) @ self._eigenvectors
        return (rotated.square() * self._eigenvalues).sum(-1)

    def _whiten(self, Js: Tensor) -> Tensor:
        """``J V diag(factor * l + delta)^-1/2`` in the model's (work) dtype: a sum of
        non-negative terms follows (see the module docstring)."""
        Js = Js.to(self._work_dtype)
        if self._rotate is None:
            rotated = Js @ self._eigenvectors.to(Js.dtype)
        else:
            rotated = self._rotate(Js)
        return rotated * self._eigenvalues.rsqrt().to(rotated.dtype)

    def _color(self, noise: Tensor) -> Tensor:
        return (noise * self._eigenvalues.rsqrt()) @ self._eigenvectors.mT

    def _covariance_matrix(self) -> Tensor:
        return (self._eigenvectors * self._eigenvalues.reciprocal()) @ self._eigenvectors.mT

    def variance(self) -> Tensor:
        return self._out(self._eigenvectors.square() @ self._eigenvalues.reciprocal())


class DenseCurvature(Curvature):
    """Accumulated dense curvature ``H`` with a cached eigendecomposition.

    Args:
        H: The curvature matrix; kept in the accumulation precision of its dtype.
        sizes: Number of parameters per layer (parameter tensor).
        dtype: The model's dtype (default ``H``'s).

    Shapes:
        ``H: (params, params)``

    Raises:
        ValueError: If ``H`` is not ``(sum(sizes), sum(sizes))``.
    """

    structure = HessianStructure.FULL

    def __init__(self, H: Tensor, sizes: Sequence[int], dtype: torch.dtype | None = None) -> None:
        super().__init__(sizes, H.dtype if dtype is None else dtype)
        expected = (self.n_params, self.n_params)
        if tuple(H.shape) != expected:
            raise ValueError(f"H must have shape {expected}, got {tuple(H.shape)}")
        self.H = H.to(accumulation_dtype(self.dtype, H.device))
        self._invalidate()

    def _invalidate(self) -> None:
        self._eigen: tuple[Tensor, Tensor] | None = None
        self._public: Tensor | None = None
        self._work_vectors: Tensor | None = None

    @classmethod
    def zeros(cls, params: Sequence[Tensor]) -> DenseCurvature:
        """Zero ``H`` for ``params`` on their device and dtype.

        Raises:
            ValueError: If ``params`` is empty.
        """
        if len(params) == 0:
            raise ValueError("params must contain at least one tensor, got none")
        sizes = [p.numel() for p in params]
        H = torch.zeros(sum(sizes), sum(sizes), **cls._storage(params[0]))
        return cls(H, sizes, dtype=params[0].dtype)

    def add_(self, H_batch: Tensor) -> None:
        """Add one batch's dense curvature in place.

        Shapes:
            ``H_batch: (params, params)``

        Raises:
            TypeError: If ``H_batch`` is not a tensor.
            ValueError: If its shape differs from ``H``.
        """
        if not isinstance(H_batch, Tensor):
            raise TypeError(f"H_batch must be a Tensor, got {type(H_batch).__name__}")
        if H_batch.shape != self.H.shape:
            raise ValueError(
                f"H_batch must have shape {tuple(self.H.shape)}, got {tuple(H_batch.shape)}"
            )
        self.H.add_(H_batch.to(device=self.H.device))
        self._invalidate()

    def eigendecomposition(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues and eigenvectors of ``H``, computed once per change of ``H``.

        When ``assume_psd`` (curvature from a GGN or Fisher backend) all negative eigenvalues are
        round-off and set to zero. Otherwise only those within round-off of zero
        (``params * eps * max |l|``) are; larger negative ones (an indefinite Hessian) are kept.

        Returns:
            ``(eigenvalues, eigenvectors)``, detached from any graph.

        Shapes:
            ``-> (params,), (params, params)``
        """
        if self._eigen is None:
            with torch.no_grad():
                eigenvalues, eigenvectors = stable_eigh(self.H.detach())
                eps = torch.finfo(eigenvalues.dtype).eps
                tolerance = self.n_params * eps * eigenvalues.abs().max()
                roundoff = (eigenvalues < 0) & (eigenvalues >= -tolerance)
                if self.assume_psd:
                    roundoff = eigenvalues < 0
                self._eigen = (eigenvalues.masked_fill(roundoff, 0.0), eigenvectors)
        return self._eigen

    def with_prior(self, prior_precision: Tensor, factor: Tensor | float) -> DensePosterior:
        """The posterior ``factor * H + diag(prior)``; eigenbasis path for a scalar prior.

        Raises:
            ValueError: If the prior has a wrong length, ``factor`` is not a scalar, or the
                posterior precision is not positive definite.
        """
        factor = _scalar_factor(factor, self.H)
        prior = torch.as_tensor(prior_precision, device=self.H.device).to(self.H.dtype)
        if prior.numel() == 1:
            eigenvalues, eigenvectors = self.eigendecomposition()
            return DenseEigenPosterior(
                self.H,
                factor,
                prior.reshape(()),
                eigenvalues,
                eigenvectors,
                self._rotate,
                dtype=self.dtype,
            )
        prior_diag = expand_prior(prior, self.sizes)
        return DenseCholeskyPosterior(self.H, factor, prior_diag, dtype=self.dtype)

    def _rotate(self, Js: Tensor) -> Tensor:
        """``Js V`` in the eigenbasis of ``H``, in the dtype of ``Js`` (``V`` is cast once);
        kept in :attr:`memo` while it is set (the product does not depend on the prior, only
        its scaling does)."""
        vectors = self.eigendecomposition()[1]
        if vectors.dtype != Js.dtype:
            if self._work_vectors is None or self._work_vectors.dtype != Js.dtype:
                self._work_vectors = vectors.to(Js.dtype)
            vectors = self._work_vectors
        if self.memo is None or Js.requires_grad or Js.dtype != self.dtype:
            return Js @ vectors
        return self.memo.get("rotated", Js, lambda: Js @ vectors)

    def public(self) -> Tensor:
        """``H`` in the model's dtype (a cached copy when that is not the storage's)."""
        if self.H.dtype == self.dtype:
            return self.H
        if self._public is None:
            self._public = self.H.to(self.dtype)
        return self._public

    def to_dense(self) -> Tensor:
        return self.H

    def is_finite(self) -> bool:
        return all_finite(self.H)

    def summands(self) -> list[Tensor]:
        return [self.H]

    def state_dict(self) -> dict[str, Tensor | list]:
        return {"H": self.H}

    def load_state_dict(self, state: dict[str, Tensor | list]) -> None:
        if "H" not in state:
            raise ValueError(f"state must hold 'H' for a dense curvature, got keys {list(state)}")
        H = torch.as_tensor(state["H"])
        if H.shape != self.H.shape:
            raise ValueError(
                f"state 'H' must have shape {tuple(self.H.shape)}, got {tuple(H.shape)}"
            )
        self.H = H.to(device=self.H.device, dtype=self.H.dtype, copy=True)
        self._invalidate()
