"""Subnetwork Laplace approximations (Daxberger et al., ICML 2021).

Only a chosen subset ``S`` of the entries of the flat vector ``theta`` of trainable parameters
is probabilistic; every other parameter stays at its MAP value. The posterior
``N(theta_S, P^-1)`` has a dense (:class:`FullSubnetLaplace`) or diagonal
(:class:`DiagSubnetLaplace`) precision ``P = H_S / (sigma^2 T) + diag(p0)`` with the curvature
``H_S`` restricted to ``S`` (rows and columns). A subnetwork has no Kronecker factors, so there
is no Kronecker-factored variant.

The classes are declarations over :class:`~laplace.baselaplace.ParametricLaplace`, the
:class:`~laplace.subsets.Subnetwork` subset and a structure: the curvature backend restricts
Jacobians, gradients and curvatures to ``subnetwork_indices``, and fitting, the marginal
likelihood, prior tuning and the predictives are those of the all-weights classes. As in
``laplace-torch``, the MAP estimate :attr:`~SubnetLaplace.mean` and the parameter samples are
vectors of all trainable parameters (the subnetwork entries vary, the others are the MAP);
:attr:`~SubnetLaplace.mean_subnet` holds the subnetwork entries.

Reference:
    Daxberger, Nalisnick, Allingham, Antorán, Hernández-Lobato. Bayesian deep learning via
    subnetwork inference. ICML, 2021.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from laplace.baselaplace import DiagLaplace, FullLaplace, ParametricLaplace
from laplace.posterior.base import Curvature
from laplace.subsets import Subnetwork
from laplace.utils.data import Inputs
from laplace.utils.enums import HessianStructure, Likelihood
from laplace.utils.linear_jacobians import (
    factored_diagonal_variance,
    linear_jacobian_factors,
    map_factors,
)

__all__ = ["SubnetLaplace", "FullSubnetLaplace", "DiagSubnetLaplace"]

_SUBNETWORK_STRUCTURES = (HessianStructure.FULL, HessianStructure.DIAG)


class SubnetLaplace(ParametricLaplace):
    """Laplace approximation over the entries ``subnetwork_indices`` of the parameter vector.

    Use :class:`FullSubnetLaplace` or :class:`DiagSubnetLaplace`. Parameters with
    ``requires_grad=False`` are not part of the parameter vector. As in ``laplace-torch``,
    :attr:`n_params` and :attr:`n_layers` count the whole model's trainable parameters and
    parameter tensors, and :attr:`n_params_subnet` the subnetwork. Quantities of the Gaussian
    live in the subnetwork: ``H``, the posterior precision, covariance and variance, and the
    prior, which is one block: ``prior_precision`` and ``prior_mean`` are scalars or have one
    entry per subnetwork parameter, in the order of ``subnetwork_indices``.
    Quantities of parameter vectors cover all trainable parameters: :attr:`mean`, the rows of
    :meth:`sample` and the ``value`` of :meth:`log_prob` and :meth:`square_norm`.

    ``sigma_noise``, ``prior_precision``, ``prior_mean``, ``temperature``, ``backend``,
    ``backend_kwargs``, ``asdl_fisher_kwargs``, ``enable_backprop``, ``dict_key_x``,
    ``dict_key_y`` are as for :class:`~laplace.baselaplace.BaseLaplace`.

    Args:
        model: The trained network.
        likelihood: ``"classification"``, ``"regression"`` or ``"reward_modeling"``.
        subnetwork_indices: Distinct indices into the flat vector of the model's trainable
            parameters (``named_parameters`` order), e.g. from a
            :class:`~laplace.utils.subnetmask.SubnetMask`.

    Raises:
        ValueError: As for :class:`~laplace.baselaplace.BaseLaplace`; for invalid
            ``subnetwork_indices`` (not a non-empty 1-d integer tensor of distinct indices
            into the trainable parameters); for a structure other than full or diagonal.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        subnetwork_indices: Tensor,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
    ) -> None:
        structure = type(self)._structure
        if structure is not None and structure not in _SUBNETWORK_STRUCTURES:
            raise ValueError(
                f"subnetwork Laplace supports hessian_structure 'full' or 'diag', got "
                f"{structure.value!r}: a subnetwork has no Kronecker or low-rank structure"
            )
        self._requested_indices = subnetwork_indices
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
            asdl_fisher_kwargs=asdl_fisher_kwargs,
        )
        del self._requested_indices

    def _make_subset(self, model: nn.Module) -> Subnetwork:
        return Subnetwork(model, self._requested_indices)

    def _make_curvature(self) -> Curvature:
        """An empty curvature over one block of ``n_params_subnet`` entries."""
        return self._curvature_cls.zeros([self.mean_subnet])

    @property
    def subnetwork_indices(self) -> Tensor:
        """The indices of the subnetwork in the trainable-parameter vector."""
        return self.subset.indices

    @property
    def n_params(self) -> int:
        """Number of trainable parameters of the whole model, as in ``laplace-torch``."""
        return self.subset.n_model_params

    @property
    def n_layers(self) -> int:
        """Number of trainable parameter tensors of the whole model, as in ``laplace-torch``."""
        return len(self.subset.all_weights.sizes)

    @property
    def n_params_subnet(self) -> int:
        """Number of parameters in the subnetwork."""
        return self.subset.indices.numel()

    def _prior_mean_vector(self) -> Tensor:
        """All trainable parameters with the subnetwork entries at the prior mean (the mean of
        the approximation before :meth:`fit`; the other entries are fixed at the MAP)."""
        prior = self.prior_mean.expand(1, self.n_params_subnet)
        return self.subset.embed(self.subset.mean(), prior)[0]

    @property
    def mean_subnet(self) -> Tensor:
        """The MAP estimate of the subnetwork parameters, shape ``(n_params_subnet,)``."""
        return self.subset.select(self.mean)

    def _scatter(self) -> Tensor:
        """``(theta_S - mu0)^T P0 (theta_S - mu0)`` over the subnetwork entries, in the
        accumulation precision."""
        dtype = self._accumulation_dtype
        squares = (self.mean_subnet - self.prior_mean).to(dtype).square()
        return self.prior_precision_diag.to(dtype) @ squares

    def _square_norm(self, value: Tensor) -> Tensor:
        """``(value_S - mean_S)^T P (value_S - mean_S)`` of full parameter vectors, in the
        accumulation precision (:meth:`square_norm` returns it in the model's dtype).

        Shapes:
            ``(model params,) -> ()`` or ``(n, model params) -> (n,)``

        Raises:
            ValueError: If ``value`` does not cover all trainable parameters.
        """
        return self.posterior.quad(self.subset.select(value) - self.mean_subnet)

    def assemble_full_samples(self, subnet_samples: Tensor) -> Tensor:
        """Full parameter vectors: the MAP with the subnetwork entries set to the samples.

        Shapes:
            ``(n_samples, n_params_subnet) -> (n_samples, model params)``

        Raises:
            ValueError: If ``subnet_samples`` has the wrong shape.
        """
        return self.subset.embed(self.mean, subnet_samples)

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Samples of all trainable parameters; only the subnetwork entries vary.

        Shapes:
            ``-> (n_samples, model params)``
        """
        subnet_samples = self.mean_subnet + self.posterior.sample(n_samples, generator)
        return self.assemble_full_samples(subnet_samples)

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`ParametricLaplace.state_dict`, plus the subnetwork indices."""
        state = super().state_dict()
        state["subnetwork_indices"] = self.subnetwork_indices.detach()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted approximation saved by :meth:`state_dict`.

        Raises:
            ValueError: If the state was saved for other subnetwork indices, or as
                :meth:`ParametricLaplace.load_state_dict`.
        """
        saved = state_dict.get("subnetwork_indices")
        if saved is None:
            raise ValueError(
                "state_dict has no 'subnetwork_indices': it was saved with cls_name="
                f"{state_dict.get('cls_name')!r}, not by a subnetwork Laplace"
            )
        saved = torch.as_tensor(saved).to(self.subnetwork_indices.device)
        if not torch.equal(saved, self.subnetwork_indices):
            raise ValueError(
                f"state_dict was saved for {saved.numel()} other subnetwork_indices; this "
                f"object has {self.n_params_subnet} (they must be equal, in the same order)"
            )
        super().load_state_dict(state_dict)


class FullSubnetLaplace(SubnetLaplace, FullLaplace):
    """Subnetwork Laplace approximation with a dense posterior precision.

    Shapes:
        ``P: (n_params_subnet, n_params_subnet)``
    """


class DiagSubnetLaplace(SubnetLaplace, DiagLaplace):
    """Subnetwork Laplace approximation with a diagonal posterior precision.

    Its GLM variance ``J_S diag(v) J_S^T`` over the subnetwork's columns ``S`` is the
    all-weights one with zero variance outside ``S``, so networks with Jacobian factors
    (:func:`~laplace.utils.linear_jacobians.linear_jacobian_factors`) get it layer by layer
    from the factors of the parameter tensors that hold subnetwork entries, without the
    ``(batch, outputs, params)`` Jacobians.

    Shapes:
        ``P: (n_params_subnet,)``
    """

    def _factored_moments(self, X: Inputs) -> tuple[Tensor, Tensor] | None:
        """``(f_mu, f_var)`` from the Jacobian factors (the class docstring), or None where
        the network has none."""
        named = self.subset.named_params
        factored = self._memo(
            "factors",
            X,
            lambda: linear_jacobian_factors(
                self.model, named, X, create_graph=self.enable_backprop, convolutions=True
            ),
        )
        if factored is None:
            return None
        factors, f = factored
        variance = self.posterior_variance
        full = variance.new_zeros(self.subset.n_model_params)
        full = full.index_copy(0, self.subset.indices, variance)
        kept, parts, start = [], [], 0
        held = torch.zeros(self.subset.n_model_params, dtype=torch.bool)
        held[self.subset.indices.cpu()] = True
        for block, size in zip(factors, self.subset.all_weights.sizes):
            if held[start : start + size].any():
                kept.append(block)
                parts.append(full[start : start + size])
            start += size
        kept = map_factors(kept, lambda t: t.to(full.dtype))
        return f, factored_diagonal_variance(kept, torch.cat(parts))
