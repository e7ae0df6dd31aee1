"""Kron and KronDecomposed against dense float64 ground truth built with torch.kron."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import make_cnn, make_mlp
from torch import nn
from torch.autograd import gradcheck

from laplace.utils.matrix import Kron, KronDecomposed, block_diag, kron

# Block structures: factor sizes per block (two factors = Kronecker product).
STRUCTURES = {
    "two-blocks": [(3, 4), (5,)],
    "mixed": [(2, 3), (4,), (3, 2), (1,)],
    "single-kron": [(3, 3)],
}
EXPONENTS = [1, -1, -0.5]


def _spd(n: int, generator: torch.Generator, shift: float = 0.5) -> torch.Tensor:
    A = torch.randn(n, n, generator=generator)
    return A @ A.T / n + shift * torch.eye(n)


def _random_kron(structure: list[tuple[int, ...]], seed: int = 0) -> Kron:
    g = torch.Generator().manual_seed(seed)
    return Kron([[_spd(n, g) for n in block] for block in structure])


def _dense(K: Kron) -> torch.Tensor:
    blocks = [f[0] if len(f) == 1 else torch.kron(f[0], f[1]) for f in K.kfacs]
    return torch.block_diag(*blocks)


def _dense_power(M: torch.Tensor, exponent: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(M)
    return vectors @ torch.diag(values**exponent) @ vectors.T


def _dense_decomposed(K: Kron, deltas: torch.Tensor, damping: bool) -> torch.Tensor:
    """``block_diag`` of the factors' Kronecker product plus the deltas, built densely."""
    blocks = []
    for factors, delta in zip(K.kfacs, deltas):
        if len(factors) == 1:
            blocks.append(factors[0] + delta * torch.eye(factors[0].shape[0]))
        elif damping:
            damped = [f + delta.sqrt() * torch.eye(f.shape[0]) for f in factors]
            blocks.append(torch.kron(*damped))
        else:
            product = torch.kron(*factors)
            blocks.append(product + delta * torch.eye(product.shape[0]))
    return torch.block_diag(*blocks)


def _deltas(K: Kron, layerwise: bool) -> torch.Tensor:
    if layerwise:
        return torch.linspace(0.3, 1.7, len(K))
    return torch.full((len(K),), 0.8)


def _w_of_shape(shape_id: str, n_params: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"vector": (n_params,), "matrix": (4, n_params), "batch": (3, 2, n_params)}[shape_id]
    return torch.randn(shape, generator=g)


# ----------------------------------------------------------------------------- kron, block_diag
def test_kron_matches_torch_kron_for_rectangular_matrices():
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(2, 3, generator=g), torch.randn(4, 5, generator=g)
    torch.testing.assert_close(kron(t1, t2), torch.kron(t1, t2))


def test_block_diag_matches_torch_and_rejects_empty():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(2, 2, generator=g), torch.randn(3, 1, generator=g)]
    torch.testing.assert_close(block_diag(blocks), torch.block_diag(*blocks))
    with pytest.raises(ValueError, match="at least one"):
        block_diag([])


# ----------------------------------------------------------------------------- Kron
@pytest.mark.parametrize("structure", STRUCTURES.values(), ids=STRUCTURES.keys())
@pytest.mark.parametrize("exponent", EXPONENTS, ids=lambda e: f"exp={e}")
def test_kron_to_matrix(structure, exponent):
    K = _random_kron(structure)
    expected = _dense_power(_dense(K), exponent)
    torch.testing.assert_close(K.to_matrix(exponent=exponent), expected)


@pytest.mark.parametrize("structure", STRUCTURES.values(), ids=STRUCTURES.keys())
def test_kron_diag_logdet_len_and_sizes(structure):
    K = _random_kron(structure)
    M = _dense(K)
    torch.testing.assert_close(K.diag(), M.diagonal())
    torch.testing.assert_close(K.logdet(), torch.logdet(M))
    assert len(K) == len(structure)
    assert K.n_params == M.shape[0]


@pytest.mark.parametrize("shape_id", ["vector", "matrix", "batch"])
@pytest.mark.parametrize("exponent", EXPONENTS, ids=lambda e: f"exp={e}")
def test_kron_bmm(shape_id, exponent):
    K = _random_kron(STRUCTURES["mixed"])
    W = _w_of_shape(shape_id, K.n_params)
    result = K.bmm(W, exponent=exponent)
    assert result.shape == W.shape
    torch.testing.assert_close(result, W @ _dense_power(_dense(K), exponent))


