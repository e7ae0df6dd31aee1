"""Kronecker-factored (K-FAC) curvature and posterior precision.

The curvature is a :class:`~laplace.utils.matrix.Kron` summed over batches. Its factors are
eigendecomposed once and the decomposition is cached, so every new prior precision or
likelihood factor only rescales eigenvalues and adds per-block deltas (Ritter et al., ICLR
2018; Immer et al., ICML 2021). The posterior therefore supports scalar and layerwise prior
precisions only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from laplace.posterior.base import Curvature, Posterior
from laplace.posterior.dense import linear_layer_outputs
from laplace.utils.enums import HessianStructure
from laplace.utils.matrix import Kron, KronDecomposed
from laplace.utils.utils import psd_eigenvalues

__all__ = ["KronCurvature", "KronPosterior"]


class KronPosterior(Posterior):
    """Posterior precision ``P`` held as a :class:`~laplace.utils.matrix.KronDecomposed`.

    Args:
        precision: ``factor * H + prior`` in decomposed form, or a callable returning it.
        spectrum: ``(e, factor, prior, counts)``: the eigenvalues ``e`` of ``H`` block by
            block, the factor, the scalar or per-block prior and the block sizes, when ``P``
            has the eigenvalues ``factor * e + prior`` (no damping).
    """

    def __init__(
        self,
        precision: KronDecomposed | Callable[[], KronDecomposed],
        spectrum: tuple[Tensor, Tensor | float, Tensor, Tensor] | None = None,
    ) -> None:
        self._build = precision if callable(precision) else None
        self._built = None if callable(precision) else precision
        self._spectrum = spectrum

    @property
    def _precision(self) -> KronDecomposed:
        """``P``, built on first use when given as a callable (a marginal-likelihood step
        needs only :meth:`logdet`)."""
        if self._built is None:
            self._built = self._build()
        return self._built

    def logdet(self) -> Tensor:
        """``log det P``; from the cached spectrum of ``H`` when the curvature passed it.

        ``P = factor * H + prior`` has the eigenvalues ``factor * e + prior`` for the
        eigenvalues ``e`` of ``H`` (without damping), so a marginal-likelihood step costs a
        few operations on one vector instead of rebuilding every block's outer product.
        """
        if self._spectrum is None:
            return self._precision.logdet()
        eigenvalues, factor, prior, counts = self._spectrum
        factor = torch.as_tensor(factor).to(eigenvalues)
        prior = prior.to(eigenvalues)
        if prior.numel() > 1:
            prior = prior.repeat_interleave(counts)
        return (factor * eigenvalues + prior).log().sum()

    def quad(self, v: Tensor) -> Tensor:
        return (v * self._precision.bmm(v, exponent=1)).sum(-1)

    def inv_quad(self, Js: Tensor) -> Tensor:
        return self._precision.inv_square_form(Js)

    def inv_quad_joint(self, Js: Tensor) -> Tensor:
        return self._precision.bmm(Js, exponent=-1) @ Js.mT

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        reference = self._precision.deltas
        noise = torch.randn(
            n_samples,
            self._precision.n_params,
            generator=generator,
            device=reference.device,
            dtype=reference.dtype,
        )
        return self._precision.bmm(noise, exponent=-0.5)

    def precision(self) -> KronDecomposed:
        return self._precision

    def covariance(self) -> Tensor:
        return self._precision.to_matrix(exponent=-1)

    def scale(self) -> Tensor:
        return self._precision.to_matrix(exponent=-0.5)

    def variance(self) -> Tensor:
        return self._precision.diag(exponent=-1)

    def to_dense(self) -> Tensor:
        return self._precision.to_matrix(exponent=1)

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
        precision = self._precision
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
        output_vectors, rotated, inverse, bias_covariance = self._linear_factors(phi, bias)
        scaled = rotated.square() @ inverse.mT
        if diagonal:
            variance = scaled @ output_vectors.square().mT
            extra = None if bias_covariance is None else bias_covariance.diagonal()
        else:
            variance = (output_vectors * scaled.unsqueeze(-2)) @ output_vectors.mT
            extra = bias_covariance
        return variance if extra is None else variance + extra

    def inv_quad_linear_joint(self, phi: Tensor, bias: bool) -> Tensor:
        """Joint ``J P^-1 J^T`` across a batch for the Jacobians of a linear layer.

        Shapes:
            ``phi (batch, features) -> (batch * outputs, batch * outputs)``

        Raises:
            ValueError: If the blocks are not those of a linear layer on ``phi``.
        """
        output_vectors, rotated, inverse, bias_covariance = self._linear_factors(phi, bias)
        per_direction = torch.einsum("nb,mb,ab->anm", rotated, rotated, inverse)
        joint = torch.einsum("ca,da,anm->ncmd", output_vectors, output_vectors, per_direction)
        if bias_covariance is not None:
            joint = joint + bias_covariance[:, None, :]
        return joint.reshape(phi.shape[0] * output_vectors.shape[0], -1)


class KronCurvature(Curvature):
    """Accumulated K-FAC curvature ``H`` with a cached eigendecomposition.

    Args:
        H: The Kronecker-factored curvature.
        damping: Build posteriors whose prior is added to the factors' eigenvalues
            (see :class:`~laplace.utils.matrix.KronDecomposed`).
    """

    structure = HessianStructure.KRON

    def __init__(self, H: Kron, damping: bool = False) -> None:
        super().__init__(H.sizes)
        self.H = H
        self.damping = bool(damping)
        self._decomposed: KronDecomposed | None = None
        self._decomposed_factors: list[Tensor] = []
        self._spectrum: tuple[list[Tensor], Tensor, Tensor] | None = None

    @classmethod
    def zeros(cls, params: Sequence[Tensor], damping: bool = False) -> KronCurvature:
        """Zero factors for ``params`` on their device and dtype.

        Raises:
            ValueError: If ``params`` is empty.
        """
        return cls(Kron.init_from_model(list(params)), damping=damping)

    def _factors(self) -> list[Tensor]:
        return [f for factors in self.H.kfacs for f in factors]

    def _invalidate(self) -> None:
        self._decomposed, self._decomposed_factors, self._spectrum = None, [], None

    def _is_current(self, factors: list[Tensor]) -> bool:
        """Whether ``factors`` (cached alongside a result) are still the factors of ``H``."""
        current = self._factors()
        return len(factors) == len(current) and all(a is b for a, b in zip(factors, current))

    def decomposed(self) -> KronDecomposed:
        """The eigendecomposition of ``H`` (zero deltas), computed once per change of ``H``."""
        if self._decomposed is None or not self._is_current(self._decomposed_factors):
            self._decomposed = self.H.decompose()
            self._decomposed_factors = self._factors()
        return self._decomposed

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
            self._spectrum = (self._factors(), torch.cat(blocks), counts)
        return self._spectrum[1], self._spectrum[2]

    def add_(self, H_batch: Kron) -> None:
        """Add one batch's Kronecker factors.

        Raises:
            TypeError: If ``H_batch`` is not a ``Kron``.
            ValueError: If its blocks do not match.
        """
        if not isinstance(H_batch, Kron):
            raise TypeError(f"H_batch must be a Kron, got {type(H_batch).__name__}")
        self.H += H_batch
        self._invalidate()

    def with_prior(self, prior_precision: Tensor, factor: Tensor | float) -> KronPosterior:
        n_blocks = len(self.H)
        if prior_precision.numel() not in (1, n_blocks):
            raise ValueError(
                f"prior_precision must have 1 (scalar) or {n_blocks} (layerwise) entries, got "
                f"{prior_precision.numel()}: Kron supports scalar or layerwise prior precision"
            )
        prior = prior_precision.reshape(-1)

        def build() -> KronDecomposed:
            cached = self.decomposed()
            decomposed = KronDecomposed(
                cached.eigenvectors, cached.eigenvalues, cached.deltas, damping=self.damping
            )
            return decomposed * factor + prior

        spectrum = None
        if not self.damping:
            eigenvalues, counts = self.spectrum()
            spectrum = (eigenvalues, factor, prior, counts)
        return KronPosterior(build, spectrum)

    def public(self) -> Kron:
        return self.H

    def to_dense(self) -> Tensor:
        return self.H.to_matrix()

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
                    torch.as_tensor(f).to(device=m.device, dtype=m.dtype)
                    for f, m in zip(theirs, mine)
                ]
            )
        self.H = Kron(loaded)
        self._invalidate()
