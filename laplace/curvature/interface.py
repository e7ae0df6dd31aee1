"""The interface every curvature backend implements, and what all of them share.

A backend turns a model, a likelihood and a batch ``(x, y)`` into per-sample Jacobians of the
model output, per-sample loss gradients, and the loss curvature in one of the structures of
:class:`~laplace.utils.enums.HessianStructure`. The loss of a batch is always
``factor * lossfunc(f, y)`` summed over the batch: the summed cross-entropy for
classification and ``0.5 * sum((f - y) ** 2)`` for regression; curvatures are of that loss.

:class:`CurvatureInterface` holds what every backend shares: argument checks, the last-layer
and subnetwork restrictions, ``torch.func`` Jacobians and gradients, and the precision of the
sums (``sum_dtype``, and a higher-precision copy of the module for libraries that sum inside;
see :mod:`laplace.utils.precision`). The native backends are in
:mod:`laplace.curvature.curvature`, which re-exports this class.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from contextlib import nullcontext
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from laplace.curvature._fallback import (
    FastPath,
    jacobian_rows,
    looped_jacobians,
    run_with_fallback,
)
from laplace.curvature._options import check_options
from laplace.curvature._tools import _features_attached, _split_samples, _trainable
from laplace.utils.data import Inputs, all_finite, batch_size, cast_inputs
from laplace.utils.enums import HessianStructure, Likelihood, parse_enum
from laplace.utils.precision import gram

__all__ = ["CurvatureInterface"]


class CurvatureInterface:
    """Common base of every curvature backend.

    Subclasses declare what they compute with the class attributes ``structures``,
    ``structure_options``, ``supports_dict_inputs`` and ``supports_backprop``, and override
    the structure methods (:meth:`full`, :meth:`diag`, :meth:`kron`) they support, starting
    each with :meth:`_check_structure`, which also checks the method's keyword options.
    :meth:`jacobians`, :meth:`last_layer_jacobians` and :meth:`gradients` are implemented
    here with ``torch.func``. Every method differentiates
    the module returned by :meth:`_module_and_input` w.r.t. ``params`` and restricts its
    result to ``subnetwork_indices`` with :meth:`_restrict`.

    Args:
        model: The model; with ``last_layer=True`` a feature extractor with a ``last_layer``
            module and ``forward_with_features(x) -> (out, features)``. Without it, a
            feature extractor whose last layer is found on its first forward pass is fine
            (for :meth:`last_layer_jacobians`).
        likelihood: ``"classification"``, ``"regression"`` or ``"reward_modeling"`` (whose
            curvature is that of classification).
        last_layer: Differentiate only the parameters of ``model.last_layer``, applied to
            the detached features.
        subnetwork_indices: Indices into the flat vector of ``params`` that every returned
            quantity is restricted to.
        dict_key_x: Key of the inputs in a dict-like batch (it gives the batch size).
        dict_key_y: Key of the targets in a dict-like batch.
        **kwargs: Options of subclasses; none are accepted here.

    Attributes:
        likelihood: ``Likelihood.CLASSIFICATION`` or ``Likelihood.REGRESSION``.
        params: The trainable parameters, in ``named_parameters`` order.
        n_params: Their total number of entries.
        factor: ``0.5`` for regression, ``1.0`` for classification.
        lossfunc: ``MSELoss`` or ``CrossEntropyLoss``, with ``reduction="sum"``.
        sum_dtype: The dtype in which the structure methods sum products over a batch (the
            Grams of Jacobian rows, the K-FAC factors) and return them; None (the default)
            for the model's dtype. A Laplace object sets it to the accumulation precision of
            :mod:`laplace.utils.precision` on the backend it creates. Curvatures that a
            library sums internally are returned in this dtype too, at the library's
            accuracy.

    Raises:
        TypeError: If ``kwargs`` is not empty.
        ValueError: For an unknown likelihood, no trainable parameters, a model that is no
            feature extractor (or one whose last layer is not found yet) with
            ``last_layer=True``, or bad subnetwork indices.
    """

    structures: ClassVar[frozenset[HessianStructure]] = frozenset()
    structure_options: ClassVar[Mapping[HessianStructure, frozenset[str]]] = MappingProxyType({})
    """The keyword options each structure method takes besides ``x, y, N, generator, out``
    (where ``asdl_fisher_kwargs`` arrive; see :mod:`laplace.curvature._options`)."""
    supports_dict_inputs: ClassVar[bool] = True
    supports_backprop: ClassVar[bool] = True
    psd_curvature: ClassVar[bool] = True
    sum_dtype: torch.dtype | None = None

    def _summed(self, tensor: Tensor) -> Tensor:
        """``tensor`` in :attr:`sum_dtype` (unchanged when it is None)."""
        return tensor if self.sum_dtype is None else tensor.to(self.sum_dtype)

    _shadow: tuple[nn.Module, nn.Module] | None = None

    def _promoted(self, module: nn.Module, inputs: Inputs) -> tuple[nn.Module, Inputs]:
        """``module`` and ``inputs`` in :attr:`sum_dtype`, for curvatures a library sums
        inside in the module's dtype (``curvlinops`` operators, ASDL).

        Below :attr:`sum_dtype` (float64 for float32 models inside a Laplace object, see
        :mod:`laplace.utils.precision`), the library runs on a copy of the module in that
        dtype, its parameters, ``requires_grad`` flags, buffers and train/eval mode refreshed
        from the module on every call, with the floating inputs cast: one copy of the
        module's parameters and passes in the higher precision. Otherwise ``module`` and
        ``inputs`` themselves.
        """
        target = self.sum_dtype
        reference = next(iter(module.parameters()), None)
        if target is None or reference is None or reference.dtype == target:
            return module, inputs
        if self._shadow is None or self._shadow[0] is not module:
            self._shadow = (module, copy.deepcopy(module).to(target))
        shadow = self._shadow[1]
        with torch.no_grad():
            for mine, theirs in zip(shadow.parameters(), module.parameters()):
                mine.copy_(theirs)
                mine.requires_grad_(theirs.requires_grad)
            for mine, theirs in zip(shadow.buffers(), module.buffers()):
                mine.copy_(theirs)
        shadow.train(module.training)
        return shadow, cast_inputs(inputs, target)

    def _params_of(self, module: nn.Module) -> list[Tensor]:
        """The tensors of :attr:`params` in ``module`` (itself or its :meth:`_promoted` copy)."""
        if self._shadow is None or module is not self._shadow[1]:
            return self.params
        named = dict(module.named_parameters())
        return [named[name] for name in self._param_names]

    def _gram(self, M: Tensor) -> Tensor:
        """``M^T M`` summed in :attr:`sum_dtype` (the model's dtype when None).

        Shapes:
            ``(rows, params) -> (params, params)``
        """
        return gram(M, self.sum_dtype or M.dtype)

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: Tensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword arguments {sorted(kwargs)}"
            )
        likelihood = parse_enum(Likelihood, likelihood, "likelihood")
        if likelihood == Likelihood.REWARD_MODELING:
            likelihood = Likelihood.CLASSIFICATION
        self.model = model
        self.likelihood = likelihood
        self.last_layer = last_layer
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        named = _trainable(self._feature_extractor().last_layer if last_layer else model)
        if not named:
            where = "model.last_layer" if last_layer else "model"
            raise ValueError(f"{where} has no parameters with requires_grad=True")
        self._param_names = list(named)
        self.params = list(named.values())
        self.n_params = sum(p.numel() for p in self.params)
        self.subnetwork_indices = self._check_indices(subnetwork_indices)
        regression = likelihood == Likelihood.REGRESSION
        self.factor = 0.5 if regression else 1.0
        self.lossfunc: nn.Module = (
            nn.MSELoss(reduction="sum") if regression else nn.CrossEntropyLoss(reduction="sum")
        )

    # ------------------------------------------------------------------ checks
    def _check_indices(self, indices: Tensor | None) -> Tensor | None:
        """Validate ``subnetwork_indices`` and move them to the parameters' device."""
        if indices is None:
            return None
        if (
            not isinstance(indices, Tensor)
            or indices.dtype not in (torch.int32, torch.int64)
            or indices.ndim != 1
            or indices.numel() == 0
            or indices.min() < 0
            or indices.max() >= self.n_params
            or indices.unique().numel() != indices.numel()
        ):
            raise ValueError(
                "subnetwork_indices must be a non-empty 1-D LongTensor of distinct indices in "
                f"[0, {self.n_params}), got {indices!r}"
            )
        return indices.to(device=self.params[0].device, dtype=torch.long)

    def _feature_extractor(self, found: bool = True) -> Any:
        """The model, checked to be a feature extractor.

        Args:
            found: Also require its ``last_layer`` to be known; otherwise it may still be
                ``None`` (a :class:`~laplace.utils.FeatureExtractor` finds it on its first
                forward pass).

        Raises:
            ValueError: If the model has no ``forward_with_features`` and ``last_layer``, or
                (with ``found``) its last layer has not been found yet.
        """
        last = getattr(self.model, "last_layer", None)
        if (
            not callable(getattr(self.model, "forward_with_features", None))
            or not hasattr(self.model, "last_layer")
            or not (last is None or isinstance(last, nn.Module))
        ):
            raise ValueError(
                "model must be a feature extractor with a `last_layer` module and "
                f"`forward_with_features(x)` for last-layer curvature, got "
                f"{type(self.model).__name__}"
            )
        if found and last is None:
            raise ValueError(
                "the feature extractor's last layer has not been found yet: pass "
                "last_layer_name, or call model.find_last_layer(x) once, before building a "
                "backend with last_layer=True"
            )
        return self.model

    def _check_inputs(self, x: Inputs, enable_backprop: bool = False) -> None:
        """Raise if this backend cannot take ``x`` or backpropagate as asked."""
        if isinstance(x, MutableMapping):
            if not self.supports_dict_inputs:
                raise ValueError(f"{type(self).__name__} does not support dict-like inputs")
            if self.dict_key_x not in x:
                raise ValueError(
                    f"dict-like input has no key dict_key_x={self.dict_key_x!r}; keys: {list(x)}"
                )
        elif not isinstance(x, Tensor):
            raise ValueError(f"x must be a Tensor or a dict-like batch, got {type(x).__name__}")
        if enable_backprop and not self.supports_backprop:
            raise NotImplementedError(f"{type(self).__name__} does not support enable_backprop")

    def _check_targets(self, y: Tensor, f: Tensor) -> Tensor:
        """Check ``y`` against the output ``f`` and return it ready for ``lossfunc``.

        Shapes:
            ``y``: ``(batch,)`` integer labels (classification) or ``(batch, outputs)``
            floats (regression); ``f``: ``(batch, outputs)``

        Raises:
            ValueError: If ``y`` has the wrong type, shape, dtype or label range.
        """
        if not isinstance(y, Tensor):
            raise ValueError(f"y must be a Tensor, got {type(y).__name__}")
        if self.likelihood == Likelihood.REGRESSION:
            if not y.is_floating_point() or y.shape != f.shape:
                raise ValueError(
                    f"regression targets y must be floating with the output's shape "
                    f"{tuple(f.shape)}, got dtype {y.dtype} and shape {tuple(y.shape)}"
                )
            return y.to(dtype=f.dtype)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"classification targets y must be integer labels, got {y.dtype}")
        if y.shape != f.shape[:1]:
            raise ValueError(
                f"classification targets y must have shape ({f.shape[0]},), got {tuple(y.shape)}"
            )
        if y.numel() and (y.min() < 0 or y.max() >= f.shape[1]):
            raise ValueError(
                f"classification labels must lie in [0, {f.shape[1]}), got values in "
                f"[{y.min().item()}, {y.max().item()}]"
            )
        return y.long()

    @staticmethod
    def _check_output(f: Tensor) -> None:
        if f.ndim != 2:
            raise ValueError(f"model output must have shape (batch, outputs), got {f.ndim}-D")

    @staticmethod
    def _check_finite(curvature: Tensor) -> Tensor:
        """Return ``curvature``, or raise ``ValueError`` if it has NaN or Inf entries."""
        if not all_finite(curvature):
            raise ValueError(
                "the curvature contains NaN or Inf values; check the model (outputs and "
                "parameters) and the data for NaN, Inf or overflow"
            )
        return curvature

    def _check_structure(
        self, structure: HessianStructure, options: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Raise unless this backend computes ``structure`` for its parameters with the
        keyword ``options`` of its structure method; return them validated.

        Raises:
            NotImplementedError: If ``structure`` is not in ``structures``.
            ValueError: For ``kron`` with ``subnetwork_indices``, or bad ``options`` (see
                :meth:`curvature_options`).
        """
        if structure not in self.structures:
            supported = ", ".join(sorted(repr(s.value) for s in self.structures)) or "none"
            raise NotImplementedError(
                f"{type(self).__name__} does not compute {structure.value!r} curvature; "
                f"structures it supports: {supported}"
            )
        if structure == HessianStructure.KRON and self.subnetwork_indices is not None:
            raise ValueError(
                f"{type(self).__name__} cannot compute 'kron' curvature with "
                "subnetwork_indices: a subnetwork has no Kronecker factors"
            )
        return self.curvature_options(structure, options or {})

    def curvature_options(
        self, structure: HessianStructure | str, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Check keyword options of the structure method ``structure``; return them validated.

        The one check of every backend's options: the keywords a structure method takes
        beyond ``x, y, N, generator, out`` are those in ``structure_options[structure]``
        (see :mod:`laplace.curvature._options`); any other raises instead of being ignored.

        Args:
            structure: ``"full"``, ``"diag"`` or ``"kron"``.
            options: The keyword arguments, such as a Laplace object's ``asdl_fisher_kwargs``.

        Returns:
            The options with validated values.

        Raises:
            UnknownOptionError: For a keyword the method does not take (a ``TypeError`` and a
                ``ValueError``), naming the backend, the method and the accepted options.
            ValueError: For a value of the wrong type or range.
        """
        structure = parse_enum(HessianStructure, structure, "structure")
        accepted = self.structure_options.get(structure, frozenset())
        return check_options(f"{type(self).__name__}.{structure.value}", accepted, options)

    # ------------------------------------------------------------------ hooks
    def _module_and_input(
        self, x: Inputs, enable_backprop: bool = False
    ) -> tuple[nn.Module, Inputs]:
        """The module whose ``params`` are differentiated, and the input to apply it to.

        ``(model, x)``; with ``last_layer=True`` ``(model.last_layer, phi)`` with the
        features ``phi`` of ``x``, detached unless ``enable_backprop``.
        """
        if not self.last_layer:
            return self.model, x
        return self._features(x, enable_backprop)

    def _features(self, x: Inputs, enable_backprop: bool) -> tuple[nn.Module, Tensor]:
        """The last layer and the features ``phi`` of ``x`` it is applied to.

        A feature extractor whose last layer is not known yet finds it in this forward pass.
        With ``enable_backprop`` the features stay on the graph of ``x`` even where the
        extractor detaches them by default (built with ``enable_backprop=False``).
        """
        extractor = self._feature_extractor(found=False)
        with (
            nullcontext() if enable_backprop else torch.no_grad(),
            _features_attached(extractor, enable_backprop),
        ):
            _, phi = extractor.forward_with_features(x)
        layer = self._feature_extractor().last_layer
        return layer, phi if enable_backprop else phi.detach()

    def _restrict(self, tensor: Tensor) -> Tensor:
        """Select the ``subnetwork_indices`` entries of the last (parameter) dimension."""
        if self.subnetwork_indices is None:
            return tensor
        return tensor.index_select(-1, self.subnetwork_indices)

    # ------------------------------------------------------------------ torch.func
    def _jacobians_of(
        self, module: nn.Module, named: dict[str, Tensor], inputs: Inputs, enable_backprop: bool
    ) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians of ``module(inputs)`` w.r.t. the tensors ``named``.

        Each sample is vmapped as a batch of one: one backward pass per sample and output.
        A module that ``vmap`` cannot batch (data-dependent control flow, such as the
        attention-mask code of Hugging Face models) runs each sample as a batch of one with
        one ordinary backward pass per output instead, from its first failure on
        (:mod:`laplace.curvature._fallback`).

        Shapes:
            ``Js``: ``(batch, outputs, params)``; ``f``: ``(batch, outputs)``
        """
        batched, rebuild = _split_samples(inputs, batch_size(inputs, self.dict_key_x))

        def output(theta: dict[str, Tensor], sample: Any) -> tuple[Tensor, Tensor]:
            out = functional_call(module, theta, (rebuild(sample),))
            self._check_output(out)
            return out[0], out[0]

        def vmapped() -> tuple[Tensor, Tensor]:
            theta = named if enable_backprop else {n: p.detach() for n, p in named.items()}
            with nullcontext() if enable_backprop else torch.no_grad():
                jac, f = vmap(jacrev(output, has_aux=True), in_dims=(None, 0))(theta, batched)
            return torch.cat([jac[name].flatten(2) for name in theta], dim=2), f

        def looped() -> tuple[Tensor, Tensor]:
            return looped_jacobians(
                module, named, batched, rebuild, enable_backprop, self._check_output
            )

        return run_with_fallback(module, FastPath.VMAP, vmapped, looped)

    def jacobians(self, x: Inputs, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians of the model output w.r.t. the parameters.

        Args:
            x: A batch of inputs: a tensor, or a dict-like batch passed to the model whole.
            enable_backprop: Keep ``Js`` and ``f`` differentiable (w.r.t. ``x`` and the
                parameters); otherwise they are detached.

        Returns:
            ``(Js, f)``: the Jacobians and the model output.

        Shapes:
            ``Js``: ``(batch, outputs, params)``; ``f``: ``(batch, outputs)``

        Raises:
            ValueError: For inputs this backend cannot take, or an output that is not 2-D.
        """
        self._check_inputs(x, enable_backprop)
        module, inputs = self._module_and_input(x, enable_backprop)
        named = dict(zip(self._param_names, self.params))
        Js, f = self._jacobians_of(module, named, inputs, enable_backprop)
        return self._restrict(Js), f

    def last_layer_jacobians(
        self, x: Inputs, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Jacobians of a feature extractor's output w.r.t. its last layer's parameters.

        For a linear last layer these are ``I ⊗ phi`` (weight, row-major) followed by the
        identity (bias). With ``last_layer=True`` this is :meth:`jacobians`; otherwise every
        trainable parameter of ``model.last_layer`` is included, without restriction, and a
        feature extractor whose last layer is not known yet finds it on this first use.

        Args:
            x: A batch of inputs.
            enable_backprop: Keep ``Js`` and ``f`` differentiable w.r.t. ``x``.

        Returns:
            ``(Js, f)``: the Jacobians and the model output.

        Shapes:
            ``Js``: ``(batch, outputs, last-layer params)``; ``f``: ``(batch, outputs)``

        Raises:
            ValueError: If the model is no feature extractor.
        """
        if self.last_layer:
            return self.jacobians(x, enable_backprop)
        self._check_inputs(x, enable_backprop)
        layer, phi = self._features(x, enable_backprop)
        return self._jacobians_of(layer, _trainable(layer), phi, enable_backprop)

    def gradients(self, x: Inputs, y: Tensor) -> tuple[Tensor, Tensor]:
        """Detached per-sample gradients of the loss ``factor * lossfunc(f_n, y_n)``.

        Vmapped over the samples; for a module ``vmap`` cannot batch, one forward pass over
        the batch and one backward pass per sample (:mod:`laplace.curvature._fallback`).

        Args:
            x: A batch of inputs.
            y: The targets (labels for classification).

        Returns:
            ``(Gs, loss)``: the gradients and the loss summed over the batch.

        Shapes:
            ``Gs``: ``(batch, params)``; ``loss``: ``()``

        Raises:
            ValueError: For bad inputs or targets.
        """
        self._check_inputs(x)
        module, inputs = self._module_and_input(x)
        named = dict(zip(self._param_names, self.params))
        with torch.no_grad():
            f = functional_call(module, named, (inputs,))
        self._check_output(f)
        y = self._check_targets(y, f)
        batched, rebuild = _split_samples(inputs, f.shape[0])

        def sample_loss(theta: dict[str, Tensor], sample: Any, target: Tensor) -> Tensor:
            out = functional_call(module, theta, (rebuild(sample),))
            return self.factor * self.lossfunc(out, target.unsqueeze(0))

        def vmapped() -> Tensor:
            with torch.no_grad():
                grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(named, batched, y)
            return torch.cat([grads[name].flatten(1) for name in named], dim=1)

        def looped() -> Tensor:  # one forward pass, one backward pass per sample
            leaves = {name: p.detach().requires_grad_(True) for name, p in named.items()}
            with torch.enable_grad():
                out = functional_call(module, leaves, (inputs,))
                losses = [self.lossfunc(out[n : n + 1], y[n : n + 1]) for n in range(len(y))]
                Gs = jacobian_rows(self.factor * torch.stack(losses), list(leaves.values()))
            return Gs.detach()

        Gs = run_with_fallback(module, FastPath.VMAP, vmapped, looped)
        return self._restrict(Gs), self.factor * self.lossfunc(f, y)

    # ------------------------------------------------------------------ structures
    def full(
        self, x: Inputs, y: Tensor, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """``(loss, H)`` of a batch with ``H`` of shape ``(params, params)``."""
        self._check_structure(HessianStructure.FULL)
        raise NotImplementedError(f"{type(self).__name__} lists 'full' but lacks full()")

    def diag(
        self, x: Inputs, y: Tensor, N: int | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """``(loss, h)`` of a batch with the curvature diagonal ``h`` of shape ``(params,)``."""
        self._check_structure(HessianStructure.DIAG)
        raise NotImplementedError(f"{type(self).__name__} lists 'diag' but lacks diag()")

    def kron(self, x: Inputs, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Any]:
        """``(loss, Kron)`` of a batch: the Kronecker-factored curvature."""
        self._check_structure(HessianStructure.KRON)
        raise NotImplementedError(f"{type(self).__name__} lists 'kron' but lacks kron()")
