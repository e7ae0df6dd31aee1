"""Bayesian Bradley-Terry reward modelling: Laplace on a reward model trained on preferences.

A reward model scores single items; it is trained on pairs ``(x0, x1)`` with the label saying
which of the two is preferred, the two scores of a pair being the logits of a two-class
cross-entropy (the Bradley-Terry likelihood; see Stiennon et al., 2020, for reward modelling
of language models). As in the seed example of laplace-torch, the model takes a pair batch
``(batch, 2, dim)`` during training and returns ``(batch, 2)``, and single items
``(batch, dim)`` -> ``(batch, 1)`` otherwise. ``likelihood="reward_modeling"`` fits the
Laplace approximation as the classifier on pairs and predicts like a regressor on items:
``la(x)`` returns the predictive mean and variance of the reward.

The data are synthetic and built here (no download): items are 3-dimensional standard normal
vectors, the hidden reward is ``r(x) = sin(2 x_1) + x_2 - 0.5 x_3^2``, and each training label
is drawn from the Bradley-Terry model ``P(x1 preferred) = sigmoid(r(x1) - r(x0))``. Test pairs
come from the same distribution (in-distribution) or are shifted by 4 in every coordinate
(out-of-distribution). Last-layer and all-weights K-FAC Laplace approximations with the
prior precision from the marginal likelihood print the predictive variance of the items'
rewards and of the reward difference of a pair, in and out of distribution; the figure shows
the reward and its two-standard-deviation band along a line through the input space.

Usage::

    python examples/reward_modeling.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from laplace import BaseLaplace, Laplace

SEED = 0
DIM = 3
N_TRAIN, N_TRAIN_FAST = 1000, 200
N_EPOCHS, N_EPOCHS_FAST = 60, 5
N_TEST = 300
OOD_SHIFT = 4.0
SUBSETS = ("last_layer", "all")
FIGURE_NAME = "reward_modeling.png"
DEFAULT_OUT = Path(__file__).resolve().parent / "figures"


class SimpleRewardModel(nn.Module):
    """A 3-100-1 ReLU reward model, compatible with the Bradley-Terry likelihood."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, 100), nn.ReLU(), nn.Linear(100, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Score pairs ``(batch, 2, dim) -> (batch, 2)``, items ``(batch, dim) -> (batch, 1)``."""
        if x.ndim == 3:
            batch_size, _, dim = x.shape
            return self.net(x.reshape(-1, dim)).reshape(batch_size, 2)
        return self.net(x)


def true_reward(x: Tensor) -> Tensor:
    """The hidden reward ``sin(2 x_1) + x_2 - 0.5 x_3^2``. Shapes: ``(..., 3) -> (...)``."""
    return torch.sin(2 * x[..., 0]) + x[..., 1] - 0.5 * x[..., 2] ** 2


