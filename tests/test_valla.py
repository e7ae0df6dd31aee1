"""VaLLA against brute-force truth from dense Jacobians (float64 unless stated).

Truth: dense per-sample Jacobians ``J`` (``tests.groundtruth``), the kernel
``K = J J^T / lambda``, the variational covariance ``S = K_ZZ - K_ZZ (K_ZZ + A^-1)^-1 K_ZZ``
with ``A = L L^T``, the predictive ``k** - k*Z K_ZZ^-1 (K_ZZ - S) K_ZZ^-1 kZ*``, the Gaussian
KL divergence from ``torch.distributions`` and the data term by Gauss-Hermite quadrature
(regression) or by many Monte Carlo draws (classification). With ``alpha = 0`` and the
inducing points at every training input and output, the optimal ``A`` is ``I / sigma^2``:
``S`` is then the exact GP posterior covariance and VaLLA's predictive is ``FullLaplace``'s;
the ELBO is the exact log marginal likelihood less the cost of the mean VaLLA keeps at the
network output (tight when the network interpolates the data; Titsias, 2009).
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence
from torch.utils.data import DataLoader, TensorDataset

from laplace import FullLaplace
from laplace.functional.inducing import kmeans_nearest
from laplace.functional.valla import VaLLA
from tests import float32_truth
from tests.conftest import make_mlp
from tests.groundtruth import dense_jacobians

N = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: more threads only contend (10x slower on two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(likelihood: str, n: int = N, n_out: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, x_test = torch.randn(n, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.randint(n_out, (n,), generator=g) if likelihood != "regression" else None
    return x, (torch.randn(n, n_out, generator=g) if y is None else y), x_test


def _loader(x, y, batch_size=N, shuffle=False):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def _packed(L: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.tril_indices(len(L), len(L))
    return L[rows, cols]


def _set_state(la, Z, L, prior=None, sigma=None):
    """Put given inducing inputs, factor and hyperparameters into a fitted ``la``."""
    la.inducing_locations = nn.Parameter(Z.clone())
    la.L = nn.Parameter(_packed(L).clone())
    if prior is not None:
        la.prior_precision = prior
    if sigma is not None:
        la.sigma_noise = sigma


def _random_factor(M: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tril(torch.randn(M, M, generator=g)) * 0.6 + torch.eye(M)


def _dense_posterior(model, Z, classes, L, prior, x_star):
    """Brute force: ``(K_ZZ, S, Cov[f*])`` from dense Jacobians, joint over ``x_star``."""
    J_Z = dense_jacobians(model, Z)[torch.arange(len(Z)), classes]
    J_s = dense_jacobians(model, x_star).flatten(0, 1)
    K, K_sZ, K_ss = J_Z @ J_Z.T / prior, J_s @ J_Z.T / prior, J_s @ J_s.T / prior
    A_inv = torch.linalg.inv(L @ L.T)
    S = K - K @ torch.linalg.solve(K + A_inv, K)
    middle = torch.linalg.solve(K, torch.linalg.solve(K, K - S).T)
    return K, S, K_ss - K_sZ @ middle @ K_sZ.T


def _fitted(model, likelihood, x, y, **kwargs):
    la = VaLLA(model, likelihood, **kwargs)
    la.fit(_loader(x, y), iterations=1)
    return la


# ----------------------------------------------------------------------------- the math
def test_kernel_blocks_equal_dense_jacobian_products():
    model = make_mlp(n_out=2)
    x, y, x_test = _data("regression")
    classes = torch.tensor([0, 1, 1, 0])
    la = _fitted(model, "regression", x, y, inducing_locations=x[:4], inducing_classes=classes)
    _set_state(la, x[:4], torch.zeros(4, 4), prior=2.5)  # L = 0: q(u) = p(u), Cov = k
    J_Z = dense_jacobians(model, x[:4])[torch.arange(4), classes]
    torch.testing.assert_close(la.posterior.K, J_Z @ J_Z.T / 2.5)
    J = dense_jacobians(model, x_test)
    torch.testing.assert_close(
        la.functional_covariance(J), J.flatten(0, 1) @ J.flatten(0, 1).T / 2.5
    )
    torch.testing.assert_close(la.functional_variance(J), J @ J.mT / 2.5)


def test_predictive_matches_dense_variational_covariance():
    model = make_mlp(n_out=2)
    x, y, x_test = _data("regression")
    Z, classes, L = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]), _random_factor(5)
    la = _fitted(model, "regression", x, y, inducing_locations=Z, inducing_classes=classes)
    _set_state(la, Z, L, prior=1.7)
    _, _, cov = _dense_posterior(model, Z, classes, L, 1.7, x_test)
    f_mu, f_var = la(x_test)
    torch.testing.assert_close(f_mu, model(x_test).detach())
    blocks = torch.stack([cov[2 * b : 2 * b + 2, 2 * b : 2 * b + 2] for b in range(4)])
    torch.testing.assert_close(f_var, blocks)
    torch.testing.assert_close(la(x_test, joint=True)[1], cov)


def _gauss_hermite_data_term(f_mu, var, y, noise, alpha, n_nodes=80):
    """``sum (1/alpha) log E[N(y; f, noise)^alpha]`` by quadrature over ``f``."""
    nodes, weights = (torch.as_tensor(a) for a in np.polynomial.hermite.hermgauss(n_nodes))
    f = f_mu[..., None] + (2 * var[..., None]).sqrt() * nodes
    log_p = -0.5 * ((y[..., None] - f) ** 2 / noise + math.log(2 * math.pi * noise))
    if alpha == 0:
        return ((weights * log_p).sum(-1) / math.sqrt(math.pi)).sum()
    expected = (weights * (alpha * log_p).exp()).sum(-1) / math.sqrt(math.pi)
    return (expected.log() / alpha).sum()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_regression_objective_equals_brute_force(alpha):
    model = make_mlp(n_out=2)
    x, y, _ = _data("regression")
    Z, classes, L = torch.randn(4, 3), torch.tensor([1, 0, 1, 0]), _random_factor(4)
    la = _fitted(
        model, "regression", x, y, inducing_locations=Z, inducing_classes=classes,
        alpha=alpha, temperature=0.7,
    )  # fmt: skip
    _set_state(la, Z, L, prior=1.3, sigma=0.6)
    batch = slice(2, 7)  # a minibatch: the data term is scaled by N / 5
    K, S, cov = _dense_posterior(model, Z, classes, L, 1.3, x[batch])
    var = cov.diagonal().reshape(5, 2)
    data = _gauss_hermite_data_term(model(x[batch]).detach(), var, y[batch], 0.36, alpha)
    kl = kl_divergence(
        MultivariateNormal(torch.zeros(4), S), MultivariateNormal(torch.zeros(4), K)
    )
    truth = -(N / 5) * data / 0.7 + kl
    torch.testing.assert_close(la._objective(x[batch], y[batch]), truth)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_classification_monte_carlo_objective_within_its_standard_error(alpha):
    model = make_mlp(n_out=3)
    x, y, _ = _data("classification", n_out=3)
    Z, classes, L = torch.randn(4, 3), torch.tensor([0, 2, 1, 2]), _random_factor(4)
    S_mc = 4000
    la = _fitted(
        model, "classification", x, y, inducing_locations=Z, inducing_classes=classes,
        alpha=alpha, mc_softmax_samples=S_mc,
    )  # fmt: skip
    _set_state(la, Z, L, prior=0.8)
    K, S, cov = _dense_posterior(model, Z, classes, L, 0.8, x)
    blocks = torch.stack([cov[3 * n : 3 * n + 3, 3 * n : 3 * n + 3] for n in range(N)])
    draws = MultivariateNormal(model(x).detach(), blocks).sample((200_000,))
    picked = draws.log_softmax(-1).gather(-1, y[None, :, None].expand(len(draws), -1, 1))[..., 0]
    per_point = (alpha * picked).exp() if alpha else picked  # E[p^alpha] or E[log p]
    mean = per_point.mean(0)
    data = (mean.log() / alpha).sum() if alpha else mean.sum()
    # delta method: the standard error of VaLLA's S_mc-sample estimate, per point, summed
    scale = 1 / (alpha * mean) if alpha else torch.ones_like(mean)
    std_error = ((scale**2 * per_point.var(0)).sum() / S_mc).sqrt()
    kl = kl_divergence(
        MultivariateNormal(torch.zeros(4), S), MultivariateNormal(torch.zeros(4), K)
    )
    objective = la._objective(x, y)
    assert abs(objective - (-data + kl)) < 5 * std_error, (objective, -data + kl, std_error)


def test_probit_objective_uses_the_scaled_logits():
    model = make_mlp(n_out=3)
    x, y, _ = _data("classification", n_out=3)
    Z, L = torch.randn(4, 3), _random_factor(4)
    la = _fitted(model, "classification", x, y, inducing_locations=Z)
    _set_state(la, Z, L, prior=0.8)
    K, S, cov = _dense_posterior(model, Z, torch.zeros(4, dtype=torch.long), L, 0.8, x)
    scaled = model(x).detach() / (1 + math.pi / 8 * cov.diagonal().reshape(N, 3)).sqrt()
    kl = kl_divergence(
        MultivariateNormal(torch.zeros(4), S), MultivariateNormal(torch.zeros(4), K)
    )
    truth = nn.functional.cross_entropy(scaled, y, reduction="sum") + kl
    torch.testing.assert_close(la._objective(x, y), truth)


def _optimal_elbo(model, x, y, sigma, prior):
    """The ELBO at the optimal ``q(u)`` for ``Z`` = every training input and output.

    The optimal covariance is the exact posterior's, but VaLLA's mean stays at the network
    output ``f``, so the bound falls short of ``log N(y; f, K + sigma^2 I)`` (the exact log
    marginal likelihood of the GP centred on the network) by the KL divergence of the mean
    shift, ``r^T K (K + sigma^2 I)^-1 r / (2 sigma^2)`` with ``r = y - f``: tight iff ``r = 0``.
    """
    J = dense_jacobians(model, x).flatten(0, 1)
    K = J @ J.T / prior
    C = K + sigma**2 * torch.eye(len(J))
    r = (y - model(x).detach()).flatten()
    log_ml = MultivariateNormal(torch.zeros(len(r)), C).log_prob(r)
    return log_ml - r @ K @ torch.linalg.solve(C, r) / (2 * sigma**2)


@pytest.mark.parametrize("residual", ["data", "zero"])
def test_elbo_at_the_exact_posterior_covariance(residual):
    """Optimal ``L`` (zero gradient), the ELBO of :func:`_optimal_elbo`, its gradients in the
    hyperparameters (envelope theorem), and ``FullLaplace``'s predictive."""
    model = make_mlp(n_out=2)
    x, y, x_test = _data("regression")
    y = model(x).detach() if residual == "zero" else y
    Z, classes = x.repeat(2, 1), torch.arange(2).repeat_interleave(N)  # every (x_n, output)
    la = _fitted(
        model, "regression", x, y, inducing_locations=Z, inducing_classes=classes, alpha=0.0
    )
    _set_state(la, Z, torch.eye(2 * N) / 0.5, prior=2.0, sigma=0.5)  # A = I / sigma^2
    objective = la._objective(x, y)
    prior = torch.tensor(2.0, requires_grad=True)
    sigma = torch.tensor(0.5, requires_grad=True)
    elbo = _optimal_elbo(model, x, y, sigma, prior)
    torch.testing.assert_close(-objective, elbo.detach())
    trained = [la.L, la.inducing_locations, la.log_prior_precision, la.log_noise_variance]
    grads = torch.autograd.grad(objective, trained)
    assert grads[0].abs().max() < 1e-9  # the optimal q(u)
    if residual == "zero":  # a tight bound: Z = X is optimal too
        assert grads[1].abs().max() < 1e-9
    d_prior, d_sigma = torch.autograd.grad(elbo, [prior, sigma])
    torch.testing.assert_close(-grads[2], (d_prior * prior).reshape(1).detach())
    torch.testing.assert_close(-grads[3], 0.5 * d_sigma * sigma.detach())
    full = FullLaplace(model, "regression", sigma_noise=0.5, prior_precision=2.0)
    full.fit(_loader(x, y))
    for joint in (False, True):
        torch.testing.assert_close(la(x_test, joint=joint)[1], full(x_test, joint=joint)[1])


