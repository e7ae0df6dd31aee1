"""Link approximations: from a Gaussian over logits to class probabilities.

The GLM predictive of a classifier is ``softmax(f)`` with ``f ~ N(f_mu, f_var)``; this integral
has no closed form. Each approximation here maps ``(f_mu, f_var)`` to probabilities:

- ``probit``: the multiclass probit approximation, ``softmax(f_mu / sqrt(1 + pi/8 diag f_var))``
  (MacKay, 1992; Spiegelhalter & Lauritzen, 1990).
- ``bridge`` / ``bridge_norm``: the Laplace bridge to a Dirichlet, whose mean is returned
  (Hobbhahn, Kristiadi & Hennig, "Fast predictive uncertainty for classification with Bayesian
  deep networks", UAI 2022), after projecting out the softmax-invariant direction ``1``;
  ``bridge_norm`` also rescales the variance as proposed there.
- ``mc``: Monte-Carlo average of ``softmax`` over samples of ``f``.

:class:`PredictiveMixin` is the predictive interface every Laplace class shares (``__call__``,
``predictive_samples``, ``functional_samples``): it dispatches between the GLM and the
sampling (``nn``) predictive and applies the links; the classes supply the GLM mean and
variance (``_glm_predictive_distribution``, optionally a cheaper ``_glm_predictive_diagonal``)
and parameter samples pushed through the network (``_nn_samples``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from laplace.errors import InputMismatchError
from laplace.utils.data import Inputs, check_input_dtype, per_sample_shape
from laplace.utils.enums import Likelihood, LinkApprox, PredType, parse_enum
from laplace.utils.utils import normal_samples

__all__ = [
    "PredictiveMixin",
    "apply_link",
    "bridge_alpha",
    "glm_samples",
    "link_bridge",
    "link_probit",
]


def link_probit(f_mu: Tensor, f_var: Tensor) -> Tensor:
    """Multiclass probit approximation; only the diagonal of ``f_var`` is used.

    Shapes:
        ``f_mu (batch, classes), f_var (batch, classes, classes) or its diagonal
        (batch, classes) -> (batch, classes)``
    """
    var = f_var if f_var.ndim == f_mu.ndim else f_var.diagonal(dim1=-2, dim2=-1)
    kappa = torch.rsqrt(1.0 + math.pi / 8.0 * var)
    return torch.softmax(kappa * f_mu, dim=-1)


def link_bridge(f_mu: Tensor, f_var: Tensor, normalize: bool = False) -> Tensor:
    """Mean of the Laplace-bridge Dirichlet.

    The logits are first conditioned on ``sum(f) = 0`` (softmax is invariant along ``1``), which
    keeps the bridge well-posed for any covariance.

    Shapes:
        ``f_mu (batch, classes), f_var (batch, classes, classes) -> (batch, classes)``
    """
    n_classes = f_mu.shape[-1]
    row_sums = f_var.sum(-1)  # (batch, classes) = Sigma 1
    total = row_sums.sum(-1, keepdim=True)  # 1^T Sigma 1
    f_mu = f_mu - row_sums * f_mu.sum(-1, keepdim=True) / total
    f_var = f_var - row_sums.unsqueeze(-1) * row_sums.unsqueeze(-2) / total.unsqueeze(-1)
    var_diag = f_var.diagonal(dim1=-2, dim2=-1)
    if normalize:
        mean_var = var_diag.mean(-1, keepdim=True) / math.sqrt(n_classes / 2.0)
        f_mu = f_mu / mean_var.sqrt()
        var_diag = var_diag / mean_var
    alpha = bridge_alpha(f_mu, var_diag)
    return torch.nan_to_num(alpha / alpha.sum(-1, keepdim=True), nan=1.0)


def bridge_alpha(f_mu: Tensor, var_diag: Tensor) -> Tensor:
    """Dirichlet concentrations of the Laplace bridge for a diagonal Gaussian over logits.

    ``alpha_k = (1 - 2/K + exp(mu_k) sum_l exp(-mu_l) / K^2) / var_k``; the exact inverse of the
    Dirichlet-to-Gaussian map ``mu_k = log alpha_k - mean(log alpha)``,
    ``var_k = (1 - 2/K) / alpha_k + sum_l (1 / alpha_l) / K^2``.

    Shapes:
        ``f_mu (batch, classes), var_diag (batch, classes) -> (batch, classes)``
    """
    n_classes = f_mu.shape[-1]
    sum_exp = torch.exp(-f_mu).sum(-1, keepdim=True)
    return (1.0 - 2.0 / n_classes + f_mu.exp() / n_classes**2 * sum_exp) / var_diag


def glm_samples(
    f_mu: Tensor,
    f_var: Tensor,
    n_samples: int,
    diagonal_output: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Samples of the linearised function ``f ~ N(f_mu, f_var)``.

    Args:
        f_mu: Mean of the outputs.
        f_var: Per-sample output covariance.
        n_samples: Number of samples.
        diagonal_output: Ignore the output correlations.
        generator: Random number generator.

    Shapes:
        ``f_mu (batch, outputs), f_var (batch, outputs, outputs) or its diagonal
        (batch, outputs) -> (n_samples, batch, outputs)``
    """
    if diagonal_output and f_var.ndim == f_mu.ndim + 1:
        f_var = f_var.diagonal(dim1=-2, dim2=-1)
    return normal_samples(f_mu, f_var, n_samples, generator)