def make_pairs(
    n_pairs: int, generator: torch.Generator, shift: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Pairs of items and Bradley-Terry labels (1 if the second item is preferred).

    Shapes:
        ``(n_pairs, 2, 3)``, ``(n_pairs,)``.
    """
    x = torch.randn(n_pairs, 2, DIM, generator=generator) + shift
    reward = true_reward(x)
    p_second = torch.sigmoid(reward[:, 1] - reward[:, 0])
    label = torch.bernoulli(p_second, generator=generator).long()
    return x, label


def train(model: nn.Module, loader: DataLoader, n_epochs: int) -> None:
    """Train on the pair cross-entropy with AdamW (weight decay 1e-3), as in the seed."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(n_epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()


def pair_variances(la: BaseLaplace, pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Predictive variance of each item's reward and of each pair's reward difference.

    The difference ``r(x1) - r(x0)`` needs the covariance of the two items of a pair, taken
    from the joint predictive over all items.

    Shapes:
        ``pairs: (n, 2, dim)`` -> ``(n, 2)``, ``(n,)``.
    """
    _, cov = la(pairs.reshape(-1, pairs.shape[-1]), joint=True)
    cov = cov.detach()
    item_var = cov.diagonal().reshape(-1, 2)
    cross = cov.diagonal(offset=1)[::2]
    return item_var, item_var.sum(-1) - 2 * cross


def preference_accuracy(scores: Tensor, pairs: Tensor) -> float:
    """How often the model ranks a pair like the hidden reward. Shapes: ``(n, 2)``."""
    truth = true_reward(pairs)
    return ((scores[:, 1] > scores[:, 0]) == (truth[:, 1] > truth[:, 0])).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer pairs and epochs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of {FIGURE_NAME}")
    args = parser.parse_args()
    n_train = N_TRAIN_FAST if args.fast else N_TRAIN
    n_epochs = N_EPOCHS_FAST if args.fast else N_EPOCHS

    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    train_set = TensorDataset(*make_pairs(n_train, generator))
    test_pairs = {
        "in-distribution": make_pairs(N_TEST, generator)[0],
        f"shifted by {OOD_SHIFT:g}": make_pairs(N_TEST, generator, OOD_SHIFT)[0],
    }
    model = SimpleRewardModel()
    start = time.perf_counter()
    train(model, DataLoader(train_set, batch_size=16, shuffle=True, generator=generator), n_epochs)
    with torch.no_grad():
        accuracies = [preference_accuracy(model(p), p) for p in test_pairs.values()]
    print(
        f"MAP: {n_train} training pairs, {n_epochs} epochs in {time.perf_counter() - start:.1f} s;"
        f" preference accuracy in-distribution {accuracies[0]:.3f}, shifted {accuracies[1]:.3f}"
    )

    print(f"\n{'':<12}{'prior':>8}{'time':>7}" + "".join(f"{name:>34}" for name in test_pairs))
    print(f"{'Laplace':<12}{'':>15}" + f"{'var r(x)':>17}{'var r(x1)-r(x0)':>17}" * 2)
    fit_loader = DataLoader(train_set, batch_size=100)
    laplaces = {}
    for subset in SUBSETS:
        start = time.perf_counter()
        la = Laplace(model, "reward_modeling", subset_of_weights=subset, hessian_structure="kron")
        la.fit(fit_loader)
        la.optimize_prior_precision(method="marglik")
        variances = [pair_variances(la, pairs) for pairs in test_pairs.values()]
        seconds = time.perf_counter() - start
        values = "".join(f"{item.mean():>17.4f}{diff.mean():>17.4f}" for item, diff in variances)
        print(f"{subset:<12}{la.prior_precision.item():>8.3g}{seconds:>6.1f}s{values}")
        laplaces[subset] = la

    path = args.out / FIGURE_NAME
    save_plot(laplaces, path)
    print(f"\nfigure saved to {path}")


def save_plot(laplaces: dict[str, BaseLaplace], path: Path) -> None:
    """Reward mean and two-standard-deviation band along ``x = t * (1, 1, 1) / sqrt(3)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.linspace(-4, 12, 300)
    x = t.unsqueeze(-1) * torch.ones(DIM) / DIM**0.5
    fig, axes = plt.subplots(1, len(laplaces), figsize=(5 * len(laplaces), 3.5), sharey=True)
    for ax, (subset, la) in zip(axes, laplaces.items()):
        f_mu, f_var = la(x)
        f_mu, f_std = f_mu.detach().squeeze(-1), f_var.detach().reshape(-1).sqrt()
        ax.axvspan(-2, 2, color="0.9", label="training data (±2 std)")
        shifted = OOD_SHIFT * DIM**0.5
        ax.axvspan(shifted - 2, shifted + 2, color="mistyrose", label="shifted test pairs")
        # rewards are identified up to a constant: the hidden one is drawn to agree at t = 0
        hidden = true_reward(x) - true_reward(torch.zeros(DIM)) + f_mu[t.abs().argmin()]
        ax.plot(t, hidden, color="black", linestyle="--", label="hidden reward")
        ax.plot(t, f_mu, color="tab:blue", label="MAP reward")
        ax.fill_between(t, f_mu - 2 * f_std, f_mu + 2 * f_std, alpha=0.3, label="±2 std")
        ax.set(title=f"Laplace, {subset.replace('_', ' ')}", xlabel="t, x = t (1, 1, 1) / √3")
        ax.set_ylim(-18, 6)
    axes[0].set_ylabel("reward")
    axes[0].legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
