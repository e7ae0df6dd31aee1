"""Low-rank Laplace on a big model: matrix-free Lanczos against subspace iteration.

A float32 MLP 784-256-256-10 (269,322 parameters, ReLU; randomly initialised, or trained
for ``--epochs`` on the data) on 2,000 standard-normal inputs with random labels of 10
classes, batches of 200, takes the matrix-free route of ``LowRankLaplace`` (its dense GGN
would need 580 GB). For ``k = 20`` eigenpairs each eigensolver is fitted once
(``la.fit``, timed, after an untimed warm-up fit) and compared with a reference fit by
Lanczos from another start vector with at most ``--reference-iter`` Krylov vectors (it
converges to its tolerance, residuals below 1e-12 of ``lambda_1``, in 136 passes):

- passes: complete passes over the loader after the loss pass;
- the largest relative eigenvalue error, over all ``k`` and over the ``classes - 1`` top
  ones (a GGN of ``C`` classes has ``C - 1`` outliers above its bulk);
- the largest relative residual ``||G u - l u|| / l_1``, from one block product (untimed);
- the relative difference of the log marginal likelihood (prior precision 1), and the
  largest relative difference of the GLM predictive variances on 50 test inputs.

Usage::

    python benchmarks/bench_lowrank.py [--threads 2] [--epochs 0] [--power-iterations 2 3 5]

The table is printed and saved as ``results/lowrank.md`` (numbers in ``lowrank.json``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import LowRankLaplace
from laplace.curvature.lanczos import curvature_matvec

RESULTS = Path(__file__).parent / "results"
K, CLASSES, N_DATA, BATCH = 20, 10, 2000, 200


class CountingLoader:
    """A data loader that counts its complete passes."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.dataset, self.passes = loader, loader.dataset, 0

    def __iter__(self):
        yield from self.loader
        self.passes += 1

    def __len__(self) -> int:
        return len(self.loader)


def setup(epochs: int) -> tuple[nn.Module, DataLoader, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES)
    )
    X, y = torch.randn(N_DATA, 784), torch.randint(CLASSES, (N_DATA,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for xb, yb in DataLoader(TensorDataset(X, y), batch_size=100, shuffle=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model, DataLoader(TensorDataset(X, y), batch_size=BATCH), torch.randn(50, 784)


def fitted(model: nn.Module, loader: DataLoader, **options) -> tuple[LowRankLaplace, float, int]:
    la = LowRankLaplace(model, "classification", n_eigenvalues=K, **options)
    counting = CountingLoader(loader)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Lanczos short of its tolerance
        la.fit(counting)
    return la, time.perf_counter() - start, counting.passes - 1


def measure(la: LowRankLaplace, reference: LowRankLaplace, product, X_test: Tensor) -> dict:
    values, truth = la._curvature.eigenvalues, reference._curvature.eigenvalues
    U = la._curvature.eigenvectors
    residuals = (product(U) - U * values).norm(dim=0) / values[0]
    errors = (values - truth).abs() / truth
    lml, lml_ref = la.log_marginal_likelihood(), reference.log_marginal_likelihood()
    var = la._glm_predictive_distribution(X_test)[1].diagonal(dim1=-2, dim2=-1)
    var_ref = reference._glm_predictive_distribution(X_test)[1].diagonal(dim1=-2, dim2=-1)
    return {
        "error": errors.max().item(),
        "error_top": errors[: CLASSES - 1].max().item(),
        "residual": residuals.max().item(),
        "lml": ((lml - lml_ref) / lml_ref).abs().item(),
        "variance": ((var - var_ref).abs() / var_ref).max().item(),
    }


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, loader, X_test = setup(args.epochs)
    warm_up = DataLoader(TensorDataset(*loader.dataset[:BATCH]), batch_size=BATCH)
    for eigensolver in ("lanczos", "subspace"):
        fitted(model, warm_up, eigensolver=eigensolver, n_power_iterations=1, lanczos_max_iter=K)
    reference, ref_time, ref_passes = fitted(  # another start vector than the default fit
        model, loader, lanczos_max_iter=args.reference_iter, lanczos_seed=1
    )
    backend = reference.backend
    product = curvature_matvec(backend, loader, N_DATA)
    configs = [("lanczos (default)", {})] + [
        (f"subspace q={q}", {"eigensolver": "subspace", "n_power_iterations": q})
        for q in args.power_iterations
    ]
    rows = [
        {
            "solver": f"reference lanczos {args.reference_iter}",
            "passes": ref_passes,
            "fit_s": ref_time,
            **measure(reference, reference, product, X_test),
        }
    ]
    for name, options in configs:
        la, seconds, passes = fitted(model, loader, **options)
        rows.append(
            {
                "solver": name,
                "passes": passes,
                "fit_s": seconds,
                **measure(la, reference, product, X_test),
            }
        )
        print(rows[-1], flush=True)
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"MLP 784-256-256-10, {N_DATA} points, batch {BATCH}, k={K}, oversampling 10, "
        f"{args.epochs} training epochs, {args.threads} threads",
        "",
        "| solver | passes | fit (s) | max rel. eigenvalue error | top 9 | max residual "
        "/ l_1 | log marglik rel. diff | GLM variance rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['solver']} | {r['passes']} | {r['fit_s']:.2f} | {r['error']:.1e} | "
            f"{r['error_top']:.1e} | {r['residual']:.1e} | {r['lml']:.1e} | "
            f"{r['variance']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--reference-iter", type=int, default=250)
    parser.add_argument("--power-iterations", type=int, nargs="+", default=[2, 3, 5])
    args = parser.parse_args()
    rows = run(args)
    table = report(rows, args)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_trained{args.epochs}" if args.epochs else ""
    (RESULTS / f"lowrank{suffix}.md").write_text(table + "\n")
    (RESULTS / f"lowrank{suffix}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
