"""Link approximations, sampling predictives and prior tuning against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_data, make_mlp
from torch.utils.data import DataLoader, TensorDataset

from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.predictive import bridge_alpha, link_bridge, link_probit
from laplace.utils.utils import validate

CLASSES = {"full": FullLaplace, "kron": KronLaplace, "diag": DiagLaplace}


def loader(x, y, batch_size=5):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def mc_softmax(f_mu, f_var, n=400_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(f_var)
    z = torch.randn(n, *f_mu.shape, generator=gen)
    f = f_mu + torch.einsum("bij,nbj->nbi", L, z)
    return torch.softmax(f, -1).mean(0)


def random_gaussians(scale, batch=6, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f_mu = 2 * torch.randn(batch, classes, generator=gen)
    A = torch.randn(batch, classes, classes, generator=gen)
    f_var = scale * (A @ A.transpose(1, 2) / classes + 0.1 * torch.eye(classes))
    return f_mu, f_var


@pytest.mark.parametrize("scale", [0.01, 0.3])
def test_probit_close_to_monte_carlo(scale):
    f_mu, f_var = random_gaussians(scale)
    reference = mc_softmax(f_mu, f_var)
    tol = 0.005 if scale < 0.1 else 0.05
    assert (link_probit(f_mu, f_var) - reference).abs().max() < tol


def test_bridge_alpha_inverts_the_dirichlet_to_gaussian_map():
    gen = torch.Generator().manual_seed(0)
    alpha = 1 + 5 * torch.rand(6, 4, generator=gen)
    K = alpha.shape[-1]
    mu = alpha.log() - alpha.log().mean(-1, keepdim=True)
    var = (1 - 2 / K) / alpha + (1 / alpha).sum(-1, keepdim=True) / K**2
    torch.testing.assert_close(bridge_alpha(mu, var), alpha)


def test_bridge_is_invariant_to_a_common_logit_offset():
    f_mu, _ = random_gaussians(0.3, classes=3)
    f_var = 0.2 * torch.eye(3).expand(6, 3, 3)
    shift = torch.randn(6, 1, generator=torch.Generator().manual_seed(1))
    # softmax ignores a common offset; with isotropic variance so does the bridge
    for normalize in (False, True):
        probs = link_bridge(f_mu, f_var, normalize=normalize)
        moved = link_bridge(f_mu + shift, f_var, normalize=normalize)
        torch.testing.assert_close(probs, moved)
        torch.testing.assert_close(probs.sum(-1), torch.ones(6))


def test_probit_zero_variance_is_softmax():
    f_mu, _ = random_gaussians(1.0)
    torch.testing.assert_close(link_probit(f_mu, torch.zeros(6, 4, 4)), torch.softmax(f_mu, -1))


@pytest.fixture
def fitted_classifier():
    model = make_mlp()
    x, y = make_data("classification")
    la = FullLaplace(model, "classification", prior_precision=0.5)
    la.fit(loader(x, y))
    return la, x


@pytest.mark.parametrize("link", ["probit", "bridge", "bridge_norm", "mc"])
def test_classification_outputs_are_distributions(fitted_classifier, link):
    la, x = fitted_classifier
    generator = torch.Generator().manual_seed(1)  # used by the "mc" link only
    probs = la(x, link_approx=link, n_samples=50, generator=generator)
    assert probs.shape == (len(x), 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(x)))


def test_mc_link_matches_its_samples(fitted_classifier):
    la, x = fitted_classifier
    probs = la(x, link_approx="mc", n_samples=64, generator=torch.Generator().manual_seed(3))
    samples = la.predictive_samples(x, n_samples=64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(probs, samples.mean(0))


def test_nn_predictive_equals_manual_parameter_sampling(fitted_classifier):
    la, x = fitted_classifier
    probs = la(x, pred_type="nn", n_samples=20, generator=torch.Generator().manual_seed(1))
    thetas = la.sample(20, generator=torch.Generator().manual_seed(1))
    manual = []
    for theta in thetas:
        model = make_mlp()
        torch.nn.utils.vector_to_parameters(theta, model.parameters())
        manual.append(torch.softmax(model(x), -1))
    torch.testing.assert_close(probs, torch.stack(manual).mean(0).detach())
    # the model itself is left untouched
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(la.model.parameters()), la.mean)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_functional_samples_have_glm_moments(structure):
    model = make_mlp()
    x, y = make_data("regression")
    la = CLASSES[structure](model, "regression", prior_precision=0.5)
    la.fit(loader(x, y))
    f_mu, f_var = la(x[:3])
    samples = la.functional_samples(
        x[:3], n_samples=100_000, generator=torch.Generator().manual_seed(0)
    )
    assert samples.shape == (100_000, 3, 2)
    torch.testing.assert_close(samples.mean(0), f_mu, atol=0.02, rtol=0)
    emp = torch.einsum("nbi,nbj->bij", samples - f_mu, samples - f_mu) / 100_000
    torch.testing.assert_close(emp, f_var, atol=0.03 * f_var.abs().max(), rtol=0)
    nn_samples = la.predictive_samples(
        x[:3], pred_type="nn", n_samples=7, generator=torch.Generator().manual_seed(1)
    )
    assert nn_samples.shape == (7, 3, 2)
    f_mu_nn, f_var_nn = la(
        x[:3], pred_type="nn", n_samples=7, generator=torch.Generator().manual_seed(1)
    )
    assert f_mu_nn.shape == f_var_nn.shape == (3, 2)


def test_marglik_tuning_reaches_stationary_point():
    model = make_mlp()
    x, y = make_data("regression", n=40)
    la = FullLaplace(model, "regression")
    la.fit(loader(x, y))
    la.optimize_prior_precision(method="marglik", n_steps=300, lr=0.1)
    best = la.prior_precision.clone()
    grid = best * torch.logspace(-0.3, 0.3, 61)
    values = torch.stack([la.log_marginal_likelihood(prior_precision=p.reshape(1)) for p in grid])
    assert abs(int(values.argmax()) - 30) <= 1  # the optimum sits at the grid's centre


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_layerwise_and_diag_marglik_tuning_improve_evidence(structure):
    model = make_mlp()
    x, y = make_data("classification", n=30)
    la = CLASSES[structure](model, "classification")
    la.fit(loader(x, y))
    start = la.log_marginal_likelihood(prior_precision=torch.ones(1)).item()
    la.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=50)
    assert la.prior_precision.shape == (la.n_layers,)
    assert la.log_marginal_likelihood().item() > start


def test_gridsearch_picks_best_validation_loss():
    model = make_mlp()
    x, y = make_data("classification", n=30)
    xv, yv = make_data("classification", n=20, seed=5)
    la = DiagLaplace(model, "classification")
    la.fit(loader(x, y))
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=loader(xv, yv),
        grid_size=9,
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
    )
    chosen = la.prior_precision.item()

    def nll(prec):
        la.prior_precision = prec
        probs = la(xv)
        return -torch.log(probs[torch.arange(len(yv)), yv]).mean().item()

    grid = torch.logspace(-2, 2, 9)
    values = [nll(p.item()) for p in grid]
    assert chosen == pytest.approx(grid[int(torch.tensor(values).argmin())].item())
    la.prior_precision = chosen
    from laplace.utils.metrics import RunningNLLMetric

    assert validate(la, loader(xv, yv), RunningNLLMetric()) == pytest.approx(min(values))


def test_sinusoid_recovers_noise_level():
    """The seed document's example: sigma = 0.3 is recovered as about 0.28-0.30."""
    torch.manual_seed(711)
    X = torch.rand(150, 1) * 8
    y = torch.sin(X) + 0.3 * torch.randn(150, 1)
    model = torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train = loader(X, y, batch_size=150)
    for _ in range(1000):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    la = FullLaplace(model, "regression")
    la.fit(train)
    log_prior, log_sigma = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    hyper = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(1000):
        hyper.zero_grad()
        (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        hyper.step()
    assert 0.26 <= la.sigma_noise.item() <= 0.31
    _, f_var = la(X[:5])
    assert torch.isfinite(f_var).all() and (f_var > 0).all()
    assert math.isfinite(la.log_marginal_likelihood().item())


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_gridsearch_skips_priors_too_weak_for_an_indefinite_hessian(structure):
    from laplace.curvature import CurvlinopsHessian
    from laplace.posterior import NotPositiveDefiniteError

    model = make_mlp()  # untrained: the exact Hessian has negative eigenvalues
    x, y = make_data("classification", n=30)
    xv, yv = make_data("classification", n=20, seed=5)
    la = CLASSES[structure](model, "classification", backend=CurvlinopsHessian)
    la.fit(loader(x, y))
    H = la._curvature.to_dense() if structure == "full" else la._curvature.to_dense().diagonal()
    smallest = (torch.linalg.eigvalsh(H) if structure == "full" else H).min().item()
    assert smallest < -1e-3
    la.prior_precision = -smallest / 2
    with pytest.raises(NotPositiveDefiniteError, match="increase the prior precision"):
        la(xv)
    grid = torch.logspace(-3, 3, 13)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=loader(xv, yv),
        grid_size=13,
        log_prior_prec_min=-3,
        log_prior_prec_max=3,
    )
    chosen = la.prior_precision.item()
    assert chosen > -smallest
    nll = {}
    for prec in grid[grid > -smallest]:
        la.prior_precision = prec.item()
        nll[prec.item()] = -torch.log(la(xv)[torch.arange(len(yv)), yv]).mean().item()
    assert chosen == pytest.approx(min(nll, key=nll.get))


