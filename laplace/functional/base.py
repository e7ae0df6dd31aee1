"""What every function-space Laplace approximation shares.

The linearised network ``f_lin(x; theta) = f(x; theta*) + J(x) (theta - theta*)`` with the prior
``theta ~ N(mu0, P0^-1)`` is a Gaussian process over the outputs, with kernel

    ``k(x, x') = J(x) P0^-1 J(x')^T``        (outputs x outputs per pair of inputs)

(Khan, Immer, Abedi & Korzepa, "Approximate inference turns deep networks into Gaussian
processes", NeurIPS 2019; Immer, Korzepa & Bauer, "Improving predictions of Bayesian neural
nets via local linearization", AISTATS 2021). Its Laplace (GGN) posterior given the data is
the GLM predictive of the weight-space Laplace approximation, written with the kernel instead
of the ``(params, params)`` precision: that pays off when the data (or a subset of it) is
small compared with the number of parameters. The classes differ in which finite
approximation of the kernel posterior they compute: a subset of the data
(:class:`~laplace.functional.sod.FunctionalLaplace`), a Nyström approximation (ELLA) or
variational inducing points (VaLLA).

:class:`BaseFunctionalLaplace` holds the shared interface on top of
:class:`~laplace.base.BaseLaplace`: the predictive (``pred_type="gp"`` is the GP posterior,
``"glm"`` an alias of it), :meth:`predictive_moments`, functional samples with a ``joint``
option, and the refusal of weight samples. Subclasses implement :meth:`_moments_from`
(the posterior mean and covariance of the outputs from the test Jacobians) and ``fit``.
It also checks training batches and model outputs for them, and refuses what a
function-space posterior does not have (weight samples and densities; the marginal
likelihood unless a subclass adds one). The module's functions are the argument checks and
the data-set reads the classes share; :class:`PreciseMode` is the ``precise()`` switch of
their posteriors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from numbers import Integral
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from laplace.base import BaseLaplace
from laplace.predictive import glm_samples
from laplace.utils.data import (
    Inputs,
    batch_size,
    check_finite_inputs,
    dataset_size,
)
from laplace.utils.enums import HessianStructure, Likelihood, PredType, parse_enum
from laplace.utils.memory import get_memory_budget, rows_within_budget

__all__ = [
    "BaseFunctionalLaplace",
    "PreciseMode",
    "check_seed",
    "checked_data_size",
    "copy_history",
    "is_count",
    "positive_int",
    "subset_loader",
]


class BaseFunctionalLaplace(BaseLaplace):
    """Base class of the function-space (Gaussian-process) Laplace approximations.

    Subclasses implement ``fit`` and :meth:`_moments_from`; see the module docstring.
    The common constructor arguments are those of :class:`~laplace.base.BaseLaplace`.
    """

    _structure = HessianStructure.GP
    _no_marginal_likelihood: ClassVar[str] = "this approximation has no marginal likelihood"
    """Why :meth:`log_marginal_likelihood` raises, and what to use instead."""
    _no_log_likelihood: ClassVar[str] = "this approximation has no training log likelihood"
    """Why :attr:`log_likelihood` raises, and what to use instead."""

    def _check_backend(self, backend: type | None) -> type:
        """Any curvature backend class that computes Jacobians (default ``CurvlinopsGGN``);
        the output Hessians of the likelihood are computed by the library (a GGN).

        Raises:
            ValueError: For anything but such a backend class.
        """
        from laplace.curvature import CurvlinopsGGN

        backend = CurvlinopsGGN if backend is None else backend
        if not isinstance(backend, type) or not callable(getattr(backend, "jacobians", None)):
            raise ValueError(
                f"backend must be a curvature backend class with jacobians(), got {backend!r}"
            )
        return backend

    # ----------------------------------------------------------------- shared fitted state
    @property
    def mean(self) -> Tensor | None:
        """The trainable parameters at :meth:`fit` (the linearisation point), ``(params,)``."""
        return getattr(self, "_mean", None)

    @mean.setter
    def mean(self, value: Tensor | None) -> None:
        self._mean = value

    def _jacobians(self, X: Inputs) -> tuple[Tensor, Tensor]:
        """``(Js, f)`` of the subset's parameters at ``X``; detached unless
        ``enable_backprop``.

        Shapes:
            ``Js (batch, outputs, params), f (batch, outputs)``
        """
        return self._memo(
            "jacobians", X, lambda: self.subset.jacobians(self.backend, X, self.enable_backprop)
        )

    # ----------------------------------------------------------------- data
    def _check_override(self, override: bool, reason: str) -> None:
        """Refuse ``fit(override=False)``, for a posterior that cannot be updated.

        Raises:
            ValueError: Unless ``override``, saying ``reason``.
        """
        if not override:
            raise ValueError(
                f"{type(self).__name__} does not support fit(override=False): {reason}; fit "
                "again on all the data"
            )

    def _batches(
        self, loader: Iterable, desc: str = "", progress: bool = False
    ) -> Iterator[tuple[Inputs, Tensor]]:
        """:meth:`_checked_batch` of each batch of ``loader`` (the per-sample shape is
        recorded if none is yet), with an optional progress bar."""
        for batch in tqdm(loader, desc=desc, disable=not progress):
            yield self._checked_batch(batch, first=self._input_shape is None)

    def _check_output(self, f: Tensor) -> None:
        """Refuse model outputs that are not ``(batch, outputs)``; the first sets
        ``n_outputs``.

        Raises:
            ValueError: For outputs of another number of dimensions.
        """
        if f.ndim != 2:
            raise ValueError(
                f"model output must have shape (batch, outputs), got {tuple(f.shape)}"
            )
        if self.n_outputs is None:
            self.n_outputs = f.shape[1]

    # ----------------------------------------------------------------- predictive
    def _moments_from(self, Js: Tensor, f_mu: Tensor, joint: bool) -> tuple[Tensor, Tensor]:
        """Posterior mean and covariance of the outputs at the inputs with Jacobians ``Js``
        and network outputs ``f_mu``.

        Shapes:
            ``(batch, outputs), (batch, outputs, outputs)``; with ``joint``
            ``(batch * outputs,), (batch * outputs, batch * outputs)``
        """
        raise NotImplementedError

    def _glm_predictive_distribution(
        self, X: Inputs, joint: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The GP moments at ``X``, from the Jacobians of the whole batch or, beyond the
        memory budget (:mod:`laplace.utils.memory`), of blocks of inputs (the joint
        covariance then comes from the kernel's block pairs).

        Raises:
            MemoryBudgetError: If the Jacobian of one input exceeds the budget.
        """
        if not self.enable_backprop:
            check_finite_inputs(X)
        n, C = batch_size(X, self.dict_key_x), self.n_outputs or 1
        per_input = C * self.n_params * torch.empty((), dtype=self._dtype).element_size()
        if n * per_input <= get_memory_budget():
            Js, f_mu = self._jacobians(X)
            return self._moments_from(Js, f_mu, joint)
        block = rows_within_budget(per_input, f"the Jacobian of {type(self).__name__}")
        from laplace.kernel import PosteriorKernel, input_chunks

        chunks = list(input_chunks(X, max(1, block // 2) if joint else block, self.dict_key_x))
        if joint:
            f_mu = torch.cat([self._jacobians(chunk)[1] for chunk in chunks])
            K = PosteriorKernel(self, max(1, block // 2), max_cached_entries=1)(X)
            return f_mu.reshape(-1), K.permute(0, 2, 1, 3).reshape(n * C, n * C)
        parts = [self._moments_from(*self._jacobians(chunk), False) for chunk in chunks]
        return torch.cat([f for f, _ in parts]), torch.cat([v for _, v in parts])

    def predictive_moments(self, x: Inputs, *, joint: bool = False) -> tuple[Tensor, Tensor]:
        """The GP posterior mean and covariance of the outputs at ``x`` (no observation noise).

        Shapes:
            ``(batch, outputs), (batch, outputs, outputs)``; with ``joint``
            ``(batch * outputs,), (batch * outputs, batch * outputs)``

        Raises:
            ValueError: If not fitted, or for an empty batch.
        """
        self._check_fitted()
        self._check_nonempty(x)
        with self._explained_input_errors(x):
            return self._glm_predictive_distribution(x, joint=joint)

    def _kernel_rows_and_outputs(self, X: Inputs) -> tuple[Tensor, Tensor]:
        return self._jacobians(X)

    def _kernel_cross(self, R1: Tensor, R2: Tensor) -> Tensor:
        """The off-diagonal block of the joint posterior covariance of the stacked rows (the
        kernel is in the span of the Jacobians, so stacking costs only the block sizes)."""
        rows = torch.cat([R1, R2.to(R1.dtype)])
        joint = self._moments_from(rows, rows.new_zeros(rows.shape[:2]), joint=True)[1]
        split = R1.shape[0] * R1.shape[1]
        return joint[:split, split:]

    def functional_variance(self, Js: Tensor) -> Tensor:
        """Posterior covariance of the outputs per input, from its Jacobians.

        Shapes:
            ``(batch, outputs, params) -> (batch, outputs, outputs)``
        """
        self._check_fitted()
        return self._moments_from(Js, Js.new_zeros(Js.shape[:2]), joint=False)[1]

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """Joint posterior covariance of the outputs of a batch, from its Jacobians.

        Shapes:
            ``(batch, outputs, params) -> (batch * outputs, batch * outputs)``
        """
        self._check_fitted()
        return self._moments_from(Js, Js.new_zeros(Js.shape[:2]), joint=True)[1]

    def _check_predict_args(
        self, pred_type: PredType, n_samples: int, generator: torch.Generator | None
    ) -> None:
        if pred_type == PredType.NN:
            raise ValueError(
                f"pred_type='nn' samples weights, which {type(self).__name__} (a Gaussian "
                "process over the outputs) does not have; use pred_type='gp' (or 'glm')"
            )
        super()._check_predict_args(PredType.GLM, n_samples, generator)

    def _check_nonempty(self, x: Inputs) -> None:
        size = len(x[self.dict_key_x]) if not isinstance(x, Tensor) else len(x)
        if size == 0:
            raise ValueError("x is an empty batch: it has no inputs to predict at")

    def functional_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GP,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        joint: bool = False,
    ) -> Tensor:
        """Samples of the outputs from the GP posterior, ``(n_samples, batch, outputs)``.

        With ``joint`` the samples are correlated across the batch (from the joint
        covariance); otherwise independent per input (correlated across outputs unless
        ``diagonal_output``).
        """
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        self._check_predict_args(pred_type, n_samples, generator)
        with self._explained_input_errors(x):
            if not joint:
                f_mu, f_var = self._glm_predictive_distribution(x)
                return glm_samples(f_mu, f_var, n_samples, diagonal_output, generator)
            f_mu, f_cov = self._glm_predictive_distribution(x, joint=True)
        batch = batch_size(x, self.dict_key_x)
        flat = glm_samples(f_mu[None], f_cov[None], n_samples, False, generator)
        return flat.reshape(n_samples, batch, -1)  # outputs per input (1 for reward models)

    def predictive_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GP,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        joint: bool = False,
    ) -> Tensor:
        """Samples of the predictive (after the link), ``(n_samples, batch, outputs)``."""
        samples = self.functional_samples(
            x, pred_type, n_samples, diagonal_output, generator, joint=joint
        )
        if self._predictive_likelihood(fitting) == Likelihood.CLASSIFICATION:
            return torch.softmax(samples, dim=-1)
        return samples

    # ----------------------------------------------------------------- not applicable
    def square_norm(self, value: Tensor) -> Tensor:
        """Not available: a function-space posterior has no weight-space precision.

        Raises:
            NotImplementedError: Always (as :meth:`log_prob`).
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no weight-space posterior precision; square_norm and "
            "log_prob need a weight-space Laplace (FullLaplace, KronLaplace, ...)"
        )

    log_prob = square_norm

    def log_marginal_likelihood(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not available, as in laplace-torch (``FunctionalLaplace`` has one).

        Raises:
            NotImplementedError: Always, saying why and what to use instead.
        """
        raise NotImplementedError(self._no_marginal_likelihood)

    @property
    def log_likelihood(self) -> Tensor:
        """Not available, as in laplace-torch (``FunctionalLaplace`` has one).

        Raises:
            NotImplementedError: Always, saying why and what to use instead.
        """
        raise NotImplementedError(self._no_log_likelihood)

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Any:
        """Not available: a function-space posterior has no weight samples.

        Raises:
            NotImplementedError: Always, as in laplace-torch; use :meth:`functional_samples`
                (outputs) or a weight-space class such as ``FullLaplace``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} is a posterior over the network outputs, not the weights; "
            "sample the outputs with functional_samples(x), or use a weight-space Laplace "
            "(FullLaplace, KronLaplace, ...) for weight samples"
        )


class PreciseMode:
    """The ``precise()`` switch of a function-space posterior: ``precise_results`` is true
    within it, where moments are returned in the accumulation precision (for links that
    cancel, such as the Laplace bridge), and false outside it, where they are cast to the
    model's dtype."""

    precise_results: bool = False

    @contextmanager
    def precise(self) -> Iterator[None]:
        """Return moments in the accumulation precision within this context."""
        previous, self.precise_results = self.precise_results, True
        try:
            yield
        finally:
            self.precise_results = previous


# --------------------------------------------------------------------- shared helpers
def is_count(value: Any, minimum: int = 1, integer: type = Integral) -> bool:
    """Whether ``value`` is an ``integer`` (not a bool) of at least ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, integer) and value >= minimum


def positive_int(value: Any, name: str) -> int:
    """``value``, checked to be a positive ``int``.

    Raises:
        ValueError: Otherwise, naming the argument ``name``.
    """
    if not is_count(value, integer=int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_seed(seed: Any, integer: type = int) -> None:
    """Refuse a seed that is not an ``integer`` (or is a bool).

    Raises:
        ValueError: For such a seed.
    """
    if isinstance(seed, bool) or not isinstance(seed, integer):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def checked_data_size(train_loader: Any, size: int, name: str) -> int:
    """The number of data points of ``train_loader``, at least the ``size`` asked for.

    Raises:
        ValueError: If the data set is smaller, naming the argument ``name``, and as
            :func:`~laplace.utils.data.dataset_size`.
    """
    n_data = dataset_size(train_loader)
    if size > n_data:
        raise ValueError(f"{name} must be at most the number of data points {n_data}, got {size}")
    return n_data


def subset_loader(train_loader: Any, indices: Tensor) -> DataLoader:
    """A loader over the ``indices`` of ``train_loader.dataset``, in their order, in batches
    of the loader's size (all at once if it has none) with its ``collate_fn``."""
    return DataLoader(
        Subset(train_loader.dataset, indices.tolist()),
        batch_size=getattr(train_loader, "batch_size", None) or len(indices),
        collate_fn=getattr(train_loader, "collate_fn", None),
    )


def copy_history(history: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A ``fit_history_`` with its lists copied (so the copy never shares an append)."""
    return {key: list(values) for key, values in history.items()}
