"""Time and peak memory of `la.fit` for every curvature backend, structure and model type.

Cells: model (an MLP, a small CNN, a small transformer encoder) × Hessian structure (diag,
kron, full) × backend (every class in `laplace.curvature.BACKENDS`, plus the ASDL classes when
they import). A cell whose backend does not declare the structure is not run; `full` runs only
for models with at most `FULL_MAX_PARAMS` parameters (its dense `H` has `params²` entries).
Every other cell runs in a fresh process of this script (`--cell`), which measures

- `fit`: `la.fit(train_loader)` with classification, all weights, float32, after a warm-up
  fit on one batch (best of `--repeats`; a fit over `SLOW_FIT_S` seconds is not repeated);
- the floor: one forward and backward pass of the summed cross-entropy over the same loader
  (best of 5 after a warm-up), the cost of one gradient, measured in the same process;
- peak memory: the process's peak resident set size (`resource.getrusage`) before and after
  the fit, and the difference.

Best-of timings and one torch thread (`--threads 1`, the default) keep the figures stable on
a machine shared with other jobs, where a second intra-op thread waits on busy cores.

A backend that cannot take the model reports `unsupported` with the first sentence of its
error (BackPACK needs an `nn.Sequential`; K-FAC needs every parameter in a Linear/Conv2d).
The Markdown table is printed and saved to `benchmarks/results/backends.md` (or
`backends_quick.md`), the raw results to the matching `.json`.

Usage:
    python benchmarks/bench_backends.py [--quick] [--only mlp cnn transformer]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MODELS = ("mlp", "cnn", "transformer")
STRUCTURES = ("diag", "kron", "full")
FULL_MAX_PARAMS = 5000
SLOW_FIT_S = 10.0
QUICK_BACKENDS = ("CurvlinopsGGN", "BackPackGGN", "AsdlGGN", "GGNInterface")
DATA = {  # model -> (train points, batch size); quick runs use a fifth of the points
    "mlp": (1000, 100),
    "cnn": (500, 50),
    "transformer": (256, 32),
}
N_CLASSES, SEQ_LEN, D_MODEL = 10, 8, 32


# ---------------------------------------------------------------------------- worker side
def build_model(name: str) -> Any:
    """The benchmark network (float32, eval mode), seeded.

    Args:
        name: `"mlp"` (20-48-48-10, ReLU), `"cnn"` (1x12x12: Conv(8,3) ReLU MaxPool(2)
            Conv(16,3) ReLU Linear) or `"transformer"` (two encoder layers, d_model 32, two
            heads, feed-forward 64, on token embeddings `(batch, 8, 32)`, mean-pooled, then a
            Linear head).

    Returns:
        The model.
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        layers = [nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(48, N_CLASSES)).eval()
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 3 * 3, N_CLASSES),
        ).eval()

    class TinyTransformer(nn.Module):
        """Encoder over token embeddings, mean-pooled over positions, then a Linear head."""

        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(
                D_MODEL, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(D_MODEL, N_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x).mean(dim=1))

    return TinyTransformer().eval()


def make_loader(name: str, quick: bool) -> Any:
    """A loader of random inputs of the model's input shape and random labels."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    n, batch = DATA[name]
    n = n // 5 if quick else n
    generator = torch.Generator().manual_seed(1)
    shape = {"mlp": (20,), "cnn": (1, 12, 12), "transformer": (SEQ_LEN, D_MODEL)}[name]
    x = torch.randn(n, *shape, generator=generator)
    y = torch.randint(N_CLASSES, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def backend_classes() -> dict[str, type]:
    """The registered backends, and the ASDL ones when `laplace.curvature.asdl` imports."""
    from laplace.curvature import BACKENDS

    found = {b.__name__: b for b in BACKENDS}
    try:
        from laplace.curvature import asdl
    except ImportError:
        return found
    for name in ("AsdlGGN", "AsdlEF", "AsdlHessian"):
        if hasattr(asdl, name):
            found.setdefault(name, getattr(asdl, name))
    return found


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def floor_seconds(model: Any, loader: Any) -> float:
    """Best of 5 timed forward+backward epochs of the summed cross-entropy."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def epoch() -> None:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
            torch.autograd.grad(loss, params)

    epoch()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - start)
    return min(times)


