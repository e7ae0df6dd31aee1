"""Post-hoc Laplace on scikit-learn's handwritten digits, fully offline.

A small MLP is trained to a MAP estimate on the 1,797 8x8 digit images bundled with
scikit-learn. An all-weights Laplace approximation is then fitted with a diagonal, a
Kronecker-factored and a full Hessian structure; each tunes its prior precision by maximising
the marginal likelihood and predicts the held-out digits with the GLM probit predictive. The
script prints accuracy, negative log-likelihood (NLL) and expected calibration error (ECE) of
the MAP and of every Laplace approximation.

Usage::

    python examples/demo_digits.py [--seed 0] [--plot reliability.png]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import BaseLaplace, Laplace
from laplace.utils.metrics import expected_calibration_error, reliability_diagram

STRUCTURES = ("diag", "kron", "full")
N_TEST = 500
N_VAL = 297
N_HIDDEN = 32
N_EPOCHS = 60
N_BINS = 15

HEADER = f"{'model':<16}{'accuracy':>10}{'NLL':>10}{'ECE':>10}{'prior prec':>14}{'time [s]':>10}"

Split = tuple[Tensor, Tensor]


def load_splits(seed: int) -> dict[str, Split]:
    """Shuffle the digits, split them and standardise with the training statistics.

    Args:
        seed: Seed of the shuffle.

    Returns:
        ``{"train": (X, y), "val": (X, y), "test": (X, y)}`` with 1,000 / 297 / 500 images.

    Shapes:
        ``X: (n, 64)`` float32, ``y: (n,)`` int64.
    """
    digits = load_digits()
    X = torch.as_tensor(digits.data, dtype=torch.float32)
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    test, val, train = order[:N_TEST], order[N_TEST : N_TEST + N_VAL], order[N_TEST + N_VAL :]
    mean, std = X[train].mean(0), X[train].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    standardised = (X - mean) / std
    return {
        name: (standardised[idx], y[idx])
        for name, idx in (("train", train), ("val", val), ("test", test))
    }


def train_map(model: nn.Module, train: Split, val: Split, seed: int) -> float:
    """Train ``model`` in place with Adam and a small weight decay; return the val accuracy.

    Args:
        model: The network to train.
        train: Training inputs and labels.
        val: Validation inputs and labels, used to report generalisation.
        seed: Seed of the mini-batch order.

    Returns:
        Accuracy of the trained model on ``val``.
    """
    loader = DataLoader(
        TensorDataset(*train),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    for _ in range(N_EPOCHS):
        for X, y in loader:
            optimizer.zero_grad()
            criterion(model(X), y).backward()
            optimizer.step()
    with torch.no_grad():
        return (model(val[0]).argmax(-1) == val[1]).float().mean().item()


def scores(probs: Tensor, targets: Tensor) -> tuple[float, float, float]:
    """Accuracy, mean negative log-likelihood and ECE of predicted class probabilities.

    Shapes:
        ``probs: (n, classes)``, ``targets: (n,)``.
    """
    accuracy = (probs.argmax(-1) == targets).float().mean().item()
    picked = probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    nll = -picked.clamp_min(torch.finfo(probs.dtype).tiny).log().mean().item()
    ece = expected_calibration_error(probs, targets, n_bins=N_BINS)
    return accuracy, nll, ece


def fit_laplace(model: nn.Module, train: Split, structure: str) -> tuple[BaseLaplace, float]:
    """Fit an all-weights Laplace approximation and tune its prior precision (marglik).

    Returns:
        The fitted Laplace object and the seconds spent fitting and tuning.
    """
    start = time.perf_counter()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(DataLoader(TensorDataset(*train), batch_size=250))
    la.optimize_prior_precision(method="marglik")
    return la, time.perf_counter() - start


def format_row(name: str, metrics: tuple[float, float, float], prior: str, seconds: str) -> str:
    accuracy, nll, ece = metrics
    return f"{name:<16}{accuracy:>10.4f}{nll:>10.4f}{ece:>10.4f}{prior:>14}{seconds:>10}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of data split and training")
    parser.add_argument("--plot", metavar="PATH", help="save a reliability diagram to PATH")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_splits(args.seed)
    model = nn.Sequential(nn.Linear(64, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, 10))
    start = time.perf_counter()
    val_accuracy = train_map(model, data["train"], data["val"], args.seed)
    print(
        f"MAP: {sum(p.numel() for p in model.parameters())} parameters, trained in "
        f"{time.perf_counter() - start:.1f} s, validation accuracy {val_accuracy:.4f}"
    )

    X_test, y_test = data["test"]
    with torch.no_grad():
        predictions = {"MAP": torch.softmax(model(X_test), dim=-1)}
    print("\n" + HEADER)
    print(format_row("MAP", scores(predictions["MAP"], y_test), "-", "-"))
    for structure in STRUCTURES:
        la, seconds = fit_laplace(model, data["train"], structure)
        name = f"Laplace ({structure})"
        predictions[name] = la(X_test, pred_type="glm", link_approx="probit").detach()
        prior = f"{la.prior_precision.mean().item():.4g}"
        print(format_row(name, scores(predictions[name], y_test), prior, f"{seconds:.1f}"))

    if args.plot:
        save_reliability_plot(predictions, y_test, args.plot)
        print(f"\nreliability diagram saved to {args.plot}")


def save_reliability_plot(predictions: dict[str, Tensor], targets: Tensor, path: str) -> None:
    """Draw one reliability diagram per model side by side and save the figure to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(predictions), figsize=(3.2 * len(predictions), 3.4))
    for ax, (name, probs) in zip(axes, predictions.items()):
        reliability_diagram(probs, targets, n_bins=N_BINS, ax=ax)
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
