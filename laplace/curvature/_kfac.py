"""K-FAC factors of a batch in one forward pass and one batched backward pass.

For the exact GGN (Fisher type ``type-2``) and the empirical Fisher, the output-side factor of
a layer is ``B = sum_{n, r, k} g_nrk g_nrk^T``, where ``g_nrk`` is the gradient at the layer's
output (location ``r``) of ``f_n . R_nk`` and ``R_nk`` the rows of a root of the loss Hessian
w.r.t. the outputs (or the loss gradient, for the empirical Fisher). All rows ``k`` of all
samples go back through the network in one vectorised backward pass
(``torch.autograd.grad(..., is_grads_batched=True)``) instead of one pass per row, and the
softmax root has one row fewer than the number of classes. The input-side factor
``A = 1 / (N R) sum_{n, r} a_nr a_nr^T`` comes from the layer inputs seen by forward hooks
(unfolded patches for ``nn.Conv2d``), with the "expand" treatment of weight sharing
(Eschenhagen et al., 2023): a linear layer that sees a sequence per sample counts its
positions as ``R``; one that sees them folded into its first dimension counts every row as a
data point (``R = 1``), as ``curvlinops`` and therefore ``laplace-torch`` do. With the
"reduce" treatment (``reduce=True``) a sample's ``R`` inputs are averaged and its ``R`` output
gradients summed before the outer products: ``A = 1 / N sum_n abar_n abar_n^T`` and
``B = sum_{n, k} gsum_nk gsum_nk^T``, as ``curvlinops`` with ``kfac_approx="reduce"``.

The affine parameters of normalisation layers that do not couple the samples (batch norm in
eval mode, with running statistics; ``LayerNorm`` and ``GroupNorm``, with per-sample
statistics) get one-factor blocks, the exact curvature blocks: with ``xhat`` the layer's
input normalised without the affine map, a sample's Jacobian rows are
``d f / d gamma_ch = sum_pos g[ch, pos] xhat[ch, pos]`` and ``d f / d beta_ch =
sum_pos g[ch, pos]``, from the same gradients ``g`` at the layer's output, so the block is
``sum_{n, k}`` of their outer products. This goes beyond ``curvlinops``, whose K-FAC has no
blocks for them.

The convention is that of :mod:`laplace.curvature.curvlinops` (its module docstring), whose
``kron`` uses this path where it applies and ``curvlinops.KFACLinearOperator`` otherwise:
sampled Fishers, layers called more than once per forward pass, grouped or non-zero-padded
convolutions, string paddings.

The references are those of :mod:`laplace.curvature.curvlinops`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from laplace.curvature._fallback import FastPath, run_with_fallback
from laplace.errors import UnsupportedLayerError
from laplace.utils.data import Inputs
from laplace.utils.norm_jacobians import normalized_input, position_sums
from laplace.utils.precision import gram

_MAX_GRAD_ENTRIES = 2**24
"""Most entries of layer-output gradients held at once; the rows ``k`` are split to fit."""

_MIN_GRAM_ROWS = 1024
"""Fewest rows of layer inputs summed into an input-side factor at once when summing in place
(see :class:`PendingRows`): a float64 Gram of 200 rows runs at a third of the speed of one of
2,000 (measured), so the rows of small batches are kept until there are this many."""


class PendingRows:
    """Layer-input rows waiting to be summed into input-side factors (``A += c a^T a``).

    :func:`batch_kfac` with ``out`` adds the rows of a batch here; they are summed once
    ``_MIN_GRAM_ROWS`` have gathered for a factor, and the rest by :meth:`flush`, which the
    caller must call before it reads the factors.
    """

    def __init__(self) -> None:
        self._rows: dict[int, tuple[Tensor, list[Tensor], float]] = {}

    def add(self, factor: Tensor, rows: Tensor, scale: float, dtype: torch.dtype) -> None:
        """Keep ``rows`` for ``factor += scale * rows^T rows``; sum them once enough."""
        entry = self._rows.get(id(factor))
        if entry is None or entry[0] is not factor or entry[2] != scale:
            if entry is not None:
                self._sum(entry, dtype)
            entry = (factor, [], scale)
            self._rows[id(factor)] = entry
        entry[1].append(rows)
        if sum(r.shape[0] for r in entry[1]) >= _MIN_GRAM_ROWS:
            self._sum(entry, dtype)

    @staticmethod
    def _sum(entry: tuple[Tensor, list[Tensor], float], dtype: torch.dtype) -> None:
        factor, rows, scale = entry
        if rows:
            gram(torch.cat(rows), dtype, out=factor, scale=scale)
            rows.clear()

    def flush(self) -> None:
        """Sum every kept row into its factor."""
        for entry in self._rows.values():
            self._sum(entry, entry[0].dtype)
        self._rows.clear()


BATCH_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
"""Batch-norm layers, whose affine parameters are supported in eval mode (running statistics)."""

NORM_LAYERS: tuple[type[nn.Module], ...] = (*BATCH_NORM_LAYERS, nn.LayerNorm, nn.GroupNorm)
"""Normalisation layers whose affine parameters get exact one-factor blocks."""


def norm_layer_problem(layer: nn.Module) -> str | None:
    """Why the affine parameters of a normalisation layer have no exact block here, or None.

    A batch-norm layer in training mode, or one without running statistics, normalises with
    the statistics of the batch: every sample's output depends on every other sample, and
    the GGN is no sum of per-sample terms. A ``LayerNorm`` over several dimensions has a
    weight of more than one dimension, whose block would not be one factor.
    """
    if isinstance(layer, BATCH_NORM_LAYERS):
        if layer.training:
            return (
                "is in training mode, where it normalises with the statistics of the batch "
                "(coupling the samples); put it in eval mode (model.eval()) to normalise with "
                "its running statistics"
            )
        if layer.running_mean is None or layer.running_var is None:
            return (
                "has no running statistics (track_running_stats=False), so it normalises with "
                "the statistics of the batch even in eval mode (coupling the samples)"
            )
    if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) != 1:
        return (
            f"normalises over {len(layer.normalized_shape)} dimensions; only a "
            "one-dimensional normalized_shape is supported"
        )
    return None


KFAC_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, *NORM_LAYERS)
"""The layers whose parameters K-FAC has blocks for."""


def check_kfac_layers(
    caller: str, module: nn.Module, names: Sequence[str], params: Sequence[Tensor]
) -> list[str]:
    """Raise unless every parameter belongs to one of :data:`KFAC_LAYERS`, a normalisation
    layer only without a :func:`norm_layer_problem`; the names of the normalisation layers'
    parameters.

    Args:
        caller: Who asks, for the messages (``"CurvlinopsGGN.kron"``).
        module: The network.
        names: The parameters' names, in the order of ``params``.
        params: The trainable parameters.

    Raises:
        UnsupportedLayerError: Naming the first parameter of another layer type, or of a
            batch norm in training mode (or without running statistics), or of a
            ``LayerNorm`` over several dimensions.
    """
    owners = {id(p): layer for layer in module.modules() for p in layer.parameters(recurse=False)}
    norm_params = []
    for name, p in zip(names, params):
        owner = owners.get(id(p))
        if not isinstance(owner, KFAC_LAYERS):
            raise UnsupportedLayerError(
                f"{caller} supports only parameters of "
                f"{', '.join(t.__name__ for t in KFAC_LAYERS)} layers; parameter "
                f"{name!r} belongs to {type(owner).__name__}"
            )
        if isinstance(owner, NORM_LAYERS):
            problem = norm_layer_problem(owner)
            if problem is not None:
                raise UnsupportedLayerError(
                    f"{caller}: parameter {name!r} belongs to a {type(owner).__name__} layer "
                    f"that {problem}"
                )
            norm_params.append(name)
    return norm_params


def _supported(layer: nn.Module) -> bool:
    """Whether ``layer``'s parameters have blocks here: a Linear, a Conv2d whose patches are
    those of ``nn.functional.unfold``, or a normalisation layer without a
    :func:`norm_layer_problem`."""
    if isinstance(layer, nn.Linear):
        return True
    if isinstance(layer, NORM_LAYERS):
        return norm_layer_problem(layer) is None
    return (
        isinstance(layer, nn.Conv2d)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def _layer_owners(
    model: nn.Module, params: Sequence[Tensor]
) -> list[tuple[nn.Module, str]] | None:
    """``(layer, "weight" | "bias")`` per parameter, or None if a parameter has no such layer."""
    found = {}
    for layer in model.modules():
        if isinstance(layer, KFAC_LAYERS) and _supported(layer):
            for kind, p in layer.named_parameters(recurse=False):
                found[id(p)] = (layer, kind)
    owners = [found.get(id(p)) for p in params]
    return None if any(o is None for o in owners) else owners


def _norm_rows(layer: nn.Module, g: Tensor, xhat: Tensor, kind: str) -> Tensor:
    """Per-sample Jacobian rows of a normalisation layer's ``weight`` (gamma) or ``bias``
    (beta) from the gradients ``g`` at its output, summed over each sample's positions
    (:func:`~laplace.utils.norm_jacobians.position_sums`): ``d f / d gamma_ch = sum_pos
    g[ch, pos] xhat[ch, pos]``, ``d f / d beta_ch = sum_pos g[ch, pos]``.

    Shapes:
        ``g (k, batch, ...)``, ``xhat (batch, ...) -> (k * batch, channels)``
    """
    if kind == "weight":
        g = g * xhat
    return position_sums(layer, g.flatten(0, 1))


def _input_rows(layer: nn.Module, a: Tensor, reduce: bool = False) -> tuple[Tensor, int]:
    """Layer inputs as rows that multiply the flattened weight, and the weight-sharing size.

    The size ``R`` is the product of the input's dimensions between the first and the last
    (the output pixels of a convolution): a layer that sees its inputs folded into the
    first dimension (``(batch * R, in)``) counts each row as a data point, as
    ``curvlinops`` does. With ``reduce`` ("reduce", Eschenhagen et al., 2023) a row is the
    mean of a sample's ``R`` rows, and the size returned is 1.

    Shapes:
        ``-> (rows, in)``: ``rows = batch * R``, or ``batch`` with ``reduce``
    """
    if isinstance(layer, nn.Conv2d):
        cols = nn.functional.unfold(
            a, layer.kernel_size, layer.dilation, layer.padding, layer.stride
        )
        if reduce:
            return cols.mean(dim=2), 1
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), cols.shape[2]
    if reduce:
        return a.reshape(a.shape[0], -1, a.shape[-1]).mean(dim=1), 1
    return a.reshape(-1, a.shape[-1]), a.shape[1:-1].numel()


def _output_rows(layer: nn.Module, g: Tensor, reduce: bool = False) -> Tensor:
    """Output gradients ``(k, batch, out, ...)`` or ``(k, batch, ..., out)`` as rows; with
    ``reduce`` summed over a sample's weight-sharing locations first.

    Shapes:
        ``-> (k * batch * R, out)``, or ``(k * batch, out)`` with ``reduce``
    """
    if isinstance(layer, nn.Conv2d):
        if reduce:
            return g.flatten(3).sum(dim=3).reshape(-1, g.shape[2])
        return g.movedim(2, -1).reshape(-1, g.shape[2])
    if reduce:
        return g.reshape(g.shape[0] * g.shape[1], -1, g.shape[-1]).sum(dim=1)
    return g.reshape(-1, g.shape[-1])


def _batched_grad(
    model: nn.Module, f: Tensor, outputs: list[Tensor], directions: Tensor
) -> tuple[Tensor, ...]:
    """Gradients at ``outputs`` of ``f . d`` for every row ``d`` of ``directions``, stacked.

    One vectorised backward pass; for a ``model`` with operations that have no batching rule
    for it (custom autograd functions, for instance), one backward pass per row, from the
    first failure on (:func:`~laplace.curvature._fallback.run_with_fallback`).

    Shapes:
        ``directions``: ``(k, *f.shape)`` -> each gradient ``(k, *output.shape)``
    """

    def batched() -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            f, outputs, grad_outputs=directions, retain_graph=True, is_grads_batched=True
        )

    def per_row() -> tuple[Tensor, ...]:
        rows = [
            torch.autograd.grad(f, outputs, grad_outputs=d, retain_graph=True) for d in directions
        ]
        return tuple(torch.stack(parts) for parts in zip(*rows))

    return run_with_fallback(model, FastPath.BATCHED_BACKWARD, batched, per_row)


def _forward(
    model: nn.Module, layers: Sequence[nn.Module], inputs: Inputs
) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]] | None:
    """One forward pass with hooks on ``layers``: the output ``f`` and, per layer, its
    detached input (``xhat``, see :func:`~laplace.utils.norm_jacobians.normalized_input`, for a
    normalisation layer) and its
    output; None if a layer runs other than once or ``f`` is not ``(batch, outputs)``.

    The hooks hand a copy of each output on, so that an in-place operation after a layer
    (``ReLU(inplace=True)``, ``out += identity`` in a residual block) leaves the captured
    output, and the gradients taken at it, as the layer computed it.
    """
    seen: dict[int, list[tuple[Tensor, Tensor]]] = {id(layer): [] for layer in layers}

    def hook(layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        a = args[0].detach()
        if isinstance(layer, NORM_LAYERS):
            a = normalized_input(layer, a)
        seen[id(layer)].append((a, output))
        return output.clone()

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.enable_grad():
            f = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if f.ndim != 2 or any(len(calls) != 1 for calls in seen.values()):
        return None
    return f, {key: calls[0] for key, calls in seen.items()}


def _gram_key(layer: nn.Module, kind: str) -> tuple[int, str]:
    """Which output-side Gram a parameter's block uses: a Linear's or Conv2d's weight and
    bias share one, each parameter of a normalisation layer has its own."""
    return id(layer), kind if isinstance(layer, NORM_LAYERS) else ""


def _two_factors(layer: nn.Module, kind: str) -> bool:
    """Whether the block of ``layer``'s parameter ``kind`` is ``[B, A]`` (else ``[B]``)."""
    return kind == "weight" and not isinstance(layer, NORM_LAYERS)


