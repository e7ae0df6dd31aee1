"""Low-rank curvature and the low-rank-plus-diagonal posterior precision.

``H`` is stored as ``k`` eigenpairs, ``H ~ U diag(l) U^T`` with orthonormal ``U`` and
``l >= 0``. With ``D = diag(p0)`` and ``s = sqrt(factor * l)`` the posterior precision is

    P = factor * U diag(l) U^T + D = D + W W^T,   W = U diag(s),

and everything follows from the ``k x k`` capacitance matrix ``C = I + W^T D^-1 W`` and its
Cholesky factor ``C = L L^T`` (Woodbury; the root form keeps ``C`` positive definite even
for zero eigenvalues):

- ``log det P = log det D + log det C`` (matrix determinant lemma);
- ``P^-1 = D^-1 - D^-1 W C^-1 W^T D^-1`` (Woodbury identity);
- samples ``x = P^-1 (D^1/2 z1 + W z2)`` with ``z1 ~ N(0, I_params)``, ``z2 ~ N(0, I_k)``:
  ``D^1/2 z1 + W z2 ~ N(0, P)``, hence ``x ~ N(0, P^-1 P P^-1) = N(0, P^-1)`` exactly
  (perturb-and-solve, Papandreou & Yuille, 2010).

For a scalar or layerwise prior, ``W^T D^-1 W`` is a weighted sum of per-layer Gram matrices
``U_layer^T U_layer`` that the curvature computes once, so a new prior costs ``O(layers k^2 +
k^3)``; a per-parameter prior costs ``O(params k^2)``.

Precision: the eigenpairs are kept in the accumulation precision (float64 for float32
models, :mod:`laplace.utils.precision`), and so is every product with them. The Woodbury
form of ``J P^-1 J^T`` is a difference, ``J D^-1 J^T`` minus the correction, which cancels
to ``~|J|^2 / (factor * l)`` along the curvature's large eigenvalues: in float32 its error
would be ``eps * |J|^2 / p0``, relative ``eps * factor * l / p0``. The Jacobians are
therefore upcast before the product.

References:
    Papandreou, G., Yuille, A. Gaussian sampling by local perturbations. NeurIPS, 2010.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from laplace.posterior.base import Curvature, Posterior, expand_prior
from laplace.posterior.dense import _check_rows, _scalar_factor
from laplace.utils.data import all_finite
from laplace.utils.enums import HessianStructure
from laplace.utils.precision import accumulation_dtype

__all__ = ["LowRankCurvature", "LowRankPosterior"]


class LowRankPosterior(Posterior):
    """Posterior precision ``P = factor * U diag(l) U^T + diag(p0)`` through Woodbury.

    Differentiable in ``factor``, ``p0`` and ``gram``; ``U`` and ``l`` are constants.

    Args:
        eigenvectors: Orthonormal ``U``.
        eigenvalues: Non-negative ``l``.
        factor: Likelihood factor, a 0-d tensor.
        prior_diag: Per-parameter prior precision ``p0``, positive.
        gram: ``U^T diag(p0)^-1 U`` if already known (computed otherwise).
        dtype: The model's dtype, of every returned tensor (default ``U``'s).

    Shapes:
        ``eigenvectors: (params, k)``, ``eigenvalues: (k,)``, ``prior_diag: (params,)``,
        ``gram: (k, k)``

    Raises:
        ValueError: If an entry of ``p0`` is not positive.
    """

    def __init__(
        self,
        eigenvectors: Tensor,
        eigenvalues: Tensor,
        factor: Tensor,
        prior_diag: Tensor,
        gram: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.dtype = eigenvectors.dtype if dtype is None else dtype
        smallest = prior_diag.detach().min()
        if smallest <= 0:
            raise ValueError(
                f"prior_precision must be positive for a low-rank posterior, got smallest "
                f"entry {smallest.item():.4g}"
            )
        self._U = eigenvectors
        self._eigenvalues = eigenvalues
        self._factor = factor
        self._prior_diag = prior_diag
        self._root = factor.sqrt() * eigenvalues.sqrt()
        if gram is None:
            gram = eigenvectors.mT @ (eigenvectors / prior_diag.unsqueeze(-1))
        capacitance = self._root.unsqueeze(-1) * gram * self._root
        capacitance = capacitance + torch.eye(
            len(eigenvalues), device=gram.device, dtype=gram.dtype
        )
        self._lower = torch.linalg.cholesky(capacitance)

    @property
    def n_params(self) -> int:
        return self._U.shape[0]

    def _scaled_rows(self, rows: Tensor) -> Tensor:
        """``rows D^-1 W``, the rows' coordinates in the low-rank subspace.

        Shapes:
            ``(..., params) -> (..., k)``
        """
        return ((rows.to(self._U.dtype) / self._prior_diag) @ self._U) * self._root

    def _whiten(self, rows: Tensor) -> Tensor:
        """``L^-1 W^T D^-1 rows^T`` so that its Gram is the Woodbury correction.

        Shapes:
            ``(..., rows, params) -> (..., k, rows)``
        """
        return torch.linalg.solve_triangular(self._lower, self._scaled_rows(rows).mT, upper=False)

    def solve(self, rows: Tensor) -> Tensor:
        """``P^-1`` applied to each row.

        Shapes:
            ``(n, params) -> (n, params)``
        """
        rows = rows.to(self._U.dtype)
        coefficients = torch.cholesky_solve(self._scaled_rows(rows).mT, self._lower)
        correction = (coefficients.mT * self._root) @ self._U.mT
        return (rows - correction) / self._prior_diag

    def logdet(self) -> Tensor:
        return self._prior_diag.log().sum() + 2 * self._lower.diagonal().log().sum()

    def quad(self, v: Tensor) -> Tensor:
        _check_rows(v, (1, 2), self.n_params, "v")
        v = v.to(self._U.dtype)
        low_rank = ((v @ self._U) * self._root).square().sum(-1)
        return (v.square() * self._prior_diag).sum(-1) + low_rank

    def inv_quad(self, Js: Tensor) -> Tensor:
        _check_rows(Js, (3,), self.n_params, "Js")
        Js = Js.to(self._U.dtype)
        whitened = self._whiten(Js)
        return self._out((Js / self._prior_diag) @ Js.mT - whitened.mT @ whitened)

    def inv_quad_joint(self, Js: Tensor) -> Tensor:
        _check_rows(Js, (2,), self.n_params, "Js")
        Js = Js.to(self._U.dtype)
        whitened = self._whiten(Js)
        return self._out((Js / self._prior_diag) @ Js.mT - whitened.mT @ whitened)

    def inv_bilinear(self, A: Tensor, B: Tensor) -> Tensor:
        _check_rows(A, (2,), self.n_params, "A")
        _check_rows(B, (2,), self.n_params, "B")
        A, B = A.to(self._U.dtype), B.to(self._U.dtype)
        correction = self._whiten(A).mT @ self._whiten(B)
        return self._out((A / self._prior_diag) @ B.mT - correction)

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples by perturb-and-solve (see the module docstring).

        Shapes:
            ``-> (n_samples, params)``
        """
        like = {"generator": generator, "device": self._U.device, "dtype": self._U.dtype}
        noise = torch.randn(n_samples, self.n_params, **like)
        low_rank_noise = torch.randn(n_samples, len(self._eigenvalues), **like)
        perturbation = noise * self._prior_diag.sqrt() + (low_rank_noise * self._root) @ self._U.mT
        return self._out(self.solve(perturbation))

    def precision(self) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """``((U, factor * l), p0)``: ``P = U diag(factor * l) U^T + diag(p0)``."""
        scaled = self._factor * self._eigenvalues
        return (self._out(self._U), self._out(scaled)), self._out(self._prior_diag)

    def woodbury(self) -> tuple[Tensor, Tensor]:
        """``(V, K^-1)`` with ``P^-1 = diag(p0)^-1 - V K^-1 V^T``.

        ``V = diag(p0)^-1 U`` and ``K^-1 = (diag(factor * l)^-1 + U^T diag(p0)^-1 U)^-1``,
        computed as ``diag(s) C^-1 diag(s)`` (defined for zero eigenvalues too).

        Shapes:
            ``-> (params, k), (k, k)``
        """
        capacitance_inverse = torch.cholesky_inverse(self._lower)
        inverse = self._root.unsqueeze(-1) * capacitance_inverse * self._root
        return self._out(self._U / self._prior_diag.unsqueeze(-1)), self._out(inverse)

    def _whitened_factor(self) -> Tensor:
        """``L^-1 W^T D^-1``, whose Gram is the Woodbury correction of ``P^-1``.

        Shapes:
            ``-> (k, params)``
        """
        scaled = (self._U / self._prior_diag.unsqueeze(-1)) * self._root
        return torch.linalg.solve_triangular(self._lower, scaled.mT, upper=False)

    def covariance(self) -> Tensor:
        """Dense ``P^-1``, ``(params, params)``; for small models."""
        return self._out(self._covariance())

    def _covariance(self) -> Tensor:
        whitened = self._whitened_factor()
        return torch.diag(self._prior_diag.reciprocal()) - whitened.mT @ whitened

    def scale(self) -> Tensor:
        """Dense lower-triangular ``R`` with ``R R^T = P^-1`` (its Cholesky factor)."""
        return self._out(torch.linalg.cholesky(self._covariance()))

    def variance(self) -> Tensor:
        return self._out(self._prior_diag.reciprocal() - self._whitened_factor().square().sum(0))

    def to_dense(self) -> Tensor:
        low_rank = (self._U * (self._factor * self._eigenvalues)) @ self._U.mT
        return self._out(low_rank + torch.diag(self._prior_diag))