def test_fit_approaches_the_exact_posterior_with_fixed_hyperparameters():
    model = make_mlp(n_out=1)
    x, y, x_test = _data("regression", n_out=1)
    la = VaLLA(model, "regression", x, alpha=0.0, sigma_noise=0.5, prior_precision=2.0)
    la.log_prior_precision.requires_grad_(False)
    la.log_noise_variance.requires_grad_(False)
    la.fit(_loader(x, y), iterations=1, lr=1e-9)
    la.inducing_locations.requires_grad_(False)
    la.fit(_loader(x, y), iterations=400, lr=0.05, override=False)
    full = FullLaplace(model, "regression", sigma_noise=0.5, prior_precision=2.0)
    full.fit(_loader(x, y))
    f_var, truth = la(x_test)[1], full(x_test)[1]
    assert ((f_var - truth).abs().max() / truth.max()) < 5e-3
    assert la.fit_history_["objective"][-1] < la.fit_history_["objective"][0]
    best = _optimal_elbo(model, x, y, 0.5, 2.0)
    assert 0 < la.fit_history_["objective"][-1] + best < 1e-3 * abs(best)
    torch.testing.assert_close(la.prior_precision, torch.tensor([2.0]))


# ----------------------------------------------------------------------------- fitting
@pytest.mark.parametrize(
    "options",
    [{}, {"mc_softmax_samples": 8, "alpha": 0.5}, {"mc_softmax_samples": 4, "alpha": 0.0}],
    ids=["probit", "mc-alpha0.5", "mc-elbo"],
)
def test_classification_fit_and_predict(options):
    model = make_mlp(n_out=3)
    x, y, x_test = _data("classification", n_out=3)
    la = VaLLA(model, "classification", "random", num_inducing=5, seed=2, **options)
    la.fit(
        _loader(x, y, batch_size=4), iterations=30, lr=0.05, val_loader=_loader(x, y), val_steps=10
    )
    history = la.fit_history_
    assert len(history["objective"]) == 30 and len(history["val_nll"]) == 3
    for link in ("probit", "bridge", "bridge_norm", "mc"):
        probs = la(x_test, link_approx=link, n_samples=20)
        assert probs.shape == (4, 3)
        torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    samples = la.predictive_samples(
        x_test, n_samples=6, generator=torch.Generator().manual_seed(0)
    )
    assert samples.shape == (6, 4, 3)
    assert all(p.grad is None for p in model.parameters())  # the model's .grad is untouched
    assert model.training  # fit and predict gave the model back the mode it was given