def _output_grams(
    model: nn.Module,
    f: Tensor,
    root: Tensor,
    owners: Sequence[tuple[nn.Module, str]],
    captured: dict[int, tuple[Tensor, Tensor]],
    reduce: bool,
    dtype: torch.dtype,
) -> dict[tuple[int, str], Tensor]:
    """The output-side Grams by :func:`_gram_key`, from batched backward passes of the rows
    of ``root`` (split to hold at most ``_MAX_GRAD_ENTRIES`` gradient entries at once).

    Shapes:
        ``f (batch, outputs)``, ``root (batch, k, outputs)``
    """
    layers = list({id(layer): layer for layer, _ in owners}.values())
    kinds: dict[int, list[str]] = {id(layer): [] for layer in layers}
    for layer, kind in owners:
        kinds[id(layer)].append(kind)
    outputs = [captured[id(layer)][1] for layer in layers]
    chunk = max(1, _MAX_GRAD_ENTRIES // max(sum(out.numel() for out in outputs), 1))
    grams: dict[tuple[int, str], Tensor] = {}
    directions = root.transpose(0, 1)  # (k, batch, outputs)
    for start in range(0, directions.shape[0], chunk):
        with torch.enable_grad():
            grads = _batched_grad(model, f, outputs, directions[start : start + chunk])
        for layer, g in zip(layers, grads):
            g = g.detach()
            if isinstance(layer, NORM_LAYERS):
                xhat = captured[id(layer)][0]
                rows = {kind: _norm_rows(layer, g, xhat, kind) for kind in kinds[id(layer)]}
            else:
                rows = {"": _output_rows(layer, g, reduce)}
            for kind, part in rows.items():
                key = (id(layer), kind)
                if key in grams:
                    gram(part, dtype, out=grams[key])
                else:
                    grams[key] = gram(part, dtype)
    return grams


def batch_kfac(
    model: nn.Module,
    params: Sequence[Tensor],
    inputs: Inputs,
    n_data: int,
    rows: Callable[[Tensor], Tensor | None],
    dtype: torch.dtype | None = None,
    out: list[list[Tensor]] | None = None,
    scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
    pending: PendingRows | None = None,
    reduce: bool = False,
) -> tuple[list[list[Tensor]], Tensor] | None:
    """K-FAC factors of one batch, or None where this path does not apply.

    The affine parameters of a normalisation layer (:data:`NORM_LAYERS`, without a
    :func:`norm_layer_problem`) get their exact curvature block ``sum_{n, k} j_nk j_nk^T``,
    one factor, from the per-sample Jacobian rows ``j_nk`` of :func:`_norm_rows`: there is
    no weight sharing to approximate, so ``reduce`` does not change it.

    Args:
        model: The network; its output has shape ``(batch, outputs)``.
        params: The trainable parameters, in posterior order.
        inputs: The batch, passed to ``model`` whole.
        n_data: Size of the data set ``N``.
        rows: Maps the detached outputs ``f`` to the rows ``R`` whose Gram
            ``sum_k R_nk^T R_nk`` is the loss curvature w.r.t. ``f_n``, or to None for the
            identity.
        dtype: The dtype in which the factors (Grams) are summed and returned (default the
            model's).
        out: Factors, as returned, to add this batch's to in place (the input-side Gram
            goes straight into them, without a temporary); they are then returned.
        scales: Multipliers of the weight blocks' ``B``, the one-factor blocks (biases,
            normalisation parameters) and ``A``.
        pending: With ``out``, where to keep the layer inputs of small batches until enough
            rows have gathered (then ``pending.flush()`` must run before ``out`` is read).
        reduce: The "reduce" approximation for weight sharing instead of "expand" (see
            :class:`~laplace.curvature._options.KFACApprox`).

    Returns:
        ``(kfacs, f)``: per parameter ``[B, A]`` for a Linear or Conv2d weight and ``[B]``
        for a bias or a normalisation parameter, and the detached outputs. None if a
        parameter is not one of a supported layer or a layer runs other than once.

    Shapes:
        ``f``: ``(batch, outputs)``; ``R``: ``(batch, k, outputs)``
    """
    owners = _layer_owners(model, params)
    if owners is None:
        return None
    layers = list({id(layer): layer for layer, _ in owners}.values())
    forward = _forward(model, layers, inputs)
    if forward is None:
        return None
    f, captured = forward
    batch, n_out = f.shape
    root = rows(f.detach())
    if root is None:
        root = torch.eye(n_out, dtype=f.dtype, device=f.device).expand(batch, n_out, n_out)
    dtype = dtype or f.dtype
    grams = _output_grams(model, f, root, owners, captured, reduce, dtype)
    weight_B, one_factor_B, input_scale = scales
    if out is None:
        out = []
        for layer, kind in owners:
            b = grams[_gram_key(layer, kind)]
            if _two_factors(layer, kind):
                a_rows, sharing = _input_rows(layer, captured[id(layer)][0], reduce)
                A = gram(a_rows, dtype).mul_(input_scale / (n_data * sharing))
                out.append([b * weight_B, A])
            else:
                out.append([b * one_factor_B])
        return out, f.detach()
    for (layer, kind), block in zip(owners, out):
        b = grams[_gram_key(layer, kind)]
        if not _two_factors(layer, kind):
            block[0].add_(b, alpha=one_factor_B)
            continue
        block[0].add_(b, alpha=weight_B)
        a_rows, sharing = _input_rows(layer, captured[id(layer)][0], reduce)
        scale = input_scale / (n_data * sharing)
        if pending is None:
            gram(a_rows, dtype, out=block[1], scale=scale)
        else:
            pending.add(block[1], a_rows, scale, dtype)
    return out, f.detach()
