"""ELLA against brute-force weight-space truth (float64 unless stated).

Truth, from dense per-sample Jacobians ``J`` and output Hessians ``Lambda``
(``tests.groundtruth``): the Jacobian rows ``J_S`` of the subsample (the points
``randperm(N, seed)[:M]``; every output with ``all_outputs``, otherwise one output per point
drawn by ``randint`` from ``seed + 1``, batch by batch as laplace-torch does), the kernel
``K_SS = J_S P0^-1 J_S^T`` with its top ``K`` eigenpairs ``(V, Lambda_K)``, the basis
``U = P0^-1 J_S^T V Lambda_K^-1/2`` and the GGN ``H = sum_n J_n^T Lambda_n J_n``. The ELLA
predictive is the GGN Laplace restricted to ``theta* + span(U)``: for any basis ``W`` of
``span(U)``,

    ``f_var(x) = J(x) W (W^T (P0 + H / (sigma^2 T)) W)^-1 W^T J(x)^T``,

computed here with ``W`` from a QR factorisation of ``U`` (so the truth does not share the
library's normalisation ``U^T P0 U = I``). With ``M = N`` and ``K = rank K_SS`` this is the
``FullLaplace`` GLM predictive ``J (P0 + H / (sigma^2 T))^-1 J^T`` at the training inputs.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace.baselaplace import FullLaplace
from laplace.curvature import AsdlGGN, BackPackGGN
from laplace.curvature._fallback import FastPath, lacks
from laplace.functional.ella import ELLA
from tests.conftest import make_data, make_mlp
from tests.groundtruth import dense_ggn, dense_jacobians

N, C = 12, 2


def _loader(x, y, batch_size=5, **kwargs):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, **kwargs)


def _problem(likelihood, seed=1):
    return make_mlp(n_out=C), *make_data(likelihood, n=N, n_out=C, seed=seed)


def _prior_diag(model, prior):
    sizes = [p.numel() for p in model.parameters()]
    prior = torch.as_tensor(prior, dtype=torch.float64).reshape(-1)
    return (
        prior.expand(sum(sizes))
        if prior.numel() == 1
        else prior.repeat_interleave(torch.tensor(sizes))
    )


def _subsample_rows(model, x, M, seed, all_outputs, batch_size=5):
    """The Jacobian rows ``J_S`` of the subsample, drawn as documented above."""
    indices = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:M]
    J = dense_jacobians(model, x[indices])
    if all_outputs:
        return J.flatten(0, 1)
    generator = torch.Generator().manual_seed(seed + 1)
    picked = torch.cat(
        [torch.randint(C, (len(c),), generator=generator) for c in indices.split(batch_size)]
    )
    return J[torch.arange(M), picked]


def _truth_basis(model, x, M, K, prior, seed=1234, all_outputs=False):
    p0 = _prior_diag(model, prior)
    J_S = _subsample_rows(model, x, M, seed, all_outputs)
    values, vectors = torch.linalg.eigh((J_S / p0) @ J_S.T)
    values, vectors = values.flip(0)[:K], vectors.flip(1)[:, :K]
    return (J_S / p0).T @ vectors / values.sqrt()


def _truth_var(model, x, y, x_test, likelihood, U, prior, sigma=1.0, temperature=1.0):
    """``J* W (W^T P W)^-1 W^T J*^T`` with ``P = P0 + H / (sigma^2 T)``: per input and joint."""
    W = torch.linalg.qr(U).Q
    P = torch.diag(_prior_diag(model, prior))
    P = P + dense_ggn(model, x, y, likelihood) / (sigma**2 * temperature)
    J_test = dense_jacobians(model, x_test) @ W
    Sigma = torch.linalg.inv(W.T @ P @ W)
    var = torch.einsum("bck,kl,bdl->bcd", J_test, Sigma, J_test)
    flat = J_test.flatten(0, 1)
    return var, flat @ Sigma @ flat.T


def _ella(model, likelihood, M, K, **kwargs):
    return ELLA(model, likelihood, subsample_size=M, n_eigenvalues=K, **kwargs)


# ----------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("prior", [0.7, [0.5, 2.0, 1.5, 3.0]], ids=["scalar", "layerwise"])
def test_full_rank_equals_full_laplace_at_training_points(likelihood, prior):
    model, x, y = _problem(likelihood)
    kwargs = {"sigma_noise": 0.6} if likelihood == "regression" else {}
    la = _ella(
        model,
        likelihood,
        N,
        N * C,
        all_outputs=True,
        prior_precision=torch.tensor(prior),
        temperature=0.8,
        **kwargs,
    )
    la.fit(_loader(x, y))
    full = FullLaplace(
        model, likelihood, prior_precision=torch.tensor(prior), temperature=0.8, **kwargs
    )
    full.fit(_loader(x, y))
    Js = dense_jacobians(model, x)
    f_mu, f_var = la.predictive_moments(x)
    torch.testing.assert_close(f_mu, model(x).detach())
    torch.testing.assert_close(f_var, full.functional_variance(Js))
    _, f_cov = la.predictive_moments(x, joint=True)
    torch.testing.assert_close(f_cov, full.functional_covariance(Js))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("all_outputs", [False, True], ids=["random-output", "all-outputs"])
@pytest.mark.parametrize("prior", [0.7, [0.5, 2.0, 1.5, 3.0]], ids=["scalar", "layerwise"])
def test_truncated_rank_equals_restricted_laplace(likelihood, all_outputs, prior):
    model, x, y = _problem(likelihood)
    M, K = 8, 5
    sigma = 0.6 if likelihood == "regression" else 1.0
    la = _ella(
        model,
        likelihood,
        M,
        K,
        all_outputs=all_outputs,
        sigma_noise=sigma,
        prior_precision=torch.tensor(prior),
        temperature=1.3,
    )
    la.fit(_loader(x, y))
    U = _truth_basis(model, x, M, K, prior, all_outputs=all_outputs)
    x_test = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    var, joint = _truth_var(model, x, y, x_test, likelihood, U, prior, sigma, 1.3)
    torch.testing.assert_close(la.predictive_moments(x_test)[1], var)
    torch.testing.assert_close(la.predictive_moments(x_test, joint=True)[1], joint)
    # the same span (U is unique up to the signs of its columns)
    torch.testing.assert_close(la.dual_directions.abs(), U.abs())


def test_features_are_jacobian_vector_products():
    model, x, y = _problem("classification")
    la = _ella(model, "classification", 10, 7)
    la.fit(_loader(x, y))
    la.jvp_chunk_size = 3  # several vmapped chunks
    psi, f = la._features(x)
    torch.testing.assert_close(psi, dense_jacobians(model, x) @ la.dual_directions)
    torch.testing.assert_close(f, model(x).detach())


class _TanhNoVmap(torch.autograd.Function):
    """tanh with a forward-mode rule but no vmap rule: jvp works, vmap of jvp does not."""

    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * (1 - out**2)

    @staticmethod
    def jvp(ctx, tangent):
        (out,) = ctx.saved_tensors
        return tangent * (1 - out**2)


class _TanhNoForward(torch.autograd.Function):
    """tanh in the old style (no setup_context): torch.func cannot transform it at all."""

    @staticmethod
    def forward(ctx, x):
        out = x.tanh()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * (1 - out**2)


class _CustomMLP(nn.Module):
    def __init__(self, activation):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last, self.activation = nn.Linear(3, 5), nn.Linear(5, C), activation

    def forward(self, x):
        return self.last(self.activation.apply(self.first(x)))


@pytest.mark.parametrize("activation", [_TanhNoVmap, _TanhNoForward], ids=["loop", "jacobians"])
def test_fallbacks_give_the_same_features(activation):
    """Models that cannot be vmapped (a loop over the columns) or have no forward-mode
    derivative (the backend's Jacobians times U) give the same predictive."""
    reference = make_mlp(n_out=C)
    model = _CustomMLP(activation).double()
    model.load_state_dict(
        {
            k.replace("0.", "first.").replace("2.", "last."): v
            for k, v in reference.state_dict().items()
        }
    )
    x, y = make_data("classification", n=N, n_out=C)
    la, ref = _ella(model, "classification", 10, 6), _ella(reference, "classification", 10, 6)
    la.fit(_loader(x, y))
    ref.fit(_loader(x, y))
    torch.testing.assert_close(la.predictive_moments(x)[1], ref.predictive_moments(x)[1])
    assert lacks(model, FastPath.VMAP)  # the path taken
    assert la._reverse_mode_features == (activation is _TanhNoForward)


@pytest.mark.parametrize("backend", [AsdlGGN, BackPackGGN], ids=["asdl", "backpack"])
def test_other_backends_give_the_same_basis(backend):
    model, x, y = _problem("classification")
    la, ref = (
        _ella(model, "classification", 10, 6, backend=backend),
        _ella(model, "classification", 10, 6),
    )
    la.fit(_loader(x, y))
    ref.fit(_loader(x, y))
    torch.testing.assert_close(la.predictive_moments(x)[1], ref.predictive_moments(x)[1])


class _DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_mlp(n_out=C)

    def forward(self, batch):
        return self.net(batch["input_ids"])


class _DictData(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def test_dict_batches_give_the_same_predictive():
    model = _DictModel()
    x, y = make_data("classification", n=N, n_out=C)
    la, ref = _ella(model, "classification", 8, 5), _ella(model.net, "classification", 8, 5)
    la.fit(DataLoader(_DictData(x, y), batch_size=5), balanced=True)
    ref.fit(_loader(x, y), balanced=True)
    torch.testing.assert_close(
        la.predictive_moments({"input_ids": x})[1], ref.predictive_moments(x)[1]
    )


# ----------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize(
    "change",
    [{"prior_precision": 3.0}, {"sigma_noise": 0.4}, {"temperature": 0.5}],
    ids=["prior", "sigma", "temperature"],
)
def test_hyperparameters_after_fit_equal_a_fit_with_them(change):
    """Scalar prior, noise and temperature leave the basis and G unchanged."""
    model, x, y = _problem("regression")
    la, fresh = _ella(model, "regression", 9, 6), _ella(model, "regression", 9, 6, **change)
    la.fit(_loader(x, y))
    fresh.fit(_loader(x, y))
    for name, value in change.items():
        setattr(la, name, value)
    torch.testing.assert_close(la.predictive_moments(x)[1], fresh.predictive_moments(x)[1])


def test_layerwise_prior_after_fit_keeps_the_subspace_of_the_fit():
    model, x, y = _problem("classification")
    la = _ella(model, "classification", 8, 5, prior_precision=0.7)
    la.fit(_loader(x, y))
    prior = [0.5, 2.0, 1.5, 3.0]
    la.prior_precision = torch.tensor(prior)
    U = _truth_basis(model, x, 8, 5, 0.7)
    var, _ = _truth_var(model, x, y, x[:4], "classification", U, prior)
    torch.testing.assert_close(la.predictive_moments(x[:4])[1], var)
    la.prior_precision = _prior_diag(model, prior)  # per parameter: the same prior
    torch.testing.assert_close(la.predictive_moments(x[:4])[1], var)


def _pairs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, 2, 3, generator=gen), torch.randint(2, (N,), generator=gen)


