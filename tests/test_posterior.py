"""Every posterior structure against dense float64 linear algebra on its ``to_dense()``."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.autograd import gradcheck

from laplace.posterior.base import Curvature, Posterior, expand_prior
from laplace.posterior.dense import DenseCholeskyPosterior, DenseCurvature, DenseEigenPosterior
from laplace.posterior.diag import DiagCurvature
from laplace.utils.enums import HessianStructure

try:
    from laplace.posterior.kron import KronCurvature
    from laplace.utils.matrix import Kron, KronDecomposed
except ImportError:
    KronCurvature = None

SHAPES = [(2, 3), (2,), (1, 2), (1,)]
N_PARAMS = 11
PRIORS = {
    "scalar": torch.tensor([0.7]),
    "layerwise": torch.tensor([0.5, 1.5, 0.9, 2.0]),
    "per_param": torch.linspace(0.4, 1.9, N_PARAMS),
}
FACTOR = torch.tensor(1.3)


def _params(shapes: list[tuple[int, ...]] = SHAPES) -> list[Tensor]:
    return [torch.zeros(shape) for shape in shapes]


def _psd(n: int, rank: int, generator: torch.Generator) -> Tensor:
    A = torch.randn(n, rank, generator=generator)
    return A @ A.T / rank


def _random_batch(curvature: Curvature, generator: torch.Generator) -> object:
    """One batch of random positive semi-definite curvature in the structure's format."""
    n = curvature.n_params
    if curvature.structure == HessianStructure.FULL:
        return _psd(n, 4, generator)
    if curvature.structure == HessianStructure.DIAG:
        return torch.rand(n, generator=generator)
    kfacs = [[_psd(f.shape[0], 2, generator) for f in fs] for fs in curvature.H.kfacs]
    return Kron(kfacs)


def _fitted(cls: type[Curvature], shapes: list[tuple[int, ...]] = SHAPES) -> Curvature:
    generator = torch.Generator().manual_seed(0)
    curvature = cls.zeros(_params(shapes))
    for _ in range(2):
        curvature.add_(_random_batch(curvature, generator))
    return curvature


STRUCTURES = {"full": DenseCurvature, "diag": DiagCurvature}
if KronCurvature is not None:
    STRUCTURES["kron"] = KronCurvature
CASES = [
    pytest.param((cls, prior), id=f"{name}-{prior}")
    for name, cls in STRUCTURES.items()
    for prior in PRIORS
    if not (name == "kron" and prior == "per_param")
]


def _matrix(value: object) -> Tensor:
    """A public representation (vector, dense or Kronecker) as a dense matrix."""
    if KronCurvature is not None and isinstance(value, KronDecomposed):
        return value.to_matrix()
    return torch.diag(value) if value.ndim == 1 else value


@pytest.fixture(params=CASES)
def case(request) -> tuple[Curvature, Posterior, Tensor]:
    """A fitted curvature, its posterior for one prior and the dense ``P`` it must equal."""
    cls, prior_name = request.param
    curvature = _fitted(cls)
    prior = PRIORS[prior_name]
    P = FACTOR * curvature.to_dense() + torch.diag(expand_prior(prior, curvature.sizes))
    return curvature, curvature.with_prior(prior, FACTOR), P


def _jacobians(batch: int = 3, outputs: int = 2) -> Tensor:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(batch, outputs, N_PARAMS, generator=generator)


def test_to_dense_and_precision(case):
    curvature, posterior, P = case
    assert curvature.to_dense().shape == (N_PARAMS, N_PARAMS)
    assert torch.linalg.eigvalsh(curvature.to_dense()).min() > -1e-10
    torch.testing.assert_close(posterior.to_dense(), P)
    torch.testing.assert_close(_matrix(posterior.precision()), P)


def test_logdet(case):
    _, posterior, P = case
    torch.testing.assert_close(posterior.logdet(), torch.logdet(P))


@pytest.mark.parametrize("rows", [(), (4,)], ids=["vector", "matrix"])
def test_quad(case, rows):
    _, posterior, P = case
    v = torch.randn(*rows, N_PARAMS, generator=torch.Generator().manual_seed(2))
    expected = torch.einsum("...p,pq,...q->...", v, P, v)
    torch.testing.assert_close(posterior.quad(v), expected)


def test_inv_quad(case):
    _, posterior, P = case
    Js = _jacobians()
    expected = Js @ torch.linalg.solve(P, Js.mT)
    torch.testing.assert_close(posterior.inv_quad(Js), expected)


def test_inv_quad_joint(case):
    _, posterior, P = case
    Js = _jacobians().reshape(-1, N_PARAMS)
    torch.testing.assert_close(posterior.inv_quad_joint(Js), Js @ torch.linalg.solve(P, Js.T))


