"""Curvature backends built on the public API of ``curvlinops`` (Dangel et al.).

``curvlinops`` represents curvature matrices as linear operators. :class:`CurvlinopsGGN`,
:class:`CurvlinopsEF` and :class:`CurvlinopsHessian` use them for three structures:

- ``full``: the operator (GGN, its Monte-Carlo Fisher, empirical Fisher or Hessian) applied to
  blocks of identity columns (:mod:`laplace.curvature._operators`), so a dense
  ``(params, params)`` matrix costs ``params`` matrix-vector products. With
  ``subnetwork_indices`` only those columns are formed.
- ``diag``: the exact ``torch.func`` diagonals of :class:`~laplace.curvature.GGNInterface`
  and :class:`~laplace.curvature.EFInterface` for the GGN and EF. The Hessian diagonal is read
  off the same column blocks as ``full``: ``params`` Hessian-vector products, with the memory
  of one block.
- ``kron``: K-FAC (Martens & Grosse, 2015; Grosse & Martens, 2016) with the "expand" (default)
  or "reduce" approximation for weight sharing (Eschenhagen et al., 2023; the ``kfac_approx``
  option), separate weight and bias blocks, and Fisher type ``type-2`` (exact GGN), ``mc``
  (sampled Fisher) or ``empirical``. Parameters of ``nn.Linear`` and ``nn.Conv2d`` layers are
  supported, and the affine parameters of normalisation layers that do not couple the samples
  (batch norm in eval mode, ``LayerNorm``, ``GroupNorm``), which get their exact one-factor
  curvature blocks. The exact GGN and the empirical Fisher take one forward and one batched
  backward pass (:mod:`laplace.curvature._kfac`, 2-4 times faster than the operator's backward
  pass per output); the sampled Fisher and layers that path does not handle (run more than
  once per forward pass, grouped or non-zero-padded convolutions) use
  ``curvlinops.KFACLinearOperator``. Both give the same factors. The operator has no blocks
  for normalisation layers, so their parameters need the one-pass path.

The operators' products use forward-mode autodiff (``torch.func.jvp``); where a fused
attention kernel lacks it (``scaled_dot_product_attention`` on the CPU), they run with
PyTorch's composite "math" attention kernel instead, the same numbers
(:func:`~laplace.curvature._fallback.math_attention`).

Keyword options (``asdl_fisher_kwargs`` of the Laplace classes; :mod:`laplace.curvature._options`),
forwarded to ``curvlinops`` as ``laplace-torch`` forwards them: :class:`CurvlinopsGGN` takes
``mc_samples`` and ``seed`` (the sampled Fisher's targets per input and seed) in ``full``,
``diag`` and ``kron``, and both GGN and EF take ``kfac_approx`` (``"expand"``/``"reduce"``) in
``kron``. Any other keyword raises :class:`~laplace.errors.UnknownOptionError`.

Scaling: every returned curvature is that of the library loss ``factor * sum_n loss_n``
(``factor = 1/2`` for the summed squared error), while ``curvlinops`` differentiates the
summed ``MSELoss``/``CrossEntropyLoss``. The GGN, Fisher and Hessian are linear in the loss
and are multiplied by ``factor``; the empirical Fisher is quadratic and by ``factor ** 2``.

K-FAC batch convention: for a batch of ``M`` out of ``N`` data points and a layer with ``R``
weight-sharing locations (``R = 1`` for a linear layer on vectors, the number of output pixels
of a convolution), the block of the row-major flattened weight is ``kron(B, A)`` and the bias
block is ``B`` with

    A = M / N * 1 / (M R) * sum_{n, r} a_nr a_nr^T = 1 / (N R) * sum_{n, r} a_nr a_nr^T,
    B = sum_{n, r, c} g_nrc g_nrc^T,

where ``a_nr`` are layer inputs (unfolded patches for convolutions) and ``g_nrc`` output
gradients for the columns ``c`` of a square root of the loss Hessian (or sampled, or the
loss gradient). ``A`` is ``curvlinops``' batch mean rescaled by ``M / N`` and ``B`` the batch
sum. Summing the factors over the batches of a data set (the usual K-FAC accumulation, as
``Kron`` addition does) gives exactly the full-data K-FAC
``(1/(N R) sum aa^T) ⊗ (sum gg^T)`` and the full-data bias blocks ``sum gg^T``, whatever
the batch sizes. Putting ``M / N`` on ``B`` instead would give the same weight blocks per
batch but bias blocks too small by ``M / N`` once summed. A normalisation parameter's block
is a batch sum like a bias's: summed over the batches, the exact GGN (or empirical Fisher)
block of the data set.

The factors are read through ``KFACLinearOperator.compute_kronecker_factors`` and
``state_dict``, and the parameter positions through ``compute_parameter_mapping``; no private
attribute of ``curvlinops`` is used.

References:
    Dangel, F., et al. curvlinops: scipy linear operators for curvature matrices in PyTorch
    (software), https://github.com/f-dangel/curvlinops.
    Martens, J., Grosse, R. Optimizing neural networks with Kronecker-factored approximate
    curvature. ICML, 2015.
    Grosse, R., Martens, J. A Kronecker-factored approximate Fisher matrix for convolution
    layers. ICML, 2016.
    Eschenhagen, R., Immer, A., Turner, R. E., Schneider, F., Hennig, P. Kronecker-factored
    approximate curvature for modern neural network architectures. NeurIPS, 2023.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

with warnings.catch_warnings():
    # curvlinops imports linear_operator, which calls the deprecated torch.jit.script at import
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    from curvlinops import (
        EFLinearOperator,
        FisherMCLinearOperator,
        FisherType,
        GGNLinearOperator,
        HessianLinearOperator,
        KFACLinearOperator,
        KFACType,
    )

from laplace.curvature._fallback import math_attention
from laplace.curvature._kfac import PendingRows, batch_kfac, check_kfac_layers
from laplace.curvature._operators import operator_diagonal, operator_submatrix
from laplace.curvature._options import KFAC_OPTIONS, SAMPLING_OPTIONS, KFACApprox
from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.errors import UnsupportedLayerError
from laplace.utils.data import Inputs, batch_size
from laplace.utils.enums import HessianStructure
from laplace.utils.matrix import Kron

__all__ = ["CurvlinopsInterface", "CurvlinopsGGN", "CurvlinopsEF", "CurvlinopsHessian"]

_GRAM_MAX_ENTRIES = 2**25
"""Most entries of the per-sample Jacobian factors for the Gram path of ``full``."""


def _kronecker_factors(kfac: KFACLinearOperator) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Compute K-FAC's factors and return them by layer name: ``(inputs, output grads)``.

    ``curvlinops`` 3 exposes the factors through its public ``state_dict``.

    Raises:
        RuntimeError: If the installed ``curvlinops`` stores the factors differently.
    """
    kfac.compute_kronecker_factors()
    state = kfac.state_dict()
    if "input_covariances" not in state or "gradient_covariances" not in state:
        raise RuntimeError(
            "curvlinops' KFACLinearOperator.state_dict() has no Kronecker factors; "
            "this backend needs curvlinops-for-pytorch 3.x"
        )
    return state["input_covariances"], state["gradient_covariances"]


