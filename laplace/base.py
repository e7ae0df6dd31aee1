"""The base class of every Laplace approximation (parametric and, later, function-space).

:class:`BaseLaplace` holds what every Laplace approximation shares: the likelihood, the
hyperparameters and their checks (:mod:`laplace.hyperparameters`), prior tuning
(:mod:`laplace.tuning`), the predictive dispatch (:mod:`laplace.predictive`), the backend it
builds, and the loss summed by ``fit``. It is re-exported from :mod:`laplace.baselaplace`,
the public import path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from laplace.hyperparameters import HyperparameterMixin
from laplace.predictive import PredictiveMixin
from laplace.subsets import AllWeights
from laplace.tuning import PriorTuningMixin
from laplace.utils.data import (
    Inputs,
    check_finite_inputs,
    check_finite_targets,
    check_input_dtype,
    per_sample_shape,
    unpack_batch,
)
from laplace.utils.distributed import unwrap_parallel
from laplace.utils.enums import HessianStructure, Likelihood, PredType, parse_enum
from laplace.utils.precision import accumulation_dtype

if TYPE_CHECKING:
    from laplace.kernel import FunctionSampler, PosteriorKernel

__all__ = ["BaseLaplace"]


class BaseLaplace(HyperparameterMixin, PriorTuningMixin, PredictiveMixin):
    """Base class of every Laplace approximation.

    Args:
        model: The trained network; its output has shape ``(batch, outputs)``. A
            ``DistributedDataParallel`` or ``DataParallel`` wrapper is replaced by the
            network it wraps (:func:`~laplace.utils.distributed.unwrap_parallel`).
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
        asdl_fisher_kwargs: Keyword options passed to the backend's ``full``/``diag``/``kron``
            in every batch of ``fit`` (for example ``kfac_approx``, ``mc_samples``, ``seed``;
            ASDL: ``var``, ``seed``); see the Backends page of the docs.

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
        model = unwrap_parallel(model)  # a (Distributed)DataParallel wrapper's network
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
        self._input_shape: tuple[int, ...] | None = None  # of one sample, seen by fit
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

    @contextmanager
    def _unchanged_on_failure(self) -> Iterator[None]:
        """Run a fit with the model in eval mode; if it raises, put this object back as it was
        before re-raising. Either way every module of the model gets back the train/eval
        mode it had: fitting never changes the mode it was given."""
        saved = self._fit_state()
        try:
            with self._evaluating():
                yield
        except BaseException:
            self._restore_fit_state(saved)
            raise

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Run with the model in eval mode (no dropout, fixed batch-norm statistics: the
        network the approximation linearises), then give every module its mode back."""
        modes = [m.training for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for module, mode in zip(self.model.modules(), modes):
                module.training = mode

    def _fit_state(self) -> tuple[dict[str, Any], list[bool]]:
        """What a fit may change: the attribute bindings and the model's modes.

        A fit never changes a stored tensor in place before its last step (for the parametric
        classes :meth:`~laplace.baselaplace.ParametricLaplace._merge_fit`), after which
        nothing raises; rebinding the attributes therefore restores every value.
        """
        return dict(self.__dict__), [m.training for m in self.model.modules()]

    def _restore_fit_state(self, saved: tuple[dict[str, Any], list[bool]]) -> None:
        attributes, modes = saved
        self.__dict__.clear()
        self.__dict__.update(attributes)
        for module, mode in zip(self.model.modules(), modes):
            module.training = mode
        flush = getattr(self._backend, "flush_sums", None)
        if callable(flush):  # drop the failed fit's pending sums (into its discarded H)
            flush()

    def _checked_batch(self, batch: Any, first: bool) -> tuple[Inputs, Tensor]:
        """``(X, y)`` of a batch on the model's device, with finite inputs of the model's
        dtype and finite targets; ``first`` records the per-sample shape of ``X``.

        Raises:
            ValueError: For a batch of neither form, and for bad inputs or targets.
        """
        X, y = unpack_batch(batch, self.dict_key_x, self.dict_key_y, self._device)
        check_finite_inputs(X)
        check_input_dtype(X, self._dtype, self.dict_key_x)
        check_finite_targets(y)
        if first:
            self._input_shape = per_sample_shape(X)
        return X, y

    # ----------------------------------------------------------------- state
    def _common_state(self) -> dict[str, Any]:
        """The fields of every ``state_dict``: identity, mean, loss, data and hyperparameters."""
        self._check_fitted()
        return {
            **self._state_identity(),
            "mean": self.mean.detach(),
            "loss": torch.as_tensor(self._loss).detach(),
            **self._hyperparameter_state(),
            "enable_backprop": self.enable_backprop,
        }

    def _state_identity(self, expected: dict[str, Any] | None = None) -> dict[str, Any]:
        """The fields that say what a ``state_dict`` belongs to: the class, the likelihood,
        the parameter shapes, and the class's ``expected`` configuration."""
        return {
            "cls_name": type(self).__name__,
            "likelihood": self.likelihood.value,
            "param_shapes": [list(p.shape) for p in self.params],
            **(expected or {}),
        }

    def _hyperparameter_state(self) -> dict[str, Any]:
        """The hyperparameters and data counts of a ``state_dict``."""
        return {
            "prior_mean": self.prior_mean.detach(),
            "prior_precision": self.prior_precision.detach(),
            "sigma_noise": self.sigma_noise.detach(),
            "temperature": self.temperature,
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
        }

    def _check_state(self, state_dict: dict[str, Any], expected: dict[str, Any]) -> None:
        """Refuse a state saved from another class, likelihood or model, or with other
        ``expected`` fields.

        Raises:
            ValueError: Naming the first field that is missing or differs.
        """
        for key, value in self._state_identity(expected).items():
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r}: it was not saved by state_dict()")
            if state_dict[key] != value:
                raise ValueError(
                    f"state_dict was saved with {key}={state_dict[key]!r}, this object has "
                    f"{key}={value!r}"
                )

    def _load_common_state(self, state_dict: dict[str, Any]) -> None:
        """Set what :meth:`_common_state` saved (after :meth:`_check_state`)."""
        device = self._device
        self.mean = state_dict["mean"].to(device=device, dtype=self._dtype)
        self.loss = state_dict["loss"].to(device=device, dtype=self._accumulation_dtype)
        self._load_hyperparameters(state_dict)
        self.enable_backprop = state_dict.get("enable_backprop", self.enable_backprop)
        self._posterior_cache = None

    def _load_hyperparameters(self, state_dict: dict[str, Any]) -> None:
        """Set what :meth:`_hyperparameter_state` saved."""
        self.n_data, self.n_outputs = state_dict["n_data"], state_dict["n_outputs"]
        self.prior_mean = state_dict["prior_mean"]
        self.prior_precision = state_dict["prior_precision"]
        self.sigma_noise = state_dict["sigma_noise"]
        self.temperature = state_dict["temperature"]

    # ----------------------------------------------------------------- kernel
    def posterior_kernel(
        self, batch_size: int = 256, max_cached_entries: int = 2**24
    ) -> PosteriorKernel:
        """The posterior kernel ``k(X1, X2) = J(X1) P^-1 J(X2)^T`` of the linearised network.

        ``k(X1, X2)`` has shape ``(n1, n2, outputs, outputs)``, ``k(X)`` is ``k(X, X)`` and
        ``k.diagonal(X)`` is the GLM predictive covariance ``(n, outputs, outputs)``; see
        :class:`~laplace.kernel.PosteriorKernel`, which evaluates it in blocks of
        ``batch_size`` inputs through the posterior's structure.

        Raises:
            ValueError: If ``batch_size`` or ``max_cached_entries`` is not a positive integer.
        """
        from laplace.kernel import PosteriorKernel

        return PosteriorKernel(self, batch_size, max_cached_entries)

    def function_sampler(
        self,
        n_samples: int = 100,
        seed: int | None = None,
        pred_type: PredType | str = PredType.GLM,
        batch_size: int = 256,
        method: str = "auto",
        max_jacobian_entries: int = 2**24,
    ) -> FunctionSampler:
        """``n_samples`` posterior functions, drawn once, to evaluate at any inputs.

        ``sampler(X)`` returns their outputs ``(n_samples, n, outputs)``: the linearised
        network at weight samples (``"glm"``) or the network itself (``"nn"``). The same
        functions are evaluated at every call, and the same ``seed`` draws the same functions
        (see :class:`~laplace.kernel.FunctionSampler`): for Thompson sampling and joint
        acquisition functions evaluated on chunks of a pool. ``method`` chooses Jacobian rows
        or Jacobian-free forward-mode products for ``"glm"``.

        Raises:
            ValueError: For a non-positive count, an unknown ``pred_type``, or before ``fit``.
            NotImplementedError: Where the posterior has no such samples (``"nn"`` for the
                function-space classes; :class:`~laplace.functional.VaLLA`).
            TypeError: For a non-integer ``seed``.
        """
        from laplace.kernel import FunctionSampler

        return FunctionSampler(
            self, n_samples, seed, pred_type, batch_size, method, max_jacobian_entries
        )

    def _function_deltas(self, n_samples: int, generator: torch.Generator | None) -> Tensor:
        """Zero-mean posterior samples in the space of :meth:`_kernel_rows`, so that
        ``f(x) + rows(x) delta`` is a posterior function of the linearised network.

        Shapes:
            ``-> (n_samples, rows)``
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no joint function samples; use functional_samples(x) "
            "per batch or predictive_moments(x, joint=True)"
        )

    def _kernel_row_bytes(self) -> int:
        """Bytes of :meth:`_kernel_rows` per input (a Jacobian by default)."""
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        return (self.n_outputs or 1) * self.n_params * itemsize

    def _kernel_rows(self, X: Inputs) -> Tensor:
        """What :meth:`_kernel_cross` needs of a block of inputs: Jacobian rows by default.

        Shapes:
            ``-> (batch, outputs, rows)``
        """
        return self._kernel_rows_and_outputs(X)[0]

    def _kernel_rows_and_outputs(self, X: Inputs) -> tuple[Tensor, Tensor]:
        """``(Js, f)``: the Jacobians of the posterior's parameters and the outputs at ``X``.

        Shapes:
            ``-> (batch, outputs, params), (batch, outputs)``
        """
        return self.subset.jacobians(self.backend, X, self.enable_backprop)

    def _kernel_cross(self, R1: Tensor, R2: Tensor) -> Tensor:
        """``J1 P^-1 J2^T`` between two blocks of :meth:`_kernel_rows`.

        Shapes:
            ``(b1, outputs, rows), (b2, outputs, rows) -> (b1 * outputs, b2 * outputs)``
        """
        raise NotImplementedError

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
