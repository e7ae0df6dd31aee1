"""Last-layer Laplace on a 1,000-class, 512-feature head: fit time and predictive memory.

A random float32 network (a small feature MLP in front of ``nn.Linear(512, 1000)``) is fitted
with ``KronLLLaplace`` and ``DiagLLLaplace`` (last layer found automatically, default GGN
backend) on synthetic data, then predicts a batch of 256 with the probit link. Each
structure runs in a fresh process so that its peak resident memory is its own.

Reported per structure:

- ``floor``: one forward pass of the network over the training data (the least any fit
  must do: the features and outputs of every point), measured in the same process,
  interleaved with the fits; both are the best of ``--repeats`` runs.
- ``fit``: ``la.fit(train_loader)``; the first fit (which also finds the last layer with
  one extra forward pass of one batch) is reported separately.
- ``MAC bound``: the least ``fit / floor`` by multiply-accumulate counts: the forward pass
  plus the curvature's own products per point, ``classes^2 + features^2`` for the K-FAC
  factors ``B = sum_n (diag(p_n) - p_n p_n^T)`` and ``A = sum_n phi_n phi_n^T``, and
  ``classes * features`` for the diagonal ``(p - p^2)^T phi^2``. A feature network that is
  cheap next to the 1000-class head makes this bound (and the fit) exceed 1.5x for K-FAC.
- ``predict``: ``la(x, link_approx="probit")`` on 256 points; the first call includes the
  one-off eigendecomposition of the Kronecker factors.
- memory: the peak resident set size (``resource.getrusage``) after fitting and after
  predicting, minus the resident size before fitting (model, data and torch loaded).
  On CUDA, ``torch.cuda.max_memory_allocated`` over the same baseline as well.

The naive GLM predictive would build the ``(256, 1000, 513000)`` Jacobian of the batch,
about 525 GB in float32, before multiplying it with the covariance.

Usage:
    python benchmarks/bench_lastlayer.py [--repeats 3] [--n-train 8192] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO_ROOT = Path(__file__).resolve().parent.parent
N_CLASSES, N_FEATURES, N_INPUTS, BATCH = 1000, 512, 784, 256


def build(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, DataLoader]:
    """The random network and a loader of synthetic standard-normal data."""
    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Linear(N_INPUTS, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, N_FEATURES),
        nn.ReLU(),
        nn.Linear(N_FEATURES, N_CLASSES),
    ).to(device=device, dtype=torch.float32)
    model.eval()
    X = torch.randn(args.n_train, N_INPUTS, device=device)
    y = torch.randint(N_CLASSES, (args.n_train,), device=device)
    return model, DataLoader(TensorDataset(X, y), batch_size=BATCH)


def rss_mb() -> float:
    """Current resident set size in MB (Linux ``/proc``)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (``ru_maxrss`` is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Fit and predict one structure; return timings and memory as a dict."""
    from laplace.lllaplace import DiagLLLaplace, KronLLLaplace

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model, loader = build(args, device)
    x_test = torch.randn(BATCH, N_INPUTS, device=device)

    def forward_pass() -> None:
        with torch.no_grad():
            for X, _ in loader:
                model(X)

    forward_pass()
    cls = {"kron": KronLLLaplace, "diag": DiagLLLaplace}[args.worker]
    la = cls(model, "classification")
    baseline_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline_cuda = torch.cuda.memory_allocated()
    first_fit = timed(lambda: la.fit(loader), device)
    floors, fits = [], []
    for _ in range(args.repeats):
        floors.append(timed(forward_pass, device))
        fits.append(timed(lambda: la.fit(loader), device))
    peak_fit = peak_rss_mb() - baseline_rss
    probs = None

    def predict() -> None:
        nonlocal probs
        probs = la(x_test, link_approx="probit")

    first_predict = timed(predict, device)
    predict_time = min(timed(predict, device) for _ in range(args.repeats))
    result = {
        "structure": args.worker,
        "floor_s": min(floors),
        "fit_s": min(fits),
        "first_fit_s": first_fit,
        "first_predict_s": first_predict,
        "predict_s": predict_time,
        "baseline_rss_mb": baseline_rss,
        "peak_extra_fit_mb": peak_fit,
        "peak_extra_predict_mb": peak_rss_mb() - baseline_rss,
        "probs_sum_ok": bool(torch.allclose(probs.sum(-1), torch.ones(BATCH, device=device))),
        "n_params": la.n_params,
    }
    if device.type == "cuda":
        result["cuda_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - baseline_cuda) / 2**20
    return result


def run_worker(structure: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one structure in a fresh interpreter and parse its JSON line."""
    command = [sys.executable, __file__, "--worker", structure]
    for name in ("repeats", "n_train", "hidden", "threads", "seed", "device"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {structure} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    macs_features = N_INPUTS * args.hidden + args.hidden * N_FEATURES
    macs_head = N_FEATURES * N_CLASSES
    lines = [
        f"Last-layer Laplace, {N_CLASSES} classes x {N_FEATURES} features "
        f"({N_CLASSES * (N_FEATURES + 1):,} last-layer parameters), float32, {args.device}, "
        f"{args.threads} threads",
        f"feature net {N_INPUTS}-{args.hidden}-{N_FEATURES} ({macs_features / 1e6:.2f} M MAC "
        f"per point), head {macs_head / 1e6:.2f} M MAC per point; fit on {args.n_train} points "
        f"in batches of {BATCH}; probit predictive on {BATCH} points",
        "dense GLM Jacobian of the predict batch (not built): "
        f"{BATCH * N_CLASSES * N_CLASSES * (N_FEATURES + 1) * 4 / 1e9:,.0f} GB",
        "",
        "| structure | floor: forward (s) | fit (s) | fit / floor | MAC bound "
        "| first fit (s) | predict (s) | first predict (s) | peak extra RSS fit (MB) "
        "| peak extra RSS fit+predict (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    curvature_macs = {
        "kron": N_CLASSES**2 + N_FEATURES**2,
        "diag": N_CLASSES * N_FEATURES,
    }
    for r in results:
        bound = 1 + curvature_macs[r["structure"]] / (macs_features + macs_head)
        lines.append(
            f"| {r['structure']} | {r['floor_s']:.3f} | {r['fit_s']:.3f} "
            f"| {r['fit_s'] / r['floor_s']:.2f} | {bound:.2f} | {r['first_fit_s']:.3f} "
            f"| {r['predict_s']:.4f} | {r['first_predict_s']:.3f} "
            f"| {r['peak_extra_fit_mb']:.0f} | {r['peak_extra_predict_mb']:.0f} |"
        )
        if "cuda_peak_extra_mb" in r:
            lines.append(f"|   cuda peak extra allocated: {r['cuda_peak_extra_mb']:.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=["kron", "diag"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(REPO_ROOT))
        print(json.dumps(worker(args)))
        return
    results = [run_worker(structure, args) for structure in ("kron", "diag")]
    print(report(results, args))
    for r in results:
        if not r["probs_sum_ok"]:
            raise SystemExit(f"{r['structure']}: predicted probabilities do not sum to one")


if __name__ == "__main__":
    main()
