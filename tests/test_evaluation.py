"""laplace.evaluation: metrics against hand-worked values, streaming against functional
versions, diagrams, and prior-precision grid search on a metric against a brute-force loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import make_mlp
from scipy import integrate, stats
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_calibration_error

from laplace import FunctionalLaplace, Laplace
from laplace.errors import UnknownOptionError
from laplace.evaluation import (
    BrierScore,
    ExpectedCalibrationError,
    GaussianCRPS,
    GaussianNLL,
    MaximumCalibrationError,
    NegativeLogLikelihood,
    RootMeanSquaredError,
    accuracy,
    brier_score,
    calibrate_prior_precision,
    calibration_bins,
    calibration_chi2,
    crps_gaussian,
    expected_calibration_error,
    gaussian_nll,
    get_metric,
    interval_coverage,
    maximum_calibration_error,
    mean_confidence,
    metric_names,
    negative_log_likelihood,
    proportion_diagram,
    regression_band_plot,
    regression_calibration_curve,
    regression_proportion_diagram,
    reliability_diagram,
    rmse,
)
from laplace.utils import validate


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One BLAS thread: these tiny tensors gain nothing from more, and on a busy machine
    two threads per process slowed this module from seconds to over a minute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# 4 samples, 3 classes. Confidences 0.7, 0.6, 0.4, 0.8; predictions 0, 1, 0, 2; targets
# 0, 0, 2, 2, so samples 0 and 3 are correct.
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
TARGETS = torch.tensor([0, 0, 2, 2])

# Regression: residuals y - mean = 1, 0, -2, 0.5 and standard deviations 1, 2, 1, 0.5, so
# the normalised residuals are 1, 0, -2, 1.
MEAN = torch.tensor([0.0, 1.0, 2.0, 3.0])
VAR = torch.tensor([1.0, 4.0, 1.0, 0.25])
Y = torch.tensor([1.0, 1.0, 0.0, 3.5])


# ----------------------------------------------------------------------------- classification
def test_calibration_bins_by_hand():
    # 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]: 0.4 -> bin 1; 0.7, 0.6 -> bin 2;
    # 0.8 -> bin 3.
    bins = calibration_bins(PROBS, TARGETS, n_bins=4)
    torch.testing.assert_close(bins.counts, torch.tensor([0.0, 1.0, 2.0, 1.0]))
    torch.testing.assert_close(bins.confidences, torch.tensor([0.0, 0.4, 0.65, 0.8]))
    torch.testing.assert_close(bins.accuracies, torch.tensor([0.0, 0.0, 0.5, 1.0]))
    torch.testing.assert_close(bins.edges, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(bins.proportions, torch.tensor([0.0, 0.25, 0.5, 0.25]))


def test_bin_edges_belong_to_the_lower_bin_and_zero_to_the_first():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]])  # confidences 0.5, 1, 0
    bins = calibration_bins(probs, torch.tensor([0, 0, 1]), n_bins=2)
    torch.testing.assert_close(bins.counts, torch.tensor([2.0, 1.0]))


def test_classification_metrics_by_hand():
    # Gaps |acc - conf|: bin 1 |0 - 0.4| = 0.4, bin 2 |0.5 - 0.65| = 0.15, bin 3 |1 - 0.8| = 0.2.
    ece = 1 / 4 * 0.4 + 2 / 4 * 0.15 + 1 / 4 * 0.2  # = 0.225
    assert expected_calibration_error(PROBS, TARGETS, n_bins=4).item() == pytest.approx(ece)
    assert maximum_calibration_error(PROBS, TARGETS, n_bins=4).item() == pytest.approx(0.4)
    # sum_c (p_c - onehot_c)^2 per sample: 0.09 + 0.04 + 0.01, 0.49 + 0.36 + 0.01,
    # 0.16 + 0.1225 + 0.5625, 0.01 + 0.01 + 0.04.
    brier = (0.14 + 0.86 + 0.845 + 0.06) / 4
    assert brier_score(PROBS, TARGETS).item() == pytest.approx(brier)
    nll = -(math.log(0.7) + math.log(0.3) + math.log(0.25) + math.log(0.8)) / 4
    assert negative_log_likelihood(PROBS, TARGETS).item() == pytest.approx(nll)
    assert accuracy(PROBS, TARGETS).item() == pytest.approx(2 / 4)
    assert mean_confidence(PROBS).item() == pytest.approx((0.7 + 0.6 + 0.4 + 0.8) / 4)


def test_calibration_errors_agree_with_torchmetrics_off_the_bin_edges():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 4, generator=g), dim=-1)
    targets = torch.randint(4, (200,), generator=g)
    for norm, ours in (("l1", expected_calibration_error), ("max", maximum_calibration_error)):
        theirs = multiclass_calibration_error(probs, targets, 4, n_bins=10, norm=norm)
        torch.testing.assert_close(ours(probs, targets, n_bins=10), theirs.to(probs.dtype))
    # On an edge they differ: torchmetrics puts 0.5 in the upper of two bins, we in the lower.
    probs = torch.tensor([[0.5, 0.5], [0.6, 0.4]])
    targets = torch.tensor([0, 1])  # the first correct, the second wrong
    ours = expected_calibration_error(probs, targets, n_bins=2).item()
    theirs = multiclass_calibration_error(probs, targets, 2, n_bins=2).item()
    assert ours == pytest.approx((0.5 + 0.6) / 2)  # two bins, gaps 0.5 and 0.6
    assert theirs == pytest.approx(abs(0.5 - 0.55))  # one bin


@pytest.mark.parametrize(
    ("probs", "targets", "n_bins", "error", "match"),
    [
        (PROBS, TARGETS[:3], 15, ValueError, "shape"),
        (PROBS[0], TARGETS[:1], 15, ValueError, "shape"),
        (PROBS, TARGETS, 0, ValueError, "n_bins"),
        (PROBS, TARGETS, 2.5, TypeError, "n_bins"),
        (PROBS, TARGETS.double(), 15, TypeError, "integer"),
        (PROBS * float("nan"), TARGETS, 15, ValueError, "NaN"),
        (PROBS * 2, TARGETS, 15, ValueError, r"\[0, 1\]"),
        (PROBS, TARGETS + 1, 15, ValueError, "class labels"),
        (PROBS.tolist(), TARGETS, 15, TypeError, "torch.Tensor"),
    ],
    ids=["targets", "probs-1d", "n_bins-0", "n_bins-float", "float-targets", "nan", "range",
         "label", "list"],
)  # fmt: skip
def test_classification_errors(probs, targets, n_bins, error, match):
    with pytest.raises(error, match=match):
        expected_calibration_error(probs, targets, n_bins=n_bins)
    if n_bins == 15:
        with pytest.raises(error, match=match):
            brier_score(probs, targets)


# ----------------------------------------------------------------------------- regression
def test_regression_metrics_by_hand():
    # 0.5 log(2 pi var) + r^2 / (2 var) per sample: the log terms add to 2 log(2 pi) (the
    # variances' logs cancel: log 4 + log 1/4 = 0) and the squares to (1 + 0 + 4 + 1) / 2.
    nll = (2 * math.log(2 * math.pi) + 3) / 4
    assert gaussian_nll(MEAN, VAR, Y).item() == pytest.approx(nll)
    assert rmse(MEAN, Y).item() == pytest.approx(math.sqrt((1 + 0 + 4 + 0.25) / 4))
    assert calibration_chi2(MEAN, VAR, Y).item() == pytest.approx((1 + 0 + 4 + 1) / 4)
    # |z| = 1, 0, 2, 1 against the half-widths 0.674 (50 %), 1.645 (90 %), 1.960 (95 %),
    # 2.576 (99 %): inside are 1, 3, 3 and 4 of the 4.
    coverage = interval_coverage(MEAN, VAR, Y, levels=(0.5, 0.9, 0.95, 0.99))
    torch.testing.assert_close(coverage, torch.tensor([0.25, 0.75, 0.75, 1.0]))


def test_crps_equals_the_integral_of_the_squared_cdf_difference():
    values = []
    for mu, var, y in zip(MEAN.tolist(), VAR.tolist(), Y.tolist()):
        cdf = stats.norm(mu, math.sqrt(var)).cdf
        below, _ = integrate.quad(lambda x: cdf(x) ** 2, -math.inf, y, epsabs=1e-12)
        above, _ = integrate.quad(lambda x: (1 - cdf(x)) ** 2, y, math.inf, epsabs=1e-12)
        values.append(below + above)
    assert crps_gaussian(MEAN, VAR, Y).item() == pytest.approx(sum(values) / 4, rel=1e-9)


def test_multi_output_scores_sum_over_outputs_and_covariances_give_their_diagonal():
    mean = torch.stack([MEAN, MEAN.flip(0)], dim=-1)
    var, y = torch.stack([VAR, VAR.flip(0)], dim=-1), torch.stack([Y, Y.flip(0)], dim=-1)
    covariance = torch.diag_embed(var) + 0.1 * torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    for score in (gaussian_nll, crps_gaussian):
        expected = 2 * score(MEAN, VAR, Y)  # the flipped column has the same mean score
        torch.testing.assert_close(score(mean, var, y), expected)
        torch.testing.assert_close(score(mean, covariance, y), expected)
    torch.testing.assert_close(calibration_chi2(mean, var, y), calibration_chi2(MEAN, VAR, Y))
    # targets (n,) for a single-output mean (n, 1)
    torch.testing.assert_close(
        gaussian_nll(MEAN[:, None], VAR[:, None], Y), gaussian_nll(MEAN, VAR, Y)
    )


def test_regression_calibration_curve():
    curve = regression_calibration_curve(MEAN, VAR, Y, n_levels=5)
    torch.testing.assert_close(curve.expected, torch.linspace(0, 1, 5))
    torch.testing.assert_close(curve.observed, interval_coverage(MEAN, VAR, Y, curve.expected))
    # level 0 covers only the exact hit (sample 1), level 1 everything
    assert curve.observed[0].item() == 0.25 and curve.observed[-1].item() == 1.0


@pytest.mark.parametrize(
    ("mean", "var", "targets", "error", "match"),
    [
        (MEAN, VAR, Y[:3], ValueError, "shape"),
        (MEAN, VAR[:3], Y, ValueError, "var must have"),
        (MEAN, -VAR, Y, ValueError, "positive"),
        (MEAN, VAR, Y * float("nan"), ValueError, "NaN"),
        (MEAN * float("inf"), VAR, Y, ValueError, "NaN or Inf"),
        (MEAN, VAR.tolist(), Y, TypeError, "torch.Tensor"),
    ],
    ids=["targets", "var", "negative-var", "nan", "inf", "list"],
)
def test_regression_errors(mean, var, targets, error, match):
    for score in (gaussian_nll, crps_gaussian, calibration_chi2, interval_coverage):
        with pytest.raises(error, match=match):
            score(mean, var, targets)


def test_level_and_count_errors():
    with pytest.raises(ValueError, match="levels"):
        interval_coverage(MEAN, VAR, Y, levels=(0.5, 1.5))
    with pytest.raises(ValueError, match="levels"):
        interval_coverage(MEAN, VAR, Y, levels=())
    with pytest.raises(ValueError, match="n_levels"):
        regression_calibration_curve(MEAN, VAR, Y, n_levels=1)
    with pytest.raises(ValueError, match="shape"):
        rmse(MEAN, Y[:2])


# ----------------------------------------------------------------------------- streaming
def _uneven(*tensors):
    """Batches of sizes 1, 5, 3 and the rest of each tensor."""
    bounds = [0, 1, 6, 9, len(tensors[0])]
    return [tuple(t[a:b] for t in tensors) for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(
    ("metric", "function"),
    [
        (ExpectedCalibrationError(n_bins=7), lambda p, y: expected_calibration_error(p, y, 7)),
        (MaximumCalibrationError(n_bins=7), lambda p, y: maximum_calibration_error(p, y, 7)),
        (BrierScore(), brier_score),
        (NegativeLogLikelihood(), negative_log_likelihood),
    ],
    ids=["ece", "mce", "brier", "nll"],
)
def test_streaming_classification_equals_functional(metric, function):
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(2 * torch.randn(23, 3, generator=g), dim=-1)
    targets = torch.randint(3, (23,), generator=g)
    for _ in range(2):  # reset restarts the sums
        metric.reset()
        for batch in _uneven(probs, targets):
            metric.update(*batch)
        torch.testing.assert_close(metric.compute(), function(probs, targets))
    assert metric.higher_is_better is False and metric.needs_variance is False


@pytest.mark.parametrize(
    ("metric", "function"),
    [(GaussianNLL(), gaussian_nll), (GaussianCRPS(), crps_gaussian)],
    ids=["gaussian_nll", "crps"],
)
def test_streaming_regression_equals_functional(metric, function):
    g = torch.Generator().manual_seed(2)
    mean, y = torch.randn(17, 2, generator=g), torch.randn(17, 2, generator=g)
    var = torch.rand(17, 2, generator=g) + 0.1
    for batch in _uneven(mean, var, y):
        metric.update(*batch)
    torch.testing.assert_close(metric.compute(), function(mean, var, y))
    assert metric.needs_variance is True
    rmse_metric = RootMeanSquaredError()
    for m, _, t in _uneven(mean, var, y):
        rmse_metric.update(m, t)
    torch.testing.assert_close(rmse_metric.compute(), rmse(mean, y))


def test_streaming_metrics_accumulate_float32_in_float64():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(30, 3, generator=g), dim=-1)
    targets = torch.randint(3, (30,), generator=g)
    metric = BrierScore()
    for batch in _uneven(probs.float(), targets):
        metric.update(*batch)
    assert metric.compute().dtype == torch.float64
    # float32 probabilities carry a relative round-off of about 6e-8 per entry
    assert metric.compute().item() == pytest.approx(brier_score(probs, targets).item(), rel=1e-6)


def test_metric_names():
    assert metric_names("classification") == ("ece", "mce", "nll", "brier", "accuracy")
    assert metric_names("regression") == ("mse", "rmse", "nll", "gaussian_nll", "crps")
    assert isinstance(get_metric("ECE"), ExpectedCalibrationError)
    assert isinstance(get_metric("nll", "regression"), GaussianNLL)
    with pytest.raises(UnknownOptionError, match="'ece', 'mce'"):
        get_metric("crps", "classification")
    with pytest.raises(ValueError, match="accepted names"):
        get_metric("calibration", "regression")
    with pytest.raises(TypeError, match="string"):
        get_metric(3)


# ----------------------------------------------------------------------------- validate
class _Regressor:
    """A regression predictive ``(f_mu, f_var)`` with a full output covariance."""

    likelihood = "regression"
    sigma_noise = torch.tensor(0.5)

    def __call__(self, X, **kwargs):
        return X[:, :2], torch.diag_embed(X[:, 2:].square() + 0.1)


def test_validate_gives_needs_variance_metrics_the_target_variance():
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(11, 4, generator=g), torch.randn(11, 2, generator=g)
    var = X[:, 2:].square() + 0.1 + 0.5**2  # diagonal of f_var plus sigma_noise^2
    batches = _uneven(X, y)
    expected = gaussian_nll(X[:, :2], var, y).item()
    assert validate(_Regressor(), batches, GaussianNLL()) == pytest.approx(expected)

    def callable_nll(mean, variance, targets):
        return gaussian_nll(mean, variance, targets)

    callable_nll.needs_variance = True
    assert validate(_Regressor(), batches, callable_nll) == pytest.approx(expected)
    with pytest.raises(ValueError, match="needs_variance"):
        validate(lambda X, **kwargs: torch.softmax(X, -1), batches, GaussianNLL())


# ----------------------------------------------------------------------------- plots
def test_plots_write_png_files(tmp_path):
    from matplotlib.figure import Figure

    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(2 * torch.randn(40, 3, generator=g), dim=-1)
    targets = torch.randint(3, (40,), generator=g)
    x = torch.linspace(-2, 2, 30)
    figures = {
        "reliability": reliability_diagram(probs, targets, n_bins=5, show_counts=True),
        "proportion": proportion_diagram(probs, n_bins=5),
        "coverage": regression_proportion_diagram(x.sin(), torch.full((30,), 0.1), x.cos()),
        "band": regression_band_plot(x, x.sin(), 0.1 + 0.1 * x.abs(), x[::3], x[::3].sin()),
    }
    for name, figure in figures.items():
        assert isinstance(figure, Figure)
        path = tmp_path / f"{name}.png"
        figure.savefig(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    # bars per bin: 5 accuracy bars and one gap bar per non-empty bin
    ax = Figure().subplots()
    assert reliability_diagram(probs, targets, n_bins=5, ax=ax) is ax.figure
    filled = int((calibration_bins(probs, targets, 5).counts > 0).sum())
    assert len(ax.patches) == 5 + filled


def test_plot_errors():
    x = torch.linspace(0, 1, 5)
    with pytest.raises(ValueError, match="std must have shape"):
        regression_band_plot(x, x, x[:3])
    with pytest.raises(ValueError, match="non-negative"):
        regression_band_plot(x, x, -x - 1)
    with pytest.raises(ValueError, match="n_std"):
        regression_band_plot(x, x, x, n_std=(0,))
    with pytest.raises(ValueError, match="together"):
        regression_band_plot(x, x, x, x_train=x)
    with pytest.raises(ValueError, match="n_bins"):
        proportion_diagram(PROBS, n_bins=0)


# ----------------------------------------------------------------------------- prior tuning
GRID = {"log_prior_prec_min": -2, "log_prior_prec_max": 3, "grid_size": 11}


def _grid(dtype=torch.float64):
    return torch.logspace(-2, 3, 11, dtype=dtype)


def _train(model, X, y, loss, steps):
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model(X), y).backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def classifier():
    """An over-confident MLP on noisy three-class data: the ECE has an interior optimum."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 2, generator=g)
    logits = 2 * torch.stack([X[:, 0], X[:, 1], -X[:, 0] - X[:, 1]], dim=-1)
    y = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)
    model = make_mlp(n_in=2, n_hidden=16, n_out=3, seed=0)
    _train(model, X[:40], y[:40], torch.nn.functional.cross_entropy, 200)
    return model, (X[:40], y[:40]), (X[40:], y[40:])


