"""The native ``torch.func`` curvature backends (and the interface, re-exported).

:class:`~laplace.curvature.interface.CurvatureInterface` (in
:mod:`laplace.curvature.interface`) holds what every backend shares. :class:`GGNInterface`
computes the generalized Gauss-Newton matrix (Schraudolph, 2002; Martens, 2020), exactly or
by Monte-Carlo sampling of the model's predictive (the Fisher); :class:`EFInterface` the
empirical Fisher (Kunstner et al., 2019). They are the ground truth and the fallback of the
other backends.

References:
    Schraudolph. Fast curvature matrix-vector products for second-order gradient descent.
    Neural Computation, 2002. Martens. New insights and perspectives on the natural gradient
    method. JMLR, 2020. Kunstner, Hennig, Balles. Limitations of the empirical Fisher
    approximation for natural gradient descent. NeurIPS, 2019.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from laplace.curvature._options import SAMPLING_OPTIONS
from laplace.curvature._tools import _softmax_hessian_root
from laplace.curvature.interface import CurvatureInterface
from laplace.utils.data import Inputs
from laplace.utils.enums import HessianStructure, Likelihood
from laplace.utils.linear_jacobians import (
    factored_gram,
    factored_gram_diagonal,
    linear_jacobian_factors,
    partial_linear_factors,
)
from laplace.utils.norm_jacobians import uses_batch_statistics
from laplace.utils.precision import gram

__all__ = ["CurvatureInterface", "GGNInterface", "EFInterface"]


class _GramInterface(CurvatureInterface, ABC):
    """A curvature ``sum_n M_n^T M_n`` from per-sample factors ``M_n``: full and diagonal.

    Subclasses implement :meth:`_factor`; :meth:`diag` never forms a ``(params, params)``
    matrix. Keyword options are checked against ``structure_options``
    (:meth:`~laplace.curvature.interface.CurvatureInterface.curvature_options`).
    """

    structures: ClassVar[frozenset[HessianStructure]] = frozenset(
        {HessianStructure.FULL, HessianStructure.DIAG}
    )

    @abstractmethod
    def _factor(
        self, x: Inputs, y: Tensor, generator: torch.Generator | None, options: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """``(M, loss)`` of a batch, with the random ``generator`` and checked keyword
        ``options`` of the structure method.

        Shapes:
            ``M``: ``(batch, k, params)``; ``loss``: ``()``
        """

    def full(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        out: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """``(loss, H)`` of a batch.

        Args:
            x: A batch of inputs.
            y: The targets.
            N: Size of the data set; unused.
            generator: Random generator for a sampled curvature (unused otherwise).
            out: If given, ``H`` is added to this ``(params, params)`` tensor in place (it
                is returned as ``H``): a fit accumulates without a temporary per batch.
            **kwargs: The options in ``structure_options`` (``mc_samples``, ``seed`` for
                the sampled GGN; none for the empirical Fisher).

        Shapes:
            ``H``: ``(params, params)``

        Raises:
            UnknownOptionError: For a keyword outside ``structure_options``.
            ValueError: For bad inputs, targets or options, or a curvature with NaN or Inf.
        """
        options = self._check_structure(HessianStructure.FULL, kwargs)
        factor, loss = self._factor(x, y, generator, options)
        rows = factor.flatten(0, 1)
        if out is None:
            return loss, self._check_finite(self._gram(rows))
        self._check_finite(rows)
        return loss, gram(rows, self.sum_dtype or rows.dtype, out=out)

    def diag(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """``(loss, h)`` of a batch, ``h`` the diagonal of :meth:`full`'s ``H``; same arguments.

        Shapes:
            ``h``: ``(params,)``

        Raises:
            UnknownOptionError: For a keyword outside ``structure_options``.
            ValueError: For bad inputs, targets or options, or a curvature with NaN or Inf.
        """
        options = self._check_structure(HessianStructure.DIAG, kwargs)
        factor, loss = self._factor(x, y, generator, options)
        return loss, self._check_finite(self._summed(factor.square().sum(dim=(0, 1))))


class GGNInterface(_GramInterface):
    """Generalized Gauss-Newton ``sum_n J_n^T Lambda_n J_n`` with ``torch.func``.

    ``Lambda_n``, the Hessian of the loss w.r.t. the output ``f_n``, is the identity for
    regression and ``diag(p_n) - p_n p_n^T`` with ``p_n = softmax(f_n)`` for classification;
    the GGN is built from ``M_n = R_n J_n`` with ``R_n^T R_n = Lambda_n``. With
    ``stochastic=True``, ``Lambda_n`` is replaced by the unbiased estimate
    ``mean_s g_ns g_ns^T`` from loss gradients w.r.t. ``f_n`` at targets sampled from the
    model's predictive (the Fisher). :meth:`full` and :meth:`diag` take a ``generator``
    and the options ``mc_samples`` (sampled targets per input for the call) and ``seed``
    (a fixed seed of the call's sampler) of :mod:`laplace.curvature._options`.

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``**kwargs`` are as for :class:`CurvatureInterface`.

    Args:
        stochastic: Use the Monte-Carlo estimate of ``Lambda_n``.
        num_samples: Number of sampled targets per input when ``stochastic``.
        generator: Random generator used when a method is given none.

    Raises:
        ValueError: If ``num_samples`` is not a positive integer.
    """

    structure_options: ClassVar[Mapping[HessianStructure, frozenset[str]]] = MappingProxyType(
        {
            HessianStructure.FULL: SAMPLING_OPTIONS,
            HessianStructure.DIAG: SAMPLING_OPTIONS,
            HessianStructure.KRON: SAMPLING_OPTIONS,
        }
    )

    factored_structures: ClassVar[frozenset[HessianStructure]] = frozenset({HessianStructure.DIAG})
    """Structures that :meth:`factored` computes from Jacobian factors; none for a subclass
    with its own ``diag`` (BackPack, ASDL), which computes it its own way."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.diag is not GGNInterface.diag:
            cls.factored_structures = frozenset()

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: Tensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, **kwargs
        )
        self.stochastic = stochastic
        self.num_samples = num_samples
        self.generator = generator

    def _sampling(
        self, generator: torch.Generator | None, options: dict[str, Any]
    ) -> tuple[torch.Generator | None, int]:
        """The random generator and the number of sampled targets per input of one call.

        ``seed`` gives a generator of that seed, otherwise ``generator`` or the backend's;
        ``mc_samples`` replaces ``num_samples``.

        Raises:
            ValueError: For ``mc_samples`` other than 1 without ``stochastic=True``.
        """
        samples = options.get("mc_samples", self.num_samples)
        if not self.stochastic and "mc_samples" in options and samples != 1:
            raise ValueError(
                f"mc_samples={samples} needs the sampled Fisher: build "
                f"{type(self).__name__} with stochastic=True (the exact GGN takes only "
                "mc_samples=1)"
            )
        seed = options.get("seed")
        if seed is not None:
            return torch.Generator(device=self.params[0].device).manual_seed(seed), samples
        return self.generator if generator is None else generator, samples

    def _output_root(
        self, f: Tensor, generator: torch.Generator | None, num_samples: int | None = None
    ) -> Tensor | None:
        """``R`` with ``R_n^T R_n = Lambda_n``, exact or sampled; ``None`` for the identity.

        Args:
            f: The model outputs.
            generator: Random generator of the sampled targets.
            num_samples: Sampled targets per input; default ``num_samples``.

        Shapes:
            ``f``: ``(batch, outputs)`` -> ``(batch, k, outputs)``
        """
        regression = self.likelihood == Likelihood.REGRESSION
        if not self.stochastic:
            return None if regression else _softmax_hessian_root(f)
        samples = self.num_samples if num_samples is None else num_samples
        batch, outputs = f.shape
        shape = (batch, samples, outputs)
        if regression:
            # The gradient of 0.5 * ||f - y||^2 at y = f + noise, y ~ N(f, I), is -noise.
            noise = torch.randn(shape, generator=generator, device=f.device, dtype=f.dtype)
            output_grads = -noise
        else:
            p = torch.softmax(f, dim=-1)
            labels = torch.multinomial(p, samples, replacement=True, generator=generator)
            output_grads = p.unsqueeze(1) - nn.functional.one_hot(labels, outputs).to(f.dtype)
        return output_grads / math.sqrt(samples)

    def full(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        out: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """``(loss, H)`` of a batch; linear layers' blocks from their Jacobian factors.

        When some parameters are weights of ``nn.Linear`` layers that see one vector per
        sample and ``Lambda_n`` has ``k >= 2`` rows (classification, several regression
        outputs), their blocks are Kronecker sums of per-sample factors
        (:func:`~laplace.utils.linear_jacobians.factored_gram`, ``k`` times fewer products
        than the Gram of the Jacobian rows); their biases and the parameters of normalisation
        layers take the rows from the same backward passes, the other parameters their
        per-sample Jacobians. Otherwise (and for a subnetwork, or a batch normalisation that
        uses the batch's statistics) the Gram of the Jacobian rows. Arguments as for
        :meth:`_GramInterface.full`.

        Shapes:
            ``H``: ``(params, params)``
        """
        options = self._check_structure(HessianStructure.FULL, kwargs)
        factored = self._factored_full(x, y, *self._sampling(generator, options), out)
        if factored is not None:
            return factored
        return super().full(x, y, N=N, generator=generator, out=out, **kwargs)

    def _factored_full(
        self,
        x: Inputs,
        y: Tensor,
        generator: torch.Generator | None,
        num_samples: int | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor] | None:
        """``(loss, H)`` by :func:`~laplace.utils.linear_jacobians.factored_gram`, or None
        where it does not apply or does not pay (see :meth:`full`)."""
        if self.subnetwork_indices is not None:
            return None
        self._check_inputs(x)
        module, inputs = self._module_and_input(x)
        if uses_batch_statistics(module):
            return None  # the per-sample Jacobians differ from the batch's factors
        named = dict(zip(self._param_names, self.params))
        factors, f = partial_linear_factors(module, named, inputs)
        if f.ndim != 2 or not any(len(block) == 2 for block in factors.values()):
            return None
        y = self._check_targets(y, f)
        root = self._output_root(f, generator, num_samples)
        if (f.shape[1] if root is None else root.shape[1]) < 2:
            return None
        rest = {name: p for name, p in named.items() if name not in factors}
        dense = iter(())
        if rest:
            Js, _ = self._jacobians_of(module, rest, inputs, enable_backprop=False)
            dense = iter(Js.split([p.numel() for p in rest.values()], dim=-1))

        def rows(J: Tensor) -> Tensor:
            return J if root is None else root @ J

        blocks = []
        for name in named:
            block = factors.get(name)
            if block is None:
                blocks.append((rows(next(dense)),))
            elif len(block) == 2:
                blocks.append((rows(block[0]), block[1]))
            else:
                blocks.append((rows(block[0]),))
        for block in blocks:
            for tensor in block:
                self._check_finite(tensor)
        H = factored_gram(blocks, self.sum_dtype or f.dtype, out=out)
        return self.factor * self.lossfunc(f, y), H

    def diag(
        self,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """``(loss, h)`` of a batch; layer by layer when every parameter has factors.

        For networks whose trainable parameters all sit in ``nn.Linear`` layers that see one
        vector per sample, supported ``nn.Conv2d`` layers that see one image per sample and
        normalisation layers that keep the samples apart (batch normalisation in eval mode,
        layer and group normalisation; :mod:`laplace.utils.norm_jacobians`), the diagonal
        comes from the layers' inputs and output gradients
        (:func:`~laplace.utils.linear_jacobians.factored_gram_diagonal`): one backward pass
        per output instead of the ``(batch, outputs, params)`` Jacobians. Other networks take
        the per-sample Jacobians. Arguments as for :meth:`full`.

        Shapes:
            ``h``: ``(params,)``
        """
        options = self._check_structure(HessianStructure.DIAG, kwargs)
        factored = self._factored_diag(x, y, generator, options)
        if factored is None:
            return super().diag(x, y, N=N, generator=generator, **kwargs)
        return factored

    def factored(
        self,
        structure: HessianStructure,
        x: Inputs,
        y: Tensor,
        N: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor] | None:
        """``(loss, curvature)`` of a batch of ``structure`` from the layers' Jacobian
        factors, or None where the network has none (where :meth:`diag` forms Jacobians).

        It never forms a ``(batch, outputs, params)`` tensor: the factors hold
        ``batch x outputs x activations`` numbers (as many as the activations of a training
        step, once per output), so a fit hands it whole batches that the memory budget of
        the Jacobians would split (:mod:`laplace.utils.memory`). Arguments as for
        :meth:`diag`.

        Raises:
            UnknownOptionError: For a keyword outside ``structure_options``.
            ValueError: For bad inputs, targets or options, or a curvature with NaN or Inf.
        """
        if structure not in self.factored_structures:
            return None
        return self._factored_diag(x, y, generator, self._check_structure(structure, kwargs))

    def _factored_diag(
        self, x: Inputs, y: Tensor, generator: torch.Generator | None, options: dict[str, Any]
    ) -> tuple[Tensor, Tensor] | None:
        """:meth:`diag` from :func:`~laplace.utils.linear_jacobians.factored_gram_diagonal`,
        or None where the network has no factors."""
        self._check_inputs(x)
        module, inputs = self._module_and_input(x)
        named = dict(zip(self._param_names, self.params))
        factored = None
        if named:
            factored = linear_jacobian_factors(module, named, inputs, convolutions=True)
        if factored is None:
            return None
        factors, f = factored
        y = self._check_targets(y, f)
        root = self._output_root(f, *self._sampling(generator, options))
        h = self._summed(self._restrict(factored_gram_diagonal(factors, root)))
        return self.factor * self.lossfunc(f, y), self._check_finite(h)

    def _factor(
        self, x: Inputs, y: Tensor, generator: torch.Generator | None, options: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        Js, f = self.jacobians(x)
        y = self._check_targets(y, f)
        root = self._output_root(f, *self._sampling(generator, options))
        factor = Js if root is None else torch.einsum("bkc,bcp->bkp", root, Js)
        return factor, self.factor * self.lossfunc(f, y)


class EFInterface(_GramInterface):
    """Empirical Fisher ``sum_n g_n g_n^T`` from per-sample loss gradients (``torch.func``).

    :meth:`full` and :meth:`diag` take no keyword options.

    ``model``, ``likelihood``, ``last_layer``, ``subnetwork_indices``, ``dict_key_x``,
    ``dict_key_y``, ``**kwargs`` are as for :class:`CurvatureInterface`.
    """

    def _factor(
        self, x: Inputs, y: Tensor, generator: torch.Generator | None, options: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        Gs, loss = self.gradients(x, y)
        return Gs.unsqueeze(1), loss
