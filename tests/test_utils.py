"""Numerical helpers, prior layouts, validation and calibration metrics against ground truth."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch
from conftest import make_mlp
from torchmetrics import MeanSquaredError

from laplace.utils.enums import LinkApprox, PredType
from laplace.utils.metrics import (
    RunningNLLMetric,
    expected_calibration_error,
    reliability_diagram,
)
from laplace.utils.utils import (
    diagonal_add_scalar,
    expand_prior_precision,
    fix_prior_prec_structure,
    get_nll,
    invsqrt_precision,
    normal_samples,
    parameters_per_layer,
    symeig,
    validate,
)

matplotlib.use("Agg")


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g)
    return A @ A.T + 0.5 * torch.eye(n)


# ----------------------------------------------------------------------------- linear algebra
def test_symeig_reconstructs_and_sorts():
    M = _spd(5)
    values, vectors = symeig(M)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, M)
    assert torch.all(values[1:] >= values[:-1])


def test_symeig_clamps_negative_eigenvalues():
    Q, _ = torch.linalg.qr(_spd(4))
    M = Q @ torch.diag(torch.tensor([-1e-3, 0.0, 1.0, 2.0])) @ Q.T
    values, _ = symeig(M)
    torch.testing.assert_close(values, torch.tensor([0.0, 0.0, 1.0, 2.0]))


@pytest.mark.parametrize(
    ("solver", "jitter"),
    [("symeig", 1.0), ("psd_eigh", 1e-6), ("psd_eigenvalues", 1e-6)],
)
def test_eigensolvers_retry_with_jitter(solver, jitter, monkeypatch):
    """One retry on ``M + jitter I`` after a failure: the identity for the public ``symeig``
    (laplace-torch's contract), ``1e-6 I`` for the internal float64 routines."""
    from laplace.utils import utils as utils_module

    M = _spd(4)
    name = "eigvalsh" if solver == "psd_eigenvalues" else "eigh"
    original = getattr(torch.linalg, name)
    calls = []

    def flaky(A, **kwargs):
        calls.append(A.clone())
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("did not converge")
        return original(A, **kwargs)

    monkeypatch.setattr(torch.linalg, name, flaky)
    result = getattr(utils_module, solver)(M)
    values = result if solver == "psd_eigenvalues" else result[0]
    assert len(calls) == 2
    torch.testing.assert_close(calls[1] - M, jitter * torch.eye(4))
    torch.testing.assert_close(values, torch.linalg.eigvalsh(M))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symeig_works_in_the_input_dtype(dtype, monkeypatch):
    M = _spd(5).to(dtype)
    seen = []
    original = torch.linalg.eigh

    def recording(A, **kwargs):
        seen.append((A.dtype, kwargs.get("UPLO", "L")))
        return original(A, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", recording)
    values, vectors = symeig(M)
    assert seen == [(dtype, "U")] and values.dtype == vectors.dtype == dtype
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, M)


def test_symeig_uses_the_upper_triangle():
    M = _spd(4)
    garbage_below = M.triu() + torch.full((4, 4), 7.0).tril(-1)
    torch.testing.assert_close(symeig(garbage_below)[0], torch.linalg.eigvalsh(M))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_symeig_rejects_non_finite_matrices(bad):
    M = _spd(3)
    M[0, 1] = M[1, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        symeig(M)


def test_symeig_raises_when_the_retry_fails_too(monkeypatch):
    def failing(A, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.raises(torch.linalg.LinAlgError):
        symeig(_spd(3))


@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 4)], ids=["single", "batched"])
def test_invsqrt_precision(shape):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(shape, generator=g)
    M = A @ A.mT + 0.5 * torch.eye(shape[-1])
    L = invsqrt_precision(M)
    torch.testing.assert_close(L, L.tril())
    torch.testing.assert_close(L @ L.mT, torch.linalg.inv(M))


def test_diagonal_add_scalar_is_out_of_place_and_differentiable():
    X = _spd(3)
    value = torch.tensor(2.0, requires_grad=True)
    result = diagonal_add_scalar(X, value)
    torch.testing.assert_close(result, X + 2.0 * torch.eye(3))
    torch.testing.assert_close(X, _spd(3))
    result.trace().backward()
    torch.testing.assert_close(value.grad, torch.tensor(3.0))


