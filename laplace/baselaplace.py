"""Laplace approximations over the weights of a network.

:class:`~laplace.base.BaseLaplace` (in :mod:`laplace.base`, re-exported here) holds what
every Laplace approximation shares: the likelihood, the hyperparameters (prior precision and
mean, observation noise, temperature), their checks, prior tuning and the predictive
dispatch. :class:`ParametricLaplace` is the one algorithm of a
weight-space Gaussian posterior, written once for every structure and subset:

- ``fit`` adds each batch's curvature from the backend to a structure object
  (:mod:`laplace.posterior`);
- the posterior precision is ``P = H / (sigma^2 T) + diag(p0)``, built by
  ``Curvature.with_prior``, which reuses a cached decomposition of ``H``;
- the log marginal likelihood is ``log p(D|theta) - 0.5 (log det P - log det P0 + scatter)``
  (MacKay, 1992; Immer et al., ICML 2021), in :mod:`laplace.evidence`;
- the GLM predictive is ``N(f(x), J P^-1 J^T)`` followed by a link approximation
  (Immer, Korzepa & Bauer, AISTATS 2021).

The public classes of the grid (``FullLaplace``, ``KronLaplace``, ``DiagLaplace``, in
:mod:`laplace.structures`, re-exported here) only declare their structure.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from laplace.base import BaseLaplace
from laplace.budget import BudgetedJacobiansMixin
from laplace.evidence import EvidenceMixin
from laplace.posterior.base import Curvature, Posterior
from laplace.subsets import AllWeights
from laplace.utils.data import (
    Inputs,
    check_finite_inputs,
    dataset_size,
)
from laplace.utils.distributed import RankReduction
from laplace.utils.enums import HessianStructure, Likelihood
from laplace.utils.linear_jacobians import linear_jacobian_factors
from laplace.utils.matrix import Kron, KronDecomposed
from laplace.utils.precision import accumulation_dtype

__all__ = [
    "ELLA",
    "BaseFunctionalLaplace",
    "BaseLaplace",
    "DiagLaplace",
    "FullLaplace",
    "FunctionalLaplace",
    "KronLaplace",
    "LowRankLaplace",
    "ParametricLaplace",
    "VaLLA",
]


def _takes_out(method: Any) -> bool:
    """Whether a backend's structure method accepts ``out`` (sums into it in place)."""
    return _accepts_out(getattr(method, "__func__", method))


@functools.cache
def _accepts_out(function: Any) -> bool:
    """:func:`_takes_out` for the function behind a method (one signature lookup each)."""
    try:
        return "out" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


