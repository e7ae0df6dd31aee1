"""Curvature backends built on ASDL (distribution ``asdfghjkl`` 0.1a4, module ``asdl``).

ASDL (Osawa et al., 2023) forms per-sample gradients and curvature matrices with hooks on the
layers of a network. :class:`AsdlGGN`, :class:`AsdlEF` and :class:`AsdlHessian` adapt its
public API to :class:`~laplace.curvature.CurvatureInterface`:

- ``jacobians``: one ``asdl.batch_gradient`` pass per output; ``gradients``: one pass of the
  loss. ``batch_size=`` sums positions that share a weight (sequences) into their sample.
  ASDL detaches what its hooks see: ``enable_backprop=True`` uses the ``torch.func`` version.
- GGN and EF ``full``/``diag``/``kron``: ``FisherConfig``/``get_fisher_maker`` with
  ``FISHER_EXACT`` (the GGN; a sum over classes for cross-entropy), ``FISHER_MC``
  (``stochastic=True``) or ``FISHER_EMP`` and ``SHAPE_FULL``/``SHAPE_DIAG``/``SHAPE_KRON``.
  Parameters must be weights and biases of ``nn.Linear``, ``nn.Conv2d`` (``groups=1``,
  ``dilation=1``, numeric zero padding) or, except for K-FAC, ``nn.LayerNorm`` layers. As in
  ASDL, ``diag`` treats the positions of a layer applied to sequences as separate samples
  and ``full`` refuses such layers.
- Hessian ``full``/``diag``: ``HessianMaker`` with ``SHAPE_FULL`` (any model, one
  double-backward pass per parameter) or ``SHAPE_DIAG`` (per-layer blocks of ``weight`` and
  ``bias`` parameters).

``asdl_fisher_kwargs`` (:data:`FISHER_OPTIONS`, the ``structure_options`` of every structure)
go into ``FisherConfig``: ``var``, the variance of the Gaussian the Monte-Carlo Fisher samples
regression targets from (default 1), and ``seed``, a fixed seed of ASDL's sampler (default:
drawn from ``generator`` per call). The Hessian checks and ignores them. Other keywords raise
:class:`~laplace.errors.UnknownOptionError` (the sampled Fisher's number of targets per input
is the ``num_samples`` of the constructor).

Scaling: curvatures are those of ``factor * sum_n loss_n``, as in
:mod:`laplace.curvature.curvlinops`. ASDL's exact and sampled Fisher of a squared error is
already the GGN of ``0.5 * sum (f - y) ** 2``; its empirical Fisher is that of the summed loss
it is given. K-FAC follows curvlinops factor for factor: ``[B, A]`` per weight, ``[B]`` per
bias, ``B`` the output factor of the summed loss (ASDL's ``B`` over ``factor`` for the GGN),
``A = 1 / (N R) sum_{n, r} a_nr a_nr^T`` (ASDL's ``A`` over ``N``; ASDL averages a
convolution's ``R`` locations itself, a linear layer's ``R`` positions are divided out here),
then ``Kron(...) * factor`` (``factor ** 2`` for the EF). ASDL 0.1a4 divides each of its ``n``
sampled losses by ``n`` before squaring, so :class:`AsdlGGN` multiplies its Monte-Carlo
Fisher by ``n``. Models are left as found: ASDL's result attributes are deleted, ``.grad``
is not touched, the global random state is restored. No private ``asdl`` API is used.
With a ``sum_dtype`` above the model's (float64 for float32 models inside a Laplace object,
:mod:`laplace.utils.precision`) the curvature runs on a copy of the module in that dtype, since
ASDL sums inside in the module's dtype.

References:
    Osawa, K., Ishikawa, S., Yokota, R., Li, S., Hoefler, T. ASDL: A unified interface for
    gradient preconditioning in PyTorch. arXiv:2305.04684, 2023.
    Martens, J., Grosse, R. Optimizing neural networks with Kronecker-factored approximate
    curvature. ICML, 2015.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

with warnings.catch_warnings():
    # asdl 0.1a4 decorates helpers with the deprecated ``torch.jit.script`` on import
    warnings.simplefilter("ignore", FutureWarning)
    from asdl import (
        FISHER_EMP,
        FISHER_EXACT,
        FISHER_MC,
        LOSS_CROSS_ENTROPY,
        LOSS_MSE,
        SHAPE_DIAG,
        SHAPE_FULL,
        SHAPE_KRON,
        FisherConfig,
        HessianConfig,
        HessianMaker,
        batch_gradient,
        get_fisher_maker,
    )

from laplace.curvature._asdl_support import (
    _ATTR,
    _KFAC_LAYERS,
    _LAYERS,
    _asdl_context,
    _linear_positions,
    _Owners,
    _parameter_owners,
)
from laplace.curvature._fallback import math_attention
from laplace.curvature._options import ASDL_OPTIONS
from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils.data import Inputs, batch_size
from laplace.utils.enums import HessianStructure, Likelihood
from laplace.utils.matrix import Kron

__all__ = ["FISHER_OPTIONS", "AsdlInterface", "AsdlGGN", "AsdlEF", "AsdlHessian"]

FISHER_OPTIONS: frozenset[str] = ASDL_OPTIONS
"""The ``asdl_fisher_kwargs`` that ``full``/``diag``/``kron`` pass into ``FisherConfig``."""


class AsdlInterface(CurvatureInterface):
    """Shared machinery of the ASDL backends (see the module docstring).

    Subclasses set ``structures``, ``_fisher_type``, ``_scale_power`` (``1`` for curvatures
    linear in the loss, ``2`` for the empirical Fisher) and ``_asdl_factor_power`` (the power
    of ``factor`` in ASDL's curvature: ``1`` for its exact or sampled Fisher, ``0`` for its
    empirical Fisher).

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``**kwargs`` are as for :class:`~laplace.curvature.CurvatureInterface`.
    """

    supports_dict_inputs: ClassVar[bool] = True
    supports_backprop: ClassVar[bool] = True
    structure_options: ClassVar[Mapping[HessianStructure, frozenset[str]]] = MappingProxyType(
        {
            HessianStructure.FULL: FISHER_OPTIONS,
            HessianStructure.DIAG: FISHER_OPTIONS,
            HessianStructure.KRON: FISHER_OPTIONS,
        }
    )
    _fisher_type: ClassVar[str] = FISHER_EXACT
    _scale_power: ClassVar[int] = 1
    _asdl_factor_power: ClassVar[int] = 1

    # ------------------------------------------------------------------ helpers
    @property
    def _device(self) -> torch.device:
        return self.params[0].device

    @property
    def _fisher_correction(self) -> float:
        """Correction of ASDL's Fisher (:class:`AsdlGGN` overrides it)."""
        return 1.0

    @property
    def _asdl_scale(self) -> float:
        """Multiplier from ASDL's full or diagonal curvature to that of ``factor * loss``."""
        power = self._scale_power - self._asdl_factor_power
        return self.factor**power * self._fisher_correction

    def _fisher_config_kwargs(
        self, generator: torch.Generator | None, seed: int | None
    ) -> dict[str, Any]:
        """``FisherConfig`` arguments selecting the Fisher type (and its sampling)."""
        return {"fisher_type": self._fisher_type}

    def _owners(
        self, module: nn.Module, named: dict[str, Tensor], layers: tuple[type[nn.Module], ...]
    ) -> _Owners:
        """``(layer, "weight" | "bias")`` of each tensor in ``named`` (see
        :func:`~laplace.curvature._asdl_support._parameter_owners`)."""
        return _parameter_owners(type(self).__name__, module, named, layers)

    def _prepare(
        self, x: Inputs, layers: tuple[type[nn.Module], ...] | None
    ) -> tuple[nn.Module, Inputs, _Owners]:
        """Check ``x``; return the module to differentiate, its input and the parameters'
        owners in ``layers`` (none are looked up for ``None``)."""
        self._check_inputs(x)
        module, inputs = self._module_and_input(x)
        if layers is None:
            return module, inputs, []
        named = dict(zip(self._param_names, self.params))
        return module, inputs, self._owners(module, named, layers)

    def _promoted_run(
        self, module: nn.Module, inputs: Inputs, owners: _Owners
    ) -> tuple[nn.Module, Inputs, _Owners]:
        """:meth:`_promoted` module and inputs for ASDL's curvature, and the owners mapped
        to the module it returns (ASDL sums inside, in the module's dtype)."""
        shadow, inputs = self._promoted(module, inputs)
        if shadow is module:
            return module, inputs, owners
        names = {id(m): name for name, m in module.named_modules()}
        layers = dict(shadow.named_modules())
        return shadow, inputs, [(layers[names[id(layer)]], kind) for layer, kind in owners]

    def _loss_of(self, f: Tensor, y: Tensor) -> Tensor:
        """``lossfunc(f, y)`` (summed, without ``factor``) after checking ``f`` and ``y``."""
        self._check_output(f)
        return self.lossfunc(f, self._check_targets(y, f))

    def _batch_gradients(
        self, module: nn.Module, inputs: Inputs, objective: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``asdl.batch_gradient`` of ``objective(module(inputs))``, a sum over samples.

        Returns:
            ``(grads, value)``: the per-sample gradients and the detached objective.

        Shapes:
            ``grads``: ``(batch, trainable params of module)``; ``value``: ``()``
        """
        params = [p for p in module.parameters() if p.requires_grad]

        def closure() -> Tensor:
            value = objective(module(inputs))
            # autograd.grad runs ASDL's hooks without writing to the parameters' .grad
            torch.autograd.grad(value, params, allow_unused=True)
            return value.detach()

        n = batch_size(inputs, self.dict_key_x)
        with _asdl_context(module, None, self._device):
            return batch_gradient(module, closure, return_outputs=True, batch_size=n)

    # ------------------------------------------------------------------ gradients
    def _jacobians_of(
        self, module: nn.Module, named: dict[str, Tensor], inputs: Inputs, enable_backprop: bool
    ) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians by ASDL, one ``batch_gradient`` pass per output.

        With ``enable_backprop`` the ``torch.func`` Jacobians of the base class: ASDL detaches
        the tensors its hooks see, so its Jacobians cannot be differentiated.

        Shapes:
            ``Js``: ``(batch, outputs, params)``; ``f``: ``(batch, outputs)``

        Raises:
            ValueError: For parameters outside supported layers or an output that is not 2-D.
        """
        if enable_backprop:
            return super()._jacobians_of(module, named, inputs, enable_backprop)
        self._owners(module, named, _LAYERS)
        with torch.no_grad():
            f = module(inputs)
        self._check_output(f)
        rows = [
            self._batch_gradients(module, inputs, lambda out, c=c: out[:, c].sum())[0]
            for c in range(f.shape[1])
        ]
        return torch.stack(rows, dim=1), f

    def gradients(self, x: Inputs, y: Tensor) -> tuple[Tensor, Tensor]:
        """Detached per-sample gradients of ``factor * lossfunc(f_n, y_n)``, by ASDL.

        Args:
            x: A batch of inputs: a tensor, or a dict-like batch passed to the model whole.
            y: The targets.

        Returns:
            ``(Gs, loss)``: the gradients and the loss summed over the batch.

        Shapes:
            ``Gs``: ``(batch, params)``; ``loss``: ``()``

        Raises:
            ValueError: For bad inputs or targets, or parameters outside supported layers.
        """
        module, inputs, _ = self._prepare(x, _LAYERS)
        objective = lambda f: self.factor * self._loss_of(f, y)  # noqa: E731
        Gs, loss = self._batch_gradients(module, inputs, objective)
        return self._restrict(Gs), loss

    # ------------------------------------------------------------------ curvature
    def _fisher_config(
        self, shape: str, generator: torch.Generator | None, options: dict[str, Any]
    ) -> FisherConfig:
        """ASDL's configuration of a Fisher of ``shape`` with the checked ``options`` (see
        :meth:`~laplace.curvature.interface.CurvatureInterface.curvature_options`)."""
        var, seed = options.get("var", 1.0), options.get("seed")
        regression = self.likelihood == Likelihood.REGRESSION
        return FisherConfig(
            fisher_shapes=[shape],
            loss_type=LOSS_MSE if regression else LOSS_CROSS_ENTROPY,
            var=var,
            data_size=1,
            fisher_attr=_ATTR,
            **self._fisher_config_kwargs(generator, seed),
        )

    def _model_call(
        self, module: nn.Module, y: Tensor, shape: str, positions: dict[nn.Module, int]
    ) -> Callable[[Inputs], tuple[Tensor, Tensor]]:
        """The model call handed to ASDL, ``inputs -> (f, lossfunc(f, y))``.

        For ``SHAPE_FULL`` it raises, before ASDL's backward pass fails, if a linear layer
        saw several positions per sample: ASDL then forms no per-sample gradients.
        """

        def call(inputs: Inputs) -> tuple[Tensor, Tensor]:
            f = module(inputs)
            if shape == SHAPE_FULL and any(r > 1 for r in positions.values()):
                raise ValueError(
                    f"{type(self).__name__}.full needs per-sample gradients, which ASDL's "
                    "Fisher does not form for a Linear layer applied to several positions per "
                    "sample; use diag or kron, or a torch.func or curvlinops backend"
                )
            return f, self._loss_of(f, y)

        return call

    @contextmanager
    def _asdl_run(
        self,
        x: Inputs,
        y: Tensor,
        shape: str,
        generator: torch.Generator | None,
        options: dict[str, Any],
    ) -> Iterator[tuple[nn.Module, _Owners, dict[nn.Module, int], Tensor]]:
        """Run ASDL's Fisher of ``shape`` with the checked ``options`` on a batch; yield
        what is needed to read it.

        Yields:
            ``(module, owners, positions, loss)``: the differentiated module (ASDL's result
            sits in the ``_ATTR`` attribute of it and of its layers until exit), each
            parameter's layer, each linear layer's positions per sample, the batch loss.
        """
        config = self._fisher_config(shape, generator, options)
        module, inputs, owners = self._promoted_run(
            *self._prepare(x, _KFAC_LAYERS if shape == SHAPE_KRON else _LAYERS)
        )
        positions: dict[nn.Module, int] = {}
        maker = get_fisher_maker(module, config)
        output = maker.setup_model_call(self._model_call(module, y, shape, positions), inputs)
        maker.setup_loss_repr(output[1])
        n = batch_size(inputs, self.dict_key_x)
        try:
            with (
                _asdl_context(module, config.seed, self._device),
                _linear_positions(owners, n, positions),
            ):
                (_, loss), _ = maker.forward_and_backward()
            yield module, owners, positions, self.factor * loss.detach()
        finally:
            maker.zero_fisher()

    def full(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Loss and dense curvature of a batch (ASDL's ``SHAPE_FULL``).

        Args:
            x: A batch of inputs, a tensor or a dict-like batch passed to the model whole.
            y: The targets.
            N: Size of the data set; unused (accepted for the common interface).
            generator: Random generator for the sampled Fisher (``stochastic=True``).
            **kwargs: ASDL Fisher options, :data:`FISHER_OPTIONS`.

        Returns:
            ``(loss, H)`` with ``H`` restricted to ``subnetwork_indices`` if given.

        Shapes:
            ``H``: ``(params, params)``

        Raises:
            UnknownOptionError: For an unknown option (a ``TypeError`` and a ``ValueError``).
            ValueError: For bad inputs, targets or options, unsupported layers, or a
                non-finite curvature.
        """
        options = self._check_structure(HessianStructure.FULL, kwargs)
        with self._asdl_run(x, y, SHAPE_FULL, generator, options) as (module, _, _, loss):
            H = getattr(module, _ATTR).data
        H = self._restrict(self._restrict(H).T)  # rows and columns (H is symmetric)
        return loss, self._check_finite(self._asdl_scale * H)

    def diag(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Loss and curvature diagonal of a batch (ASDL's ``SHAPE_DIAG``).

        Arguments, options and errors as for :meth:`full`; the diagonal is restricted to
        ``subnetwork_indices`` if given.

        Shapes:
            ``h``: ``(params,)``
        """
        options = self._check_structure(HessianStructure.DIAG, kwargs)
        with self._asdl_run(x, y, SHAPE_DIAG, generator, options) as (_, owners, _, loss):
            diagonals = [getattr(layer, _ATTR).diag for layer, _ in owners]
            h = torch.cat([getattr(d, name).flatten() for d, (_, name) in zip(diagonals, owners)])
        return loss, self._check_finite(self._asdl_scale * self._restrict(h))

    def kron(
        self,
        x: Inputs,
        y: Tensor,
        N: int,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Kron]:
        """Loss and K-FAC of a batch (ASDL's ``SHAPE_KRON``), as in the module docstring.

        Args:
            x: A batch of inputs.
            y: The targets.
            N: Size of the data set; the input-side factors are divided by ``N``.
            generator: Random generator for the sampled Fisher (``stochastic=True``).
            **kwargs: ASDL Fisher options, :data:`FISHER_OPTIONS`.

        Returns:
            ``(loss, kron)``: one block per parameter, ``[B, A]`` (weight) or ``[B]`` (bias).

        Raises:
            NotImplementedError: If the backend does not compute ``kron``.
            UnknownOptionError: For an unknown option (a ``TypeError`` and a ``ValueError``).
            ValueError: For ``subnetwork_indices``, a bad ``N``, bad inputs, targets or
                options, a parameter outside Linear/Conv2d layers, or non-finite factors.
        """
        options = self._check_structure(HessianStructure.KRON, kwargs)
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ValueError(f"N must be a positive integer (the data-set size), got {N!r}")
        output_scale = self._fisher_correction / self.factor**self._asdl_factor_power
        kfacs: list[list[Tensor]] = []
        run = self._asdl_run(x, y, SHAPE_KRON, generator, options)
        with run as (_, owners, positions, loss):
            for layer, name in owners:
                factors = getattr(layer, _ATTR).kron
                B = self._check_finite(output_scale * factors.B)
                if name == "weight":
                    A = factors.A / (N * positions.get(layer, 1))
                    kfacs.append([B, self._check_finite(A)])
                else:
                    kfacs.append([B])
        return loss, Kron(kfacs) * self.factor**self._scale_power


class AsdlGGN(AsdlInterface, GGNInterface):
    """Generalized Gauss-Newton by ASDL: its exact Fisher, or with ``stochastic=True`` its
    Monte-Carlo Fisher from ``num_samples`` sampled targets per input.

    ASDL 0.1a4 divides each sampled loss by ``num_samples`` before squaring its gradient, so
    its Monte-Carlo Fisher is ``num_samples`` times too small; it is multiplied back. ASDL's
    sampler is seeded on every call from ``generator`` (or with the ``seed`` option).

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``stochastic``, ``num_samples``, ``generator``, ``**kwargs`` are as for
    :class:`~laplace.curvature.GGNInterface`.
    """

    structures: ClassVar[frozenset[HessianStructure]] = frozenset(
        {HessianStructure.FULL, HessianStructure.DIAG, HessianStructure.KRON}
    )

    @property
    def _fisher_correction(self) -> float:
        return float(self.num_samples) if self.stochastic else 1.0

    def _fisher_config_kwargs(
        self, generator: torch.Generator | None, seed: int | None
    ) -> dict[str, Any]:
        if not self.stochastic:
            return super()._fisher_config_kwargs(generator, seed)
        if seed is None:
            generator = self.generator if generator is None else generator
            device = self._device if generator is None else generator.device
            draw = torch.randint(2**31 - 1, (1,), generator=generator, device=device)
            seed = int(draw.item())
        return {"fisher_type": FISHER_MC, "n_mc_samples": self.num_samples, "seed": seed}


class AsdlEF(AsdlInterface, EFInterface):
    """Empirical Fisher ``sum_n g_n g_n^T`` by ASDL (``FISHER_EMP``).

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``**kwargs`` are as for :class:`~laplace.curvature.CurvatureInterface`.
    """

    structures: ClassVar[frozenset[HessianStructure]] = frozenset(
        {HessianStructure.FULL, HessianStructure.DIAG, HessianStructure.KRON}
    )
    _fisher_type: ClassVar[str] = FISHER_EMP
    _scale_power: ClassVar[int] = 2
    _asdl_factor_power: ClassVar[int] = 0


class AsdlHessian(AsdlInterface):
    """Exact Hessian of the batch loss by ASDL's ``HessianMaker``; no K-FAC.

    ``full`` costs one double-backward pass per parameter and works for any model; ``diag``
    forms each layer's Hessian block and needs every parameter to be the ``weight`` or
    ``bias`` of one module. The ASDL Fisher options are checked and ignored.

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``**kwargs`` are as for :class:`~laplace.curvature.CurvatureInterface`.
    """

    structures: ClassVar[frozenset[HessianStructure]] = frozenset(
        {HessianStructure.FULL, HessianStructure.DIAG}
    )
    psd_curvature: ClassVar[bool] = False

    @contextmanager
    def _asdl_run(
        self,
        x: Inputs,
        y: Tensor,
        shape: str,
        generator: torch.Generator | None,
        options: dict[str, Any],
    ) -> Iterator[tuple[nn.Module, _Owners, dict[nn.Module, int], Tensor]]:
        """Run ``HessianMaker`` for ``shape`` and yield as :meth:`AsdlInterface._asdl_run`
        (without positions); the (checked) options and ``generator`` are unused."""
        module, inputs, owners = self._promoted_run(
            *self._prepare(x, (nn.Module,) if shape == SHAPE_DIAG else None)
        )
        maker = HessianMaker(module, HessianConfig(hessian_attr=_ATTR, hessian_shapes=[shape]))
        output = maker.setup_model_call(self._model_call(module, y, shape, {}), inputs)
        maker.setup_loss_repr(output[1])
        try:
            with _asdl_context(module, None, self._device):  # double backward: math_attention
                math_attention(self.model, lambda: maker.forward_and_backward(scale=self.factor))
            yield module, owners, {}, self.factor * maker.loss.detach()
        finally:
            maker.zero_hessian()
