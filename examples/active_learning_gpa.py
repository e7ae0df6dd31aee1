"""Batch active learning for regression with the GPA sampler on the diabetes data, offline.

The GPA sampler (Tsymbalov, Makarychev, Shapeev & Panov, 2019, *Deeper Connections between
Neural Networks and Gaussian Processes Speed-up Active Learning*) treats the linearised network
as a Gaussian process with the Laplace posterior kernel ``k(x, x') = J(x) P^-1 J(x')^T`` and
picks a batch greedily: the candidate of largest variance, then the largest variance given a
noisy observation there, and so on. Fast GPA (Erlenbach, 2021) selects the same points by
rank-one updates; ``select(la, pool, k, "fast_gpa")`` does so from the pool's variances and
one kernel column per selected point, never forming the ``n x n`` kernel.

Data: scikit-learn's bundled diabetes regression (442 patients, 10 features), features and
target standardised over the whole data set (RMSE is in units of the target's standard
deviation); a fixed 30% test split; the other 309 points are the pool, from which each seed
draws its 20 initial labels. Model: a 10-50-50-1 tanh MLP in float64, retrained each round
from the seed's initial weights (Adam, learning rate 0.01, 500 full-batch steps on
``0.5 * sum of squared errors + 0.5 * 10 * |theta|^2``, divided by the number of labels). Each
round an all-weights Kronecker-factored Laplace approximation is fitted on the labelled points,
its prior precision and noise standard deviation are tuned jointly by Adam on the log marginal
likelihood, and a batch of 10 is acquired, for 10 rounds (20 -> 120 labels). Arms: GPA
(``select(..., "gpa")``), fast GPA (``select(..., "fast_gpa")``) and random; in every round of
both GPA arms both selections are made and compared.

The script prints the test RMSE of the MAP network against the number of labels (mean ± std
over seeds), whether GPA and fast GPA selected identical points in every round, the selection
times on the diabetes pool and on a larger synthetic pool (each algorithm also on the same
kernel matrix), and plots the learning curves and the timings.

Usage::

    python examples/active_learning_gpa.py [--fast] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sklearn.datasets import load_diabetes
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import BaseLaplace, Laplace
from laplace.active import fast_gpa, fast_gpa_from_kernel, gpa, select

SPLIT_SEED = 0
TEST_FRACTION = 0.3
N_INITIAL = 20
BATCH = 10
FULL = {"rounds": 10, "steps": 500, "seeds": 3, "synthetic_pool": 3000}
FAST = {"rounds": 3, "steps": 150, "seeds": 2, "synthetic_pool": 600}
LEARNING_RATE = 1e-2
MAP_PRIOR_PRECISION = 10.0
MARGLIK_STEPS = 100
ARMS = {"GPA": "gpa", "fast GPA": "fast_gpa", "random": None}
SELECTIONS = ('select "gpa"', 'select "fast_gpa"')
FIGURE_NAME = "active_learning_gpa.png"
DEFAULT_OUT = Path(__file__).resolve().parent / "figures"


@dataclass(frozen=True)
class Data:
    """Standardised inputs ``X (n, 10)`` and targets ``y (n, 1)``, and the split's indices."""

    X: Tensor
    y: Tensor
    test: Tensor
    pool: Tensor


@dataclass
class Record:
    """What the GPA arms observe: per-round agreement of the two samplers and timings (s)."""

    identical: list[bool] = field(default_factory=list)
    identical_on_matrix: list[bool] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.seconds.setdefault(name, []).append(seconds)


def load_data() -> Data:
    features, target = load_diabetes(return_X_y=True)
    X = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(target, dtype=torch.float64).unsqueeze(-1)
    X, y = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(TEST_FRACTION * len(X))
    return Data(X, y, order[:n_test], order[n_test:])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(10, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1)]
    return nn.Sequential(*layers).double()