def test_covariance_scale_variance(case):
    curvature, posterior, P = case
    covariance = torch.linalg.inv(P)
    torch.testing.assert_close(_matrix(posterior.covariance()), covariance)
    torch.testing.assert_close(posterior.variance(), covariance.diagonal())
    scale = _matrix(posterior.scale())
    torch.testing.assert_close(scale @ scale.T, covariance)
    if curvature.structure == HessianStructure.FULL:
        assert torch.equal(scale, scale.tril()) and bool((scale.diagonal() > 0).all())


def test_sample_covariance(case):
    _, posterior, P = case
    samples = posterior.sample(200_000, generator=torch.Generator().manual_seed(3))
    assert samples.shape == (200_000, N_PARAMS) and samples.dtype == torch.float64
    covariance = torch.linalg.inv(P)
    normaliser = covariance.diagonal().rsqrt()
    error = (samples.T @ samples / len(samples) - covariance) * torch.outer(normaliser, normaliser)
    assert error.abs().max() < 0.03
    assert samples.mean(0).mul(normaliser).abs().max() < 0.02
    first, second = (posterior.sample(7, torch.Generator().manual_seed(9)) for _ in range(2))
    assert torch.equal(first, second)


def _gradcheck(curvature: Curvature, prior: Tensor, fn: Callable[[Posterior], Tensor]) -> None:
    prior = prior.clone().requires_grad_(True)
    factor = FACTOR.clone().requires_grad_(True)
    assert gradcheck(lambda p, f: fn(curvature.with_prior(p, f)), (prior, factor))


@pytest.mark.parametrize("structure_and_prior", CASES)
def test_gradients(structure_and_prior):
    cls, prior_name = structure_and_prior
    curvature, prior, Js = _fitted(cls), PRIORS[prior_name], _jacobians(2, 2)
    _gradcheck(curvature, prior, lambda posterior: posterior.logdet())
    _gradcheck(curvature, prior, lambda posterior: posterior.inv_quad(Js))
    _gradcheck(curvature, prior, lambda posterior: posterior.variance())
    _gradcheck(
        curvature, prior, lambda posterior: posterior.sample(2, torch.Generator().manual_seed(0))
    )


@pytest.mark.parametrize("name", STRUCTURES)
def test_wrong_prior_length_raises(name):
    with pytest.raises(ValueError, match="prior_precision"):
        _fitted(STRUCTURES[name]).with_prior(torch.ones(3), FACTOR)


@pytest.mark.skipif(KronCurvature is None, reason="laplace.posterior.kron is not available")
def test_kron_rejects_per_parameter_prior():
    with pytest.raises(ValueError, match="layerwise"):
        _fitted(KronCurvature).with_prior(PRIORS["per_param"], FACTOR)


@pytest.mark.parametrize("name", STRUCTURES)
def test_state_dict_round_trip(name):
    cls = STRUCTURES[name]
    curvature = _fitted(cls)
    restored = cls.zeros(_params())
    restored.load_state_dict(curvature.state_dict())
    torch.testing.assert_close(restored.to_dense(), curvature.to_dense())
    prior = PRIORS["layerwise"]
    torch.testing.assert_close(
        restored.with_prior(prior, FACTOR).logdet(), curvature.with_prior(prior, FACTOR).logdet()
    )


@pytest.mark.parametrize("name", STRUCTURES)
def test_load_state_dict_shape_mismatch_raises(name):
    cls = STRUCTURES[name]
    other = _fitted(cls, [(3, 3), (3,), (1, 3), (1,)])
    with pytest.raises(ValueError, match="expected|must have shape"):
        _fitted(cls).load_state_dict(other.state_dict())


@pytest.mark.parametrize("name", ["full", "diag"])
def test_state_dict_errors_name_shapes(name):
    cls = STRUCTURES[name]
    curvature = _fitted(cls)
    with pytest.raises(ValueError, match="'H'"):
        curvature.load_state_dict({})
    wrong = torch.zeros(4, 4) if name == "full" else torch.zeros(4)
    expected = "(11, 11)" if name == "full" else "(11,)"
    with pytest.raises(ValueError, match=rf"{re.escape(expected)}.*got \(4"):
        curvature.load_state_dict({"H": wrong})


@pytest.mark.parametrize("name", ["full", "diag"])
def test_zeros_add_and_public(name):
    cls = STRUCTURES[name]
    curvature = cls.zeros([p.float() for p in _params()])
    assert curvature.public().dtype == torch.float32
    assert curvature.structure == HessianStructure(name)
    batch = _random_batch(curvature, torch.Generator().manual_seed(0)).float()
    curvature.add_(batch)
    curvature.add_(batch)
    torch.testing.assert_close(curvature.public(), 2 * batch)
    with pytest.raises(ValueError, match="H_batch must have shape"):
        curvature.add_(batch[:-1])
    with pytest.raises(ValueError, match="params"):
        cls.zeros([])