def first_sentence(error: Exception, limit: int = 160) -> str:
    """``"Type: first sentence of the message"``, on one line, at most ``limit`` characters."""
    message = str(error).splitlines()[0].split("; ")[0].split(". ")[0]
    text = f"{type(error).__name__}: {message}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one cell; errors of the backend become `unsupported` results."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace

    torch.set_num_threads(spec["threads"])
    warnings.simplefilter("ignore")
    model = build_model(spec["model"])
    loader = make_loader(spec["model"], spec["quick"])
    result: dict[str, Any] = {**spec, "n_params": sum(p.numel() for p in model.parameters())}
    result["floor_s"] = floor_seconds(model, loader)
    result["rss_before_mib"] = peak_rss_mib()
    laplace_cls = {"diag": DiagLaplace, "kron": KronLaplace, "full": FullLaplace}
    backend = backend_classes()[spec["backend"]]
    one_batch = DataLoader(Subset(loader.dataset, range(loader.batch_size)), loader.batch_size)
    try:
        la = laplace_cls[spec["structure"]](model, "classification", backend=backend)
        la.fit(one_batch)
        times = []
        while len(times) < spec["repeats"] and sum(times) < SLOW_FIT_S:
            start = time.perf_counter()
            la.fit(loader)
            times.append(time.perf_counter() - start)
    except (ValueError, NotImplementedError) as error:
        return {**result, "status": "unsupported", "reason": first_sentence(error)}
    result.update(status="ok", fit_s=min(times), rss_after_mib=peak_rss_mib())
    return result


# ---------------------------------------------------------------------------- driver side
def cell_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (model, structure, backend) cell to run, in table order.

    The backends' declared structures are read in a subprocess so that the driver itself
    stays light; `full` is dropped for models above `FULL_MAX_PARAMS` parameters.
    """
    probe = subprocess.run(
        [sys.executable, __file__, "--list-backends"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=worker_env(args.threads),
        check=True,
    )
    declared: dict[str, list[str]] = json.loads(probe.stdout.strip().splitlines()[-1])
    names = [b for b in declared if not args.quick or b in QUICK_BACKENDS]
    common = {"threads": args.threads, "quick": args.quick, "repeats": args.repeats}
    return [
        {"model": model, "structure": structure, "backend": backend, **common}
        for model in args.only or MODELS
        for structure in STRUCTURES
        for backend in names
        if structure in declared[backend]
    ]


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_in_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one cell in a fresh interpreter and parse its JSON line."""
    command = [sys.executable, __file__, "--cell", json.dumps(spec)]
    env = worker_env(spec["threads"])
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "reason": f"over {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**spec, "status": "error", "reason": tail[0][:200]}
    return json.loads(lines[-1])


def params_of(model: str, results: list[dict[str, Any]]) -> int | None:
    return next((r["n_params"] for r in results if r["model"] == model and "n_params" in r), None)


