"""laplace.active against ground truth.

- MacKay's criteria on Bayesian linear regression, where the Laplace posterior is exact: the
  weight posterior and its rank-one Bayesian update are computed in closed form in float64,
  and the gains are differences of Gaussian entropies (log-determinants, log-variances).
- The classification criteria against brute-force loops over the same samples and hand values.
- BatchBALD against enumeration of every label configuration; GPA against its fast variants.
- ``select`` on a last-layer K-FAC classifier and a regression MLP; float32 models against
  float64 truth with tolerances derived from the conditioning.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import FullLaplace, Laplace
from laplace.active import (
    bald,
    batch_bald,
    entropy,
    epig,
    fast_gpa,
    fast_gpa_from_kernel,
    gpa,
    joint_entropy,
    joint_mutual_information,
    mackay_marginal_information_gain,
    mackay_mean_marginal_information_gain,
    mackay_total_information_gain,
    marginal_information_gain,
    max_entropy,
    mean_marginal_information_gain,
    mean_std,
    score,
    select,
    total_information_gain,
    uncertainty_decomposition,
    variation_ratios,
)
from laplace.errors import UnknownOptionError

SIGMA, PRIOR = 0.5, 2.0


def _loader(X, y):
    return DataLoader(TensorDataset(X, y), batch_size=8)


def _kernel(la):
    """The posterior kernel, or J P^-1 J^T from the Jacobians where the API is absent."""
    if hasattr(la, "posterior_kernel"):
        return la.posterior_kernel(batch_size=7)

    class JacobianKernel:
        def __call__(self, X1, X2=None):
            X2 = X1 if X2 is None else X2
            Js = torch.cat([la.backend.jacobians(X1)[0], la.backend.jacobians(X2)[0]])
            n1, n2, o = len(X1), len(X2), Js.shape[1]
            K = la.functional_covariance(Js).reshape(n1 + n2, o, n1 + n2, o)
            return K[:n1, :, n1:].permute(0, 2, 1, 3)

        def diagonal(self, X):
            return self(X).diagonal(dim1=0, dim2=1).permute(2, 0, 1)

    return JacobianKernel()


# --------------------------------------------------------------- Bayesian linear regression
def _features(X, outputs):
    """Jacobian of nn.Linear(d, outputs) w.r.t. (weight row-major, bias): (n, outputs, P)."""
    eye = torch.eye(outputs, dtype=X.dtype)
    weight = torch.einsum("ab,nd->nabd", eye, X).flatten(2)
    return torch.cat([weight, eye.expand(len(X), -1, -1)], dim=2)


@pytest.fixture(params=[1, 2], ids=["one_output", "two_outputs"])
def blr(request):
    """A fitted FullLaplace of nn.Linear (exact posterior) and its closed-form covariance."""
    outputs, g = request.param, torch.Generator().manual_seed(3)
    X, y = torch.randn(15, 3, generator=g), torch.randn(15, outputs, generator=g)
    torch.manual_seed(0)
    la = FullLaplace(nn.Linear(3, outputs), "regression", sigma_noise=SIGMA, prior_precision=PRIOR)
    la.fit(_loader(X, y))
    J = _features(X, outputs).flatten(0, 1)
    precision = J.T @ J / SIGMA**2 + PRIOR * torch.eye(J.shape[1])
    candidates, targets = torch.randn(9, 3, generator=g), torch.randn(3, 3, generator=g)
    return la, torch.linalg.inv(precision), candidates, targets


def _updated(Sigma, J_x):
    """Weight covariance after observing y(x) = J_x theta + noise (closed form)."""
    return torch.linalg.inv(torch.linalg.inv(Sigma) + J_x.T @ J_x / SIGMA**2)


def test_posterior_is_the_closed_form(blr):
    la, Sigma, _, _ = blr
    torch.testing.assert_close(la.posterior_covariance, Sigma)


def test_total_information_gain_is_the_weight_entropy_decrease(blr):
    la, Sigma, candidates, _ = blr
    J = _features(candidates, la.n_outputs)
    truth = torch.stack(
        [0.5 * (torch.logdet(Sigma) - torch.logdet(_updated(Sigma, J_x))) for J_x in J]
    )
    beta = 1 / SIGMA**2
    variance = J @ Sigma @ J.mT
    torch.testing.assert_close(total_information_gain(variance, beta), truth)
    torch.testing.assert_close(mackay_total_information_gain(_kernel(la), candidates, beta), truth)
    chosen = select(la, candidates, 3, "total_information_gain")
    assert chosen.tolist() == truth.argsort(descending=True)[:3].tolist()


def _target_gain(Sigma, J_x, J_u):
    """Entropy decrease of f(x_u) from the output covariance before and after measuring."""
    before = J_u @ Sigma @ J_u.T
    after = J_u @ _updated(Sigma, J_x) @ J_u.T
    return 0.5 * (torch.logdet(before) - torch.logdet(after))


def test_marginal_information_gain_is_the_target_entropy_decrease(blr):
    la, Sigma, candidates, targets = blr
    J, J_u = _features(candidates, la.n_outputs), _features(targets[:1], la.n_outputs)[0]
    truth = torch.stack([_target_gain(Sigma, J_x, J_u) for J_x in J])
    variance, covariance = J @ Sigma @ J.mT, J @ Sigma @ J_u.T
    scalar = (lambda t: t[..., 0, 0]) if la.n_outputs == 1 else (lambda t: t)
    gains = marginal_information_gain(
        scalar(variance), scalar(covariance), scalar(J_u @ Sigma @ J_u.T), 1 / SIGMA**2
    )
    torch.testing.assert_close(gains, truth)
    kernel = _kernel(la)
    target = targets[:1]
    torch.testing.assert_close(
        mackay_marginal_information_gain(kernel, candidates, target, 1 / SIGMA**2), truth
    )
    forbidden = truth >= truth.max()
    chosen = select(
        la, candidates, 2, "marginal_information_gain", target=target, forbidden=forbidden
    )
    assert chosen.tolist() == truth.argsort(descending=True)[1:3].tolist()


def test_mean_marginal_information_gain_is_the_mean_of_the_target_gains(blr):
    la, Sigma, candidates, targets = blr
    J, J_u = _features(candidates, la.n_outputs), _features(targets, la.n_outputs)
    truth = torch.stack([torch.stack([_target_gain(Sigma, J_x, j) for j in J_u]) for J_x in J])
    covariance = torch.einsum("nap,pq,mbq->nmab", J, Sigma, J_u)
    gains = mean_marginal_information_gain(
        J @ Sigma @ J.mT, covariance, J_u @ Sigma @ J_u.mT, 1 / SIGMA**2
    )
    torch.testing.assert_close(gains, truth.mean(1))
    kernel = _kernel(la)
    torch.testing.assert_close(
        mackay_mean_marginal_information_gain(kernel, candidates, targets, 1 / SIGMA**2),
        truth.mean(1),
    )


def test_forbidden_candidates_score_minus_infinity():
    variance = torch.tensor([1.0, 3.0, 2.0])
    gains = total_information_gain(variance, 4.0, forbidden=torch.tensor([False, True, False]))
    assert gains[1] == -math.inf
    torch.testing.assert_close(gains[[0, 2]], 0.5 * torch.log1p(4.0 * variance[[0, 2]]))


# --------------------------------------------------------------- classification criteria
def _random_samples(S=7, n=5, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(S, n, C, generator=g), -1)


def _brute_entropy(p):
    return -sum(float(q) * math.log(float(q)) for q in p if q > 0)


def test_bald_is_entropy_of_mean_minus_mean_entropy_by_brute_force():
    samples = _random_samples()
    S, n, _ = samples.shape
    truth = []
    for i in range(n):
        mean = samples[:, i].mean(0)
        truth.append(
            _brute_entropy(mean) - sum(_brute_entropy(samples[s, i]) for s in range(S)) / S
        )
    torch.testing.assert_close(bald(samples), torch.tensor(truth))
    total, expected, mutual = uncertainty_decomposition(samples)
    assert torch.equal(total, expected + mutual)
    torch.testing.assert_close(total, entropy(samples.mean(0)))


def test_classification_criteria_against_hand_values():
    certain_disagreeing = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, n=1, C=2)
    agreeing = torch.full((2, 1, 2), 0.5)
    confident = torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]])
    samples = torch.cat([certain_disagreeing, agreeing, confident], 1)
    log2 = math.log(2)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    torch.testing.assert_close(bald(samples), torch.tensor([log2, 0.0, log2 - h]))
    torch.testing.assert_close(max_entropy(samples.mean(0)), torch.full((3,), log2))
    torch.testing.assert_close(mean_std(samples), torch.tensor([0.5, 0.0, 0.4]))
    probs = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    torch.testing.assert_close(variation_ratios(probs), torch.tensor([0.3, 0.0, 0.5]))
    torch.testing.assert_close(max_entropy(torch.full((1, 4), 0.25)), torch.tensor([math.log(4)]))


def test_epig_against_a_brute_force_double_loop():
    both = _random_samples(S=5, n=5, C=3, seed=4)
    candidates, targets = both[:, :3], both[:, 3:]
    S, n, C = candidates.shape
    truth = []
    for i in range(n):
        kls = []
        for j in range(targets.shape[1]):
            kl = 0.0
            for c, d in itertools.product(range(C), range(C)):
                joint = sum(float(candidates[s, i, c] * targets[s, j, d]) for s in range(S)) / S
                product = float(candidates[:, i, c].mean() * targets[:, j, d].mean())
                kl += joint * math.log(joint / product)
            kls.append(kl)
        truth.append(sum(kls) / len(kls))
    torch.testing.assert_close(epig(candidates, targets), torch.tensor(truth))


# --------------------------------------------------------------- BatchBALD
def _brute_joint_mi(samples, indices):
    S, _, C = samples.shape
    joint_h = 0.0
    for labels in itertools.product(range(C), repeat=len(indices)):
        p = sum(
            math.prod(float(samples[s, i, c]) for i, c in zip(indices, labels)) for s in range(S)
        )
        joint_h -= p / S * math.log(p / S)
    expected = sum(_brute_entropy(samples[s, i]) for s in range(S) for i in indices) / S
    return joint_h - expected


def test_batch_bald_of_one_is_the_bald_argmax():
    samples = _random_samples(S=9, n=8, C=3, seed=1)
    selection = batch_bald(samples, 1)
    scores = bald(samples)
    assert selection.indices.tolist() == [int(scores.argmax())]
    torch.testing.assert_close(selection.scores[0], scores.max())


def test_batch_bald_pairs_by_enumeration():
    samples = _random_samples(S=6, n=6, C=3, seed=2)
    selection = batch_bald(samples, 2)
    first, second = selection.indices.tolist()
    pair_mi = [_brute_joint_mi(samples, [first, j]) if j != first else -1 for j in range(6)]
    assert second == max(range(6), key=pair_mi.__getitem__)
    torch.testing.assert_close(selection.scores[1].item(), pair_mi[second])
    pair = samples[:, [first, second]]
    torch.testing.assert_close(joint_mutual_information(pair).item(), pair_mi[second])


def test_monte_carlo_joint_entropy_is_close_and_seeded():
    samples = _random_samples(S=6, n=3, C=3, seed=5)
    exact = joint_entropy(samples)
    M = 8192

    def sampled(seed):
        g = torch.Generator().manual_seed(seed)
        return joint_entropy(samples, max_configurations=9, n_configurations=M, generator=g)

    # each Monte Carlo term -log p(a) + H[y_3 | a] lies in [0, 3 log 3], so its standard
    # deviation is at most 1.5 log 3 and five standard errors are 7.5 log 3 / sqrt(M)
    assert abs(sampled(0) - exact) < 7.5 * math.log(3) / math.sqrt(M)
    assert sampled(0) == sampled(0)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    pool = _random_samples(S=6, n=10, C=3, seed=6)
    options = dict(max_configurations=9, n_configurations=512)
    first = batch_bald(pool, 4, generator=g1, **options)
    assert torch.equal(first.indices, batch_bald(pool, 4, generator=g2, **options).indices)
    assert len(set(first.indices.tolist())) == 4


# --------------------------------------------------------------- GPA
def _random_kernel(n=60, rank=12, seed=0, duplicates=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, rank, generator=g)
    if duplicates:
        A[n // 2 :] = A[: n - n // 2]
    return A @ A.T / rank


@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "duplicated_points"])
def test_fast_gpa_selects_exactly_gpa(duplicates):
    K, noise = _random_kernel(duplicates=duplicates), 0.05
    reference = gpa(K, 20, noise)
    fast = fast_gpa(K, 20, noise)
    columns = fast_gpa_from_kernel(K.diagonal(), lambda i: K[:, i], 20, noise)
    assert reference.indices.tolist() == fast.indices.tolist() == columns.indices.tolist()
    torch.testing.assert_close(fast.scores, reference.scores)
    torch.testing.assert_close(columns.scores, reference.scores)
    assert reference.scores[0] == K.diagonal().max()
    if duplicates:  # the lower copy of each duplicated point wins its tie
        assert all(i < 30 for i in reference.indices[:2].tolist())


def test_gpa_forbidden_and_bad_columns():
    K, noise = _random_kernel(n=12, seed=2), 0.1
    forbidden = torch.zeros(12, dtype=torch.bool)
    forbidden[int(K.diagonal().argmax())] = True
    reference = gpa(K, 5, noise, forbidden=forbidden)
    assert not forbidden[reference.indices].any()
    assert (
        reference.indices.tolist() == fast_gpa(K, 5, noise, forbidden=forbidden).indices.tolist()
    )
    columns = fast_gpa_from_kernel(K.diagonal(), lambda i: K[:, i], 5, noise, forbidden=forbidden)
    assert columns.indices.tolist() == reference.indices.tolist()
    with pytest.raises(ValueError, match=r"column\(\d+\) must have shape \(12,\)"):
        fast_gpa_from_kernel(K.diagonal(), lambda i: K[:3, i], 2, noise)
    with pytest.raises(ValueError, match="covariance must be square"):
        gpa(K[:3], 2, noise)


def _conditional_variances(K, chosen, noise):
    """Variances of the pool given noisy observations at ``chosen`` (closed form), with the
    chosen points at -inf."""
    block = K[chosen][:, chosen] + noise * torch.eye(len(chosen), dtype=K.dtype)
    explained = K[:, chosen] @ torch.linalg.solve(block, K[chosen, :])
    variance = K.diagonal() - explained.diagonal()
    return variance.index_fill(0, torch.tensor(chosen, dtype=torch.long), -math.inf)


def test_gpa_scores_are_conditional_variances():
    K, noise = _random_kernel(n=10, seed=1), 0.1
    selection = gpa(K, 3, noise)
    chosen = selection.indices.tolist()
    for t in range(3):
        variance = _conditional_variances(K, chosen[:t], noise)
        assert chosen[t] == int(variance.argmax())
        torch.testing.assert_close(selection.scores[t], variance.max())


def _regression_mlp(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(20, 2, generator=g, dtype=dtype)
    y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * torch.randn(20, 1, generator=g, dtype=dtype)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(dtype)
    la = Laplace(model, "regression", hessian_structure="full", sigma_noise=0.3)
    la.fit(_loader(X, y))
    pool = torch.randn(50, 2, generator=g, dtype=dtype)
    return la, pool


def test_gpa_on_a_fitted_mlp_kernel():
    la, pool = _regression_mlp()
    K = _kernel(la)(pool)[:, :, 0, 0]
    noise = float(la.sigma_noise) ** 2
    reference = gpa(K, 20, noise)
    assert reference.indices.tolist() == fast_gpa(K, 20, noise).indices.tolist()
    for criterion in ("gpa", "fast_gpa"):
        assert (
            select(la, pool, 20, criterion, batch_size=16).tolist() == reference.indices.tolist()
        )


# --------------------------------------------------------------- select on a classifier
@pytest.fixture(scope="module")
def classifier():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(40, 2, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(_loader(X, y))
    return la, 3 * torch.randn(24, 2, generator=g), torch.randn(4, 2, generator=g)


CLASSIFIER_CASES = {
    "max_entropy": {},
    "variation_ratios": {"pred_type": "nn", "n_samples": 20},
    "bald": {"n_samples": 30},
    "mean_std": {"pred_type": "nn", "n_samples": 20},
    "epig": {"n_samples": 30},
    "batch_bald": {"n_samples": 30},
}


@pytest.mark.parametrize("criterion", list(CLASSIFIER_CASES))
def test_select_on_a_last_layer_kron_classifier(classifier, criterion):
    la, pool, targets = classifier
    options = dict(CLASSIFIER_CASES[criterion])
    if criterion == "epig":
        options["targets"] = targets

    def run(batch_size):
        g = torch.Generator().manual_seed(0)
        return select(la, pool, 5, criterion, batch_size=batch_size, generator=g, **options)

    chosen = run(7)
    assert chosen.shape == (5,) and len(set(chosen.tolist())) == 5
    assert torch.equal(chosen, run(7))
    if criterion in ("epig", "batch_bald"):  # joint samples do not depend on the chunking
        assert torch.equal(chosen, run(64))
    if criterion != "batch_bald":
        g = torch.Generator().manual_seed(0)
        scores = score(la, pool, criterion, batch_size=7, generator=g, **options)
        assert chosen.tolist() == scores.argsort(descending=True, stable=True)[:5].tolist()


def test_select_bald_uses_the_predictive_samples(classifier):
    la, pool, _ = classifier
    samples = la.predictive_samples(pool, n_samples=40, generator=torch.Generator().manual_seed(1))
    chosen = select(la, pool, 3, "bald", n_samples=40, generator=torch.Generator().manual_seed(1))
    assert chosen.tolist() == bald(samples).argsort(descending=True, stable=True)[:3].tolist()


def test_select_with_a_progress_bar_and_a_forbidden_zone(classifier):
    la, pool, _ = classifier
    zone = lambda X: X[:, 0] > 0  # noqa: E731
    chosen = select(la, pool, 4, "max_entropy", progress_bar=True, forbidden=zone)
    assert not zone(pool)[chosen].any()


def test_select_on_an_all_weights_kron_classifier():
    g = torch.Generator().manual_seed(8)
    X, y = torch.randn(30, 2, generator=g), torch.randint(2, (30,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 2))
    la = Laplace(model, "classification", hessian_structure="kron")
    la.fit(_loader(X, y))
    pool = torch.randn(12, 2, generator=g)
    chosen = select(la, pool, 3, "batch_bald", n_samples=20, generator=g)
    assert len(set(chosen.tolist())) == 3


def test_select_errors(classifier):
    la, pool, _ = classifier
    with pytest.raises(ValueError, match="criterion must be one of .*'bald'.*got 'bold'"):
        select(la, pool, 2, "bold")
    with pytest.raises(UnknownOptionError, match="does not take .*'link'.*accepts 'pred_type'"):
        select(la, pool, 2, "bald", link="probit")
    with pytest.raises(ValueError, match="needs the option targets"):
        select(la, pool, 2, "epig")
    with pytest.raises(ValueError, match="k must be at most the number of selectable"):
        select(la, pool, 25, "bald")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        select(la, pool, 0, "bald")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        select(la, pool, 2, "bald", batch_size=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        select(la, pool, 2, "bald", generator=0)
    with pytest.raises(ValueError, match="forbidden must have shape"):
        select(la, pool, 2, "bald", forbidden=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="noise_precision has no default for likelihood"):
        select(la, pool, 2, "total_information_gain")
    with pytest.raises(ValueError, match="selects a batch greedily"):
        score(la, pool, "batch_bald")
    with pytest.raises(TypeError, match="pool_X must be a tensor"):
        select(la, pool.tolist(), 2, "bald")
    regression, reg_pool = _regression_mlp()
    with pytest.raises(ValueError, match="needs a classification Laplace approximation"):
        select(regression, reg_pool, 2, "bald")
    with pytest.raises(ValueError, match="target must be a batch of one input"):
        select(regression, reg_pool, 2, "marginal_information_gain", target=reg_pool[:2])
    with pytest.raises(ValueError, match="needs a model with one output"):
        select(la, pool, 2, "fast_gpa", noise_variance=0.1)
    with pytest.raises(ValueError, match="noise_variance must be positive"):
        gpa(_random_kernel(n=5), 2, 0.0)
    with pytest.raises(ValueError, match="noise_precision must be positive"):
        total_information_gain(torch.ones(3), -1.0)


# --------------------------------------------------------------- float32 against float64
@pytest.fixture
def float32_blr():
    """A float32 FullLaplace of nn.Linear(3, 1), the float64 pool kernel and its error bound."""
    X64 = torch.randn(15, 3, generator=torch.Generator().manual_seed(3))
    y64 = torch.randn(15, 1, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    la = FullLaplace(
        nn.Linear(3, 1).float(), "regression", sigma_noise=SIGMA, prior_precision=PRIOR
    )
    la.fit(_loader(X64.float(), y64.float()))
    J = _features(X64, 1).flatten(0, 1)
    P = J.T @ J / SIGMA**2 + PRIOR * torch.eye(4)
    pool = torch.randn(30, 3, generator=torch.Generator().manual_seed(5))
    J_pool = _features(pool, 1)[:, 0]
    K64 = J_pool @ torch.linalg.inv(P) @ J_pool.T
    # float32 P^-1 by a backward-stable Cholesky solve: each k(x, x') has a relative error
    # (to the largest variance) of about cond(P) * params * eps32; a factor 10 of headroom
    relative = 10 * torch.linalg.cond(P).item() * 4 * torch.finfo(torch.float32).eps
    return la, pool, K64, relative


def test_float32_mackay_against_float64_truth(float32_blr):
    la, pool, K64, relative = float32_blr
    beta, eps32 = 1 / SIGMA**2, torch.finfo(torch.float32).eps
    truth = 0.5 * torch.log1p(beta * K64.diagonal())
    gains = mackay_total_information_gain(_kernel(la), pool.float(), beta).double()
    # d/dk 0.5 log(1 + beta k) = 0.5 beta / (1 + beta k): the gain's error is below half the
    # kernel's relative error, as beta k / (1 + beta k) < 1
    torch.testing.assert_close(gains, truth, atol=0.5 * relative, rtol=0)
    v, c, v_u = K64.diagonal(), K64[:, 0], K64[0, 0]
    rho = c**2 / (v_u * (v + 1 / beta))
    truth_u = -0.5 * torch.log1p(-rho)
    gains_u = mackay_marginal_information_gain(_kernel(la), pool.float(), pool[:1].float(), beta)
    # rho's relative error is at most 4x the kernel's (c^2, v_u, v) and d gain / d rho is
    # 0.5 / (1 - rho); plus the float32 rounding of the gain itself
    tolerance = 0.5 * rho / (1 - rho) * 4 * relative + eps32 * truth_u
    assert ((gains_u.double() - truth_u).abs() <= tolerance).all()


def test_float32_fast_gpa_against_float64_truth(float32_blr):
    la, pool, K64, relative = float32_blr
    K32, noise = _kernel(la)(pool.float())[:, :, 0, 0], SIGMA**2
    reference, fast = gpa(K64, 10, noise), fast_gpa(K32, 10, noise)
    # the float32 conditional variances inherit the kernel's error (relative times the
    # largest variance); each rank-one update subtracts at most the current variance, so its
    # rounding adds a few eps32 of the largest variance per step, inside the headroom. Where
    # each float64 step's best variance leads the runner-up by more than twice that error,
    # the selections must agree
    error = relative * K64.diagonal().max().item()
    chosen = reference.indices.tolist()
    for t in range(10):
        best, runner_up = _conditional_variances(K64, chosen[:t], noise).topk(2).values
        assert best - runner_up > 2 * error  # the precondition of the comparison
    assert fast.indices.tolist() == chosen
    torch.testing.assert_close(fast.scores.double(), reference.scores, atol=error, rtol=0)
