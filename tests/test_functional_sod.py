"""FunctionalLaplace / FunctionalLLLaplace against brute-force weight-space truth (float64).

Truth: dense per-sample Jacobians ``J`` and output Hessians ``Lambda`` (``tests.groundtruth``),
the precision ``P = diag(p0) + c sum_{n in S} J_n^T Lambda_n J_n / (sigma^2 T)`` with
``c = N / M`` on the subset ``S``, the predictive ``J* P^-1 J*^T`` and the Laplace log
marginal likelihood ``log p(D|theta) - 0.5 (log det P - log det P0 + scatter)``. The GP code
computes the same from ``(M k) x (M k)`` kernel matrices; equality holds to round-off.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import FunctionalLaplace, FunctionalLLLaplace, Laplace
from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN, GGNInterface
from laplace.utils.enums import PredType
from tests.conftest import make_data, make_mlp
from tests.groundtruth import dense_jacobians, flat_params, loss_fn, output_hessians

N = 14


def _loader(x, y, batch_size=4):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _last_layer_jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Closed form ``[I ⊗ phi, I]`` of the last Linear layer (weight row-major, then bias)."""
    with torch.no_grad():
        phi = model[:-1](x)
    C = model[-1].out_features
    eye = torch.eye(C)
    weight = torch.einsum("cd,bf->bcdf", eye, phi).reshape(len(x), C, -1)
    return torch.cat([weight, eye.expand(len(x), C, C)], dim=2)


def _truth(model, x, y, x_test, likelihood, prior, sigma=1.0, temperature=1.0, subset=None,
           last_layer=False):  # fmt: skip
    """Dense predictive covariance and log marginal likelihood."""
    jac = _last_layer_jacobians if last_layer else dense_jacobians
    J, J_test = jac(model, x), jac(model, x_test)
    with torch.no_grad():
        f = model(x)
    lam = output_hessians(f, y, likelihood)
    S = torch.arange(len(x)) if subset is None else subset
    c = len(x) / len(S)
    factor = 1 / (sigma**2 * temperature)
    H = torch.einsum("ncp,ncd,ndq->pq", J[S], lam[S], J[S])
    P = torch.diag(prior) + c * factor * H
    Sigma = torch.linalg.inv(P)
    var = torch.einsum("bcp,pq,bdq->bcd", J_test, Sigma, J_test)
    joint = J_test.flatten(0, 1) @ Sigma @ J_test.flatten(0, 1).T
    theta = model[-1] if last_layer else None
    if last_layer:
        theta = torch.cat([model[-1].weight.detach().flatten(), model[-1].bias.detach()])
    else:
        theta = flat_params(model)
    log_lik = -factor * loss_fn(f, y, likelihood)
    if likelihood == "regression":
        log_lik = log_lik - len(x) * f.shape[1] * math.log(sigma * math.sqrt(2 * math.pi))
    log_det = torch.linalg.slogdet(P)[1] - prior.log().sum()
    lml = log_lik - 0.5 * (log_det + (prior * theta**2).sum())
    return var, joint, lml


def _expanded(prior, model, last_layer=False):
    params = list(model[-1].parameters()) if last_layer else list(model.parameters())
    if prior.numel() == 1:
        return prior.expand(sum(p.numel() for p in params))
    if prior.numel() == len(params):
        return torch.cat([v.expand(p.numel()) for v, p in zip(prior, params)])
    return prior


