"""Save a fitted Laplace approximation and load it back, the two ways of laplace-torch.

A small ReLU MLP is trained on scikit-learn's bundled handwritten digits (offline), and
several Laplace approximations (all weights: diagonal, K-FAC, full; last layer: K-FAC, full)
are fitted with the prior precision from the marginal likelihood. Each is then saved and
restored

1. **as state dicts**: ``torch.save(model.state_dict(), ...)`` and
   ``torch.save(la.state_dict(), ...)``; the model is rebuilt, its weights loaded, a new
   ``Laplace(...)`` object of the same kind is created on it and ``la.load_state_dict``
   restores the fitted approximation. Use this for long-term storage and sharing: the files
   hold tensors and numbers only and load with ``torch.load(..., weights_only=True)``.
2. **as a whole object**: ``torch.save(la, ...)`` pickles the approximation together with
   ``la.model``, and ``torch.load(..., map_location="cpu", weights_only=False)`` brings both
   back (on the CPU, whatever device they were saved from). Plain ``pickle`` is enough for
   every class here, the last-layer ones included (laplace-torch 0.3 cannot pickle those,
   "Can't pickle local object", and suggests ``pickle_module=dill``). Only unpickle files
   you trust.

For each, the script prints the largest absolute difference between the GLM probit
predictions (and the log marginal likelihoods) of the original and the reloaded objects on
the test digits, which is 0, and the size of the files; the figure shows the file sizes.

Usage::

    python examples/serialization.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import BaseLaplace, Laplace

SEED = 0
N_TEST = 300
N_EPOCHS, N_EPOCHS_FAST = 50, 2
APPROXIMATIONS = (
    ("all", "diag"),
    ("all", "kron"),
    ("all", "full"),
    ("last_layer", "kron"),
    ("last_layer", "full"),
)
FIGURE_NAME = "serialization.png"
DEFAULT_OUT = Path(__file__).resolve().parent / "figures"


def make_model() -> nn.Module:
    """The 64-16-10 ReLU MLP; building it again gives the same architecture to load into."""
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def load_data() -> tuple[TensorDataset, Tensor]:
    """Standardised digits: a training set and ``N_TEST`` held-out test inputs.

    Shapes:
        training inputs ``(1497, 64)``, labels ``(1497,)``; test inputs ``(300, 64)``.
    """
    digits = load_digits()
    X = torch.as_tensor(digits.data, dtype=torch.float32)
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(SEED))
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-6)
    test, train = order[:N_TEST], order[N_TEST:]
    return TensorDataset(X[train], y[train]), X[test]


def train(model: nn.Module, train_set: TensorDataset, n_epochs: int) -> None:
    """Adam with a little weight decay on the cross-entropy; leaves the model in eval mode."""
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(n_epochs):
        for X, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            optimizer.step()
    model.eval()


def fit_laplace(model: nn.Module, subset: str, structure: str, loader: DataLoader) -> BaseLaplace:
    la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    return la


def via_state_dicts(
    model: nn.Module, la: BaseLaplace, subset: str, structure: str, folder: Path
) -> tuple[BaseLaplace, int]:
    """Save model and Laplace state dicts, rebuild both from them; return the size in bytes.

    ``model`` is the network the approximation was built on (a last-layer approximation
    keeps it wrapped in a feature extractor as ``la.model``).
    """
    model_path, la_path = folder / "model_state_dict.bin", folder / "la_state_dict.bin"
    torch.save(model.state_dict(), model_path)
    torch.save(la.state_dict(), la_path)

    model = make_model()
    model.load_state_dict(torch.load(model_path, weights_only=True))
    model.eval()
    restored = Laplace(
        model, "classification", subset_of_weights=subset, hessian_structure=structure
    )
    restored.load_state_dict(torch.load(la_path, weights_only=True))
    return restored, model_path.stat().st_size + la_path.stat().st_size


def via_whole_object(la: BaseLaplace, folder: Path) -> tuple[BaseLaplace, int]:
    """Pickle the Laplace object with its model and load it onto the CPU."""
    path = folder / "la.pt"
    torch.save(la, path)
    restored = torch.load(path, map_location="cpu", weights_only=False)
    return restored, path.stat().st_size


def max_difference(la: BaseLaplace, restored: BaseLaplace, X: Tensor) -> tuple[float, float]:
    """Largest absolute difference of the probit predictive on ``X`` and of the marglik."""
    probs = la(X, link_approx="probit").detach().cpu()
    probs_restored = restored(X.cpu(), link_approx="probit").detach()
    marglik = la.log_marginal_likelihood().detach().cpu()
    marglik_restored = restored.log_marginal_likelihood().detach()
    return (
        (probs - probs_restored).abs().max().item(),
        (marglik - marglik_restored).abs().item(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help=f"train {N_EPOCHS_FAST} epochs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of {FIGURE_NAME}")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    train_set, X_test = load_data()
    model = make_model()
    train(model, train_set, N_EPOCHS_FAST if args.fast else N_EPOCHS)
    fit_loader = DataLoader(train_set, batch_size=500)

    print(f"{'':<18}{'state dicts':^32}{'whole object (torch.save)':^32}")
    print(f"{'Laplace':<18}" + f"{'max|dprobs|':>12}{'|dmarglik|':>11}{'KiB':>9}" * 2)
    sizes = {}
    largest_difference = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for subset, structure in APPROXIMATIONS:
            la = fit_laplace(model, subset, structure, fit_loader)
            name = f"{'LL' if subset == 'last_layer' else 'all'} {structure}"
            restored = {
                "state dicts": via_state_dicts(model, la, subset, structure, Path(tmp)),
                "whole object": via_whole_object(la, Path(tmp)),
            }
            row = f"{name:<18}"
            for method, (la_restored, n_bytes) in restored.items():
                d_probs, d_marglik = max_difference(la, la_restored, X_test)
                row += f"{d_probs:>12.3g}{d_marglik:>11.3g}{n_bytes / 1024:>9.0f}"
                sizes[name, method] = n_bytes
                largest_difference = max(largest_difference, d_probs)
            print(row)

    path = args.out / FIGURE_NAME
    save_plot(sizes, largest_difference, path)
    print(f"\nfigure saved to {path}")


def save_plot(sizes: dict[tuple[str, str], int], difference: float, path: Path) -> None:
    """Bar chart of the saved bytes per approximation and way of saving; the title gives the
    largest difference of reloaded predictions, ``difference``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(name for name, _ in sizes))
    methods = list(dict.fromkeys(method for _, method in sizes))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for i, method in enumerate(methods):
        positions = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(names))]
        kib = [sizes[name, method] / 1024 for name in names]
        ax.bar(positions, kib, width=width, label=method)
    ax.set_xticks(range(len(names)), names)
    ax.set(
        ylabel="saved size (KiB)",
        yscale="log",
        title=f"max |Δ probs| after reloading: {difference:g}",
    )
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
