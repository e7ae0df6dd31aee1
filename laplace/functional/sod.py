"""Subset-of-data Gaussian-process Laplace: :class:`FunctionalLaplace` and its last layer.

On ``M`` training points ``S`` drawn once from ``seed``, with Jacobians ``J_S`` stacked to
``(M * outputs, params)``, the GGN posterior precision of the weights is estimated as

    ``P = P0 + c J_S^T Lambda_S J_S / (sigma^2 T)``,    ``c = N / M``

(the subset's curvature reweighted to stand for all ``N`` points; ``c = 1`` when ``M = N``).
With a root ``Lambda_S = R^T R`` (block diagonal, one ``(k, outputs)`` block per point) and
the kernel ``K = J P0^-1 J^T``, Woodbury's identity gives everything in function space:

    ``J* P^-1 J*^T = K** - h K*S R^T B^-1 R KS*``,   ``B = I + h R K_SS R^T``,
    ``log det P - log det P0 = log det B``           (Sylvester's determinant identity),

with ``h = c / (sigma^2 T)``,

so the predictive covariance and the log marginal likelihood are those of the weight-space
``FullLaplace`` on the subset (exactly equal for ``M = N``), computed from ``(M k) x (M k)``
matrices. The prior may be scalar, layerwise or per parameter: ``K`` is a sum of per-layer
Gram matrices of the Jacobians divided by the layers' prior precisions (kept from ``fit``, so
a new prior costs no Jacobians); a per-parameter prior forms ``J_S diag(P0^-1) J_S^T``.

With ``independent_outputs=True`` the kernel between different outputs is dropped
(``k_cd = 0`` for ``c != d``) and ``Lambda_n`` is replaced by its diagonal: independent GPs
per output, the approximation laplace-torch offers.

References:
    Immer, Korzepa, Bauer. Improving predictions of Bayesian neural nets via local
    linearization. AISTATS 2021. Rasmussen & Williams. Gaussian processes for machine
    learning, 2006 (section 3.4: the stable form with ``B``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from laplace.evidence import EvidenceMixin
from laplace.functional.base import (
    BaseFunctionalLaplace,
    check_seed,
    checked_data_size,
    positive_int,
    subset_loader,
)
from laplace.last_layer import LastLayerMixin
from laplace.posterior.base import expand_prior
from laplace.utils.distributed import RankReduction
from laplace.utils.enums import Likelihood
from laplace.utils.feature_extractor import FeatureReduction
from laplace.utils.precision import gram

__all__ = ["FunctionalLaplace", "FunctionalLLLaplace"]


class _SubsetPosterior(NamedTuple):
    """The factors of the subset-of-data GP posterior, in the accumulation precision."""

    chol: Tensor  # (M k, M k): Cholesky factor of B = I + h R K_SS R^T
    R: Tensor  # (M, k, outputs): roots of the output Hessians

    def precise(self) -> AbstractContextManager[None]:
        """Nothing to switch: the factors are already in the accumulation precision."""
        return nullcontext()


class FunctionalLaplace(EvidenceMixin, BaseFunctionalLaplace):
    """Subset-of-data GP Laplace approximation over all trainable weights.

    ``model``, ``likelihood``, ``sigma_noise``, ``prior_precision``, ``prior_mean``,
    ``temperature``, ``enable_backprop``, ``dict_key_x``, ``dict_key_y``, ``backend``,
    ``backend_kwargs`` are as for :class:`~laplace.base.BaseLaplace`.

    Args:
        n_subset: Number of training points ``M`` the GP posterior conditions on.
        independent_outputs: One GP per output (see the module docstring).
        seed: Seed of the draw of the subset.

    Raises:
        ValueError: For a non-positive ``n_subset``, a bad seed, and as ``BaseLaplace``.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        n_subset: int,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        independent_outputs: bool = False,
        seed: int = 0,
    ) -> None:
        self.n_subset = positive_int(n_subset, "n_subset")
        check_seed(seed)
        self.independent_outputs = bool(independent_outputs)
        self.seed = seed
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
        if self.independent_outputs and self.likelihood == Likelihood.REWARD_MODELING:
            raise ValueError(
                "independent_outputs=True does not apply to likelihood='reward_modeling' (it "
                "fits two outputs per pair and predicts one)"
            )
        self._subset_jacobians: Tensor | None = None  # (M, outputs, params)
        self._roots: Tensor | None = None  # (M, k, outputs)
        self._layer_grams: Tensor | None = None  # (layers, M * outputs, M * outputs)
        self.subset_indices: Tensor | None = None

    # ----------------------------------------------------------------- fit
    def fit(
        self,
        train_loader: Any,
        override: bool = True,
        progress_bar: bool = False,
        *,
        distributed: bool | None = None,
    ) -> None:
        """Fit the GP posterior on ``n_subset`` points of ``train_loader.dataset``.

        One pass over the whole loader sums the training loss (for the marginal likelihood);
        the subset, drawn from ``seed``, is read from ``train_loader.dataset`` in batches of
        the loader's size (with its ``collate_fn``) for the Jacobians and output Hessians.
        A fit that raises leaves the object as it was.

        Args:
            train_loader: A ``DataLoader`` over a map-style dataset.
            override: Must be ``True`` (a subset-of-data posterior cannot be updated).
            progress_bar: Show progress bars over both passes.
            distributed: As for ``ParametricLaplace.fit``. Across the ranks of a process
                group every rank's loader must be over the same data set (a
                ``DistributedSampler`` shards it): the subset is drawn from it alike on every
                rank, and the loss pass is summed over the shards.

        Raises:
            ValueError: For ``override=False``, ``n_subset`` above the data set size, a loader
                without ``dataset``, and for bad data as ``ParametricLaplace.fit``; across
                ranks, for data sets of different sizes.
            RuntimeError: Across ranks, if the fit raised on another rank.
        """
        self._check_override(override, "the subset of data cannot be updated")
        reduction = RankReduction.resolve(distributed)
        with self._unchanged_on_failure():
            self._fit(train_loader, progress_bar, reduction)

    def _fit(
        self, train_loader: Any, progress_bar: bool, reduction: RankReduction | None = None
    ) -> None:
        n_data = checked_data_size(train_loader, self.n_subset, "n_subset")
        self.model.eval()
        self._prepare(train_loader)
        self.mean = self.subset.mean()
        if reduction is None:
            loss = self._loss_pass(train_loader, progress_bar)
        else:
            loss = self._loss_across_ranks(train_loader, progress_bar, n_data, reduction)
        generator = torch.Generator().manual_seed(self.seed)
        indices = torch.randperm(n_data, generator=generator)[: self.n_subset].sort().values
        Js, roots = self._subset_pass(subset_loader(train_loader, indices), progress_bar)
        self.subset_indices = indices
        self._subset_jacobians, self._roots = Js, roots
        self._layer_grams = self._grams(Js.flatten(0, 1), Js.flatten(0, 1))
        self._loss, self.n_data = loss, n_data
        self._fitted_across_ranks = reduction is not None
        self._posterior_cache = None

    def _loss_across_ranks(
        self, train_loader: Any, progress_bar: bool, n_data: int, reduction: RankReduction
    ) -> Tensor:
        """The loss pass over this rank's shard, summed over the ranks (one collective).

        Raises:
            ValueError: If the ranks' data sets differ in size (the sums of ``n`` and ``n^2``
                show it on every rank alike).
        """
        sums = reduction.sum_after(
            lambda: [self._loss_pass(train_loader, progress_bar), n_data, n_data**2],
            3,
            self._device,
            self._accumulation_dtype,
        )
        loss, n_sum, n_square_sum = sums
        if reduction.world_size * n_square_sum != n_sum**2:
            raise ValueError(
                f"{type(self).__name__} fits across ranks on one data set sharded by a "
                "DistributedSampler: every rank's len(train_loader.dataset) must be the same, "
                f"they sum to {int(n_sum)} over {reduction.world_size} ranks (this rank: "
                f"{n_data})"
            )
        return loss

    def _prepare(self, train_loader: Any) -> None:
        """Hook before the passes (the last-layer class finds its layer here)."""

    def _loss_pass(self, train_loader: Any, progress_bar: bool) -> Tensor:
        """``factor * sum_n loss_n`` over the whole loader, in the accumulation precision."""
        total, n_batches = torch.zeros((), dtype=self._accumulation_dtype), 0
        for batch in tqdm(train_loader, desc="fit: loss", disable=not progress_bar):
            X, y = self._checked_batch(batch, first=n_batches == 0)
            with torch.no_grad():
                f = self.model(X)
            self._check_output(f)
            y = self.backend._check_targets(y, f)
            loss = self.backend.factor * self.backend.lossfunc(f, y)
            total = total + loss.detach().to(self._accumulation_dtype).cpu()
            n_batches += 1
        if n_batches == 0:
            raise ValueError("train_loader yielded no batches")
        return total.to(self._device)

    def _subset_pass(self, loader: DataLoader, progress_bar: bool) -> tuple[Tensor, Tensor]:
        """Jacobians ``(M, outputs, params)`` and output-Hessian roots ``(M, k, outputs)``."""
        jacobians, roots = [], []
        for X, _ in self._batches(loader, "fit: subset", progress_bar):
            Js, f = self.subset.jacobians(self.backend, X, False)
            jacobians.append(Js.detach())
            roots.append(self._output_root(f.detach()))
        return torch.cat(jacobians), torch.cat(roots)

    def _output_root(self, f: Tensor) -> Tensor:
        """``R_n`` with ``R_n^T R_n = Lambda_n`` (the identity for regression; diagonal with
        ``independent_outputs``), in the accumulation precision.

        Shapes:
            ``(batch, outputs) -> (batch, k, outputs)``
        """
        f = f.to(self._accumulation_dtype)
        root = self.backend._output_root(f, self.backend.generator)
        if root is None:
            return torch.eye(f.shape[1], dtype=f.dtype, device=f.device).expand(f.shape[0], -1, -1)
        if self.independent_outputs:
            return torch.diag_embed(root.square().sum(1).sqrt())
        return root

    # ----------------------------------------------------------------- kernel
    def _grams(self, A: Tensor, B: Tensor) -> Tensor:
        """Per-layer Grams ``A_l B_l^T`` of Jacobian rows, in the accumulation precision.

        Shapes:
            ``A (n, params), B (m, params) -> (layers, n, m)``
        """
        dtype = self._accumulation_dtype
        pairs = zip(A.split(self.subset.sizes, dim=1), B.split(self.subset.sizes, dim=1))
        if A is B:
            return torch.stack([gram(a.mT, dtype) for a, _ in pairs])
        return torch.stack([a.to(dtype) @ b.to(dtype).mT for a, b in pairs])

    def _kernel(self, A: Tensor, B: Tensor, grams: Tensor | None = None) -> Tensor:
        """``A P0^-1 B^T`` for Jacobian rows ``A``, ``B``; from per-layer ``grams`` when given.

        Shapes:
            ``A (n, params), B (m, params) -> (n, m)``
        """
        prior = self.prior_precision.to(self._accumulation_dtype)
        if prior.numel() == self._n_posterior:  # per parameter: no per-layer shortcut
            variance = 1 / prior
            dtype = self._accumulation_dtype
            return (A.to(dtype) * variance) @ B.to(dtype).mT
        grams = self._grams(A, B) if grams is None else grams
        inverse = (1 / prior).expand(grams.shape[0])
        return torch.einsum("l,lnm->nm", inverse, grams)

    def _masked(self, K: Tensor, rows: int, cols: int) -> Tensor:
        """``K`` with the entries between different outputs zeroed (independent outputs)."""
        if not self.independent_outputs:
            return K
        C = self.n_outputs
        same = torch.eye(C, dtype=torch.bool, device=K.device)
        mask = same.repeat(rows, cols)
        return K * mask

    @property
    def gp_kernel_prior_variance(self) -> Tensor:
        """The prior variance ``1 / prior_precision`` of the kernel ``J P0^-1 J^T``."""
        return 1 / self.prior_precision

    # ----------------------------------------------------------------- posterior
    @property
    def _scale(self) -> Tensor:
        """``h = c / (sigma^2 T)``: the curvature factor with the subset reweighting."""
        return self._H_factor * (self.n_data / self.n_subset)

    @property
    def posterior(self) -> _SubsetPosterior:
        """The GP posterior for the current hyperparameters (cached): the Cholesky factor of
        ``B = I + h R K_SS R^T`` and the roots ``R``."""
        self._check_fitted()
        cache = self._posterior_cache
        if cache is None:
            M, C = self.n_subset, self.n_outputs
            K = self._masked(self._subset_kernel(), M, M)
            R = self._roots  # (M, k, C)
            k = R.shape[1]
            RK = torch.einsum("mkc,mcnd->mknd", R, K.reshape(M, C, M, C))
            RKR = torch.einsum("mknd,njd->mknj", RK, R).reshape(M * k, M * k)
            B = torch.eye(M * k, dtype=RKR.dtype, device=RKR.device) + self._scale * RKR
            cache = _SubsetPosterior(torch.linalg.cholesky(B), R)
            self._posterior_cache = cache
        return cache

    def _subset_kernel(self) -> Tensor:
        rows = self._subset_jacobians.flatten(0, 1)
        return self._kernel(rows, rows, self._layer_grams)

    def _log_det_ratio(self) -> Tensor:
        """``log det B = log det P - log det P0`` in the accumulation precision."""
        return 2 * self.posterior.chol.diagonal().log().sum()

    @property
    def log_det_posterior_precision(self) -> Tensor:
        return (self._log_det_ratio() + self._log_det_prior_precision()).to(self._dtype)

    def _moments_from(self, Js: Tensor, f_mu: Tensor, joint: bool) -> tuple[Tensor, Tensor]:
        self._check_fitted()
        batch, C = Js.shape[:2]
        M, C_fit = self._subset_jacobians.shape[:2]  # reward models: C_fit = 2, C = 1
        posterior = self.posterior
        rows = Js.flatten(0, 1)
        K_star = self._masked(self._kernel(rows, self._subset_jacobians.flatten(0, 1)), batch, M)
        # V = L^-1 sqrt(h) R K_S*, shape (M k, batch * C)
        RK = torch.einsum("mkc,mcb->mkb", posterior.R, K_star.mT.reshape(M, C_fit, -1))
        solved = torch.linalg.solve_triangular(
            posterior.chol, RK.reshape(-1, batch * C), upper=False
        )
        V = solved * self._scale.sqrt()
        dtype = f_mu.dtype
        if joint:
            K_joint = self._masked(self._kernel(rows, rows), batch, batch)
            return f_mu.reshape(-1), (K_joint - V.mT @ V).to(dtype)
        per_sample = V.reshape(V.shape[0], batch, C)
        reduction = torch.einsum("rbc,rbd->bcd", per_sample, per_sample)
        return f_mu, (self._self_kernel(Js) - reduction).to(dtype)

    def _function_deltas(self, n_samples: int, generator: torch.Generator | None) -> Tensor:
        """Weight-space samples ``delta`` with ``J(x) delta`` distributed as the GP posterior,
        by Matheron's rule (Wilson et al., ICML 2020): with ``A = R J_S`` the subset's
        whitened Jacobian rows, ``theta_0 ~ N(0, P0^-1)`` and ``eps ~ N(0, I / h)``,
        ``delta = theta_0 + h P0^-1 A^T B^-1 (eps - A theta_0)``, whose pushforward has the
        covariance ``K - h K_xS R^T B^-1 R K_Sx`` of :meth:`_moments_from`.

        Raises:
            NotImplementedError: With ``independent_outputs`` (its kernel is not of the form
                ``J P0^-1 J^T``).
        """
        if self.independent_outputs:
            raise NotImplementedError(
                "joint function samples need the kernel J P0^-1 J^T; independent_outputs "
                "drops its cross-output terms"
            )
        dtype, posterior = self._accumulation_dtype, self.posterior
        variance = expand_prior(1 / self.prior_precision.to(dtype), self.subset.sizes)
        A = torch.einsum("mkc,mcp->mkp", posterior.R, self._subset_jacobians.to(dtype))
        A = A.flatten(0, 1)
        device = variance.device
        theta_0 = torch.randn(n_samples, len(variance), generator=generator, device=device)
        theta_0 = theta_0.to(dtype) * variance.sqrt()
        noise = torch.randn(n_samples, A.shape[0], generator=generator, device=device)
        scale = self._scale.to(dtype)
        residual = noise.to(dtype) / scale.sqrt() - theta_0 @ A.mT
        solved = torch.cholesky_solve(residual.mT, posterior.chol).mT
        return (theta_0 + scale * (solved @ A) * variance).to(self._dtype)

    def _self_kernel(self, Js: Tensor) -> Tensor:
        """``k(x_b, x_b) = J_b P0^-1 J_b^T`` per input (diagonal with independent outputs).

        Shapes:
            ``(batch, outputs, params) -> (batch, outputs, outputs)``
        """
        dtype = self._accumulation_dtype
        variance = expand_prior(1 / self.prior_precision.to(dtype), self.subset.sizes)
        J = Js.to(dtype)
        K = torch.einsum("bcp,p,bdp->bcd", J, variance, J)
        return torch.diag_embed(K.diagonal(dim1=1, dim2=2)) if self.independent_outputs else K

    # ----------------------------------------------------------------- not applicable
    square_norm = BaseFunctionalLaplace.square_norm  # not EvidenceMixin's: no weight-space P
    log_prob = BaseFunctionalLaplace.log_prob

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers that restore the fitted approximation."""
        state = self._common_state()
        state.update(
            n_subset=self.n_subset,
            independent_outputs=self.independent_outputs,
            seed=self.seed,
            subset_indices=self.subset_indices,
            subset_jacobians=self._subset_jacobians,
            roots=self._roots,
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted approximation saved by :meth:`state_dict`.

        Raises:
            ValueError: If it was saved from another class, likelihood, model, subset size
                or output structure.
        """
        self._check_state(
            state_dict,
            {"n_subset": self.n_subset, "independent_outputs": self.independent_outputs},
        )
        device, dtype = self._device, self._dtype
        self.subset_indices = state_dict["subset_indices"]
        self._subset_jacobians = state_dict["subset_jacobians"].to(device=device, dtype=dtype)
        self._roots = state_dict["roots"].to(device=device, dtype=self._accumulation_dtype)
        rows = self._subset_jacobians.flatten(0, 1)
        self._layer_grams = self._grams(rows, rows)
        self._load_common_state(state_dict)


