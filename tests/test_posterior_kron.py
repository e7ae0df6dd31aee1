"""KronCurvature and KronPosterior against dense float64 matrices."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp
from torch.autograd import gradcheck

import laplace.utils.matrix as matrix_module
from laplace.posterior.kron import KronCurvature, KronPosterior
from laplace.utils.enums import HessianStructure
from laplace.utils.matrix import Kron, KronDecomposed

PRIORS = {
    "scalar": torch.tensor([0.7]),
    "layerwise": torch.tensor([0.5, 1.5, 0.9, 2.0]),
}


def _params() -> list[torch.Tensor]:
    return [p for p in make_mlp(n_in=3, n_hidden=4, n_out=2).parameters()]


def _random_kron_like(curvature: KronCurvature, seed: int) -> Kron:
    g = torch.Generator().manual_seed(seed)
    kfacs = []
    for factors in curvature.H.kfacs:
        block = []
        for f in factors:
            A = torch.randn(f.shape[0], f.shape[0] + 2, generator=g)
            block.append(A @ A.T / f.shape[0])
        kfacs.append(block)
    return Kron(kfacs)


def _fitted(damping: bool = False) -> KronCurvature:
    curvature = KronCurvature.zeros(_params(), damping=damping)
    curvature.add_(_random_kron_like(curvature, seed=0))
    curvature.add_(_random_kron_like(curvature, seed=1))
    return curvature


def _dense_H(curvature: KronCurvature) -> torch.Tensor:
    blocks = [f[0] if len(f) == 1 else torch.kron(*f) for f in curvature.H.kfacs]
    return torch.block_diag(*blocks)


def _dense_posterior(curvature: KronCurvature, prior: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor * H + prior`` built densely; damping adds ``sqrt`` of the delta to factors."""
    blocks = []
    deltas = prior.expand(len(curvature.H))
    for factors, delta in zip(curvature.H.kfacs, deltas):
        if len(factors) == 2 and curvature.damping:
            damped = [factor**0.5 * f + delta.sqrt() * torch.eye(f.shape[0]) for f in factors]
            blocks.append(torch.kron(*damped))
        else:
            block = factor * (factors[0] if len(factors) == 1 else torch.kron(*factors))
            blocks.append(block + delta * torch.eye(block.shape[0]))
    return torch.block_diag(*blocks)


@pytest.fixture(params=[False, True], ids=["plain", "damped"])
def damping(request) -> bool:
    return request.param


@pytest.fixture(params=list(PRIORS), ids=list(PRIORS))
def prior(request) -> torch.Tensor:
    return PRIORS[request.param]


@pytest.fixture
def setup(damping, prior):
    curvature = _fitted(damping)
    factor = 1.3
    posterior = curvature.with_prior(prior, torch.tensor(factor))
    return posterior, _dense_posterior(curvature, prior, factor)


# ----------------------------------------------------------------------------- KronPosterior
def test_to_dense_and_precision(setup):
    posterior, P = setup
    torch.testing.assert_close(posterior.to_dense(), P)
    assert isinstance(posterior.precision(), KronDecomposed)
    torch.testing.assert_close(posterior.precision().to_matrix(), P)


def test_logdet(setup):
    posterior, P = setup
    torch.testing.assert_close(posterior.logdet(), torch.logdet(P))