def test_kron_bmm_rejects_wrong_width():
    K = _random_kron(STRUCTURES["mixed"])
    with pytest.raises(ValueError, match="params="):
        K.bmm(torch.ones(2, K.n_params + 1))


def test_kron_add_sums_factors_blockwise():
    K1, K2 = _random_kron(STRUCTURES["mixed"], 0), _random_kron(STRUCTURES["mixed"], 1)
    total = K1 + K2
    for f_sum, f1, f2 in zip(total.kfacs, K1.kfacs, K2.kfacs):
        for a, b, c in zip(f_sum, f1, f2):
            torch.testing.assert_close(a, b + c)


def test_kron_iadd_updates_the_object():
    K1, K2 = _random_kron(STRUCTURES["mixed"], 0), _random_kron(STRUCTURES["mixed"], 1)
    expected = (K1 + K2).to_matrix()
    alias = K1
    K1 += K2
    assert alias is K1
    torch.testing.assert_close(K1.to_matrix(), expected)


def test_kron_zero_plus_kron_is_a_copy_and_sum_works():
    K1, K2 = _random_kron(STRUCTURES["two-blocks"], 0), _random_kron(STRUCTURES["two-blocks"], 1)
    copy = 0 + K1
    copy.kfacs[0][0].add_(1.0)
    assert not torch.equal(copy.kfacs[0][0], K1.kfacs[0][0])
    torch.testing.assert_close((K1 + 0).to_matrix(), K1.to_matrix())
    torch.testing.assert_close(sum([K1, K2]).kfacs[1][0], K1.kfacs[1][0] + K2.kfacs[1][0])


@pytest.mark.parametrize("other", [1.0, torch.tensor(0.5)], ids=["float", "tensor"])
def test_kron_add_scalar_raises_type_error(other):
    K = _random_kron(STRUCTURES["two-blocks"])
    with pytest.raises(TypeError, match=r"only a Kron \(or 0\).*decompose"):
        K + other


def test_kron_add_incompatible_raises():
    K1, K2 = _random_kron([(3, 4), (5,)]), _random_kron([(3, 4), (4,)])
    with pytest.raises(ValueError, match="block 1"):
        K1 + K2
    with pytest.raises(ValueError, match="blocks"):
        K1 + _random_kron([(3, 4)])


@pytest.mark.parametrize("scalar", [2.5, torch.tensor(2.5)], ids=["float", "tensor"])
def test_kron_mul_scales_the_matrix(scalar):
    K = _random_kron(STRUCTURES["mixed"])
    expected = 2.5 * _dense(K)
    torch.testing.assert_close((K * scalar).to_matrix(), expected)
    torch.testing.assert_close((scalar * K).to_matrix(), expected)
    K *= scalar
    torch.testing.assert_close(K.to_matrix(), expected)


def test_kron_mul_rejects_bad_scalars():
    K = _random_kron(STRUCTURES["mixed"])
    with pytest.raises(ValueError, match="non-negative"):
        K * -1.0
    with pytest.raises(TypeError, match="number"):
        K * "2"
    with pytest.raises(TypeError, match="number"):
        K * torch.ones(2)


@pytest.mark.parametrize(
    "kfacs, match",
    [
        ([[torch.eye(2)] * 3], "1 or 2 factors"),
        ([[]], "1 or 2 factors"),
        ([[torch.ones(2, 3)]], "square"),
        ([], "at least one block"),
    ],
    ids=["three-factors", "no-factors", "not-square", "no-blocks"],
)
def test_kron_constructor_errors(kfacs, match):
    with pytest.raises(ValueError, match=match):
        Kron(kfacs)


def test_kron_is_picklable():
    K = _random_kron(STRUCTURES["mixed"])
    restored = pickle.loads(pickle.dumps(K))
    torch.testing.assert_close(restored.to_matrix(), K.to_matrix())


# ----------------------------------------------------------------------------- init_from_model
def test_init_from_model_mlp_shapes():
    K = Kron.init_from_model(make_mlp(n_in=3, n_hidden=5, n_out=2), "cpu", torch.float64)
    shapes = [[tuple(f.shape) for f in factors] for factors in K.kfacs]
    assert shapes == [[(5, 5), (3, 3)], [(5, 5)], [(2, 2), (5, 5)], [(2, 2)]]
    assert all(f.abs().sum() == 0 for factors in K.kfacs for f in factors)
    assert K.n_params == sum(p.numel() for p in make_mlp().parameters())