class LowRankCurvature(Curvature):
    """Low-rank curvature ``H ~ U diag(l) U^T`` from ``k`` eigenpairs.

    The eigendecomposition is not additive, so this curvature is computed at once over the
    whole data (see :class:`~laplace.lowrank.LowRankLaplace`) rather than accumulated.

    Args:
        eigenvectors: Orthonormal eigenvectors ``U`` (columns); kept, with the eigenvalues,
            in the accumulation precision of their dtype.
        eigenvalues: Their eigenvalues ``l``, non-negative.
        sizes: Number of parameters per layer (parameter tensor).
        dtype: The model's dtype (default that of ``U``).

    Shapes:
        ``eigenvectors: (params, k)``, ``eigenvalues: (k,)``

    Raises:
        ValueError: For shapes that do not match ``sizes`` or each other, or negative or
            non-finite eigenvalues.
    """

    structure = HessianStructure.LOWRANK

    def __init__(
        self,
        eigenvectors: Tensor,
        eigenvalues: Tensor,
        sizes: Sequence[int],
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(sizes, eigenvectors.dtype if dtype is None else dtype)
        if eigenvectors.ndim != 2 or eigenvectors.shape[0] != self.n_params:
            raise ValueError(
                f"eigenvectors must have shape ({self.n_params}, k), got "
                f"{tuple(eigenvectors.shape)}"
            )
        if tuple(eigenvalues.shape) != (eigenvectors.shape[1],):
            raise ValueError(
                f"eigenvalues must have shape ({eigenvectors.shape[1]},), got "
                f"{tuple(eigenvalues.shape)}"
            )
        if not torch.isfinite(eigenvalues).all() or (eigenvalues < 0).any():
            raise ValueError(
                "eigenvalues must be finite and non-negative, got "
                f"{eigenvalues.detach().flatten()[:5].tolist()}"
            )
        storage = accumulation_dtype(self.dtype, eigenvectors.device)
        self.eigenvectors = eigenvectors.to(storage)
        self.eigenvalues = eigenvalues.to(storage)
        self._layer_grams: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.eigenvalues.shape[0]

    @classmethod
    def zeros(cls, params: Sequence[Tensor]) -> LowRankCurvature:
        """The rank-0 (zero) curvature for ``params`` on their device and dtype.

        Raises:
            ValueError: If ``params`` is empty.
        """
        if len(params) == 0:
            raise ValueError("params must contain at least one tensor, got none")
        sizes = [p.numel() for p in params]
        like = cls._storage(params[0])
        zeros = torch.zeros(sum(sizes), 0, **like), torch.zeros(0, **like)
        return cls(*zeros, sizes, dtype=params[0].dtype)

    def add_(self, H_batch: object) -> None:
        """Not supported: eigendecompositions of batches do not add up.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(
            "a low-rank curvature is not accumulated over batches: it is the top "
            "eigendecomposition of the curvature over the whole data set"
        )

    def layer_grams(self) -> Tensor:
        """``U_layer^T U_layer`` for each layer's rows of ``U``, computed once.

        Shapes:
            ``-> (layers, k, k)``
        """
        if self._layer_grams is None:
            blocks = torch.split(self.eigenvectors.detach(), self.sizes)
            self._layer_grams = torch.stack([block.mT @ block for block in blocks])
        return self._layer_grams

    def with_prior(self, prior_precision: Tensor, factor: Tensor | float) -> LowRankPosterior:
        """The posterior ``factor * U diag(l) U^T + diag(prior)`` for any prior shape.

        Raises:
            ValueError: If the prior has a wrong length or a non-positive entry, or
                ``factor`` is not a scalar.
        """
        U = self.eigenvectors
        factor = _scalar_factor(factor, U)
        prior = torch.as_tensor(prior_precision, device=U.device).to(U.dtype).reshape(-1)
        prior_diag = expand_prior(prior, self.sizes)
        gram = None
        if prior.numel() == 1 or prior.numel() == len(self.sizes) != self.n_params:
            per_layer = prior.expand(len(self.sizes)).reciprocal()
            gram = torch.einsum("l,lij->ij", per_layer, self.layer_grams())
        return LowRankPosterior(U, self.eigenvalues, factor, prior_diag, gram, dtype=self.dtype)

    def public(self) -> tuple[Tensor, Tensor]:
        """``(U, l)``: the eigenvectors and eigenvalues, in the model's dtype."""
        return self.eigenvectors.to(self.dtype), self.eigenvalues.to(self.dtype)

    def to_dense(self) -> Tensor:
        return ((self.eigenvectors * self.eigenvalues) @ self.eigenvectors.mT).to(self.dtype)

    def is_finite(self) -> bool:
        return all_finite(self.eigenvectors) and all_finite(self.eigenvalues)

    def state_dict(self) -> dict[str, Tensor | list]:
        return {"eigenvectors": self.eigenvectors, "eigenvalues": self.eigenvalues}

    def load_state_dict(self, state: dict[str, Tensor | list]) -> None:
        """Restore from :meth:`state_dict`; any rank is accepted.

        Raises:
            ValueError: If a key is missing or the shapes do not fit the parameters.
        """
        if "eigenvectors" not in state or "eigenvalues" not in state:
            raise ValueError(
                "state must hold 'eigenvectors' and 'eigenvalues' for a low-rank curvature, "
                f"got keys {list(state)}"
            )
        like = {"device": self.eigenvectors.device, "dtype": self.eigenvectors.dtype}
        restored = LowRankCurvature(
            torch.as_tensor(state["eigenvectors"]).to(**like, copy=True),
            torch.as_tensor(state["eigenvalues"]).to(**like, copy=True),
            self.sizes,
            dtype=self.dtype,
        )
        self.eigenvectors, self.eigenvalues = restored.eigenvectors, restored.eigenvalues
        self._layer_grams = None
