"""Last-layer Laplace approximations (Kristiadi, Hein & Hennig, ICML 2020).

Only the parameters of the network's last ``nn.Linear`` layer ``f = W phi + b`` are
probabilistic; everything before it is a fixed feature map ``phi(x)``. The public classes are
declarations over :class:`~laplace.baselaplace.ParametricLaplace`, the
:class:`~laplace.subsets.LastLayer` subset and a structure, and every computation uses the
linear form of the layer so that nothing grows with ``outputs x params``:

- ``fit`` runs one forward pass per batch and forms the generalized Gauss-Newton curvature
  in closed form from ``phi`` and the Hessian ``Lambda_n`` of the loss w.r.t. the output
  (``J_n = [I ⊗ phi_n^T, I]``, so ``J_n^T Lambda_n J_n = Lambda_n ⊗ [phi_n, 1][phi_n, 1]^T``):
  the dense matrix, its diagonal ``diag(Lambda_n) ⊗ phi_n^2``, or the K-FAC factors
  ``B = sum_n Lambda_n`` and ``A = sum_n phi_n phi_n^T / N``
  (:mod:`laplace.curvature.linear`, which also explains how the softmax Hessians are summed
  without cancellation). This applies to the GGN backends (exact or Monte-Carlo); other
  backends (empirical Fisher, Hessian) are asked for the curvature of the last layer on the
  features.
- the GLM predictive variance is a quadratic form in ``phi`` per output pair
  (``inv_quad_linear`` of the posterior structures), and only its diagonal is computed when
  only the diagonal is used (probit, ``functional_variance_fast``, diagonal outputs).
- the sampling predictive applies the last layer at every weight sample to features
  computed once.

When ``last_layer_name`` is not given, the last layer is found with the first batch of
``fit``; until then the number of parameters is unknown and the prior precision and mean are
checked against it only then.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace, ParametricLaplace
from laplace.curvature._kfac import PendingRows
from laplace.curvature.linear import (
    OutputCurvature,
    computes_ggn,
    laplacian,
    linear_diag_ggn,
    linear_full_ggn,
    linear_kron_ggn,
    output_curvature,
)
from laplace.last_layer import LastLayerMixin
from laplace.posterior.base import Curvature
from laplace.utils.data import (
    Inputs,
    all_finite,
    check_finite_inputs,
)
from laplace.utils.distributed import RankReduction
from laplace.utils.enums import Likelihood
from laplace.utils.feature_extractor import FeatureReduction
from laplace.utils.matrix import Kron

__all__ = [
    "LLLaplace",
    "FullLLLaplace",
    "KronLLLaplace",
    "DiagLLLaplace",
    "FunctionalLLLaplace",
]


def _check_finite(curvature: Tensor | Kron) -> Tensor | Kron:
    """Return ``curvature``, or raise if it has NaN or Inf entries (see :func:`all_finite`).

    Raises:
        ValueError: If an entry is not finite.
    """
    tensors = [f for fs in curvature.kfacs for f in fs] if isinstance(curvature, Kron) else []
    if not all(all_finite(t) for t in tensors or [curvature]):
        raise ValueError(
            "the curvature contains NaN or Inf values; check the model (outputs and "
            "parameters) and the data for NaN, Inf or overflow"
        )
    return curvature


class LLLaplace(LastLayerMixin, ParametricLaplace):
    """Laplace approximation over the parameters of the last ``nn.Linear`` layer.

    Subclasses declare the structure (and the closed-form curvature ``_linear_curvature``).
    See :class:`~laplace.baselaplace.BaseLaplace` for the common arguments.

    Args:
        model: The network, or a :class:`~laplace.utils.feature_extractor.FeatureExtractor`
            (whose ``enable_backprop``, and ``last_layer_name`` and ``feature_reduction``
            when given, are then set to this object's; the extractor holds
            ``enable_backprop`` from then on).
        feature_reduction: Reduction of ``(batch, seq, dim)`` features:
            ``"pick_first"``, ``"pick_last"``, ``"average"`` or ``None``; it must match how
            the model reduces its logits.
        last_layer_name: Name of the last layer; ``None`` finds it on the first batch of
            ``fit``.

    Raises:
        ValueError: As for :class:`~laplace.baselaplace.BaseLaplace`, and for a
            ``last_layer_name`` that is no ``nn.Linear`` of the model or an unknown
            ``feature_reduction``.
    """

    _linear_curvature: ClassVar[Callable[..., Tensor | Kron]]

    def _unfitted_H(self) -> Tensor | Kron | None:
        """Zeros once the last layer is known (by name), None before, as in laplace-torch."""
        return super()._unfitted_H() if self.subset.ready else None

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: FeatureReduction | str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        last_layer_name: str | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        **structure_kwargs: Any,
    ) -> None:
        extractor = self._extractor(model, last_layer_name, enable_backprop, feature_reduction)
        super().__init__(
            extractor,
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
            asdl_fisher_kwargs=asdl_fisher_kwargs,
            **structure_kwargs,
        )

    _whole_backend: Any = None
    _folded_fit: bool | None = None
    """Whether the model folds rows into the last layer's batch; None until a fit sees it."""

    def _adopt_last_layer(self) -> None:
        """Check the deferred prior against the now known last layer and take its mean."""
        self._backend = self._whole_backend = None
        self.prior_precision = self._prior_precision
        self.prior_mean = self._prior_mean
        self.mean = self.subset.mean()

    def _prior_mean_vector(self) -> Tensor | None:
        """The prior mean as a ``(params,)`` vector; None while the last layer is unknown."""
        if not self.subset.ready:
            return None
        return super()._prior_mean_vector()

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        train_loader: Any,
        override: bool = True,
        progress_bar: bool = False,
        *,
        distributed: bool | None = None,
    ) -> None:
        """Fit the curvature of the last layer; finds it on the first batch if not known.

        Across the ranks of a process group (``distributed``, as for
        :meth:`ParametricLaplace.fit`) the closed-form sums over the features are summed
        over the ranks like every other curvature.

        Raises:
            ValueError: As :meth:`ParametricLaplace.fit`, for a model without an
                ``nn.Linear`` last layer, or a prior that does not fit the last layer.
        """
        super().fit(
            train_loader, override=override, progress_bar=progress_bar, distributed=distributed
        )

    def _fit(
        self,
        train_loader: Any,
        override: bool,
        progress_bar: bool,
        reduction: RankReduction | None = None,
    ) -> None:
        self._find_last_layer(train_loader)
        if self._mean is None:
            self._adopt_last_layer()
        self._folded_fit = None  # known after the first batch
        super()._fit(train_loader, override, progress_bar, reduction)

    def _set_n_outputs(self, X: Inputs) -> None:
        n_outputs = self.subset.layer.out_features
        if self.n_outputs is not None and n_outputs != self.n_outputs:
            raise ValueError(
                f"model now has {n_outputs} outputs, was fitted with {self.n_outputs}"
            )
        self.n_outputs = n_outputs

    def _closed_form(self) -> bool:
        """Whether the GGN comes in closed form from the features: a GGN backend and a
        trainable last-layer weight (with or without its bias)."""
        return self.subset.linear_bias() is not None and computes_ggn(self.backend)

    def _linear_step(self, X: Inputs, y: Tensor) -> tuple[Tensor, Tensor, OutputCurvature] | None:
        """``(loss, phi, Lambda)`` of a batch from one forward pass; None if the model folds
        several rows per sample into the last layer's batch, or its output is not the last
        layer applied to the (reduced) features (see :meth:`_curvature_step`).

        Raises:
            ValueError: For an output that does not match the last layer, or bad targets.
        """
        backend = self.backend
        f, phi = self.subset.features(X)
        if f.shape != (phi.shape[0], self.n_outputs):
            if self._folds(f, phi):
                return None
            raise ValueError(
                f"model output must have shape (batch, outputs) = ({phi.shape[0]}, "
                f"{self.n_outputs}) like the last layer's, got {tuple(f.shape)}"
            )
        if not self.subset.applies_layer(f, phi):
            return None
        y = backend._check_targets(y, f)
        options = backend.curvature_options(self._structure, self._asdl_fisher_kwargs)
        lam = output_curvature(backend, f, options)
        return backend.factor * backend.lossfunc(f, y), phi, lam

    def _folds(self, f: Tensor, phi: Tensor) -> bool:
        """Whether the last layer sees ``R > 1`` rows per sample whose outputs the model
        reshapes into one output row (a Bradley-Terry reward model scoring a pair)."""
        rows = phi.shape[0] if phi.ndim == 2 else -1
        return f.ndim == 2 and rows > f.shape[0] and f.numel() == rows * self.n_outputs

    def _curvature_step(self, X: Inputs, y: Tensor, n_data: int) -> tuple[Tensor, Any]:
        """Closed-form GGN from one forward pass; other backends are asked directly.

        A model that folds several rows per sample into the last layer's batch (its output
        is the last layer's reshaped) couples those rows through the loss, and a model whose
        output is not the last layer applied to the reduced features (a sequence classifier
        pooling at the last real token of right-padded inputs, with ``pick_last``) has no
        closed form from them: their curvature is that of the whole network w.r.t. the
        last-layer parameters, computed by the backend on the whole model (as
        ``laplace-torch`` does).
        """
        if self._closed_form():
            step = self._linear_step(X, y)
            if step is not None:
                loss, phi, lam = step
                bias = self.subset.linear_bias()
                factor = self.backend.factor
                H = type(self)._linear_curvature(phi, lam, bias=bias, n_data=n_data, factor=factor)
                return loss, _check_finite(H)
        elif not self._fit_folds(X):
            return super()._curvature_step(X, y, n_data)
        method = getattr(self._whole_model_backend(), self._structure.value)
        return method(X, y, N=n_data, **self._asdl_fisher_kwargs)

    def _sums_in_place(self) -> bool:
        return False  # the closed forms and the folded path go through _curvature_step

    def _fit_folds(self, X: Inputs) -> bool:
        """:meth:`_folds` on the first batch of a fit (one extra forward pass per fit, for
        backends without the closed form), remembered for the other batches."""
        if self._folded_fit is None:
            f, phi = self.subset.features(X)
            self._folded_fit = self._folds(f, phi) or not self.subset.applies_layer(f, phi)
        return self._folded_fit

    def _whole_model_backend(self) -> Any:
        """A backend on the whole model that differentiates the last-layer parameters only.

        The other parameters are marked ``requires_grad=False`` while the backend is built
        (it takes the trainable parameters it finds) and restored at once.
        """
        if self._whole_backend is None:
            mine = {id(p) for p in self.params}
            others = [p for p in self.model.parameters() if p.requires_grad and id(p) not in mine]
            for p in others:
                p.requires_grad_(False)
            try:
                self._whole_backend = self._make_backend(self.model)
            finally:
                for p in others:
                    p.requires_grad_(True)
        return self._whole_backend

    # ------------------------------------------------------------------ predictive
    def _features_for_predictive(self, X: Inputs) -> tuple[Tensor, Tensor]:
        self._check_fitted()
        if not self.enable_backprop:
            check_finite_inputs(X)
        f, phi = self._memo("features", X, lambda: self.subset.features(X, self.enable_backprop))
        if self._folds(f, phi):
            raise ValueError(
                f"the model folds {phi.shape[0] // f.shape[0]} rows per sample into the last "
                "layer's batch on these inputs; the last-layer predictive takes inputs it "
                f"maps one to one (got outputs {tuple(f.shape)} from features "
                f"{tuple(phi.shape)}), e.g. single items of a reward model"
            )
        return f, phi

    def _whole_model_jacobians(self, X: Inputs) -> tuple[Tensor, Tensor]:
        """``(Js, f)`` w.r.t. the last layer's parameters through the whole model, for
        outputs that are not the last layer applied to the features."""
        backend = self._whole_model_backend()
        return self._memo("jacobians", X, lambda: backend.jacobians(X, self.enable_backprop))

    def _glm_predictive_distribution(
        self, X: Inputs, joint: bool = False
    ) -> tuple[Tensor, Tensor]:
        bias = self.subset.linear_bias()
        if bias is None:
            return super()._glm_predictive_distribution(X, joint=joint)
        f_mu, phi = self._features_for_predictive(X)
        if not self.subset.applies_layer(f_mu, phi):
            Js, f_mu = self._whole_model_jacobians(X)
            if joint:
                return f_mu.reshape(-1), self.functional_covariance(Js)
            return f_mu, self.functional_variance(Js)
        if joint:
            return f_mu.reshape(-1), self.posterior.inv_quad_linear_joint(phi, bias)
        return f_mu, self.posterior.inv_quad_linear(phi, bias)

    def _glm_predictive_diagonal(self, X: Inputs) -> tuple[Tensor, Tensor]:
        return self._variance_diagonal(X)

    def functional_variance_fast(self, X: Inputs) -> tuple[Tensor, Tensor]:
        """Output means and variances (the diagonal of ``J P^-1 J^T``) without correlations.

        Memory grows linearly with the number of outputs.

        Returns:
            ``(f_mu, f_var_diag)``.

        Shapes:
            ``-> (batch, outputs), (batch, outputs)``

        Raises:
            ValueError: If the approximation is not fitted.
        """
        self._check_fitted()
        with self._evaluating():
            return self._variance_diagonal(X)

    def _variance_diagonal(self, X: Inputs) -> tuple[Tensor, Tensor]:
        bias = self.subset.linear_bias()
        if bias is None:
            return super()._glm_predictive_diagonal(X)
        f_mu, phi = self._features_for_predictive(X)
        if not self.subset.applies_layer(f_mu, phi):
            Js, f_mu = self._whole_model_jacobians(X)
            return f_mu, self.functional_variance(Js).diagonal(dim1=-2, dim2=-1)
        return f_mu, self.posterior.inv_quad_linear(phi, bias, diagonal=True)

    def _kernel_rows_and_outputs(self, X: Inputs) -> tuple[Tensor, Tensor]:
        f_mu, phi = self._features_for_predictive(X)
        if self.subset.linear_bias() is None or self.subset.applies_layer(f_mu, phi):
            return self.subset.jacobians(self.backend, X, self.enable_backprop)
        return self._whole_model_jacobians(X)

    def _outputs_at(self, X: Inputs, thetas: Tensor, **model_kwargs: Any) -> Tensor:
        """Outputs at last-layer parameters ``thetas`` on features computed once,
        ``(n, batch, outputs)``."""
        with nullcontext() if self.enable_backprop else torch.no_grad():
            f, phi = self.subset.features(X, self.enable_backprop, **model_kwargs)
            if self.subset.applies_layer(f, phi):
                return self.subset.apply_at(phi, thetas)
            outs = [self.subset.whole_forward_at(X, t, **model_kwargs) for t in thetas]
            return torch.stack(outs)