def test_classes_of_strategies_are_the_training_labels():
    model = make_mlp(n_out=3)
    x, y, _ = _data("classification", n_out=3)
    for strategy in ("random", "kmeans"):
        la = VaLLA(model, "classification", strategy, num_inducing=4, seed=1)
        la.fit(_loader(x, y), iterations=1, lr=1e-12)
        distances, rows = torch.cdist(la.inducing_locations.detach(), x).min(1)
        assert distances.max() < 1e-9
        torch.testing.assert_close(la.inducing_classes, y[rows])


def test_reward_modeling_fits_on_pairs_and_predicts_one_output():
    class PairModel(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))

        def forward(self, x):  # (batch, 2, 3) -> (batch, 2) in fit; (batch, 3) -> (batch, 1)
            return self.net(x.flatten(0, 1)).reshape(len(x), 2) if x.ndim == 3 else self.net(x)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 2, 3, generator=g), torch.randint(2, (12,), generator=g)
    model = PairModel()
    la = VaLLA(model, "reward_modeling", "random", num_inducing=5, mc_softmax_samples=4, alpha=0.5)
    la.fit(_loader(x, y, batch_size=4), iterations=1, lr=1e-12)
    assert torch.cdist(la.inducing_locations.detach(), x.flatten(0, 1)).min(1).values.max() < 1e-9
    la.fit(_loader(x, y, batch_size=4), iterations=10, lr=0.01, override=False)
    f_mu, f_var = la(x[:3, 0])
    assert f_mu.shape == (3, 1) and f_var.shape == (3, 1, 1)
    probs = la(x[:3], fitting=True)
    assert probs.shape == (3, 2)
    # the pair's covariance comes from the same kernel as the single items'
    single = la.functional_variance(dense_jacobians(model, x[0]))
    pair = la.functional_covariance(dense_jacobians(model, x[:1]))
    torch.testing.assert_close(pair.diagonal(), single.flatten())


