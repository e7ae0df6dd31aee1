"""Pool-based active learning: score a pool of candidates, select the next batch to label."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from laplace.active._common import check_count, check_mask, check_selectable, forbid
from laplace.active.scoring import BATCH, POINTWISE, Criterion, Settings, check_options
from laplace.utils.enums import parse_enum

__all__ = ["score", "select"]


def _settings(batch_size: object, progress_bar: bool, generator: object) -> Settings:
    batch_size = check_count(batch_size, "batch_size")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return Settings(batch_size, bool(progress_bar), generator)


def _check_pool(X: object, name: str) -> Tensor:
    if not isinstance(X, Tensor):
        raise TypeError(
            f"{name} must be a tensor of inputs (one row per candidate), got {type(X).__name__}"
        )
    if X.ndim == 0 or len(X) == 0:
        raise ValueError(f"{name} must hold at least one candidate, got shape {tuple(X.shape)}")
    return X


def _scores(la: Any, X: Tensor, criterion: Criterion, settings: Settings, options: dict) -> Tensor:
    if criterion in BATCH:
        raise ValueError(
            f"criterion={criterion.value!r} selects a batch greedily and has no per-candidate "
            f"score; use select(la, X, k, criterion={criterion.value!r})"
        )
    prepare = POINTWISE[criterion]
    check_options(prepare, criterion, options)
    score_chunk = prepare(la, settings, **options)
    chunks = X.split(settings.batch_size)
    progress = tqdm(chunks, desc=f"score {criterion.value}", disable=not settings.progress_bar)
    return torch.cat([score_chunk(chunk) for chunk in progress])


def score(
    la: Any,
    X: Tensor,
    criterion: Criterion | str,
    *,
    batch_size: int = 256,
    progress_bar: bool = False,
    generator: torch.Generator | None = None,
    **criterion_kwargs: Any,
) -> Tensor:
    """The acquisition score of every candidate under a per-candidate criterion.

    The pool is scored in chunks of ``batch_size`` candidates. The options of each criterion
    (``criterion_kwargs``, all keyword-only):

    - ``"total_information_gain"``: ``noise_precision`` (default ``1 / la.sigma_noise**2``);
    - ``"marginal_information_gain"``: ``target`` (a batch of one input, required),
      ``noise_precision``;
    - ``"mean_marginal_information_gain"``: ``targets`` (required), ``noise_precision``;
    - ``"max_entropy"``, ``"variation_ratios"``: ``pred_type`` (``"glm"``), ``link_approx``
      (``"probit"``), ``n_samples`` (100), passed to the predictive ``la(X, ...)``;
    - ``"bald"``, ``"mean_std"``: ``pred_type`` (``"glm"``), ``n_samples`` (100), passed to
      ``la.predictive_samples``;
    - ``"epig"``: ``targets`` (required), ``pred_type``, ``n_samples``; candidates and targets
      are evaluated at the same posterior functions (``la.function_sampler``).

    Args:
        la: A fitted Laplace approximation (classification for the classification criteria).
        X: Candidate inputs.
        criterion: One of the per-candidate criteria above (see :class:`Criterion`).
        batch_size: Candidates per chunk (and inputs per kernel block).
        progress_bar: Show a tqdm progress bar over the chunks.
        generator: Random number generator for every sample the criterion draws.
        **criterion_kwargs: The criterion's options.

    Returns:
        One score per candidate; larger is more informative.

    Shapes:
        ``X (n, ...) -> (n,)``

    Raises:
        ValueError: For an unknown criterion, a batch criterion, a missing required option,
            a criterion that does not fit the likelihood, or a bad ``batch_size``.
        UnknownOptionError: For an option the criterion does not take.
        TypeError: If ``X`` is not a tensor or ``generator`` not a ``torch.Generator``.
    """
    criterion = parse_enum(Criterion, criterion, "criterion")
    settings = _settings(batch_size, progress_bar, generator)
    X = _check_pool(X, "X")
    return _scores(la, X, criterion, settings, criterion_kwargs)


def _forbidden_mask(forbidden: object, pool_X: Tensor) -> Tensor | None:
    if callable(forbidden) and not isinstance(forbidden, Tensor):
        forbidden = forbidden(pool_X)
    return check_mask(forbidden, len(pool_X))


def select(
    la: Any,
    pool_X: Tensor,
    k: int,
    criterion: Criterion | str = Criterion.BALD,
    batch_size: int = 256,
    progress_bar: bool = False,
    generator: torch.Generator | None = None,
    forbidden: Tensor | Callable[[Tensor], Tensor] | None = None,
    **criterion_kwargs: Any,
) -> Tensor:
    """Indices of the ``k`` pool candidates to label next.

    Per-candidate criteria (see :func:`score` for them and their options) return the ``k``
    best scores, best first, ties to the lowest index. The batch criteria return their greedy
    selection in the order picked:

    - ``"batch_bald"`` (:func:`~laplace.active.batch_bald`): options ``pred_type``
      (``"glm"``), ``n_samples`` (100), ``max_configurations``, ``n_configurations``; the
      probability samples of the whole pool come from posterior functions drawn once
      (``la.function_sampler``), so they are joint across chunks;
    - ``"gpa"`` and ``"fast_gpa"`` (:func:`~laplace.active.gpa`,
      :func:`~laplace.active.fast_gpa_from_kernel`), for models with one output: option
      ``noise_variance`` (default ``la.sigma_noise**2``). ``"gpa"`` forms the pool's
      ``n x n`` kernel; ``"fast_gpa"`` only its diagonal and one kernel column per selected
      point.

    Args:
        la: A fitted Laplace approximation.
        pool_X: Candidate inputs.
        k: Number of candidates to select.
        criterion: The criterion (see :class:`Criterion`).
        batch_size: Candidates per chunk (and inputs per kernel block).
        progress_bar: Show tqdm progress bars over chunks and greedy steps.
        generator: Random number generator for every sample the criterion draws; a seeded
            one makes the selection reproducible.
        forbidden: Candidates that must never be selected (a no-sampling zone): a boolean
            mask over the pool, or a function from ``pool_X`` to that mask.
        **criterion_kwargs: The criterion's options.

    Returns:
        The selected indices into ``pool_X``.

    Shapes:
        ``pool_X (n, ...), forbidden (n,) -> (k,)``

    Raises:
        ValueError: For an unknown criterion, a missing required option, a criterion that
            does not fit the approximation, a bad ``k`` or ``batch_size``, fewer than ``k``
            selectable candidates, or scores that are NaN.
        UnknownOptionError: For an option the criterion does not take.
        TypeError: If ``pool_X`` is not a tensor, ``generator`` not a ``torch.Generator`` or
            ``forbidden`` not boolean.
    """
    criterion = parse_enum(Criterion, criterion, "criterion")
    settings = _settings(batch_size, progress_bar, generator)
    pool_X = _check_pool(pool_X, "pool_X")
    k = check_count(k, "k")
    mask = _forbidden_mask(forbidden, pool_X)
    check_selectable(k, len(pool_X), mask)
    if criterion in BATCH:
        selector = BATCH[criterion]
        check_options(selector, criterion, criterion_kwargs)
        return selector(la, settings, pool_X, k, mask, **criterion_kwargs)
    scores = forbid(_scores(la, pool_X, criterion, settings, criterion_kwargs), mask)
    if bool(torch.isnan(scores).any()):
        bad = torch.nonzero(torch.isnan(scores))[:5, 0].tolist()
        raise ValueError(f"criterion={criterion.value!r} gave NaN scores, first at indices {bad}")
    return torch.sort(scores, descending=True, stable=True).indices[:k]