PRIORS = {
    "scalar": lambda n_layers, n: torch.tensor([0.6]),
    "layerwise": lambda n_layers, n: torch.linspace(0.4, 1.5, n_layers),
    "diag": lambda n_layers, n: torch.linspace(0.3, 2.0, n),
}


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("prior_kind", list(PRIORS))
@pytest.mark.parametrize("last_layer", [False, True], ids=["all", "last-layer"])
@pytest.mark.parametrize("n_subset", [N, 6], ids=["all-data", "subset"])
def test_predictive_and_marginal_likelihood_match_dense_truth(
    likelihood, prior_kind, last_layer, n_subset
):
    n_out = 3 if likelihood == "classification" else 2
    model = make_mlp(n_out=n_out)
    x, y = make_data(likelihood, n=N, n_out=n_out)
    x_test = torch.randn(5, 3, generator=torch.Generator().manual_seed(9))
    cls = FunctionalLLLaplace if last_layer else FunctionalLaplace
    sigma = 0.7 if likelihood == "regression" else 1.0
    la = cls(model, likelihood, n_subset=n_subset, sigma_noise=sigma, temperature=0.8, seed=3)
    la.fit(_loader(x, y))
    n_layers = 2 if last_layer else 4
    prior = PRIORS[prior_kind](n_layers, la.n_params)
    la.prior_precision = prior
    var, joint, lml = _truth(
        model, x, y, x_test, likelihood, _expanded(prior, model, last_layer), sigma, 0.8,
        subset=la.subset_indices, last_layer=last_layer,
    )  # fmt: skip
    f_mu, f_var = la.predictive_moments(x_test)
    torch.testing.assert_close(f_mu, model(x_test).detach())
    torch.testing.assert_close(f_var, var)
    torch.testing.assert_close(la.predictive_moments(x_test, joint=True)[1], joint)
    torch.testing.assert_close(la.log_marginal_likelihood(), lml)
    assert la.subset_indices.numel() == n_subset


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_marginal_likelihood_gradients_match_dense_truth(likelihood):
    model = make_mlp()
    x, y = make_data(likelihood, n=N)
    la = FunctionalLaplace(model, likelihood, n_subset=8, seed=1)
    la.fit(_loader(x, y))
    prior = torch.tensor([0.5, 1.2, 0.8, 2.0], requires_grad=True)
    sigma = torch.tensor(0.9 if likelihood == "regression" else 1.0, requires_grad=True)
    if likelihood == "regression":
        lml = la.log_marginal_likelihood(prior, sigma)
    else:
        lml = la.log_marginal_likelihood(prior)
    lml.backward()
    prior2 = prior.detach().clone().requires_grad_(True)
    sigma2 = sigma.detach().clone().requires_grad_(True)
    truth = _truth_lml_fn(model, x, y, likelihood, la.subset_indices)(prior2, sigma2)
    truth.backward()
    torch.testing.assert_close(lml, truth)
    torch.testing.assert_close(prior.grad, prior2.grad)
    if likelihood == "regression":
        torch.testing.assert_close(sigma.grad, sigma2.grad)


def _truth_lml_fn(model, x, y, likelihood, subset):
    J = dense_jacobians(model, x)
    with torch.no_grad():
        f = model(x)
    lam = output_hessians(f, y, likelihood)
    H = torch.einsum("ncp,ncd,ndq->pq", J[subset], lam[subset], J[subset]) * len(x) / len(subset)
    theta = flat_params(model)
    loss = loss_fn(f, y, likelihood)

    def lml(prior, sigma):
        p = torch.cat([v.expand(q.numel()) for v, q in zip(prior, model.parameters())])
        factor = 1 / sigma**2
        log_lik = -factor * loss
        if likelihood == "regression":
            log_lik = log_lik - len(x) * f.shape[1] * torch.log(sigma * math.sqrt(2 * math.pi))
        P = torch.diag(p) + factor * H
        log_det = torch.linalg.slogdet(P)[1] - p.log().sum()
        return log_lik - 0.5 * (log_det + (p * theta**2).sum())

    return lml


