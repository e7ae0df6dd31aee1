"""Acquisition functions for classification from posterior predictive probabilities.

The criteria of Gal, Islam & Ghahramani (2017), *Deep Bayesian Active Learning with Image
Data* (ICML), computed from the predictive probabilities of a Laplace approximation:

- **max entropy**: the entropy of the predictive mean ``H[p(y | x)]`` (Shannon, 1948);
- **BALD**: the mutual information between the label and the parameters,
  ``I[y; theta | x] = H[E_theta p(y | x, theta)] - E_theta H[p(y | x, theta)]``
  (Houlsby, Huszar, Ghahramani & Lengyel, 2011, *Bayesian Active Learning for Classification
  and Preference Learning*);
- **variation ratios**: ``1 - max_c p(y = c | x)`` (Freeman, 1965);
- **mean std**: the mean over classes of the standard deviation of ``p(y = c | x, theta)``
  over the posterior (Kampffmeyer et al., 2016; Kendall et al., 2015);

and **EPIG**, the expected predictive information gain of Bickford Smith, Kirsch, Farquhar,
Gal, Foster & Rainforth (2023), *Prediction-oriented Bayesian Active Learning* (AISTATS):
``E_{x*}[I[y; y* | x, x*]]``, the information a label at ``x`` carries about labels at target
inputs ``x*``.

Expectations over the posterior are means over ``S`` samples ``p_s(y | x)``, given as
``prob_samples`` of shape ``(S, n, classes)`` (``la.predictive_samples``). Entropies are in nats
with ``0 log 0 = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from laplace.active._common import check_probability_samples, check_tensor

__all__ = [
    "entropy",
    "max_entropy",
    "variation_ratios",
    "mean_std",
    "bald",
    "uncertainty_decomposition",
    "epig",
]


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy ``-sum_c p_c log p_c`` over the last dimension, with ``0 log 0 = 0``.

    Args:
        probs: Probabilities, normalised over the last dimension.

    Returns:
        The entropies in nats.

    Shapes:
        ``probs (..., classes) -> (...)``
    """
    return -torch.special.xlogy(probs, probs).sum(-1)


def max_entropy(probs: Tensor) -> Tensor:
    """Entropy of the predictive mean of each candidate.

    Args:
        probs: Predictive probabilities ``p(y | x)``, for example ``la(X)``.

    Returns:
        ``H[p(y | x)]`` per candidate, in nats.

    Shapes:
        ``probs (n, classes) -> (n,)``

    Raises:
        TypeError: If ``probs`` is not a floating tensor.
        ValueError: If ``probs`` does not have two dimensions.
    """
    return entropy(check_tensor(probs, "probs", (2,)))


def variation_ratios(probs: Tensor) -> Tensor:
    """Variation ratio ``1 - max_c p(y = c | x)`` of each candidate.

    Args:
        probs: Predictive probabilities ``p(y | x)``.

    Returns:
        The variation ratios, in ``[0, 1 - 1 / classes]``.

    Shapes:
        ``probs (n, classes) -> (n,)``

    Raises:
        TypeError: If ``probs`` is not a floating tensor.
        ValueError: If ``probs`` does not have two dimensions.
    """
    return 1 - check_tensor(probs, "probs", (2,)).amax(-1)


def mean_std(prob_samples: Tensor) -> Tensor:
    """Mean over classes of the standard deviation of the class probability over the posterior.

    ``mean_c sqrt(E_s[p_s(c)^2] - E_s[p_s(c)]^2)``: the population standard deviation of the
    ``S`` samples (divided by ``S``, not ``S - 1``).

    Args:
        prob_samples: Probability samples ``p_s(y | x)``.

    Returns:
        The mean standard deviation of each candidate.

    Shapes:
        ``prob_samples (S, n, classes) -> (n,)``

    Raises:
        TypeError: If ``prob_samples`` is not a floating tensor.
        ValueError: If ``prob_samples`` does not have three dimensions.
    """
    prob_samples = check_probability_samples(prob_samples)
    return prob_samples.std(0, correction=0).mean(-1)


