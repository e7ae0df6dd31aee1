"""Fallbacks for models that PyTorch's vectorised autodiff cannot run.

The fast paths of the backends vectorise with ``torch.func`` and ``torch.autograd``:

- ``torch.func.vmap`` over the samples of a batch: per-sample Jacobians and loss gradients
  (:class:`~laplace.curvature.CurvatureInterface`), hence the GLM predictive and the
  ``torch.func`` diagonal and Gram curvatures;
- ``torch.autograd.grad(..., is_grads_batched=True)``, a ``vmap`` of the backward pass over
  its rows (the one-pass K-FAC of :mod:`laplace.curvature._kfac`);
- forward-mode and double-backward autodiff: the curvature-vector products of ``curvlinops``'
  operators (``torch.func.jvp``) and Hessians.

Some models cannot run under them. Hugging Face transformers build the attention mask of
their ``sdpa`` attention with data-dependent Python control flow (``if mask.all(): ...``),
which ``vmap`` cannot batch; operations without a batching rule fail likewise; and PyTorch's
fused ``scaled_dot_product_attention`` kernels (the CPU flash kernel, for instance) have
neither a forward-mode derivative nor a derivative of their backward pass.

:func:`run_with_fallback` is the one place that decides: it runs the fast path, and when that
raises the error of a :class:`FastPath` it cannot take (:func:`cannot_take`; only those errors,
any other propagates) it remembers that the module cannot take that path and runs the
fallback, now and in every later call for that module, so a fast path fails at most once per
module (once per fit in practice). Any other error of the fast path gets the fallback too,
once: if the fallback computes the result, the fast path was at fault (PyTorch's batching
rules have bugs: ``vmap`` of ``jacrev`` through ``nn.PReLU`` mismatches shapes in torch
2.14), the module is marked and a warning logged; if the fallback fails as well, the fast
path's error propagates (a bug of the model, say). The fallbacks compute the same numbers:
per-sample Jacobians from each sample run as a batch of one with one ordinary backward pass
per output (:func:`looped_jacobians`, :func:`jacobian_rows`), per-sample gradients from one forward
pass over the batch and one backward pass per sample loss; the rows of a backward
pass one at a time; the forward-mode products with attention computed by PyTorch's composite
"math" kernel (:func:`math_attention`), which every autodiff mode differentiates.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from laplace.utils.data import Inputs

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3 has no kernel choice: the error of the fast path is raised
    sdpa_kernel = None

__all__ = [
    "FastPath",
    "cannot_take",
    "jacobian_rows",
    "lacks",
    "looped_jacobians",
    "math_attention",
    "run_with_fallback",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class FastPath(str, Enum):
    """A vectorised autodiff path that some models cannot take."""

    VMAP = "torch.func.vmap over the samples of a batch"
    BATCHED_BACKWARD = "backward passes batched with is_grads_batched"
    FORWARD_MODE = "forward-mode and double-backward autodiff"


_BATCHING_MARKERS = ("vmap", "batching rule", "batched tensor", "functorch")
"""Substrings (lower case) of the errors ``vmap`` raises for what it cannot batch: data-dependent
control flow and ``.item()`` ("vmap: It looks like you're ..."), operations without a
batching rule, random operations, ``autograd.Function`` without a ``vmap`` rule."""

_FORWARD_MODE_MARKERS = ("forward ad", "derivative for")
"""Substrings (lower case) of the ``NotImplementedError`` / ``RuntimeError`` autograd raises
for an operation without a forward-mode derivative ("Trying to use forward AD with ...") or
without a derivative of its backward ("derivative for ..._backward is not implemented")."""

_lacking: weakref.WeakKeyDictionary[nn.Module, set[FastPath]] = weakref.WeakKeyDictionary()
"""The fast paths each module has been found unable to take (kept while the module lives)."""


def cannot_take(path: FastPath, error: BaseException) -> bool:
    """Whether ``error`` says that the computation cannot take ``path`` (not a bug elsewhere).

    Args:
        path: The fast path the computation took.
        error: What it raised.

    Returns:
        True for the errors of :data:`_BATCHING_MARKERS` under ``VMAP`` and
        ``BATCHED_BACKWARD``, and of :data:`_FORWARD_MODE_MARKERS` under ``FORWARD_MODE``.
    """
    if not isinstance(error, (RuntimeError, NotImplementedError)):
        return False
    message = str(error).lower()
    if path == FastPath.FORWARD_MODE:
        return any(marker in message for marker in _FORWARD_MODE_MARKERS) and (
            "not implemented" in message or "not support" in message
        )
    return any(marker in message for marker in _BATCHING_MARKERS)


_WRONG_UNDER_VMAP: tuple[type[nn.Module], ...] = (nn.PReLU,)
"""Layers whose ``vmap`` of ``jacrev`` PyTorch gets wrong (torch 2.14): through ``nn.PReLU``
it raises a shape mismatch for most batch sizes and, when the batch size equals the number
of outputs, returns wrong per-sample Jacobians without an error. A module that contains one
never takes ``FastPath.VMAP``."""


_screened: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""The modules whose layers :func:`lacks` has looked at for :data:`_WRONG_UNDER_VMAP`."""