def table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown table: one row per cell, with the floor of its process beside the fit."""
    lines = [
        "| model | params | structure | backend | fit (s) | floor: fwd+bwd epoch (s) "
        "| fit / floor | peak RSS (MiB) | RSS increase (MiB) | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        params = params_of(r["model"], results)
        head = f"| {r['model']} | {params or '—'} | {r['structure']} | {r['backend']} |"
        if r["status"] != "ok":
            floor = f"{r['floor_s']:.3f}" if "floor_s" in r else "—"
            lines.append(f"{head} — | {floor} | — | — | — | {r['status']}: {r['reason']} |")
            continue
        increase = r["rss_after_mib"] - r["rss_before_mib"]
        lines.append(
            f"{head} {r['fit_s']:.3f} | {r['floor_s']:.3f} | {r['fit_s'] / r['floor_s']:.0f}x "
            f"| {r['rss_after_mib']:.0f} | {increase:.0f} | |"
        )
    return lines


def summary(results: list[dict[str, Any]]) -> list[str]:
    """Pivot of fit times: one row per (model, structure), one column per backend."""
    backends = list(dict.fromkeys(r["backend"] for r in results))
    lines = [
        "| model | structure | floor (s) | " + " | ".join(backends) + " |",
        "|---|---|---:|" + "---:|" * len(backends),
    ]
    rows = dict.fromkeys((r["model"], r["structure"]) for r in results)
    for model, structure in rows:
        cells = {
            r["backend"]: r for r in results if (r["model"], r["structure"]) == (model, structure)
        }
        floors = [r["floor_s"] for r in cells.values() if "floor_s" in r]
        entries = []
        for backend in backends:
            r = cells.get(backend)
            if r is None:
                entries.append("")
            elif r["status"] == "ok":
                entries.append(f"{r['fit_s']:.3f}")
            else:
                entries.append(r["status"])
        floor = f"{min(floors):.3f}" if floors else "—"
        lines.append(f"| {model} | {structure} | {floor} | " + " | ".join(entries) + " |")
    return lines


def skipped_full(results: list[dict[str, Any]], models: list[str]) -> list[str]:
    """Lines naming the models whose `full` cells were not run, with the size of `H`."""
    lines = []
    for model in models:
        n = params_of(model, results)
        if n is not None and n > FULL_MAX_PARAMS:
            gib = n * n * 4 / 2**30
            lines.append(
                f"- `full` not run for the {model}: {n} parameters, a dense float32 `H` "
                f"would take {gib:.1f} GiB per copy (limit: {FULL_MAX_PARAMS} parameters)."
            )
    return lines


def render(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    """The Markdown report."""
    n_note = "a fifth of " if args.quick else ""
    parts = [
        "# Curvature backends: `la.fit` time and memory" + (" (quick)" if args.quick else ""),
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, no GPU used, "
        f"{platform.platform()}; torch threads: {args.threads}",
        f"- data: {n_note}"
        + ", ".join(f"{m} {n} points / batch {b}" for m, (n, b) in DATA.items()),
        "- classification with 10 classes, all weights, float32, random weights and data; fit "
        f"is the best of {args.repeats} (1 if over {SLOW_FIT_S:.0f} s) after a warm-up fit "
        "on one batch; the floor is the best of 5",
        "",
        "## Fit time (s) by backend",
        "",
        "Empty: the backend does not declare the structure; `unsupported`: it cannot take the "
        "model (reasons below).",
        "",
        *summary(results),
        "",
        "## Every cell",
        "",
        *table(results),
        "",
        "Floor: one forward and backward pass of the summed cross-entropy over the same loader, "
        "in the same process. Peak RSS includes the interpreter, torch and the curvature "
        "libraries; the increase is the peak after the fit minus the peak before it.",
    ]
    skipped = skipped_full(results, args.only or list(MODELS))
    if skipped:
        parts += ["", *skipped]
    return "\n".join(parts) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="less data, GGN backends only")
    parser.add_argument("--only", nargs="+", choices=MODELS, help="models to run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    parser.add_argument("--repeats", type=int, default=None, help="default 3, 1 with --quick")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    parser.add_argument("--output-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--list-backends", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 60.0 if args.quick else 120.0
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def main() -> None:
    """Run every cell in its own process; print and save the report."""
    args = parse_args()
    if args.list_backends:
        declared = {n: [s.value for s in b.structures] for n, b in backend_classes().items()}
        print(json.dumps(declared))
        return
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return
    results = []
    for spec in cell_specs(args):
        params = params_of(spec["model"], results)
        if spec["structure"] == "full" and params is not None and params > FULL_MAX_PARAMS:
            continue
        start = time.perf_counter()
        results.append(run_in_subprocess(spec, args.timeout))
        print(
            f"[bench] {spec['model']} {spec['structure']} {spec['backend']}: "
            f"{results[-1]['status']} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    report = render(args, results)
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = args.output_dir / ("backends_quick" if args.quick else "backends")
    stem.with_suffix(".md").write_text(report)
    payload = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print(f"[bench] saved {stem}.md and {stem}.json", file=sys.stderr)


if __name__ == "__main__":
    main()
