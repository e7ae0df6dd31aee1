"""Curvature backends built on BackPACK (Dangel, Kunstner & Hennig, 2020).

BackPACK extends the backward pass of ``nn.Sequential`` models of supported layers so that
one backward pass also yields per-sample gradients, squared-gradient sums, GGN diagonals,
GGN square roots or Kronecker factors. :class:`BackPackGGN` and :class:`BackPackEF` use:

- Jacobians: ``BatchGrad`` on each output dimension summed over the batch (one backward
  pass per output); with ``enable_backprop`` the passes build a graph, so ``Js`` and ``f``
  stay differentiable w.r.t. the inputs.
- per-sample gradients and the empirical Fisher: ``BatchGrad`` on the loss, ``full`` as
  ``G^T G``, ``diag`` from ``SumGradSquared``.
- GGN ``full``: ``S^T S`` with the square root ``S`` of ``SqrtGGNExact`` (``SqrtGGNMC``
  with ``num_samples`` sampled targets when ``stochastic``); ``diag``: ``DiagGGNExact``
  (``DiagGGNMC``); ``kron``: ``KFLR`` (``KFAC``). BackPACK offers no empirical-Fisher K-FAC.

The model (or, with ``last_layer=True``, ``model.last_layer``) must be an ``nn.Sequential``
of the layers in ``_LAYERS`` and ``_PARAMETER_FREE`` (or one such layer); other models,
normalisation layers included, are rejected at construction; a
:class:`~laplace.utils.FeatureExtractor` is replaced by the model it wraps (its forward pass is
that model's), so its ``last_layer_jacobians`` work before its last layer is found, by
``torch.func`` on the last layer as in every backend. BackPACK's hooks would break
``torch.func`` transforms of the model, so they are installed on a copy that shares the
model's parameters and buffers (:func:`_extended_copy`); the user's model is left unchanged,
and the copy's train/eval mode follows the model's on every call.

Scaling: BackPACK differentiates the summed ``MSELoss``/``CrossEntropyLoss``; the GGN and its
Kronecker factors are multiplied by ``factor`` (spread evenly over a block's two factors),
per-sample gradients by ``factor`` and the empirical Fisher by ``factor ** 2``, as in
:mod:`laplace.curvature.curvlinops`. The K-FAC blocks follow that module's convention
exactly: one block per trainable parameter tensor, ``[B, A]`` for weights and ``[B]`` for
biases, ``A = 1 / (N R) sum a a^T`` and ``B = sum g g^T`` over samples, weight-sharing
locations and square-root columns. For ``nn.Linear`` these are BackPACK's factors (``A``
rescaled by ``M / N``), summed as Grams in the backend's ``sum_dtype`` by
:class:`_PreciseLinear`; for ``nn.Conv2d`` BackPACK sums ``g`` over the ``R`` locations
before the outer product and omits ``1 / R``, so :class:`_ExpandConv2d` replaces its module
extension.

References:
    Dangel, F., Kunstner, F., Hennig, P. BackPACK: Packing more into backprop. ICLR, 2020.
    Martens, J., Grosse, R. Optimizing neural networks with Kronecker-factored approximate
    curvature. ICML, 2015.
    Botev, A., Ritter, H., Barber, D. Practical Gauss-Newton optimisation for deep learning.
    ICML, 2017.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, ClassVar

import torch
from backpack import backpack, extend
from backpack.extensions import (
    KFAC,
    KFLR,
    BatchGrad,
    DiagGGNExact,
    DiagGGNMC,
    SqrtGGNExact,
    SqrtGGNMC,
    SumGradSquared,
)
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor, nn

from laplace.curvature._backpack_support import (
    _KFAC_LAYERS,
    _KFAC_PARAMETER_FREE,
    _check_backpack_model,
    _ExpandConv2d,
    _extended_copy,
    _hooks_active,
    _is_sequential,
    _PreciseLinear,
    _seeded,
)
from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils.data import Inputs
from laplace.utils.enums import HessianStructure, Likelihood
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.matrix import Kron

__all__ = ["BackPackInterface", "BackPackGGN", "BackPackEF"]


class BackPackInterface(CurvatureInterface):
    """Shared machinery of the BackPACK backends (see the module docstring).

    Jacobians and per-sample gradients come from BackPACK's ``BatchGrad``;
    :meth:`last_layer_jacobians` without ``last_layer=True`` is the inherited ``torch.func``
    version on ``model.last_layer``. Dict-like inputs are not supported.

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``**kwargs`` are as for :class:`~laplace.curvature.CurvatureInterface`;
    the model (or ``model.last_layer``, or the model a
    :class:`~laplace.utils.FeatureExtractor` wraps) must be an ``nn.Sequential`` of supported
    layers.

    Raises:
        ValueError: For the reasons of :class:`~laplace.curvature.CurvatureInterface`, or a
            model BackPACK cannot handle (not an ``nn.Sequential``, a normalisation layer,
            a module without BackPACK extension).
    """

    supports_dict_inputs: ClassVar[bool] = False
    supports_backprop: ClassVar[bool] = True

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
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, **kwargs
        )
        if last_layer:
            target, where = self._feature_extractor().last_layer, "model.last_layer"
        elif isinstance(model, FeatureExtractor):  # its forward is that of the wrapped model
            target, where = model.model, "model.model"
        else:
            target, where = model, "model"
        _check_backpack_model(target, where)
        self._target = target
        self._extended = _extended_copy(target)
        self._extended_loss = extend(type(self.lossfunc)(reduction="sum"))

    # ------------------------------------------------------------------ hooks
    def _check_inputs(self, x: Inputs, enable_backprop: bool = False) -> None:
        """Reject dict-like inputs, naming the backends that take them; else as the base."""
        if isinstance(x, MutableMapping):
            from laplace.curvature import BACKENDS

            able = ", ".join(b.__name__ for b in BACKENDS if b.supports_dict_inputs)
            raise ValueError(
                f"{type(self).__name__} does not support dict-like inputs (BackPACK needs an "
                f"nn.Sequential applied to a tensor); backends that do: {able}"
            )
        super()._check_inputs(x, enable_backprop)

    def _module_and_input(
        self, x: Inputs, enable_backprop: bool = False
    ) -> tuple[nn.Module, Inputs]:
        """The extended copy (in the model's train/eval mode) and its input."""
        _, inputs = super()._module_and_input(x, enable_backprop)
        for target, extended in zip(self._target.modules(), self._extended.modules()):
            extended.training = target.training
        return self._extended, inputs if enable_backprop else inputs.detach()

    # ------------------------------------------------------------------ helpers
    def _collect(self, savefield: str, lead: int) -> Tensor:
        """Concatenate what BackPACK stored on each parameter, and remove it from them.

        Args:
            savefield: The attribute the extension wrote.
            lead: Number of leading (sample, output) dimensions before the parameter's own.

        Shapes:
            ``(*lead dims, params)``
        """
        values = []
        for p in self.params:
            values.append(getattr(p, savefield).flatten(lead))
            delattr(p, savefield)
        return torch.cat(values, dim=lead)

    def _loss_pass(self, x: Inputs, y: Tensor, extension: BackpropExtension) -> Tensor:
        """Differentiate the summed loss of a batch with ``extension`` active.

        Returns:
            The batch loss ``factor * lossfunc(f, y)``, detached.

        Raises:
            ValueError: For bad inputs, outputs or targets.
        """
        self._check_inputs(x)
        module, inputs = self._module_and_input(x)
        with _hooks_active():
            f = module(inputs)
            self._check_output(f)
            loss = self._extended_loss(f, self._check_targets(y, f))
            with backpack(extension):
                torch.autograd.grad(loss, self.params)
        return self.factor * loss.detach()

    # ------------------------------------------------------------------ public
    def jacobians(self, x: Inputs, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians of the model output w.r.t. the parameters (``BatchGrad``).

        One backward pass of ``f[:, k].sum()`` per output ``k``. With ``enable_backprop``
        the passes build a graph: ``Js`` and ``f`` are differentiable w.r.t. ``x`` (and the
        features with ``last_layer=True``).

        Args:
            x: A batch of input tensors.
            enable_backprop: Keep ``Js`` and ``f`` differentiable; otherwise detached.

        Returns:
            ``(Js, f)``: the Jacobians (restricted to ``subnetwork_indices``) and the output.

        Shapes:
            ``Js``: ``(batch, outputs, params)``; ``f``: ``(batch, outputs)``

        Raises:
            ValueError: For dict-like or non-tensor inputs, or an output that is not 2-D.
        """
        self._check_inputs(x, enable_backprop)
        module, inputs = self._module_and_input(x, enable_backprop)
        # a module's hooks fire only once the gradient w.r.t. its input is formed
        wrt = [*self.params, inputs] if inputs.requires_grad else self.params
        rows = []
        with _hooks_active():
            f = module(inputs)
            self._check_output(f)
            for k in range(f.shape[1]):
                last = k == f.shape[1] - 1
                with backpack(BatchGrad(), retain_graph=not last):
                    torch.autograd.grad(
                        f[:, k].sum(),
                        wrt,
                        retain_graph=enable_backprop or not last,
                        create_graph=enable_backprop,
                    )
                rows.append(self._collect("grad_batch", lead=1))
        Js = torch.stack(rows, dim=1)
        if not enable_backprop:
            Js, f = Js.detach(), f.detach()
        return self._restrict(Js), f

    def gradients(self, x: Inputs, y: Tensor) -> tuple[Tensor, Tensor]:
        """Detached per-sample gradients of ``factor * lossfunc(f_n, y_n)`` (``BatchGrad``).

        Args:
            x: A batch of input tensors.
            y: The targets (labels for classification).

        Returns:
            ``(Gs, loss)``: the gradients and the loss summed over the batch.

        Shapes:
            ``Gs``: ``(batch, params)``; ``loss``: ``()``

        Raises:
            ValueError: For bad inputs or targets.
        """
        loss = self._loss_pass(x, y, BatchGrad())
        return self._restrict(self.factor * self._collect("grad_batch", lead=1)), loss


class BackPackGGN(BackPackInterface, GGNInterface):
    """Generalized Gauss-Newton with BackPACK (the Monte-Carlo Fisher when ``stochastic``).

    ``full`` from ``SqrtGGNExact`` (``SqrtGGNMC``), ``diag`` from ``DiagGGNExact``
    (``DiagGGNMC``), ``kron`` from ``KFLR`` (``KFAC``), with ``mc_samples=num_samples``.
    Every structure method takes a ``generator``; BackPACK samples from torch's global
    generator, which is then seeded from ``generator`` (or the one given at construction)
    and restored afterwards.

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``stochastic``, ``num_samples``, ``generator``, ``**kwargs`` are as for
    :class:`~laplace.curvature.GGNInterface`.

    Raises:
        ValueError: As :class:`BackPackInterface`, or for a bad ``num_samples``.
    """

    structures: ClassVar[frozenset[HessianStructure]] = frozenset(
        {HessianStructure.FULL, HessianStructure.DIAG, HessianStructure.KRON}
    )

    def _sampled_pass(
        self, x: Inputs, y: Tensor, extension: BackpropExtension, generator: torch.Generator | None
    ) -> Tensor:
        """:meth:`_loss_pass` with BackPACK's sampling seeded from ``generator``."""
        generator = self.generator if generator is None else generator
        with _seeded(generator if self.stochastic else None, self.params[0].device):
            return self._loss_pass(x, y, extension)

    def full(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Loss and dense GGN ``S^T S`` of a batch, from BackPACK's GGN square root ``S``.

        Args:
            x: A batch of input tensors.
            y: The targets.
            N: Size of the data set; unused (accepted for the common interface).
            generator: Random generator for the sampled GGN (``stochastic=True``).
            **kwargs: ``mc_samples`` and ``seed`` of the sampled GGN (``structure_options``).

        Returns:
            ``(loss, H)`` with ``H`` restricted to ``subnetwork_indices`` if given.

        Shapes:
            ``H``: ``(params, params)``

        Raises:
            ValueError: For bad inputs or targets, or a non-finite curvature.
        """
        options = self._check_structure(HessianStructure.FULL, kwargs)
        generator, samples = self._sampling(generator, options)
        extension = SqrtGGNMC(mc_samples=samples) if self.stochastic else SqrtGGNExact()
        loss = self._sampled_pass(x, y, extension, generator)
        root = self._restrict(self._collect(extension.savefield, lead=2)).flatten(0, 1)
        return loss, self._check_finite(self.factor * self._gram(root))

    def diag(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Loss and GGN diagonal of a batch (``DiagGGNExact``, or ``DiagGGNMC``).

        Args:
            x: A batch of input tensors.
            y: The targets.
            N: Size of the data set; unused (accepted for the common interface).
            generator: Random generator for the sampled diagonal (``stochastic=True``).
            **kwargs: ``mc_samples`` and ``seed`` of the sampled GGN (``structure_options``).

        Returns:
            ``(loss, h)`` with ``h`` restricted to ``subnetwork_indices`` if given.

        Shapes:
            ``h``: ``(params,)``

        Raises:
            ValueError: For bad inputs or targets, or a non-finite diagonal.
        """
        options = self._check_structure(HessianStructure.DIAG, kwargs)
        generator, samples = self._sampling(generator, options)
        extension = DiagGGNMC(mc_samples=samples) if self.stochastic else DiagGGNExact()
        loss = self._sampled_pass(x, y, extension, generator)
        h = self._restrict(self._collect(extension.savefield, lead=0))
        return loss, self._check_finite(self.factor * h)

    def kron(
        self,
        x: Inputs,
        y: Tensor,
        N: int,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Kron]:
        """Loss and K-FAC of a batch (``KFLR``, or ``KFAC``), as in the module docstring.

        Args:
            x: A batch of input tensors.
            y: The targets.
            N: Size of the data set; the input-side factors are multiplied by ``M / N``.
            generator: Random generator for the sampled factors (``stochastic=True``).
            **kwargs: ``mc_samples`` and ``seed`` of the sampled GGN (``structure_options``).

        Returns:
            ``(loss, kron)`` with one block per parameter, ``[B, A]`` for weights and
            ``[B]`` for biases.

        Raises:
            ValueError: For ``subnetwork_indices``, a bad ``N``, bad inputs or targets,
                modules BackPACK's K-FAC does not support, or non-finite factors.
        """
        options = self._check_structure(HessianStructure.KRON, kwargs)
        generator, samples = self._sampling(generator, options)
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ValueError(f"N must be a positive integer (the data-set size), got {N!r}")
        self._check_kfac_modules()
        extension = KFAC(mc_samples=samples) if self.stochastic else KFLR()
        extension.set_module_extension(nn.Conv2d, _ExpandConv2d(self.sum_dtype), overwrite=True)
        extension.set_module_extension(nn.Linear, _PreciseLinear(self.sum_dtype), overwrite=True)
        loss = self._sampled_pass(x, y, extension, generator)
        input_scale = y.shape[0] / N
        kfacs = []
        for p in self.params:
            factors = getattr(p, extension.savefield)
            delattr(p, extension.savefield)
            if len(factors) == 2:
                factors = [factors[0], input_scale * factors[1]]
            kfacs.append([self._check_finite(factor) for factor in factors])
        # the loss factor is spread evenly over a block's factors (sqrt on each of B and A)
        return loss, Kron(kfacs) * self.factor

    def _check_kfac_modules(self) -> None:
        """Raise unless BackPACK's K-FAC supports every module and each layer is K-FAC'd here.

        Raises:
            ValueError: Naming the first unsupported module.
        """
        for name, module in self._target.named_modules(prefix="model"):
            if _is_sequential(module) or type(module) in _KFAC_PARAMETER_FREE:
                continue
            if type(module) not in _KFAC_LAYERS:
                raise ValueError(
                    f"{type(self).__name__}.kron supports only nn.Linear and nn.Conv2d layers "
                    f"and {', '.join(t.__name__ for t in _KFAC_PARAMETER_FREE)}; {name} is a "
                    f"{type(module).__name__}; use CurvlinopsGGN for other models"
                )
            if isinstance(module, nn.Conv2d) and (
                module.groups != 1
                or module.padding_mode != "zeros"
                or isinstance(module.padding, str)
            ):
                raise ValueError(
                    f"{type(self).__name__}.kron supports nn.Conv2d only with groups=1, "
                    f"padding_mode='zeros' and numeric padding; {name} has groups="
                    f"{module.groups}, padding={module.padding!r}, padding_mode="
                    f"{module.padding_mode!r}; use CurvlinopsGGN"
                )


class BackPackEF(BackPackInterface, EFInterface):
    """Empirical Fisher ``sum_n g_n g_n^T`` with BackPACK.

    ``full`` is :class:`~laplace.curvature.EFInterface`'s ``G^T G`` from the per-sample
    gradients of ``BatchGrad`` (:meth:`gradients`), ``diag`` is from ``SumGradSquared``.
    BackPACK has no empirical-Fisher K-FAC, so ``kron`` is not among the ``structures``
    (calling it raises ``NotImplementedError``).

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``**kwargs`` are as for :class:`BackPackInterface`.
    """

    structures: ClassVar[frozenset[HessianStructure]] = frozenset(
        {HessianStructure.FULL, HessianStructure.DIAG}
    )

    def diag(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Loss and empirical-Fisher diagonal of a batch (``SumGradSquared``).

        Args:
            x: A batch of input tensors.
            y: The targets.
            N: Size of the data set; unused (accepted for the common interface).
            generator: Unused (accepted for the common interface).
            **kwargs: None are accepted (``structure_options`` is empty).

        Returns:
            ``(loss, h)`` with ``h`` restricted to ``subnetwork_indices`` if given.

        Shapes:
            ``h``: ``(params,)``

        Raises:
            ValueError: For bad inputs or targets, or a non-finite diagonal.
        """
        self._check_structure(HessianStructure.DIAG, kwargs)
        extension = SumGradSquared()
        loss = self._loss_pass(x, y, extension)
        h = self._restrict(self._collect(extension.savefield, lead=0))
        return loss, self._check_finite(self.factor**2 * h)