def train_map(model: nn.Module, X: Tensor, y: Tensor, steps: int) -> None:
    """Full-batch Adam on the negative log joint with noise 1 and prior precision 10."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    for _ in range(steps):
        optimizer.zero_grad()
        squared_norm = sum(p.square().sum() for p in model.parameters())
        loss = 0.5 * (model(X) - y).square().sum() + 0.5 * MAP_PRIOR_PRECISION * squared_norm
        (loss / len(X)).backward()
        optimizer.step()


def rmse_on_test(model: nn.Module, data: Data) -> float:
    with torch.no_grad():
        error = model(data.X[data.test]) - data.y[data.test]
    return error.square().mean().sqrt().item()


def fit_laplace(model: nn.Module, X: Tensor, y: Tensor) -> BaseLaplace:
    """All-weights K-FAC Laplace; log prior precision and log noise by Adam on the marglik."""
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(X, y), batch_size=len(X)))
    log_prior = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([log_prior, log_sigma], lr=0.1)
    for _ in range(MARGLIK_STEPS):
        optimizer.zero_grad()
        (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        optimizer.step()
    la.prior_precision, la.sigma_noise = log_prior.detach().exp(), log_sigma.detach().exp()
    return la


def timed(function: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def selections(la: BaseLaplace, pool_X: Tensor, record: Record) -> dict[str, Tensor]:
    """``select`` by GPA and by fast GPA, each timed; their agreement goes to ``record``."""
    picked = {}
    for name in SELECTIONS:
        criterion = name.split('"')[1]
        picked[criterion], seconds = timed(lambda c=criterion: select(la, pool_X, BATCH, c))
        record.add(name, seconds)
    record.identical.append(bool(torch.equal(picked["gpa"], picked["fast_gpa"])))
    return picked


def time_on_matrix(K: Tensor, noise: float, k: int, record: Record) -> None:
    """Time the three samplers on the same kernel matrix; their agreement goes to ``record``."""
    runs = {
        "gpa(K)": lambda: gpa(K, k, noise).indices,
        "fast_gpa(K)": lambda: fast_gpa(K, k, noise).indices,
        "fast_gpa_from_kernel": lambda: (
            fast_gpa_from_kernel(K.diagonal(), lambda i: K[:, i], k, noise).indices
        ),
    }
    picked = []
    for name, run in runs.items():
        indices, seconds = timed(run)
        record.add(name, seconds)
        picked.append(indices)
    record.identical_on_matrix.append(all(torch.equal(picked[0], p) for p in picked[1:]))


def acquire(
    arm: str,
    model: nn.Module,
    data: Data,
    labelled: Tensor,
    unlabelled: Tensor,
    generator: torch.Generator,
    record: Record,
) -> tuple[Tensor, BaseLaplace | None]:
    """Indices into ``unlabelled`` to label next, and the Laplace approximation used."""
    if ARMS[arm] is None:
        return torch.randperm(len(unlabelled), generator=generator)[:BATCH], None
    la = fit_laplace(model, data.X[labelled], data.y[labelled])
    pool_X = data.X[unlabelled]
    picked = selections(la, pool_X, record)
    if arm == "GPA":
        K = la.posterior_kernel()(pool_X)[:, :, 0, 0]
        time_on_matrix(K, la.sigma_noise.item() ** 2, BATCH, record)
    return picked[ARMS[arm]], la


def run_arm(
    arm: str, seed: int, data: Data, rounds: int, steps: int, record: Record
) -> tuple[list[float], BaseLaplace | None]:
    """Test RMSE after each round of one arm; the last round's Laplace approximation."""
    pool = data.pool[torch.randperm(len(data.pool), generator=torch.Generator().manual_seed(seed))]
    labelled, unlabelled = pool[:N_INITIAL], pool[N_INITIAL:]
    initial, generator = make_model(seed), torch.Generator().manual_seed(seed + 1)
    rmses, la = [], None
    for round_index in range(rounds + 1):
        model = copy.deepcopy(initial)
        train_map(model, data.X[labelled], data.y[labelled], steps)
        rmses.append(rmse_on_test(model, data))
        if round_index == rounds:
            break
        picked, la = acquire(arm, model, data, labelled, unlabelled, generator, record)
        keep = torch.ones(len(unlabelled), dtype=torch.bool)
        keep[picked] = False
        labelled, unlabelled = torch.cat([labelled, unlabelled[picked]]), unlabelled[keep]
    return rmses, la


