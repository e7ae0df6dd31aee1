"""Laplace approximation with a low-rank curvature, matrix-free.

:class:`LowRankLaplace` keeps the top ``k`` eigenpairs of the curvature over the whole
training set, ``H ~ U diag(l) U^T``, and the posterior precision
``P = U diag(l) U^T / (sigma^2 T) + diag(p0)`` (Woodbury algebra in
:mod:`laplace.posterior.lowrank`). The eigenpairs come from Lanczos iterations on
curvature-vector products summed over the training loader
(:mod:`laplace.curvature.lanczos`), so the ``(params, params)`` curvature is never formed and
the memory is ``O(params * max_iter)``; the cost is one pass over the data per Lanczos step.
With ``eigensolver="subspace"`` (:mod:`laplace.curvature.subspace`) a fixed
``n_power_iterations + 1`` passes each multiply the curvature with a block of
``n_eigenvalues + oversampling`` vectors at once, in ``O(params * (k + oversampling))``
memory: far fewer passes, as accurate for the top eigenvalues that stand out of the spectrum
and less accurate than Lanczos among eigenvalues close to each other (``docs/big_models.md``).

Where the dense curvature fits in half the memory budget (:mod:`laplace.utils.memory`; about
11,500 parameters with the default 2 GiB) it is cheaper to sum it in one pass, as
``FullLaplace`` does, and run the same Lanczos iteration on products with it in memory: the
fit then costs one pass over the data plus ``O(params^2 * max_iter)`` arithmetic, instead of
``max_iter`` passes. Both routes compute the top eigenpairs of the same matrix to the
Lanczos tolerance.

``eigensolver="auto"`` takes subspace iteration on the matrix-free route for a positive
semi-definite curvature, where the passes over the data are the cost, and Lanczos otherwise:
on the dense route the products are in memory, so Lanczos' extra steps are cheap and its
eigenpairs certified, and subspace iteration would find the eigenvalues of largest
magnitude of an indefinite Hessian instead of the largest. The default is ``"lanczos"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from laplace.baselaplace import ParametricLaplace, _takes_out
from laplace.curvature.lanczos import curvature_matvec, default_max_iter, lanczos_eigh
from laplace.curvature.subspace import (
    DEFAULT_OVERSAMPLING,
    DEFAULT_POWER_ITERATIONS,
    check_subspace_options,
    subspace_eigh,
    subspace_passes,
)
from laplace.posterior.base import Curvature
from laplace.posterior.lowrank import LowRankCurvature
from laplace.utils.data import Inputs
from laplace.utils.distributed import RankReduction
from laplace.utils.enums import Eigensolver, HessianStructure, Likelihood, parse_enum
from laplace.utils.memory import get_memory_budget

__all__ = ["LowRankLaplace"]

_LANCZOS_OPTIONS = ("n_eigenvalues", "lanczos_max_iter", "lanczos_tol", "lanczos_seed")
_SUBSPACE_OPTIONS = ("eigensolver", "n_power_iterations", "oversampling")
_DEFAULT_RANK = 100


class LowRankLaplace(ParametricLaplace):
    """Laplace approximation with a rank-``k`` curvature plus the diagonal prior.

    The curvature is that of the backend (the GGN for the default ``CurvlinopsGGN``; also
    ``CurvlinopsEF``, ``CurvlinopsHessian`` or a stochastic GGN), applied matrix-free over the
    whole training loader. Negative eigenvalues (an indefinite Hessian) are set to zero,
    with a warning unless they are round-off.

    ``V`` and ``Kinv`` expose the Woodbury form of the posterior covariance,
    ``P^-1 = diag(p0)^-1 - V Kinv V^T`` with ``V = diag(p0)^-1 U`` and
    ``Kinv = (diag(l / (sigma^2 T))^-1 + U^T diag(p0)^-1 U)^-1`` (``k x k``).

    ``model``, ``likelihood``, ``sigma_noise``, ``prior_precision``, ``prior_mean``,
    ``temperature``, ``enable_backprop``, ``dict_key_x``, ``dict_key_y`` are as for
    :class:`~laplace.baselaplace.BaseLaplace`.

    Args:
        backend: A ``curvlinops`` backend class (default ``CurvlinopsGGN``).
        backend_kwargs: Keyword arguments for the backend; may also hold the seven options
            below (not both there and as keywords).
        n_eigenvalues: The rank ``k`` (default ``min(100, n_params)``).
        lanczos_max_iter: Most Lanczos vectors kept (default ``min(n_params, max(3 k,
            k + 50))``); more cost memory but converge more eigenpairs.
        lanczos_tol: Relative residual tolerance of the Lanczos eigenpairs (default
            ``eps ** 0.75`` of the accumulation precision, float64 for float32 models: the
            Krylov basis and the curvature-vector products run in it).
        lanczos_seed: Seed of the random start vector, or start block of subspace
            iteration (default 0).
        eigensolver: ``"lanczos"`` (default), ``"subspace"`` (randomized subspace
            iteration, positive semi-definite curvatures only) or ``"auto"`` (module
            docstring); an :class:`~laplace.utils.enums.Eigensolver`.
        n_power_iterations: Subspace iteration's products before the Rayleigh-Ritz one
            (default 3: ``n_power_iterations + 1`` passes over the data in all).
        oversampling: Subspace iteration's vectors beyond ``k`` in the block (default 10).

    Attributes:
        eigenpair_residuals: After a fit by subspace iteration, the relative residuals
            ``||H u_j - l_j u_j|| / l_1`` of the ``k`` eigenpairs, ``(k,)``; None after a
            fit by Lanczos, whose pairs are certified to ``lanczos_tol`` (or it warns).

    Raises:
        ValueError: For a backend without curvature-vector products, an option given twice,
            ``n_eigenvalues`` outside ``[1, n_params]``, ``lanczos_max_iter`` below the rank,
            a bad tolerance, seed, eigensolver, ``n_power_iterations`` or ``oversampling``,
            or ``eigensolver="subspace"`` with an indefinite curvature (a Hessian); and as
            :class:`~laplace.baselaplace.BaseLaplace`.
    """

    def _unfitted_H(self) -> None:
        return None  # as in laplace-torch

    _structure = HessianStructure.LOWRANK
    _curvature_cls = LowRankCurvature

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
        n_eigenvalues: int | None = None,
        lanczos_max_iter: int | None = None,
        lanczos_tol: float | None = None,
        lanczos_seed: int | None = None,
        eigensolver: Eigensolver | str | None = None,
        n_power_iterations: int | None = None,
        oversampling: int | None = None,
    ) -> None:
        backend_kwargs = dict(backend_kwargs or {})
        values = (n_eigenvalues, lanczos_max_iter, lanczos_tol, lanczos_seed)
        values += (eigensolver, n_power_iterations, oversampling)
        keywords = dict(zip(_LANCZOS_OPTIONS + _SUBSPACE_OPTIONS, values))
        for name in keywords:
            if name in backend_kwargs:
                if keywords[name] is not None:
                    raise ValueError(
                        f"{name} was given both as a keyword and in backend_kwargs; give it once"
                    )
                keywords[name] = backend_kwargs.pop(name)
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
        )
        self._set_lanczos_options(*(keywords[name] for name in _LANCZOS_OPTIONS))
        self._set_subspace_options(*(keywords[name] for name in _SUBSPACE_OPTIONS))
        self.eigenpair_residuals: Tensor | None = None

    def _set_lanczos_options(
        self,
        n_eigenvalues: int | None,
        lanczos_max_iter: int | None,
        lanczos_tol: float | None,
        lanczos_seed: int | None,
    ) -> None:
        rank = min(_DEFAULT_RANK, self.n_params) if n_eigenvalues is None else n_eigenvalues
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.n_params:
            raise ValueError(
                f"n_eigenvalues must be an integer in [1, {self.n_params}] (the number of "
                f"parameters), got {n_eigenvalues!r}"
            )
        max_iter = (
            default_max_iter(self.n_params, rank) if lanczos_max_iter is None else lanczos_max_iter
        )
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < rank:
            raise ValueError(
                f"lanczos_max_iter must be an integer >= n_eigenvalues={rank}, got "
                f"{lanczos_max_iter!r}"
            )
        if lanczos_tol is not None and not (
            isinstance(lanczos_tol, float) and 0 < lanczos_tol < 1
        ):
            raise ValueError(f"lanczos_tol must be a float in (0, 1), got {lanczos_tol!r}")
        seed = 0 if lanczos_seed is None else lanczos_seed
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"lanczos_seed must be an integer, got {lanczos_seed!r}")
        self.n_eigenvalues = rank
        self.lanczos_max_iter = min(max_iter, self.n_params)
        self.lanczos_tol = lanczos_tol
        self.lanczos_seed = seed

    def _set_subspace_options(
        self,
        eigensolver: Eigensolver | str | None,
        n_power_iterations: int | None,
        oversampling: int | None,
    ) -> None:
        solver = parse_enum(
            Eigensolver, Eigensolver.LANCZOS if eigensolver is None else eigensolver, "eigensolver"
        )
        if solver is Eigensolver.SUBSPACE and not self._backend_cls.psd_curvature:
            raise ValueError(
                "eigensolver='subspace' needs a positive semi-definite curvature (subspace "
                "iteration finds the eigenvalues of largest magnitude), but "
                f"{self._backend_cls.__name__}'s is indefinite; use 'lanczos' or 'auto'"
            )
        self.n_power_iterations, self.oversampling = check_subspace_options(
            DEFAULT_POWER_ITERATIONS if n_power_iterations is None else n_power_iterations,
            DEFAULT_OVERSAMPLING if oversampling is None else oversampling,
        )
        self.eigensolver = solver

    def _check_backend(self, backend: type | None) -> type:
        from laplace.curvature import CurvlinopsGGN

        backend = CurvlinopsGGN if backend is None else backend
        if not isinstance(backend, type) or not callable(getattr(backend, "_operator_spec", None)):
            raise ValueError(
                "backend of LowRankLaplace must be a curvlinops backend class (CurvlinopsGGN, "
                f"CurvlinopsEF or CurvlinopsHessian) with curvature-vector products, got "
                f"{getattr(backend, '__name__', backend)!r}"
            )
        return backend

    def fit(
        self,
        train_loader: Any,
        override: bool = True,
        progress_bar: bool = False,
        *,
        distributed: bool | None = None,
    ) -> None:
        """Compute the loss and the top ``n_eigenvalues`` eigenpairs of the curvature.

        One pass over ``train_loader`` accumulates the loss, as for every
        :class:`~laplace.baselaplace.ParametricLaplace`; then, on the matrix-free route, each
        Lanczos step is one pass of curvature-vector products, and subspace iteration makes
        ``n_power_iterations + 1`` passes of block products. Sampled curvatures
        (``stochastic=True``) need a loader that yields the batches in the same order every
        time.

        Args:
            train_loader: Yields ``(X, y)`` or dict-like batches; ``len(train_loader.dataset)``
                is the number of data points.
            override: Must be ``True``.
            progress_bar: Show a progress bar over the batches of the loss pass, and one
                over the curvature products.
            distributed: As for ``ParametricLaplace.fit``: across the ranks of a process
                group, every rank runs the same Lanczos or subspace iteration on
                curvature products summed over the ranks (one ``all_reduce`` per Lanczos
                step or block product).

        Raises:
            ValueError: For ``override=False`` (an eigendecomposition cannot be updated with
                new data; refit on all of it), and as ``ParametricLaplace.fit``.
        """
        if not override:
            raise ValueError(
                "LowRankLaplace does not support fit(override=False): its eigendecomposition "
                "cannot be updated with new data; fit again on all the data"
            )
        super().fit(
            train_loader, override=True, progress_bar=progress_bar, distributed=distributed
        )

    def _fit(
        self,
        train_loader: Any,
        override: bool,
        progress_bar: bool,
        reduction: RankReduction | None = None,
    ) -> None:
        self._dense_sum = None
        if self._dense_route():
            dtype = self._accumulation_dtype
            n = self.n_params
            self._dense_sum = torch.zeros(n, n, device=self._device, dtype=dtype)
        try:
            super()._fit(train_loader, override, progress_bar, reduction)
            if self._dense_sum is not None and reduction is not None:
                reduction.sum_([self._dense_sum])
            self._curvature = self._eigen_curvature(train_loader, reduction, progress_bar)
        finally:
            self._dense_sum = None
        self._posterior_cache = None

    def _dense_route(self) -> bool:
        """Whether the dense curvature fits in half the memory budget
        (:mod:`laplace.utils.memory`): then one pass sums it, as for ``FullLaplace``, and the
        Lanczos iteration multiplies with it in memory instead of passing over the data."""
        itemsize = torch.empty((), dtype=self._accumulation_dtype).element_size()
        return self.n_params**2 * itemsize <= get_memory_budget() // 2

    def _curvature_step(self, X: Inputs, y: Tensor, n_data: int) -> tuple[Tensor, None]:
        """The batch loss; on the dense route the batch's curvature is added to the dense
        sum, otherwise the curvature is computed after the pass."""
        backend, options = self.backend, self._asdl_fisher_kwargs
        if self._dense_sum is not None:
            if _takes_out(backend.full):
                loss, _ = backend.full(X, y, N=n_data, out=self._dense_sum, **options)
            else:
                loss, H = backend.full(X, y, N=n_data, **options)
                self._dense_sum.add_(H.to(self._dense_sum.dtype))
            return loss, None
        with torch.no_grad():
            f = self.model(X)
        y = backend._check_targets(y, f)
        return backend.factor * backend.lossfunc(f, y), None

    def _finish_batches(self, H_new: Curvature, n_data: int) -> None:
        if self._dense_sum is not None:
            flush = getattr(self.backend, "flush_sums", None)
            if callable(flush):
                flush()
            if not torch.isfinite(self._dense_sum).all():
                raise ValueError(
                    "the curvature contains NaN or Inf values; check the model (outputs and "
                    "parameters) and the data for NaN, Inf or overflow"
                )

    def _merge_fit(self, H_new: Curvature, n_data: int) -> None:
        """Nothing to merge: ``fit`` replaces ``H`` after the loss pass."""

    def _reduce_curvature(self, H_new: Curvature, reduction: RankReduction) -> None:
        """Nothing to sum: the eigenpairs come from products summed over the ranks."""

    def _eigen_curvature(
        self, train_loader: Any, reduction: RankReduction | None = None, progress: bool = False
    ) -> LowRankCurvature:
        """The top eigenpairs by the dense or the matrix-free route (module docstring) and the
        eigensolver; with ``progress`` a bar counts the curvature products (passes over the
        data on the matrix-free route)."""
        self.eigenpair_residuals = None
        subspace = self._uses_subspace()
        if self._dense_sum is not None and not subspace and self.lanczos_max_iter >= self.n_params:
            # the Krylov space would be the whole space: the exact eigenpairs are cheaper
            eigenvalues, eigenvectors = torch.linalg.eigh(self._dense_sum)
            order = eigenvalues.argsort(descending=True)[: self.n_eigenvalues]
            return self._low_rank(eigenvalues[order], eigenvectors[:, order])
        products = self._curvature_products(train_loader, reduction)
        generator = torch.Generator(device=self._device).manual_seed(self.lanczos_seed)
        options = dict(device=self._device, dtype=self._accumulation_dtype, generator=generator)
        if subspace:
            return self._subspace_curvature(products, options, progress)
        bar = tqdm(total=self.lanczos_max_iter, desc="Lanczos", disable=not progress)
        with bar:
            eigenvalues, eigenvectors = lanczos_eigh(
                _counted(products, bar),
                self.n_params,
                self.n_eigenvalues,
                max_iter=self.lanczos_max_iter,
                tol=self.lanczos_tol,
                **options,  # the products run in the accumulation dtype (curvature_matvec)
            )
        return self._low_rank(eigenvalues, eigenvectors)

    def _subspace_curvature(
        self, products: Callable[[Tensor], Tensor], options: dict[str, Any], progress: bool
    ) -> LowRankCurvature:
        """The top eigenpairs by subspace iteration, keeping their residuals; a bar counts
        the block products."""
        passes = subspace_passes(
            self.n_params, self.n_eigenvalues, self.oversampling, self.n_power_iterations
        )
        with tqdm(total=passes, desc="Subspace iteration", disable=not progress) as bar:
            eigenvalues, eigenvectors, residuals = subspace_eigh(
                _counted(products, bar),
                self.n_params,
                self.n_eigenvalues,
                oversampling=self.oversampling,
                n_power_iterations=self.n_power_iterations,
                **options,
            )
        curvature = self._low_rank(eigenvalues, eigenvectors)
        self.eigenpair_residuals = residuals
        return curvature

    def _uses_subspace(self) -> bool:
        """Whether this fit runs subspace iteration (``"auto"``: see the module docstring)."""
        if self.eigensolver is Eigensolver.AUTO:
            return self._dense_sum is None and self._backend_cls.psd_curvature
        return self.eigensolver is Eigensolver.SUBSPACE

    def _curvature_products(
        self, train_loader: Any, reduction: RankReduction | None
    ) -> Callable[[Tensor], Tensor]:
        """``V -> H V`` for a vector or a block ``(params, b)``: with the dense sum in memory,
        or one pass over ``train_loader`` per product, summed over the ranks (one
        ``all_reduce`` per product) for a distributed fit."""
        if self._dense_sum is not None:
            dense = self._dense_sum
            return lambda v: dense @ v
        products = curvature_matvec(
            self.backend, train_loader, self.n_data, self._asdl_fisher_kwargs
        )
        return products if reduction is None else reduction.summed_matvec(products)

    def _low_rank(self, eigenvalues: Tensor, eigenvectors: Tensor) -> LowRankCurvature:
        curvature = LowRankCurvature(
            eigenvectors, self._clamp(eigenvalues), self.subset.sizes, dtype=self._dtype
        )
        curvature.assume_psd = self._backend_cls.psd_curvature
        return curvature

    def _clamp(self, eigenvalues: Tensor) -> Tensor:
        """Set negative eigenvalues to zero.

        They are round-off for a positive semi-definite curvature (GGN, Fisher); for another
        one (the Hessian) a warning is raised unless they are within round-off of zero.
        """
        roundoff = self.n_params * torch.finfo(eigenvalues.dtype).eps * eigenvalues.abs().max()
        smallest = eigenvalues.min()
        if not self._backend_cls.psd_curvature and smallest < -roundoff:
            warnings.warn(
                f"the curvature has negative eigenvalues among its top {self.n_eigenvalues} "
                f"(smallest {smallest.item():.4g}); they are set to zero",
                RuntimeWarning,
                stacklevel=3,
            )
        return eigenvalues.clamp(min=0)

    @property
    def V(self) -> Tensor:
        """``diag(p0)^-1 U``, ``(params, k)``: the Woodbury factor of the covariance."""
        return self.posterior.woodbury()[0]

    @property
    def Kinv(self) -> Tensor:
        """``(diag(l / (sigma^2 T))^-1 + U^T diag(p0)^-1 U)^-1``, ``(k, k)``.

        With it ``P^-1 = diag(p0)^-1 - V Kinv V^T``; computed stably for zero eigenvalues.
        """
        return self.posterior.woodbury()[1]

    @property
    def posterior_precision(self) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """``((U, l / (sigma^2 T)), p0)``: ``P = U diag(l / (sigma^2 T)) U^T + diag(p0)``."""
        return self.posterior.precision()


def _counted(matvec: Callable[[Tensor], Tensor], bar: tqdm) -> Callable[[Tensor], Tensor]:
    """``matvec`` advancing ``bar`` by one per product."""

    def counted(v: Tensor) -> Tensor:
        bar.update(1)
        return matvec(v)

    return counted
