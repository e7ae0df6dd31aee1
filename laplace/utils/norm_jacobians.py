"""Jacobian rows of the affine parameters of normalisation layers.

A normalisation layer maps its input ``x`` to ``y = gamma * xhat + beta``, with ``xhat`` the
input normalised by statistics that, here, never depend on the other samples of the batch:
the running statistics of batch normalisation in eval mode (Ioffe & Szegedy, ICML 2015),
each sample's own over its features for layer normalisation (Ba et al., 2016) and over its
channel groups for group normalisation (Wu & He, ECCV 2018). ``gamma`` and ``beta`` are
shared by every position of a channel (batch and group normalisation: dimension 1 of the
input) or of the normalised shape (layer normalisation: the trailing dimensions), so the
Jacobian of network output ``c`` w.r.t. them is, per sample,

    d f_c / d gamma_j = sum_pos G_c[j, pos] xhat[j, pos],   d f_c / d beta_j = sum_pos G_c[j, pos],

with ``G_c`` the gradient at the layer's output: dense ``(batch, outputs, channels)`` rows,
from the same backward passes as the factors of the linear layers
(:mod:`laplace.utils.linear_jacobians`). A batch normalisation layer that normalises with the
batch's statistics (in training mode, or without running statistics) couples the samples:
the network then has no per-sample Jacobians of this kind (:func:`uses_batch_statistics`).
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "factored_norm",
    "normalized_input",
    "position_sums",
    "sees_one_sample_each",
    "uses_batch_statistics",
]


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether a batch normalisation layer of ``model`` normalises with the statistics of the
    batch (in training mode, or in eval mode without running statistics), so that a sample's
    output depends on the other samples."""
    return any(
        isinstance(m, _BatchNorm)
        and (m.training or (m.running_mean is None and m.running_var is None))
        for m in model.modules()
    )


def factored_norm(layer: nn.Module) -> bool:
    """Whether ``layer`` is a supported normalisation layer: an ``nn.BatchNorm1d/2d/3d``
    that normalises with its running statistics, an ``nn.LayerNorm`` or an ``nn.GroupNorm``,
    each keeping its class's forward."""
    if isinstance(layer, _BatchNorm):
        running = layer.running_mean is not None and layer.running_var is not None
        uses_running = running and not layer.training
        return type(layer).forward is _BatchNorm.forward and uses_running
    if isinstance(layer, nn.LayerNorm):
        return type(layer).forward is nn.LayerNorm.forward
    if isinstance(layer, nn.GroupNorm):
        return type(layer).forward is nn.GroupNorm.forward
    return False


def normalized_input(layer: nn.Module, inputs: Tensor) -> Tensor:
    """``xhat``, the input of a supported normalisation layer (:func:`factored_norm`)
    normalised as the layer does it, before its affine map.

    Shapes:
        ``(batch, *) -> (batch, *)``
    """
    if isinstance(layer, _BatchNorm):
        mean, var = layer.running_mean, layer.running_var
        return functional.batch_norm(inputs, mean, var, training=False, eps=layer.eps)
    if isinstance(layer, nn.LayerNorm):
        return functional.layer_norm(inputs, layer.normalized_shape, eps=layer.eps)
    return functional.group_norm(inputs, layer.num_groups, eps=layer.eps)


def position_sums(layer: nn.Module, tensor: Tensor) -> Tensor:
    """``tensor`` (shaped like the layer's input) summed over the positions that share an
    affine parameter, per sample: over the dimensions after the channels (batch and group
    normalisation), or before the normalised shape (layer normalisation).

    Shapes:
        ``(batch, *) -> (batch, channels)``
    """
    batch = tensor.shape[0]
    if isinstance(layer, nn.LayerNorm):
        size = math.prod(layer.normalized_shape)
        return tensor.reshape(batch, -1, size).sum(1)
    return tensor.reshape(batch, tensor.shape[1], -1).sum(-1)


def sees_one_sample_each(layer: nn.Module, inputs: Tensor, n: int) -> bool:
    """Whether a normalisation layer's input has one sample per row of the batch (its
    leading dimension ``n``, with at least one dimension besides the normalised ones)."""
    normalised = len(layer.normalized_shape) if isinstance(layer, nn.LayerNorm) else 1
    return inputs.shape[0] == n and inputs.ndim > normalised
