"""The per-layer GLM variance of Kron and diag posteriors equals the dense ``J P^-1 J^T``."""

from __future__ import annotations

import pytest
import torch
from conftest import make_data, make_mlp
from groundtruth import dense_jacobians
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import DiagLaplace, KronLaplace
from laplace.utils.linear_jacobians import linear_jacobian_factors


def fitted(model, likelihood, **kwargs):
    x, y = make_data(likelihood, n_out=2)
    la = KronLaplace(
        model, likelihood, prior_precision=torch.tensor([0.3, 0.5, 0.7, 0.9]), **kwargs
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=5))
    return la, x


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_factored_variance_matches_dense(likelihood, damping):
    model = make_mlp()
    la, x = fitted(model, likelihood, damping=damping)
    assert linear_jacobian_factors(model, la.subset.named_params, x) is not None
    Js = dense_jacobians(model, x)
    cov = la.posterior_precision.to_matrix(exponent=-1)
    expected = torch.einsum("bkp,pq,blq->bkl", Js, cov, Js)
    _, f_var = la._glm_predictive_distribution(x)
    torch.testing.assert_close(f_var, expected)
    torch.testing.assert_close(la.functional_variance(Js), expected)


def test_factored_variance_with_a_frozen_layer_and_backprop():
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    x, y = make_data("regression")
    la = KronLaplace(model, "regression", enable_backprop=True)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=6))
    Js = dense_jacobians(model, x)
    _, f_var = la(x)
    torch.testing.assert_close(f_var.detach(), la.functional_variance(Js))
    x_in = x[:2].clone().requires_grad_(True)
    f_mu, f_var = la(x_in)
    (f_var.sum() + f_mu.sum()).backward()
    generic_x = x[:2].clone().requires_grad_(True)
    Js, f = la.backend.jacobians(generic_x, enable_backprop=True)
    (la.functional_variance(Js).sum() + f.sum()).backward()
    torch.testing.assert_close(x_in.grad, generic_x.grad)


def test_shared_or_non_linear_layers_fall_back():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    model = Twice()
    params = dict(model.named_parameters())
    assert linear_jacobian_factors(model, params, torch.randn(4, 3, generator=g)) is None
    conv = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten())
    images = torch.randn(2, 1, 4, 4, generator=g)
    assert linear_jacobian_factors(conv, dict(conv.named_parameters()), images) is None
    la = KronLaplace(model, "regression")
    x = torch.randn(8, 3, generator=g)
    la.fit(DataLoader(TensorDataset(x, torch.randn(8, 3, generator=g)), batch_size=4))
    Js = dense_jacobians(model, x)
    torch.testing.assert_close(la(x)[1], la.functional_variance(Js))


def test_layer_that_folds_several_vectors_into_its_batch_falls_back():
    class PairScore(nn.Module):
        """``(batch, 2, dim) -> (batch, 2)``; the layer sees a ``(2 * batch, dim)`` input."""

        def __init__(self):
            super().__init__()
            self.score = nn.Linear(3, 1)

        def forward(self, x):
            return self.score(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], -1)

    torch.manual_seed(0)
    model = PairScore()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, generator=g)
    assert linear_jacobian_factors(model, dict(model.named_parameters()), x) is None
    la = KronLaplace(model, "regression")
    la.fit(DataLoader(TensorDataset(x, torch.randn(4, 2, generator=g)), batch_size=2))
    _, f_var = la(x)
    assert f_var.shape == (4, 2, 2)
    torch.testing.assert_close(f_var, la.functional_variance(dense_jacobians(model, x)))


@pytest.mark.parametrize("prior", ["scalar", "layerwise", "diagonal"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_diag_factored_variance_matches_dense_without_jacobians(monkeypatch, likelihood, prior):
    model = make_mlp(n_out=3)
    x, y = make_data(likelihood, n_out=3)
    n_params = sum(p.numel() for p in model.parameters())
    priors = {
        "scalar": torch.tensor(0.7),
        "layerwise": torch.tensor([0.3, 0.5, 0.7, 0.9]),
        "diagonal": torch.linspace(0.2, 2.0, n_params),
    }
    la = DiagLaplace(model, likelihood, prior_precision=priors[prior])
    la.fit(DataLoader(TensorDataset(x, y), batch_size=5))
    Js = dense_jacobians(model, x)
    expected = torch.einsum("bkp,p,blp->bkl", Js, la.posterior_variance, Js)
    monkeypatch.setattr(type(la.backend), "jacobians", lambda *a, **k: pytest.fail("Jacobians"))
    _, f_var = la._glm_predictive_distribution(x)
    torch.testing.assert_close(f_var, expected)
    if likelihood == "regression":
        torch.testing.assert_close(la(x)[1], expected)
    else:
        probs = la(x, link_approx="probit")
        kappa = 1 / torch.sqrt(1 + torch.pi / 8 * expected.diagonal(dim1=1, dim2=2))
        torch.testing.assert_close(probs, torch.softmax(kappa * la.model(x), -1))
