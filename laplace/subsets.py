"""The subset axis: which parameters are treated probabilistically.

A subset tells the Laplace classes which parameters form the flat vector ``theta`` of the
posterior, how to build the curvature backend for them, how to get Jacobians of the model
output w.r.t. ``theta``, and how to evaluate the model at another ``theta`` (for the sampling
predictive). :class:`AllWeights` covers every parameter with ``requires_grad=True``, which is
also how LoRA adapters and other frozen-backbone models are handled. :class:`LastLayer` covers
the last ``nn.Linear`` layer of a network through its input features. :class:`Subnetwork`
covers chosen entries of the flat vector of trainable parameters.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from laplace.curvature._fallback import FastPath, lacks
from laplace.utils.data import Inputs
from laplace.utils.feature_extractor import FeatureExtractor

__all__ = ["AllWeights", "LastLayer", "Subnetwork"]


class AllWeights:
    """All trainable parameters of ``model``, in ``named_parameters`` order.

    Raises:
        ValueError: If the model has no parameter with ``requires_grad=True``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.named_params:
            raise ValueError("model has no parameters with requires_grad=True")

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.named_params.values())

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.params]

    def mean(self) -> Tensor:
        """The MAP estimate ``theta`` as a detached flat vector, shape ``(params,)``."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def backend_model(self) -> nn.Module:
        return self.model

    def backend_kwargs(self) -> dict[str, Any]:
        return {}

    def jacobians(self, backend: Any, X: Inputs, enable_backprop: bool) -> tuple[Tensor, Tensor]:
        """``(Js, f)`` with ``Js`` of shape ``(batch, outputs, params)``."""
        return backend.jacobians(X, enable_backprop=enable_backprop)

    def forward_at(self, X: Inputs, theta: Tensor, **model_kwargs: Any) -> Tensor:
        """Evaluate the model with the subset's parameters replaced by ``theta``."""
        chunks = torch.split(theta, self.sizes)
        replaced = {
            name: chunk.view_as(p) for (name, p), chunk in zip(self.named_params.items(), chunks)
        }
        return functional_call(self.model, replaced, (X,), model_kwargs)

    def output_rows(self, X: Tensor, outputs: slice) -> Tensor:
        """Per-sample Jacobian rows of the outputs ``outputs`` only, by reverse mode
        (``torch.func.vmap`` over the samples of ``jacrev``): ``(batch, k, params)`` for
        ``k`` selected outputs, never the rows of the others.

        Shapes:
            ``X (batch, ...) -> (batch, k, params)``
        """
        primals = {name: p.detach() for name, p in self.named_params.items()}

        def selected(params: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.model, params, (x.unsqueeze(0),))[0, outputs]

        if lacks(self.model, FastPath.VMAP):  # one sample at a time
            per_sample = [torch.func.jacrev(selected)(primals, x) for x in X]
            rows = {name: torch.stack([r[name] for r in per_sample]) for name in primals}
        else:
            rows = torch.func.vmap(torch.func.jacrev(selected), in_dims=(None, 0))(primals, X)
        return torch.cat([rows[name].flatten(2) for name in primals], dim=2)

    def linearized_at(self, X: Inputs, deltas: Tensor) -> Tensor:
        """``f(X) + J(X) delta`` for each row ``delta`` by forward-mode Jacobian-vector
        products (``torch.func.jvp``), never forming ``J``: about the cost of two forward
        passes per row and the memory of one.

        Shapes:
            ``deltas (n, params) -> (n, batch, outputs)``
        """
        names = list(self.named_params)
        primals = {name: p.detach() for name, p in self.named_params.items()}

        def output(params: dict[str, Tensor]) -> Tensor:
            return functional_call(self.model, params, (X,))

        outs = []
        for delta in deltas:
            chunks = torch.split(delta.to(self.params[0].dtype), self.sizes)
            tangents = {n: c.view_as(primals[n]) for n, c in zip(names, chunks)}
            f, directional = torch.func.jvp(output, (primals,), (tangents,))
            outs.append(f + directional)
        return torch.stack(outs)


