"""Post-hoc tuning of the prior precision: marginal likelihood or validation grid search."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from tqdm.auto import tqdm

from laplace.evaluation.streaming import get_metric
from laplace.posterior.base import NotPositiveDefiniteError
from laplace.utils.distributed import RankReduction, group_active
from laplace.utils.enums import (
    LinkApprox,
    PredType,
    PriorStructure,
    TuningMethod,
    parse_enum,
)
from laplace.utils.utils import fix_prior_prec_structure, validate

__all__ = ["PriorTuningMixin"]


class PriorTuningMixin:
    """``optimize_prior_precision`` for any Laplace class with a marginal likelihood."""

    _predictive_memo: PredictiveMemo | None = None
    _fitted_across_ranks: bool = False
    """Whether the last fit was summed over the ranks of a process group; a gridsearch then
    tunes on the validation data of all ranks (see :meth:`_gridsearch`)."""

    def _memo(self, kind: str, X: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, memoized per input during a gridsearch (not with backprop)."""
        if self._predictive_memo is None or self.enable_backprop:
            return compute()
        return self._predictive_memo.get(kind, X, compute)

    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GLM,
        method: TuningMethod | str = TuningMethod.MARGLIK,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: PriorStructure | str = PriorStructure.SCALAR,
        val_loader: Any = None,
        loss: str | Metric | type | Callable | None = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
        refine: int = 0,
    ) -> None:
        """Tune the prior precision after ``fit``.

        ``marglik`` maximises the log marginal likelihood over ``log prior_precision`` with
        Adam (``n_steps`` steps, rate ``lr``) starting from ``init_prior_prec`` with the given
        ``prior_structure``. ``gridsearch`` evaluates ``loss`` on ``val_loader`` with the
        predictive ``pred_type``/``link_approx`` for ``grid_size`` scalar precisions spaced
        logarithmically between ``base**log_prior_prec_min`` and ``base**log_prior_prec_max``
        and keeps the best. The default loss is the NLL for classification and the MSE for
        regression.

        ``loss`` may also be a metric name (``"ece"``, ``"mce"``, ``"nll"``, ``"brier"``,
        ``"accuracy"`` for classification; ``"mse"``, ``"rmse"``, ``"nll"``/``"gaussian_nll"``,
        ``"crps"`` for regression; see :func:`laplace.evaluation.get_metric`) or a metric
        class, instantiated without arguments. A metric whose ``higher_is_better`` is True
        (accuracy) is maximised. Metrics with ``needs_variance`` get the predictive variance
        of the targets, ``f_var`` plus ``sigma_noise**2`` (see :func:`laplace.utils.validate`).
        With ``refine > 0`` the search continues on ``refine`` log-spaced precisions strictly
        between the grid neighbours of the best grid value (on the same memoised predictive)
        and keeps a refined value only if it is strictly better.

        After a fit across the ranks of a process group, each rank passes its shard of the
        validation data (a ``DistributedSampler``): a ``torchmetrics`` metric sums its states
        over the ranks when computed, a callable ``loss`` is taken to be a mean over the
        targets and averaged over the ranks weighted by their number of targets, and rank
        0's choice is broadcast, so that every rank keeps the same prior precision. After a
        fit per rank the default metrics are computed per rank (pass a metric with
        ``sync_on_compute=False`` to tune per rank with your own).

        Raises:
            ValueError: For unknown option strings or metric names (the latter an
                :class:`~laplace.errors.UnknownOptionError` listing the accepted names), a
                missing ``val_loader`` for grid search, non-positive step counts or a
                negative ``refine``.
            TypeError: For a ``loss`` that is none of the accepted kinds, or a ``refine``
                that is not an integer.
        """
        method = parse_enum(TuningMethod, method, "method")
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        link_approx = parse_enum(LinkApprox, link_approx, "link_approx")
        prior_structure = parse_enum(PriorStructure, prior_structure, "prior_structure")
        self._check_fitted()
        if method == TuningMethod.MARGLIK:
            if n_steps < 1:
                raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
            init = self._initial_prior(init_prior_prec, prior_structure)
            self._optimize_marglik(init, n_steps, lr, progress_bar)
        else:
            grid = self._prior_grid(
                val_loader, log_prior_prec_min, log_prior_prec_max, grid_size, log_prior_prec_base
            )
            refine = _check_refine(refine)
            loss = self._val_loss(loss)
            self.prior_precision = self._gridsearch(
                grid, val_loader, loss, pred_type, link_approx, n_samples, progress_bar, refine
            )
        if verbose:
            print(f"optimized prior precision: {self.prior_precision}")

    def _initial_prior(self, init: float | Tensor, structure: PriorStructure) -> Tensor:
        if isinstance(init, Tensor) and init.numel() > 1:
            return init.to(device=self._device, dtype=self._dtype).reshape(-1)
        value = float(init)
        return fix_prior_prec_structure(
            value, structure, self._n_blocks, self._n_posterior, self._device, self._dtype
        )

    def _optimize_marglik(self, init: Tensor, n_steps: int, lr: float, progress: bool) -> None:
        self.prior_precision = init
        log_prior_prec = init.detach().log().requires_grad_(True)
        optimizer = torch.optim.Adam([log_prior_prec], lr=lr)
        for _ in tqdm(range(n_steps), desc="marglik", disable=not progress):
            optimizer.zero_grad()
            # exp() is positive and keeps the validated shape of `init`: skip the setter's
            # checks inside the loop; the final assignment below checks the result
            self._prior_precision, self._posterior_cache = log_prior_prec.exp(), None
            neg_marglik = -self.log_marginal_likelihood()
            neg_marglik.backward()
            optimizer.step()
        self.prior_precision = log_prior_prec.detach().exp()

    def _prior_grid(
        self, val_loader: Any, low: float, high: float, size: int, base: float
    ) -> Tensor:
        """The grid search's ``size`` prior precisions ``base**low ... base**high``.

        Raises:
            ValueError: Without a ``val_loader``, or for a ``size`` below 1.
        """
        if val_loader is None:
            raise ValueError("method='gridsearch' needs a val_loader")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"grid_size must be a positive integer, got {size!r}")
        return torch.logspace(low, high, size, base=base, device=self._device, dtype=self._dtype)

    def _default_val_loss(self) -> Callable:
        from torchmetrics import MeanSquaredError

        from laplace.utils.enums import Likelihood
        from laplace.utils.metrics import RunningNLLMetric

        sync = self._fitted_across_ranks  # torchmetrics sums over the ranks when computing
        if self.likelihood == Likelihood.REGRESSION:
            metric = MeanSquaredError(num_outputs=self.n_outputs, sync_on_compute=sync)
            return metric.to(self._device)
        return RunningNLLMetric(sync_on_compute=sync).to(self._device)

    def _val_loss(self, loss: str | Metric | type | Callable | None) -> Callable:
        """The gridsearch's loss: the default, a named metric, an instance of a metric class,
        or ``loss`` itself (a metric object or a callable).

        Raises:
            UnknownOptionError: For an unknown metric name (a ``ValueError``).
            TypeError: For a ``loss`` that is none of these.
        """
        if loss is None:
            return self._default_val_loss()
        if isinstance(loss, str):
            sync = self._fitted_across_ranks
            metric = get_metric(loss, self.likelihood, self.n_outputs, sync_on_compute=sync)
            return metric.to(self._device)
        if isinstance(loss, type):
            loss = loss()
            return loss.to(self._device) if isinstance(loss, Metric) else loss
        if not callable(loss):
            raise TypeError(
                "loss must be a metric name, a torchmetrics Metric (object or class) or a "
                f"callable loss(means, targets), got {type(loss).__name__}"
            )
        return loss

    def _gridsearch(
        self,
        grid: Tensor,
        val_loader: Any,
        loss: Callable,
        pred_type: PredType,
        link_approx: LinkApprox,
        n_samples: int,
        progress: bool,
        refine: int = 0,
    ) -> Tensor:
        # One pass over the loader, inputs moved to the model's device once: the same input
        # tensors come back at every grid point, so the prior-independent part of the GLM
        # predictive (outputs, Jacobians or their factors, last-layer features) is computed
        # once per batch (see `PredictiveMemo`).
        self._check_fitted()
        batches = [_to_device(batch, self._device) for batch in val_loader]
        memo = PredictiveMemo() if pred_type in (PredType.GLM, PredType.GP) else None
        curvature = getattr(self, "_curvature", None)  # function-space classes have none
        self._predictive_memo = memo
        if curvature is not None:
            curvature.memo = memo
        reduction = RankReduction() if self._fitted_across_ranks and group_active() else None
        n_targets = None
        if reduction is not None and not isinstance(loss, Metric):
            n_targets = _count_targets(batches, self.dict_key_y)
        options = {"pred_type": pred_type, "link_approx": link_approx, "n_samples": n_samples}
        sign = -1.0 if getattr(loss, "higher_is_better", None) is True else 1.0

        def score(prior_prec: Tensor) -> float:
            """The loss to minimise at ``prior_prec``; inf where it fails or is NaN."""
            self.prior_precision = prior_prec
            result = self._validation_loss(batches, loss, options)
            if n_targets is not None:  # a callable's mean over this rank's targets
                result = reduction.weighted_mean(result, n_targets, self._device)
            return sign * result if math.isfinite(result) else float("inf")

        best_value, best_loss, best_index = grid[0], float("inf"), 0
        try:
            progress_grid = tqdm(grid, desc="gridsearch", disable=not progress)
            for index, prior_prec in enumerate(progress_grid):
                result = score(prior_prec)
                if result < best_loss:
                    best_value, best_loss, best_index = prior_prec, result, index
            for prior_prec in _refined_grid(grid, best_index, refine):
                result = score(prior_prec)
                if result < best_loss:
                    best_value, best_loss = prior_prec, result
        finally:
            self._predictive_memo = None
            if curvature is not None:
                curvature.memo = None
        if reduction is not None:  # the same choice on every rank, whatever the loss
            best_value = reduction.broadcast_(best_value.clone().reshape(1)).reshape(())
        return best_value

    def _validation_loss(
        self, batches: list[Any], loss: Callable, options: dict[str, Any]
    ) -> float:
        """The validation loss at the current prior precision; inf where it fails."""
        try:
            return validate(self, batches, loss, dict_key_y=self.dict_key_y, **options)
        except (RuntimeError, NotPositiveDefiniteError):
            return float("inf")  # a prior too weak for the curvature: skip it


