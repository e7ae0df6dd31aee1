"""Post-hoc Laplace on scikit-learn's handwritten digits, fully offline.

A ReLU MLP (64-128-128-10) is trained without weight decay to a MAP estimate on 1,000 of the
1,797 8x8 digit images bundled with scikit-learn, which leaves it overconfident. Laplace
approximations are then fitted post hoc: last-layer K-FAC (the default of ``Laplace(...)``)
and last-layer full, and all-weights diagonal and K-FAC. Each tunes its prior precision on the
validation NLL of its GLM probit predictive (``--tuning marglik`` uses the marginal likelihood
instead) and predicts 500 held-out digits, clean and with Gaussian pixel noise added (a
dataset shift). The script prints accuracy, negative log-likelihood (NLL) and expected
calibration error (ECE) of the MAP and of every Laplace approximation on both.

Usage::

    python examples/demo_digits.py [--seed 0] [--tuning gridsearch|marglik] [--plot PATH]
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

APPROXIMATIONS = (
    ("last_layer", "kron"),
    ("last_layer", "full"),
    ("all", "diag"),
    ("all", "kron"),
)
N_TEST = 500
N_VAL = 297
N_HIDDEN = 128
N_EPOCHS = 100
N_BINS = 15
NOISE_STD = 1.5
"""Standard deviation of the pixel noise of the shifted test set (in standardised units)."""
GRID = {"grid_size": 21, "log_prior_prec_min": -2.0, "log_prior_prec_max": 4.0}

Split = tuple[Tensor, Tensor]


def load_splits(seed: int) -> dict[str, Split]:
    """Shuffle the digits, split them and standardise with the training statistics.

    Args:
        seed: Seed of the shuffle and of the test-set noise.

    Returns:
        ``{"train", "val", "test", "noisy test"}`` inputs and labels: 1,000 / 297 / 500
        images, the noisy test set being the test set plus ``NOISE_STD`` Gaussian noise.

    Shapes:
        ``X: (n, 64)`` float32, ``y: (n,)`` int64.
    """
    digits = load_digits()
    X = torch.as_tensor(digits.data, dtype=torch.float32)
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(X), generator=generator)
    test, val, train = order[:N_TEST], order[N_TEST : N_TEST + N_VAL], order[N_TEST + N_VAL :]
    mean, std = X[train].mean(0), X[train].std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    standardised = (X - mean) / std
    splits = {
        name: (standardised[idx], y[idx])
        for name, idx in (("train", train), ("val", val), ("test", test))
    }
    X_test, y_test = splits["test"]
    noise = NOISE_STD * torch.randn(X_test.shape, generator=generator)
    splits["noisy test"] = (X_test + noise, y_test)
    return splits


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, N_HIDDEN),
        nn.ReLU(),
        nn.Linear(N_HIDDEN, N_HIDDEN),
        nn.ReLU(),
        nn.Linear(N_HIDDEN, 10),
    )


def train_map(model: nn.Module, train: Split, val: Split, seed: int) -> float:
    """Train ``model`` in place with Adam (no weight decay); return the val accuracy.

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
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
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


def fit_laplace(
    model: nn.Module, data: dict[str, Split], subset: str, structure: str, tuning: str
) -> tuple[BaseLaplace, float]:
    """Fit a Laplace approximation and tune its prior precision.

    Returns:
        The fitted Laplace object and the seconds spent fitting and tuning.
    """
    start = time.perf_counter()
    la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)
    la.fit(DataLoader(TensorDataset(*data["train"]), batch_size=250))
    if tuning == "marglik":
        la.optimize_prior_precision(method="marglik")
    else:
        val_loader = DataLoader(TensorDataset(*data["val"]), batch_size=300)
        la.optimize_prior_precision(method="gridsearch", val_loader=val_loader, **GRID)
    return la, time.perf_counter() - start


TEST_SETS = ("test", "noisy test")
HEADER = (
    f"{'':<12}{'clean test':^30}{f'noisy test (std {NOISE_STD})':^30}\n"
    f"{'model':<12}" + f"{'accuracy':>10}{'NLL':>10}{'ECE':>10}" * 2 + f"{'prior':>10}{'time':>7}"
)


def format_row(name: str, metrics: list[tuple[float, float, float]], prior: str, time: str) -> str:
    values = "".join(f"{acc:>10.4f}{nll:>10.4f}{ece:>10.4f}" for acc, nll, ece in metrics)
    return f"{name:<12}{values}{prior:>10}{time:>7}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of data split and training")
    parser.add_argument(
        "--tuning",
        choices=("gridsearch", "marglik"),
        default="gridsearch",
        help="prior precision: validation NLL grid search or marginal likelihood",
    )
    parser.add_argument("--plot", metavar="PATH", help="save reliability diagrams to PATH")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_splits(args.seed)
    model = make_model()
    start = time.perf_counter()
    val_accuracy = train_map(model, data["train"], data["val"], args.seed)
    print(
        f"MAP: {sum(p.numel() for p in model.parameters())} parameters, trained in "
        f"{time.perf_counter() - start:.1f} s, validation accuracy {val_accuracy:.4f}; "
        f"prior precision tuned by {args.tuning}"
    )

    labels = data["test"][1]
    with torch.no_grad():
        predictions = {"MAP": [torch.softmax(model(data[t][0]), dim=-1) for t in TEST_SETS]}
    print("\n" + HEADER)
    print(format_row("MAP", [scores(p, labels) for p in predictions["MAP"]], "-", "-"))
    for subset, structure in APPROXIMATIONS:
        la, seconds = fit_laplace(model, data, subset, structure, args.tuning)
        name = f"{'LL' if subset == 'last_layer' else 'all'} {structure}"
        predictions[name] = [la(data[t][0], link_approx="probit").detach() for t in TEST_SETS]
        metrics = [scores(p, labels) for p in predictions[name]]
        prior = f"{la.prior_precision.mean().item():.4g}"
        print(format_row(name, metrics, prior, f"{seconds:.1f}s"))

    if args.plot:
        save_reliability_plot({k: v[1] for k, v in predictions.items()}, labels, args.plot)
        print(f"\nreliability diagrams (noisy test set) saved to {args.plot}")


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
