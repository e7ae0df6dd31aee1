"""Low-rank Laplace: Lanczos eigenpairs, the Woodbury posterior and the Laplace class.

Ground truth: ``torch.linalg.eigh`` of the dense GGN/EF (``tests/groundtruth.py``), dense
float64 linear algebra on ``U diag(l) U^T + diag(p0)``, and ``FullLaplace`` at full rank.
"""

from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch
from conftest import make_data, make_mlp
from groundtruth import dense_ef, dense_ggn
from test_posterior import _gradcheck, _jacobians, _params
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import lowrank as lowrank_module
from laplace.baselaplace import FullLaplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian, GGNInterface
from laplace.curvature.lanczos import lanczos_eigh
from laplace.lowrank import LowRankLaplace
from laplace.posterior.base import expand_prior
from laplace.posterior.lowrank import LowRankCurvature, LowRankPosterior
from laplace.utils.enums import HessianStructure
from laplace.utils.memory import memory_budget

N_DATA = 20


def loader(x: Tensor, y: Tensor, batch_size: int = 6) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def setup(likelihood: str) -> tuple[nn.Module, Tensor, Tensor]:
    model = make_mlp()
    x, y = make_data(likelihood, n=N_DATA)
    return model, x, y


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def align_signs(vectors: Tensor, reference: Tensor) -> Tensor:
    """Flip each column of ``vectors`` to have a positive inner product with ``reference``."""
    return vectors * torch.sign((vectors * reference).sum(0))


# ----------------------------------------------------------------------------- Lanczos
@pytest.mark.parametrize("k", [1, 6], ids=["k1", "k6"])
@pytest.mark.parametrize("backend", [None, CurvlinopsEF], ids=["ggn", "ef"])
def test_lanczos_eigenpairs_match_dense_eigh(likelihood, backend, k):
    model, x, y = setup(likelihood)
    la = LowRankLaplace(model, likelihood, backend=backend, n_eigenvalues=k)
    la.fit(loader(x, y))
    reference = dense_ef if backend is CurvlinopsEF else dense_ggn
    values, vectors = torch.linalg.eigh(reference(model, x, y, likelihood))
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    U, l = la.H
    assert U.shape == (n_params(model), k) and l.shape == (k,)
    torch.testing.assert_close(l, values, atol=1e-8, rtol=0)
    torch.testing.assert_close(align_signs(U, vectors), vectors, atol=1e-8, rtol=0)


def _generator(seed: int = 1) -> torch.Generator:
    """A seeded generator for Lanczos' random start vector (and restarts)."""
    return torch.Generator().manual_seed(seed)


def _rotated(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return (Q * eigenvalues) @ Q.T


@pytest.mark.parametrize("k", [2, 15, 25], ids=["k2", "k15", "k25"])
def test_lanczos_degenerate_spectrum(k):
    """Repeated eigenvalues need restarts: one Krylov space holds one copy of each."""
    eigenvalues = torch.cat([torch.full((10,), 3.0), torch.full((10,), 1.0), torch.zeros(40)])
    H = _rotated(eigenvalues)
    values, vectors = lanczos_eigh(lambda v: H @ v, 60, k, generator=_generator())
    torch.testing.assert_close(values, eigenvalues[:k], atol=1e-10, rtol=0)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k), atol=1e-10, rtol=0)
    torch.testing.assert_close(H @ vectors, vectors * values, atol=1e-10, rtol=0)


def test_lanczos_full_rank_is_exact_and_seeded():
    H = _rotated(torch.linspace(-1.0, 4.0, 30), seed=3)
    values, vectors = lanczos_eigh(lambda v: H @ v, 30, 30, generator=_generator())
    torch.testing.assert_close((vectors * values) @ vectors.T, H, atol=1e-12, rtol=0)
    first, second = (
        lanczos_eigh(lambda v: H @ v, 30, 3, generator=torch.Generator().manual_seed(1))
        for _ in range(2)
    )
    assert torch.equal(first[1], second[1])


def test_lanczos_float32_and_zero_matrix():
    H = _rotated(torch.linspace(0.0, 5.0, 40)).float()
    values, vectors = lanczos_eigh(
        lambda v: H @ v, 40, 3, dtype=torch.float32, generator=_generator()
    )
    assert values.dtype == vectors.dtype == torch.float32
    expected = torch.tensor([5.0, 5.0 - 5 / 39, 5.0 - 10 / 39], dtype=torch.float32)
    torch.testing.assert_close(values, expected)
    zero_values, zero_vectors = lanczos_eigh(torch.zeros_like, 10, 3, generator=_generator())
    assert torch.equal(zero_values, torch.zeros(3))
    torch.testing.assert_close(zero_vectors.T @ zero_vectors, torch.eye(3))