def test_inducing_choice_is_reproducible_from_the_seed():
    model = make_mlp(n_out=1)
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(8, 3, generator=g) * 0.1 + c for c in (-5.0, 0.0, 5.0)])
    y = torch.randn(24, 1, generator=g)
    chosen = {}
    for strategy in ("random", "kmeans"):
        for seed in (0, 0, 1):
            la = VaLLA(model, "regression", strategy, num_inducing=3, seed=seed)
            la.fit(_loader(x, y, batch_size=5, shuffle=True), iterations=1, lr=1e-9)
            chosen.setdefault(strategy, []).append(la.inducing_locations.detach())
    for first, again, other in chosen.values():
        torch.testing.assert_close(first, again, rtol=0, atol=1e-8)  # shuffled loader: same
        assert not torch.allclose(first, other)
    # k-means on three separated clusters: one training input from each
    centres = chosen["kmeans"][0].mean(1).round()
    assert sorted(centres.tolist()) == [-5.0, 0.0, 5.0]


def test_kmeans_matches_lloyd_by_hand():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(30, 2, generator=g)
    start = np.random.RandomState(3).permutation(30)[:4]
    centres = points[start]
    for _ in range(10):
        assign = torch.cdist(points, centres).argmin(1)
        centres = torch.stack([points[assign == k].mean(0) for k in range(4)])
    nearest = torch.cdist(centres, points).argmin(1)
    torch.testing.assert_close(kmeans_nearest(points, 4, seed=3), nearest)


