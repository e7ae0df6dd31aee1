"""All-weights Laplace (full, kron, diag) against dense float64 ground truth."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from groundtruth import dense_ef, dense_ggn, dense_jacobians, flat_params, total_loss
from kfac_reference import kfac_blocks, naive_kfac
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, EFInterface, GGNInterface

CLASSES = {"full": FullLaplace, "kron": KronLaplace, "diag": DiagLaplace}


def loader(x, y, batch_size=5):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def setup(model_name, likelihood):
    if model_name == "mlp":
        return make_mlp(), *make_data(likelihood)
    return make_cnn(), *make_data(likelihood, n_out=3, image=True)


def dense_kfac(model, x, y, likelihood, batch_size=5):
    """Dense block-diagonal naive K-FAC of the data set, its factors summed over the batches
    of ``loader(x, y, batch_size)`` as a Kron fit accumulates them."""
    batches = [
        naive_kfac(model, xb, yb, likelihood, "ggn", n_data=len(x))
        for xb, yb in loader(x, y, batch_size)
    ]
    summed = [[sum(factors) for factors in zip(*blocks)] for blocks in zip(*batches)]
    return torch.block_diag(*kfac_blocks(summed))


def dense_curvature(la, model, x, y, likelihood, backend):
    """Ground-truth H for the structure of ``la``: dense / diag of dense / Kron's own matrix."""
    reference = dense_ef if backend in (EFInterface, CurvlinopsEF) else dense_ggn
    H = reference(model, x, y, likelihood)
    if isinstance(la, DiagLaplace):
        return torch.diag(torch.diagonal(H))
    return H