def test_quad(setup):
    posterior, P = setup
    v = torch.randn(5, P.shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(posterior.quad(v), torch.einsum("np,pq,nq->n", v, P, v))
    torch.testing.assert_close(posterior.quad(v[0]), v[0] @ P @ v[0])


def test_inv_quad_and_joint(setup):
    posterior, P = setup
    Js = torch.randn(4, 2, P.shape[0], generator=torch.Generator().manual_seed(1))
    P_inv = torch.linalg.inv(P)
    torch.testing.assert_close(posterior.inv_quad(Js), Js @ P_inv @ Js.mT)
    rows = Js.reshape(-1, P.shape[0])
    torch.testing.assert_close(posterior.inv_quad_joint(rows), rows @ P_inv @ rows.T)


def test_covariance_scale_variance(setup):
    posterior, P = setup
    P_inv = torch.linalg.inv(P)
    torch.testing.assert_close(posterior.covariance(), P_inv)
    scale = posterior.scale()
    torch.testing.assert_close(scale @ scale.T, P_inv)
    torch.testing.assert_close(posterior.variance(), P_inv.diagonal())


def test_sample_covariance(setup):
    posterior, P = setup
    samples = posterior.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (200_000, P.shape[0])
    assert samples.dtype == P.dtype
    empirical = samples.T @ samples / samples.shape[0]
    P_inv = torch.linalg.inv(P)
    scale = P_inv.diagonal().sqrt()
    torch.testing.assert_close(
        empirical / torch.outer(scale, scale),
        P_inv / torch.outer(scale, scale),
        atol=0.012,
        rtol=0,
    )
    first = posterior.sample(10, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        posterior.sample(10, generator=torch.Generator().manual_seed(3)), first
    )


def test_gradients_in_prior_and_factor(damping):
    curvature = _fitted(damping)
    Js = torch.randn(2, 2, curvature.n_params, generator=torch.Generator().manual_seed(2))
    prior = torch.tensor([0.5, 1.5, 0.9, 2.0], requires_grad=True)
    factor = torch.tensor(1.3, requires_grad=True)
    assert gradcheck(lambda p, s: curvature.with_prior(p, s).logdet(), (prior, factor))
    assert gradcheck(lambda p, s: curvature.with_prior(p, s).inv_quad(Js), (prior, factor))


# ----------------------------------------------------------------------------- KronCurvature
def test_zeros_and_public():
    params = _params()
    curvature = KronCurvature.zeros(params)
    assert curvature.structure == HessianStructure.KRON
    assert curvature.sizes == [p.numel() for p in params]
    assert curvature.n_params == sum(p.numel() for p in params)
    assert isinstance(curvature.public(), Kron)
    torch.testing.assert_close(
        curvature.to_dense(), torch.zeros(curvature.n_params, curvature.n_params)
    )


def test_add_accumulates_factor_sums():
    curvature = KronCurvature.zeros(_params())
    first, second = _random_kron_like(curvature, 0), _random_kron_like(curvature, 1)
    curvature.add_(first)
    curvature.add_(second)
    torch.testing.assert_close(curvature.to_dense(), (first + second).to_matrix())
    torch.testing.assert_close(curvature.to_dense(), _dense_H(curvature))


def test_add_errors():
    curvature = KronCurvature.zeros(_params())
    with pytest.raises(TypeError, match="Kron"):
        curvature.add_(torch.zeros(3, 3))
    other = KronCurvature.zeros(list(make_mlp(n_in=2).parameters()))
    with pytest.raises(ValueError, match="block 0"):
        curvature.add_(other.public())


def test_per_parameter_prior_is_rejected():
    curvature = _fitted()
    with pytest.raises(ValueError, match="scalar or layerwise"):
        curvature.with_prior(torch.ones(curvature.n_params), torch.tensor(1.0))


def test_with_prior_reuses_the_cached_decomposition(monkeypatch):
    curvature = _fitted()
    calls = []
    original = matrix_module.psd_eigh

    def counting_symeig(M):
        calls.append(M.shape)
        return original(M)

    monkeypatch.setattr(matrix_module, "psd_eigh", counting_symeig)
    n_factors = sum(len(f) for f in curvature.H.kfacs)
    first = curvature.with_prior(torch.tensor([1.0]), torch.tensor(1.0))
    second = curvature.with_prior(torch.tensor([2.0, 1.0, 3.0, 1.0]), torch.tensor(0.5))
    assert not torch.allclose(first.logdet(), second.logdet())
    assert calls == []  # the log-determinant needs eigenvalues only
    cached = curvature.decomposed()
    torch.testing.assert_close(
        second.to_dense(),
        _dense_posterior(curvature, torch.tensor([2.0, 1.0, 3.0, 1.0]), 0.5),
    )
    first.to_dense()
    assert len(calls) == n_factors
    assert curvature.decomposed() is cached
    assert isinstance(first, KronPosterior)

    curvature.add_(_random_kron_like(curvature, 5))
    curvature.with_prior(torch.tensor([1.0]), torch.tensor(1.0)).to_dense()
    assert len(calls) == 2 * n_factors
    curvature.H += _random_kron_like(curvature, 6)
    posterior = curvature.with_prior(torch.tensor([1.0]), torch.tensor(1.0))
    torch.testing.assert_close(
        posterior.to_dense(), _dense_posterior(curvature, torch.tensor([1.0]), 1.0)
    )
    assert len(calls) == 3 * n_factors


@pytest.mark.parametrize("decompose_first", [False, True], ids=["eigenvalues-only", "from-eigh"])
def test_logdet_from_spectrum_matches_dense(decompose_first):
    curvature = _fitted()
    if decompose_first:
        curvature.decomposed()
    prior = torch.tensor([2.0, 1.0, 3.0, 0.5])
    posterior = curvature.with_prior(prior, torch.tensor(0.7))
    dense = _dense_posterior(curvature, prior, 0.7)
    torch.testing.assert_close(posterior.logdet(), torch.linalg.slogdet(dense)[1])
    curvature.add_(_random_kron_like(curvature, 7))
    posterior = curvature.with_prior(prior, torch.tensor(0.7))
    dense = _dense_posterior(curvature, prior, 0.7)
    torch.testing.assert_close(posterior.logdet(), torch.linalg.slogdet(dense)[1])


def test_state_dict_round_trip():
    curvature = _fitted(damping=True)
    state = curvature.state_dict()
    assert all(isinstance(f, torch.Tensor) for factors in state["kfacs"] for f in factors)
    restored = KronCurvature.zeros(_params(), damping=True)
    restored.with_prior(torch.tensor([1.0]), torch.tensor(1.0))
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.to_dense(), curvature.to_dense())
    prior = torch.tensor([0.8])
    torch.testing.assert_close(
        restored.with_prior(prior, torch.tensor(2.0)).to_dense(),
        curvature.with_prior(prior, torch.tensor(2.0)).to_dense(),
    )