def synthetic_pool(data: Data, n: int) -> Tensor:
    """``n`` inputs from the Gaussian with the features' mean and covariance (seed 0)."""
    factor = torch.linalg.cholesky(torch.cov(data.X.T))
    noise = torch.randn(n, data.X.shape[1], generator=torch.Generator().manual_seed(0))
    return data.X.mean(0) + noise.to(data.X.dtype) @ factor.T


def time_large_pool(la: BaseLaplace, pool_X: Tensor) -> tuple[Record, float]:
    """Both ``select`` calls on a large pool, then the kernel matrix and the samplers on it."""
    record = Record()
    selections(la, pool_X, record)
    K, kernel_seconds = timed(lambda: la.posterior_kernel()(pool_X)[:, :, 0, 0])
    time_on_matrix(K, la.sigma_noise.item() ** 2, BATCH, record)
    return record, kernel_seconds


def spread(values: Tensor) -> Tensor:
    """Standard deviation over seeds (dimension 0); zero for a single seed."""
    return values.std(0) if len(values) > 1 else torch.zeros(values.shape[1:])


def print_curves(curves: dict[str, Tensor], labels: list[int]) -> None:
    seeds = len(next(iter(curves.values())))
    print(f"test RMSE of the MAP network (standardised target), mean ± std over {seeds} seeds")
    print(f"{'labels':>6}" + "".join(f"{arm:>17}" for arm in curves))
    for column, n_labels in enumerate(labels):
        row = "".join(
            f"{values[:, column].mean():>10.3f} ± {spread(values)[column]:.3f}"
            for values in curves.values()
        )
        print(f"{n_labels:>6}{row}")


def print_timings(title: str, record: Record) -> None:
    print(title)
    for name, seconds in record.seconds.items():
        print(f"  {name:<22}{1e3 * torch.tensor(seconds).mean():>10.1f} ms")


def print_verdict(curves: dict[str, Tensor], labels: list[int]) -> None:
    """How GPA compares with random, in words that follow from the numbers."""
    active, passive = curves["GPA"][:, 1:], curves["random"][:, 1:]
    wins = int((active.mean(0) < passive.mean(0)).sum())
    print(
        f"GPA has the lower mean test RMSE at {wins} of {len(labels) - 1} label counts after "
        f"the initial {labels[0]}; averaged over them {active.mean():.3f} (GPA) against "
        f"{passive.mean():.3f} (random)."
    )
    difference = passive[:, -1].mean() - active[:, -1].mean()
    largest_std = max(spread(active)[-1], spread(passive)[-1])
    if abs(difference) <= largest_std:
        outcome = "within one standard deviation across seeds: no clear difference"
    else:
        outcome = "GPA is better" if difference > 0 else "random is better"
    print(f"At {labels[-1]} labels random minus GPA is {difference:+.3f}, {outcome}.")


def print_agreement(record: Record, curves: dict[str, Tensor], la: BaseLaplace) -> None:
    """Whether the samplers agreed in every round, and the last GPA round's hyperparameters."""
    print(
        f"identical selections (GPA vs fast GPA, every round of both arms): "
        f"{all(record.identical)} ({sum(record.identical)} of {len(record.identical)} rounds)"
    )
    on_matrix = record.identical_on_matrix
    print(
        f"identical selections of gpa(K), fast_gpa(K), fast_gpa_from_kernel on the GPA arm's "
        f"kernel matrices: {all(on_matrix)} ({sum(on_matrix)} of {len(on_matrix)} rounds)"
    )
    same_curve = torch.equal(curves["GPA"], curves["fast GPA"])
    print(f"the fast GPA arm's test RMSEs equal the GPA arm's: {same_curve}")
    print(
        f"marglik in seed 0's last GPA round: prior precision {la.prior_precision.item():.3g}, "
        f"sigma_noise {la.sigma_noise.item():.3f}"
    )