class LastLayer:
    """The trainable parameters of the last ``nn.Linear`` layer of a feature extractor.

    The rest of the network is fixed, so its output is computed once per batch: the features
    ``phi`` and the model output come from one forward pass, and every other quantity (the
    curvature, the predictive variance, outputs at sampled weights) is a cheap function of
    ``phi``. The last layer may be unknown until the first forward pass
    (:meth:`~laplace.utils.feature_extractor.FeatureExtractor.find_last_layer`).

    Args:
        extractor: The model wrapped in a feature extractor.
    """

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor

    @property
    def ready(self) -> bool:
        """Whether the last layer is known."""
        return self.extractor.last_layer is not None

    @property
    def layer(self) -> nn.Linear:
        """The last layer.

        Raises:
            ValueError: If it is not known yet.
        """
        layer = self.extractor.last_layer
        if layer is None:
            raise ValueError(
                "the last layer is not known yet: it is found on the first batch of fit(); "
                "call fit() first or pass last_layer_name"
            )
        return layer

    @property
    def named_params(self) -> dict[str, nn.Parameter]:
        named = {n: p for n, p in self.layer.named_parameters() if p.requires_grad}
        if not named:
            raise ValueError(
                f"the last layer {self.extractor.last_layer_name!r} has no parameters with "
                "requires_grad=True"
            )
        return named

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.named_params.values())

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.params]

    @property
    def reference(self) -> Tensor:
        """A tensor with the device and dtype of the subset (the model's, before it is known).

        Raises:
            ValueError: If the model has no parameters.
        """
        if self.ready:
            return self.params[0]
        first = next(self.extractor.parameters(), None)
        if first is None:
            raise ValueError("model has no parameters, so it has no nn.Linear last layer")
        return first

    def linear_bias(self) -> bool | None:
        """``True`` for parameters ``(weight, bias)``, ``False`` for ``(weight,)``, else ``None``.

        The structured last-layer computations need the weight; with only a trainable bias
        (``None``) the generic Jacobian path is used.
        """
        return {("weight", "bias"): True, ("weight",): False}.get(tuple(self.named_params))

    def mean(self) -> Tensor | None:
        """The MAP estimate as a detached flat vector ``(params,)``; ``None`` while unknown."""
        if not self.ready:
            return None
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def backend_model(self) -> nn.Module:
        return self.extractor

    def backend_kwargs(self) -> dict[str, Any]:
        return {"last_layer": True}

    def features(
        self, X: Inputs, enable_backprop: bool = False, **model_kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """The model output and the last layer's input features from one forward pass.

        Shapes:
            ``-> (batch, outputs), (batch, features)``

        Raises:
            ValueError: If the features are not 2-D (a ``feature_reduction`` is needed).
        """
        with nullcontext() if enable_backprop else torch.no_grad():
            out, phi = self.extractor.forward_with_features(X, **model_kwargs)
        if phi.ndim != 2:
            raise ValueError(
                f"last-layer features must have shape (batch, features), got "
                f"{tuple(phi.shape)}; pass feature_reduction='pick_first', 'pick_last' or "
                "'average' to reduce sequence features"
            )
        return out, phi

    def jacobians(self, backend: Any, X: Inputs, enable_backprop: bool) -> tuple[Tensor, Tensor]:
        """``(Js, f)`` with ``Js`` of shape ``(batch, outputs, params)``."""
        return backend.last_layer_jacobians(X, enable_backprop=enable_backprop)

    def apply_at(self, phi: Tensor, thetas: Tensor) -> Tensor:
        """The last layer applied to ``phi`` with its parameters replaced by each ``theta``.

        Shapes:
            ``phi (batch, features), thetas (n, params) -> (n, batch, outputs)``
        """
        layer, named = self.layer, self.named_params
        chunks = thetas.split(self.sizes, dim=1)
        replaced = {
            name: chunk.reshape(-1, *p.shape) for (name, p), chunk in zip(named.items(), chunks)
        }

        def output(params: dict[str, Tensor]) -> Tensor:
            return functional_call(layer, params, (phi,))

        return vmap(output)(replaced)

    def forward_at(self, X: Inputs, theta: Tensor, **model_kwargs: Any) -> Tensor:
        """The model output with the last layer's parameters replaced by ``theta``.

        The features are computed once, then the last layer is applied at ``theta``.
        """
        _, phi = self.features(X, torch.is_grad_enabled(), **model_kwargs)
        return self.apply_at(phi, theta.reshape(1, -1))[0]

    def whole_forward_at(self, X: Inputs, theta: Tensor, **model_kwargs: Any) -> Tensor:
        """The model output with the last layer's parameters replaced by ``theta``, by a
        forward pass of the whole model (for outputs that are not the last layer applied to
        the reduced features, see :meth:`applies_layer`)."""
        prefix = f"{self.extractor.last_layer_name}."
        chunks = torch.split(theta, self.sizes)
        replaced = {
            prefix + name: chunk.view_as(p)
            for (name, p), chunk in zip(self.named_params.items(), chunks)
        }
        return functional_call(self.extractor.model, replaced, (X,), model_kwargs)

    def applies_layer(self, f: Tensor, phi: Tensor) -> bool:
        """Whether the output ``f`` is the last layer applied to the features ``phi`` row by
        row (to round-off), the premise of every closed form from the features.

        It is not, for instance, when a sequence model pools its logits at the last real
        token but ``feature_reduction="pick_last"`` picks the last position (padding).
        """
        if f.ndim != 2 or phi.ndim != 2 or f.shape[0] != phi.shape[0]:
            return False
        layer = self.layer
        with torch.no_grad():
            expected = layer(phi.detach())
            if expected.shape != f.shape:
                return False
            # the round-off bound of a length-d dot product, gamma_d |phi| |W|^T (+ |b|)
            bound = phi.detach().abs() @ layer.weight.abs().mT
            if layer.bias is not None:
                bound = bound + layer.bias.abs()
            eps = torch.finfo(f.dtype).eps
            if f.is_cuda and f.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
                eps = 2.0**-10  # TensorFloat-32 products
            allowed = (
                4 * phi.shape[1] * eps * (bound + f.detach().abs()) + torch.finfo(f.dtype).tiny
            )
            return bool(((expected - f.detach()).abs() <= allowed).all())


def _listed(values: Tensor, limit: int = 10) -> str:
    """At most ``limit`` values of a tensor as a readable list."""
    shown = values.flatten()[:limit].tolist()
    return f"{shown}{' ...' if values.numel() > limit else ''}"


def _check_subnetwork_indices(indices: object, n_params: int, device: torch.device) -> Tensor:
    """Validate ``subnetwork_indices`` and return them as a LongTensor on ``device``.

    Args:
        indices: Indices into the flat vector of the model's trainable parameters.
        n_params: Length of that vector.
        device: Device of the model's parameters.

    Returns:
        The indices, in the order given.

    Shapes:
        ``(n_params_subnet,)``

    Raises:
        ValueError: If ``indices`` is not a non-empty 1-d integer tensor of distinct values in
            ``[0, n_params)``; the message names the offending values.
    """
    if not isinstance(indices, Tensor):
        raise ValueError(
            f"subnetwork_indices must be a 1-d torch.LongTensor, got {type(indices).__name__}"
        )
    if indices.dtype == torch.bool:
        raise ValueError(
            "subnetwork_indices must be integer indices, got a boolean mask; convert it with "
            "SubnetMask.convert_subnet_mask_to_indices(mask) or mask.nonzero().flatten()"
        )
    if indices.is_floating_point() or indices.is_complex():
        raise ValueError(
            f"subnetwork_indices must be an integer tensor, got dtype {indices.dtype}"
        )
    if indices.ndim != 1 or indices.numel() == 0:
        raise ValueError(
            f"subnetwork_indices must be a non-empty 1-d tensor, got shape {tuple(indices.shape)}"
        )
    indices = indices.to(device=device, dtype=torch.long)
    outside = indices[(indices < 0) | (indices >= n_params)]
    if outside.numel():
        raise ValueError(
            f"subnetwork_indices must lie in [0, {n_params}) (the model's trainable "
            f"parameters), got out-of-range values {_listed(outside)}"
        )
    values, counts = indices.unique(return_counts=True)
    duplicated = values[counts > 1]
    if duplicated.numel():
        raise ValueError(
            f"subnetwork_indices must be distinct, got duplicated values {_listed(duplicated)}"
        )
    return indices


class Subnetwork:
    """Selected entries of the flat vector of the trainable parameters of ``model``.

    The posterior is over the entries ``theta[subnetwork_indices]`` of the vector ``theta`` of
    all parameters with ``requires_grad=True`` (in ``named_parameters`` order); every other
    parameter stays at its MAP value (Daxberger et al., ICML 2021). For the prior, the
    subnetwork is one "layer": a prior precision is a scalar (one entry) or has one entry per
    subnetwork parameter, in the order of ``subnetwork_indices``.

    The MAP estimate :meth:`mean` and the argument of :meth:`forward_at` are vectors of all
    trainable parameters, the space in which parameter samples are returned; :meth:`select`
    takes their subnetwork entries, and :meth:`embed` writes subnetwork values into them.

    Args:
        model: The network.
        subnetwork_indices: Distinct indices into the flat vector of trainable parameters.

    Raises:
        ValueError: If the model has no trainable parameters or the indices are invalid.
    """

    def __init__(self, model: nn.Module, subnetwork_indices: Tensor) -> None:
        self.model = model
        self.all_weights = AllWeights(model)
        self.indices = _check_subnetwork_indices(
            subnetwork_indices, self.n_model_params, self.params[0].device
        )

    @property
    def named_params(self) -> dict[str, nn.Parameter]:
        return self.all_weights.named_params

    @property
    def params(self) -> list[nn.Parameter]:
        return self.all_weights.params

    @property
    def n_model_params(self) -> int:
        """Number of trainable parameters of the model."""
        return sum(self.all_weights.sizes)

    @property
    def sizes(self) -> list[int]:
        """One block with the ``n_params_subnet`` entries of the subnetwork."""
        return [self.indices.numel()]

    def mean(self) -> Tensor:
        """All trainable parameters as a detached flat vector, shape ``(model params,)``."""
        return self.all_weights.mean()

    def select(self, theta: Tensor) -> Tensor:
        """The subnetwork entries of full parameter vectors.

        Shapes:
            ``(..., model params) -> (..., n_params_subnet)``

        Raises:
            ValueError: If the last dimension is not the number of trainable parameters.
        """
        if theta.ndim == 0 or theta.shape[-1] != self.n_model_params:
            raise ValueError(
                f"parameter vectors must have {self.n_model_params} entries (all trainable "
                f"parameters) in the last dimension, got shape {tuple(theta.shape)}"
            )
        return theta.index_select(-1, self.indices)

    def embed(self, theta: Tensor, values: Tensor) -> Tensor:
        """Copies of the full vector ``theta`` with the subnetwork entries set to ``values``.

        Differentiable in ``values``.

        Shapes:
            ``theta (model params,), values (n, n_params_subnet) -> (n, model params)``

        Raises:
            ValueError: If ``values`` does not have shape ``(n, n_params_subnet)``.
        """
        if values.ndim != 2 or values.shape[1] != self.indices.numel():
            raise ValueError(
                f"subnetwork values must have shape (n, {self.indices.numel()}), got "
                f"{tuple(values.shape)}"
            )
        return theta.expand(values.shape[0], -1).index_copy(1, self.indices, values)

    def backend_model(self) -> nn.Module:
        return self.model

    def backend_kwargs(self) -> dict[str, Any]:
        return {"subnetwork_indices": self.indices}

    def jacobians(self, backend: Any, X: Inputs, enable_backprop: bool) -> tuple[Tensor, Tensor]:
        """``(Js, f)`` with ``Js`` of shape ``(batch, outputs, n_params_subnet)``."""
        return backend.jacobians(X, enable_backprop=enable_backprop)

    def forward_at(self, X: Inputs, theta: Tensor, **model_kwargs: Any) -> Tensor:
        """Evaluate the model at the full trainable-parameter vector ``theta``."""
        return self.all_weights.forward_at(X, theta, **model_kwargs)

    def output_rows(self, X: Tensor, outputs: slice) -> Tensor:
        """The subnetwork's columns of :meth:`AllWeights.output_rows`.

        Shapes:
            ``X (batch, ...) -> (batch, k, n_params_subnet)``
        """
        return self.all_weights.output_rows(X, outputs).index_select(-1, self.indices)

    def linearized_at(self, X: Inputs, deltas: Tensor) -> Tensor:
        """``f(X) + J(X) delta`` for subnetwork directions ``delta`` by Jacobian-vector
        products (see :meth:`AllWeights.linearized_at`).

        Shapes:
            ``deltas (n, n_params_subnet) -> (n, batch, outputs)``
        """
        zeros = deltas.new_zeros(self.n_model_params)
        return self.all_weights.linearized_at(X, self.embed(zeros, deltas))
