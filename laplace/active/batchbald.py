"""BatchBALD: greedy batch acquisition by the joint mutual information of the batch's labels.

Kirsch, van Amersfoort & Gal (2019), *BatchBALD: Efficient and Diverse Batch Acquisition for
Deep Bayesian Active Learning* (NeurIPS). The score of a batch ``A`` is
``I[y_A; theta] = H[y_A] - sum_{i in A} E_theta H[y_i | theta]``; the batch is grown greedily,
adding at each step the candidate that maximises the score of the enlarged batch (the score is
submodular, so the greedy batch is within ``1 - 1/e`` of the best one).

From ``S`` joint posterior samples ``p_s(y_i)`` (the same draw ``s`` for every point) the joint
label distribution is the mixture ``p(y_A) = mean_s prod_{i in A} p_s(y_i)``. Its entropy is

- **exact** while the configurations of the labels (``classes**b`` for ``b`` labels, the
  candidate's included) number at most ``max_configurations``: every configuration is
  enumerated;
- **Monte Carlo** beyond: ``n_configurations`` configurations ``a_m`` of the already selected
  labels are drawn from ``p(y_A)`` (a sample index ``s`` uniformly, then each label from
  ``p_s``), and ``H[y_A, y_x] = E_{a ~ p(y_A)}[-log p(a) + H[y_x | y_A = a]]`` is estimated by
  the mean over them, the candidate's label summed exactly with the posterior weights
  ``p(s | a) ∝ prod_i p_s(a_i)``. The draws use ``generator``, so a seeded generator gives the
  same batch every time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from laplace.active._common import (
    GreedySelection,
    check_count,
    check_mask,
    check_probability_samples,
    check_selectable,
)
from laplace.active.classification import entropy

__all__ = ["batch_bald", "joint_entropy", "joint_mutual_information"]

# Entries of the (candidates, configurations, classes) tensor formed at once.
_CHUNK_ENTRIES = 2**22


def _exact_products(selected: Tensor) -> Tensor:
    """``prod_i p_s(y_i = c_i)`` for every configuration ``c`` of the selected labels.

    Shapes:
        ``selected (S, a, classes) -> (S, classes**a)``
    """
    products = selected.new_ones(selected.shape[0], 1)
    for i in range(selected.shape[1]):
        products = (products[:, :, None] * selected[:, i, None, :]).flatten(1)
    return products


def _sampled_log_products(
    selected: Tensor, n_configurations: int, generator: torch.Generator | None
) -> Tensor:
    """``log prod_i p_s(y_i = a_mi)`` for configurations ``a_m`` drawn from ``p(y_A)``.

    Shapes:
        ``selected (S, a, classes) -> (S, n_configurations)``
    """
    n_samples, n_selected, n_classes = selected.shape
    draws = torch.randint(
        n_samples, (n_configurations,), generator=generator, device=selected.device
    )
    rows = selected[draws].reshape(-1, n_classes)
    labels = torch.multinomial(rows, 1, generator=generator).reshape(n_configurations, -1)
    index = labels.T[None].expand(n_samples, n_selected, n_configurations)
    return selected.log().gather(2, index).sum(1)


def _joint_entropies(
    selected: Tensor,
    candidates: Tensor,
    max_configurations: int,
    n_configurations: int,
    generator: torch.Generator | None,
) -> Tensor:
    """``H[y_A, y_x]`` for every candidate ``x``, exact or Monte Carlo (module docstring).

    Shapes:
        ``selected (S, a, classes), candidates (S, n, classes) -> (n,)``
    """
    n_samples, n_selected, n_classes = selected.shape
    exact = n_selected == 0 or n_classes ** (n_selected + 1) <= max_configurations
    if exact:
        weights = _exact_products(selected) / n_samples
        offset = selected.new_zeros(())
    else:
        log_products = _sampled_log_products(selected, n_configurations, generator)
        log_marginal = torch.logsumexp(log_products, 0) - math.log(n_samples)
        weights = torch.softmax(log_products, 0)
        offset = -log_marginal.mean()
    chunk = max(1, _CHUNK_ENTRIES // (weights.shape[1] * n_classes))
    entropies = []
    for part in candidates.split(chunk, dim=1):
        mixed = torch.einsum("sk,snc->nkc", weights, part)
        if exact:
            entropies.append(-torch.special.xlogy(mixed, mixed).sum((1, 2)))
        else:
            entropies.append(offset + entropy(mixed).mean(1))
    return torch.cat(entropies)


def _check_limits(max_configurations: object, n_configurations: object) -> tuple[int, int]:
    return (
        check_count(max_configurations, "max_configurations"),
        check_count(n_configurations, "n_configurations"),
    )


def joint_entropy(
    prob_samples: Tensor,
    max_configurations: int = 2**14,
    n_configurations: int = 4096,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Entropy ``H[y_1, ..., y_b]`` of the joint labels of ``b`` points.

    Exact while ``classes**b <= max_configurations``, Monte Carlo over ``n_configurations``
    configurations of the first ``b - 1`` labels beyond (module docstring).

    Args:
        prob_samples: Joint probability samples ``p_s(y_i)`` of the points.
        max_configurations: Largest number of label configurations enumerated exactly.
        n_configurations: Number of configurations drawn for the Monte Carlo estimate.
        generator: Random number generator for the Monte Carlo draws.

    Returns:
        The joint entropy in nats, a scalar.

    Shapes:
        ``prob_samples (S, b, classes) -> ()``

    Raises:
        TypeError: If ``prob_samples`` is not a floating tensor.
        ValueError: If it does not have three dimensions or a limit is not a positive integer.
    """
    prob_samples = check_probability_samples(prob_samples)
    limits = _check_limits(max_configurations, n_configurations)
    selected, last = prob_samples[:, :-1], prob_samples[:, -1:]
    return _joint_entropies(selected, last, *limits, generator)[0]