@pytest.fixture(scope="module")
def regressor():
    """An MLP on a noisy sine (noise 0.2; the model's is set to 0.22 below)."""
    g = torch.Generator().manual_seed(1)
    X = 3 * torch.rand(60, 1, generator=g)
    y = X.sin() + 0.2 * torch.randn(60, 1, generator=g)
    model = make_mlp(n_in=1, n_hidden=16, n_out=1, seed=1)
    _train(model, X[:40], y[:40], torch.nn.functional.mse_loss, 200)
    return model, (X[:40], y[:40]), (X[40:], y[40:])


def _loader(X, y, batch_size=7):
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def _fitted(model, likelihood, train, subset, structure, **kwargs):
    la = Laplace(
        model, likelihood, subset_of_weights=subset, hessian_structure=structure, **kwargs
    )
    la.fit(_loader(*train, batch_size=20))
    return la


def _ece_at(la, val, prior_precision):
    la.prior_precision = float(prior_precision)
    return expected_calibration_error(la(val[0], pred_type="glm", link_approx="probit"), val[1])


def _nll_at(la, val, prior_precision):
    la.prior_precision = float(prior_precision)
    f_mu, f_var = la(val[0], pred_type="glm")
    return gaussian_nll(f_mu, f_var.diagonal(dim1=-2, dim2=-1) + la.sigma_noise**2, val[1])