def test_failed_fit_leaves_the_object_unchanged():
    model = make_mlp(n_out=1)
    x, y, x_test = _data("regression", n_out=1)
    la = VaLLA(model, "regression", x[:4])
    la.fit(_loader(x, y, batch_size=4), iterations=5, lr=0.05)
    before = (la.state_dict(), la(x_test))
    bad = x.clone()
    bad[8] = float("nan")  # the third batch
    with pytest.raises(ValueError, match="NaN"):
        la.fit(_loader(bad, y, batch_size=4), iterations=5, lr=0.05, override=False)
    after = (la.state_dict(), la(x_test))
    for key in ("L", "log_prior_precision", "log_noise_variance", "inducing_locations"):
        torch.testing.assert_close(after[0][key], before[0][key], rtol=0, atol=0)
    assert after[0]["fit_history"] == before[0]["fit_history"]
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)


# ----------------------------------------------------------------------------- state
def test_state_dict_and_whole_object_round_trip():
    model = make_mlp(n_out=3)
    x, y, x_test = _data("classification", n_out=3)
    la = VaLLA(model, "classification", "kmeans", num_inducing=4, mc_softmax_samples=3, alpha=0.5)
    la.fit(_loader(x, y, batch_size=5), iterations=6, lr=0.05)
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    restored = VaLLA(
        model, "classification", "kmeans", num_inducing=4, mc_softmax_samples=3, alpha=0.5
    )
    restored.load_state_dict(torch.load(buffer))
    whole = io.BytesIO()
    torch.save(la, whole)
    whole.seek(0)
    loaded = torch.load(whole, map_location="cpu", weights_only=False)
    next_objective = la._objective(x, y)
    for other in (restored, loaded):
        torch.testing.assert_close(
            other.predictive_moments(x_test), la.predictive_moments(x_test), rtol=0, atol=0
        )
        torch.testing.assert_close(other.prior_precision, la.prior_precision, rtol=0, atol=0)
        assert other.fit_history_ == la.fit_history_
        # the Monte Carlo generator continues where it was: the same next objective
        torch.testing.assert_close(other._objective(x, y), next_objective, rtol=0, atol=0)
    for wrong in (
        VaLLA(make_mlp(n_hidden=4, n_out=3), "classification", "kmeans", num_inducing=4),
        VaLLA(model, "classification", "kmeans", num_inducing=5),
        VaLLA(model, "regression", "kmeans", num_inducing=4),
    ):
        with pytest.raises(ValueError, match="state_dict was saved with"):
            wrong.load_state_dict(la.state_dict())