def lacks(module: nn.Module, path: FastPath) -> bool:
    """Whether ``module`` has been found unable to take ``path`` (or is known to be:
    :data:`_WRONG_UNDER_VMAP`)."""
    if path in _lacking.get(module, ()):
        return True
    if path != FastPath.VMAP or module in _screened:
        return False
    _screened[module] = True  # the layers are looked at once per module
    if any(isinstance(m, _WRONG_UNDER_VMAP) for m in module.modules()):
        _lacking.setdefault(module, set()).add(path)
        return True
    return False


def run_with_fallback(
    module: nn.Module, path: FastPath, fast: Callable[[], T], fallback: Callable[[], T]
) -> T:
    """``fast()``, or ``fallback()`` where ``module`` cannot take ``path``.

    The first error of :func:`cannot_take` marks ``module``: every later call for it runs
    ``fallback`` directly. After another error, ``fallback`` runs once: its result marks
    ``module`` (with a logged warning), its failure re-raises the fast path's error.

    Args:
        module: The module the computation runs (the verdict is kept per module).
        path: The fast path ``fast`` takes.
        fast: The vectorised computation.
        fallback: The same computation without ``path``.

    Returns:
        What ``fast`` or ``fallback`` returns.
    """
    if lacks(module, path):
        return fallback()
    try:
        return fast()
    except (RuntimeError, NotImplementedError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        if cannot_take(path, error):
            logger.info(
                "%s cannot take %s (%s); using the fallback from now on",
                type(module).__name__,
                path.value,
                reason,
            )
            _lacking.setdefault(module, set()).add(path)
            return fallback()
        result = _fallback_or_raise(fallback, error)
    logger.warning(
        "%s failed on %s with an error that is not %s's own (%s), but the fallback computes "
        "it; using the fallback from now on",
        type(module).__name__,
        path.value,
        path.name.lower(),
        reason,
    )
    _lacking.setdefault(module, set()).add(path)
    return result


def _fallback_or_raise(fallback: Callable[[], T], error: BaseException) -> T:
    """``fallback()``, or ``error`` raised again where the fallback fails too.

    An error the fast path does not label as its own is either a bug of the model (which the
    fallback meets as well) or one of PyTorch's batching rules (``vmap`` of ``jacrev``
    through ``nn.PReLU`` mismatches shapes in torch 2.14): the fallback tells them apart.
    """
    try:
        return fallback()
    except Exception:
        raise error from None


def math_attention(module: nn.Module, compute: Callable[[], T]) -> T:
    """``compute()`` for forward-mode or double-backward autodiff through ``module``.

    Where a fused attention kernel has no such derivative, ``compute`` runs again (and from
    then on) with ``scaled_dot_product_attention`` on PyTorch's composite "math" kernel,
    which gives the same attention and every derivative.

    Raises:
        NotImplementedError: If ``compute`` still lacks a derivative with the math kernel,
            naming the operation and what to do.
    """

    def with_math_kernel() -> T:
        try:
            if sdpa_kernel is None:
                return compute()
            with sdpa_kernel(SDPBackend.MATH):
                return compute()
        except (RuntimeError, NotImplementedError) as error:
            if not cannot_take(FastPath.FORWARD_MODE, error):
                raise
            raise NotImplementedError(
                f"{type(module).__name__} has an operation without a forward-mode (or "
                f"double-backward) derivative, which this curvature needs: "
                f"{str(error).splitlines()[0]}. Use a GGN or EF backend whose structure "
                "takes only backward passes (kron, diag), or replace the operation (for a "
                "Hugging Face model, load it with attn_implementation='eager')"
            ) from error

    return run_with_fallback(module, FastPath.FORWARD_MODE, compute, with_math_kernel)


def jacobian_rows(outputs: Tensor, leaves: list[Tensor], create_graph: bool = False) -> Tensor:
    """``d outputs_i / d leaves`` for every entry ``i``, one ordinary backward pass each.

    Args:
        outputs: A 1-D tensor on the autograd graph of ``leaves``.
        leaves: Tensors that require grad (parameters unused by ``outputs`` get zero rows).
        create_graph: Keep the rows differentiable.

    Shapes:
        ``outputs``: ``(m,)`` -> ``(m, sum of leaves' numel)``
    """
    rows = []
    for i in range(outputs.shape[0]):
        grads = torch.autograd.grad(
            outputs[i],
            leaves,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
            materialize_grads=True,
        )
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def looped_jacobians(
    module: nn.Module,
    named: Mapping[str, Tensor],
    batched: Tensor | Mapping[str, Tensor],
    rebuild: Callable[[Any], Inputs],
    enable_backprop: bool,
    check_output: Callable[[Tensor], None],
) -> tuple[Tensor, Tensor]:
    """Per-sample Jacobians of ``module(inputs)`` w.r.t. ``named`` without ``vmap``.

    Each sample is run as a batch of one (as the vmapped path does), with one backward pass
    per output through that sample's graph only: ``batch`` small forward passes and
    ``batch * outputs`` small backward passes, where backward passes through the graph of
    the whole batch would cost ``batch`` times more each.

    Args:
        module: The module.
        named: The tensors differentiated, by name in ``module``.
        batched: What varies per sample: the input tensor, or the per-sample entries of a
            dict-like batch (``_split_samples`` of :mod:`laplace.curvature._tools`).
        rebuild: Turns one sample of ``batched`` into a batch of one the module takes.
        enable_backprop: Keep ``Js`` and ``f`` differentiable (w.r.t. the inputs and
            ``named``); otherwise they are detached.
        check_output: Raises for an output that is not ``(batch, outputs)``.

    Shapes:
        ``Js``: ``(batch, outputs, params)``; ``f``: ``(batch, outputs)``
    """
    leaves = {
        name: p if enable_backprop else p.detach().requires_grad_(True)
        for name, p in named.items()
    }
    n = len(batched) if isinstance(batched, Tensor) else len(next(iter(batched.values())))
    outputs, jacobians = [], []
    with torch.enable_grad():
        for b in range(n):
            sample = batched[b] if isinstance(batched, Tensor) else {
                key: value[b] for key, value in batched.items()
            }  # fmt: skip
            f_b = functional_call(module, leaves, (rebuild(sample),))
            check_output(f_b)
            jacobians.append(
                jacobian_rows(f_b.reshape(-1), list(leaves.values()), enable_backprop)
            )
            outputs.append(f_b[0])
    Js, f = torch.stack(jacobians), torch.stack(outputs)
    return (Js, f) if enable_backprop else (Js.detach(), f.detach())