class ParametricLaplace(EvidenceMixin, BudgetedJacobiansMixin, BaseLaplace):
    """Gaussian posterior ``N(theta_MAP, P^-1)`` over the parameters of a subset.

    Subclasses declare the structure through ``_structure`` and ``_curvature_cls``, and
    ``_factored_predictive`` when they implement :meth:`_factored_variance`.
    """

    _curvature_cls: ClassVar[type[Curvature]]
    _factored_predictive: ClassVar[bool] = False

    def _factored_variance(self, factors: list[tuple[Tensor, ...]]) -> Tensor:
        """``J P^-1 J^T`` per sample from per-parameter Jacobian factors ``(G, a)`` / ``(G,)``
        (see :func:`~laplace.utils.linear_jacobians.linear_jacobian_factors`).

        Shapes:
            ``-> (batch, outputs, outputs)``
        """
        raise NotImplementedError

    def __init__(self, model: nn.Module, likelihood: Likelihood | str, *args, **kwargs) -> None:
        if type(self)._structure is None:
            raise TypeError(
                f"{type(self).__name__} is abstract: use FullLaplace, KronLaplace, ..."
            )
        super().__init__(model, likelihood, *args, **kwargs)
        self._mean: Tensor | None = None
        self._curvature: Curvature | None = None

    @property
    def mean(self) -> Tensor | None:
        """The posterior mean ``(params,)``: the trainable parameters at :meth:`fit` (the MAP).

        Before :meth:`fit` the approximation is the prior (as in ``laplace-torch``): the mean
        is ``prior_mean`` broadcast to ``(params,)``, :attr:`H` is zero, the posterior
        precision is the prior precision, and :meth:`log_prob` and :meth:`sample` are the
        prior's. None while the parameters are not known (a last layer not found yet).
        """
        if self._mean is not None:
            return self._mean
        return self._prior_mean_vector()

    @mean.setter
    def mean(self, value: Tensor | None) -> None:
        self._mean = value

    def _prior_mean_vector(self) -> Tensor | None:
        """The prior mean as a ``(params,)`` vector."""
        return self.prior_mean.expand(self._n_posterior).clone()

    @property
    def H(self) -> Tensor | Kron | tuple[Tensor, Tensor] | None:
        """The curvature summed over the data, as ``laplace-torch`` exposes it.

        A ``(params, params)`` tensor (full), a ``(params,)`` tensor (diag), the
        :class:`~laplace.utils.matrix.KronDecomposed` eigendecomposition of the K-FAC (kron;
        the factors themselves are :attr:`~KronLaplace.H_facs`) or ``(eigenvectors,
        eigenvalues)`` (low rank). Before :meth:`fit`: zeros (a zero ``Kron`` for kron) where
        the parameters are known, None for last-layer and low-rank approximations, as in
        ``laplace-torch``. Assigning one of these (or None) replaces the curvature; it is
        checked against this object's parameters.
        """
        if self._curvature is None:
            return self._unfitted_H()
        return self._fitted_H()

    def _fitted_H(self) -> Tensor | Kron | KronDecomposed | tuple[Tensor, Tensor]:
        """What :attr:`H` shows after :meth:`fit`."""
        return self._curvature.public()

    def _unfitted_H(self) -> Tensor | Kron | None:
        """What :attr:`H` shows before :meth:`fit`."""
        return self._new_curvature().public()

    @H.setter
    def H(self, value: Tensor | Kron | Curvature | None) -> None:
        if isinstance(value, KronDecomposed):
            value = value.to_kron()
        if value is not None and not isinstance(value, Curvature):
            curvature = self._new_curvature()
            curvature.add_(value)  # raises TypeError / ValueError for a mismatch
            value = curvature
        self._curvature = value
        self._posterior_cache = None

    def _new_curvature(self) -> Curvature:
        H = self._make_curvature()
        H.assume_psd = self._backend_cls.psd_curvature
        return H

    def _make_curvature(self) -> Curvature:
        return self._curvature_cls.zeros(self.params)

    def fit(
        self,
        train_loader: Any,
        override: bool = True,
        progress_bar: bool = False,
        *,
        distributed: bool | None = None,
    ) -> None:
        """Fit the curvature at the current parameters of the model.

        The model is evaluated in eval mode and gets its train/eval modes back afterwards. A
        fit that raises leaves this object as it was before the call (curvature, ``n_data``,
        loss, mean, hyperparameters).

        Args:
            train_loader: Yields ``(X, y)`` or dict-like batches; ``len(train_loader.dataset)``
                is the number of data points.
            override: Start afresh; ``False`` adds to the previous fit (online learning).
            progress_bar: Show a tqdm progress bar over batches.
            distributed: Sum the fit over the ranks of the initialised ``torch.distributed``
                process group, each rank iterating over its shard of the data, so that every
                rank holds the posterior of all the data (:mod:`laplace.utils.distributed`;
                ``n_data`` is then the sum of the ranks' ``len(train_loader.sampler)``).
                None (the default) does so when the group has more than one rank, True
                requires a group, False fits on this rank's data only.

        Raises:
            ValueError: For a loader without ``dataset``, an empty loader, NaN inputs or
                targets, wrong targets, NaN/Inf curvature, or ``distributed=True`` without a
                process group.
            InputMismatchError: For floating inputs of another dtype than the model's (a
                ``RuntimeError`` and a ``ValueError``).
            RuntimeError: When fitting across ranks, if the fit raised on another rank.
        """
        reduction = RankReduction.resolve(distributed)
        with self._unchanged_on_failure():
            self._fit(train_loader, override, progress_bar, reduction)

    def _fit(
        self,
        train_loader: Any,
        override: bool,
        progress_bar: bool,
        reduction: RankReduction | None = None,
    ) -> None:
        """:meth:`fit` without the restore on failure; ``reduction`` sums over the ranks."""
        if reduction is None:
            n_data = dataset_size(train_loader)
        else:
            n_data = reduction.data_size(train_loader, self._device)
        if override or self._curvature is None:
            self._curvature, self._loss, self.n_data = self._new_curvature(), 0.0, None
        self.mean = self.subset.mean()
        if not torch.isfinite(self.mean).all():
            raise ValueError("the model's parameters contain NaN or Inf; cannot fit at them")
        H_new = self._new_curvature()
        if reduction is None:
            loss = self._sum_batches(H_new, train_loader, n_data, progress_bar)
        else:
            loss = reduction.sum_after(
                lambda: [self._sum_batches(H_new, train_loader, n_data, progress_bar)],
                1,
                self._device,
                self._accumulation_dtype,
            )[0]
            self._reduce_curvature(H_new, reduction)
        self._merge_fit(H_new, n_data)
        self._loss = self._loss + loss
        self.n_data = n_data + (self.n_data or 0)
        self._fitted_across_ranks = reduction is not None
        self._posterior_cache = None

    def _sum_batches(
        self, H_new: Curvature, train_loader: Any, n_data: int, progress_bar: bool
    ) -> Tensor:
        """Add every batch's curvature to ``H_new``; the loss summed over the batches.

        Raises:
            ValueError: For an empty loader, and as :meth:`fit` for bad data or curvature.
        """
        loss, n_batches = 0.0, 0
        for batch in tqdm(train_loader, desc="fit", disable=not progress_bar):
            X, y = self._checked_batch(batch, first=n_batches == 0)
            if self.n_outputs is None or n_batches == 0:
                self._set_n_outputs(X)
            for part_loss in self._add_batch_or_parts(H_new, X, y, n_data):
                part_loss = part_loss.detach()
                loss = loss + part_loss.to(accumulation_dtype(part_loss.dtype, part_loss.device))
            n_batches += 1
        if n_batches == 0:
            raise ValueError("train_loader yielded no batches")
        self._finish_batches(H_new, n_data)
        return loss

    def _add_batch_or_parts(
        self, H_new: Curvature, X: Inputs, y: Tensor, n_data: int
    ) -> list[Tensor]:
        """Add a batch's curvature to ``H_new``; the losses of the parts it was added in.

        A batch whose Jacobians would exceed the memory budget is added in parts
        (:meth:`_budgeted_parts`), except where the backend computes its curvature from the
        layers' Jacobian factors, which form no Jacobians
        (:meth:`~laplace.curvature.GGNInterface.factored`): then it is added whole.
        """
        parts = list(self._budgeted_parts(X, y))
        structures = getattr(self._backend_cls, "factored_structures", frozenset())
        if len(parts) > 1 and self._structure in structures:
            step = self.backend.factored(
                self._structure, X, y, N=n_data, **self._asdl_fisher_kwargs
            )
            if step is not None:
                H_new.add_(step[1])
                return [step[0]]
        return [self._add_batch(H_new, X_part, y_part, n_data) for X_part, y_part in parts]

    def _reduce_curvature(self, H_new: Curvature, reduction: RankReduction) -> None:
        """Sum this fit's curvature over the ranks, in place (one collective)."""
        reduction.sum_(H_new.summands())
        H_new._invalidate()

    def _add_batch(self, H_new: Curvature, X: Inputs, y: Tensor, n_data: int) -> Tensor:
        """Add one batch's curvature to ``H_new`` and return the batch's loss.

        A dense curvature is summed in place when the backend's ``full`` takes ``out``
        (no ``(params, params)`` temporary per batch).
        """
        if self._sums_in_place():
            method = getattr(self.backend, self._structure.value)
            loss, _ = method(X, y, N=n_data, out=H_new.H, **self._asdl_fisher_kwargs)
            H_new._invalidate()
            return loss
        batch_loss, H_batch = self._curvature_step(X, y, n_data)
        if H_batch is not None:
            H_new.add_(H_batch)
        return batch_loss

    def _sums_in_place(self) -> bool:
        """Whether :meth:`_add_batch` lets the backend sum the curvature in place (a dense
        or Kronecker-factored one, when the backend's method takes ``out``)."""
        if self._structure not in (HessianStructure.FULL, HessianStructure.KRON):
            return False
        return _takes_out(getattr(self.backend, self._structure.value))

    def _finish_batches(self, H_new: Curvature, n_data: int) -> None:
        """Hook after the last batch, for curvatures that :meth:`_add_batch` keeps raw; a
        dense curvature summed in place is checked for NaN/Inf once here.

        Raises:
            ValueError: If the curvature summed in place has NaN or Inf entries.
        """
        if self._sums_in_place():
            flush = getattr(self.backend, "flush_sums", None)
            if callable(flush):
                flush()
        if self._sums_in_place() and not H_new.is_finite():
            raise ValueError(
                "the curvature contains NaN or Inf values; check the model (outputs and "
                "parameters) and the data for NaN, Inf or overflow"
            )

    def _merge_fit(self, H_new: Curvature, n_data: int) -> None:
        self._curvature.add_(H_new.H)  # the storage, in the accumulation precision

    def _set_n_outputs(self, X: Inputs) -> None:
        with torch.no_grad():
            out = self.model(X)
        if out.ndim != 2:
            raise ValueError(
                f"model output must have shape (batch, outputs), got {tuple(out.shape)}"
            )
        if self.n_outputs is not None and out.shape[-1] != self.n_outputs:
            raise ValueError(
                f"model now has {out.shape[-1]} outputs, was fitted with {self.n_outputs}"
            )
        self.n_outputs = out.shape[-1]

    def _curvature_step(self, X: Inputs, y: Tensor, n_data: int) -> tuple[Tensor, Any]:
        """``(loss, curvature)`` of a batch; a ``None`` curvature is not added (low-rank)."""
        method = getattr(self.backend, self._structure.value)
        return method(X, y, N=n_data, **self._asdl_fisher_kwargs)

    # ----------------------------------------------------------------- posterior
    @property
    def posterior(self) -> Posterior:
        """The posterior precision object for the current hyperparameters; before
        :meth:`fit` the prior's (zero curvature)."""
        cache = getattr(self, "_posterior_cache", None)
        if cache is None:
            curvature = self._new_curvature() if self._curvature is None else self._curvature
            cache = curvature.with_prior(self.prior_precision, self._H_factor)
            self._posterior_cache = cache
        return cache

    @property
    def posterior_precision(self) -> Any:
        """``P`` (dense for full, a vector for diag, ``KronDecomposed`` for kron)."""
        return self.posterior.precision()

    @property
    def posterior_covariance(self) -> Tensor:
        return self.posterior.covariance()

    @property
    def posterior_scale(self) -> Tensor:
        return self.posterior.scale()

    @property
    def posterior_variance(self) -> Tensor:
        return self.posterior.variance()

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Parameter samples ``(n_samples, params)`` from the posterior."""
        return self.mean + self.posterior.sample(n_samples, generator)

    def functional_variance(self, Js: Tensor) -> Tensor:
        """``J P^-1 J^T`` per sample: ``(batch, outputs, params) -> (batch, outputs, outputs)``."""
        return self.posterior.inv_quad(Js)

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """Joint ``J P^-1 J^T``: ``(batch, outputs, params) -> (batch*outputs, batch*outputs)``."""
        return self.posterior.inv_quad_joint(Js.reshape(-1, Js.shape[-1]))

    def _glm_predictive_distribution(
        self, X: Inputs, joint: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(f_mu, f_var)`` of the linearised model at ``X``.

        Structures that can evaluate ``J P^-1 J^T`` layer by layer (:meth:`_factored_variance`)
        do so from the Jacobian factors of networks of Linear and Conv2d layers, all weights,
        marginal variances; everything else forms the Jacobians.
        """
        if not self.enable_backprop:
            check_finite_inputs(X)
        if not joint:
            moments = self._factored_moments(X)
            if moments is not None:
                return moments
        return self._jacobian_moments(X, joint)

    def _factored_moments(self, X: Inputs) -> tuple[Tensor, Tensor] | None:
        """``(f_mu, f_var)`` layer by layer (:meth:`_factored_variance`) from the Jacobian
        factors of an all-weights approximation whose structure has a factored predictive
        and whose network has factors
        (:func:`~laplace.utils.linear_jacobians.linear_jacobian_factors`); None otherwise."""
        if not (self._factored_predictive and isinstance(self.subset, AllWeights)):
            return None
        factored = self._memo(
            "factors",
            X,
            lambda: linear_jacobian_factors(
                self.model,
                self.subset.named_params,
                X,
                create_graph=self.enable_backprop,
                convolutions=True,
            ),
        )
        if factored is None:
            return None
        return factored[1], self._factored_variance(factored[0])

    def _nn_samples(
        self, X: Inputs, n_samples: int, generator: torch.Generator | None, **model_kwargs: Any
    ) -> Tensor:
        """Network outputs at parameter samples, ``(n_samples, batch, outputs)``."""
        return self._outputs_at(X, self.sample(n_samples, generator), **model_kwargs)

    def _outputs_at(self, X: Inputs, thetas: Tensor, **model_kwargs: Any) -> Tensor:
        """Network outputs with the posterior's parameters at each row of ``thetas``.

        Shapes:
            ``thetas (n, params) -> (n, batch, outputs)``
        """
        context = torch.enable_grad() if self.enable_backprop else torch.no_grad()
        with context:
            outs = [self.subset.forward_at(X, theta, **model_kwargs) for theta in thetas]
        return torch.stack(outs)

    # ----------------------------------------------------------------- kernel, samplers
    def _kernel_cross(self, R1: Tensor, R2: Tensor) -> Tensor:
        return self.posterior.inv_bilinear(R1.flatten(0, 1), R2.flatten(0, 1))

    def _function_deltas(self, n_samples: int, generator: torch.Generator | None) -> Tensor:
        return self.posterior.sample(n_samples, generator)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers that restore the fitted approximation."""
        state = self._common_state()
        state.update(structure=self._structure.value, H=self._curvature.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted approximation saved by :meth:`state_dict`.

        Raises:
            ValueError: If the state was saved from another class, structure, likelihood or
                a model with other parameter shapes.
        """
        self._check_state(state_dict, {"structure": self._structure.value})
        H = self._new_curvature()
        H.load_state_dict(state_dict["H"])
        self._curvature = H
        self._load_common_state(state_dict)


# The per-structure classes and LowRankLaplace live in their own modules (they subclass
# ParametricLaplace, so they are imported last) and are re-exported for the public import paths
# ``laplace.baselaplace.FullLaplace`` and so on.
from laplace.functional import (  # noqa: E402
    ELLA,
    BaseFunctionalLaplace,
    FunctionalLaplace,
    VaLLA,
)
from laplace.lowrank import LowRankLaplace  # noqa: E402
from laplace.structures import DiagLaplace, FullLaplace, KronLaplace  # noqa: E402
