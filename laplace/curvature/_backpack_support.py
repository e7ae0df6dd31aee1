"""Model checks, hooks and the ``Conv2d`` K-FAC extension behind :mod:`laplace.curvature.backpack`.

Kept apart from the backend classes so that each module stays readable: this one knows what
BackPACK can extend and how, the other one what each curvature quantity is.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version

import torch
from backpack import extend
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.secondorder.hbp.conv2d import HBPConv2d
from backpack.extensions.secondorder.hbp.linear import HBPLinear
from torch import Tensor, nn

from laplace.utils.precision import gram

_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Layers with parameters that every extension used here supports (exact types)."""

_PARAMETER_FREE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.LogSigmoid,
    nn.ELU,
    nn.SELU,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.ZeroPad2d,
)
"""Parameter-free modules that BackPACK's second-order extensions propagate through."""

_KFAC_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
_KFAC_PARAMETER_FREE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.ZeroPad2d,
)
"""The subset of modules BackPACK's ``KFLR``/``KFAC`` extensions support."""

_NORMALISATION: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)

_ALTERNATIVES = (
    "use CurvlinopsGGN / CurvlinopsEF or the torch.func GGNInterface / EFInterface, "
    "which take any model"
)

_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to"


def _is_sequential(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Sequential`` that runs its children in order."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _check_backpack_model(module: nn.Module, where: str) -> None:
    """Raise unless BackPACK can extend ``module`` for every method of these backends.

    Args:
        module: The model, or the last layer with ``last_layer=True``.
        where: How to name ``module`` in error messages.

    Raises:
        ValueError: If ``module`` is no ``nn.Sequential`` (nor a single supported layer),
            or contains a normalisation layer or a module BackPACK has no extension for.
    """
    supported = _LAYERS + _PARAMETER_FREE
    for name, child in module.named_modules(prefix=where):
        if _is_sequential(child) or type(child) in supported:
            continue
        if isinstance(child, _NORMALISATION):
            raise ValueError(
                f"{name} is a normalisation layer ({type(child).__name__}): it couples the "
                f"samples of a batch, so BackPACK's per-sample quantities do not apply; "
                f"{_ALTERNATIVES}"
            )
        if child is module:
            raise ValueError(
                f"{where} must be an nn.Sequential of layers BackPACK supports for the "
                f"BackPACK backends, got {type(module).__name__}; {_ALTERNATIVES}"
            )
        names = ", ".join(t.__name__ for t in supported)
        raise ValueError(
            f"BackPACK has no extension for {name} ({type(child).__name__}); supported "
            f"modules: nn.Sequential, {names}; {_ALTERNATIVES}"
        )


def _extended_copy(module: nn.Module) -> nn.Module:
    """A BackPACK-extended copy of ``module`` that shares its parameters and buffers."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return extend(copy.deepcopy(module, memo=shared))


@contextmanager
def _hooks_active() -> Iterator[None]:
    """Enable gradients and silence torch's note on hooks of inputs without gradients."""
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)
        yield


@contextmanager
def _seeded(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Run BackPACK's sampling (torch's global generator) from a seed drawn from ``generator``.

    Without a ``generator`` the global random state is used and advanced as usual;
    otherwise it is restored afterwards.
    """
    if generator is None:
        yield
        return
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


class _GramFactors:
    """K-FAC factors of a BackPACK ``KFLR``/``KFAC`` module extension, summed as Grams.

    Weight: ``[B, A]`` with ``B = sum g g^T`` over the rows of the (exact or sampled) square
    root ``g`` of the GGN that BackPACK backpropagates to the layer output, and
    ``A = mean a a^T`` over the rows of the layer input; bias: ``[B]``. Both are Grams in
    ``dtype`` (default the inputs'; see :mod:`laplace.utils.precision`) instead of BackPACK's
    ``einsum`` sums. Subclasses give the rows (:meth:`_input_rows`, :meth:`_output_rows`)
    and are mixed in before BackPACK's extension, whose backward propagation is kept.

    Args:
        dtype: The dtype of the sums (the backend's ``sum_dtype``).
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype

    def _input_rows(self, ext: BackpropExtension, module: nn.Module) -> Tensor:
        raise NotImplementedError

    def _output_rows(
        self, ext: BackpropExtension, module: nn.Module, backproped: Tensor
    ) -> Tensor:
        raise NotImplementedError

    def _gram(self, rows: Tensor) -> Tensor:
        return gram(rows, self.dtype or rows.dtype)

    def weight(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: tuple[Tensor, ...],
        g_out: tuple[Tensor, ...],
        backproped: Tensor,
    ) -> list[Tensor]:
        """``[B, A]`` of the weight. Shapes: ``B``: ``(out, out)``; ``A``: ``(in, in)``."""
        rows = self._input_rows(ext, module)
        return [
            self._gram(self._output_rows(ext, module, backproped)),
            self._gram(rows) / len(rows),
        ]

    def bias(
        self,
        ext: BackpropExtension,
        module: nn.Module,
        g_inp: tuple[Tensor, ...],
        g_out: tuple[Tensor, ...],
        backproped: Tensor,
    ) -> list[Tensor]:
        """``[B]`` of the bias. Shapes: ``B``: ``(out, out)``."""
        return [self._gram(self._output_rows(ext, module, backproped))]


class _ExpandConv2d(_GramFactors, HBPConv2d):
    """:class:`_GramFactors` for ``nn.Conv2d`` with curvlinops' "expand" convention.

    ``A`` averages the unfolded input patches over samples and locations ``R`` and ``B`` sums
    the output gradients over them (BackPACK's own extension sums ``g`` over the locations
    before the outer product and omits ``1 / R``).
    """

    def _input_rows(self, ext: BackpropExtension, module: nn.Module) -> Tensor:
        patches = nn.functional.unfold(
            module.input0, module.kernel_size, module.dilation, module.padding, module.stride
        )
        return patches.transpose(1, 2).flatten(0, 1)  # (n * locations, in * kh * kw)

    def _output_rows(
        self, ext: BackpropExtension, module: nn.Module, backproped: Tensor
    ) -> Tensor:
        """Rows of the square root of shape ``(c, n, out, h, w)``.

        Raises:
            RuntimeError: If BackPACK passes a quantity of another shape (this extension
                was written against backpack-for-pytorch 1.7).
        """
        if backproped.ndim != 5 or backproped.shape[1:] != module.output.shape:
            raise RuntimeError(
                "BackPACK passed a K-FAC quantity of unexpected shape "
                f"{tuple(backproped.shape)} for a Conv2d output {tuple(module.output.shape)}; "
                f"the BackPACK backends were written for backpack-for-pytorch 1.7, installed: "
                f"{version('backpack-for-pytorch')}"
            )
        return backproped.flatten(3).transpose(2, 3).flatten(0, 2)  # (c * n * locations, out)


class _PreciseLinear(_GramFactors, HBPLinear):
    """:class:`_GramFactors` for ``nn.Linear``: BackPACK's factors, summed as Grams. Only the
    square-root backpropagation of ``KFLR`` and ``KFAC`` and 2-d inputs are handled, as
    ``HBPLinear`` checks."""

    def _input_rows(self, ext: BackpropExtension, module: nn.Module) -> Tensor:
        self.check_parameters(ext, module)
        return module.input0

    def _output_rows(
        self, ext: BackpropExtension, module: nn.Module, backproped: Tensor
    ) -> Tensor:
        self.check_parameters(ext, module)
        return backproped.flatten(0, 1)  # (c * n, out)