def test_methods_that_do_not_apply_raise_as_in_laplace_torch():
    model = make_mlp(n_out=1)
    x, y, x_test = _data("regression", n_out=1)
    la = _fitted(model, "regression", x, y, inducing_locations=x[:3])
    with pytest.raises(NotImplementedError, match="no Laplace marginal likelihood.*val_loader"):
        la.log_marginal_likelihood()
    with pytest.raises(NotImplementedError, match="learns prior_precision in fit"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(NotImplementedError, match="variational objective"):
        la.log_likelihood  # noqa: B018
    with pytest.raises(NotImplementedError, match="functional_samples"):
        la.sample(3)
    with pytest.raises(ValueError, match="pred_type='nn'"):
        la(x_test, pred_type="nn")
    assert la.functional_samples(x_test, n_samples=5, joint=True).shape == (5, 4, 1)


def test_enable_backprop_gives_input_gradients():
    model = make_mlp(n_out=1)
    x, y, x_test = _data("regression", n_out=1)
    la = _fitted(model, "regression", x, y, inducing_locations=x[:3], enable_backprop=True)
    x_test.requires_grad_(True)
    f_mu, f_var = la(x_test)
    (f_mu.sum() + f_var.sum()).backward()
    assert x_test.grad is not None and x_test.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"inducing_locations": "grid"},
            "inducing_locations must be .*'random' or 'kmeans', got 'grid'",
        ),
        ({"inducing_locations": "random"}, "num_inducing must be a positive integer .*got None"),
        ({"inducing_locations": "kmeans", "num_inducing": 0}, "num_inducing must be .*got 0"),
        ({"num_inducing": 5}, "num_inducing must match the 3 inducing_locations given, got 5"),
        ({"inducing_classes": torch.tensor([0, 1])}, "inducing_classes must be 3 non-negative"),
        ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\].*got 1.5"),
        ({"mc_softmax_samples": -1}, "mc_softmax_samples must be a non-negative integer, got -1"),
        ({"likelihood": "classification", "alpha": 0.5}, "alpha=0.5 needs mc_softmax_samples > 0"),
        ({"prior_precision": torch.ones(4)}, "prior_precision must be a scalar for VaLLA"),
        ({"prior_mean": 0.5}, "prior_mean must be 0 for VaLLA"),
        ({"likelihood": "classification", "sigma_noise": 0.5}, "sigma_noise must be 1"),
        ({"likelihood": "density"}, "likelihood"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None,
)
def test_bad_constructor_arguments_are_named(kwargs, match):
    x = torch.randn(3, 3)
    arguments = {"likelihood": "regression", "inducing_locations": x, **kwargs}
    with pytest.raises(ValueError, match=match):
        VaLLA(make_mlp(n_out=2), **arguments)