class CurvlinopsInterface(CurvatureInterface):
    """Shared machinery of the ``curvlinops`` backends (see the module docstring).

    Subclasses set ``_operator_cls`` (the linear operator for ``full``), ``_fisher_type``
    (the K-FAC Fisher type, where ``kron`` is supported) and ``_scale_power`` (``1`` for
    curvatures linear in the loss, ``2`` for the empirical Fisher). Jacobians and gradients
    are the ``torch.func`` versions of :class:`~laplace.curvature.CurvatureInterface`.

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``**kwargs`` are as for :class:`~laplace.curvature.CurvatureInterface`.
    """

    _native_gram: ClassVar[bool] = False

    supports_dict_inputs: ClassVar[bool] = True
    _operator_cls: ClassVar[type]
    _fisher_type: ClassVar[FisherType]
    _scale_power: ClassVar[int] = 1

    # ------------------------------------------------------------------ hooks
    def _operator_spec(
        self, generator: torch.Generator | None, options: dict[str, Any] | None = None
    ) -> tuple[type, dict[str, Any]]:
        """The operator class for ``full`` and its extra keyword arguments, for the checked
        keyword ``options`` of the call."""
        return self._operator_cls, {}

    def _kfac_spec(
        self, generator: torch.Generator | None, options: dict[str, Any]
    ) -> dict[str, Any]:
        """Keyword arguments selecting the Fisher type of ``KFACLinearOperator`` (and its
        sampling), for the checked keyword ``options`` of the call."""
        return {"fisher_type": self._fisher_type}

    # ------------------------------------------------------------------ helpers
    @property
    def _scale(self) -> float:
        """Multiplier from the curvature of the summed loss to that of ``factor * loss``."""
        return self.factor**self._scale_power

    def _prepare(self, x: Inputs, y: Tensor) -> tuple[nn.Module, Inputs, Tensor, Tensor]:
        """Check a batch and return ``(module, inputs, checked y, loss)``, the module and
        inputs in :attr:`sum_dtype` (see :meth:`_promoted`): the operators sum inside."""
        self._check_inputs(x)
        module, inputs = self._promoted(*self._module_and_input(x))
        with torch.no_grad():
            f = module(inputs)
        self._check_output(f)
        y = self._check_targets(y, f)
        return module, inputs, y, self.factor * self.lossfunc(f, y)

    def _operator_kwargs(self, inputs: Inputs, y: Tensor) -> dict[str, Any]:
        """Arguments every ``curvlinops`` operator of one batch takes."""
        return {
            "data": [(inputs, y)],
            "check_deterministic": False,
            "num_data": y.shape[0],
            "batch_size_fn": lambda X: batch_size(X, self.dict_key_x),
        }

    def _indices(self) -> Tensor:
        """The parameter indices the curvature is restricted to (all without a subnetwork)."""
        if self.subnetwork_indices is not None:
            return self.subnetwork_indices
        return torch.arange(self.n_params, device=self.params[0].device)

    def _curvature_operator(
        self, x: Inputs, y: Tensor, generator: torch.Generator | None, options: dict[str, Any]
    ) -> tuple[Any, Tensor, Tensor]:
        """The ``full`` operator of a batch, the batch loss, and a parameter giving the
        device and dtype of the operator's vectors."""
        module, inputs, y, loss = self._prepare(x, y)
        operator_cls, extra = self._operator_spec(generator, options)
        params = self._params_of(module)
        operator = operator_cls(
            module, self.lossfunc, params, **self._operator_kwargs(inputs, y), **extra
        )
        return operator, loss, params[0]

    def _sample_seed(self, generator: torch.Generator | None) -> int:
        """A seed for ``curvlinops``' sampler drawn from ``generator`` (or torch's default)."""
        device = self.params[0].device if generator is None else generator.device
        return int(torch.randint(2**31 - 1, (1,), generator=generator, device=device).item())

    # ------------------------------------------------------------------ structures
    def full(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        out: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Loss and dense curvature of a batch, formed from the ``curvlinops`` operator.

        Args:
            x: A batch of inputs, a tensor or a dict-like batch passed to the model whole.
            y: The targets.
            N: Size of the data set; unused (accepted for the common interface).
            generator: Random generator for sampled curvatures (``stochastic=True``).
            out: If given, ``H`` is added to it in place (and returned as ``H``).
            **kwargs: The options in ``structure_options`` (see the module docstring).

        Returns:
            ``(loss, H)`` with ``H`` restricted to ``subnetwork_indices`` if given.

        Shapes:
            ``H``: ``(params, params)``

        Raises:
            UnknownOptionError: For a keyword outside ``structure_options``.
            ValueError: For bad inputs, targets or options, or a non-finite curvature.
        """
        options = self._check_structure(HessianStructure.FULL, kwargs)
        if self._gram_is_cheaper(x):
            return super().full(x, y, N=N, generator=generator, out=out, **kwargs)
        operator, loss, like = self._curvature_operator(x, y, generator, options)
        H = self._scale * math_attention(
            self.model, lambda: operator_submatrix(operator, self._indices(), like)
        )
        H = self._check_finite(self._summed(H))
        return loss, H if out is None else out.add_(H)

    def _gram_is_cheaper(self, x: Inputs) -> bool:
        """Whether the exact Jacobian-Gram route of the native backend should form ``full``.

        Both routes compute the same matrix. Materialising the ``curvlinops`` operator costs
        one curvature-vector product per parameter; the native route costs one
        vector-Jacobian product per sample and output and holds the ``(batch, outputs,
        params)`` Jacobians, so it is used when those fit in :data:`_GRAM_MAX_ENTRIES`.
        Sampled curvatures keep the ``curvlinops`` sampler.
        """
        if not self._native_gram or getattr(self, "stochastic", False):
            return False
        module, inputs = self._module_and_input(x)
        with torch.no_grad():
            n_outputs = module(inputs).shape[-1]
        entries = batch_size(x, self.dict_key_x) * n_outputs * self.n_params
        return entries <= _GRAM_MAX_ENTRIES

    def kron(
        self,
        x: Inputs,
        y: Tensor,
        N: int,
        generator: torch.Generator | None = None,
        out: Kron | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Kron]:
        """Loss and K-FAC of a batch, scaled to the data set as in the module docstring.

        Args:
            x: A batch of inputs.
            y: The targets.
            N: Size of the data set; the input-side factors are multiplied by ``M / N``.
            generator: Random generator for sampled curvatures (``stochastic=True``).
            out: If given, the batch's factors are added to this ``Kron`` in place (it is
                returned as ``kron``; its factors are not checked for NaN/Inf here, and the
                input-side sums are complete only after :meth:`flush_sums`).
            **kwargs: The options in ``structure_options``: ``kfac_approx`` (``"expand"``,
                the default, or ``"reduce"``), and for the GGN ``mc_samples`` and ``seed``.

        Returns:
            ``(loss, kron)`` with one block per parameter, ``[B, A]`` for weights and
            ``[B]`` for biases.

        Raises:
            NotImplementedError: If the backend does not compute ``kron``.
            UnknownOptionError: For a keyword outside ``structure_options``.
            ValueError: For ``subnetwork_indices``, a bad ``N``, bad inputs, targets or
                options, or non-finite factors.
            UnsupportedLayerError: For a parameter outside ``nn.Linear``/``nn.Conv2d`` and
                supported normalisation layers (a batch norm must be in eval mode), or a
                normalisation parameter where ``KFACLinearOperator`` is needed.
        """
        options = self._check_structure(HessianStructure.KRON, kwargs)
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ValueError(f"N must be a positive integer (the data-set size), got {N!r}")
        approx = options.get("kfac_approx", KFACApprox.EXPAND)
        spec = self._kfac_spec(generator, options)
        self._check_inputs(x)
        module, inputs = self._module_and_input(x)
        norm_params = check_kfac_layers(
            f"{type(self).__name__}.kron", module, self._param_names, self.params
        )
        native = self._batch_kfac(module, inputs, y, N, out, approx)
        if native is not None:
            return native
        if norm_params:
            raise UnsupportedLayerError(
                f"{type(self).__name__}.kron has blocks for normalisation-layer parameters "
                f"(here {norm_params[0]!r}) only in its one-pass K-FAC: the exact GGN or the "
                "empirical Fisher (not stochastic=True), with every layer run once per forward "
                "pass and Conv2d layers with groups=1 and zero padding"
            )
        module, inputs, y, loss = self._prepare(x, y)
        params = self._params_of(module)
        kfac = KFACLinearOperator(
            module,
            self.lossfunc,
            params,
            **self._operator_kwargs(inputs, y),
            kfac_approx=KFACType(approx.value),
            separate_weight_and_bias=True,
            num_per_example_loss_terms=1,
            **spec,
        )
        inputs_side, outputs_side = _kronecker_factors(kfac)
        input_scale = y.shape[0] / N
        kfacs: list[list[Tensor]] = [[] for _ in self.params]
        for layer, positions in kfac.compute_parameter_mapping(params, module).items():
            B = self._check_finite(outputs_side[layer])
            for name, position in positions.items():
                if name == "weight":
                    A = self._check_finite(input_scale * inputs_side[layer])
                    kfacs[position] = [B, A]
                else:
                    kfacs[position] = [B]
        # the loss factor is spread evenly over a block's factors (sqrt(s) on each of B and A)
        kron = Kron(kfacs)
        kron = self._summed_kron(kron if self._scale == 1 else kron * self._scale)
        if out is not None:
            for mine, theirs in zip(out.kfacs, kron.kfacs):
                for factor, batch_factor in zip(mine, theirs):
                    factor.add_(batch_factor)
            return loss, out
        return loss, kron

    _pending: PendingRows | None = None

    def _pending_rows(self) -> PendingRows:
        if self._pending is None:
            self._pending = PendingRows()
        return self._pending

    def flush_sums(self) -> None:
        """Finish the sums of ``kron(..., out=...)``: layer inputs of small batches are kept
        until enough rows have gathered for an efficient float64 Gram
        (:class:`~laplace.curvature._kfac.PendingRows`); call this before reading ``out``."""
        if self._pending is not None:
            self._pending.flush()

    def _summed_kron(self, kron: Kron) -> Kron:
        """``kron`` with its factors in :attr:`sum_dtype`."""
        return Kron([[self._summed(f) for f in factors] for factors in kron.kfacs])

    def _kfac_rows(self, f: Tensor, y: Tensor) -> Tensor | None:
        """Rows ``R`` of the one-pass K-FAC (see :mod:`laplace.curvature._kfac`), or None
        (identity). Backends without that path raise ``NotImplementedError``."""
        raise NotImplementedError

    def _batch_kfac(
        self,
        module: nn.Module,
        inputs: Inputs,
        y: Tensor,
        N: int,
        out: Kron | None = None,
        approx: KFACApprox = KFACApprox.EXPAND,
    ) -> tuple[Tensor, Kron] | None:
        """``(loss, kron)`` of a batch by :func:`~laplace.curvature._kfac.batch_kfac`, or
        None where that path does not apply and ``KFACLinearOperator`` is used."""
        if getattr(self, "stochastic", False) or type(self)._kfac_rows is (
            CurvlinopsInterface._kfac_rows
        ):
            return None
        batch: dict[str, Tensor] = {}

        def rows(f: Tensor) -> Tensor | None:
            self._check_output(f)
            batch["y"] = self._check_targets(y, f)
            batch["loss"] = self.factor * self.lossfunc(f, batch["y"])
            return self._kfac_rows(f, batch["y"])

        # the factors of the summed loss, then the loss factor s spread as in the operator
        # path: B / sqrt(s) and sqrt(s) A for weights, B for biases
        root_scale = math.sqrt(self._scale)
        scales = (1 / root_scale, 1.0, root_scale)
        result = batch_kfac(
            module,
            self.params,
            inputs,
            N,
            rows,
            dtype=self.sum_dtype,
            out=None if out is None else out.kfacs,
            scales=scales,
            pending=None if out is None else self._pending_rows(),
            reduce=approx == KFACApprox.REDUCE,
        )
        if result is None:
            return None
        if out is not None:
            return batch["loss"], out
        kfacs = [[self._check_finite(factor) for factor in block] for block in result[0]]
        return batch["loss"], Kron(kfacs)


class CurvlinopsGGN(CurvlinopsInterface, GGNInterface):
    """Generalized Gauss-Newton (or with ``stochastic=True`` the Monte-Carlo Fisher).

    ``full`` uses ``GGNLinearOperator`` (``FisherMCLinearOperator`` with ``num_samples``
    sampled targets per input when ``stochastic``), ``kron`` K-FAC of Fisher type
    ``type-2`` (``mc``), and ``diag`` the exact ``torch.func`` diagonal of
    :class:`~laplace.curvature.GGNInterface` (sampled when ``stochastic``).

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``stochastic``, ``num_samples``, ``generator``, ``**kwargs`` are as for
    :class:`~laplace.curvature.GGNInterface`.
    """

    _native_gram: ClassVar[bool] = True

    structures: ClassVar[frozenset[HessianStructure]] = frozenset(
        {HessianStructure.FULL, HessianStructure.DIAG, HessianStructure.KRON}
    )
    _operator_cls: ClassVar[type] = GGNLinearOperator
    _fisher_type: ClassVar[FisherType] = FisherType.TYPE2
    structure_options: ClassVar[Mapping[HessianStructure, frozenset[str]]] = MappingProxyType(
        {
            HessianStructure.FULL: SAMPLING_OPTIONS,
            HessianStructure.DIAG: SAMPLING_OPTIONS,
            HessianStructure.KRON: SAMPLING_OPTIONS | KFAC_OPTIONS,
        }
    )

    def _sampler_spec(
        self, generator: torch.Generator | None, options: dict[str, Any]
    ) -> dict[str, Any]:
        """``mc_samples`` and ``seed`` of a ``curvlinops`` Monte-Carlo operator: a ``seed``
        option as given (as ``laplace-torch`` forwards it), otherwise drawn from
        ``generator`` (or the backend's)."""
        sampler, samples = self._sampling(generator, options)
        seed = options.get("seed")
        return {
            "mc_samples": samples,
            "seed": self._sample_seed(sampler) if seed is None else seed,
        }

    def _operator_spec(
        self, generator: torch.Generator | None, options: dict[str, Any] | None = None
    ) -> tuple[type, dict[str, Any]]:
        options = options or {}
        if not self.stochastic:
            self._sampling(generator, options)  # rejects mc_samples > 1
            return super()._operator_spec(generator, options)
        return FisherMCLinearOperator, self._sampler_spec(generator, options)

    def _kfac_rows(self, f: Tensor, y: Tensor) -> Tensor | None:
        return self._output_root(f, None)

    def _kfac_spec(
        self, generator: torch.Generator | None, options: dict[str, Any]
    ) -> dict[str, Any]:
        if not self.stochastic:
            self._sampling(generator, options)  # rejects mc_samples > 1
            return super()._kfac_spec(generator, options)
        return {"fisher_type": FisherType.MC, **self._sampler_spec(generator, options)}


class CurvlinopsEF(CurvlinopsInterface, EFInterface):
    """Empirical Fisher ``sum_n g_n g_n^T``.

    ``full`` uses ``EFLinearOperator``, ``kron`` K-FAC of Fisher type ``empirical``, and
    ``diag`` the exact ``torch.func`` diagonal of :class:`~laplace.curvature.EFInterface`.

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``**kwargs`` are as for :class:`~laplace.curvature.CurvatureInterface`.
    """

    _native_gram: ClassVar[bool] = True

    structures: ClassVar[frozenset[HessianStructure]] = frozenset(
        {HessianStructure.FULL, HessianStructure.DIAG, HessianStructure.KRON}
    )
    _operator_cls: ClassVar[type] = EFLinearOperator
    _fisher_type: ClassVar[FisherType] = FisherType.EMPIRICAL
    _scale_power: ClassVar[int] = 2
    structure_options: ClassVar[Mapping[HessianStructure, frozenset[str]]] = MappingProxyType(
        {HessianStructure.KRON: KFAC_OPTIONS}
    )

    def _kfac_rows(self, f: Tensor, y: Tensor) -> Tensor:
        f = f.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.factor * self.lossfunc(f, y), f)
        return grad.unsqueeze(1)