@pytest.mark.parametrize("backend", [GGNInterface, EFInterface, CurvlinopsGGN, CurvlinopsEF])
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_fit_curvature_matches_dense(structure, backend, model_name, likelihood):
    model, x, y = setup(model_name, likelihood)
    la = CLASSES[structure](model, likelihood, backend=backend)
    la.fit(loader(x, y))
    expected = dense_curvature(la, model, x, y, likelihood, backend)
    torch.testing.assert_close(la._curvature.to_dense(), expected, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(la.loss, total_loss(model, x, y, likelihood))
    n_outputs = model(x).shape[-1]  # 2 for the MLP, 3 for the CNN, whatever the likelihood
    if likelihood == "regression":
        assert y.shape == (len(x), n_outputs)
    assert la.n_data == len(x)
    assert la.n_outputs == n_outputs


@pytest.mark.parametrize("backend", [GGNInterface, CurvlinopsGGN])
def test_kron_fit_full_batch_equals_backend_kron(backend, likelihood):
    model, x, y = setup("mlp", likelihood)
    if backend is GGNInterface:
        with pytest.raises(ValueError, match="kron"):
            KronLaplace(model, likelihood, backend=backend)
        return
    la = KronLaplace(model, likelihood, backend=backend)
    la.fit(loader(x, y, batch_size=len(x)))
    _, kron = backend(model, likelihood).kron(x, y, N=len(x))
    torch.testing.assert_close(la._curvature.to_dense(), kron.to_matrix())
    expected = dense_kfac(model, x, y, likelihood, batch_size=len(x))
    torch.testing.assert_close(la._curvature.to_dense(), expected, atol=1e-9, rtol=1e-7)


def posterior_dense(la):
    """Dense P = H / (sigma^2 T) + diag(p0) from the fitted curvature."""
    return la._H_factor * la._curvature.to_dense() + torch.diag(la.prior_precision_diag)


PRIORS = {
    "scalar": lambda la: torch.tensor([0.7]),
    "layerwise": lambda la: torch.linspace(0.5, 2.0, la.n_layers),
    "diag": lambda la: torch.linspace(0.5, 2.0, la.n_params),
}


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_log_marginal_likelihood_closed_form(structure, prior, likelihood):
    model, x, y = setup("mlp", likelihood)
    sigma = 0.8 if likelihood == "regression" else 1.0
    la = CLASSES[structure](model, likelihood, sigma_noise=sigma, prior_mean=0.1, temperature=0.9)
    la.fit(loader(x, y))
    prior_prec = PRIORS[prior](la)
    if structure == "kron" and prior == "diag":
        with pytest.raises(ValueError, match="layerwise"):
            la.log_marginal_likelihood(prior_precision=prior_prec)
        return
    lml = la.log_marginal_likelihood(prior_precision=prior_prec)
    P = posterior_dense(la)
    P0 = la.prior_precision_diag
    theta = flat_params(model)
    loss = total_loss(model, x, y, likelihood)
    if likelihood == "regression":
        n, k = y.shape
        log_lik = -loss / sigma**2 / 0.9 - n * k * math.log(sigma * math.sqrt(2 * math.pi))
    else:
        log_lik = -loss / 0.9
    delta = theta - 0.1
    expected = log_lik - 0.5 * (torch.logdet(P) - P0.log().sum() + delta @ (P0 * delta))
    torch.testing.assert_close(lml, expected)


def test_marglik_equals_exact_evidence_of_linear_regression():
    """For a linear model at its MAP the Laplace evidence is exact (Bayesian linear regression)."""
    torch.manual_seed(0)
    n, d = 30, 3
    X = torch.randn(n, d)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3 * torch.randn(n, 1)
    sigma, alpha = 0.4, 2.0
    Phi = torch.cat([X, torch.ones(n, 1)], 1)  # weight then bias, as in named_parameters
    A = Phi.T @ Phi / sigma**2 + alpha * torch.eye(d + 1)
    w = torch.linalg.solve(A, Phi.T @ y / sigma**2)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(w[:d].T)
        model.bias.copy_(w[d])
    la = FullLaplace(model, "regression", sigma_noise=sigma, prior_precision=alpha)
    la.fit(loader(X, y))
    cov = sigma**2 * torch.eye(n) + Phi @ Phi.T / alpha
    exact = torch.distributions.MultivariateNormal(torch.zeros(n), cov).log_prob(y[:, 0])
    torch.testing.assert_close(la.log_marginal_likelihood(), exact)


# Kron takes no per-parameter prior: that combination raises, as checked in
# test_log_marginal_likelihood_closed_form, so there is no gradient to check.
@pytest.mark.parametrize(
    ("structure", "prior"),
    [(s, p) for s in ("full", "kron", "diag") for p in PRIORS if (s, p) != ("kron", "diag")],
)
def test_marglik_gradients_match_finite_differences(structure, prior):
    model, x, y = setup("mlp", "regression")
    la = CLASSES[structure](model, "regression")
    la.fit(loader(x, y))
    log_prior = PRIORS[prior](la).log().requires_grad_(True)
    log_sigma = torch.tensor(-0.2, requires_grad=True)

    def marglik(lp, ls):
        return la.log_marginal_likelihood(prior_precision=lp.exp(), sigma_noise=ls.exp())

    assert torch.autograd.gradcheck(marglik, (log_prior, log_sigma))


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_samples_match_mean_and_covariance(structure, likelihood):
    model, x, y = setup("mlp", likelihood)
    la = CLASSES[structure](model, likelihood, prior_precision=0.5)
    la.fit(loader(x, y))
    gen = torch.Generator().manual_seed(0)
    samples = la.sample(100_000, generator=gen)
    assert samples.shape == (100_000, la.n_params)
    cov = torch.linalg.inv(posterior_dense(la))
    torch.testing.assert_close(
        samples.mean(0), la.mean, atol=0.03 * cov.diag().max().sqrt(), rtol=0
    )
    emp = torch.cov(samples.T)
    assert (emp - cov).abs().max() < 0.03 * cov.diag().max()
    torch.testing.assert_close(
        la.posterior_variance
        if structure == "diag"
        else torch.diagonal(
            la.posterior_covariance
            if structure == "full"
            else la.posterior_precision.to_matrix(-1)
        ),
        cov.diagonal(),
    )


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_glm_variance_is_dense_jacobian_quadratic_form(structure, model_name, likelihood):
    model, x, y = setup(model_name, likelihood)
    la = CLASSES[structure](model, likelihood, prior_precision=0.3)
    la.fit(loader(x, y))
    Js = dense_jacobians(model, x[:4])
    cov = torch.linalg.inv(posterior_dense(la))
    expected = torch.einsum("bkp,pq,blq->bkl", Js, cov, Js)
    torch.testing.assert_close(la.functional_variance(Js), expected)
    Jflat = Js.reshape(-1, Js.shape[-1])
    torch.testing.assert_close(la.functional_covariance(Js), Jflat @ cov @ Jflat.T)
    if likelihood == "regression":
        f_mu, f_var = la(x[:4])
        torch.testing.assert_close(f_mu, model(x[:4]).detach())
        torch.testing.assert_close(f_var, expected)
        f_mu_j, f_var_j = la(x[:4], joint=True)
        torch.testing.assert_close(f_var_j, Jflat @ cov @ Jflat.T)
        assert f_mu_j.shape == (Jflat.shape[0],)
        _, f_var_d = la(x[:4], diagonal_output=True)
        torch.testing.assert_close(f_var_d, expected.diagonal(dim1=1, dim2=2))
    else:
        probs = la(x[:4], link_approx="probit")
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * expected.diagonal(dim1=1, dim2=2))
        torch.testing.assert_close(probs, torch.softmax(kappa * model(x[:4]).detach(), -1))