@pytest.mark.parametrize("backend", [CurvlinopsGGN, BackPackGGN, AsdlGGN, GGNInterface])
def test_every_jacobian_backend_gives_the_same_posterior(backend):
    model = make_mlp(n_out=3)
    x, y = make_data("classification", n=N, n_out=3)
    la = FunctionalLaplace(model, "classification", n_subset=N, backend=backend)
    la.fit(_loader(x, y))
    x_test = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    var, _, lml = _truth(model, x, y, x_test, "classification", torch.ones(la.n_params))
    torch.testing.assert_close(la.predictive_moments(x_test)[1], var)
    torch.testing.assert_close(la.log_marginal_likelihood(), lml)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_independent_outputs_are_one_gp_per_output(likelihood):
    """Truth: per output ``c`` the precision ``P0 + sum_n Lambda_n[c, c] J_nc^T J_nc``."""
    n_out = 3
    model = make_mlp(n_out=n_out)
    x, y = make_data(likelihood, n=N, n_out=n_out)
    x_test = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    la = FunctionalLaplace(model, likelihood, n_subset=N, independent_outputs=True)
    la.fit(_loader(x, y))
    J, J_test = dense_jacobians(model, x), dense_jacobians(model, x_test)
    lam = output_hessians(model(x).detach(), y, likelihood).diagonal(dim1=1, dim2=2)
    expected = torch.zeros(4, n_out, n_out)
    for c in range(n_out):
        P = torch.eye(la.n_params) + torch.einsum("np,n,nq->pq", J[:, c], lam[:, c], J[:, c])
        expected[:, c, c] = torch.einsum(
            "bp,pq,bq->b", J_test[:, c], torch.linalg.inv(P), J_test[:, c]
        )
    torch.testing.assert_close(la.predictive_moments(x_test)[1], expected)


def test_reward_modeling_fits_on_pairs_and_predicts_one_output():
    torch.manual_seed(0)

    class Reward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))

        def forward(self, x):  # (batch, 2, 3) -> (batch, 2) during fit; (batch, 3) -> (batch, 1)
            return self.net(x).squeeze(-1) if x.ndim == 3 else self.net(x)

    model = Reward().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 2, 3, generator=g)
    y = torch.randint(0, 2, (10,), generator=g)
    la = Laplace(model, "reward_modeling", "all", "gp", n_subset=10)
    la.fit(_loader(x, y))
    x_test = torch.randn(4, 3, generator=g)
    f_mu, f_var = la(x_test)
    assert f_mu.shape == (4, 1) and f_var.shape == (4, 1, 1)
    J = dense_jacobians(model, x)  # (10, 2, params): both items of each pair
    lam = output_hessians(model(x).detach(), y, "classification")
    P = torch.eye(J.shape[-1]) + torch.einsum("ncp,ncd,ndq->pq", J, lam, J)
    J_test = dense_jacobians(model, x_test)
    torch.testing.assert_close(f_var, J_test @ torch.linalg.inv(P) @ J_test.mT)
    assert la.functional_samples(x_test, n_samples=3, joint=True).shape == (3, 4, 1)


def test_samples_follow_the_joint_covariance():
    model = make_mlp()
    x, y = make_data("regression", n=N)
    la = FunctionalLaplace(model, "regression", n_subset=N, sigma_noise=0.5)
    la.fit(_loader(x, y))
    x_test = torch.randn(3, 3, generator=torch.Generator().manual_seed(5))
    n = 40_000
    samples = la.functional_samples(x_test, n_samples=n, joint=True,
                                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    f_mu, cov = la.predictive_moments(x_test, joint=True)
    flat = samples.reshape(n, -1)
    # sample covariance entries have standard error <= sqrt(2 / n) * max variance
    scale = cov.diagonal().max()
    assert (flat.T.cov() - cov).abs().max() < 6 * math.sqrt(2 / n) * scale
    assert (flat.mean(0) - f_mu).abs().max() < 6 * math.sqrt(scale / n)


def test_prior_tuning_maximises_the_dense_marginal_likelihood():
    model = make_mlp()
    x, y = make_data("regression", n=N)
    la = FunctionalLaplace(model, "regression", n_subset=N)
    la.fit(_loader(x, y))
    la.optimize_prior_precision(method="marglik", n_steps=200, lr=0.1)
    truth = _truth_lml_fn(model, x, y, "regression", torch.arange(N))
    best = la.prior_precision.detach().expand(4).clone().requires_grad_(True)
    value = truth(best, torch.tensor(1.0))
    (grad,) = torch.autograd.grad(value, best)
    assert grad.sum().abs() < 1e-4 * value.abs()  # stationary in the scalar prior
    val = _loader(*make_data("regression", n=8, seed=7))
    la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=5,
                                pred_type=PredType.GP)  # fmt: skip
    assert la.prior_precision.numel() == 1