class CurvlinopsHessian(CurvlinopsInterface):
    """Exact Hessian of the batch loss w.r.t. the parameters (``HessianLinearOperator``).

    ``full`` and ``diag`` both cost one Hessian-vector product per (selected) parameter;
    ``diag`` keeps only one block of ``_operators._CHUNK_ENTRIES`` entries in memory. There is no
    Kronecker-factored Hessian.

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``**kwargs`` are as for :class:`~laplace.curvature.CurvatureInterface`.
    """

    psd_curvature: ClassVar[bool] = False
    structures: ClassVar[frozenset[HessianStructure]] = frozenset(
        {HessianStructure.FULL, HessianStructure.DIAG}
    )
    _operator_cls: ClassVar[type] = HessianLinearOperator

    def diag(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Loss and Hessian diagonal of a batch, from blocks of Hessian columns.

        Args:
            x: A batch of inputs.
            y: The targets.
            N: Size of the data set; unused (accepted for the common interface).
            generator: Unused (accepted for the common interface).
            **kwargs: None are accepted (``structure_options`` is empty).

        Returns:
            ``(loss, h)`` with ``h`` restricted to ``subnetwork_indices`` if given.

        Shapes:
            ``h``: ``(params,)``

        Raises:
            UnknownOptionError: For any keyword option.
            ValueError: For bad inputs or targets, or a non-finite diagonal.
        """
        options = self._check_structure(HessianStructure.DIAG, kwargs)
        operator, loss, like = self._curvature_operator(x, y, None, options)
        h = math_attention(self.model, lambda: operator_diagonal(operator, self._indices(), like))
        return loss, self._check_finite(self._scale * h)