def test_dense_eigen_path_matches_cholesky_path():
    curvature = _fitted(DenseCurvature)
    scalar = PRIORS["scalar"]
    eigen = curvature.with_prior(scalar, FACTOR)
    cholesky = curvature.with_prior(scalar.expand(N_PARAMS), FACTOR)
    assert isinstance(eigen, DenseEigenPosterior)
    assert isinstance(cholesky, DenseCholeskyPosterior)
    Js = _jacobians()
    v = torch.randn(4, N_PARAMS, generator=torch.Generator().manual_seed(1))
    for method, args in [
        ("logdet", ()),
        ("quad", (v,)),
        ("inv_quad", (Js,)),
        ("inv_quad_joint", (Js[0],)),
        ("precision", ()),
        ("covariance", ()),
        ("scale", ()),
        ("variance", ()),
        ("to_dense", ()),
    ]:
        torch.testing.assert_close(getattr(eigen, method)(*args), getattr(cholesky, method)(*args))


def test_dense_eigendecomposition_computed_once(monkeypatch):
    calls = []
    eigh = torch.linalg.eigh

    def counting_eigh(*args, **kwargs):
        calls.append(1)
        return eigh(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    curvature = _fitted(DenseCurvature)
    for value in torch.logspace(-2, 2, 20):
        curvature.with_prior(value.reshape(1), FACTOR * value).logdet()
    assert len(calls) == 1
    curvature.add_(torch.eye(N_PARAMS))
    P = 0.5 * curvature.to_dense() + torch.eye(N_PARAMS)
    torch.testing.assert_close(
        curvature.with_prior(torch.tensor([1.0]), 0.5).logdet(), torch.logdet(P)
    )
    assert len(calls) == 2
    curvature.load_state_dict(_fitted(DenseCurvature).state_dict())
    curvature.with_prior(torch.tensor([1.0]), FACTOR)
    assert len(calls) == 3


def _rotated(eigenvalues: Tensor) -> Tensor:
    generator = torch.Generator().manual_seed(6)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator))
    return (Q * eigenvalues) @ Q.T


def test_dense_indefinite_hessian_is_kept_or_rejected():
    curvature = DenseCurvature.zeros(_params())
    curvature.assume_psd = False  # as set for a Hessian backend
    eigenvalues = torch.linspace(-1.0, 3.0, N_PARAMS)
    curvature.add_(_rotated(eigenvalues))
    torch.testing.assert_close(curvature.eigendecomposition()[0], eigenvalues)
    P = curvature.to_dense() + 1.5 * torch.eye(N_PARAMS)
    torch.testing.assert_close(curvature.with_prior(torch.tensor([1.5]), 1.0).logdet(), P.logdet())
    with pytest.raises(ValueError, match="positive definite.*-0.5"):
        curvature.with_prior(torch.tensor([0.5]), 1.0)
    with pytest.raises(ValueError, match="positive definite"):
        curvature.with_prior(torch.full((4,), 0.5), 1.0)


def test_dense_roundoff_negative_eigenvalues_are_clamped():
    curvature = DenseCurvature.zeros(_params())
    curvature.add_(_psd(N_PARAMS, 3, torch.Generator().manual_seed(4)))
    raw = torch.linalg.eigvalsh(curvature.to_dense())
    assert raw.min() < 0
    eigenvalues, _ = curvature.eigendecomposition()
    assert eigenvalues.min() == 0
    torch.testing.assert_close(eigenvalues[raw > 0], raw[raw > 0])
    logdet = curvature.with_prior(torch.tensor([1e-300]), 1.0).logdet()
    assert torch.isfinite(logdet)


def test_diag_nonpositive_precision_raises():
    curvature = DiagCurvature.zeros(_params())
    with pytest.raises(ValueError, match="must be positive"):
        curvature.with_prior(torch.tensor([0.0]), FACTOR)


@pytest.mark.parametrize("name", ["full", "diag"])
def test_factor_and_jacobian_shapes_are_checked(name):
    curvature = _fitted(STRUCTURES[name])
    with pytest.raises(ValueError, match="factor must be a scalar"):
        curvature.with_prior(PRIORS["scalar"], torch.ones(2))
    posterior = curvature.with_prior(PRIORS["scalar"], FACTOR)
    with pytest.raises(ValueError, match="Js must have 3 dimensions"):
        posterior.inv_quad(torch.ones(2, N_PARAMS))
    with pytest.raises(ValueError, match="params=11"):
        posterior.inv_quad_joint(torch.ones(2, N_PARAMS + 1))