def test_init_from_model_cnn_shapes():
    K = Kron.init_from_model(make_cnn(n_out=3), "cpu", torch.float64)
    shapes = [[tuple(f.shape) for f in factors] for factors in K.kfacs]
    assert shapes == [[(2, 2), (9, 9)], [(2, 2)], [(3, 3), (32, 32)], [(3, 3)]]


def test_init_from_model_skips_frozen_and_sets_dtype():
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    K = Kron.init_from_model(model, "cpu", torch.float32)
    assert len(K) == 3
    assert all(f.dtype == torch.float32 for factors in K.kfacs for f in factors)


def test_init_from_params_iterable():
    params = [torch.zeros(4, 2, 3), torch.zeros(7), torch.zeros(())]
    K = Kron.init_from_model(params)
    shapes = [[tuple(f.shape) for f in factors] for factors in K.kfacs]
    assert shapes == [[(4, 4), (6, 6)], [(7, 7)], [(1, 1)]]
    with pytest.raises(ValueError, match="at least one"):
        Kron.init_from_model(nn.Sequential(nn.ReLU()))


# ----------------------------------------------------------------------------- KronDecomposed
@pytest.mark.parametrize("structure", STRUCTURES.values(), ids=STRUCTURES.keys())
def test_decompose_reproduces_the_matrix(structure):
    K = _random_kron(structure)
    KD = K.decompose()
    assert len(KD) == len(K)
    assert [len(v) for v in KD.eigenvalues] == [len(b) for b in structure]
    torch.testing.assert_close(KD.to_matrix(), _dense(K))
    torch.testing.assert_close(KD.deltas, torch.zeros(len(K)))
    for got, want in zip(KD.to_kron().kfacs, K.kfacs):  # factors back from the decomposition
        for F, G in zip(got, want):
            torch.testing.assert_close(F, G)
    with pytest.raises(ValueError, match="without prior"):
        (KD + 1.0).to_kron()