def apply_link(
    f_mu: Tensor,
    f_var: Tensor,
    link_approx: LinkApprox,
    n_samples: int = 100,
    diagonal_output: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Approximate ``E[softmax(f)]`` for ``f ~ N(f_mu, f_var)`` with ``link_approx``.

    Shapes:
        ``f_mu (batch, classes), f_var (batch, classes, classes) -> (batch, classes)``
    """
    if link_approx == LinkApprox.PROBIT:
        return link_probit(f_mu, f_var)
    if link_approx == LinkApprox.BRIDGE:
        return link_bridge(f_mu, f_var)
    if link_approx == LinkApprox.BRIDGE_NORM:
        return link_bridge(f_mu, f_var, normalize=True)
    samples = glm_samples(f_mu, f_var, n_samples, diagonal_output, generator)
    return torch.softmax(samples, dim=-1).mean(0)


class PredictiveMixin:
    """The predictive of a Laplace approximation; see the module docstring for the contract."""

    def __call__(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        joint: bool = False,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Posterior predictive at ``x``.

        Classification returns probabilities ``(batch, classes)``; regression (and reward
        modelling outside fitting) returns ``(f_mu, f_var)`` with ``f_var`` of shape
        ``(batch, outputs, outputs)``, ``(batch, outputs)`` with ``diagonal_output``, or
        ``(batch*outputs, batch*outputs)`` with ``joint`` (then ``f_mu`` is flattened). The
        ``nn`` predictive for regression returns the sample mean and variance
        ``(batch, outputs)``.

        Args:
            x: Inputs, a tensor or a dict-like batch.
            pred_type: ``"glm"`` (linearised) or ``"nn"`` (parameter sampling).
            joint: Joint covariance over the batch (GLM regression).
            link_approx: ``"probit"``, ``"bridge"``, ``"bridge_norm"`` or ``"mc"``
                (GLM classification).
            n_samples: Number of samples for ``mc`` and ``nn``.
            diagonal_output: Ignore output correlations.
            generator: Random number generator for sampling.
            fitting: For reward modelling, predict as the classifier used in ``fit``.
            **model_kwargs: Extra keyword arguments for the model (``nn`` predictive).
        """
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        link_approx = parse_enum(LinkApprox, link_approx, "link_approx")
        self._check_predict_args(pred_type, n_samples, generator)
        with self._explained_input_errors(x):
            return self._predict(
                x,
                pred_type,
                joint,
                link_approx,
                n_samples,
                diagonal_output,
                generator,
                fitting,
                **model_kwargs,
            )

    @contextmanager
    def _explained_input_errors(self, x: Inputs) -> Iterator[None]:
        """Predict with the model in eval mode (its modes are given back afterwards), after
        checking the dtype of ``x``; turn PyTorch's shape errors for inputs whose per-sample
        shape differs from the training inputs' into an :class:`InputMismatchError` that
        names both shapes (other errors pass unchanged)."""
        check_input_dtype(x, self._dtype, self.dict_key_x)
        try:
            with self._evaluating():
                yield
        except RuntimeError as error:
            seen, given = self._input_shape, per_sample_shape(x)
            if isinstance(error, InputMismatchError) or seen is None or given in (None, seen):
                raise
            raise InputMismatchError(
                f"x has per-sample shape {given} (x.shape = {tuple(x.shape)}), the model was "
                f"fitted on inputs of per-sample shape {seen}: {error}"
            ) from error

    def _predict(
        self,
        x: Inputs,
        pred_type: PredType,
        joint: bool,
        link_approx: LinkApprox,
        n_samples: int,
        diagonal_output: bool,
        generator: torch.Generator | None,
        fitting: bool,
        **model_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """:meth:`__call__` after its checks."""
        likelihood = self._predictive_likelihood(fitting)
        if pred_type == PredType.NN:
            samples = self._nn_samples(x, n_samples, generator, **model_kwargs)
            if likelihood == Likelihood.CLASSIFICATION:
                return torch.softmax(samples, dim=-1).mean(0)
            return samples.mean(0), samples.var(0)
        if model_kwargs:
            warnings.warn("model_kwargs are ignored by the GLM predictive", stacklevel=2)
        regression = likelihood == Likelihood.REGRESSION
        if regression:
            diagonal = diagonal_output and not joint
        else:
            diagonal = link_approx == LinkApprox.PROBIT or (
                link_approx == LinkApprox.MC and diagonal_output
            )
        if regression or link_approx not in (LinkApprox.BRIDGE, LinkApprox.BRIDGE_NORM):
            context = nullcontext()
        else:  # the bridge cancels: its variance in the accumulation precision
            context = self.posterior.precise()
        with context:
            if diagonal:
                f_mu, f_var = self._glm_predictive_diagonal(x)
            else:
                f_mu, f_var = self._glm_predictive_distribution(x, joint=joint and regression)
        if regression:
            return f_mu, f_var
        f_mu = f_mu.to(f_var.dtype)
        probs = apply_link(f_mu, f_var, link_approx, n_samples, diagonal_output, generator)
        return probs.to(self._dtype)

    def _glm_predictive_diagonal(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """``f_mu`` and the diagonal of ``f_var``, for predictives that need no correlations.

        Subclasses that can skip the off-diagonal entries override this.

        Shapes:
            ``-> (batch, outputs), (batch, outputs)``
        """
        f_mu, f_var = self._glm_predictive_distribution(x)
        return f_mu, f_var.diagonal(dim1=-2, dim2=-1)

    def predictive(self, x: Inputs, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
        """Alias of :meth:`__call__`."""
        return self(x, *args, **kwargs)

    def _predictive_likelihood(self, fitting: bool) -> Likelihood:
        if self.likelihood == Likelihood.REWARD_MODELING:
            return Likelihood.CLASSIFICATION if fitting else Likelihood.REGRESSION
        return self.likelihood

    def _check_predict_args(
        self, pred_type: PredType, n_samples: int, generator: torch.Generator | None
    ) -> None:
        self._check_fitted()
        if pred_type == PredType.GP:
            raise ValueError(
                f"pred_type='gp' needs a function-space Laplace; {type(self).__name__} "
                "accepts 'glm' or 'nn'"
            )
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    def predictive_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples of the predictive (after the link), ``(n_samples, batch, outputs)``."""
        samples = self.functional_samples(x, pred_type, n_samples, diagonal_output, generator)
        if self._predictive_likelihood(False) == Likelihood.CLASSIFICATION:
            return torch.softmax(samples, dim=-1)
        return samples

    def functional_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples of the network output before the link, ``(n_samples, batch, outputs)``."""
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        self._check_predict_args(pred_type, n_samples, generator)
        with self._explained_input_errors(x):
            if pred_type == PredType.NN:
                return self._nn_samples(x, n_samples, generator)
            if diagonal_output:
                f_mu, f_var = self._glm_predictive_diagonal(x)
            else:
                f_mu, f_var = self._glm_predictive_distribution(x)
        return glm_samples(f_mu, f_var, n_samples, diagonal_output, generator)