def joint_mutual_information(
    prob_samples: Tensor,
    max_configurations: int = 2**14,
    n_configurations: int = 4096,
    generator: torch.Generator | None = None,
) -> Tensor:
    """BatchBALD score ``I[y_1, ..., y_b; theta]`` of ``b`` points.

    :func:`joint_entropy` minus the sum of the points' expected entropies ``E_s H[p_s(y_i)]``.

    Args:
        prob_samples: Joint probability samples ``p_s(y_i)`` of the points.
        max_configurations: Largest number of label configurations enumerated exactly.
        n_configurations: Number of configurations drawn for the Monte Carlo estimate.
        generator: Random number generator for the Monte Carlo draws.

    Returns:
        The joint mutual information in nats, a scalar.

    Shapes:
        ``prob_samples (S, b, classes) -> ()``

    Raises:
        TypeError: If ``prob_samples`` is not a floating tensor.
        ValueError: If it does not have three dimensions or a limit is not a positive integer.
    """
    joint = joint_entropy(prob_samples, max_configurations, n_configurations, generator)
    return joint - entropy(prob_samples).mean(0).sum()


def batch_bald(
    prob_samples: Tensor,
    k: int,
    *,
    max_configurations: int = 2**14,
    n_configurations: int = 4096,
    forbidden: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress_bar: bool = False,
) -> GreedySelection:
    """Greedy BatchBALD selection of ``k`` candidates (Kirsch et al., 2019).

    At each step the candidate maximising the joint mutual information of the batch with it is
    added (the lowest index among exact ties). With ``k = 1`` this is the BALD argmax.

    Args:
        prob_samples: Joint probability samples ``p_s(y | x)`` of the pool: sample ``s`` of
            every candidate from the same posterior draw.
        k: Batch size.
        max_configurations: Largest number of label configurations enumerated exactly.
        n_configurations: Number of configurations drawn for the Monte Carlo estimate.
        forbidden: Candidates that must not be selected.
        generator: Random number generator for the Monte Carlo draws.
        progress_bar: Show a tqdm progress bar over the ``k`` steps.

    Returns:
        The selected indices and, for each step, the joint mutual information of the batch up
        to that step.

    Shapes:
        ``prob_samples (S, n, classes), forbidden (n,) -> indices (k,), scores (k,)``

    Raises:
        TypeError: If ``prob_samples`` is not a floating tensor or ``forbidden`` not boolean.
        ValueError: If a shape does not fit, ``k`` or a limit is not a positive integer, or
            fewer than ``k`` candidates may be selected.
    """
    prob_samples = check_probability_samples(prob_samples)
    k = check_count(k, "k")
    limits = _check_limits(max_configurations, n_configurations)
    n = prob_samples.shape[1]
    unavailable = check_mask(forbidden, n)
    check_selectable(k, n, unavailable)
    unavailable = torch.zeros(n, dtype=torch.bool) if unavailable is None else unavailable.clone()
    unavailable = unavailable.to(prob_samples.device)
    expected = entropy(prob_samples).mean(0)
    chosen: list[int] = []
    scores = []
    for _ in tqdm(range(k), desc="BatchBALD", disable=not progress_bar):
        joint = _joint_entropies(prob_samples[:, chosen], prob_samples, *limits, generator)
        mutual = joint - expected[chosen].sum() - expected
        mutual = mutual.masked_fill(unavailable, float("-inf"))
        best = int(torch.argmax(mutual))
        chosen.append(best)
        scores.append(mutual[best])
        unavailable[best] = True
    indices = torch.tensor(chosen, dtype=torch.long, device=prob_samples.device)
    return GreedySelection(indices, torch.stack(scores))
