"""Evaluation of predictives: calibration and scoring metrics, diagrams, prior calibration.

Functions take tensors: class probabilities ``(n, classes)`` with integer labels ``(n,)``,
or Gaussian predictive means and variances ``(n,)`` / ``(n, outputs)`` with targets of the
same shape. Streaming ``torchmetrics`` versions accumulate over batches and are what prior
tuning uses (``optimize_prior_precision(method="gridsearch", loss="ece")``).

The metric and diagram code imports nothing from the Laplace classes, so the classes' tuning
can use it; the diagrams import matplotlib when called.
"""

from laplace.evaluation.calibrate import calibrate_prior_precision
from laplace.evaluation.classification import (
    CalibrationBins,
    accuracy,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    maximum_calibration_error,
    mean_confidence,
    negative_log_likelihood,
)
from laplace.evaluation.plots import (
    proportion_diagram,
    regression_band_plot,
    regression_proportion_diagram,
    reliability_diagram,
)
from laplace.evaluation.regression import (
    CoverageCurve,
    calibration_chi2,
    crps_gaussian,
    gaussian_nll,
    interval_coverage,
    regression_calibration_curve,
    rmse,
)
from laplace.evaluation.streaming import (
    BrierScore,
    ExpectedCalibrationError,
    GaussianCRPS,
    GaussianNLL,
    MaximumCalibrationError,
    NegativeLogLikelihood,
    RootMeanSquaredError,
    get_metric,
    metric_names,
)

__all__ = [
    "BrierScore",
    "CalibrationBins",
    "CoverageCurve",
    "ExpectedCalibrationError",
    "GaussianCRPS",
    "GaussianNLL",
    "MaximumCalibrationError",
    "NegativeLogLikelihood",
    "RootMeanSquaredError",
    "accuracy",
    "brier_score",
    "calibrate_prior_precision",
    "calibration_bins",
    "calibration_chi2",
    "crps_gaussian",
    "expected_calibration_error",
    "gaussian_nll",
    "get_metric",
    "interval_coverage",
    "maximum_calibration_error",
    "mean_confidence",
    "metric_names",
    "negative_log_likelihood",
    "proportion_diagram",
    "regression_band_plot",
    "regression_calibration_curve",
    "regression_proportion_diagram",
    "reliability_diagram",
    "rmse",
]
