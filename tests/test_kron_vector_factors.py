"""``Kron`` with factors given as vectors: each is the diagonal matrix of its entries.

Ground truth: the same ``Kron`` with every vector replaced by ``torch.diag(vector)``, and the
dense block-diagonal matrix built from explicit Kronecker products (float64).
"""

from __future__ import annotations

import pytest
import torch

from laplace.posterior.kron import KronCurvature
from laplace.utils.matrix import Kron, block_diag, kron


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g)
    return A @ A.T + 0.5 * torch.eye(n)


def _positive(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) + 0.25


LAYOUTS = {
    "vector-single": [[_positive(3, 0)]],
    "vector-second": [[_spd(2, 1), _positive(3, 2)], [_positive(2, 3)]],
    "vector-first": [[_positive(2, 4), _spd(3, 5)], [_spd(2, 6)]],
    "both-vectors": [[_positive(2, 7), _positive(4, 8)], [_positive(2, 9)]],
}


def _dense_kron(kfacs: list[list[torch.Tensor]]) -> Kron:
    return Kron([[torch.diag(f) if f.ndim == 1 else f for f in block] for block in kfacs])


def _dense_matrix(kfacs: list[list[torch.Tensor]]) -> torch.Tensor:
    blocks = []
    for block in kfacs:
        dense = [torch.diag(f) if f.ndim == 1 else f for f in block]
        blocks.append(dense[0] if len(dense) == 1 else kron(*dense))
    return block_diag(blocks)


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS))
def kfacs(request):
    return [list(block) for block in LAYOUTS[request.param]]


def test_to_matrix_diag_and_logdet(kfacs):
    M = _dense_matrix(kfacs)
    K = Kron(kfacs)
    torch.testing.assert_close(K.to_matrix(), M)
    torch.testing.assert_close(K.diag(), M.diagonal())
    torch.testing.assert_close(K.logdet(), torch.logdet(M))
    for exponent in (-1.0, 0.5):
        torch.testing.assert_close(K.to_matrix(exponent), _dense_kron(kfacs).to_matrix(exponent))
    assert all(f.ndim == 1 for f, g in zip(K.kfacs[0], kfacs[0]) if g.ndim == 1)  # kept as is


def test_bmm(kfacs):
    M = _dense_matrix(kfacs)
    g = torch.Generator().manual_seed(10)
    for shape in [(M.shape[0],), (3, M.shape[0]), (2, 3, M.shape[0])]:
        W = torch.randn(shape, generator=g)
        torch.testing.assert_close(Kron(kfacs).bmm(W), W @ M)
        inverse = torch.linalg.inv(M)
        torch.testing.assert_close(Kron(kfacs).bmm(W, exponent=-1), W @ inverse)


def test_sum_with_dense_and_vector_factors_and_scaling(kfacs):
    other = [[_spd(f.shape[0], 20 + i) for i, f in enumerate(block)] for block in kfacs]
    M, N = _dense_matrix(kfacs), _dense_matrix(other)
    # K-FAC sums add factors blockwise, so compare with the dense kron of summed factors
    summed = [[_dense_matrix([[f]]) + g for f, g in zip(a, b)] for a, b in zip(kfacs, other)]
    torch.testing.assert_close((Kron(kfacs) + Kron(other)).to_matrix(), _dense_matrix(summed))
    torch.testing.assert_close((Kron(other) + Kron(kfacs)).to_matrix(), _dense_matrix(summed))
    doubled = _dense_matrix([[2 * f for f in block] for block in kfacs])
    torch.testing.assert_close((Kron(kfacs) + Kron(kfacs)).to_matrix(), doubled)
    torch.testing.assert_close((Kron(kfacs) * 3.0).to_matrix(), 3.0 * M)
    torch.testing.assert_close((0.5 * Kron(kfacs)).to_matrix(), 0.5 * M)
    assert not torch.equal(M, N)


def test_decompose_uses_the_vector_as_eigenvalues(kfacs):
    M = _dense_matrix(kfacs)
    decomposed = Kron(kfacs).decompose()
    for block, values, vectors in zip(kfacs, decomposed.eigenvalues, decomposed.eigenvectors):
        for factor, value, vector in zip(block, values, vectors):
            if factor.ndim == 1:
                torch.testing.assert_close(value, factor)
                torch.testing.assert_close(vector, torch.eye(factor.shape[0]))
    torch.testing.assert_close(decomposed.to_matrix(), M)
    torch.testing.assert_close(decomposed.logdet(), torch.logdet(M))
    prior = torch.tensor(0.7)
    with_prior = decomposed + prior
    P = M + prior * torch.eye(M.shape[0])
    torch.testing.assert_close(with_prior.logdet(), torch.logdet(P))
    torch.testing.assert_close(with_prior.diag(-1), torch.linalg.inv(P).diagonal())
    Js = torch.randn(4, 2, M.shape[0], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(with_prior.inv_square_form(Js), Js @ torch.linalg.inv(P) @ Js.mT)
    torch.testing.assert_close(decomposed.to_kron().to_matrix(), M)


def test_curvature_adds_a_vector_factor_as_its_diagonal():
    params = [torch.zeros(2, 3), torch.zeros(2)]
    curvature = KronCurvature.zeros(params)
    batch = [[_spd(2, 30), _positive(3, 31)], [_positive(2, 32)]]
    curvature.add_(Kron(batch))
    curvature.add_(Kron(batch))
    expected = _dense_matrix([[2 * f for f in block] for block in batch])
    torch.testing.assert_close(curvature.H.to_matrix(), expected)


def test_bad_factor_shapes_are_rejected():
    with pytest.raises(ValueError, match="square matrices or vectors"):
        Kron([[torch.ones(2, 3)]])
    with pytest.raises(ValueError, match="square matrices or vectors"):
        Kron([[torch.tensor(1.0)]])
    with pytest.raises(ValueError, match="factor shapes differ"):
        Kron([[torch.ones(2)]]) + Kron([[torch.eye(3)]])


def test_float32_vector_factors_agree_with_float64_truth(kfacs):
    """float32 factors: the log-determinant of a ~10-parameter matrix with entries of size ~1
    is within ~1e-5 relative (float32 eigendecomposition round-off, ``eps * cond``, with
    condition numbers below ~50 here), products within 1e-5 too."""
    single = [[f.float() for f in block] for block in kfacs]
    M = _dense_matrix(kfacs)
    K = Kron(single)
    torch.testing.assert_close(K.logdet().double(), torch.logdet(M), rtol=1e-5, atol=1e-5)
    W = torch.randn(3, M.shape[0], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(K.bmm(W.float()).double(), W @ M, rtol=1e-5, atol=1e-5)
    decomposed = K.decompose() + torch.tensor(0.5)
    P = M + 0.5 * torch.eye(M.shape[0])
    torch.testing.assert_close(decomposed.logdet().double(), torch.logdet(P), rtol=1e-5, atol=1e-5)
    assert decomposed.eigenvalues[0][0].dtype == torch.float32
