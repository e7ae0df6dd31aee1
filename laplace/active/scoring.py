"""The criteria of :mod:`laplace.active` read from a fitted Laplace approximation.

Each per-point criterion is a *preparer*: ``prepare(la, settings, **options)`` does the work
shared by every chunk of a pool once (a kernel, a function sampler, the samples at target
inputs) and returns a function that scores one chunk. Each batch criterion is a selector that
returns the greedy selection over the whole pool. Their keyword-only parameters are the
options ``score``/``select`` accept for them (:func:`check_options`). Only public methods of
the approximation are used: the predictive ``la(X, ...)``, ``la.predictive_samples``,
``la.posterior_kernel()`` and ``la.function_sampler()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from laplace.active.batchbald import batch_bald
from laplace.active.classification import bald, epig, max_entropy, mean_std, variation_ratios
from laplace.active.gpa_sampler import fast_gpa_from_kernel, gpa
from laplace.active.mackay import (
    mackay_marginal_information_gain,
    mackay_mean_marginal_information_gain,
    mackay_total_information_gain,
)
from laplace.errors import UnknownOptionError
from laplace.utils.enums import Likelihood

ChunkScorer = Callable[[Tensor], Tensor]


class Criterion(str, Enum):
    """The criteria of :func:`~laplace.active.select` and :func:`~laplace.active.score`."""

    TOTAL_INFORMATION_GAIN = "total_information_gain"
    MARGINAL_INFORMATION_GAIN = "marginal_information_gain"
    MEAN_MARGINAL_INFORMATION_GAIN = "mean_marginal_information_gain"
    MAX_ENTROPY = "max_entropy"
    BALD = "bald"
    VARIATION_RATIOS = "variation_ratios"
    MEAN_STD = "mean_std"
    EPIG = "epig"
    BATCH_BALD = "batch_bald"
    GPA = "gpa"
    FAST_GPA = "fast_gpa"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Settings:
    """What every criterion may use: the chunk size, the progress bar, the generator."""

    batch_size: int
    progress_bar: bool
    generator: torch.Generator | None


def check_options(function: Callable[..., Any], criterion: Criterion, options: dict) -> None:
    """Refuse options the criterion does not take and require those without a default.

    Raises:
        UnknownOptionError: For an option the criterion does not take (lists the accepted).
        ValueError: For a missing required option.
    """
    parameters = inspect.signature(function).parameters.values()
    accepted = {p.name: p for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        names = ", ".join(repr(name) for name in accepted) or "none"
        raise UnknownOptionError(
            f"criterion={criterion.value!r} does not take the option(s) {unknown}; "
            f"it accepts {names}"
        )
    for name, parameter in accepted.items():
        if parameter.default is inspect.Parameter.empty and name not in options:
            raise ValueError(f"criterion={criterion.value!r} needs the option {name}=...")


def _classifier(la: Any, criterion: Criterion) -> None:
    if la.likelihood != Likelihood.CLASSIFICATION:
        raise ValueError(
            f"criterion={criterion.value!r} needs a classification Laplace approximation, "
            f"got likelihood={la.likelihood.value!r}"
        )


def _noise_variance(la: Any, given: float | Tensor | None, name: str) -> float | Tensor:
    """``given``, or ``la.sigma_noise**2`` for regression."""
    if given is not None:
        return given
    if la.likelihood != Likelihood.REGRESSION:
        raise ValueError(
            f"{name} has no default for likelihood={la.likelihood.value!r} (it is the "
            f"observation noise of regression); pass {name}=..."
        )
    return la.sigma_noise.detach() ** 2


def _noise_precision(la: Any, given: float | Tensor | None) -> float | Tensor:
    if given is not None:
        return given
    return 1 / _noise_variance(la, None, "noise_precision")


def joint_sampler(
    la: Any, pred_type: str, n_samples: int, settings: Settings
) -> Callable[[Tensor], Tensor]:
    """Probability samples of posterior functions drawn once (``la.function_sampler``), so
    that the samples at every chunk, and at target inputs, are joint.

    The function sampler's seed is drawn from ``settings.generator`` (from PyTorch's global
    generator without one).

    Shapes:
        ``X (n, ...) -> (n_samples, n, classes)``
    """
    generator = settings.generator
    device = generator.device if generator is not None else None
    seed = int(torch.randint(2**62, (), generator=generator, device=device))
    sampler = la.function_sampler(
        n_samples, seed=seed, pred_type=pred_type, batch_size=settings.batch_size
    )
    return lambda X: torch.softmax(sampler(X), dim=-1)


# --------------------------------------------------------------------- per-point criteria
def _total(
    la: Any, settings: Settings, *, noise_precision: float | Tensor | None = None
) -> ChunkScorer:
    kernel, beta = la.posterior_kernel(settings.batch_size), _noise_precision(la, noise_precision)
    return lambda X: mackay_total_information_gain(kernel, X, beta)


def _marginal(
    la: Any, settings: Settings, *, target: Tensor, noise_precision: float | Tensor | None = None
) -> ChunkScorer:
    kernel, beta = la.posterior_kernel(settings.batch_size), _noise_precision(la, noise_precision)
    return lambda X: mackay_marginal_information_gain(kernel, X, target, beta)


def _mean_marginal(
    la: Any, settings: Settings, *, targets: Tensor, noise_precision: float | Tensor | None = None
) -> ChunkScorer:
    kernel, beta = la.posterior_kernel(settings.batch_size), _noise_precision(la, noise_precision)
    return lambda X: mackay_mean_marginal_information_gain(kernel, X, targets, beta)


def _predictive_scorer(criterion: Criterion, function: ChunkScorer) -> Callable[..., ChunkScorer]:
    """A criterion of the predictive probabilities ``la(X, pred_type, link_approx)``."""

    def prepare(
        la: Any,
        settings: Settings,
        *,
        pred_type: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
    ) -> ChunkScorer:
        _classifier(la, criterion)
        options = dict(pred_type=pred_type, link_approx=link_approx, n_samples=n_samples)
        return lambda X: function(la(X, generator=settings.generator, **options))

    return prepare


def _sample_scorer(criterion: Criterion, function: ChunkScorer) -> Callable[..., ChunkScorer]:
    """A criterion of probability samples ``la.predictive_samples(X, pred_type, n_samples)``."""

    def prepare(
        la: Any, settings: Settings, *, pred_type: str = "glm", n_samples: int = 100
    ) -> ChunkScorer:
        _classifier(la, criterion)
        options = dict(pred_type=pred_type, n_samples=n_samples)
        return lambda X: function(
            la.predictive_samples(X, generator=settings.generator, **options)
        )

    return prepare


def _epig(
    la: Any, settings: Settings, *, targets: Tensor, pred_type: str = "glm", n_samples: int = 100
) -> ChunkScorer:
    _classifier(la, Criterion.EPIG)
    sampler = joint_sampler(la, pred_type, n_samples, settings)
    target_samples = sampler(targets)
    return lambda X: epig(sampler(X), target_samples)


POINTWISE: dict[Criterion, Callable[..., ChunkScorer]] = {
    Criterion.TOTAL_INFORMATION_GAIN: _total,
    Criterion.MARGINAL_INFORMATION_GAIN: _marginal,
    Criterion.MEAN_MARGINAL_INFORMATION_GAIN: _mean_marginal,
    Criterion.MAX_ENTROPY: _predictive_scorer(Criterion.MAX_ENTROPY, max_entropy),
    Criterion.VARIATION_RATIOS: _predictive_scorer(Criterion.VARIATION_RATIOS, variation_ratios),
    Criterion.BALD: _sample_scorer(Criterion.BALD, bald),
    Criterion.MEAN_STD: _sample_scorer(Criterion.MEAN_STD, mean_std),
    Criterion.EPIG: _epig,
}


# --------------------------------------------------------------------- batch criteria
def _batch_bald(
    la: Any,
    settings: Settings,
    X: Tensor,
    k: int,
    forbidden: Tensor | None,
    *,
    pred_type: str = "glm",
    n_samples: int = 100,
    max_configurations: int = 2**14,
    n_configurations: int = 4096,
) -> Tensor:
    _classifier(la, Criterion.BATCH_BALD)
    samples = joint_sampler(la, pred_type, n_samples, settings)(X)
    return batch_bald(
        samples,
        k,
        max_configurations=max_configurations,
        n_configurations=n_configurations,
        forbidden=forbidden,
        generator=settings.generator,
        progress_bar=settings.progress_bar,
    ).indices


def _single_output(kernel_values: Tensor, criterion: Criterion) -> Tensor:
    """Kernel values ``(..., 1, 1)`` without their output block, ``(...)``."""
    if kernel_values.shape[-1] != 1:
        raise ValueError(
            f"criterion={criterion.value!r} needs a model with one output, "
            f"got {kernel_values.shape[-1]} outputs"
        )
    return kernel_values[..., 0, 0]


def _gpa(
    la: Any,
    settings: Settings,
    X: Tensor,
    k: int,
    forbidden: Tensor | None,
    *,
    noise_variance: float | Tensor | None = None,
) -> Tensor:
    noise = _noise_variance(la, noise_variance, "noise_variance")
    covariance = _single_output(la.posterior_kernel(settings.batch_size)(X), Criterion.GPA)
    selection = gpa(covariance, k, noise, forbidden=forbidden, progress_bar=settings.progress_bar)
    return selection.indices


def _fast_gpa(
    la: Any,
    settings: Settings,
    X: Tensor,
    k: int,
    forbidden: Tensor | None,
    *,
    noise_variance: float | Tensor | None = None,
) -> Tensor:
    noise = _noise_variance(la, noise_variance, "noise_variance")
    kernel = la.posterior_kernel(settings.batch_size)
    variance = _single_output(kernel.diagonal(X), Criterion.FAST_GPA)

    def column(index: int) -> Tensor:
        return kernel(X[index : index + 1], X)[0, :, 0, 0]  # the pool's rows are kept

    selection = fast_gpa_from_kernel(
        variance, column, k, noise, forbidden=forbidden, progress_bar=settings.progress_bar
    )
    return selection.indices


BATCH: dict[Criterion, Callable[..., Tensor]] = {
    Criterion.BATCH_BALD: _batch_bald,
    Criterion.GPA: _gpa,
    Criterion.FAST_GPA: _fast_gpa,
}