def _check_against_brute_force(la, loss, val, score, tolerance):
    la.optimize_prior_precision(method="gridsearch", val_loader=_loader(*val), loss=loss, **GRID)
    chosen = la.prior_precision.item()
    grid = _grid(la.prior_precision.dtype)
    brute = torch.stack([score(la, val, p) for p in grid]).double()
    assert min(abs(grid.double() - chosen)).item() <= 1e-6 * chosen  # a grid value
    assert score(la, val, chosen).item() <= brute.min().item() + tolerance
    return grid, brute


SETUPS = [("all", "full"), ("all", "kron"), ("all", "diag"), ("last_layer", "kron")]
IDS = ["full", "kron", "diag", "last_layer-kron"]


@pytest.mark.parametrize(("subset", "structure"), SETUPS, ids=IDS)
def test_gridsearch_on_ece_picks_the_brute_force_minimum(classifier, subset, structure):
    model, train, val = classifier
    la = _fitted(model, "classification", train, subset, structure)
    _, brute = _check_against_brute_force(la, "ece", val, _ece_at, 1e-12)
    assert 0 < int(brute.argmin()) < len(brute) - 1  # an interior optimum: a real test
    first = la.prior_precision.clone()
    _check_against_brute_force(la, ExpectedCalibrationError(), val, _ece_at, 1e-12)
    torch.testing.assert_close(la.prior_precision, first)