def _check_refine(refine: object) -> int:
    """``refine`` as a non-negative ``int``.

    Raises:
        TypeError: If ``refine`` is not an integer.
        ValueError: If ``refine`` is negative.
    """
    if isinstance(refine, bool) or not isinstance(refine, int):
        raise TypeError(f"refine must be an integer, got {type(refine).__name__} {refine!r}")
    if refine < 0:
        raise ValueError(f"refine must be a non-negative integer, got {refine!r}")
    return refine


def _refined_grid(grid: Tensor, best: int, size: int) -> Tensor:
    """``size`` log-spaced values strictly between the neighbours of ``grid[best]``.

    At an end of the grid the interval is ``grid[best]`` and its one neighbour.

    Shapes:
        ``grid (grid_size,) -> (size,)``, empty for ``size = 0`` or a grid of one value
    """
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    if size == 0 or not high > low:
        return grid[:0]
    ends = (math.log(float(low)), math.log(float(high)))
    exponents = torch.linspace(*ends, size + 2, device=grid.device, dtype=grid.dtype)
    return exponents[1:-1].exp()


def _count_targets(batches: Iterable[Any], dict_key_y: str) -> int:
    """The number of targets (rows) in ``(X, y)`` or dict-like batches."""
    total = 0
    for batch in batches:
        y = batch[dict_key_y] if isinstance(batch, MutableMapping) else batch[1]
        total += len(y)
    return total


def _to_device(batch: Any, device: torch.device) -> Any:
    """An ``(X, y)`` batch with a tensor ``X`` moved to ``device``; other batches as they are."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor):
        return (batch[0].to(device), batch[1])
    return batch


class PredictiveMemo:
    """Prior-independent parts of the GLM predictive, per input, during a gridsearch.

    Entries are keyed by the identity of the input (a tensor, or a dict-like batch: the
    gridsearch passes the same batch objects at every grid point; the input is kept alive
    with its entry, so an identity is never reused) and stop being added once they hold
    ``max_entries`` numbers.
    """

    max_entries: int = 2**26

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int], tuple[Tensor, Any]] = {}
        self._size = 0

    def get(self, kind: str, X: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` for ``X``, from the memo when it was computed before."""
        if not isinstance(X, (Tensor, MutableMapping)):
            return compute()
        key = (kind, id(X))
        if key in self._entries:
            return self._entries[key][1]
        value = compute()
        size = _numel(value)
        if self._size + size <= self.max_entries:
            self._entries[key] = (X, value)
            self._size += size
        return value


def _numel(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_numel(v) for v in value)
    return 0
