"""Block-diagonal Kronecker-factored matrices (K-FAC).

A :class:`Kron` holds one block per parameter tensor, in parameter order; a block is either a
Kronecker product ``B ⊗ A`` of two square factors or a single square matrix. For a Linear
weight of shape ``(out, in)``, flattened row-major, ``B`` is the ``(out, out)`` factor of the
output gradients and ``A`` the ``(in, in)`` factor of the inputs (Martens & Grosse, ICML 2015;
Ritter et al., ICLR 2018). Sums of :class:`Kron` objects add factors blockwise, the usual
K-FAC approximation.

:class:`KronDecomposed` stores the eigendecomposition of every factor plus one additive
``delta`` per block (a scalar or layerwise prior precision), so that log-determinants, inverse
quadratic forms, matrix powers and samples cost only small matrix products and stay
differentiable in the deltas and in a global scale.

All matrix-vector style products use ``(B ⊗ A) vec(X) = vec(B X A^T)`` for row-major ``vec``
and never form a block densely.

A factor may be given as a vector ``d``: it is the diagonal matrix ``diag(d)`` in every
operation (products, powers, sums, log-determinants, the eigendecomposition, whose
eigenvalues are ``d`` with identity eigenvectors) and is stored without forming the matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from laplace.utils.factored_forms import kron_factored_form
from laplace.utils.precision import accumulation_dtype
from laplace.utils.utils import psd_eigh

__all__ = ["Kron", "KronDecomposed", "kron", "block_diag"]


def kron(t1: Tensor, t2: Tensor) -> Tensor:
    """Kronecker product of two matrices.

    Shapes:
        ``(p, q), (r, s) -> (p * r, q * s)``
    """
    rows, cols = t1.shape[0] * t2.shape[0], t1.shape[1] * t2.shape[1]
    return (t1[:, None, :, None] * t2[None, :, None, :]).reshape(rows, cols)


def block_diag(blocks: Sequence[Tensor]) -> Tensor:
    """Dense block-diagonal matrix of square or rectangular ``blocks``.

    Shapes:
        ``[(p_i, q_i)] -> (sum p_i, sum q_i)``

    Raises:
        ValueError: If ``blocks`` is empty.
    """
    if len(blocks) == 0:
        raise ValueError("blocks must contain at least one matrix, got an empty sequence")
    return torch.block_diag(*blocks)


def _as_scale(value: object, owner: str) -> float | Tensor:
    """A scalar multiplier as a Python float or a 0-d tensor.

    Negative numbers are rejected; the sign of a tensor is not checked (that would need a
    device synchronisation), and a negative tensor gives NaN factors for two-factor blocks.
    """
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a {owner} can only be scaled by a non-negative number, got {value}")
        return float(value)
    raise TypeError(
        f"a {owner} can only be multiplied by a number or a one-element tensor, "
        f"got {type(value).__name__}"
    )


def _block_numel(factors: Sequence[Tensor]) -> int:
    return math.prod(f.shape[0] for f in factors)


def _dense(factor: Tensor) -> Tensor:
    """A factor as a matrix: ``diag(d)`` for a vector ``d``."""
    return torch.diag(factor) if factor.ndim == 1 else factor


def _times(X: Tensor, factor: Tensor, dim: int) -> Tensor:
    """``X`` multiplied by ``factor`` along ``dim`` (``-1``: ``X F``; ``-2``: ``F^T X``)."""
    if factor.ndim == 1:
        return X * (factor if dim == -1 else factor[:, None])
    return X @ factor if dim == -1 else factor.mT @ X


def _right_multiply(W: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``W (F_0 ⊗ F_1)`` (or ``W F_0``) for the rows of ``W``, without forming the product.

    Shapes:
        ``(rows, p * q) -> (rows, p * q)``
    """
    if len(factors) == 1:
        return _times(W, factors[0], -1)
    first, second = factors
    X = W.reshape(W.shape[0], first.shape[0], second.shape[0])
    return _times(_times(X, first, -2), second, -1).reshape(W.shape)


def _rows(W: Tensor, n_params: int) -> Tensor:
    """View ``W`` of shape ``(params,)``, ``(k, params)`` or ``(batch, k, params)`` as rows."""
    if W.ndim not in (1, 2, 3) or W.shape[-1] != n_params:
        raise ValueError(
            f"W must have shape (params,), (k, params) or (batch, k, params) with "
            f"params={n_params}, got {tuple(W.shape)}"
        )
    return W.reshape(-1, n_params)