def test_load_state_dict_errors():
    curvature = _fitted()
    other = KronCurvature.zeros(list(make_mlp(n_in=3, n_hidden=6).parameters()))
    with pytest.raises(ValueError, match="block 0"):
        curvature.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="blocks"):
        curvature.load_state_dict({"kfacs": curvature.state_dict()["kfacs"][:2]})
    with pytest.raises(ValueError, match="kfacs"):
        curvature.load_state_dict({"H": torch.zeros(2)})


def test_float32_curvature_keeps_dtype():
    """float32 parameters: the factors are summed in float64 (laplace.utils.precision), the
    public factors and every returned tensor are float32; ``logdet`` is one of the two
    reductions returned in the accumulation precision."""
    params = [p.float() for p in _params()]
    curvature = KronCurvature.zeros(params)
    curvature.add_(Kron([[f.float() for f in b] for b in _random_kron_like(curvature, 0).kfacs]))
    assert all(f.dtype == torch.float64 for b in curvature.H.kfacs for f in b)
    assert all(f.dtype == torch.float32 for b in curvature.public().kfacs for f in b)
    posterior = curvature.with_prior(torch.tensor([1.0]), torch.tensor(1.0))
    assert posterior.sample(4, generator=torch.Generator().manual_seed(0)).dtype == torch.float32
    assert posterior.logdet().dtype == torch.float64
    assert posterior.covariance().dtype == torch.float32
    Js = torch.randn(2, 3, curvature.n_params, generator=torch.Generator().manual_seed(1))
    assert posterior.inv_quad(Js.float()).dtype == torch.float32
