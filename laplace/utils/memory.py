"""The memory budget of the tensors that grow with ``batch x outputs x params``.

Jacobians of a whole batch, ``(batch, outputs, params)``, are the one intermediate of a
Laplace approximation whose size is a product of three large numbers (ten classes, a
thousand inputs and ten million weights make 400 GB in float32). Wherever the library forms
Jacobians for the GLM predictive it plans its blocks against one budget, in bytes:

- a batch whose Jacobians fit, with one temporary of their size (the products with the
  posterior), is processed whole;
- a larger batch is split into blocks of as many inputs as fit (peak memory stays at the
  budget, whatever the batch size);
- where the Jacobian of a single input does not fit, the all-weights and subnetwork
  approximations switch to Jacobian-free forward-mode products (posterior samples pushed
  through ``torch.func.jvp``, see :class:`~laplace.kernel.FunctionSampler`) and estimate the
  predictive covariance from :func:`glm_sample_count` samples; other approximations raise
  :class:`MemoryBudgetError`, which names the budget.

``fit`` splits its batches the same way, and the posterior kernel keeps two blocks of rows
within the budget. Peak memory then stays near the budget plus what the model itself needs,
whatever the batch size and the number of outputs (``benchmarks/bench_memory.py``). The
default is 2 GiB; change it with :func:`set_memory_budget` or, for a block of code, the
:func:`memory_budget` context manager.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "MemoryBudgetError",
    "get_memory_budget",
    "glm_sample_count",
    "memory_budget",
    "rows_within_budget",
    "set_glm_sample_count",
    "set_memory_budget",
]

DEFAULT_BUDGET = 2 * 2**30
"""The default budget in bytes (2 GiB)."""

_state = {"budget": DEFAULT_BUDGET, "samples": 256}


class MemoryBudgetError(MemoryError):
    """Even the smallest block of a computation exceeds the memory budget."""


def _checked_bytes(nbytes: object) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"the memory budget must be a positive number of bytes, got {nbytes!r}")
    return nbytes


def get_memory_budget() -> int:
    """The current budget in bytes."""
    return _state["budget"]


def set_memory_budget(nbytes: int | None) -> None:
    """Set the budget in bytes (None restores :data:`DEFAULT_BUDGET`).

    Raises:
        ValueError: For anything but a positive integer or None.
    """
    _state["budget"] = DEFAULT_BUDGET if nbytes is None else _checked_bytes(nbytes)


@contextmanager
def memory_budget(nbytes: int) -> Iterator[None]:
    """Use a budget of ``nbytes`` within the block, restoring the previous one afterwards.

    Raises:
        ValueError: For anything but a positive integer.
    """
    previous, _state["budget"] = _state["budget"], _checked_bytes(nbytes)
    try:
        yield
    finally:
        _state["budget"] = previous


def glm_sample_count() -> int:
    """Posterior samples of the Jacobian-free GLM predictive (default 256)."""
    return _state["samples"]


def set_glm_sample_count(n_samples: int) -> None:
    """Set the number of samples of the Jacobian-free GLM predictive.

    Raises:
        ValueError: Unless ``n_samples`` is an integer of at least 2.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer of at least 2, got {n_samples!r}")
    _state["samples"] = n_samples


def rows_within_budget(bytes_per_row: int, what: str) -> int:
    """How many rows of ``bytes_per_row`` bytes fit in the budget (at least 1).

    Raises:
        MemoryBudgetError: If not even one row fits; the message names ``what``, its size
            and the budget.
    """
    budget = get_memory_budget()
    if bytes_per_row > budget:
        raise MemoryBudgetError(
            f"{what} needs {bytes_per_row / 2**20:.1f} MiB for a single input, more than the "
            f"memory budget of {budget / 2**20:.1f} MiB; raise it with "
            "laplace.utils.memory.set_memory_budget(nbytes) or use an approximation that "
            "needs no Jacobians (last layer, or all weights with a Jacobian-free predictive)"
        )
    return budget // bytes_per_row
