"""Kronecker-factored (K-FAC) curvature and posterior precision.

The curvature is a :class:`~laplace.utils.matrix.Kron` summed over batches, its factors kept
in the accumulation precision (float64 for float32 models, :mod:`laplace.utils.precision`).
The factors are eigendecomposed once and the decomposition is cached, so every new prior
precision or likelihood factor only rescales eigenvalues and adds per-block deltas (Ritter et
al., ICLR 2018; Immer et al., ICML 2021). The posterior therefore supports scalar and
layerwise prior precisions only.

In the factors' eigenbasis every inverse quadratic form ``J P^-1 J^T`` is a sum of
non-negative terms ``(J q_i)^2 / lambda_i``, so the predictive rotates the Jacobians (or the
features) in the model's dtype with the eigenvectors cast once; log-determinants, samples and
dense matrices are computed in the accumulation precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from laplace.posterior.base import Curvature, Posterior
from laplace.posterior.dense import linear_layer_outputs
from laplace.utils.data import all_finite
from laplace.utils.enums import HessianStructure
from laplace.utils.linear_jacobians import map_factors
from laplace.utils.matrix import Kron, KronDecomposed
from laplace.utils.precision import accumulation_dtype, compute_dtype
from laplace.utils.utils import psd_eigenvalues


def _cast(decomposed: KronDecomposed, dtype: torch.dtype) -> KronDecomposed:
    """``decomposed`` with every tensor in ``dtype`` (itself if it already is)."""
    if decomposed.deltas.dtype == dtype:
        return decomposed
    return KronDecomposed(
        [[q.to(dtype) for q in vectors] for vectors in decomposed.eigenvectors],
        [[v.to(dtype) for v in values] for values in decomposed.eigenvalues],
        decomposed.deltas.to(dtype),
        damping=decomposed.damping,
    )


__all__ = ["KronCurvature", "KronPosterior"]


def _all_factors(kron: Kron) -> list[Tensor]:
    return [f for factors in kron.kfacs for f in factors]


class KronPosterior(Posterior):
    """Posterior precision ``P`` held as a :class:`~laplace.utils.matrix.KronDecomposed`.

    Args:
        precision: ``factor * H + prior`` in decomposed form, or a callable returning it.
        spectrum: ``(e, factor, prior, counts)``: the eigenvalues ``e`` of ``H`` block by
            block, the factor, the scalar or per-block prior and the block sizes, when ``P``
            has the eigenvalues ``factor * e + prior`` (no damping).
        dtype: The model's dtype, of every returned tensor (default that of ``P``).
        work: ``P`` in the model's (work) dtype for the predictive, or a callable returning
            it (default: ``P`` cast).
    """

    def __init__(
        self,
        precision: KronDecomposed | Callable[[], KronDecomposed],
        spectrum: tuple[Tensor, Tensor | float, Tensor, Tensor] | None = None,
        dtype: torch.dtype | None = None,
        work: Callable[[], KronDecomposed] | None = None,
    ) -> None:
        self._build = precision if callable(precision) else None
        self._built = None if callable(precision) else precision
        self._spectrum = spectrum
        self._dtype = dtype
        self._build_work = work
        self._work: KronDecomposed | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._precision.deltas.dtype if self._dtype is None else self._dtype

    @property
    def _precision(self) -> KronDecomposed:
        """``P``, built on first use when given as a callable (a marginal-likelihood step
        needs only :meth:`logdet`)."""
        if self._built is None:
            self._built = self._build()
        return self._built

    @property
    def _work_precision(self) -> KronDecomposed:
        """``P`` in the work dtype of the predictive (see the module docstring)."""
        if self._precise:
            return self._precision
        if self._work is None:
            if self._build_work is not None:
                self._work = self._build_work()
            else:
                self._work = _cast(self._precision, self._work_dtype)
        return self._work

    def logdet(self) -> Tensor:
        """``log det P``; from the cached spectrum of ``H`` when the curvature passed it.

        ``P = factor * H + prior`` has the eigenvalues ``factor * e + prior`` for the
        eigenvalues ``e`` of ``H`` (without damping), so a marginal-likelihood step costs a
        few operations on one vector instead of rebuilding every block's outer product.
        The terms ``log(factor * e + prior)`` are computed in the model's (work) dtype: each
        carries a few units of its round-off, and torch's cascade summation of them adds no
        more than that.
        """
        if self._spectrum is None:
            return self._precision.logdet()
        eigenvalues, factor, prior, counts = self._spectrum
        factor = torch.as_tensor(factor).to(eigenvalues)
        prior = prior.to(eigenvalues)
        if prior.numel() > 1:
            prior = prior.repeat_interleave(counts)
        total = (factor * eigenvalues + prior).log().sum()
        return total.to(accumulation_dtype(total.dtype, total.device))

    def quad(self, v: Tensor) -> Tensor:
        v = v.to(self._precision.deltas.dtype)
        return (v * self._precision.bmm(v, exponent=1)).sum(-1)

    def inv_quad(self, Js: Tensor) -> Tensor:
        return self._out(self._work_precision.inv_square_form(Js.to(self._work_dtype)))

    def inv_quad_joint(self, Js: Tensor) -> Tensor:
        """Joint ``J P^-1 J^T`` as the Gram of ``J Q diag(lambda)^-1/2`` (non-negative terms,
        see the module docstring)."""
        rows = Js.to(self._work_dtype).unsqueeze(0)
        return self._out(self._work_precision.inv_square_form(rows)[0])

    def inv_bilinear(self, A: Tensor, B: Tensor) -> Tensor:
        """``A P^-1 B^T`` blockwise in the eigenbases (``P^-1`` is never formed)."""
        work = self._work_dtype
        return self._out(self._work_precision.inv_bilinear_form(A.to(work), B.to(work)))

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        reference = self._precision.deltas
        noise = torch.randn(
            n_samples,
            self._precision.n_params,
            generator=generator,
            device=reference.device,
            dtype=reference.dtype,
        )
        return self._out(self._precision.bmm(noise, exponent=-0.5))

    def precision(self) -> KronDecomposed:
        """``P`` as a :class:`~laplace.utils.matrix.KronDecomposed` in the model's dtype."""
        return _cast(self._precision, self.dtype)

    def covariance(self) -> Tensor:
        return self._out(self._precision.to_matrix(exponent=-1))

    def scale(self) -> Tensor:
        return self._out(self._precision.to_matrix(exponent=-0.5))

    def variance(self) -> Tensor:
        return self._out(self._precision.diag(exponent=-1))

    def to_dense(self) -> Tensor:
        return self._out(self._precision.to_matrix(exponent=1))

    def inv_quad_factored(self, factors: Sequence[tuple[Tensor, ...]]) -> Tensor:
        """``J P^-1 J^T`` per sample from Kronecker-factored Jacobians (see
        :meth:`~laplace.utils.matrix.KronDecomposed.inv_square_form_factored`), in the work
        dtype.

        Shapes:
            ``-> (batch, outputs, outputs)``
        """
        work = self._work_dtype
        factors = map_factors(factors, lambda t: t.to(work))
        return self._out(self._work_precision.inv_square_form_factored(factors))

    def _linear_factors(
        self, phi: Tensor, bias: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The eigenbasis of a linear layer's Kronecker blocks ``[B, A]`` and ``[B_b]``.

        Returns:
            ``(Q_B, Q_A^T phi, 1 / l, Sigma_b)``: the output-side eigenvectors of the weight
            block, the features rotated into the input-side eigenbasis, the inverse
            eigenvalues of the weight block as an ``(outputs, features)`` grid, and the bias
            block's covariance (``None`` without a bias).

        Shapes:
            ``phi (batch, features) -> (outputs, outputs), (batch, features),
            (outputs, features), (outputs, outputs)``

        Raises:
            ValueError: If the blocks are not those of a linear layer on ``phi``.
        """
        precision = self._work_precision
        n_outputs = linear_layer_outputs(precision.n_params, phi, bias)
        expected = [[n_outputs, phi.shape[1]]] + ([[n_outputs]] if bias else [])
        got = [[v.shape[0] for v in values] for values in precision.eigenvalues]
        if got != expected:
            raise ValueError(
                f"Kron factor sizes {got} are not those of a linear layer, expected {expected}"
            )
        output_vectors, input_vectors = precision.eigenvectors[0]
        inverse = precision._block_eigenvalues(0).reciprocal().view(n_outputs, phi.shape[1])
        bias_covariance = None
        if bias:
            bias_vectors = precision.eigenvectors[1][0]
            bias_covariance = (bias_vectors / precision._block_eigenvalues(1)) @ bias_vectors.mT
        return output_vectors, phi @ input_vectors, inverse, bias_covariance

    def inv_quad_linear(self, phi: Tensor, bias: bool, diagonal: bool = False) -> Tensor:
        """``J P^-1 J^T`` for the Jacobians of a linear layer, never forming them.

        With the weight block ``(Q_B ⊗ Q_A) diag(l) (Q_B ⊗ Q_A)^T`` and
        ``J_n = [I ⊗ phi_n^T, I]``, the weight part is ``Q_B diag(s_n) Q_B^T`` with
        ``s_na = sum_b (Q_A^T phi_n)_b^2 / l_ab``; the bias block adds its covariance.
        Only ``(batch, outputs)`` numbers are formed besides the factors (and the result).

        Args:
            phi: The layer's input features.
            bias: Whether the parameters end with the bias.
            diagonal: Return only the diagonal (memory linear in the outputs).

        Shapes:
            ``phi (batch, features) -> (batch, outputs, outputs)`` or ``(batch, outputs)``

        Raises:
            ValueError: If the blocks are not those of a linear layer on ``phi``.
        """
        phi = phi.to(self._work_dtype)
        output_vectors, rotated, inverse, bias_covariance = self._linear_factors(phi, bias)
        scaled = rotated.square() @ inverse.mT
        if diagonal:
            variance = scaled @ output_vectors.square().mT
            extra = None if bias_covariance is None else bias_covariance.diagonal()
        else:
            variance = (output_vectors * scaled.unsqueeze(-2)) @ output_vectors.mT
            extra = bias_covariance
        return self._out(variance if extra is None else variance + extra)

    def inv_quad_linear_joint(self, phi: Tensor, bias: bool) -> Tensor:
        """Joint ``J P^-1 J^T`` across a batch for the Jacobians of a linear layer.

        Shapes:
            ``phi (batch, features) -> (batch * outputs, batch * outputs)``

        Raises:
            ValueError: If the blocks are not those of a linear layer on ``phi``.
        """
        phi = phi.to(self._work_dtype)
        output_vectors, rotated, inverse, bias_covariance = self._linear_factors(phi, bias)
        per_direction = torch.einsum("nb,mb,ab->anm", rotated, rotated, inverse)
        joint = torch.einsum("ca,da,anm->ncmd", output_vectors, output_vectors, per_direction)
        if bias_covariance is not None:
            joint = joint + bias_covariance[:, None, :]
        return self._out(joint.reshape(phi.shape[0] * output_vectors.shape[0], -1))


class KronCurvature(Curvature):
    """Accumulated K-FAC curvature ``H`` with a cached eigendecomposition.

    Args:
        H: The Kronecker-factored curvature; its factors are kept in the accumulation
            precision of their dtype.
        damping: Build posteriors whose prior is added to the factors' eigenvalues
            (see :class:`~laplace.utils.matrix.KronDecomposed`).
        dtype: The model's dtype (default that of the factors).
    """

    structure = HessianStructure.KRON

    def __init__(self, H: Kron, damping: bool = False, dtype: torch.dtype | None = None) -> None:
        first = H.kfacs[0][0]
        super().__init__(H.sizes, first.dtype if dtype is None else dtype)
        storage = accumulation_dtype(self.dtype, first.device)
        if any(f.dtype != storage for f in _all_factors(H)):
            H = Kron([[f.to(storage) for f in factors] for factors in H.kfacs])
        self.H = H
        self.damping = bool(damping)
        self._invalidate()

    @classmethod
    def zeros(cls, params: Sequence[Tensor], damping: bool = False) -> KronCurvature:
        """Zero factors for ``params`` on their device, in the accumulation precision of
        their dtype.

        Raises:
            ValueError: If ``params`` is empty.
        """
        params = list(params)
        if not params:
            raise ValueError("params must contain at least one tensor, got none")
        kron = Kron.init_from_model(params, **cls._storage(params[0]))
        return cls(kron, damping=damping, dtype=params[0].dtype)

    def _factors(self) -> list[Tensor]:
        return _all_factors(self.H)

    def _invalidate(self) -> None:
        self._decomposed: KronDecomposed | None = None
        self._decomposed_factors: list[Tensor] = []
        self._spectrum: tuple[list[Tensor], Tensor, Tensor] | None = None
        self._public: tuple[list[Tensor], Kron, KronDecomposed | None] | None = None
        self._work_vectors: tuple[list[Tensor], list[list[Tensor]]] | None = None

    def _is_current(self, factors: list[Tensor]) -> bool:
        """Whether ``factors`` (cached alongside a result) are still the factors of ``H``."""
        current = self._factors()
        return len(factors) == len(current) and all(a is b for a, b in zip(factors, current))

    def decomposed(self) -> KronDecomposed:
        """The eigendecomposition of ``H`` (zero deltas), computed once per change of ``H``,
        in the accumulation precision."""
        if self._decomposed is None or not self._is_current(self._decomposed_factors):
            self._decomposed = self.H.decompose()
            self._decomposed_factors = self._factors()
        return self._decomposed

    def public_decomposed(self) -> KronDecomposed:
        """:meth:`decomposed` in the model's dtype (cached), for the public ``la.H``."""
        decomposed = self.decomposed()
        if decomposed.deltas.dtype == self.dtype:
            return decomposed
        cached = self._public_cache()
        if cached[2] is None:
            self._public = (cached[0], cached[1], _cast(decomposed, self.dtype))
        return self._public[2]

    def _work_eigenvectors(self, dtype: torch.dtype) -> list[list[Tensor]]:
        """The factors' eigenvectors in ``dtype``, cast once per change of ``H``."""
        vectors = self.decomposed().eigenvectors
        if vectors[0][0].dtype == dtype:
            return vectors
        current = self._work_vectors
        if current is None or not self._is_current(current[0]) or current[1][0][0].dtype != dtype:
            cast = [[q.to(dtype) for q in block] for block in vectors]
            self._work_vectors = (self._factors(), cast)
        return self._work_vectors[1]

    def spectrum(self) -> tuple[Tensor, Tensor]:
        """All eigenvalues of ``H`` block by block, and the block sizes; cached.

        Taken from the eigendecomposition when it exists; otherwise only the factors'
        eigenvalues are computed (:func:`~laplace.utils.utils.psd_eigenvalues`), so tuning
        the prior by marginal likelihood never pays for eigenvectors it does not use.

        Shapes:
            ``(params,)``, ``(blocks,)``
        """
        if self._spectrum is None or not self._is_current(self._spectrum[0]):
            if self._decomposed is not None and self._is_current(self._decomposed_factors):
                decomposed = self._decomposed
                blocks = [decomposed._block_eigenvalues(i) for i in range(len(decomposed))]
            else:
                blocks = []
                for factors in self.H.kfacs:
                    values = [psd_eigenvalues(f) for f in factors]
                    blocks.append(
                        torch.outer(*values).reshape(-1) if len(values) == 2 else values[0]
                    )
            counts = torch.as_tensor(self.H.sizes, device=blocks[0].device)
            # the log-determinant's terms need only relative accuracy: the work dtype
            values = torch.cat(blocks).to(compute_dtype(self.dtype))
            self._spectrum = (self._factors(), values, counts)
        return self._spectrum[1], self._spectrum[2]

    def add_(self, H_batch: Kron) -> None:
        """Add one batch's Kronecker factors.

        Raises:
            TypeError: If ``H_batch`` is not a ``Kron``.
            ValueError: If its blocks do not match.
        """
        if not isinstance(H_batch, Kron):
            raise TypeError(f"H_batch must be a Kron, got {type(H_batch).__name__}")
        self.H._check_compatible(H_batch)
        for mine, theirs in zip(self.H.kfacs, H_batch.kfacs):
            for factor, batch_factor in zip(mine, theirs):
                batch_factor = batch_factor.to(device=factor.device)
                if batch_factor.ndim == 1:  # a diagonal factor
                    factor.diagonal().add_(batch_factor)
                else:
                    factor.add_(batch_factor)  # in the storage's dtype
        self._invalidate()

    def with_prior(self, prior_precision: Tensor, factor: Tensor | float) -> KronPosterior:
        n_blocks = len(self.H)
        if prior_precision.numel() not in (1, n_blocks):
            raise ValueError(
                f"prior_precision must have 1 (scalar) or {n_blocks} (layerwise) entries, got "
                f"{prior_precision.numel()}: Kron supports scalar or layerwise prior precision"
            )
        prior = prior_precision.reshape(-1)

        storage = self.H.kfacs[0][0].dtype
        factor = torch.as_tensor(factor).to(storage) if isinstance(factor, Tensor) else factor
        prior = prior.to(storage)

        def build() -> KronDecomposed:
            cached = self.decomposed()
            decomposed = KronDecomposed(
                cached.eigenvectors, cached.eigenvalues, cached.deltas, damping=self.damping
            )
            return decomposed * factor + prior

        work_dtype = compute_dtype(self.dtype)

        def build_work() -> KronDecomposed:
            precise = posterior._precision
            return KronDecomposed(
                self._work_eigenvectors(work_dtype),
                [[v.to(work_dtype) for v in values] for values in precise.eigenvalues],
                precise.deltas.to(work_dtype),
                damping=self.damping,
            )

        spectrum = None
        if not self.damping:
            eigenvalues, counts = self.spectrum()
            spectrum = (eigenvalues, factor, prior, counts)
        posterior = KronPosterior(build, spectrum, dtype=self.dtype, work=build_work)
        return posterior

    def _public_cache(self) -> tuple[list[Tensor], Kron, KronDecomposed | None]:
        if self._public is None or not self._is_current(self._public[0]):
            cast = Kron([[f.to(self.dtype) for f in factors] for factors in self.H.kfacs])
            self._public = (self._factors(), cast, None)
        return self._public

    def public(self) -> Kron:
        """The factors in the model's dtype (a cached copy when that is not the storage's)."""
        if self.H.kfacs[0][0].dtype == self.dtype:
            return self.H
        return self._public_cache()[1]

    def to_dense(self) -> Tensor:
        return self.H.to_matrix().to(self.dtype)

    def is_finite(self) -> bool:
        return all(all_finite(f) for f in self._factors())

    def summands(self) -> list[Tensor]:
        """Every Kronecker factor: each is a sum over the data (``A`` divided by the size of
        the whole data set)."""
        return self._factors()

    def state_dict(self) -> dict[str, Tensor | list]:
        return {"kfacs": [list(factors) for factors in self.H.kfacs]}

    def load_state_dict(self, state: dict[str, Tensor | list]) -> None:
        if "kfacs" not in state:
            raise ValueError(f"state must hold 'kfacs' for a Kron curvature, got {list(state)}")
        kfacs = state["kfacs"]
        if len(kfacs) != len(self.H):
            raise ValueError(f"state has {len(kfacs)} Kron blocks, expected {len(self.H)}")
        loaded = []
        for index, (mine, theirs) in enumerate(zip(self.H.kfacs, kfacs)):
            expected = [tuple(f.shape) for f in mine]
            got = [tuple(torch.as_tensor(f).shape) for f in theirs]
            if expected != got:
                raise ValueError(
                    f"Kron block {index} has factor shapes {got}, expected {expected}"
                )
            loaded.append(
                [
                    torch.as_tensor(f).to(device=m.device, dtype=m.dtype, copy=True)
                    for f, m in zip(theirs, mine)
                ]
            )
        self.H = Kron(loaded)
        self._invalidate()