class FullLLLaplace(LLLaplace, FullLaplace):
    """Last-layer Laplace with a dense posterior precision over the last layer."""

    _linear_curvature = staticmethod(linear_full_ggn)


class DiagLLLaplace(LLLaplace, DiagLaplace):
    """Last-layer Laplace with a diagonal posterior precision."""

    _linear_curvature = staticmethod(linear_diag_ggn)


class KronLLLaplace(LLLaplace, KronLaplace):
    """Last-layer Laplace with a Kronecker-factored posterior precision.

    The weight block is ``B ⊗ A`` with ``B`` over outputs and ``A`` over features, the bias
    block is ``B``; ``damping=True`` splits the prior over the two factors (see
    :class:`~laplace.baselaplace.KronLaplace`).
    """

    _linear_curvature = staticmethod(linear_kron_ggn)

    _pending_features: PendingRows | None = None
    """Features of small batches not yet summed into ``A`` (see :class:`PendingRows`)."""

    _edge_weights: tuple[Curvature, Tensor] | None = None
    """``sum_n p_n p_n^T`` of the softmax form during a fit (see :meth:`_add_batch`), with
    the curvature it belongs to."""

    def _add_batch(self, H_new: Curvature, X: Inputs, y: Tensor, n_data: int) -> Tensor:
        """Accumulate ``sum_n Lambda_n`` and ``sum_n phi_n phi_n^T`` in place.

        The sums go straight into ``H_new``'s weight factors (no per-batch factors to
        allocate and add, and ``B`` once instead of for weight and bias), in the
        accumulation precision; the features of small batches are gathered before their
        float64 Gram (:class:`~laplace.curvature._kfac.PendingRows`). For the softmax
        Hessian only the non-negative edge weights ``sum_n p_n p_n^T`` are summed per batch,
        in the model's dtype with ``addmm_`` (their relative accuracy survives any number of
        batches); :meth:`_finish_batches` turns them into the Laplacian ``sum_n Lambda_n``
        (:mod:`laplace.curvature.linear`) and scales the factors as
        :func:`~laplace.curvature.linear.linear_kron_ggn` does.
        """
        if not self._closed_form():
            return super()._add_batch(H_new, X, y, n_data)
        step = self._linear_step(X, y)
        if step is None:  # folded rows: whole-model K-FAC, already scaled
            self._folded_fit = True
            backend = self._whole_model_backend()
            loss, H_batch = backend.kron(X, y, N=n_data, **self._asdl_fisher_kwargs)
            H_new.add_(H_batch)
            return loss
        loss, phi, lam = step
        B, A = H_new.H.kfacs[0]
        if lam.probs is not None:
            if self._edge_weights is None or self._edge_weights[0] is not H_new:
                self._edge_weights = (H_new, lam.weights())
            else:
                self._edge_weights[1].addmm_(lam.probs.mT, lam.probs)
        else:
            B.add_(lam.total())
        if self._pending_features is None:
            self._pending_features = PendingRows()
        self._pending_features.add(A, phi, math.sqrt(self.backend.factor) / n_data, A.dtype)
        return loss

    def _finish_batches(self, H_new: Curvature, n_data: int) -> None:
        kept, self._edge_weights = self._edge_weights, None
        pending, self._pending_features = self._pending_features, None
        if not self._closed_form() or self._folded_fit:  # nothing kept raw
            return
        if pending is not None:
            pending.flush()
        blocks = H_new.H.kfacs
        B = blocks[0][0]
        if kept is not None and kept[0] is H_new:
            B.add_(laplacian(kept[1]))
        if len(blocks) == 2:  # the bias block is B unscaled
            blocks[1][0].copy_(B)
        B.div_(math.sqrt(self.backend.factor))
        _check_finite(H_new.H)
        H_new._invalidate()

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: FeatureReduction | str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        last_layer_name: str | None = None,
        damping: bool = False,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            feature_reduction=feature_reduction,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            last_layer_name=last_layer_name,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
            damping=damping,
        )


# The function-space last-layer class lives with the other function-space classes and is
# re-exported for the public import path ``laplace.lllaplace.FunctionalLLLaplace``.
from laplace.functional.sod import FunctionalLLLaplace  # noqa: E402
