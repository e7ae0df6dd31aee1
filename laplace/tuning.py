"""Post-hoc tuning of the prior precision: marginal likelihood or validation grid search."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from laplace.posterior.base import NotPositiveDefiniteError
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
        loss: Callable | None = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Tune the prior precision after ``fit``.

        ``marglik`` maximises the log marginal likelihood over ``log prior_precision`` with
        Adam (``n_steps`` steps, rate ``lr``) starting from ``init_prior_prec`` with the given
        ``prior_structure``. ``gridsearch`` evaluates ``loss`` on ``val_loader`` with the
        predictive ``pred_type``/``link_approx`` for ``grid_size`` scalar precisions spaced
        logarithmically between ``base**log_prior_prec_min`` and ``base**log_prior_prec_max``
        and keeps the best. The default loss is the NLL for classification and the MSE for
        regression.

        Raises:
            ValueError: For unknown option strings, a missing ``val_loader`` for grid search,
                or non-positive step counts.
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
            loss = self._default_val_loss() if loss is None else loss
            self.prior_precision = self._gridsearch(
                grid, val_loader, loss, pred_type, link_approx, n_samples, progress_bar
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

        if self.likelihood == Likelihood.REGRESSION:
            return MeanSquaredError(num_outputs=self.n_outputs).to(self._device)
        return RunningNLLMetric().to(self._device)

    def _gridsearch(
        self,
        grid: Tensor,
        val_loader: Any,
        loss: Callable,
        pred_type: PredType,
        link_approx: LinkApprox,
        n_samples: int,
        progress: bool,
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
        best_value, best_loss = grid[0], float("inf")
        try:
            for prior_prec in tqdm(grid, desc="gridsearch", disable=not progress):
                self.prior_precision = prior_prec
                try:
                    result = validate(
                        self,
                        batches,
                        loss,
                        pred_type=pred_type,
                        link_approx=link_approx,
                        n_samples=n_samples,
                        dict_key_y=self.dict_key_y,
                    )
                except (RuntimeError, NotPositiveDefiniteError):
                    result = float("inf")  # a prior too weak for the curvature: skip it
                if result < best_loss:
                    best_value, best_loss = prior_prec, result
        finally:
            self._predictive_memo = None
            if curvature is not None:
                curvature.memo = None
        return best_value


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