def _counting(monkeypatch, obj, name):
    calls = []
    original = getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


@pytest.mark.parametrize(
    ("cls", "link", "what"),
    [
        ("FullLaplace", "bridge", "jacobians"),  # Jacobians of the whole network
        ("KronLaplace", "probit", "factors"),  # Jacobian factors of a Linear network
        ("KronLLLaplace", "probit", "features"),  # last-layer features
    ],
)
def test_gridsearch_computes_the_prior_independent_part_once_per_batch(
    cls, link, what, monkeypatch
):
    """Same choice and validation losses as without the memo, with one pass per batch."""
    import laplace
    import laplace.baselaplace as baselaplace_module
    import laplace.tuning as tuning_module

    model = make_mlp()
    x, y = make_data("classification", n=30)
    xv, yv = make_data("classification", n=20, seed=5)
    options = {"method": "gridsearch", "val_loader": loader(xv, yv), "grid_size": 7}
    options.update(link_approx=link, log_prior_prec_min=-2, log_prior_prec_max=2)

    def tuned(memo_entries):
        monkeypatch.setattr(tuning_module.PredictiveMemo, "max_entries", memo_entries)
        la = getattr(laplace, cls)(model, "classification")
        la.fit(loader(x, y))
        if what == "jacobians":
            calls = _counting(monkeypatch, la.subset, "jacobians")
        elif what == "factors":
            calls = _counting(monkeypatch, baselaplace_module, "linear_jacobian_factors")
        else:
            calls = _counting(monkeypatch, la.subset, "features")
        la.optimize_prior_precision(**options)
        assert la._predictive_memo is None
        return la.prior_precision, len(calls)

    without, calls_without = tuned(0)
    with_memo, calls_with = tuned(2**26)
    torch.testing.assert_close(with_memo, without)
    n_batches = 4
    assert calls_without == 7 * n_batches and calls_with == n_batches


