"""ELLA: the linearised Laplace approximation on a Nyström feature map of the kernel.

The kernel of the linearised network is ``k(x, x') = J(x) P0^-1 J(x')^T``. On ``M`` training
points drawn from ``seed``, take ``S`` rows of their Jacobians: one output per point, drawn
uniformly from ``seed + 1`` (as laplace-torch does), or every output (``all_outputs``);
``J_S`` is ``(S, params)`` with ``S = M`` or ``M * outputs``. With the top ``K``
eigenpairs ``K_SS = J_S P0^-1 J_S^T ~ V Lambda V^T`` (``K = n_eigenvalues``), the Nyström
feature map (:mod:`laplace.functional.nystrom`) is

    ``psi(x) = k(x, S) V Lambda^-1/2 = J(x) U``,    ``U = P0^-1 J_S^T V Lambda^-1/2``,

``(outputs, K)`` per input, with ``psi(x) psi(x')^T`` the rank-``K`` Nyström approximation
of ``k(x, x')``: ``K`` Jacobian-vector products, no Jacobian of the data set is formed.

Restrict the weights to ``theta = theta* + U w``. The prior ``N(mu0, P0^-1)`` becomes
``w ~ N(0, (U^T P0 U)^-1)``, and ``U^T P0 U = Lambda^-1/2 V^T K_SS V Lambda^-1/2 = I`` for
the prior of the fit: the features are already whitened. The GGN Laplace posterior of ``w``
from one pass over the ``N`` training points has precision

    ``A = U^T P0 U + h G``,    ``G = sum_n psi_n^T Lambda_n psi_n``,    ``h = 1 / (sigma^2 T)``

(``Lambda_n`` the Hessian of the loss in the outputs: ``diag(p) - p p^T`` for classification,
``I`` for regression), and the predictive of the outputs is ``N(f(x), psi(x) A^-1 psi(x)^T)``:
the GLM predictive of the GGN Laplace approximation restricted to the subspace
``theta* + span(U)``. With ``M = N`` and ``K`` the rank of ``K_SS`` it is the GLM predictive
of ``FullLaplace`` at the training inputs (the exact posterior covariance maps the span of the
training Jacobians into ``span(U)``, where the restriction is exact).

New hyperparameters after ``fit`` keep ``U`` and ``G``: ``sigma_noise`` and ``temperature``
change ``h``, and a new prior changes ``U^T P0 U`` (a sum of per-layer Grams of ``U``), an
``O(K^3)`` update. A scalar prior does not move the subspace (scaling ``P0`` scales
``K_SS``, not its eigenvectors), so this is exact for scalar priors; per-layer or
per-parameter priors keep the subspace of the prior of the fit.

Costs: ``fit`` holds the ``(S, params)`` Jacobians of the subsample, an ``S x S``
eigendecomposition, and ``U`` (``params x K``); its pass over the data costs ``K``
Jacobian-vector products per batch, ``jvp_chunk_size`` at a time (memory: that many copies
of a batch's activations). A prediction costs ``K`` Jacobian-vector products per batch and
``O(batch outputs K^2)``.

References:
    Deng, Zhou, Zhu. Accelerated linearized Laplace approximation for Bayesian deep
    learning. NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from laplace.curvature._fallback import math_attention
from laplace.functional.base import (
    BaseFunctionalLaplace,
    check_seed,
    copy_history,
    positive_int,
    subset_loader,
)
from laplace.functional.nystrom import (
    FeaturePosterior,
    draw_subsample,
    jvp_features,
    lacks_forward_mode,
    nystrom_directions,
)
from laplace.functional.validation import grid_search, mean_nll
from laplace.posterior.base import expand_prior
from laplace.utils.data import Inputs, check_finite_inputs
from laplace.utils.distributed import refuse_across_ranks
from laplace.utils.enums import Likelihood, LinkApprox, PredType, TuningMethod, parse_enum
from laplace.utils.precision import gram

__all__ = ["ELLA"]

Features = list[tuple[Tensor, Tensor, Tensor]]
"""``(psi, f, y)`` of each batch of a loader: what a validation score needs."""


class ELLA(BaseFunctionalLaplace):
    """Accelerated linearised Laplace (Deng et al., 2022) over all trainable weights.

    See the module docstring for the approximation and its costs.

    ``model``, ``likelihood``, ``sigma_noise``, ``prior_precision``, ``prior_mean``,
    ``temperature``, ``enable_backprop``, ``dict_key_x``, ``dict_key_y``, ``backend``,
    ``backend_kwargs`` are as for :class:`~laplace.base.BaseLaplace`; ``backend`` computes the
    Jacobians of the subsample (and the features of models without forward-mode autodiff). The
    prior mean does not enter the predictive.

    Args:
        subsample_size: Number ``M`` of training points of the Nyström basis.
        n_eigenvalues: Number ``K`` of kernel eigenpairs (features) kept: at most
            ``subsample_size``, or ``subsample_size * outputs`` with ``all_outputs``.
        seed: Seed of the subsample (``seed``) and of its output rows (``seed + 1``).
        all_outputs: Use every output of each subsample point (``M * outputs`` kernel rows)
            instead of one drawn at random (laplace-torch's choice).

    Attributes:
        dual_directions: ``U``, ``(params, K)``; ``None`` before ``fit``.
        feature_gram: ``G``, ``(K, K)`` in the accumulation precision.
        fit_history_: ``processed_examples`` (cumulative count after each batch of the pass),
            ``val_nll`` (validation NLL during ``fit``), ``tuning`` (candidates tried by
            :meth:`optimize_hyperparameters` and their validation NLL).

    Raises:
        ValueError: For a non-positive ``subsample_size`` or ``n_eigenvalues``,
            ``n_eigenvalues > subsample_size`` (without ``all_outputs``), a non-integer
            ``seed``, and as ``BaseLaplace``.
    """

    jvp_chunk_size: int = 32
    """Columns of ``U`` pushed through the network together (one ``vmap`` of ``jvp``)."""
    _no_marginal_likelihood = (
        "ELLA has no marginal likelihood (as in laplace-torch); tune the prior precision on "
        "validation data with optimize_prior_precision(method='gridsearch', val_loader=...) "
        "or optimize_hyperparameters(val_loader, grid), or use FunctionalLaplace for a "
        "marginal likelihood"
    )
    _no_log_likelihood = (
        "ELLA does not accumulate the training log likelihood; use FunctionalLaplace or a "
        "weight-space Laplace for it"
    )

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        subsample_size: int,
        n_eigenvalues: int,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        seed: int = 1234,
        all_outputs: bool = False,
    ) -> None:
        self.subsample_size = positive_int(subsample_size, "subsample_size")
        self.n_eigenvalues = positive_int(n_eigenvalues, "n_eigenvalues")
        if not all_outputs and n_eigenvalues > subsample_size:
            raise ValueError(
                f"n_eigenvalues must be at most subsample_size={subsample_size} (one kernel "
                f"row per subsample point; all_outputs=True allows up to subsample_size * "
                f"outputs), got {n_eigenvalues}"
            )
        check_seed(seed)
        self.seed = seed
        self.all_outputs = bool(all_outputs)
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
        self.dual_directions: Tensor | None = None
        self.feature_gram: Tensor | None = None
        self._direction_grams: Tensor | None = None  # (layers, K, K): U_l^T U_l
        self.subsample_indices: Tensor | None = None
        self._reverse_mode_features = False  # set where the model has no forward mode
        self.fit_history_: dict[str, list[Any]] = _empty_history()

    # ----------------------------------------------------------------- fit
    def fit(
        self,
        train_loader: Any,
        *,
        override: bool = True,
        val_loader: Iterable | None = None,
        val_steps: int | None = None,
        balanced: bool = False,
        progress_bar: bool = False,
        distributed: bool | None = None,
    ) -> None:
        """Build the Nyström basis from a subsample and the posterior from one pass.

        The subsample is read from ``train_loader.dataset`` in batches of the loader's size
        (with its ``collate_fn``). A fit that raises leaves the object as it was.

        Args:
            train_loader: A ``DataLoader`` over a map-style dataset.
            override: Must be ``True`` (the basis cannot be updated).
            val_loader: If given, the validation NLL (see :meth:`optimize_hyperparameters`)
                is recorded in ``fit_history_["val_nll"]`` at the end of the pass, and
                every ``val_steps`` batches during it, from the data seen so far.
            val_steps: Evaluate on ``val_loader`` every this many batches.
            balanced: Draw the subsample round-robin over the classes (classification and
                reward modelling), each class in an order drawn from ``seed``.
            progress_bar: Show a progress bar over the pass.
            distributed: Must resolve to a fit per rank: False, or None without a process
                group of several ranks (ELLA does not sum its fit over ranks).

        Raises:
            ValueError: For ``override=False``, a bad ``val_steps``, ``balanced`` for
                regression, ``subsample_size`` above the data set size, ``n_eigenvalues``
                above the number of kernel rows or the numerical rank of the subsample's
                kernel, for bad data, and within a process group of several ranks unless
                ``distributed=False``.
        """
        refuse_across_ranks(
            type(self).__name__, distributed, "summing its Gram over the ranks is not implemented"
        )
        self._check_override(override, "its Nyström basis cannot be updated")
        if val_steps is not None:
            positive_int(val_steps, "val_steps")
        if balanced and self.likelihood == Likelihood.REGRESSION:
            raise ValueError(
                "balanced=True draws the subsample evenly over the classes, so it needs "
                "likelihood='classification' or 'reward_modeling', got 'regression'"
            )
        with self._unchanged_on_failure():
            self.model.eval()
            self.mean = self.subset.mean()
            keys = (self.dict_key_x, self.dict_key_y)
            indices = draw_subsample(train_loader, self.subsample_size, self.seed, balanced, keys)
            self._build_basis(train_loader, indices)
            self._accumulate(train_loader, val_loader, val_steps, progress_bar)

    def _build_basis(self, train_loader: Any, indices: Tensor) -> None:
        """``U`` and its per-layer Grams from the kernel of the subsample's Jacobian rows."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        rows = []
        for X, _ in self._batches(subset_loader(train_loader, indices), "fit: basis"):
            Js, f = self.subset.jacobians(self.backend, X, False)
            self._check_output(f)
            if self.all_outputs:
                rows.append(Js.flatten(0, 1))
            else:
                picked = torch.randint(f.shape[1], (f.shape[0],), generator=generator)
                rows.append(Js[torch.arange(len(picked), device=Js.device), picked.to(Js.device)])
        J_S = torch.cat(rows).to(self._accumulation_dtype)
        if self.n_eigenvalues > len(J_S):
            raise ValueError(
                f"n_eigenvalues must be at most the {len(J_S)} kernel rows of the "
                f"subsample (subsample_size={self.subsample_size} x outputs={self.n_outputs}), "
                f"got {self.n_eigenvalues}"
            )
        variance = expand_prior(1 / self.prior_precision.to(J_S.dtype), self.subset.sizes)
        U = nystrom_directions(J_S, variance, self.n_eigenvalues, self._dtype)
        self._set_directions(U.to(self._dtype))
        self.subsample_indices = indices

    def _set_directions(self, U: Tensor) -> None:
        """Keep ``U`` and its per-layer Grams ``U_l^T U_l``."""
        self.dual_directions = U
        blocks = U.split(self.subset.sizes)
        self._direction_grams = torch.stack([gram(b, self._accumulation_dtype) for b in blocks])

    def _accumulate(
        self, train_loader: Any, val_loader: Iterable | None, val_steps: int | None, progress: bool
    ) -> None:
        """The pass over the training data: ``G``, ``n_data`` and the validation history."""
        K, dtype = self.n_eigenvalues, self._accumulation_dtype
        self.feature_gram = torch.zeros(K, K, dtype=dtype, device=self._device)
        self.fit_history_, self.n_data = _empty_history(), 0
        val_features, evaluated = None, False
        for step, (X, y) in enumerate(self._batches(train_loader, "fit: ELLA", progress), 1):
            psi, f = (t.detach() for t in self._features(X))
            self.backend._check_targets(y, f)
            root = self.backend._output_root(f.to(dtype), self.backend.generator)
            rows = psi.to(dtype) if root is None else root @ psi.to(dtype)
            gram(rows.flatten(0, 1), dtype, out=self.feature_gram)
            self.n_data += f.shape[0]
            self.fit_history_["processed_examples"].append(float(self.n_data))
            evaluated = val_loader is not None and val_steps is not None and step % val_steps == 0
            if evaluated:
                val_features = self._record_val_nll(val_loader, val_features)
        if self.n_data == 0:
            raise ValueError("train_loader yielded no batches")
        self._posterior_cache = None
        if val_loader is not None and not evaluated:
            self._record_val_nll(val_loader, val_features)

    def _record_val_nll(self, val_loader: Iterable, features: Features | None) -> Features:
        """Record the validation NLL for the ``G`` summed so far; the features of
        ``val_loader`` are computed on first use and returned."""
        features = self._validation_features(val_loader) if features is None else features
        self._posterior_cache = None
        self.fit_history_["val_nll"].append(self._validation_nll(features))
        return features

    # ----------------------------------------------------------------- features
    def _features(self, X: Inputs) -> tuple[Tensor, Tensor]:
        """``psi(X) = J(X) U`` by Jacobian-vector products, and the model output.

        ``vmap`` over chunks of columns of ``U``, a loop over the columns where the model
        cannot be vmapped, and the backend's Jacobians times ``U`` where it has no
        forward-mode derivative.

        Shapes:
            ``-> (batch, outputs, K), (batch, outputs)``
        """
        if not self.enable_backprop:
            check_finite_inputs(X)
        context = nullcontext() if self.enable_backprop else torch.no_grad()
        with context:
            if not self._reverse_mode_features:
                try:
                    return math_attention(self.model, lambda: self._jvp_features(X))
                except (RuntimeError, NotImplementedError) as error:
                    if not lacks_forward_mode(error):
                        raise
                    self._reverse_mode_features = True
            Js, f = self._jacobians(X)
            self._check_output(f)
            return Js @ self.dual_directions, f

    def _jvp_features(self, X: Inputs) -> tuple[Tensor, Tensor]:
        """:meth:`_features` by ``torch.func.jvp``, one column of ``U`` per tangent."""
        return jvp_features(
            self.model, self.subset.named_params, self.subset.sizes, self.dual_directions, X,
            self.jvp_chunk_size, self._check_output,
        )  # fmt: skip

    # ----------------------------------------------------------------- posterior
    @property
    def posterior(self) -> FeaturePosterior:
        """The posterior of the feature weights for the current hyperparameters (cached)."""
        self._check_fitted()
        if self._posterior_cache is None:
            precision = self._feature_prior() + self._H_factor * self.feature_gram
            self._posterior_cache = FeaturePosterior(precision, self._dtype)
        return self._posterior_cache

    def _feature_prior(self) -> Tensor:
        """``U^T P0 U`` in the accumulation precision (the identity for the fit's prior)."""
        prior = self.prior_precision.to(self._accumulation_dtype)
        if prior.numel() == self._n_posterior:
            U = self.dual_directions.to(prior.dtype)
            return (U * prior[:, None]).mT @ U
        return torch.einsum("l,lkj->kj", prior.expand(self._n_blocks), self._direction_grams)

    def _glm_predictive_distribution(
        self, X: Inputs, joint: bool = False
    ) -> tuple[Tensor, Tensor]:
        psi, f_mu = self._features(X)
        f_var = self.posterior.covariance(psi, joint)
        return (f_mu.reshape(-1) if joint else f_mu), f_var

    def _kernel_row_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        return (self.n_outputs or 1) * self.dual_directions.shape[1] * itemsize

    def _kernel_rows_and_outputs(self, X: Inputs) -> tuple[Tensor, Tensor]:
        """The features ``psi = J U`` (the kernel is ``psi Sigma psi^T``) and outputs."""
        return self._features(X)

    def _kernel_cross(self, R1: Tensor, R2: Tensor) -> Tensor:
        root = self.posterior.inverse_root  # L^-1 with L L^T = A
        Z1, Z2 = (R.flatten(0, 1).to(root.dtype) @ root.mT for R in (R1, R2))
        return (Z1 @ Z2.mT).to(self._dtype)

    def _function_deltas(self, n_samples: int, generator: torch.Generator | None) -> Tensor:
        """Feature weights ``w ~ N(0, A^-1)`` (``psi(x) w`` is a posterior function)."""
        root = self.posterior.inverse_root  # L^-1, so z L^-1 has covariance A^-1
        noise = torch.randn(n_samples, root.shape[0], generator=generator, device=root.device)
        return (noise.to(root.dtype) @ root).to(self._dtype)

    def _moments_from(self, Js: Tensor, f_mu: Tensor, joint: bool) -> tuple[Tensor, Tensor]:
        if Js.ndim != 3 or Js.shape[-1] != self.n_params:
            raise ValueError(
                f"Jacobians must have shape (batch, outputs, {self.n_params}), "
                f"got {tuple(Js.shape)}"
            )
        f_var = self.posterior.covariance(Js.to(self._dtype) @ self.dual_directions, joint)
        return (f_mu.reshape(-1) if joint else f_mu), f_var

    # ----------------------------------------------------------------- tuning
    def _validation_features(self, loader: Iterable) -> Features:
        """``(psi, f, y)`` per batch: the prior-independent part of the validation NLL."""
        batches = self._batches(loader, "val", False)
        features = [(*(t.detach() for t in self._features(X)), y) for X, y in batches]
        if not features:
            raise ValueError("val_loader yielded no batches")
        return features

    def _validation_nll(
        self, features: Features, link_approx: LinkApprox = LinkApprox.PROBIT, n_samples: int = 100
    ) -> float:
        """Mean negative log predictive density per validation example
        (:func:`~laplace.functional.validation.mean_nll`)."""
        moments = ((f, self.posterior.covariance(psi), y) for psi, f, y in features)
        check_targets = self.backend._check_targets
        return mean_nll(
            self.likelihood, moments, self.sigma_noise, check_targets, link_approx, n_samples
        )

    def optimize_hyperparameters(self, val_loader: Iterable, grid: Iterable) -> None:
        """Set the prior precision (and noise) with the lowest validation NLL of a grid.

        Args:
            val_loader: Validation batches ``(X, y)`` or dict-like.
            grid: Prior precisions, or ``(prior_precision, sigma_noise)`` pairs
                (regression). Each candidate is recorded in ``fit_history_["tuning"]``;
                the first of equal scores wins.

        Raises:
            ValueError: If not fitted, for an empty grid, or if no candidate has a finite
                validation NLL (the hyperparameters are then left as they were).
        """
        self._check_fitted()
        features = self._validation_features(val_loader)
        score = partial(self._validation_nll, features)
        grid_search(self, grid, score, self.fit_history_["tuning"])

    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GP,
        method: TuningMethod | str = TuningMethod.GRIDSEARCH,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: Any = "scalar",
        val_loader: Iterable | None = None,
        loss: Any = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Grid search of a scalar prior precision on ``val_loader``.

        ``grid_size`` precisions spaced logarithmically between ``base**log_prior_prec_min``
        and ``base**log_prior_prec_max`` are scored by the validation NLL (as
        :meth:`optimize_hyperparameters`, with ``link_approx`` for classification).
        ``n_steps``, ``lr``, ``init_prior_prec`` and ``prior_structure`` belong to the
        marginal likelihood and are ignored.

        Raises:
            NotImplementedError: For ``method='marglik'`` (ELLA has no marginal likelihood)
                and a ``loss``.
            ValueError: If not fitted, for ``pred_type='nn'``, a missing ``val_loader`` or a
                non-positive ``grid_size``.
        """
        method = parse_enum(TuningMethod, method, "method")
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        link_approx = parse_enum(LinkApprox, link_approx, "link_approx")
        if method == TuningMethod.MARGLIK:
            raise NotImplementedError(self._no_marginal_likelihood)
        if loss is not None:
            raise NotImplementedError(
                "ELLA scores the grid by the validation NLL (as laplace-torch does); loss= is "
                f"not supported, got {loss!r}"
            )
        self._check_predict_args(pred_type, n_samples, None)
        grid = self._prior_grid(
            val_loader, log_prior_prec_min, log_prior_prec_max, grid_size, log_prior_prec_base
        )
        grid = tqdm(grid, desc="gridsearch", disable=not progress_bar)
        features = self._validation_features(val_loader)
        score = partial(self._validation_nll, features, link_approx, n_samples)
        grid_search(self, grid, score, self.fit_history_["tuning"])
        if verbose:
            print(f"optimized prior precision: {self.prior_precision}")

    # ----------------------------------------------------------------- state
    def _configuration(self) -> dict[str, Any]:
        """What a saved state must match (besides the class, likelihood and model)."""
        return {
            "subsample_size": self.subsample_size,
            "n_eigenvalues": self.n_eigenvalues,
            "all_outputs": self.all_outputs,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers that restore the fitted approximation."""
        self._check_fitted()
        return {
            **self._state_identity(self._configuration()),
            "seed": self.seed,
            "mean": self.mean.detach(),
            "dual_directions": self.dual_directions,
            "feature_gram": self.feature_gram,
            "subsample_indices": self.subsample_indices,
            **self._hyperparameter_state(),
            "fit_history": copy_history(self.fit_history_),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted approximation saved by :meth:`state_dict`.

        Raises:
            ValueError: If it was saved from another class, likelihood, model, subsample or
                number of eigenvalues.
        """
        self._check_state(state_dict, self._configuration())
        device, dtype = self._device, self._dtype
        self.seed = state_dict["seed"]
        self.mean = state_dict["mean"].to(device=device, dtype=dtype)
        self._set_directions(state_dict["dual_directions"].to(device=device, dtype=dtype))
        self.feature_gram = state_dict["feature_gram"].to(device, self._accumulation_dtype)
        self.subsample_indices = state_dict["subsample_indices"]
        self._load_hyperparameters(state_dict)
        self.fit_history_ = copy_history(state_dict["fit_history"])
        self._posterior_cache = None


def _empty_history() -> dict[str, list[Any]]:
    return {"processed_examples": [], "val_nll": [], "tuning": []}