class FunctionalLLLaplace(LastLayerMixin, FunctionalLaplace):
    """Subset-of-data GP Laplace approximation over the last layer's weights.

    The kernel is ``J(x) P0^-1 J(x')^T`` of the last layer, whose Jacobians are the
    closed-form ``I ⊗ phi(x)`` (and the identity for the bias): the network's features
    ``phi`` come from one forward pass.

    ``likelihood``, ``n_subset``, ``sigma_noise``, ``prior_precision``, ``prior_mean``,
    ``temperature``, ``enable_backprop``, ``dict_key_x``, ``dict_key_y``, ``backend``,
    ``backend_kwargs``, ``independent_outputs``, ``seed`` are as for
    :class:`FunctionalLaplace`.

    Args:
        model: The network, or a :class:`~laplace.utils.feature_extractor.FeatureExtractor`.
        feature_reduction: Reduction of ``(batch, seq, dim)`` features (``"pick_first"``,
            ``"pick_last"``, ``"average"``); it must match how the model reduces its logits.
        last_layer_name: Name of the last layer; ``None`` finds it on the first batch.

    Raises:
        ValueError: As for :class:`FunctionalLaplace`, and for a ``last_layer_name`` that is
            no ``nn.Linear`` of the model.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        n_subset: int,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: FeatureReduction | str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        last_layer_name: str | None = None,
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        independent_outputs: bool = False,
        seed: int = 0,
    ) -> None:
        extractor = self._extractor(model, last_layer_name, enable_backprop, feature_reduction)
        super().__init__(
            extractor,
            likelihood,
            n_subset,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
            independent_outputs=independent_outputs,
            seed=seed,
        )

    def _prepare(self, train_loader: Any) -> None:
        """Find the last layer, then check the prior against it."""
        self._find_last_layer(train_loader)
        self._backend = None  # built for the found layer
        self.prior_precision = self.prior_precision
        self.prior_mean = self.prior_mean
