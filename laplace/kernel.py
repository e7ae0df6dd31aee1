"""The posterior kernel of the linearised network and joint function samples.

A Laplace approximation with posterior covariance ``P^-1`` over the weights ``theta`` turns
the linearised network ``f(x) + J(x) (theta - theta_MAP)`` into a Gaussian process with
mean ``f(x)`` and kernel

    ``k(x1, x2) = J(x1) P^-1 J(x2)^T``  (an ``outputs x outputs`` block per pair),

the GLM predictive's covariance (Immer, Korzepa & Bauer, AISTATS 2021; Khan et al., NeurIPS
2019). Active learning, Bayesian optimisation and calibration need it between *sets*: the
joint covariance of a pool, the covariance between candidates and points of interest.
:class:`PosteriorKernel` evaluates it in blocks of ``batch_size`` inputs, so at most two
blocks of Jacobian rows ``(batch_size, outputs, params)`` exist at a time (never the
``(N * outputs, params)`` Jacobian of a whole set; fewer inputs per block where two blocks
would exceed the memory budget of :mod:`laplace.utils.memory`); each block pair goes through the
posterior's structure (``Posterior.inv_bilinear``: Kronecker factors in their eigenbases,
a diagonal, a Cholesky factor or a low-rank Woodbury form, never a dense ``P^-1`` that the
structure does not hold). The diagonal :meth:`PosteriorKernel.diagonal` is the GLM predictive
variance itself, with every fast path of the class (Kronecker-factored Jacobians of Linear
layers, the last layer's closed forms).

The function-space classes provide the same kernel from their Gaussian-process posterior.

:class:`FunctionSampler` draws weight samples once (from a seed) and evaluates the functions
they define at any inputs, so that samples at different chunks of a pool are samples of the
*same* functions, as Thompson sampling and joint acquisition functions need.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from laplace.utils.data import Inputs, batch_size, check_finite_inputs
from laplace.utils.enums import HessianStructure, PredType, parse_enum
from laplace.utils.memory import rows_within_budget

if TYPE_CHECKING:
    from laplace.base import BaseLaplace

__all__ = ["FunctionSampler", "PosteriorKernel", "input_chunks"]

_CACHE_ENTRIES = 2**24
"""Default most entries of Jacobian rows of the second argument kept between row blocks."""


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _slice(X: Inputs, start: int, stop: int, n: int) -> Inputs:
    """Rows ``start:stop`` of a tensor, or of every per-sample entry of a dict-like batch."""
    if isinstance(X, Tensor):
        return X[start:stop]
    return type(X)(
        {
            key: value[start:stop]
            if isinstance(value, Tensor) and value.shape[:1] == (n,)
            else value
            for key, value in X.items()
        }
    )


def input_chunks(X: Inputs, size: int, dict_key_x: str = "input_ids") -> Iterator[Inputs]:
    """Consecutive blocks of at most ``size`` inputs of ``X`` (a tensor or a dict batch)."""
    n = batch_size(X, dict_key_x)
    for start in range(0, n, size):
        yield _slice(X, start, min(start + size, n), n)


class PosteriorKernel:
    """``k(X1, X2) = J(X1) P^-1 J(X2)^T`` of a fitted Laplace approximation.

    Create it with ``la.posterior_kernel()``. Calls run with the model in eval mode and
    without autograd graphs (unless the approximation has ``enable_backprop``).

    Args:
        la: The fitted Laplace approximation.
        batch_size: Inputs per block of Jacobian rows.
        max_cached_entries: Jacobian rows of ``X2`` are computed once and kept while they hold
            at most this many numbers (also for the next call with the same, unmodified
            ``X2`` tensor); beyond it they are recomputed for every block of ``X1`` (time for
            memory).

    Raises:
        ValueError: If ``batch_size`` or ``max_cached_entries`` is not a positive integer.
    """

    def __init__(
        self, la: BaseLaplace, batch_size: int = 256, max_cached_entries: int = _CACHE_ENTRIES
    ) -> None:
        self.la = la
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_cached_entries = _positive_int(max_cached_entries, "max_cached_entries")
        self._last: tuple[Tensor, int, list[Tensor]] | None = None

    def _check(self, X: Inputs, name: str) -> None:
        self.la._check_fitted()
        if isinstance(X, (Tensor, MutableMapping)):
            if not self.la.enable_backprop:
                check_finite_inputs(X, name)
            return
        raise TypeError(f"{name} must be a tensor or a dict-like batch, got {type(X).__name__}")

    def _chunks(self, X: Inputs) -> list[Inputs]:
        """Blocks of at most ``batch_size`` inputs, fewer where two blocks of rows would
        exceed the memory budget (:mod:`laplace.utils.memory`)."""
        fitting = rows_within_budget(self.la._kernel_row_bytes(), "the kernel's rows")
        size = min(self.batch_size, max(1, fitting // 2))
        return list(input_chunks(X, size, self.la.dict_key_x))

    def _context(self) -> Any:
        return torch.enable_grad() if self.la.enable_backprop else torch.no_grad()

    def _rows(self, X: Inputs) -> Tensor:
        with self.la._explained_input_errors(X):
            return self.la._kernel_rows(X)

    def _block(self, R1: Tensor, R2: Tensor) -> Tensor:
        """The ``(b1, b2, outputs, outputs)`` kernel block of two blocks of rows."""
        (b1, C), b2 = R1.shape[:2], R2.shape[0]
        cross = self.la._kernel_cross(R1, R2)
        return cross.reshape(b1, C, b2, C).permute(0, 2, 1, 3)

    def __call__(self, X1: Inputs, X2: Inputs | None = None) -> Tensor:
        """The kernel between every input of ``X1`` and every input of ``X2`` (default
        ``X1``; then the result is exactly symmetric).

        Returns:
            ``K`` with ``K[i, j] = J(x1_i) P^-1 J(x2_j)^T``.

        Shapes:
            ``-> (n1, n2, outputs, outputs)``

        Raises:
            TypeError: If an input is neither a tensor nor a dict-like batch.
            ValueError: If the approximation is not fitted, or for non-finite inputs.
        """
        self._check(X1, "X1")
        if X2 is None:
            return self._symmetric(X1)
        self._check(X2, "X2")
        with self._context():
            blocks2 = self._chunks(X2)
            cached = self._remembered(X2)
            rows: list[Tensor] = []
            for chunk1 in self._chunks(X1):
                R1 = self._rows(chunk1)
                cached = self._cache(cached, blocks2, R1)
                rows.append(
                    torch.cat(
                        [self._block(R1, R2) for R2 in self._second_rows(cached, blocks2)], 1
                    )
                )
            self._remember(X2, cached)
            return torch.cat(rows, 0)

    def _remembered(self, X2: Inputs) -> list[Tensor] | None:
        """The cached rows of ``X2`` from the previous call if it had the same, unmodified
        tensor as its second argument (scoring a fixed pool against one point after
        another); else an empty list to fill."""
        last = self._last
        if last is not None and last[0] is X2 and last[1] == X2._version:
            return last[2]
        return []

    def _remember(self, X2: Inputs, cached: list[Tensor] | None) -> None:
        self._last = (X2, X2._version, cached) if isinstance(X2, Tensor) and cached else None

    def _cache(self, cached: list[Tensor] | None, blocks: list[Inputs], R1: Tensor) -> Any:
        """The rows of every block of ``X2`` if they fit in :attr:`max_cached_entries`
        (computed on the first call), else None."""
        if cached is None or cached:
            return cached
        n2 = sum(batch_size(block, self.la.dict_key_x) for block in blocks)
        if n2 * R1.shape[1] * R1.shape[2] > self.max_cached_entries:
            return None
        return [self._rows(block) for block in blocks]

    def _second_rows(self, cached: list[Tensor] | None, blocks: list[Inputs]) -> Iterator[Tensor]:
        if cached is not None:
            yield from cached
            return
        for block in blocks:
            yield self._rows(block)

    def _symmetric(self, X: Inputs) -> Tensor:
        """``k(X, X)``: the blocks on and above the diagonal, the rest by transposition."""
        with self._context():
            blocks = self._chunks(X)
            sizes = [batch_size(block, self.la.dict_key_x) for block in blocks]
            n, starts = sum(sizes), [sum(sizes[:i]) for i in range(len(sizes))]
            K = None
            for i, block_i in enumerate(blocks):
                R_i = self._rows(block_i)
                if K is None:
                    C = R_i.shape[1]
                    K = R_i.new_zeros(n, n, C, C, dtype=self.la._dtype)
                rows_i = slice(starts[i], starts[i] + sizes[i])
                diagonal = self._block(R_i, R_i)
                K[rows_i, rows_i] = 0.5 * (diagonal + diagonal.permute(1, 0, 3, 2))
                for j in range(i + 1, len(blocks)):
                    rows_j = slice(starts[j], starts[j] + sizes[j])
                    block = self._block(R_i, self._rows(blocks[j]))
                    K[rows_i, rows_j] = block
                    K[rows_j, rows_i] = block.permute(1, 0, 3, 2)
            return K

    def diagonal(self, X: Inputs) -> Tensor:
        """``k(x, x)`` for each input: the GLM predictive covariance of the outputs.

        Shapes:
            ``-> (n, outputs, outputs)``

        Raises:
            TypeError: If ``X`` is neither a tensor nor a dict-like batch.
            ValueError: If the approximation is not fitted, or for non-finite inputs.
        """
        self._check(X, "X")
        with self._context():
            parts = []
            for chunk in self._chunks(X):
                with self.la._explained_input_errors(chunk):
                    parts.append(self.la._glm_predictive_distribution(chunk)[1])
            return torch.cat(parts)

    def variance(self, X: Inputs) -> Tensor:
        """The marginal variance of each output, ``diag k(x, x)``.

        Shapes:
            ``-> (n, outputs)``
        """
        self._check(X, "X")
        with self._context():
            parts = []
            for chunk in self._chunks(X):
                with self.la._explained_input_errors(chunk):
                    parts.append(self.la._glm_predictive_diagonal(chunk)[1])
            return torch.cat(parts)


class FunctionSampler:
    """Posterior functions drawn once, evaluated at any inputs.

    Create it with ``la.function_sampler(n_samples, seed=...)``; for the function-space
    classes :class:`~laplace.functional.FunctionalLaplace` and :class:`~laplace.functional.ELLA`
    the ``glm`` functions are drawn from their Gaussian-process posterior in weight space
    (Matheron's rule for the subset of data; the feature weights for ELLA). The weight samples
    ``theta_s`` are drawn when it is created; every call evaluates the same ``n_samples``
    functions, so samples at different chunks of a pool belong together. Two samplers made
    with the same seed draw the same functions.

    - ``pred_type="glm"``: the linearised network ``f(x) + J(x) (theta_s - theta_MAP)``;
    - ``pred_type="nn"``: the network at ``theta_s``.

    Args:
        la: The fitted weight-space Laplace approximation.
        n_samples: Number of functions.
        seed: Seed of the generator on the model's device that draws the weights; None draws
            from PyTorch's global generator.
        pred_type: ``"glm"`` or ``"nn"``.
        batch_size: Inputs per block of Jacobian rows (``glm``).
        method: How ``glm`` functions are evaluated: ``"jacobian"`` (Jacobian rows of a block
            times the samples), ``"jvp"`` (a forward-mode Jacobian-vector product per sample,
            never forming a Jacobian; all-weights and subnetwork approximations) or
            ``"auto"``: ``"jvp"`` where it applies and a block's Jacobian rows would hold
            more than ``max_jacobian_entries`` numbers or the outputs outnumber the samples
            (reverse mode needs one pass per output, forward mode one per sample).
        max_jacobian_entries: The Jacobian budget of ``"auto"``.

    Raises:
        ValueError: For a non-positive ``n_samples`` or ``batch_size``, an unknown
            ``pred_type``, or an unfitted approximation.
        TypeError: For a ``seed`` that is not an integer.
        NotImplementedError: For ``"nn"`` with a function-space approximation, or one whose
            posterior has no joint samples (:class:`~laplace.functional.VaLLA`).
    """

    def __init__(
        self,
        la: BaseLaplace,
        n_samples: int = 100,
        seed: int | None = None,
        pred_type: PredType | str = PredType.GLM,
        batch_size: int = 256,
        method: str = "auto",
        max_jacobian_entries: int = 2**24,
    ) -> None:
        la._check_fitted()
        if method not in ("auto", "jacobian", "jvp"):
            raise ValueError(f"method must be 'auto', 'jacobian' or 'jvp', got {method!r}")
        if method == "jvp" and (
            not hasattr(la.subset, "linearized_at") or la._structure == HessianStructure.GP
        ):
            raise ValueError(
                f"method='jvp' needs an all-weights or subnetwork approximation; "
                f"{type(la).__name__} evaluates its functions from Jacobian rows"
            )
        self.method = method
        self.max_jacobian_entries = _positive_int(max_jacobian_entries, "max_jacobian_entries")
        self.la = la
        self.n_samples = _positive_int(n_samples, "n_samples")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.pred_type = parse_enum(PredType, pred_type, "pred_type")
        if self.pred_type == PredType.GP:
            raise ValueError("pred_type must be 'glm' or 'nn' for a function sampler, got 'gp'")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None, got {type(seed).__name__}")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=la._device).manual_seed(seed)
        if self.pred_type == PredType.NN and la._structure == HessianStructure.GP:
            raise NotImplementedError(
                f"{type(la).__name__} has no weight samples for pred_type='nn'; use 'glm'"
            )
        with torch.no_grad():
            if self.pred_type == PredType.NN:
                self.thetas = la.sample(self.n_samples, generator)
            else:
                self.deltas = la._function_deltas(self.n_samples, generator)

    def __call__(self, X: Inputs) -> Tensor:
        """The sampled functions' outputs at ``X``, before any link.

        Shapes:
            ``-> (n_samples, n, outputs)``
        """
        la = self.la
        if not la.enable_backprop:
            check_finite_inputs(X)
        context = torch.enable_grad() if la.enable_backprop else torch.no_grad()
        parts = []
        with context:
            for chunk in input_chunks(X, self.batch_size, la.dict_key_x):
                with la._explained_input_errors(chunk):
                    parts.append(self._evaluate(chunk))
        return torch.cat(parts, dim=1)

    def _evaluate(self, X: Inputs) -> Tensor:
        la = self.la
        if self.pred_type == PredType.NN:
            return la._outputs_at(X, self.thetas)
        if self._uses_jvp(X):
            return la.subset.linearized_at(X, self.deltas)
        Js, f = la._kernel_rows_and_outputs(X)
        deltas = self.deltas.to(Js.dtype)
        return f.to(Js.dtype).unsqueeze(0) + torch.einsum("bcp,sp->sbc", Js, deltas)

    def _uses_jvp(self, X: Inputs) -> bool:
        """Whether ``glm`` functions at the block ``X`` are evaluated by ``jvp`` (see
        ``method``)."""
        la = self.la
        if self.method != "auto":
            return self.method == "jvp"
        if not hasattr(la.subset, "linearized_at") or la._structure == HessianStructure.GP:
            return False
        n_outputs = la.n_outputs or 1
        entries = batch_size(X, la.dict_key_x) * n_outputs * la.n_params
        return entries > self.max_jacobian_entries or n_outputs > self.n_samples