class _PairRewardModel(nn.Module):
    """Scores ``(batch, dim) -> (batch, 1)`` or a pair ``(batch, 2, dim) -> (batch, 2)``."""

    def __init__(self):
        super().__init__()
        self.net = make_mlp(n_out=1)

    def forward(self, x):
        if x.ndim == 3:
            return self.net(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], 2)
        return self.net(x)


def test_reward_modeling_fits_on_pairs_and_predicts_rewards():
    model = _PairRewardModel()
    x, y = _pairs()
    la = _ella(model, "reward_modeling", N, N * 2, all_outputs=True, prior_precision=0.7)
    la.fit(_loader(x, y))
    x_test = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    f_mu, f_var = la(x_test)
    assert f_mu.shape == (5, 1) and f_var.shape == (5, 1, 1)
    J_pairs = dense_jacobians(model, x).flatten(0, 1)
    U = (J_pairs / 0.7).T  # spans P0^-1 J_S^T: the full-rank basis, up to a change of basis
    var, _ = _truth_var(model, x, y, x_test, "classification", U, 0.7)
    torch.testing.assert_close(f_var, var)
    probs = la(x[:3], fitting=True)
    assert probs.shape == (3, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


# ----------------------------------------------------------------------------- interface
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_functional_variance_and_covariance_from_jacobians(likelihood):
    model, x, y = _problem(likelihood)
    la = _ella(model, likelihood, 10, 6)
    la.fit(_loader(x, y))
    Js = dense_jacobians(model, x[:4])
    f_var, f_cov = la.functional_variance(Js), la.functional_covariance(Js)
    assert f_var.shape == (4, C, C) and f_cov.shape == (4 * C, 4 * C)
    torch.testing.assert_close(f_var, la.predictive_moments(x[:4])[1])
    torch.testing.assert_close(f_cov, la.predictive_moments(x[:4], joint=True)[1])
    blocks = torch.stack([f_cov[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] for i in range(4)])
    torch.testing.assert_close(blocks, f_var)
    with pytest.raises(ValueError, match=r"Jacobians must have shape \(batch, outputs, 32\)"):
        la.functional_variance(Js[..., :-1])


@pytest.mark.parametrize("joint", [False, True], ids=["per-input", "joint"])
def test_functional_samples_have_the_predictive_covariance(joint):
    model, x, y = _problem("regression")
    la = _ella(model, "regression", 10, 6, prior_precision=0.3)
    la.fit(_loader(x, y))
    n = 20000
    generator = torch.Generator().manual_seed(0)
    samples = la.functional_samples(x[:3], n_samples=n, generator=generator, joint=joint)
    assert samples.shape == (n, 3, C)
    f_mu, f_cov = la.predictive_moments(x[:3], joint=True)
    flat = samples.reshape(n, -1)
    if not joint:  # independent inputs: only the per-input blocks are kept
        mask = torch.block_diag(*[torch.ones(C, C)] * 3).bool()
        f_cov = torch.where(mask, f_cov, torch.zeros(()))
    # standard error of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
    sd = f_cov.diagonal().sqrt()
    stderr = ((sd[:, None] * sd[None]) ** 2 + f_cov**2).sqrt() / math.sqrt(n)
    assert ((flat.T.cov() - f_cov).abs() <= 5 * stderr + 1e-12).all()
    assert ((flat.mean(0) - f_mu).abs() <= 5 * sd / math.sqrt(n)).all()
    probs = la.predictive_samples(x[:3], n_samples=4)
    assert probs.shape == (4, 3, C)


def test_classification_links_and_backprop():
    model, x, y = _problem("classification")
    la = _ella(model, "classification", 10, 6)
    la.fit(_loader(x, y))
    for link in ["probit", "bridge", "bridge_norm", "mc"]:
        probs = la(x[:3], link_approx=link, generator=torch.Generator().manual_seed(0))
        assert probs.shape == (3, C)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    la.enable_backprop = True
    x_in = x[:2].clone().requires_grad_(True)
    grad = torch.autograd.grad(la.predictive_moments(x_in)[1].sum(), x_in)[0]
    step = 1e-6 * torch.eye(3)[0]
    finite = la.predictive_moments(x[:2] + step)[1] - la.predictive_moments(x[:2] - step)[1]
    torch.testing.assert_close(grad[:, 0], finite.sum((1, 2)) / 2e-6, rtol=1e-5, atol=1e-7)


def test_balanced_subsample_alternates_over_the_classes():
    model, x, y = _problem("classification")
    la = _ella(model, "classification", 6, 4)
    la.fit(_loader(x, y), balanced=True)
    labels = y[la.subsample_indices]
    assert labels.tolist() == [0, 1] * 3
    assert len(set(la.subsample_indices.tolist())) == 6


def test_validation_history_during_fit():
    model, x, y = _problem("classification")
    x_val, y_val = make_data("classification", n=7, n_out=C, seed=4)
    la = _ella(model, "classification", 10, 6)
    la.fit(_loader(x, y, batch_size=4), val_loader=_loader(x_val, y_val), val_steps=2)
    assert la.fit_history_["processed_examples"] == [4.0, 8.0, 12.0]
    assert len(la.fit_history_["val_nll"]) == 2  # after batch 2 and at the end
    final = _hand_nll(la, x_val, y_val, "classification")
    assert la.fit_history_["val_nll"][-1] == pytest.approx(final, rel=1e-12)


def _hand_nll(la, x_val, y_val, likelihood):
    """Mean validation NLL: probit cross-entropy, or the Gaussian with noise (per example)."""
    f_mu, f_var = la.predictive_moments(x_val)
    var = f_var.diagonal(dim1=1, dim2=2)
    if likelihood == "classification":
        logits = f_mu / torch.sqrt(1 + math.pi / 8 * var)
        return nn.functional.cross_entropy(logits, y_val).item()
    var = var + la.sigma_noise**2
    nll = 0.5 * ((y_val - f_mu) ** 2 / var + var.log() + math.log(2 * math.pi))
    return nll.sum(1).mean().item()


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_grid_search_picks_the_best_validation_nll(likelihood):
    model, x, y = _problem(likelihood)
    x_val, y_val = make_data(likelihood, n=9, n_out=C, seed=4)
    la = _ella(model, likelihood, 10, 6)
    la.fit(_loader(x, y))
    grid = torch.logspace(-2, 2, 9)
    scores = []
    for value in grid:
        la.prior_precision = value
        scores.append(_hand_nll(la, x_val, y_val, likelihood))
    la.prior_precision = 1.0
    la.optimize_prior_precision(
        val_loader=_loader(x_val, y_val), log_prior_prec_min=-2, log_prior_prec_max=2, grid_size=9
    )
    assert la.prior_precision.item() == pytest.approx(grid[int(torch.tensor(scores).argmin())])
    recorded = [entry["val_nll"] for entry in la.fit_history_["tuning"]]
    assert recorded == pytest.approx(scores, rel=1e-12)
    if likelihood == "regression":  # pairs (prior_precision, sigma_noise)
        pairs = [(1.0, 0.3), (1.0, 1.0), (10.0, 0.5)]
        hand = []
        for prior, sigma in pairs:
            la.prior_precision, la.sigma_noise = prior, sigma
            hand.append(_hand_nll(la, x_val, y_val, likelihood))
        la.optimize_hyperparameters(_loader(x_val, y_val), pairs)
        best = pairs[int(torch.tensor(hand).argmin())]
        assert (la.prior_precision.item(), la.sigma_noise.item()) == pytest.approx(best)


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_and_pickling():
    model, x, y = _problem("classification")
    la = _ella(model, "classification", 10, 6, prior_precision=0.5)
    la.fit(_loader(x, y), val_loader=_loader(x, y))
    expected = la.predictive_moments(x[:4], joint=True)[1]
    other = _ella(model, "classification", 10, 6)
    other.load_state_dict(la.state_dict())
    assert torch.equal(other.predictive_moments(x[:4], joint=True)[1], expected)
    assert other.fit_history_ == la.fit_history_
    buffer = io.BytesIO()
    torch.save(la, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False, map_location="cpu")
    assert torch.equal(loaded.predictive_moments(x[:4], joint=True)[1], expected)
    with pytest.raises(ValueError, match="n_eigenvalues=6, this object has n_eigenvalues=5"):
        _ella(model, "classification", 10, 5).load_state_dict(la.state_dict())
    with pytest.raises(ValueError, match="likelihood='classification'"):
        _ella(copy.deepcopy(model), "regression", 10, 6).load_state_dict(la.state_dict())


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_argument_and_value():
    model, x, y = _problem("classification")
    with pytest.raises(ValueError, match="n_eigenvalues must be at most subsample_size=4.*got 5"):
        _ella(model, "classification", 4, 5)
    with pytest.raises(ValueError, match="subsample_size must be a positive integer, got 0"):
        _ella(model, "classification", 0, 1)
    with pytest.raises(ValueError, match="n_eigenvalues must be a positive integer, got 2.5"):
        _ella(model, "classification", 4, 2.5)
    with pytest.raises(ValueError, match="likelihood"):
        _ella(model, "poisson", 4, 2)
    la = _ella(model, "classification", 4, 2)
    with pytest.raises(ValueError, match="not fitted"):
        la.predictive_moments(x)
    with pytest.raises(ValueError, match="not fitted"):
        la.state_dict()
    with pytest.raises(
        ValueError, match="subsample_size must be at most the number of data points 12, got 13"
    ):
        _ella(model, "classification", 13, 2).fit(_loader(x, y))
    with pytest.raises(ValueError, match=r"at most the 8 kernel rows .* got 9"):
        _ella(model, "classification", 4, 9, all_outputs=True).fit(_loader(x, y))
    with pytest.raises(ValueError, match="val_steps must be a positive integer, got 0"):
        la.fit(_loader(x, y), val_steps=0)
    with pytest.raises(ValueError, match="balanced=True .* got 'regression'"):
        _ella(model, "regression", 4, 2).fit(_loader(*_problem("regression")[1:]), balanced=True)
    same = torch.zeros(N, 3)  # identical inputs: the kernel has rank <= C
    with pytest.raises(ValueError, match="n_eigenvalues=5 exceeds the numerical rank 2"):
        _ella(model, "classification", 8, 5).fit(_loader(same, y))


def test_not_applicable_methods_and_failed_fits():
    model, x, y = _problem("classification")
    la = _ella(model, "classification", 8, 5)
    la.fit(_loader(x, y))
    expected = la.predictive_moments(x)[1]
    with pytest.raises(NotImplementedError, match="method='gridsearch'"):
        la.log_marginal_likelihood()
    with pytest.raises(NotImplementedError, match="no marginal likelihood"):
        la.optimize_prior_precision(method="marglik")
    with pytest.raises(NotImplementedError, match="functional_samples"):
        la.sample(3)
    with pytest.raises(NotImplementedError, match="log likelihood"):
        la.log_likelihood  # noqa: B018
    with pytest.raises(ValueError, match="pred_type='nn'"):
        la(x, pred_type="nn")
    with pytest.raises(ValueError, match="subsample_size must be at most"):
        la.fit(_loader(x[:5], y[:5]))
    with pytest.raises(ValueError, match="grid is empty"):
        la.optimize_hyperparameters(_loader(x, y), [])
    assert torch.equal(la.predictive_moments(x)[1], expected)  # unchanged by the failures


# ----------------------------------------------------------------------------- float32
@pytest.mark.parametrize("K", [10, 5], ids=["all-rows", "truncated"])
def test_float32_model_matches_float64_truth(K):
    """float32 ELLA against ELLA on the same weights and data upcast to float64.

    Tolerance: the float32 Jacobians (of the subsample and in the features) have a relative
    error of a few ``eps = 1.2e-7``; everything after them runs in float64. The predictive
    depends on ``U`` only through ``span(U)`` (a change of basis of the features cancels
    in ``psi A^-1 psi^T``). With every kernel row kept (``K = M``) that span is
    ``P0^-1 range(J_S^T)``, as accurate as ``J_S``; truncated, the top-``K`` eigenspace of
    ``K_SS`` moves by ``|dK| / gap ~ eps lambda_1 / (lambda_K - lambda_K+1)`` (Davis-Kahan).
    The restricted solve is well conditioned (``A >= U^T P0 U = I``), so
    ``rtol = 20 eps (1 + lambda_1 / gap)`` on ``f_var`` relative to its largest entry
    (``gap = inf`` for ``K = M``). Measured: below ``1 eps`` in both cases.
    """
    model, x, y = _problem("classification")
    model32 = copy.deepcopy(model).float()
    model64 = copy.deepcopy(model32).double()  # the float32 weights, exactly
    la32 = _ella(model32, "classification", 10, K)
    la64 = _ella(model64, "classification", 10, K)
    la32.fit(_loader(x.float(), y))
    la64.fit(_loader(x.float().double(), y))
    assert la32.feature_gram.dtype == torch.float64
    var32 = la32.predictive_moments(x.float())[1]
    var64 = la64.predictive_moments(x.float().double())[1]
    assert var32.dtype == torch.float32
    J_S = _subsample_rows(model64, x.float().double(), 10, 1234, False)
    values = torch.linalg.eigvalsh(J_S @ J_S.T).flip(0)
    ratio = 0.0 if K == 10 else (values[0] / (values[K - 1] - values[K])).item()
    rtol = 20 * torch.finfo(torch.float32).eps * (1 + ratio)
    error = ((var32.double() - var64).abs().max() / var64.abs().max()).item()
    assert error <= rtol, (error, rtol)
