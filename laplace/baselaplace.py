"""Laplace approximations over the weights of a network.

:class:`BaseLaplace` holds what every Laplace approximation shares: the likelihood, the
hyperparameters (prior precision and mean, observation noise, temperature), their checks,
prior tuning and the predictive dispatch. :class:`ParametricLaplace` is the one algorithm of a
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

from laplace.evidence import EvidenceMixin
from laplace.hyperparameters import HyperparameterMixin
from laplace.posterior.base import Curvature, Posterior
from laplace.predictive import PredictiveMixin
from laplace.subsets import AllWeights
from laplace.tuning import PriorTuningMixin
from laplace.utils.data import Inputs, check_finite_inputs, dataset_size, unpack_batch
from laplace.utils.enums import HessianStructure, Likelihood, parse_enum
from laplace.utils.linear_jacobians import linear_jacobian_factors
from laplace.utils.matrix import Kron, KronDecomposed
from laplace.utils.precision import accumulation_dtype

__all__ = [
    "BaseLaplace",
    "DiagLaplace",
    "FullLaplace",
    "KronLaplace",
    "LowRankLaplace",
    "ParametricLaplace",
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


class BaseLaplace(HyperparameterMixin, PriorTuningMixin, PredictiveMixin):
    """Base class of every Laplace approximation.

    Args:
        model: The trained network; its output has shape ``(batch, outputs)``.
        likelihood: ``"classification"``, ``"regression"`` or ``"reward_modeling"``.
        sigma_noise: Observation noise standard deviation (regression only; must be 1
            otherwise).
        prior_precision: Scalar, per-layer or per-parameter precision of the Gaussian prior.
        prior_mean: Scalar or per-parameter prior mean.
        temperature: Likelihood temperature; values below 1 concentrate the posterior.
        enable_backprop: Keep the predictive differentiable w.r.t. the input.
        dict_key_x: Key of the inputs in dict-like batches.
        dict_key_y: Key of the targets in dict-like batches.
        backend: Curvature backend class (default ``CurvlinopsGGN``).
        backend_kwargs: Keyword arguments for the backend's constructor.
        asdl_fisher_kwargs: Keyword arguments for ASDL's Fisher computation.

    Raises:
        ValueError: For unknown option strings, ``sigma_noise != 1`` outside regression,
            non-positive precisions or temperatures, or a backend that cannot compute the
            requested structure.
    """

    _structure: ClassVar[HessianStructure | None] = None

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.likelihood = parse_enum(Likelihood, likelihood, "likelihood")
        self.model = model
        self.subset = self._make_subset(model)
        self.enable_backprop = bool(enable_backprop)
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        self._backend_cls = self._check_backend(backend)
        self._backend_kwargs = dict(backend_kwargs or {})
        self._asdl_fisher_kwargs = dict(asdl_fisher_kwargs or {})
        self._backend = None
        self.n_outputs: int | None = None
        self.n_data: int | None = None
        self.loss = 0.0
        self._init_hyperparameters(sigma_noise, prior_precision, prior_mean, temperature)

    def _make_subset(self, model: nn.Module) -> AllWeights:
        return AllWeights(model)

    @property
    def params(self) -> list[nn.Parameter]:
        return self.subset.params

    @property
    def n_params(self) -> int:
        """Number of parameters the Laplace approximation covers."""
        return self._n_posterior

    @property
    def n_layers(self) -> int:
        """Number of parameter blocks (layerwise prior entries)."""
        return self._n_blocks

    @property
    def _n_posterior(self) -> int:
        """Dimension of the Gaussian: the size of ``H``, the posterior and a diagonal prior."""
        return sum(self.subset.sizes)

    @property
    def _n_blocks(self) -> int:
        """Number of prior blocks: the entries of a layerwise prior."""
        return len(self.subset.sizes)

    @property
    def _device(self) -> torch.device:
        return self.params[0].device

    @property
    def _dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def _accumulation_dtype(self) -> torch.dtype:
        """The precision of sums over the data and of the marginal likelihood's terms
        (:func:`~laplace.utils.precision.accumulation_dtype`)."""
        return accumulation_dtype(self._dtype, self._device)

    @property
    def loss(self) -> Tensor | float:
        """The training loss ``factor * sum_n loss_n`` at the MAP, summed by :meth:`fit` (in
        the accumulation precision; returned in the model's dtype)."""
        if isinstance(self._loss, Tensor):
            return self._loss.to(self._dtype)
        return self._loss

    @loss.setter
    def loss(self, value: Tensor | float) -> None:
        if isinstance(value, Tensor):
            value = value.detach().to(accumulation_dtype(value.dtype, value.device))
        self._loss = value

    def _check_backend(self, backend: type | None) -> type:
        from laplace.curvature import BACKENDS, CurvlinopsGGN

        backend = CurvlinopsGGN if backend is None else backend
        if not isinstance(backend, type) or not hasattr(backend, "structures"):
            raise ValueError(f"backend must be a curvature backend class, got {backend!r}")
        structure = self._structure
        if structure is not None and structure not in backend.structures:
            able = [b.__name__ for b in BACKENDS if structure in b.structures]
            raise ValueError(
                f"backend {backend.__name__} cannot compute hessian_structure="
                f"{structure.value!r}; backends that can: {', '.join(able)}"
            )
        return backend

    @property
    def backend(self) -> Any:
        """The curvature backend instance (created on first use)."""
        if self._backend is None:
            self._backend = self._make_backend(
                self.subset.backend_model(), **self.subset.backend_kwargs()
            )
        return self._backend

    def _make_backend(self, model: nn.Module, **kwargs: Any) -> Any:
        """A backend of this object's class and options on ``model``."""
        likelihood = (
            Likelihood.CLASSIFICATION
            if self.likelihood == Likelihood.REWARD_MODELING
            else self.likelihood
        )
        backend = self._backend_cls(
            model,
            likelihood,
            dict_key_x=self.dict_key_x,
            dict_key_y=self.dict_key_y,
            **kwargs,
            **self._backend_kwargs,
        )
        backend.sum_dtype = self._accumulation_dtype  # see laplace.utils.precision
        return backend

    def _check_fitted(self) -> None:
        if self.n_data is None:
            raise ValueError(
                f"{type(self).__name__} is not fitted yet: call fit(train_loader) first"
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_backend"] = None
        state.pop("_whole_backend", None)
        state.pop("_squares_cache", None)
        state["_posterior_cache"] = None
        return state


class ParametricLaplace(EvidenceMixin, BaseLaplace):
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
        self.mean = self.subset.mean()
        self._curvature: Curvature | None = None

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

    def fit(self, train_loader: Any, override: bool = True, progress_bar: bool = False) -> None:
        """Fit the curvature at the current parameters of the model.

        Args:
            train_loader: Yields ``(X, y)`` or dict-like batches; ``len(train_loader.dataset)``
                is the number of data points.
            override: Start afresh; ``False`` adds to the previous fit (online learning).
            progress_bar: Show a tqdm progress bar over batches.

        Raises:
            ValueError: For a loader without ``dataset``, an empty loader, NaN inputs, wrong
                targets, or NaN/Inf curvature.
        """
        n_data = dataset_size(train_loader)
        if override or self._curvature is None:
            self._curvature, self._loss, self.n_data = self._new_curvature(), 0.0, None
        self.model.eval()
        self.mean = self.subset.mean()
        if not torch.isfinite(self.mean).all():
            raise ValueError("the model's parameters contain NaN or Inf; cannot fit at them")
        H_new, loss, n_batches = self._new_curvature(), 0.0, 0
        for batch in tqdm(train_loader, desc="fit", disable=not progress_bar):
            X, y = unpack_batch(batch, self.dict_key_x, self.dict_key_y, self._device)
            check_finite_inputs(X)
            if self.n_outputs is None or n_batches == 0:
                self._set_n_outputs(X)
            batch_loss = self._add_batch(H_new, X, y, n_data).detach()
            loss = loss + batch_loss.to(accumulation_dtype(batch_loss.dtype, batch_loss.device))
            n_batches += 1
        if n_batches == 0:
            raise ValueError("train_loader yielded no batches")
        self._finish_batches(H_new, n_data)
        self._merge_fit(H_new, n_data)
        self._loss = self._loss + loss
        self.n_data = n_data + (self.n_data or 0)
        self._posterior_cache = None

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
        """The posterior precision object for the current hyperparameters."""
        self._check_fitted()
        cache = getattr(self, "_posterior_cache", None)
        if cache is None:
            cache = self._curvature.with_prior(self.prior_precision, self._H_factor)
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
        do so from the Jacobian factors of networks of Linear layers, all weights, marginal
        variances; everything else forms the Jacobians.
        """
        if not self.enable_backprop:
            check_finite_inputs(X)
        if self._factored_predictive and not joint and isinstance(self.subset, AllWeights):
            factored = self._memo(
                "factors",
                X,
                lambda: linear_jacobian_factors(
                    self.model, self.subset.named_params, X, create_graph=self.enable_backprop
                ),
            )
            if factored is not None:
                return factored[1], self._factored_variance(factored[0])
        Js, f_mu = self._memo(
            "jacobians", X, lambda: self.subset.jacobians(self.backend, X, self.enable_backprop)
        )
        if joint:
            return f_mu.reshape(-1), self.functional_covariance(Js)
        return f_mu, self.functional_variance(Js)

    def _nn_samples(
        self, X: Inputs, n_samples: int, generator: torch.Generator | None, **model_kwargs: Any
    ) -> Tensor:
        """Network outputs at parameter samples, ``(n_samples, batch, outputs)``."""
        thetas = self.sample(n_samples, generator)
        context = torch.enable_grad() if self.enable_backprop else torch.no_grad()
        with context:
            outs = [self.subset.forward_at(X, theta, **model_kwargs) for theta in thetas]
        return torch.stack(outs)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers that restore the fitted approximation."""
        self._check_fitted()
        return {
            "cls_name": type(self).__name__,
            "structure": self._structure.value,
            "param_shapes": [list(p.shape) for p in self.params],
            "mean": self.mean.detach(),
            "H": self._curvature.state_dict(),
            "loss": torch.as_tensor(self._loss).detach(),
            "prior_mean": self.prior_mean.detach(),
            "prior_precision": self.prior_precision.detach(),
            "sigma_noise": self.sigma_noise.detach(),
            "temperature": self.temperature,
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "likelihood": self.likelihood.value,
            "enable_backprop": self.enable_backprop,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted approximation saved by :meth:`state_dict`.

        Raises:
            ValueError: If the state was saved from another class, structure, likelihood or
                a model with other parameter shapes.
        """
        expected = {
            "cls_name": type(self).__name__,
            "structure": self._structure.value,
            "likelihood": self.likelihood.value,
            "param_shapes": [list(p.shape) for p in self.params],
        }
        for key, value in expected.items():
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r}: it was not saved by state_dict()")
            if state_dict[key] != value:
                raise ValueError(
                    f"state_dict was saved with {key}={state_dict[key]!r}, this object has "
                    f"{key}={value!r}"
                )
        H = self._new_curvature()
        H.load_state_dict(state_dict["H"])
        self._curvature = H
        device, dtype = self._device, self._dtype
        self.mean = state_dict["mean"].to(device=device, dtype=dtype)
        self.loss = state_dict["loss"].to(device=device, dtype=self._accumulation_dtype)
        self.n_data, self.n_outputs = state_dict["n_data"], state_dict["n_outputs"]
        self.prior_mean = state_dict["prior_mean"]
        self.prior_precision = state_dict["prior_precision"]
        self.sigma_noise = state_dict["sigma_noise"]
        self.temperature = state_dict["temperature"]
        self.enable_backprop = state_dict["enable_backprop"]
        self._posterior_cache = None


# The per-structure classes and LowRankLaplace live in their own modules (they subclass
# ParametricLaplace, so they are imported last) and are re-exported for the public import paths
# ``laplace.baselaplace.FullLaplace`` and so on.
from laplace.lowrank import LowRankLaplace  # noqa: E402
from laplace.structures import DiagLaplace, FullLaplace, KronLaplace  # noqa: E402