def test_bad_fit_arguments_are_named():
    model = make_mlp(n_out=2)
    x, y, x_test = _data("classification", n_out=2)
    la = VaLLA(model, "classification", x[:3], inducing_classes=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="not fitted yet"):
        la(x_test)
    with pytest.raises(ValueError, match="inducing_classes must be below the 2 outputs"):
        la.fit(_loader(x, y), iterations=1)
    la = VaLLA(model, "classification", x[:3])
    for kwargs, match in [
        ({"iterations": 0}, "iterations must be a positive integer, got 0"),
        ({"lr": -1.0}, "lr must be a positive finite number, got -1.0"),
        ({"val_steps": 0}, "val_steps must be a positive integer or None, got 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            la.fit(_loader(x, y), **kwargs)
    with pytest.raises(ValueError, match="num_inducing=20 exceeds the 10 training inputs"):
        VaLLA(model, "classification", "random", num_inducing=20).fit(_loader(x, y))
    tokens, embedding = torch.randint(5, (N, 3)), nn.Sequential(nn.Embedding(5, 2), nn.Flatten())
    token_model = nn.Sequential(embedding, nn.Linear(6, 2))
    with pytest.raises(ValueError, match="'kmeans' needs floating tensor inputs"):
        VaLLA(token_model, "classification", "kmeans", num_inducing=2).fit(_loader(tokens, y))
    assert la.n_data is None  # the failed fits left it unfitted


# ----------------------------------------------------------------------------- float32
def test_float32_model_against_float64_truth():
    """Predictive covariance and objective of a float32 model against its float64 copy.

    Tolerance (``float32_truth.tolerance``): three times the floor (the same brute force in
    float64 from the float32 model's own Jacobians and outputs: the error its inputs carry)
    plus ``16 eps`` of the covariance's scale for its cast to float32 (measured: errors
    3.2e-8 and 1.4e-8 against allowed 1.4e-6 and 4.3e-8; floors 1.1e-8 and 1.4e-8).
    """
    model32 = float32_truth.relu_mlp(3, 2, seed=0)
    model64 = copy.deepcopy(model32).double()
    x, y = float32_truth.make_data("regression", 16, 2, (3,), seed=1)
    x_test = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    Z, classes, L = x[:6], torch.tensor([0, 1] * 3), _random_factor(6)
    la = VaLLA(model32, "regression", Z, inducing_classes=classes, alpha=0.5)
    la.fit(_loader(x, y, batch_size=16), iterations=1)
    _set_state(la, Z, L, prior=2.0, sigma=0.5)
    cov = la.predictive_moments(x_test, joint=True)[1]
    objective = la._objective(x, y)

    def brute_force(J_Z, J_s, J_x, f_x):
        K, K_s = J_Z @ J_Z.T / 2, J_s @ J_Z.T / 2
        middle = torch.linalg.inv(K + torch.linalg.inv(L @ L.T))
        covariance = J_s @ J_s.T / 2 - K_s @ middle @ K_s.T
        K_x = J_x @ J_Z.T / 2
        var = (J_x.square().sum(1) / 2 - ((K_x @ middle) * K_x).sum(1)).reshape(16, 2)
        S = K - K @ middle @ K
        kl = kl_divergence(
            MultivariateNormal(torch.zeros(6), S), MultivariateNormal(torch.zeros(6), K)
        )
        data = _gauss_hermite_data_term(f_x, var, y.double(), 0.25, 0.5)
        return covariance, -data + kl

    def evaluate(model):  # every quantity from the model's Jacobians, in float64
        dtype = next(model.parameters()).dtype
        J_Z = float32_truth.jacobians(model, Z.to(dtype))[0][torch.arange(6), classes]
        J_s = float32_truth.jacobians(model, x_test.to(dtype))[0].flatten(0, 1)
        J_x, f_x = float32_truth.jacobians(model, x.to(dtype))
        return brute_force(J_Z.double(), J_s.double(), J_x.flatten(0, 1).double(), f_x.double())

    truth, floor = evaluate(model64), evaluate(model32)
    # the covariance is cast to float32 (its scale enters); the objective stays float64
    for result, exact, approx, scale in zip((cov, objective), truth, floor, (1.0, 0.0)):
        floor_error = (approx - exact).abs().max().item()
        allowed = float32_truth.tolerance(floor_error, scale * exact.abs().max().item())
        assert (result.double() - exact).abs().max().item() <= allowed
    assert cov.dtype == torch.float32 and la.L.dtype == torch.float64


def test_dict_and_token_inputs_stay_fixed():
    class TokenModel(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.head = nn.Embedding(7, 2), nn.Linear(6, 2)

        def forward(self, batch):
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            return self.head(self.embed(ids).flatten(1))

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(7, (N, 3), generator=g), torch.randint(2, (N,), generator=g)
    rows = [{"input_ids": i, "labels": t} for i, t in zip(ids, labels)]
    la = VaLLA(TokenModel(), "classification", "random", num_inducing=4)
    la.fit(DataLoader(rows, batch_size=3), iterations=5, lr=0.1)
    Z = la.inducing_locations
    assert isinstance(Z, dict) and Z["input_ids"].dtype == torch.long
    assert all((ids == z).all(1).any() for z in Z["input_ids"])  # training rows, not moved
    torch.testing.assert_close(
        la.inducing_classes, labels[[int((ids == z).all(1).nonzero()[0]) for z in Z["input_ids"]]]
    )
    probs = la({"input_ids": ids[:3]})
    assert probs.shape == (3, 2)
    fixed = VaLLA(
        TokenModel(), "classification", ids[:3], inducing_classes=torch.tensor([0, 1, 1])
    )
    fixed.fit(DataLoader(TensorDataset(ids, labels), batch_size=5), iterations=3, lr=0.1)
    assert torch.equal(fixed.inducing_locations, ids[:3]) and fixed.posterior.K.shape == (3, 3)