def _power(factor: Tensor, exponent: float) -> Tensor:
    """``F^exponent`` of a positive semi-definite factor (a vector stays a vector)."""
    if exponent == 1:
        return factor
    if factor.ndim == 1:
        return factor.clamp(min=0.0).pow(exponent)
    eigenvalues, eigenvectors = psd_eigh(factor)
    return (eigenvectors * eigenvalues.pow(exponent)) @ eigenvectors.mT


def _eigh(factor: Tensor) -> tuple[Tensor, Tensor]:
    """``(eigenvalues, eigenvectors)`` of a factor; a vector's are itself (clamped at zero,
    as :func:`psd_eigh` clamps) and the identity."""
    if factor.ndim == 1:
        eye = torch.eye(factor.shape[0], device=factor.device, dtype=factor.dtype)
        return factor.clamp(min=0.0), eye
    return psd_eigh(factor)


def _add_factors(first: Tensor, second: Tensor) -> Tensor:
    """Sum of two factors; a vector is a diagonal matrix (two vectors stay a vector)."""
    if first.ndim == second.ndim:
        return first + second
    return _dense(first) + _dense(second)


class Kron:
    """Block-diagonal matrix of Kronecker-factored blocks, one per parameter tensor.

    Args:
        kfacs: One list per block with one or two factors; ``[B, A]`` is ``B ⊗ A``. A factor
            is a square matrix or a vector ``d``, the diagonal matrix ``diag(d)``.

    Raises:
        ValueError: If there are no blocks, a block has no or more than two factors, or a
            factor is neither a square matrix nor a vector.
    """

    def __init__(self, kfacs: Sequence[Sequence[Tensor]]) -> None:
        self.kfacs = [list(factors) for factors in kfacs]
        if not self.kfacs:
            raise ValueError("kfacs must contain at least one block, got an empty list")
        for index, factors in enumerate(self.kfacs):
            if len(factors) not in (1, 2):
                raise ValueError(f"kfacs[{index}] must hold 1 or 2 factors, got {len(factors)}")
            for factor in factors:
                if factor.ndim == 1:
                    continue
                if factor.ndim != 2 or factor.shape[0] != factor.shape[1]:
                    raise ValueError(
                        f"kfacs[{index}] factors must be square matrices or vectors (diagonal "
                        f"matrices), got shape {tuple(factor.shape)}"
                    )

    @classmethod
    def init_from_model(
        cls,
        model_or_params: nn.Module | Iterable[Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Kron:
        """Zero factors for the trainable parameters of a model (or for given tensors).

        A parameter with two or more dimensions gets ``B`` of size ``shape[0]`` and ``A`` of
        size ``prod(shape[1:])``; any other parameter gets one ``(numel, numel)`` factor.

        Args:
            model_or_params: A module (parameters with ``requires_grad``) or tensors.
            device: Device of the factors (default: each parameter's).
            dtype: Dtype of the factors (default: each parameter's).

        Raises:
            ValueError: If there are no parameters.
        """
        if isinstance(model_or_params, nn.Module):
            params = [p for p in model_or_params.parameters() if p.requires_grad]
        else:
            params = list(model_or_params)
        if not params:
            raise ValueError("model_or_params must contain at least one parameter, got none")
        kfacs = []
        for p in params:
            sizes = [p.shape[0], math.prod(p.shape[1:])] if p.ndim >= 2 else [p.numel()]
            factor_device = p.device if device is None else device
            factor_dtype = p.dtype if dtype is None else dtype
            kfacs.append(
                [torch.zeros(n, n, device=factor_device, dtype=factor_dtype) for n in sizes]
            )
        return cls(kfacs)

    @property
    def sizes(self) -> list[int]:
        """Number of parameters of each block."""
        return [_block_numel(factors) for factors in self.kfacs]

    @property
    def n_params(self) -> int:
        """Side length of the whole matrix."""
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.kfacs)

    def __repr__(self) -> str:
        shapes = [[tuple(f.shape) for f in factors] for factors in self.kfacs]
        return f"Kron({shapes})"

    def _check_compatible(self, other: Kron) -> None:
        if len(other) != len(self):
            raise ValueError(f"cannot add a Kron with {len(other)} blocks to one with {len(self)}")
        for index, (mine, theirs) in enumerate(zip(self.kfacs, other.kfacs)):
            if [f.shape[0] for f in mine] != [f.shape[0] for f in theirs]:
                raise ValueError(
                    f"block {index} factor shapes differ: {[tuple(f.shape) for f in mine]} vs "
                    f"{[tuple(f.shape) for f in theirs]}"
                )

    def __add__(self, other: object) -> Kron:
        if isinstance(other, Kron):
            self._check_compatible(other)
            return Kron(
                [
                    [_add_factors(f, g) for f, g in zip(mine, theirs)]
                    for mine, theirs in zip(self.kfacs, other.kfacs)
                ]
            )
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return Kron([[f.clone() for f in factors] for factors in self.kfacs])
        raise TypeError(
            f"only a Kron (or 0) can be added to a Kron, got {type(other).__name__}; add a prior "
            "precision after .decompose() (KronDecomposed + prior)"
        )

    __radd__ = __add__

    def __iadd__(self, other: object) -> Kron:
        self.kfacs = (self + other).kfacs
        return self

    def __mul__(self, scalar: object) -> Kron:
        scale = _as_scale(scalar, "Kron")
        return Kron([[f * scale ** (1 / len(factors)) for f in factors] for factors in self.kfacs])

    __rmul__ = __mul__

    def __imul__(self, scalar: object) -> Kron:
        self.kfacs = (self * scalar).kfacs
        return self

    def decompose(self, damping: bool = False) -> KronDecomposed:
        """Eigendecompose every factor (with :func:`~laplace.utils.utils.psd_eigh`).

        Args:
            damping: Add deltas to the factors' eigenvalues (see :class:`KronDecomposed`).
        """
        eigenvectors, eigenvalues = [], []
        for factors in self.kfacs:
            pairs = [_eigh(f) for f in factors]
            eigenvalues.append([values for values, _ in pairs])
            eigenvectors.append([vectors for _, vectors in pairs])
        return KronDecomposed(eigenvectors, eigenvalues, damping=damping)

    def diag(self) -> Tensor:
        """Diagonal of the whole matrix, shape ``(params,)``."""
        diagonals = []
        for factors in self.kfacs:
            diagonal = [f if f.ndim == 1 else f.diagonal() for f in factors]
            if len(factors) == 1:
                diagonals.append(diagonal[0])
            else:
                diagonals.append(torch.outer(*diagonal).reshape(-1))
        return torch.cat(diagonals)

    def logdet(self) -> Tensor:
        """``log det`` of the whole matrix; ``log det(B ⊗ A) = a log det B + b log det A``."""
        total = 0.0
        for factors in self.kfacs:
            logdets = [f.log().sum() if f.ndim == 1 else torch.logdet(f) for f in factors]
            if len(factors) == 1:
                total = total + logdets[0]
            else:
                first, second = factors
                total = total + second.shape[0] * logdets[0] + first.shape[0] * logdets[1]
        return total

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """The dense matrix raised to ``exponent`` (factor powers by eigendecomposition).

        Shapes:
            ``-> (params, params)``
        """
        blocks = []
        for factors in self.kfacs:
            powers = [_dense(_power(f, exponent)) for f in factors]
            blocks.append(powers[0] if len(powers) == 1 else kron(*powers))
        return block_diag(blocks)

    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        """``W M^exponent`` for the rows of ``W``, never forming ``M``.

        Shapes:
            ``(params,)``, ``(k, params)`` or ``(batch, k, params)`` -> same shape

        Raises:
            ValueError: If the last dimension of ``W`` is not ``params``.
        """
        rows = _rows(W, self.n_params)
        chunks = rows.split(self.sizes, dim=-1)
        products = [
            _right_multiply(chunk, [_power(f, exponent) for f in factors])
            for chunk, factors in zip(chunks, self.kfacs)
        ]
        return torch.cat(products, dim=-1).reshape(W.shape)


class KronDecomposed:
    """Eigendecomposed :class:`Kron` plus one additive ``delta`` per block.

    A two-factor block with eigenvectors ``Q_0, Q_1`` and eigenvalues ``l_0, l_1`` is
    ``(Q_0 ⊗ Q_1) diag(l_0 ⊗ l_1) (Q_0 ⊗ Q_1)^T + delta I``; with ``damping=True`` its
    eigenvalues are ``(l_0 + sqrt(delta)) ⊗ (l_1 + sqrt(delta))`` instead. A one-factor block
    has eigenvalues ``l + delta`` either way. Every method is differentiable in the deltas
    and in a scale applied with ``*``.

    Args:
        eigenvectors: Per block, the eigenvector matrices of its factors.
        eigenvalues: Per block, the eigenvalue vectors of its factors.
        deltas: One value per block (default zeros).
        damping: Add the deltas to the factors' eigenvalues (see above).

    Raises:
        ValueError: If the lists or the deltas do not match.
    """

    def __init__(
        self,
        eigenvectors: Sequence[Sequence[Tensor]],
        eigenvalues: Sequence[Sequence[Tensor]],
        deltas: Tensor | None = None,
        damping: bool = False,
    ) -> None:
        self.eigenvectors = [list(vectors) for vectors in eigenvectors]
        self.eigenvalues = [list(values) for values in eigenvalues]
        if (
            not self.eigenvalues
            or len(self.eigenvectors) != len(self.eigenvalues)
            or any(
                len(v) != len(q) or len(v) not in (1, 2)
                for v, q in zip(self.eigenvalues, self.eigenvectors)
            )
        ):
            raise ValueError(
                "eigenvectors and eigenvalues must be non-empty lists of equal length with 1 or 2 "
                "factors per block"
            )
        reference = self.eigenvalues[0][0]
        if deltas is None:
            deltas = torch.zeros(len(self), device=reference.device, dtype=reference.dtype)
        if tuple(deltas.shape) != (len(self),):
            raise ValueError(f"deltas must have shape ({len(self)},), got {tuple(deltas.shape)}")
        self.deltas = deltas
        self.damping = bool(damping)

    def __len__(self) -> int:
        return len(self.eigenvalues)

    @property
    def sizes(self) -> list[int]:
        """Number of parameters of each block."""
        return [math.prod(v.shape[0] for v in values) for values in self.eigenvalues]

    @property
    def n_params(self) -> int:
        """Side length of the whole matrix."""
        return sum(self.sizes)

    def _replace(self, eigenvalues: list[list[Tensor]], deltas: Tensor) -> KronDecomposed:
        return KronDecomposed(self.eigenvectors, eigenvalues, deltas, self.damping)

    def __add__(self, deltas: object) -> KronDecomposed:
        if isinstance(deltas, (int, float)) and not isinstance(deltas, bool):
            deltas = torch.full_like(self.deltas, float(deltas))
        if not isinstance(deltas, Tensor):
            raise TypeError(
                "only a number or a tensor of deltas (prior precisions) can be added to a "
                f"KronDecomposed, got {type(deltas).__name__}"
            )
        if deltas.numel() not in (1, len(self)):
            raise ValueError(
                f"deltas added to a KronDecomposed must have 1 or {len(self)} (blocks) entries, "
                f"got {deltas.numel()}"
            )
        deltas = deltas.to(device=self.deltas.device, dtype=self.deltas.dtype).reshape(-1)
        return self._replace(self.eigenvalues, self.deltas + deltas)

    __radd__ = __add__

    def __mul__(self, scalar: object) -> KronDecomposed:
        scale = _as_scale(scalar, "KronDecomposed")
        eigenvalues = [
            [values * scale ** (1 / len(block)) for values in block] for block in self.eigenvalues
        ]
        return self._replace(eigenvalues, self.deltas * scale)

    __rmul__ = __mul__

    def detach(self) -> KronDecomposed:
        """A copy cut from the autograd graph."""
        return KronDecomposed(
            [[q.detach() for q in vectors] for vectors in self.eigenvectors],
            [[v.detach() for v in values] for values in self.eigenvalues],
            self.deltas.detach(),
            self.damping,
        )

    def to_kron(self) -> Kron:
        """The factors ``Q diag(l) Q^T`` again, for a decomposition without added deltas.

        Raises:
            ValueError: If deltas (a prior) were added.
        """
        if bool(self.deltas.ne(0).any()):
            raise ValueError(
                "to_kron needs a KronDecomposed without prior (zero deltas), as "
                "Kron.decompose() returns it; got one with a prior added"
            )
        return Kron(
            [
                [(Q * values) @ Q.mT for Q, values in zip(vectors, eigenvalues)]
                for vectors, eigenvalues in zip(self.eigenvectors, self.eigenvalues)
            ]
        )

    def _block_eigenvalues(self, index: int) -> Tensor:
        """Eigenvalues of block ``index`` in the order of ``Q_0 ⊗ Q_1``'s columns."""
        values, delta = self.eigenvalues[index], self.deltas[index]
        if len(values) == 1:
            return values[0] + delta
        if self.damping:
            root = delta.sqrt()
            return torch.outer(values[0] + root, values[1] + root).reshape(-1)
        return torch.outer(values[0], values[1]).reshape(-1) + delta

    def _blocks(self) -> Iterable[tuple[list[Tensor], Tensor]]:
        for index, vectors in enumerate(self.eigenvectors):
            yield vectors, self._block_eigenvalues(index)

    def logdet(self) -> Tensor:
        """``log det`` of the whole matrix, a scalar tensor."""
        return sum(values.log().sum() for _, values in self._blocks())

    def inv_square_form(self, Js: Tensor) -> Tensor:
        """``J M^-1 J^T`` per batch element, computed blockwise in the eigenbasis.

        Shapes:
            ``(batch, k, params) -> (batch, k, k)``

        Raises:
            ValueError: If ``Js`` does not have three dimensions ending in ``params``.
        """
        if Js.ndim != 3:
            raise ValueError(f"Js must have shape (batch, k, params), got {tuple(Js.shape)}")
        batch, k = Js.shape[:2]
        chunks = _rows(Js, self.n_params).split(self.sizes, dim=-1)
        result = Js.new_zeros(batch, k, k)
        for chunk, (vectors, values) in zip(chunks, self._blocks()):
            rotated = _right_multiply(chunk, vectors).reshape(batch, k, -1)
            result = result + torch.einsum("bkp,blp,p->bkl", rotated, rotated, 1 / values)
        return result

    def inv_bilinear_form(self, A: Tensor, B: Tensor) -> Tensor:
        """``A M^-1 B^T`` for two sets of rows, blockwise in the eigenbasis: both sets are
        rotated and the weighted products summed, never rotating back (the error of
        :meth:`inv_square_form`, without cancellation from a back-rotation).

        Shapes:
            ``A (n, params), B (m, params) -> (n, m)``
        """
        result = A.new_zeros(A.shape[0], B.shape[0])
        chunks = zip(A.split(self.sizes, dim=-1), B.split(self.sizes, dim=-1))
        for (a, b), (vectors, values) in zip(chunks, self._blocks()):
            rotated_a = _right_multiply(a, vectors).reshape(a.shape[0], -1)
            rotated_b = _right_multiply(b, vectors).reshape(b.shape[0], -1)
            result = result + (rotated_a / values) @ rotated_b.mT
        return result

    def inv_square_form_factored(
        self, factors: Sequence[tuple[Tensor | tuple[Tensor, ...], ...]]
    ) -> Tensor:
        """``J M^-1 J^T`` per batch element from Kronecker-factored Jacobians (see
        :func:`~laplace.utils.factored_forms.kron_factored_form`).

        Shapes:
            ``-> (batch, k, k)``
        """
        return kron_factored_form(self, factors)

    def _bias_shares_rotation(
        self, factors: Sequence[tuple[Tensor | tuple[Tensor, ...], ...]], index: int
    ) -> bool:
        """Whether block ``index + 1`` is a bias with the output gradients of the linear
        weight ``index`` and the eigenvectors of its output factor (as K-FAC gives them: the
        same ``sum g g^T``), so that both share one rotation of the gradients."""
        following = index + 1
        return (
            following < len(self)
            and len(self.eigenvectors[following]) == 1
            and factors[following][0] is factors[index][0]
            and torch.equal(self.eigenvectors[following][0], self.eigenvectors[index][0])
        )

    def bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        """``W M^exponent`` for the rows of ``W``, never forming ``M``.

        With ``exponent=-0.5`` and standard normal rows this samples ``N(0, M^-1)``.

        Shapes:
            ``(params,)``, ``(k, params)`` or ``(batch, k, params)`` -> same shape
        """
        chunks = _rows(W, self.n_params).split(self.sizes, dim=-1)
        products = []
        for chunk, (vectors, values) in zip(chunks, self._blocks()):
            rotated = _right_multiply(chunk, vectors) * values.pow(exponent)
            products.append(_right_multiply(rotated, [q.mT for q in vectors]))
        return torch.cat(products, dim=-1).reshape(W.shape)

    def diag(self, exponent: float = 1) -> Tensor:
        """Diagonal of ``M^exponent``, shape ``(params,)``, without forming ``M``."""
        diagonals = []
        for vectors, values in self._blocks():
            powered = values.pow(exponent)
            if len(vectors) == 1:
                diagonals.append(vectors[0].square() @ powered)
            else:
                first, second = (q.square() for q in vectors)
                grid = powered.reshape(first.shape[0], second.shape[0])
                diagonals.append((first @ grid @ second.mT).reshape(-1))
        return torch.cat(diagonals)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """Dense ``M^exponent``, formed in the accumulation precision and returned in the
        dtype of the decomposition (:mod:`laplace.utils.precision`: a float32 sum of
        ``params`` products would leave ``eps * lambda_max`` in every direction).

        Shapes:
            ``-> (params, params)``
        """
        blocks = []
        for vectors, values in self._blocks():
            dtype = accumulation_dtype(values.dtype, values.device)
            vectors = [q.to(dtype) for q in vectors]
            basis = vectors[0] if len(vectors) == 1 else kron(*vectors)
            powered = values.to(dtype).pow(exponent)
            blocks.append(((basis * powered) @ basis.mT).to(values.dtype))
        return block_diag(blocks)