def test_lanczos_warns_without_convergence():
    H = torch.diag(torch.linspace(1.0, 1.01, 300))
    with pytest.warns(RuntimeWarning, match="did not converge in max_iter=10"):
        values, _ = lanczos_eigh(lambda v: H @ v, 300, 4, max_iter=10, generator=_generator())
    assert values.shape == (4,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be an integer in \\[1, 5\\]"),
        ({"k": 6}, "k must be an integer in \\[1, 5\\]"),
        ({"k": 3, "max_iter": 2}, "max_iter must be at least k=3"),
        ({"k": 3, "tol": 0.0}, "tol must be a float in \\(0, 1\\)"),
    ],
    ids=["k0", "k_too_big", "max_iter", "tol"],
)
def test_lanczos_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lanczos_eigh(lambda v: v, 5, **kwargs)


def test_lanczos_nan_product_raises():
    with pytest.raises(ValueError, match="NaN or Inf"):
        lanczos_eigh(lambda v: v * math.nan, 5, 2, generator=_generator())


# ----------------------------------------------------------------------------- posterior
SHAPES = [(2, 3), (2,), (1, 2), (1,)]
N = 11
RANK = 4
PRIORS = {
    "scalar": torch.tensor([0.7]),
    "layerwise": torch.tensor([0.5, 1.5, 0.9, 2.0]),
    "per_param": torch.linspace(0.4, 1.9, N),
}
FACTOR = torch.tensor(1.3)


def _curvature() -> LowRankCurvature:
    """Rank-4 curvature with one zero eigenvalue, on the parameter shapes of SHAPES."""
    generator = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(N, RANK, generator=generator))
    return LowRankCurvature(U, torch.tensor([2.5, 1.0, 0.3, 0.0]), [math.prod(s) for s in SHAPES])


@pytest.fixture(params=list(PRIORS))
def case(request) -> tuple[LowRankCurvature, LowRankPosterior, Tensor, Tensor]:
    curvature = _curvature()
    prior = PRIORS[request.param]
    prior_diag = expand_prior(prior, curvature.sizes)
    P = FACTOR * curvature.to_dense() + torch.diag(prior_diag)
    return curvature, curvature.with_prior(prior, FACTOR), P, prior_diag


def test_posterior_dense_and_precision(case):
    curvature, posterior, P, prior_diag = case
    torch.testing.assert_close(posterior.to_dense(), P)
    (U, scaled), diagonal = posterior.precision()
    torch.testing.assert_close((U * scaled) @ U.T + torch.diag(diagonal), P)
    torch.testing.assert_close(diagonal, prior_diag)
    assert curvature.structure == HessianStructure.LOWRANK and curvature.rank == RANK