@pytest.mark.parametrize("damping", [False, True], ids=["plain", "damped"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["scalar", "layerwise"])
@pytest.mark.parametrize("exponent", EXPONENTS, ids=lambda e: f"exp={e}")
def test_decomposed_to_matrix_and_diag(damping, layerwise, exponent):
    K = _random_kron(STRUCTURES["mixed"])
    deltas = _deltas(K, layerwise)
    KD = K.decompose(damping=damping) + (deltas if layerwise else 0.8)
    expected = _dense_power(_dense_decomposed(K, deltas, damping), exponent)
    torch.testing.assert_close(KD.to_matrix(exponent=exponent), expected)
    torch.testing.assert_close(KD.diag(exponent=exponent), expected.diagonal())


@pytest.mark.parametrize("damping", [False, True], ids=["plain", "damped"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["scalar", "layerwise"])
def test_decomposed_logdet_and_inv_square_form(damping, layerwise):
    K = _random_kron(STRUCTURES["mixed"])
    deltas = _deltas(K, layerwise)
    KD = K.decompose(damping=damping) + deltas
    M = _dense_decomposed(K, deltas, damping)
    torch.testing.assert_close(KD.logdet(), torch.logdet(M))
    Js = _w_of_shape("batch", K.n_params)
    torch.testing.assert_close(KD.inv_square_form(Js), Js @ torch.linalg.inv(M) @ Js.mT)


@pytest.mark.parametrize("shape_id", ["vector", "matrix", "batch"])
@pytest.mark.parametrize("exponent", EXPONENTS, ids=lambda e: f"exp={e}")
@pytest.mark.parametrize("damping", [False, True], ids=["plain", "damped"])
def test_decomposed_bmm(shape_id, exponent, damping):
    K = _random_kron(STRUCTURES["mixed"])
    deltas = _deltas(K, layerwise=True)
    KD = K.decompose(damping=damping) + deltas
    W = _w_of_shape(shape_id, K.n_params)
    result = KD.bmm(W, exponent=exponent)
    assert result.shape == W.shape
    expected = W @ _dense_power(_dense_decomposed(K, deltas, damping), exponent)
    torch.testing.assert_close(result, expected)


def test_decomposed_add_returns_new_object_and_accepts_shapes():
    K = _random_kron(STRUCTURES["mixed"])
    KD = K.decompose()
    for prior in [0.5, torch.tensor(0.5), torch.tensor([0.5]), torch.full((len(K),), 0.5)]:
        added = KD + prior
        assert added is not KD
        torch.testing.assert_close(added.deltas, torch.full((len(K),), 0.5))
    torch.testing.assert_close(KD.deltas, torch.zeros(len(K)))
    torch.testing.assert_close((0.5 + KD).deltas, torch.full((len(K),), 0.5))


def test_decomposed_add_errors():
    KD = _random_kron(STRUCTURES["mixed"]).decompose()
    with pytest.raises(ValueError, match="1 or 4"):
        KD + torch.ones(3)
    with pytest.raises(TypeError, match="number or a tensor"):
        KD + "1"


@pytest.mark.parametrize("damping", [False, True], ids=["plain", "damped"])
def test_decomposed_mul_scales_the_whole_matrix(damping):
    K = _random_kron(STRUCTURES["mixed"])
    deltas = _deltas(K, layerwise=True)
    KD = K.decompose(damping=damping) + deltas
    expected = 3.0 * _dense_decomposed(K, deltas, damping)
    torch.testing.assert_close((KD * 3.0).to_matrix(), expected)
    torch.testing.assert_close((torch.tensor(3.0) * KD).to_matrix(), expected)
    torch.testing.assert_close((KD * 3.0).deltas, 3.0 * deltas)


def test_decomposed_constructor_errors():
    K = _random_kron(STRUCTURES["two-blocks"]).decompose()
    with pytest.raises(ValueError, match="deltas must have shape"):
        KronDecomposed(K.eigenvectors, K.eigenvalues, deltas=torch.zeros(3))
    with pytest.raises(ValueError, match="equal length"):
        KronDecomposed(K.eigenvectors, K.eigenvalues[:1])
    with pytest.raises(ValueError, match="non-empty"):
        KronDecomposed([], [])


def test_decomposed_inv_square_form_rejects_2d():
    KD = _random_kron(STRUCTURES["two-blocks"]).decompose() + 1.0
    with pytest.raises(ValueError, match="batch, k, params"):
        KD.inv_square_form(torch.ones(2, KD.n_params))


@pytest.mark.parametrize("damping", [False, True], ids=["plain", "damped"])
def test_gradcheck_logdet_and_inv_square_form(damping):
    K = _random_kron([(2, 3), (2,)])
    KD = K.decompose(damping=damping)
    Js = _w_of_shape("batch", K.n_params)
    deltas = torch.tensor([0.7, 1.3], requires_grad=True)
    scale = torch.tensor(1.7, requires_grad=True)
    assert gradcheck(lambda d, s: (KD * s + d).logdet(), (deltas, scale))
    assert gradcheck(lambda d, s: (KD * s + d).inv_square_form(Js), (deltas, scale))
    assert gradcheck(lambda d, s: (KD * s + d).bmm(Js, exponent=-0.5), (deltas, scale))


def test_gradients_match_dense_autograd():
    K = _random_kron(STRUCTURES["mixed"])
    deltas = torch.linspace(0.3, 1.2, len(K), requires_grad=True)
    (K.decompose() * 2.0 + deltas).logdet().backward()
    dense_deltas = deltas.detach().clone().requires_grad_(True)
    per_param = dense_deltas.repeat_interleave(torch.tensor(K.sizes))
    torch.logdet(2.0 * _dense(K) + torch.diag(per_param)).backward()
    torch.testing.assert_close(deltas.grad, dense_deltas.grad)


def test_detach_cuts_the_graph():
    KD = _random_kron(STRUCTURES["two-blocks"]).decompose()
    deltas = torch.ones(2, requires_grad=True)
    attached = KD + deltas
    assert attached.logdet().requires_grad
    detached = attached.detach()
    assert not detached.logdet().requires_grad
    torch.testing.assert_close(detached.to_matrix(), attached.to_matrix().detach())


def test_decomposed_is_picklable():
    KD = _random_kron(STRUCTURES["mixed"]).decompose(damping=True) + 0.4
    restored = pickle.loads(pickle.dumps(KD))
    assert restored.damping
    torch.testing.assert_close(restored.to_matrix(), KD.to_matrix())


def test_float32_stays_float32():
    K = _random_kron(STRUCTURES["mixed"])
    K32 = Kron([[f.float() for f in factors] for factors in K.kfacs])
    KD = K32.decompose() + 1.0
    W = torch.ones(2, 3, K.n_params, dtype=torch.float32)
    outputs = [K32.bmm(W), K32.diag(), KD.logdet(), KD.inv_square_form(W), KD.bmm(W), KD.diag()]
    assert all(out.dtype == torch.float32 for out in outputs)