def test_state_dict_and_whole_object_round_trip(tmp_path):
    model = make_mlp()
    x, y = make_data("classification", n=N)
    la = FunctionalLaplace(model, "classification", n_subset=7, prior_precision=0.4, seed=2)
    la.fit(_loader(x, y))
    x_test = torch.randn(3, 3)
    expected = la(x_test)
    other = FunctionalLaplace(model, "classification", n_subset=7)
    other.load_state_dict(la.state_dict())
    torch.testing.assert_close(other(x_test), expected)
    torch.testing.assert_close(other.log_marginal_likelihood(), la.log_marginal_likelihood())
    path = tmp_path / "la.pt"
    torch.save(la, path)
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    torch.testing.assert_close(loaded(x_test), expected)
    with pytest.raises(ValueError, match="n_subset=7"):
        FunctionalLaplace(model, "classification", n_subset=5).load_state_dict(la.state_dict())


def test_bad_use_raises_clear_errors():
    model = make_mlp()
    x, y = make_data("classification", n=N)
    with pytest.raises(ValueError, match="n_subset must be a positive integer"):
        FunctionalLaplace(model, "classification", n_subset=0)
    la = FunctionalLaplace(model, "classification", n_subset=N + 1)
    with pytest.raises(ValueError, match="n_subset must be at most the number of data points"):
        la.fit(_loader(x, y))
    assert la.n_data is None
    la = FunctionalLaplace(model, "classification", n_subset=5)
    with pytest.raises(ValueError, match="not fitted"):
        la(x)
    with pytest.raises(ValueError, match="override=False"):
        la.fit(_loader(x, y), override=False)
    la.fit(_loader(x, y))
    with pytest.raises(ValueError, match="pred_type='nn'"):
        la(x, pred_type="nn")
    with pytest.raises(NotImplementedError, match="functional_samples"):
        la.sample(3)
    with pytest.raises(NotImplementedError, match="weight-space"):
        la.log_prob(torch.zeros(la.n_params))
    with pytest.raises(ValueError, match="independent_outputs"):
        FunctionalLaplace(model, "reward_modeling", n_subset=3, independent_outputs=True)


def test_factory_cells():
    model = make_mlp()
    assert type(Laplace(model, "regression", "all", "gp", n_subset=3)) is FunctionalLaplace
    la = Laplace(model, "regression", "last_layer", "gp", n_subset=3)
    assert type(la) is FunctionalLLLaplace
    with pytest.raises(ValueError, match="subset_of_weights='all' only"):
        Laplace(model, "regression", "last_layer", "gp", functional_approximation="nystrom")


def test_last_layer_is_found_on_the_first_batch_and_forgotten_when_fit_fails():
    model = make_mlp()
    x, y = make_data("regression", n=N)
    la = FunctionalLLLaplace(model, "regression", n_subset=N + 5)
    with pytest.raises(ValueError, match="n_subset"):
        la.fit(_loader(x, y))
    assert la.subset.extractor.last_layer_name is None
    la = FunctionalLLLaplace(model, "regression", n_subset=4)
    la.fit(_loader(x, y))
    assert la.subset.extractor.last_layer_name == "2" and la.n_params == 12


