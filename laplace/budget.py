"""Jacobians within the memory budget: blocks of inputs, or no Jacobians at all.

:class:`BudgetedJacobiansMixin` gives the weight-space classes the parts of ``fit`` and of
the GLM predictive that form Jacobians, planned against the budget of
:mod:`laplace.utils.memory`:

- ``fit`` splits a batch whose ``(batch, outputs, params)`` Jacobian would exceed it into
  consecutive parts (the curvature and the loss are sums over samples);
- the GLM predictive uses the whole batch, blocks of inputs (marginal variances per block;
  the joint covariance from the posterior kernel's block pairs), or, where one input's
  Jacobian does not fit, posterior samples pushed through forward-mode products
  (``torch.func.jvp``, for all-weights and subnetwork approximations). Marginal variances
  alone stay exact there: from the layers' Jacobian factors where the network has them,
  otherwise from Jacobian rows of a few outputs at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from laplace.utils.data import Inputs, batch_size, check_finite_inputs
from laplace.utils.memory import get_memory_budget, glm_sample_count, rows_within_budget

__all__ = ["BudgetedJacobiansMixin"]


class BudgetedJacobiansMixin:
    """The budgeted Jacobian paths of :class:`~laplace.baselaplace.ParametricLaplace`."""

    def _bytes_per_input(self) -> int:
        """Working memory per input: its Jacobian ``(outputs, params)`` in the model's dtype
        and one temporary of the same size (the products with the posterior form one;
        measured in ``benchmarks/bench_memory.py``)."""
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        return 2 * (self.n_outputs or 1) * self.n_params * itemsize

    def _budgeted_parts(self, X: Inputs, y: Tensor) -> Iterator[tuple[Inputs, Tensor]]:
        """The batch, or consecutive parts of it whose Jacobians fit in the memory budget
        (:mod:`laplace.utils.memory`); the curvature and the loss are sums over samples, so
        the parts add up to the batch's (sampled curvatures draw per part then)."""
        n, per_input = batch_size(X, self.dict_key_x), self._bytes_per_input()
        if n * per_input <= get_memory_budget():
            yield X, y
            return
        from laplace.kernel import input_chunks

        size = rows_within_budget(per_input, f"the Jacobian of {type(self).__name__} in fit")
        for start, part in zip(range(0, n, size), input_chunks(X, size, self.dict_key_x)):
            yield part, y[start : start + size]

    def _glm_predictive_diagonal(self, X: Inputs) -> tuple[Tensor, Tensor]:
        """Marginal variances; where one input's Jacobian exceeds the budget, exactly: layer
        by layer where the network has Jacobian factors (all-weights Kron and diagonal
        posteriors), otherwise from Jacobian rows of a few outputs at a time
        (:meth:`_output_chunk_variances`), instead of the Monte Carlo estimate."""
        n = batch_size(X, self.dict_key_x)
        exceeds = self._bytes_per_input() > get_memory_budget()
        if not exceeds or n == 0 or not isinstance(X, Tensor):
            return super()._glm_predictive_diagonal(X)
        if not hasattr(self.subset, "output_rows"):
            return super()._glm_predictive_diagonal(X)
        if not self.enable_backprop:
            check_finite_inputs(X)
        moments = self._factored_moments(X)
        if moments is not None:
            return moments[0], moments[1].diagonal(dim1=-2, dim2=-1)
        return self._output_chunk_variances(X)

    def _output_chunk_variances(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """``(f_mu, diag J P^-1 J^T)`` from per-sample Jacobian rows of as many outputs, for
        as many inputs, as fit in the budget (one row and a temporary of its size each).

        Raises:
            MemoryBudgetError: If not even one output row of one input fits.
        """
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        rows = rows_within_budget(2 * self.n_params * itemsize, "one output's Jacobian row")
        C = self.n_outputs or 1
        per_chunk = min(C, rows)
        inputs = max(1, rows // per_chunk)
        with torch.no_grad():
            f_mu = self._outputs_at(X, self.mean.unsqueeze(0))[0]
        variances = []
        for start in range(0, X.shape[0], inputs):
            block = X[start : start + inputs]
            parts = []
            for first in range(0, C, per_chunk):
                Js = self.subset.output_rows(block, slice(first, first + per_chunk)).detach()
                parts.append(self.posterior.inv_quad(Js).diagonal(dim1=1, dim2=2))
            variances.append(torch.cat(parts, dim=1))
        return f_mu, torch.cat(variances)

    def _jacobian_moments(self, X: Inputs, joint: bool) -> tuple[Tensor, Tensor]:
        """The GLM moments from Jacobians, planned against the memory budget
        (:mod:`laplace.utils.memory`): the whole batch, blocks of inputs, or (where one
        input's Jacobian does not fit) posterior samples through forward-mode products.

        Raises:
            MemoryBudgetError: If one input's Jacobian exceeds the budget and the subset has
                no Jacobian-free path.
        """
        n, C = batch_size(X, self.dict_key_x), self.n_outputs or 1
        per_input = self._bytes_per_input()
        if n * per_input <= get_memory_budget():
            Js, f_mu = self._memo(
                "jacobians",
                X,
                lambda: self.subset.jacobians(self.backend, X, self.enable_backprop),
            )
            if joint:
                return f_mu.reshape(-1), self.functional_covariance(Js)
            return f_mu, self.functional_variance(Js)
        if per_input > get_memory_budget() and hasattr(self.subset, "linearized_at"):
            return self._sampled_moments(X, joint)
        block = rows_within_budget(per_input, f"the Jacobian of {type(self).__name__}")
        from laplace.kernel import PosteriorKernel, input_chunks

        if joint:  # two blocks of rows at a time
            kernel = PosteriorKernel(self, max(1, block // 2), max_cached_entries=1)
            f_mu = self._outputs_at(X, self.mean.unsqueeze(0))[0]
            K = kernel(X).permute(0, 2, 1, 3).reshape(n * C, n * C)
            return f_mu.reshape(-1), K
        means, variances = [], []
        for chunk in input_chunks(X, block, self.dict_key_x):
            Js, f = self.subset.jacobians(self.backend, chunk, self.enable_backprop)
            means.append(f)
            variances.append(self.functional_variance(Js))
            del Js  # one block's Jacobians at a time
        return torch.cat(means), torch.cat(variances)

    def _sampled_moments(self, X: Inputs, joint: bool) -> tuple[Tensor, Tensor]:
        """GLM moments without Jacobians: ``f(x)`` and the covariance of ``J(x) delta_s``
        over :func:`~laplace.utils.memory.glm_sample_count` posterior samples, drawn from a
        fixed seed (the same inputs give the same moments), each pushed through one
        ``torch.func.jvp``. Unbiased: the samples have mean zero by construction."""
        n_samples = glm_sample_count()
        generator = torch.Generator(device=self._device).manual_seed(0)
        with torch.no_grad():
            deltas = self._function_deltas(n_samples, generator)
        context = torch.enable_grad() if self.enable_backprop else torch.no_grad()
        with context:
            f_mu = self._outputs_at(X, self.mean.unsqueeze(0))[0]
            D = self.subset.linearized_at(X, deltas) - f_mu
        if joint:
            rows = D.flatten(1)
            return f_mu.reshape(-1), rows.mT @ rows / n_samples
        return f_mu, torch.einsum("sbc,sbd->bcd", D, D) / n_samples