def test_gridsearch_memo_is_dropped_when_the_search_fails():
    model = make_mlp()
    x, y = make_data("classification", n=30)
    la = FullLaplace(model, "classification")
    la.fit(loader(x, y))

    def broken_loss(*args):
        raise ValueError("broken loss")

    with pytest.raises(ValueError, match="broken loss"):
        la.optimize_prior_precision(
            method="gridsearch", val_loader=loader(x, y), loss=broken_loss, grid_size=3
        )
    assert la._predictive_memo is None


def test_gridsearch_rotates_full_jacobians_once_per_batch(monkeypatch):
    """The full posterior's ``J V`` (prior-independent for a scalar prior) is kept too."""
    import laplace.tuning as tuning_module

    computed = []
    original = tuning_module.PredictiveMemo.get

    def counting_get(self, kind, X, compute):
        def counted():
            computed.append(kind)
            return compute()

        return original(self, kind, X, counted)

    monkeypatch.setattr(tuning_module.PredictiveMemo, "get", counting_get)
    x, y = make_data("classification", n=30)
    xv, yv = make_data("classification", n=20, seed=5)
    la = FullLaplace(make_mlp(), "classification")
    la.fit(loader(x, y))
    la.optimize_prior_precision(
        method="gridsearch", val_loader=loader(xv, yv), grid_size=7, link_approx="bridge"
    )
    assert computed.count("jacobians") == computed.count("rotated") == 4
    assert la._curvature.memo is None and la._predictive_memo is None
    chosen = la.prior_precision
    la.optimize_prior_precision(  # the memo changes nothing but the cost
        method="gridsearch", val_loader=loader(xv, yv), grid_size=7, link_approx="bridge"
    )
    torch.testing.assert_close(la.prior_precision, chosen)


def test_gridsearch_before_fit_raises():
    la = FullLaplace(make_mlp(), "classification")
    x, y = make_data("classification", n=10)
    with pytest.raises(ValueError, match="not fitted"):
        la.optimize_prior_precision(method="gridsearch", val_loader=loader(x, y))