# ----------------------------------------------------------------------------- float32
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_float32_model_against_float64_truth(likelihood):
    """A float32 ReLU MLP with more parameters (~200) than subset points x outputs (60),
    inactive units and a small prior precision (1e-3). Truth from the same weights and data
    in float64. The float32 Jacobians carry relative errors of a few eps; the float64 Gram,
    Cholesky and solves add none, and the posterior reduction K*S B^-1 KS* is well
    conditioned relative to K** (B = I + h R K R^T >= I), so the variances agree to a few eps
    of the largest variance (measured 2.5 eps) and the marginal likelihood to a few eps
    relative (measured 0.5 eps): 50 eps is allowed for both."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    with torch.no_grad():
        model[0].bias[:4] = -50.0  # inactive units: zero Jacobian columns
    model = model.float()
    x, y = make_data(likelihood, n=40, n_out=3)
    x32, y32 = x.float(), (y.float() if y.is_floating_point() else y)
    la = FunctionalLaplace(model, likelihood, n_subset=20, prior_precision=1e-3, seed=0)
    la.fit(_loader(x32, y32, batch_size=16))
    x_test = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    f_mu, f_var = la.predictive_moments(x_test.float())
    assert f_var.dtype == torch.float32
    reference = copy.deepcopy(model).double()
    torch.testing.assert_close(f_mu.double(), reference(x_test).detach(), rtol=1e-5, atol=1e-5)
    var, _, lml = _truth(
        reference, x, y, x_test, likelihood, torch.full((la.n_params,), 1e-3),
        subset=la.subset_indices,
    )  # fmt: skip
    eps = torch.finfo(torch.float32).eps
    scale = var.diagonal(dim1=1, dim2=2).max()
    assert (f_var.double() - var).abs().max() < 50 * eps * scale
    assert abs(la.log_marginal_likelihood().item() - lml.item()) < 50 * eps * abs(lml.item())


def test_last_layer_state_round_trip_adopts_the_saved_layer():
    model = make_mlp()
    x, y = make_data("regression", n=N)
    la = FunctionalLLLaplace(model, "regression", n_subset=6, sigma_noise=0.6)
    la.fit(_loader(x, y))
    other = FunctionalLLLaplace(model, "regression", n_subset=6)  # last layer not known yet
    other.load_state_dict(la.state_dict())
    x_test = torch.randn(3, 3)
    torch.testing.assert_close(other(x_test)[1], la(x_test)[1])
    assert other.sigma_noise == la.sigma_noise


@pytest.mark.parametrize("link", ["probit", "bridge", "bridge_norm", "mc"])
def test_every_link_approximation_works(link):
    model = make_mlp(n_out=3)
    x, y = make_data("classification", n=N, n_out=3)
    la = FunctionalLaplace(model, "classification", n_subset=N)
    la.fit(_loader(x, y))
    probs = la(x[:4], link_approx=link, n_samples=200, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (4, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_dict_batches_with_a_collate_function():
    """Hugging Face style: a dataset of dicts and a collate_fn building UserDict batches; the
    subset is read through the same collate_fn and gives the tensor-batch numbers."""
    from collections import UserDict

    class DictModel(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, batch):
            return self.net(batch["input_ids"])

    net = make_mlp()
    x, y = make_data("classification", n=N)
    items = [{"input_ids": xi, "labels": yi} for xi, yi in zip(x, y)]

    def collate(rows):
        return UserDict({k: torch.stack([r[k] for r in rows]) for k in rows[0]})

    loader = DataLoader(items, batch_size=4, collate_fn=collate)
    la = FunctionalLaplace(DictModel(net), "classification", n_subset=6, seed=4)
    la.fit(loader)
    plain = FunctionalLaplace(net, "classification", n_subset=6, seed=4)
    plain.fit(_loader(x, y))
    x_test = torch.randn(3, 3)
    torch.testing.assert_close(la(collate([{"input_ids": xi} for xi in x_test])), plain(x_test))
    torch.testing.assert_close(la.log_marginal_likelihood(), plain.log_marginal_likelihood())
