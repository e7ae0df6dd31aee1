"""Active learning from a fitted Laplace approximation.

Acquisition functions that decide which inputs to label next, from the posterior of a
Laplace approximation: its predictive probabilities, probability samples and posterior kernel
``k(x, x') = J(x) P^-1 J(x')^T``. Every criterion is a pure function of tensors (kernel
values, predictive probabilities, probability samples); :func:`score` and :func:`select`
compute those tensors from a fitted approximation ``la`` for a pool of candidates, in chunks.

- MacKay (1992), regression: :func:`total_information_gain`,
  :func:`marginal_information_gain`, :func:`mean_marginal_information_gain` (and their
  ``mackay_*`` forms that take a posterior kernel and inputs).
- Classification (Gal et al., 2017; Houlsby et al., 2011): :func:`max_entropy`, :func:`bald`,
  :func:`variation_ratios`, :func:`mean_std`, :func:`uncertainty_decomposition`; EPIG
  (Bickford Smith et al., 2023): :func:`epig`.
- Batches: BatchBALD (Kirsch et al., 2019) :func:`batch_bald`; the GPA sampler (Tsymbalov
  et al., 2019) :func:`gpa`, :func:`fast_gpa`, :func:`fast_gpa_from_kernel`.

Example:
    >>> la = Laplace(model, "classification", subset_of_weights="last_layer",
    ...              hessian_structure="kron")
    >>> la.fit(train_loader)
    >>> g = torch.Generator().manual_seed(0)
    >>> indices = select(la, pool_X, k=10, criterion="batch_bald", generator=g)
"""

from __future__ import annotations

from laplace.active._common import GreedySelection, Kernel
from laplace.active.batchbald import batch_bald, joint_entropy, joint_mutual_information
from laplace.active.classification import (
    bald,
    entropy,
    epig,
    max_entropy,
    mean_std,
    uncertainty_decomposition,
    variation_ratios,
)
from laplace.active.gpa_sampler import fast_gpa, fast_gpa_from_kernel, gpa
from laplace.active.mackay import (
    mackay_marginal_information_gain,
    mackay_mean_marginal_information_gain,
    mackay_total_information_gain,
    marginal_information_gain,
    mean_marginal_information_gain,
    total_information_gain,
)
from laplace.active.pool import score, select
from laplace.active.scoring import Criterion

__all__ = [
    "Criterion",
    "GreedySelection",
    "Kernel",
    "bald",
    "batch_bald",
    "entropy",
    "epig",
    "fast_gpa",
    "fast_gpa_from_kernel",
    "gpa",
    "joint_entropy",
    "joint_mutual_information",
    "mackay_marginal_information_gain",
    "mackay_mean_marginal_information_gain",
    "mackay_total_information_gain",
    "marginal_information_gain",
    "max_entropy",
    "mean_marginal_information_gain",
    "mean_std",
    "score",
    "select",
    "total_information_gain",
    "uncertainty_decomposition",
    "variation_ratios",
]