@pytest.mark.parametrize(("subset", "structure"), SETUPS, ids=IDS)
def test_gridsearch_on_gaussian_nll_picks_the_brute_force_minimum(regressor, subset, structure):
    model, train, val = regressor
    la = _fitted(model, "regression", train, subset, structure, sigma_noise=0.22)
    _, brute = _check_against_brute_force(la, "gaussian_nll", val, _nll_at, 1e-12)
    assert brute.max() - brute.min() > 1e-3  # the prior matters
    first = la.prior_precision.clone()
    for metric in (GaussianNLL, GaussianNLL()):  # a metric class and a metric object
        _check_against_brute_force(la, metric, val, _nll_at, 1e-12)
        torch.testing.assert_close(la.prior_precision, first)


def test_gridsearch_on_other_classes(classifier):
    model, train, val = classifier
    la = _fitted(model, "classification", train, "subnetwork", "full",
                 subnetwork_indices=torch.arange(0, 60, 3))  # fmt: skip
    _check_against_brute_force(la, "ece", val, _ece_at, 1e-12)
    la = FunctionalLaplace(model, "classification", n_subset=20)
    la.fit(_loader(*train, batch_size=20))
    _check_against_brute_force(la, "ece", val, _ece_at, 1e-12)


def test_refinement_is_at_least_as_good_and_does_not_refit(classifier, monkeypatch):
    model, train, val = classifier
    la = _fitted(model, "classification", train, "all", "kron")
    la.optimize_prior_precision(method="gridsearch", val_loader=_loader(*val), loss="ece", **GRID)
    plain = la.prior_precision.item()

    def no_refit(*args, **kwargs):
        raise AssertionError("the gridsearch must not refit")

    monkeypatch.setattr(la, "fit", no_refit)
    calibrate_prior_precision(la, _loader(*val), "ece", refine=9, grid_size=11,
                              log_prior_prec_min=-2, log_prior_prec_max=3)  # fmt: skip
    refined = la.prior_precision.item()
    assert _ece_at(la, val, refined) <= _ece_at(la, val, plain) + 1e-12
    grid = _grid().tolist()
    index = grid.index(min(grid, key=lambda p: abs(p - plain)))
    assert grid[max(index - 1, 0)] <= refined <= grid[min(index + 1, 10)]


