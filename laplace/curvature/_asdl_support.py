"""What :mod:`laplace.curvature.asdl` needs around ASDL: the layers it takes, where each
parameter lives, and a context that leaves the user's model as ASDL found it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.LayerNorm)
_KFAC_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
_ATTR = "laplace_asdl_result"
"""Module attribute under which ASDL stores a result (deleted after reading)."""

_ASDL_PARAM_TAG = "_original_requires_grad"
"""Attribute ASDL sets on each parameter it visits (see ``asdl.utils``)."""

_Owners = list[tuple[nn.Module, str]]


@contextmanager
def _asdl_context(module: nn.Module, seed: int | None, device: torch.device) -> Iterator[None]:
    """Where ASDL runs: gradients on, its hook deprecation warning off, RNG state kept.

    ASDL uses ``nn.Module.register_backward_hook`` (deprecated; it reads only the output
    gradients, which such hooks report correctly), and a ``seed`` makes it reseed torch's
    global generators, whose state is restored on exit. ASDL also tags every parameter it
    visits with an ``_original_requires_grad`` attribute, and its hooks mark modules as users
    of regular backward hooks; both are undone on exit so that the user's model is left as
    it was (and still accepts full backward hooks, as BackPACK or ``torch.func`` users need).
    """
    cpu = device.type == "cpu"
    with (
        warnings.catch_warnings(),
        torch.enable_grad(),
        torch.random.fork_rng(
            [] if cpu else [device], seed is not None, device_type=None if cpu else device.type
        ),
    ):
        warnings.filterwarnings("ignore", "Using a non-full backward hook", FutureWarning)
        try:
            yield
        finally:
            for param in module.parameters():
                vars(param).pop(_ASDL_PARAM_TAG, None)
            for sub in module.modules():
                # a module that once had a regular backward hook refuses full ones for good;
                # with ASDL's hooks gone, return it to the undecided state it started in
                if not sub._backward_hooks and sub._is_full_backward_hook is False:
                    sub._is_full_backward_hook = None


@contextmanager
def _linear_positions(owners: _Owners, n: int, positions: dict[nn.Module, int]) -> Iterator[None]:
    """Record in ``positions`` the positions ``R`` per sample each ``nn.Linear`` layer sees.

    Shapes:
        a layer input ``(n, *positions, in_features)`` gives ``R = prod(positions)``
    """

    def record(layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        positions[layer] = args[0].numel() // (args[0].shape[-1] * n)

    linear = {layer for layer, _ in owners if isinstance(layer, nn.Linear)}
    handles = [layer.register_forward_hook(record) for layer in linear]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _parameter_owners(
    backend: str, module: nn.Module, named: dict[str, Tensor], layers: tuple[type[nn.Module], ...]
) -> _Owners:
    """``(layer, "weight" | "bias")`` of each tensor in ``named``, checked for ASDL.

    ASDL concatenates per-layer results in ``module.modules()`` order, weight before bias:
    the order of ``named_parameters`` once each parameter is the weight or bias of exactly
    one layer of ``layers`` (and, if ``nn.Conv2d`` is among them, a convolution ASDL
    can unfold).

    Args:
        backend: The backend's class name, for the error message.
        module: The module ASDL differentiates.
        named: The parameters to locate, by name.
        layers: The layer types ASDL supports for the quantity asked for.

    Raises:
        ValueError: Naming the first parameter outside such a layer.
    """
    found: dict[int, _Owners] = {}
    for layer in module.modules():
        for attribute, p in layer.named_parameters(recurse=False):
            found.setdefault(id(p), []).append((layer, attribute))
    for name, p in named.items():
        candidates = found.get(id(p), [])
        layer, attribute = candidates[0] if candidates else (None, "?")
        odd_conv = (
            nn.Conv2d in layers
            and isinstance(layer, nn.Conv2d)
            and (
                isinstance(layer.padding, str)
                or (layer.groups, *layer.dilation, layer.padding_mode) != (1, 1, 1, "zeros")
            )
        )
        if (
            len(candidates) != 1
            or not isinstance(layer, layers)
            or attribute not in ("weight", "bias")
            or odd_conv
        ):
            raise ValueError(
                f"{backend} supports only the weights and biases of "
                f"{', '.join(t.__name__ for t in layers)} layers (a Conv2d with groups=1, "
                "dilation=1 and numeric zero padding), each owned by one layer; parameter "
                f"{name!r} is {type(layer).__name__}.{attribute}"
            )
    return [found[id(p)][0] for p in named.values()]