# ----------------------------------------------------------------------------- sampling
def test_normal_samples_diagonal_moments_and_reproducibility():
    mean = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    var = torch.tensor([[0.5, 2.0], [1.0, 0.1]])
    samples = normal_samples(mean, var, 100_000, torch.Generator().manual_seed(0))
    assert samples.shape == (100_000, 2, 2)
    torch.testing.assert_close(samples.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(samples.var(0), var, atol=0.03, rtol=0.02)
    again = normal_samples(mean, var, 100_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples, again)


@pytest.mark.parametrize("singular", [False, True], ids=["pd", "singular"])
def test_normal_samples_full_covariance(singular):
    mean = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 3.0]])
    cov = torch.stack([_spd(3, seed=1), _spd(3, seed=2)]) / 3
    if singular:
        v = torch.tensor([1.0, 2.0, -1.0])
        cov[1] = torch.outer(v, v)
    samples = normal_samples(mean, cov, 200_000, torch.Generator().manual_seed(1))
    assert samples.shape == (200_000, 2, 3)
    centred = samples - samples.mean(0)
    empirical = torch.einsum("nbi,nbj->bij", centred, centred) / (samples.shape[0] - 1)
    torch.testing.assert_close(samples.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(empirical, cov, atol=0.05, rtol=0.02)


def test_normal_samples_rejects_bad_var():
    with pytest.raises(ValueError, match="dimensions"):
        normal_samples(torch.zeros(2, 3), torch.ones(2, 3, 3, 3), 4)


# ----------------------------------------------------------------------------- prior layout
def test_parameters_per_layer_skips_frozen():
    model = make_mlp(n_in=3, n_hidden=5, n_out=2)
    assert parameters_per_layer(model) == [15, 5, 10, 2]
    model[2].bias.requires_grad_(False)
    assert parameters_per_layer(model) == [15, 5, 10]


@pytest.mark.parametrize(
    "structure, length", [("scalar", 1), ("layerwise", 4), ("diag", 32)], ids=str
)
def test_fix_prior_prec_structure_fills(structure, length):
    prior = fix_prior_prec_structure(2.0, structure, 4, 32, "cpu", torch.float32)
    assert prior.shape == (length,)
    assert prior.dtype == torch.float32
    torch.testing.assert_close(prior, torch.full((length,), 2.0, dtype=torch.float32))


def test_fix_prior_prec_structure_tensors():
    given = torch.arange(1.0, 5.0)
    assert fix_prior_prec_structure(given, "layerwise", 4, 32) is given
    filled = fix_prior_prec_structure(torch.tensor(3.0), "diag", 4, 32)
    torch.testing.assert_close(filled, torch.full((32,), 3.0))
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        fix_prior_prec_structure(given, "diag", 4, 32)
    with pytest.raises(ValueError, match="prior_structure"):
        fix_prior_prec_structure(1.0, "blockwise", 4, 32)


def test_expand_prior_precision():
    model = make_mlp(n_in=3, n_hidden=5, n_out=2)
    torch.testing.assert_close(
        expand_prior_precision(torch.tensor([2.0]), model), torch.full((32,), 2.0)
    )
    layerwise = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = torch.cat(
        [torch.full((n,), v) for n, v in zip([15, 5, 10, 2], [1.0, 2.0, 3.0, 4.0])]
    )
    torch.testing.assert_close(expand_prior_precision(layerwise, model), expected)
    diag = torch.linspace(0.1, 3.2, 32)
    torch.testing.assert_close(expand_prior_precision(diag, model), diag)
    with pytest.raises(ValueError, match="1, 4 .* or 32"):
        expand_prior_precision(torch.ones(5), model)


# ----------------------------------------------------------------------------- nll and metrics
def test_get_nll_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    targets = torch.tensor([0, 2])
    expected = -(math.log(0.7) + math.log(0.5)) / 2
    torch.testing.assert_close(get_nll(probs, targets), torch.tensor(expected))
    assert torch.isfinite(get_nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))


def test_running_nll_metric_accumulates_and_ignores():
    metric = RunningNLLMetric(ignore_index=-1)
    metric.update(torch.tensor([[0.7, 0.3], [0.4, 0.6]]), torch.tensor([0, -1]))
    metric.update(torch.tensor([[0.2, 0.8]]), torch.tensor([1]))
    expected = -(math.log(0.7) + math.log(0.8)) / 2
    torch.testing.assert_close(
        metric.compute(), torch.tensor(expected, dtype=metric.compute().dtype)
    )
    metric.reset()
    metric.update(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
    torch.testing.assert_close(metric.compute().item(), math.log(2.0))


def test_expected_calibration_error_hand_worked():
    # Two bins: (0, 0.5] and (0.5, 1].
    # Bin 1: confidences 0.4, 0.5; one correct -> |0.5 - 0.45| = 0.05, weight 2/5.
    # Bin 2: confidences 0.9, 0.8, 0.6; two correct -> |2/3 - 0.7667| = 0.1, weight 3/5.
    probs = torch.tensor(
        [[0.4, 0.3, 0.3], [0.5, 0.25, 0.25], [0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]
    )
    targets = torch.tensor([0, 1, 0, 1, 0])
    expected = 2 / 5 * 0.05 + 3 / 5 * abs(2 / 3 - (0.9 + 0.8 + 0.6) / 3)
    assert expected_calibration_error(probs, targets, n_bins=2) == pytest.approx(expected)


def test_expected_calibration_error_perfect_and_errors():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, torch.tensor([1, 0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(probs, torch.tensor([0, 1]), n_bins=0)
    with pytest.raises(ValueError, match="shape"):
        expected_calibration_error(probs, torch.tensor([0, 1, 1]))


def test_reliability_diagram_draws_one_bar_per_bin():
    probs = torch.softmax(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)), -1)
    targets = torch.randint(3, (50,), generator=torch.Generator().manual_seed(1))
    ax = reliability_diagram(probs, targets, n_bins=5)
    heights = [patch.get_height() for patch in ax.patches]
    assert len(heights) == 5
    confidence, prediction = probs.max(-1)
    top_bin = confidence > 0.8
    if top_bin.any():
        accuracy = (prediction[top_bin] == targets[top_bin]).double().mean().item()
        assert heights[-1] == pytest.approx(accuracy)
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


# ----------------------------------------------------------------------------- validate
class FakeClassifier:
    """A predictive returning softmax probabilities of a fixed linear map; records kwargs."""

    def __init__(self) -> None:
        self.weight = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]])
        self.calls: list[dict] = []

    def __call__(self, X, **kwargs):
        self.calls.append(kwargs)
        X = X["inputs"] if isinstance(X, dict) else X
        return torch.softmax(X @ self.weight, dim=-1)