def test_float32_model(classifier):
    model, train, val = classifier
    model32 = make_mlp(n_in=2, n_hidden=16, n_out=3).float()
    model32.load_state_dict(model.state_dict())
    train32, val32 = [
        tuple(t.float() if t.is_floating_point() else t for t in d) for d in (train, val)
    ]
    la = _fitted(model32, "classification", train32, "all", "kron")

    def nll_at(la, val, prior_precision):
        la.prior_precision = float(prior_precision)
        return negative_log_likelihood(la(val[0]), val[1])

    # The grid search's memoised predictive and the brute-force predictive are computed in
    # float32 along different paths, so equal NLLs differ by a few float32 round-offs
    # (relative 1e-7 each, about 1e-6 on an NLL near 1): the chosen value's NLL must be the
    # smallest to 1e-5, which still separates neighbouring grid values (they differ by >1e-3).
    _check_against_brute_force(la, "nll", val32, nll_at, 1e-5)


def test_higher_is_better_metrics_are_maximised(classifier):
    class MeanConfidence(Metric):
        higher_is_better = True

        def __init__(self):
            super().__init__()
            self.add_state("values", default=[], dist_reduce_fx="cat")

        def update(self, probs, targets):
            self.values.append(probs.max(-1).values)

        def compute(self):
            return torch.cat(self.values).mean()

    model, train, val = classifier
    la = _fitted(model, "classification", train, "last_layer", "diag")
    options = {"method": "gridsearch", "val_loader": _loader(*val), **GRID}
    la.optimize_prior_precision(loss=MeanConfidence(), **options)
    assert la.prior_precision.item() == pytest.approx(1e3)  # the most confident: least variance
    MeanConfidence.higher_is_better = False
    la.optimize_prior_precision(loss=MeanConfidence(), **options)
    assert la.prior_precision.item() == pytest.approx(1e-2)


def test_gridsearch_option_errors(classifier):
    model, train, val = classifier
    la = _fitted(model, "classification", train, "last_layer", "diag")
    options = {"method": "gridsearch", "val_loader": _loader(*val), "grid_size": 3}
    with pytest.raises(UnknownOptionError, match="accepted names: 'ece'"):
        la.optimize_prior_precision(loss="gaussian_nll", **options)
    with pytest.raises(TypeError, match="loss must be"):
        la.optimize_prior_precision(loss=3, **options)
    with pytest.raises(ValueError, match="refine"):
        la.optimize_prior_precision(loss="ece", refine=-1, **options)
    with pytest.raises(TypeError, match="refine"):
        la.optimize_prior_precision(loss="ece", refine=2.0, **options)
