"""Run one benchmark workload in a fresh process and print its timings as one JSON line.

The driver (`bench_core.py`) starts this script once per workload and library, with the
workload spec as a JSON string on the command line. Only the public API shared by `laplace`
and `laplace-torch` 0.3 is used, so the same code times either library: which one is
measured depends only on which `laplace` the interpreter imports.

The script never raises: any failure (the library does not import, a phase crashes) is
reported in the JSON line, together with whatever was measured before it.

Usage:
    python benchmarks/_workload.py --spec '{"name": "mlp_diag", ...}'
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PHASES = ("fit", "marglik", "predict")
Batches = DataLoader | list[list[torch.Tensor]]
"""Test batches: a loader, or its batches formed beforehand (`spec["pre_batched"]`)."""


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build the workload's network with the seeded global generator.

    Args:
        spec: The workload spec; `model` is `"mlp"` (with `layers`, the widths from input to
            output), `"cnn"` (with `image_size`, `channels` and `n_classes`) or `"lenet"`
            (1x28x28: Conv(16,5) ReLU MaxPool Conv(32,5) ReLU MaxPool Linear(512,128) ReLU
            Linear(128, n_classes), the network of `check_accuracy.py`).

    Returns:
        The network, in eval mode.

    Raises:
        ValueError: If `spec["model"]` is not one of these.
    """
    if spec["model"] == "mlp":
        widths = spec["layers"]
        modules: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
            modules.append(nn.Linear(n_in, n_out))
            if i < len(widths) - 2:
                modules.append(nn.ReLU())
        return nn.Sequential(*modules).eval()
    if spec["model"] == "cnn":
        c1, c2 = spec["channels"]
        side = spec["image_size"] - 4
        return nn.Sequential(
            nn.Conv2d(1, c1, 3),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * side * side, spec["n_classes"]),
        ).eval()
    if spec["model"] == "lenet":
        return nn.Sequential(
            nn.Conv2d(1, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(512, 128),
            nn.ReLU(),
            nn.Linear(128, spec["n_classes"]),
        ).eval()
    raise ValueError(f"spec['model'] must be 'mlp', 'cnn' or 'lenet', got {spec['model']!r}")


def make_inputs(spec: dict[str, Any], n: int) -> torch.Tensor:
    """Draw `n` standard-normal inputs of the workload's input shape.

    Args:
        spec: The workload spec.
        n: Number of points.

    Returns:
        The inputs. Shapes: `(n, layers[0])` for the MLP, `(n, 1, side, side)` for the CNN.
    """
    if spec["model"] == "mlp":
        return torch.randn(n, spec["layers"][0])
    side = 28 if spec["model"] == "lenet" else spec["image_size"]
    return torch.randn(n, 1, side, side)


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median_time(
    run: Callable[[], object],
    repeats: int,
    warmup: Callable[[], object] | None = None,
    floor: Callable[[], object] | None = None,
) -> dict:
    """Time `run`, after one call of `warmup` if given.

    Args:
        run: The timed call.
        repeats: How many timed calls; the median is reported.
        warmup: A cheap call that exercises the same code paths first.
        floor: If given, timed right before and after every call of `run`, so that each
            ratio to the floor is taken under the same load of a shared machine.

    Returns:
        `{"seconds": median, "all": [every timing]}`, with `floor` also `floor_seconds`
        (the median of the floors around each call) and `floor_ratio` (the median of the
        ratios of each call to the mean of its two floors).
    """
    if warmup is not None:
        warmup()
    timings, floors = [], []
    for _ in range(repeats):
        before = _seconds(floor) if floor is not None else 0.0
        timings.append(_seconds(run))
        if floor is not None:
            floors.append((before + _seconds(floor)) / 2)
    result = {"seconds": statistics.median(timings), "all": timings}
    if floor is not None:
        result["floor_seconds"] = statistics.median(floors)
        result["floor_ratio"] = statistics.median(t / f for t, f in zip(timings, floors))
    return result


def forward_pass(model: nn.Module, batches: Batches) -> None:
    """One plain forward pass of `model` over the inputs of `batches`, without gradients."""
    with torch.no_grad():
        for X, _ in batches:
            model(X)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_floors(
    model: nn.Module, train: DataLoader, test: Batches, repeats: int
) -> dict[str, dict]:
    """Time the physical floors: plain passes of the network over the data.

    Args:
        model: The network.
        train: Training batches.
        test: Test batches.
        repeats: Timed repeats per floor.

    Returns:
        Timings for `fwd_train` (one forward pass over the training data), `fwd_bwd_train`
        (one forward+backward epoch with the summed cross-entropy) and `fwd_test` (one
        forward pass over the test data).
    """

    def forward(loader: Batches) -> None:
        forward_pass(model, loader)

    def forward_backward() -> None:
        for X, y in train:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(X), y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    first = [next(iter(train))]
    return {
        "fwd_train": median_time(lambda: forward(train), repeats, lambda: forward(first)),
        "fwd_bwd_train": median_time(forward_backward, repeats, forward_backward),
        "fwd_test": median_time(lambda: forward(test), repeats, lambda: forward(first)),
    }


def import_laplace(spec: dict[str, Any], result: dict[str, Any]) -> ModuleType:
    """Import whichever `laplace` this interpreter finds and record where it came from.

    Args:
        spec: The workload spec; `reference` and `repo_root` guard against timing the
            checkout when laplace-torch was asked for.
        result: The JSON result, updated in place (`library`, `library_version`).

    Returns:
        The `laplace` module.

    Raises:
        RuntimeError: If a reference run imported the checkout's package.
    """
    import laplace

    library_file = str(Path(laplace.__file__).resolve())
    result["library"] = library_file
    result["library_version"] = getattr(laplace, "__version__", None)
    repo_root = spec.get("repo_root")
    if spec.get("reference") and repo_root and library_file.startswith(repo_root):
        raise RuntimeError(f"reference run imported the checkout's laplace: {library_file}")
    return laplace


def make_laplace(laplace: ModuleType, spec: dict[str, Any], model: nn.Module) -> Any:
    """Build the workload's Laplace approximation through the public factory."""
    return laplace.Laplace(
        model, "classification", subset_of_weights="all", hessian_structure=spec["structure"]
    )


def warm_up(
    laplace: ModuleType,
    spec: dict[str, Any],
    model: nn.Module,
    train: DataLoader,
    test: Batches,
) -> None:
    """Run every phase once, cheaply, on a throwaway Laplace object.

    This pays one-off costs (lazy imports, kernel selection, allocator growth) without
    leaving cached factorisations on the object that is timed afterwards.

    Args:
        laplace: The library module.
        spec: The workload spec.
        model: The network.
        train: Training batches; only the first is used.
        test: Test batches; only the first is used.
    """
    la = make_laplace(laplace, spec, model)
    la.fit(DataLoader(TensorDataset(*next(iter(train))), batch_size=spec["batch_size"]))
    la.optimize_prior_precision(method="marglik", n_steps=2)
    la(next(iter(test))[0], pred_type="glm", link_approx="probit")


def run_phases(
    spec: dict[str, Any], model: nn.Module, train: DataLoader, test: Batches, result: dict
) -> None:
    """Time `fit`, `marglik` and `predict` of the library's Laplace, filling `result`.

    After a warm-up on a throwaway object, the phases run in the order a user runs them
    on one object: `fit` and `predict` are timed `spec["repeats"]` times (median), `marglik`
    once, since its `marglik_steps` optimiser steps already average. With `spec["timed"]`
    only those phases are timed; an untimed `fit` still runs once, an untimed `marglik` is
    skipped. With `spec["beside_floor"]` the predictive's floor is also timed around each
    repeat (see :func:`median_time`). A failing phase records its error and the later
    phases still run, except after a failed `fit`.

    Args:
        spec: The workload spec.
        model: The network.
        train: Training batches.
        test: Test batches.
        result: The JSON result, updated in place (`phases`, `checks`, `library`).
    """
    laplace = import_laplace(spec, result)
    warm_up(laplace, spec, model, train, test)
    la = make_laplace(laplace, spec, model)
    probs: list[torch.Tensor] = []

    def predict() -> None:
        batches = [la(X, pred_type="glm", link_approx="probit").detach() for X, _ in test]
        probs[:] = [torch.cat(batches)]

    calls: dict[str, tuple[Callable[[], object], int]] = {
        "fit": (lambda: la.fit(train), spec["repeats"]),
        "marglik": (
            lambda: la.optimize_prior_precision(method="marglik", n_steps=spec["marglik_steps"]),
            1,
        ),
        "predict": (predict, spec["repeats"]),
    }
    floors = {"predict": (lambda: forward_pass(model, test))} if spec.get("beside_floor") else {}
    timed = spec.get("timed", PHASES)
    for phase in PHASES:
        run, repeats = calls[phase]
        if phase not in timed:
            if phase == "fit":
                run()
            continue
        try:
            result["phases"][phase] = median_time(run, repeats, floor=floors.get(phase))
            result["phases"][phase]["rss_mib"] = peak_rss_mib()
        except Exception as error:
            result["phases"][phase] = {"error": describe(error)}
            if phase == "fit":
                return
    try:
        record_checks(la, probs, result["checks"])
    except Exception as error:
        result["checks"]["error"] = describe(error)


def record_checks(la: Any, probs: list[torch.Tensor], checks: dict[str, Any]) -> None:
    """Record numbers that must agree between the two libraries, after the timed phases.

    Args:
        la: The fitted Laplace object, its prior precision tuned by `marglik`.
        probs: The predicted test probabilities (one tensor), or empty if `predict` failed.
            Shapes: `(n_test, classes)`.
        checks: Updated in place: `prior_precision` (tuned), `probs_head` (first rows of
            the predictive), `log_marglik_fit` (log marginal likelihood at prior precision 1,
            which also resets the stored prior, hence last).
    """
    checks["prior_precision"] = torch.as_tensor(la.prior_precision).detach().flatten().tolist()
    if probs:
        checks["probs_head"] = probs[0][:4].tolist()
        checks["probs_mean_max"] = float(probs[0].max(dim=-1).values.mean())
    checks["log_marglik_fit"] = float(la.log_marginal_likelihood(prior_precision=1.0).detach())


def describe(error: BaseException) -> str:
    """One-line summary of an exception plus the last frames of its traceback."""
    frames = traceback.format_exception(type(error), error, error.__traceback__)
    return f"{type(error).__name__}: {error}\n" + "".join(frames[-3:])


def run_workload(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the workload, measure its floors and its phases.

    Args:
        spec: The workload spec (see `bench_core.py`).

    Returns:
        The JSON-serialisable result; `error` is set when something failed.
    """
    result: dict[str, Any] = {
        "name": spec["name"],
        "python": sys.executable,
        "torch": torch.__version__,
        "threads": spec["threads"],
        "floors": {},
        "phases": {},
        "checks": {},
        "error": None,
    }
    try:
        torch.set_num_threads(spec["threads"])
        torch.manual_seed(spec["seed"])
        model = build_model(spec)
        result["n_params"] = sum(p.numel() for p in model.parameters())
        X_train, X_test = make_inputs(spec, spec["n_train"]), make_inputs(spec, spec["n_test"])
        y_train = torch.randint(0, spec["n_classes"], (spec["n_train"],))
        y_test = torch.randint(0, spec["n_classes"], (spec["n_test"],))
        train = DataLoader(TensorDataset(X_train, y_train), batch_size=spec["batch_size"])
        test = DataLoader(TensorDataset(X_test, y_test), batch_size=spec["test_batch_size"])
        if spec.get("pre_batched"):  # the predictive and its floor without the loader's cost
            test = list(test)
        result["floors"] = measure_floors(model, train, test, max(5, spec["repeats"]))
        result["rss_mib_before_laplace"] = peak_rss_mib()
        run_phases(spec, model, train, test, result)
    except Exception as error:
        result["error"] = describe(error)
    failed = [f"{name}: {p['error']}" for name, p in result["phases"].items() if "error" in p]
    if failed and result["error"] is None:
        result["error"] = "\n".join(failed)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def main() -> None:
    """Parse `--spec`, run the workload and print the result as the last stdout line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="workload spec as a JSON object")
    spec = json.loads(parser.parse_args().spec)
    result = run_workload(spec)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