def uncertainty_decomposition(prob_samples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split the predictive entropy into its aleatoric and epistemic parts.

    ``H[E_s p_s] = E_s H[p_s] + I[y; theta]``: total entropy, expected entropy (aleatoric) and
    mutual information (epistemic, BALD). The mutual information is computed directly as
    ``E_s KL(p_s || E_s p_s)``, free of the cancellation between two nearly equal entropies
    (so it is accurate where it is small, and never negative beyond rounding), and the total
    is returned as ``expected + mutual``, so the identity holds exactly in floating point; it
    equals ``H[E_s p_s]`` up to rounding.

    Args:
        prob_samples: Probability samples ``p_s(y | x)``.

    Returns:
        ``(total_entropy, expected_entropy, mutual_information)``, each per candidate.

    Shapes:
        ``prob_samples (S, n, classes) -> (n,), (n,), (n,)``

    Raises:
        TypeError: If ``prob_samples`` is not a floating tensor.
        ValueError: If ``prob_samples`` does not have three dimensions.
    """
    prob_samples = check_probability_samples(prob_samples)
    mean = prob_samples.mean(0, keepdim=True)
    self_terms = torch.special.xlogy(prob_samples, prob_samples)
    divergence = self_terms - torch.special.xlogy(prob_samples, mean)
    mutual = divergence.sum(-1).mean(0)
    expected = -self_terms.sum(-1).mean(0)
    return expected + mutual, expected, mutual


def bald(prob_samples: Tensor) -> Tensor:
    """BALD: mutual information between each candidate's label and the parameters.

    ``H[E_s p_s(y | x)] - E_s H[p_s(y | x)]`` (Houlsby et al., 2011; Gal et al., 2017),
    computed as ``E_s KL(p_s || E_s p_s)`` (:func:`uncertainty_decomposition`).

    Args:
        prob_samples: Probability samples ``p_s(y | x)``.

    Returns:
        The mutual information of each candidate in nats.

    Shapes:
        ``prob_samples (S, n, classes) -> (n,)``

    Raises:
        TypeError: If ``prob_samples`` is not a floating tensor.
        ValueError: If ``prob_samples`` does not have three dimensions.
    """
    return uncertainty_decomposition(prob_samples)[2]


def epig(candidate_samples: Tensor, target_samples: Tensor) -> Tensor:
    """Expected predictive information gain of each candidate about the target inputs.

    ``EPIG(x) = mean_{x*} KL(p(y, y* | x, x*) || p(y | x) p(y* | x*))`` with the joint predictive
    ``p(y, y*) = mean_s p_s(y | x) p_s(y* | x*)`` (Bickford Smith et al., 2023). The samples of
    candidates and targets must be joint: sample ``s`` of both comes from the same posterior
    draw.

    Args:
        candidate_samples: Probability samples at the candidates.
        target_samples: Probability samples at the target inputs ``x*``, from the same draws.

    Returns:
        EPIG of each candidate in nats.

    Shapes:
        ``candidate_samples (S, n, classes), target_samples (S, m, classes) -> (n,)``

    Raises:
        TypeError: If the samples are not floating tensors.
        ValueError: If they do not have three dimensions or differ in the number of samples.
    """
    candidate_samples = check_probability_samples(candidate_samples, "candidate_samples")
    target_samples = check_probability_samples(target_samples, "target_samples")
    if candidate_samples.shape[0] != target_samples.shape[0]:
        raise ValueError(
            "candidate_samples and target_samples must hold the same (joint) posterior samples, "
            f"got {candidate_samples.shape[0]} and {target_samples.shape[0]} samples"
        )
    n_samples = candidate_samples.shape[0]
    joint = torch.einsum("snc,smd->nmcd", candidate_samples, target_samples) / n_samples
    product = torch.einsum("nc,md->nmcd", candidate_samples.mean(0), target_samples.mean(0))
    kl = torch.special.xlogy(joint, joint) - torch.special.xlogy(joint, product)
    return kl.sum((-2, -1)).mean(-1)
