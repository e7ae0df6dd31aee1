"""Subnetwork Laplace against naive dense float64 algebra and against the all-weights classes.

Every subnetwork class must equal (a) a dense computation restricted to the indices: the
sub-matrix of the dense curvature from ``groundtruth``, the dense marginal likelihood and the
predictive variance ``J_S P^-1 J_S^T``; (b) the all-weights class when the indices select every
parameter; (c) the all-weights class on a copy of the model where only the selected parameter
tensors require gradients.
"""

from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from groundtruth import (
    dense_ef,
    dense_ggn,
    dense_hessian,
    dense_jacobians,
    flat_params,
    total_loss,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import (
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    EFInterface,
    GGNInterface,
)
from laplace.subnetlaplace import DiagSubnetLaplace, FullSubnetLaplace, SubnetLaplace

SUBNET = {"full": FullSubnetLaplace, "diag": DiagSubnetLaplace}
ALL = {"full": FullLaplace, "diag": DiagLaplace}
STRUCTURES = list(SUBNET)
REFERENCE = {EFInterface: dense_ef, CurvlinopsEF: dense_ef, CurvlinopsHessian: dense_hessian}


def loader(x, y, batch_size=5):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def setup(model_name, likelihood):
    if model_name == "cnn":
        return make_cnn(), *make_data(likelihood, n_out=3, image=True)
    return make_mlp(), *make_data(likelihood)


def some_indices(model, k=7, seed=3):
    """``k`` distinct indices in random (unsorted) order across all parameter tensors."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def tensor_indices(model, names):
    """The indices of the parameter tensors ``names`` in the trainable vector."""
    ranges, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            ranges[name] = torch.arange(start, start + p.numel())
            start += p.numel()
    return torch.cat([ranges[name] for name in names])


def frozen_copy(model, trainable_names):
    """A copy of ``model`` where only the parameters ``trainable_names`` require gradients."""
    copied = copy.deepcopy(model)
    for name, p in copied.named_parameters():
        p.requires_grad_(name in trainable_names)
    return copied


def naive_posterior(H_S, structure, prior_prec, factor):
    """Dense ``P = factor * H_S + diag(p0)`` (only the diagonal of ``H_S`` for diag)."""
    if structure == "diag":
        H_S = torch.diag(H_S.diagonal())
    return factor * H_S + torch.diag(prior_prec.expand(H_S.shape[0]))


def naive_marglik(model, x, y, likelihood, idx, P, prior_prec, prior_mean, sigma, temp):
    loss = total_loss(model, x, y, likelihood)
    log_lik = -loss / (sigma**2 * temp)
    if likelihood == "regression":
        log_lik = log_lik - y.numel() * math.log(sigma * math.sqrt(2 * math.pi))
    p0 = prior_prec.expand(len(idx))
    delta = flat_params(model)[idx] - prior_mean
    log_det_ratio = torch.logdet(P) - p0.log().sum()
    return log_lik - 0.5 * (log_det_ratio + delta @ (p0 * delta))


def assert_same_fit(la, ref, x, likelihood):
    """Equal curvature, marginal likelihood, GLM predictive and posterior variance."""
    torch.testing.assert_close(la._curvature.to_dense(), ref._curvature.to_dense())
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    torch.testing.assert_close(la.posterior_variance, ref.posterior_variance)
    if likelihood == "regression":
        for out, expected in zip(la(x, joint=True), ref(x, joint=True)):
            torch.testing.assert_close(out, expected)
    else:
        torch.testing.assert_close(la(x, link_approx="bridge"), ref(x, link_approx="bridge"))


# --------------------------------------------------------------- (a) dense ground truth
@functools.cache
def dense_curvature(model_name, likelihood, reference):
    """The dense curvature of the full model, computed once per model, likelihood and kind."""
    model, x, y = setup(model_name, likelihood)
    return reference(model, x, y, likelihood)


@pytest.mark.parametrize(
    "backend",
    [GGNInterface, EFInterface, CurvlinopsGGN, CurvlinopsEF, CurvlinopsHessian, BackPackGGN],
    ids=lambda b: b.__name__,
)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_curvature_is_dense_submatrix(backend, model_name, likelihood):
    model, x, y = setup(model_name, likelihood)
    idx = some_indices(model)
    H = dense_curvature(model_name, likelihood, REFERENCE.get(backend, dense_ggn))[idx][:, idx]
    for structure, expected in (("full", H), ("diag", torch.diag(H.diagonal()))):
        la = SUBNET[structure](model, likelihood, idx, backend=backend)
        la.fit(loader(x, y))
        torch.testing.assert_close(la._curvature.to_dense(), expected, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(la.loss, total_loss(model, x, y, likelihood))
        assert la.n_params_subnet == len(idx)
        # laplace-torch's n_params / n_layers count the whole model's trainable parameters
        assert la.n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert la.n_layers == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("prior", ["scalar", "per-parameter"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_marglik_and_predictive_equal_dense(structure, prior, likelihood):
    model, x, y = setup("mlp", likelihood)
    idx = some_indices(model)
    sigma, temp, prior_mean = (0.7 if likelihood == "regression" else 1.0), 0.8, 0.1
    la = SUBNET[structure](
        model, likelihood, idx, sigma_noise=sigma, temperature=temp, prior_mean=prior_mean
    )
    la.fit(loader(x, y))
    prior_prec = torch.tensor([0.6]) if prior == "scalar" else torch.linspace(0.5, 3.0, len(idx))
    H_S = dense_ggn(model, x, y, likelihood)[idx][:, idx]
    P = naive_posterior(H_S, structure, prior_prec, 1 / (sigma**2 * temp))
    expected = naive_marglik(model, x, y, likelihood, idx, P, prior_prec, prior_mean, sigma, temp)
    torch.testing.assert_close(la.log_marginal_likelihood(prior_precision=prior_prec), expected)
    torch.testing.assert_close(la.posterior_precision, P if structure == "full" else P.diagonal())
    Js = dense_jacobians(model, x)[:, :, idx]
    f_var = Js @ torch.linalg.solve(P, Js.mT)
    torch.testing.assert_close(la.functional_variance(Js), f_var)
    if likelihood == "regression":
        f_mu, f_var_la = la(x)
        torch.testing.assert_close(f_mu, model(x).detach())
        torch.testing.assert_close(f_var_la, f_var)
        joint = Js.flatten(0, 1) @ torch.linalg.solve(P, Js.flatten(0, 1).T)
        torch.testing.assert_close(la(x, joint=True)[1], joint)
    else:
        kappa = torch.rsqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
        torch.testing.assert_close(la(x), torch.softmax(kappa * model(x).detach(), -1))


def test_frozen_body_indices_refer_to_trainable_vector(likelihood):
    """LoRA-like: the body is frozen; indices and curvature are over the trainable head."""
    model, x, y = setup("mlp", likelihood)
    for p in model[0].parameters():
        p.requires_grad_(False)
    n_trainable = sum(p.numel() for p in model[2].parameters())
    idx = torch.tensor([11, 0, 3, 7])
    la = FullSubnetLaplace(model, likelihood, idx, prior_precision=0.5)
    la.fit(loader(x, y))
    H = dense_ggn(model, x, y, likelihood)  # over the trainable parameters only
    torch.testing.assert_close(la.H, H[idx][:, idx])  # the public H, as in laplace-torch
    assert la.mean.shape == (n_trainable,)
    torch.testing.assert_close(la.mean_subnet, flat_params(model)[idx])
    Js = dense_jacobians(model, x)[:, :, idx]
    P = H[idx][:, idx] + 0.5 * torch.eye(4)
    torch.testing.assert_close(la.functional_variance(Js), Js @ torch.linalg.solve(P, Js.mT))
    with pytest.raises(ValueError, match=r"\[12\]"):
        FullSubnetLaplace(model, likelihood, torch.tensor([0, n_trainable]))


# --------------------------------------------------------------- (b), (c) all-weights classes
@pytest.mark.parametrize("order", ["sorted", "permuted"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_all_indices_equal_all_weights(structure, order, likelihood):
    model, x, y = setup("mlp", likelihood)
    n = sum(p.numel() for p in model.parameters())
    idx = torch.arange(n) if order == "sorted" else some_indices(model, k=n)
    la = SUBNET[structure](model, likelihood, idx, prior_precision=0.3)
    ref = ALL[structure](model, likelihood, prior_precision=0.3)
    la.fit(loader(x, y))
    ref.fit(loader(x, y))
    torch.testing.assert_close(la._curvature.to_dense(), ref._curvature.to_dense()[idx][:, idx])
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    torch.testing.assert_close(la.posterior_variance, ref.posterior_variance[idx])
    if likelihood == "regression":
        for out, expected in zip(la(x, joint=True), ref(x, joint=True)):
            torch.testing.assert_close(out, expected)
    else:
        torch.testing.assert_close(la(x, link_approx="bridge"), ref(x, link_approx="bridge"))
    la.optimize_prior_precision(n_steps=20)
    ref.optimize_prior_precision(n_steps=20)
    torch.testing.assert_close(la.prior_precision, ref.prior_precision)


@pytest.mark.parametrize(
    "names", [["2.weight", "2.bias"], ["0.bias", "2.weight"]], ids=["head", "mixed"]
)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_selected_tensors_equal_all_weights_on_frozen_model(structure, names, likelihood):
    model, x, y = setup("mlp", likelihood)
    idx = tensor_indices(model, names)
    prior = torch.linspace(0.5, 2.0, len(idx))
    la = SUBNET[structure](model, likelihood, idx, prior_precision=prior, prior_mean=0.2)
    ref = ALL[structure](frozen_copy(model, names), likelihood, prior_precision=prior)
    ref.prior_mean = 0.2
    la.fit(loader(x, y))
    ref.fit(loader(x, y))
    assert_same_fit(la, ref, x, likelihood)
    samples = la.sample(5, generator=torch.Generator().manual_seed(4))
    ref_samples = ref.sample(5, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(samples[:, idx], ref_samples)
    nn_out = la(x, pred_type="nn", n_samples=5, generator=torch.Generator().manual_seed(4))
    ref_out = ref(x, pred_type="nn", n_samples=5, generator=torch.Generator().manual_seed(4))
    for out, expected in zip(nn_out, ref_out):
        torch.testing.assert_close(out, expected)


# --------------------------------------------------------------- samples and densities
@pytest.mark.parametrize("structure", STRUCTURES)
def test_samples_vary_only_in_subnetwork(structure):
    model, x, y = setup("mlp", "regression")
    idx = some_indices(model, k=5)
    la = SUBNET[structure](model, "regression", idx, prior_precision=2.0)
    la.fit(loader(x, y))
    samples = la.sample(4000, generator=torch.Generator().manual_seed(0))
    n = la.mean.numel()
    assert samples.shape == (4000, n)
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(samples[:, rest], la.mean[rest].expand(4000, -1))
    assert (samples[:, idx].std(0) > 0).all()
    cov = torch.cov(samples[:, idx].T)
    expected = la.posterior_covariance
    expected = torch.diag(expected) if structure == "diag" else expected
    torch.testing.assert_close(cov, expected, atol=0.05 * expected.abs().max(), rtol=0)
    gaussian = torch.distributions.MultivariateNormal(la.mean_subnet, expected)
    torch.testing.assert_close(la.log_prob(samples[:10]), gaussian.log_prob(samples[:10, idx]))


def test_assemble_full_samples_and_shape_errors():
    model, x, y = setup("mlp", "classification")
    idx = torch.tensor([5, 1, 30])
    la = FullSubnetLaplace(model, "classification", idx)
    la.fit(loader(x, y))
    values = torch.arange(6.0).reshape(2, 3)
    full = la.assemble_full_samples(values)
    assert torch.equal(full[:, idx], values)
    assert torch.equal(full[:, [0, 2, 31]], la.mean[[0, 2, 31]].expand(2, -1))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        la.assemble_full_samples(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="32 entries"):
        la.log_prob(la.mean_subnet)


# --------------------------------------------------------------- priors
def test_prior_shapes():
    model, x, y = setup("mlp", "classification")
    idx = some_indices(model, k=4)
    la = DiagSubnetLaplace(model, "classification", idx)
    la.fit(loader(x, y))
    for prior in (0.5, torch.tensor(0.5), torch.tensor([0.5]), torch.full((4,), 0.5)):
        la.prior_precision = prior
        torch.testing.assert_close(la.prior_precision_diag, torch.full((4,), 0.5))
    assert la.n_layers == 4  # the model's parameter tensors; the prior is one block
    for wrong in (torch.ones(3), torch.ones(la.mean.numel())):
        with pytest.raises(ValueError, match="prior_precision"):
            la.prior_precision = wrong
    la.prior_mean = torch.arange(4.0)
    delta = la.mean_subnet - torch.arange(4.0)
    torch.testing.assert_close(la.scatter, 0.5 * delta @ delta)
    with pytest.raises(ValueError, match="prior_mean"):
        la.prior_mean = torch.zeros(la.mean.numel())
    la.optimize_prior_precision(n_steps=5, prior_structure="layerwise")
    assert la.prior_precision.shape == (1,)
    la.optimize_prior_precision(n_steps=5, prior_structure="diag")
    assert la.prior_precision.shape == (4,)


# --------------------------------------------------------------- errors and state
@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([0, 1], "LongTensor, got list"),
        (torch.tensor([[0, 1]]), r"1-d tensor, got shape \(1, 2\)"),
        (torch.tensor([], dtype=torch.long), "non-empty"),
        (torch.tensor([0.0, 1.0]), "integer tensor, got dtype torch.float64"),
        (torch.tensor([True, False]), "boolean mask"),
        (torch.tensor([3, -1, 40, 32]), r"out-of-range values \[-1, 40, 32\]"),
        (torch.tensor([4, 2, 4, 9, 2]), r"duplicated values \[2, 4\]"),
    ],
    ids=["list", "2d", "empty", "float", "bool", "range", "duplicates"],
)
def test_invalid_indices(indices, match):
    with pytest.raises(ValueError, match=match):
        FullSubnetLaplace(make_mlp(), "classification", indices)


def test_int32_indices_are_accepted():
    la = FullSubnetLaplace(make_mlp(), "classification", torch.tensor([3, 1], dtype=torch.int32))
    assert la.subnetwork_indices.dtype == torch.long
    assert la.backend.subnetwork_indices.tolist() == [3, 1]


def test_unsupported_structures():
    model = make_mlp()

    class KronSubnetLaplace(SubnetLaplace, KronLaplace):
        pass

    with pytest.raises(ValueError, match="'full' or 'diag', got 'kron'"):
        KronSubnetLaplace(model, "classification", torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="abstract"):
        SubnetLaplace(model, "classification", torch.tensor([0, 1]))


def test_state_dict_and_pickle_roundtrip():
    model, x, y = setup("mlp", "regression")
    idx = some_indices(model)
    la = FullSubnetLaplace(model, "regression", idx, sigma_noise=0.5, prior_precision=0.7)
    la.fit(loader(x, y))
    other = FullSubnetLaplace(model, "regression", idx)
    other.load_state_dict(la.state_dict())
    torch.testing.assert_close(other.log_marginal_likelihood(), la.log_marginal_likelihood())
    for wrong in (idx.flip(0), idx[:-1]):
        with pytest.raises(ValueError, match="subnetwork_indices"):
            FullSubnetLaplace(model, "regression", wrong).load_state_dict(la.state_dict())
    full = FullLaplace(model, "regression")
    full.fit(loader(x, y))
    with pytest.raises(ValueError, match="not by a subnetwork Laplace"):
        other.load_state_dict(full.state_dict())
    buffer = io.BytesIO()
    torch.save(la, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for out, expected in zip(loaded(x), la(x)):
        torch.testing.assert_close(out, expected)


def test_frozen_requires_grad_model_has_no_parameters():
    model = make_mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=True"):
        FullSubnetLaplace(model, "classification", torch.tensor([0]))


def test_backend_restriction_matches_subset(likelihood):
    """The backend built by the class returns Jacobians restricted to the indices."""
    model, x, _ = setup("mlp", likelihood)
    idx = some_indices(model)
    la = DiagSubnetLaplace(model, likelihood, idx, backend=GGNInterface)
    Js, f = la.backend.jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(model, x)[:, :, idx])
    torch.testing.assert_close(f, model(x).detach())
    assert isinstance(la, DiagLaplace) and not isinstance(la, nn.Module)