def print_references(data: Data, steps: int) -> None:
    """Test RMSE with every pool point labelled: the MLP as trained here, least squares."""
    X, y = data.X[data.pool], data.y[data.pool]
    model = make_model(0)
    train_map(model, X, y, steps)
    design = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    weights = torch.linalg.lstsq(design, y).solution
    test = torch.cat([data.X[data.test], torch.ones(len(data.test), 1, dtype=X.dtype)], 1)
    linear = (test @ weights - data.y[data.test]).square().mean().sqrt().item()
    print(
        f"with all {len(X)} pool points labelled: test RMSE {rmse_on_test(model, data):.3f} "
        f"(MLP, seed 0, same training), {linear:.3f} (linear least squares)"
    )


def run_arms(
    data: Data, seeds: list[int], rounds: int, steps: int, record: Record
) -> tuple[dict[str, Tensor], BaseLaplace]:
    """Learning curves ``(seeds, rounds + 1)`` per arm; seed 0's last GPA approximation."""
    curves, last_la = {}, None
    for arm in ARMS:
        runs = [run_arm(arm, seed, data, rounds, steps, record) for seed in seeds]
        curves[arm] = torch.tensor([rmses for rmses, _ in runs])
        last_la = runs[0][1] if arm == "GPA" else last_la
    return curves, last_la


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="2 seeds, 3 rounds, short training")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, ...)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of {FIGURE_NAME}")
    args = parser.parse_args()
    settings = FAST if args.fast else FULL
    rounds, seeds = settings["rounds"], list(range(args.seeds or settings["seeds"]))
    start, cpu_start = time.perf_counter(), time.process_time()
    data = load_data()
    print(
        f"diabetes: {len(data.X)} points, {data.X.shape[1]} features; {len(data.test)} test, "
        f"{len(data.pool)} pool; {N_INITIAL} initial labels, batches of {BATCH}, {rounds} "
        f"rounds, {settings['steps']} Adam steps per round, seeds {seeds}\n"
    )
    record = Record()
    curves, last_la = run_arms(data, seeds, rounds, settings["steps"], record)
    labels = [N_INITIAL + BATCH * r for r in range(rounds + 1)]
    print_curves(curves, labels)
    print_references(data, settings["steps"])
    print()
    print_agreement(record, curves, last_la)
    print_verdict(curves, labels)
    print()
    n_candidates = len(data.pool) - N_INITIAL
    print_timings(
        f"wall time to select {BATCH} of the diabetes pool ({n_candidates} or fewer "
        "candidates), mean per round:",
        record,
    )
    large = synthetic_pool(data, settings["synthetic_pool"])
    large_record, kernel_seconds = time_large_pool(last_la, large)
    print_timings(
        f"wall time to select {BATCH} of a synthetic pool of {len(large)} (seed 0's last GPA "
        "network):",
        large_record,
    )
    print(f"  (the {len(large)} x {len(large)} kernel matrix K itself: {kernel_seconds:.2f} s)")
    agree = large_record.identical + large_record.identical_on_matrix
    print(f"identical selections on the synthetic pool (all five): {all(agree)}")
    path = args.out / FIGURE_NAME
    plot(curves, labels, large_record, len(large), path)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"\ntime {wall:.1f} s wall, {cpu:.1f} s CPU (after imports); figure {path}")


def plot(curves: dict[str, Tensor], labels: list[int], record: Record, n: int, path: Path) -> None:
    """Learning curves (mean ± std) and the selection times on the synthetic pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=(3, 2))
    styles = {"GPA": ("tab:blue", "-"), "fast GPA": ("tab:orange", ":"), "random": ("gray", "-")}
    for arm, values in curves.items():
        mean, std = values.mean(0), spread(values)
        color, line = styles[arm]
        left.plot(labels, mean, color=color, ls=line, marker="o", ms=3, label=arm)
        left.fill_between(labels, mean - std, mean + std, color=color, alpha=0.12)
    left.set(xlabel="labelled points", ylabel="test RMSE (standardised)", title="diabetes")
    left.legend()
    names = list(record.seconds)
    means = [1e3 * torch.tensor(record.seconds[name]).mean().item() for name in names]
    right.barh(
        names, means, color=["tab:blue", "tab:orange", "tab:blue", "tab:orange", "tab:green"]
    )
    right.set(
        xscale="log",
        xlabel="ms (log scale)",
        title=f"selecting {BATCH} of a synthetic pool of {n}",
    )
    right.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