class FakeRegressor:
    """A predictive returning ``(f_mu, f_var)`` with a full output covariance."""

    def __call__(self, X, **kwargs):
        f_mu = torch.stack([X.sum(-1), X[:, 0]], dim=-1)
        f_var = torch.diag_embed(0.5 + X.square())
        return f_mu, f_var


def _classification_batches():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 2, generator=g)
    y = torch.randint(3, (10,), generator=g)
    return X, y, [(X[:4], y[:4]), (X[4:], y[4:])]


def test_validate_metric_and_callable_agree_with_nll():
    X, y, batches = _classification_batches()
    la = FakeClassifier()
    expected = get_nll(la(X), y).item()
    assert validate(la, batches, RunningNLLMetric()) == pytest.approx(expected)
    assert validate(la, batches, get_nll) == pytest.approx(expected)


def test_validate_resets_the_metric_and_passes_enums():
    _, _, batches = _classification_batches()
    la, metric = FakeClassifier(), RunningNLLMetric()
    first = validate(la, batches, metric, pred_type="nn", link_approx="mc", n_samples=7)
    assert validate(la, batches, metric) == pytest.approx(first)
    assert la.calls[0] == {"pred_type": PredType.NN, "link_approx": LinkApprox.MC, "n_samples": 7}
    with pytest.raises(ValueError, match="pred_type"):
        validate(la, batches, metric, pred_type="laplace")


def test_validate_dict_batches():
    X, y, _ = _classification_batches()
    batches = [{"inputs": X[:5], "target": y[:5]}, {"inputs": X[5:], "target": y[5:]}]
    la = FakeClassifier()
    result = validate(la, batches, RunningNLLMetric(), dict_key_y="target")
    assert result == pytest.approx(get_nll(la(X), y).item())


def test_validate_regression_metric_and_loss_with_var():
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(9, 2, generator=g), torch.randn(9, 2, generator=g)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    f_mu, f_var = FakeRegressor()(X)
    mse = ((f_mu - y) ** 2).mean(0).sum().item()
    assert validate(FakeRegressor(), batches, MeanSquaredError(num_outputs=2)) == pytest.approx(
        mse
    )

    def gaussian_nll(means, variances, targets):
        var = variances.diagonal(dim1=-2, dim2=-1)
        return (0.5 * ((means - targets) ** 2 / var + var.log())).mean()

    expected = gaussian_nll(f_mu, f_var, y).item()
    result = validate(FakeRegressor(), batches, gaussian_nll, loss_with_var=True)
    assert result == pytest.approx(expected)


def test_validate_errors():
    with pytest.raises(ValueError, match="no batches"):
        validate(FakeClassifier(), [], RunningNLLMetric())
    _, _, batches = _classification_batches()
    with pytest.raises(ValueError, match="loss_with_var"):
        validate(FakeClassifier(), batches, lambda m, v, y: 0.0, loss_with_var=True)


def test_stable_eigh_keeps_dtype_and_reconstructs_low_rank_float32():
    from laplace.utils.utils import stable_eigh

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(60, 8, generator=gen, dtype=torch.float32)
    M = A @ A.T  # rank 8
    eigenvalues, eigenvectors = stable_eigh(M)
    assert eigenvalues.dtype == eigenvectors.dtype == torch.float32
    reconstructed = eigenvectors @ torch.diag(eigenvalues) @ eigenvectors.T
    torch.testing.assert_close(reconstructed, M, atol=1e-4, rtol=1e-4)
    assert (eigenvalues[:-8].abs() < 1e-4).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_psd_eigenvalues_match_symeig(dtype):
    from laplace.utils.utils import psd_eigenvalues

    Q, _ = torch.linalg.qr(_spd(5))
    M = (Q @ torch.diag(torch.tensor([-1e-3, 0.0, 0.5, 1.0, 2.0])) @ Q.T).to(dtype)
    values = psd_eigenvalues(M)
    assert values.dtype == dtype
    torch.testing.assert_close(values, symeig(M)[0])
    torch.testing.assert_close(values, torch.tensor([0.0, 0.0, 0.5, 1.0, 2.0], dtype=dtype))