def test_posterior_logdet_and_quad(case):
    _, posterior, P, _ = case
    torch.testing.assert_close(posterior.logdet(), torch.logdet(P))
    v = torch.randn(5, N, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(posterior.quad(v), torch.einsum("np,pq,nq->n", v, P, v))
    torch.testing.assert_close(posterior.quad(v[0]), v[0] @ P @ v[0])


def test_posterior_inverse_quadratic_forms(case):
    _, posterior, P, _ = case
    Js = _jacobians()
    torch.testing.assert_close(posterior.inv_quad(Js), Js @ torch.linalg.solve(P, Js.mT))
    rows = Js.reshape(-1, N)
    torch.testing.assert_close(
        posterior.inv_quad_joint(rows), rows @ torch.linalg.solve(P, rows.T)
    )
    torch.testing.assert_close(posterior.solve(rows), torch.linalg.solve(P, rows.T).T)


def test_posterior_covariance_scale_variance_woodbury(case):
    curvature, posterior, P, prior_diag = case
    covariance = torch.linalg.inv(P)
    torch.testing.assert_close(posterior.covariance(), covariance)
    torch.testing.assert_close(posterior.variance(), covariance.diagonal())
    scale = posterior.scale()
    torch.testing.assert_close(scale @ scale.T, covariance)
    assert torch.equal(scale, scale.tril())
    V, Kinv = posterior.woodbury()
    torch.testing.assert_close(torch.diag(prior_diag.reciprocal()) - V @ Kinv @ V.T, covariance)
    U, l = curvature.public()
    keep = l > 0
    reference = torch.linalg.inv(torch.diag(1 / (FACTOR * l[keep])) + U[:, keep].T @ V[:, keep])
    torch.testing.assert_close(Kinv[keep][:, keep], reference)
    assert torch.equal(Kinv[~keep], torch.zeros_like(Kinv[~keep]))


def test_posterior_sample_covariance(case):
    _, posterior, P, _ = case
    samples = posterior.sample(200_000, generator=torch.Generator().manual_seed(3))
    assert samples.shape == (200_000, N) and samples.dtype == torch.float64
    covariance = torch.linalg.inv(P)
    normaliser = covariance.diagonal().rsqrt()
    error = (samples.T @ samples / len(samples) - covariance) * torch.outer(normaliser, normaliser)
    assert error.abs().max() < 0.02
    assert samples.mean(0).mul(normaliser).abs().max() < 0.015
    first, second = (posterior.sample(7, torch.Generator().manual_seed(9)) for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("prior_name", list(PRIORS))
def test_posterior_gradients(prior_name):
    curvature, prior, Js = _curvature(), PRIORS[prior_name], _jacobians(2, 2)
    _gradcheck(curvature, prior, lambda posterior: posterior.logdet())
    _gradcheck(curvature, prior, lambda posterior: posterior.inv_quad(Js))
    _gradcheck(curvature, prior, lambda posterior: posterior.variance())
    _gradcheck(
        curvature, prior, lambda posterior: posterior.sample(2, torch.Generator().manual_seed(0))
    )


def test_layer_grams_are_computed_once_and_match_direct_path():
    curvature = _curvature()
    grams = curvature.layer_grams()
    for value in torch.logspace(-1, 1, 5):
        layerwise = curvature.with_prior(value * PRIORS["layerwise"], FACTOR)
        direct = curvature.with_prior(
            expand_prior(value * PRIORS["layerwise"], curvature.sizes), FACTOR
        )
        torch.testing.assert_close(layerwise.logdet(), direct.logdet())
    assert curvature.layer_grams() is grams


def test_curvature_state_and_errors():
    curvature = _curvature()
    restored = LowRankCurvature.zeros(_params(SHAPES))
    assert restored.rank == 0
    restored.load_state_dict(curvature.state_dict())
    torch.testing.assert_close(restored.to_dense(), curvature.to_dense())
    with pytest.raises(ValueError, match="'eigenvectors' and 'eigenvalues'"):
        restored.load_state_dict({})
    with pytest.raises(ValueError, match=r"eigenvectors must have shape \(11, k\)"):
        restored.load_state_dict(
            {"eigenvectors": torch.zeros(4, 2), "eigenvalues": torch.zeros(2)}
        )
    with pytest.raises(ValueError, match="non-negative"):
        LowRankCurvature(curvature.eigenvectors, -curvature.eigenvalues, curvature.sizes)
    with pytest.raises(NotImplementedError, match="not accumulated"):
        curvature.add_(curvature.public())
    with pytest.raises(ValueError, match="prior_precision"):
        curvature.with_prior(torch.ones(3), FACTOR)
    with pytest.raises(ValueError, match="params"):
        LowRankCurvature.zeros([])


# ----------------------------------------------------------------------------- Laplace
LAPLACE_PRIORS = {
    "scalar": lambda la: torch.tensor([0.7]),
    "layerwise": lambda la: torch.linspace(0.5, 2.0, la.n_layers),
    "diag": lambda la: torch.linspace(0.5, 2.0, la.n_params),
}


@functools.cache
def _fitted_pair(likelihood: str) -> tuple[FullLaplace, LowRankLaplace, Tensor, Tensor]:
    model, x, y = setup(likelihood)
    sigma = 0.8 if likelihood == "regression" else 1.0
    full = FullLaplace(model, likelihood, sigma_noise=sigma)
    low = LowRankLaplace(model, likelihood, sigma_noise=sigma, n_eigenvalues=n_params(model))
    full.fit(loader(x, y))
    low.fit(loader(x, y))
    return full, low, x, y


def _fit_pair(likelihood: str) -> tuple[FullLaplace, LowRankLaplace, Tensor, Tensor]:
    """Fresh copies of the pair fitted once per likelihood, at full rank."""
    return copy.deepcopy(_fitted_pair(likelihood))


def _marglik_and_gradients(la, prior: Tensor, likelihood: str) -> tuple[Tensor, ...]:
    log_prior = prior.log().clone().requires_grad_(True)
    log_sigma = torch.tensor(math.log(0.8) if likelihood == "regression" else 0.0)
    log_sigma.requires_grad_(likelihood == "regression")
    marglik = la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
    inputs = [log_prior, log_sigma] if likelihood == "regression" else [log_prior]
    return marglik.detach(), *torch.autograd.grad(marglik, inputs)


@pytest.mark.parametrize("prior", list(LAPLACE_PRIORS))
def test_full_rank_equals_full_laplace(likelihood, prior):
    full, low, x, _ = _fit_pair(likelihood)
    torch.testing.assert_close(
        low._curvature.to_dense(), full._curvature.to_dense(), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(low.loss, full.loss)
    assert low.n_data == full.n_data == N_DATA and low.n_outputs == full.n_outputs
    value = LAPLACE_PRIORS[prior](low)
    for expected, actual in zip(
        _marglik_and_gradients(full, value, likelihood),
        _marglik_and_gradients(low, value, likelihood),
    ):
        torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(low.posterior_covariance, full.posterior_covariance)
    torch.testing.assert_close(low.posterior_scale, full.posterior_scale)
    torch.testing.assert_close(low.posterior_variance, full.posterior_variance)
    torch.testing.assert_close(low(x[:4]), full(x[:4]))
    torch.testing.assert_close(low(x[:4], joint=True), full(x[:4], joint=True))
    theta = low.mean + 0.1
    torch.testing.assert_close(low.log_prob(theta), full.log_prob(theta))


def test_posterior_precision_v_kinv(likelihood):
    _, low, _, _ = _fit_pair(likelihood)
    (U, scaled), prior_diag = low.posterior_precision
    torch.testing.assert_close(scaled, low._curvature.eigenvalues / low.sigma_noise**2)
    torch.testing.assert_close(prior_diag, low.prior_precision_diag)
    covariance = torch.diag(1 / prior_diag) - low.V @ low.Kinv @ low.V.T
    torch.testing.assert_close(covariance, low.posterior_covariance)
    torch.testing.assert_close(low.V, U / prior_diag.unsqueeze(-1))


def test_truncated_rank_marglik_and_sampling(likelihood):
    model, x, y = setup(likelihood)
    la = LowRankLaplace(model, likelihood, prior_precision=0.5, n_eigenvalues=5)
    la.fit(loader(x, y))
    P = la._H_factor * la._curvature.to_dense() + 0.5 * torch.eye(la.n_params)
    delta = la.mean - la.prior_mean
    expected = -la.loss - 0.5 * (
        torch.logdet(P) - la.n_params * math.log(0.5) + 0.5 * delta @ delta
    )
    if likelihood == "regression":
        expected = expected - N_DATA * 2 * math.log(math.sqrt(2 * math.pi))
    torch.testing.assert_close(la.log_marginal_likelihood(), expected)
    samples = la.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (20_000, la.n_params)
    centred = samples - la.mean
    error = centred.T @ centred / len(samples) - torch.linalg.inv(P)
    assert error.abs().max() < 0.1
    la.optimize_prior_precision(method="marglik", n_steps=20, lr=0.1)
    assert la.prior_precision.shape == (1,) and la.prior_precision.item() != 0.5


def test_state_dict_and_torch_save(likelihood):
    model, x, y = setup(likelihood)
    la = LowRankLaplace(model, likelihood, n_eigenvalues=6, prior_precision=0.9)
    la.fit(loader(x, y))
    expected = la(x[:3])
    restored = LowRankLaplace(model, likelihood)
    restored.load_state_dict(la.state_dict())
    torch.testing.assert_close(restored(x[:3]), expected)
    torch.testing.assert_close(restored.log_marginal_likelihood(), la.log_marginal_likelihood())
    buffer = io.BytesIO()
    torch.save(la, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x[:3]), expected)
    with pytest.raises(ValueError, match="cls_name"):
        FullLaplace(model, likelihood).load_state_dict(la.state_dict())


class DictModel(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(batch["input_ids"])


class DictLoader(list):
    """A list of dict-like batches with the ``dataset`` a loader has."""

    dataset = range(N_DATA)


def test_dict_batches_match_tensor_batches():
    model, x, y = setup("classification")
    tensor_la = LowRankLaplace(model, "classification", n_eigenvalues=4)
    tensor_la.fit(loader(x, y))
    dict_loader = DictLoader(
        {"input_ids": x[i : i + 6], "labels": y[i : i + 6]} for i in range(0, N_DATA, 6)
    )
    dict_la = LowRankLaplace(DictModel(model), "classification", n_eigenvalues=4)
    dict_la.fit(dict_loader)
    torch.testing.assert_close(
        dict_la._curvature.to_dense(), tensor_la._curvature.to_dense(), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(dict_la.loss, tensor_la.loss)


def test_hessian_backend_clamps_negative_eigenvalues():
    model, x, y = setup("classification")
    la = LowRankLaplace(model, "classification", backend=CurvlinopsHessian, n_eigenvalues=32)
    with pytest.warns(RuntimeWarning, match="negative eigenvalues"):
        la.fit(loader(x, y))
    assert la._curvature.eigenvalues.min() == 0
    assert torch.isfinite(la.log_marginal_likelihood())


def test_float32_model():
    model = make_mlp().float()
    x, y = make_data("regression", n=N_DATA)
    la = LowRankLaplace(model, "regression", n_eigenvalues=3)
    la.fit(loader(x.float(), y.float()))
    # the eigenpairs are kept in float64 (laplace.utils.precision); what is returned is float32
    assert la._curvature.eigenvectors.dtype == torch.float64
    assert all(t.dtype == torch.float32 for t in la.H)
    _, f_var = la(x[:2].float())
    assert f_var.dtype == torch.float32 and f_var.shape == (2, 2, 2)
    assert la.log_marginal_likelihood().dtype == torch.float32


def test_options_and_defaults():
    model = make_mlp(n_hidden=30)
    la = LowRankLaplace(model, "classification")
    assert la.n_eigenvalues == 100 and la.lanczos_max_iter == 182 and la.lanczos_seed == 0
    la = LowRankLaplace(make_mlp(), "classification", backend_kwargs={"n_eigenvalues": 7})
    assert la.n_eigenvalues == 7 and la.lanczos_max_iter == 32
    assert LowRankLaplace(make_mlp(), "classification").n_eigenvalues == 32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_eigenvalues": 33}, r"n_eigenvalues must be an integer in \[1, 32\]"),
        ({"n_eigenvalues": 0}, r"n_eigenvalues must be an integer in \[1, 32\]"),
        ({"n_eigenvalues": 2.0}, "n_eigenvalues must be an integer"),
        ({"n_eigenvalues": 5, "lanczos_max_iter": 4}, "lanczos_max_iter must be an integer >= "),
        ({"lanczos_tol": 2.0}, "lanczos_tol must be a float"),
        ({"lanczos_seed": "a"}, "lanczos_seed must be an integer"),
        (
            {"n_eigenvalues": 3, "backend_kwargs": {"n_eigenvalues": 4}},
            "n_eigenvalues was given both",
        ),
        ({"backend": GGNInterface}, "must be a curvlinops backend"),
    ],
    ids=["rank_too_big", "rank_zero", "rank_float", "max_iter", "tol", "seed", "twice", "backend"],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankLaplace(make_mlp(), "classification", **kwargs)


def test_fit_override_false_raises_and_errors_leave_it_unfitted(monkeypatch):
    model, x, y = setup("classification")
    la = LowRankLaplace(model, "classification", n_eigenvalues=3)
    with pytest.raises(ValueError, match="override=False"):
        la.fit(loader(x, y), override=False)
    with pytest.raises(ValueError, match="not fitted"):
        la(x[:2])
    monkeypatch.setattr(lowrank_module, "lanczos_eigh", _failing_lanczos)
    # a budget too small for the dense curvature: the matrix-free Lanczos route
    with memory_budget(1024), pytest.raises(RuntimeError, match="Lanczos failed"):
        la.fit(loader(x, y))
    assert la.n_data is None
    with pytest.raises(ValueError, match="not fitted"):
        la(x[:2])


def _failing_lanczos(*args, **kwargs):
    raise RuntimeError("Lanczos failed")


def test_stochastic_fisher_matches_the_sampled_dense_fisher():
    """The sampled Fisher keeps its targets across products: Lanczos sees one matrix."""
    model, x, y = setup("classification")

    def options() -> dict:
        return {
            "stochastic": True,
            "num_samples": 2,
            "generator": torch.Generator().manual_seed(0),
        }

    la = LowRankLaplace(model, "classification", backend_kwargs=options(), n_eigenvalues=3)
    la.fit(loader(x, y, batch_size=N_DATA))
    _, H = CurvlinopsGGN(model, "classification", **options()).full(x, y)
    values, vectors = torch.linalg.eigh(H)
    values, vectors = values.flip(0)[:3], vectors.flip(1)[:, :3]
    torch.testing.assert_close(la._curvature.eigenvalues, values, atol=1e-8, rtol=0)
    torch.testing.assert_close(
        align_signs(la._curvature.eigenvectors, vectors), vectors, atol=1e-8, rtol=0
    )