def test_psd_backends_clamp_roundoff_and_hessian_keeps_indefinite_directions():
    from laplace.curvature import CurvlinopsHessian

    model, x, y = setup("mlp", "classification")
    la = FullLaplace(model, "classification", backend=CurvlinopsGGN)
    la.fit(loader(x, y))
    assert la._curvature.assume_psd
    la._curvature.H.sub_(1e-3 * torch.eye(la.n_params))  # push the GGN's null space below zero
    la._curvature._eigen = None
    assert la._curvature.eigendecomposition()[0].min() == 0
    la_hess = FullLaplace(model, "classification", backend=CurvlinopsHessian, prior_precision=10.0)
    la_hess.fit(loader(x, y))
    assert not la_hess._curvature.assume_psd
    eigenvalues = la_hess._curvature.eigendecomposition()[0]
    torch.testing.assert_close(eigenvalues, torch.linalg.eigvalsh(la_hess._curvature.to_dense()))


# ---------------------------------------------------------------------------- public H
def _public_H_reference(la, model, x, y, likelihood):
    """``la.H`` as laplace-torch exposes it (as a dense matrix for kron), from the dense GGN
    or, for kron, the naive K-FAC of the fit's batches."""
    if isinstance(la, KronLaplace):
        return dense_kfac(model, x, y, likelihood)
    ggn = dense_ggn(model, x, y, likelihood)
    if isinstance(la, DiagLaplace):
        return torch.diagonal(ggn)
    return ggn


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_public_H_has_laplace_torch_types(structure, likelihood):
    from laplace.utils import Kron, KronDecomposed

    model, x, y = setup("mlp", likelihood)
    la = CLASSES[structure](model, likelihood)
    before = la.H  # zeros before fit, as in laplace-torch
    dense_before = before.to_matrix() if structure == "kron" else before
    assert dense_before.shape[0] == la.n_params and not dense_before.any()
    la.fit(loader(x, y))
    expected = _public_H_reference(la, model, x, y, likelihood)
    if structure == "kron":  # laplace-torch: the decomposed K-FAC, factors in H_facs
        assert isinstance(la.H, KronDecomposed) and isinstance(la.H_facs, Kron)
        torch.testing.assert_close(la.H.to_matrix(), expected, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(la.H_facs.to_matrix(), expected, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(la.H.to_matrix(), la._curvature.to_dense())
    else:
        assert isinstance(la.H, torch.Tensor)
        torch.testing.assert_close(la.H, expected)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_assigning_public_H_replaces_the_curvature(structure):
    likelihood = "regression"
    model, x, y = setup("mlp", likelihood)
    fitted = CLASSES[structure](model, likelihood, prior_precision=0.5)
    fitted.fit(loader(x, y))
    other = CLASSES[structure](model, likelihood, prior_precision=0.5)
    other.fit(loader(x[:4], y[:4]))
    before = other.log_det_posterior_precision
    other.H = fitted.H
    assert not torch.allclose(before, other.log_det_posterior_precision)
    torch.testing.assert_close(
        other.log_det_posterior_precision, fitted.log_det_posterior_precision
    )


def test_assigning_a_mismatched_H_raises():
    model, x, y = setup("mlp", "regression")
    la = FullLaplace(model, "regression")
    la.fit(loader(x, y))
    with pytest.raises(ValueError, match="shape"):
        la.H = torch.eye(la.n_params + 1)
    with pytest.raises(TypeError, match="Tensor"):
        la.H = [[1.0]]
    diag = DiagLaplace(model, "regression")
    with pytest.raises(ValueError, match="shape"):
        diag.H = torch.ones(diag.n_params, diag.n_params)
    kron = KronLaplace(model, "regression")
    kron.fit(loader(x, y))
    with pytest.raises(ValueError, match="without prior"):
        kron.H = kron.posterior_precision  # the prior is added: not a curvature
