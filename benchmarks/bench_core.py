"""Benchmark the core Laplace workloads against their physical floors and laplace-torch.

Each workload (a network, a Hessian structure, all weights, classification) runs in a fresh
process of `_workload.py`, once with this interpreter (our `laplace`) and, when
`--reference-python` is given, once with that interpreter (a separate environment where
`laplace` is laplace-torch 0.3). The phases timed are `fit`, `optimize_prior_precision`
with the marginal likelihood (`marglik`) and the GLM probit predictive (`predict`); beside
each stands a floor measured in the same process: a plain forward pass over the data the
phase must touch. The Markdown table is printed and saved with the raw JSON under
`benchmarks/results/`.

With `--predictive` only the GLM predictive of the `kron` and `diag` structures is timed,
on the 784-256-256-10 MLP and a 2 conv + 2 linear CNN on 28x28 images (`fit` runs untimed):
the workloads of the layer-by-layer predictive for `nn.Linear` and `nn.Conv2d` layers.

Usage:
    python benchmarks/bench_core.py [--reference-python /work/lt-venv/bin/python] [--quick]
    python benchmarks/bench_core.py --predictive --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORKER = BENCH_DIR / "_workload.py"
PHASES = ("fit", "marglik", "predict")
FLOOR_OF_PHASE = {"fit": "fwd_train", "marglik": None, "predict": "fwd_test"}

MLP_WIDE, MLP_NARROW, MLP_QUICK = [784, 128, 64, 10], [64, 32, 10], [784, 32, 10]
CNN_WIDE, CNN_NARROW = [8, 16], [4, 8]
MLP_PREDICTIVE = [784, 256, 256, 10]


def workload_specs(quick: bool, repeats: int, threads: int, seed: int) -> list[dict[str, Any]]:
    """The workloads to run, as specs for `_workload.py`.

    Args:
        quick: Shrink data and steps for a smoke run and keep one workload per structure.
        repeats: Timed repeats per phase (the median is reported).
        threads: `torch.set_num_threads` value used by both libraries.
        seed: Seed for weights and data, identical for both libraries.

    Returns:
        One spec per workload.
    """
    mlp_data = {"n_train": 2000, "batch_size": 200, "n_test": 500, "test_batch_size": 100}
    cnn_data = {"n_train": 1000, "batch_size": 100, "n_test": 500, "test_batch_size": 100}
    if quick:
        mlp_data = cnn_data = {
            "n_train": 200,
            "batch_size": 100,
            "n_test": 100,
            "test_batch_size": 50,
        }
    common = {
        "marglik_steps": 10 if quick else 100,
        "repeats": repeats,
        "threads": threads,
        "seed": seed,
        "repo_root": str(REPO_ROOT),
    }
    mlp_wide = MLP_QUICK if quick else MLP_WIDE
    cnn_wide = CNN_NARROW if quick else CNN_WIDE
    mlp = {"model": "mlp", "n_classes": 10, **mlp_data, **common}
    cnn = {"model": "cnn", "image_size": 8, "n_classes": 10, **cnn_data, **common}
    specs = [
        {"name": "mlp_full", **mlp, "layers": MLP_NARROW, "structure": "full"},
        {"name": "mlp_kron", **mlp, "layers": mlp_wide, "structure": "kron"},
        {"name": "mlp_diag", **mlp, "layers": mlp_wide, "structure": "diag"},
        {"name": "cnn_full", **cnn, "channels": CNN_NARROW, "structure": "full"},
        {"name": "cnn_kron", **cnn, "channels": cnn_wide, "structure": "kron"},
        {"name": "cnn_diag", **cnn, "channels": cnn_wide, "structure": "diag"},
    ]
    if quick:
        specs = [s for s in specs if s["name"] in ("mlp_full", "mlp_kron", "cnn_diag")]
    return specs


def predictive_specs(repeats: int, threads: int, seed: int) -> list[dict[str, Any]]:
    """The `--predictive` workloads: the kron and diag GLM predictive alone (500 test
    points in batches of 100, after an untimed fit on 500 points); the test batches are
    formed before the predictive and its floor are timed.

    Args:
        repeats: Timed repeats of the predictive (the median is reported).
        threads: `torch.set_num_threads` value.
        seed: Seed for weights and data.

    Returns:
        One spec per workload.
    """
    common = {
        "n_classes": 10,
        "n_train": 500,
        "batch_size": 100,
        "n_test": 500,
        "test_batch_size": 100,
        "marglik_steps": 0,
        "repeats": repeats,
        "threads": threads,
        "seed": seed,
        "repo_root": str(REPO_ROOT),
        "timed": ["predict"],
        "pre_batched": True,
        "beside_floor": True,
    }
    mlp = {"model": "mlp", "layers": MLP_PREDICTIVE, **common}
    cnn = {"model": "lenet", **common}
    return [
        {"name": f"{kind}_{structure}_predictive", **spec, "structure": structure}
        for kind, spec in (("mlp", mlp), ("cnn", cnn))
        for structure in ("kron", "diag")
    ]


def run_worker(
    python: str, spec: dict[str, Any], reference: bool, timeout: float
) -> dict[str, Any]:
    """Run one workload in a fresh process and parse its JSON line.

    Args:
        python: Interpreter to run `_workload.py` with.
        spec: The workload spec.
        reference: Whether this is the reference library; the process then runs isolated
            (`-I`, outside the checkout) so that `import laplace` cannot find our package.
        timeout: Seconds before the process is killed.

    Returns:
        The worker's result, or a result with only `error` set if the process produced none.
    """
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if reference:
        env.pop("PYTHONPATH", None)
        command = [python, "-I", str(WORKER)]
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        command = [python, str(WORKER)]
    spec = {**spec, "reference": reference}
    command += ["--spec", json.dumps(spec)]
    cwd = Path("/") if reference else REPO_ROOT
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"name": spec["name"], "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = (done.stderr or done.stdout)[-1500:]
    return {"name": spec["name"], "error": f"exit code {done.returncode}, no result:\n{tail}"}


def seconds(result: dict[str, Any] | None, phase: str) -> float | None:
    """The median time of `phase` in a worker result, or None if it was not measured."""
    if result is None:
        return None
    return result.get("phases", {}).get(phase, {}).get("seconds")


def floor_seconds(result: dict[str, Any] | None, phase: str) -> float | None:
    """The floor of `phase` measured in a worker result, or None where there is none (the
    floor timed around each repeat of the phase where the worker took one)."""
    key = FLOOR_OF_PHASE[phase]
    if result is None or key is None:
        return None
    beside = result.get("phases", {}).get(phase, {}).get("floor_seconds")
    return beside or result.get("floors", {}).get(key, {}).get("seconds")


def floor_ratio(result: dict[str, Any], phase: str) -> str:
    """`ours/floor`: the median of the per-repeat ratios where the worker timed the floor
    around each repeat, else the ratio of the medians."""
    beside = result.get("phases", {}).get(phase, {}).get("floor_ratio")
    if beside is not None:
        return f"{beside:.1f}x"
    return ratio(seconds(result, phase), floor_seconds(result, phase))


def fmt(value: float | None, digits: int = 3) -> str:
    """Format a number for the table; missing values become an em dash."""
    return "—" if value is None else f"{value:.{digits}f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    """Format `numerator / denominator` as `12.3x`, or an em dash if either is missing."""
    if numerator is None or not denominator:
        return "—"
    return f"{numerator / denominator:.1f}x"


def agreement(ours: dict[str, Any], ref: dict[str, Any] | None, phase: str) -> str:
    """How closely the two libraries' results agree after `phase`.

    `fit`: relative difference of the log marginal likelihood at prior precision 1;
    `marglik`: largest relative difference of the tuned prior precision; `predict`: largest
    absolute difference of the predicted probabilities of the first test points.
    """
    key = {"fit": "log_marglik_fit", "marglik": "prior_precision", "predict": "probs_head"}
    if ref is None:
        return "—"
    a, b = ours.get("checks", {}).get(key[phase]), ref.get("checks", {}).get(key[phase])
    if a is None or b is None:
        return "—"
    if phase == "fit":
        return f"{abs(a - b) / max(abs(b), 1e-30):.1e} rel"
    if phase == "marglik":
        return f"{max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b)):.1e} rel"
    return f"{max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)):.1e} abs"


def workloads_table(specs: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[str]:
    """Markdown table describing each workload's model and data sizes."""
    lines = [
        "| workload | structure | model | params | train N / batch | test N / batch |",
        "|---|---|---|---:|---|---|",
    ]
    for spec, pair in zip(specs, results):
        if spec["model"] == "mlp":
            model = "MLP " + "-".join(map(str, spec["layers"])) + " (ReLU)"
        elif spec["model"] == "lenet":
            model = "CNN 1x28x28: Conv(16,5) Pool Conv(32,5) Pool Linear(512,128) Linear→10"
        else:
            c1, c2 = spec["channels"]
            side = spec["image_size"]
            model = f"CNN 1x{side}x{side}: Conv({c1},3) ReLU Conv({c2},3) ReLU Linear→10"
        lines.append(
            f"| {spec['name']} | {spec['structure']} | {model} | "
            f"{pair['ours'].get('n_params', '—')} | {spec['n_train']} / {spec['batch_size']} | "
            f"{spec['n_test']} / {spec['test_batch_size']} |"
        )
    return lines


def timings_table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown table of phase timings, floors, ratios and peak memory."""
    lines = [
        "| workload | phase | ours (s) | floor (s) | ours/floor | fwd+bwd epoch (s) "
        "| laplace-torch (s) | laplace-torch/ours | peak RSS ours / ref (MiB) | agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pair in results:
        ours, ref = pair["ours"], pair["ref"]
        timed = [p for p in PHASES if any(p in (r or {}).get("phases", {}) for r in pair.values())]
        timed = timed or list(PHASES)  # a worker that failed early shows dashes
        for phase in timed:
            ours_s, ref_s, floor = seconds(ours, phase), seconds(ref, phase), None
            floor = floor_seconds(ours, phase) or floor_seconds(ref, phase)
            epoch = None
            if phase == "fit":
                source = ours if ours.get("floors") else (ref or {})
                epoch = source.get("floors", {}).get("fwd_bwd_train", {}).get("seconds")
            rss = [
                r.get("phases", {}).get(phase, {}).get("rss_mib") if r else None
                for r in (ours, ref)
            ]
            lines.append(
                f"| {ours['name']} | {phase} | {fmt(ours_s)} | {fmt(floor)} | "
                f"{floor_ratio(ours, phase)} | {fmt(epoch)} | {fmt(ref_s)} | "
                f"{ratio(ref_s, ours_s)} | {fmt(rss[0], 0)} / {fmt(rss[1], 0)} | "
                f"{agreement(ours, ref, phase)} |"
            )
        if len(timed) == len(PHASES):
            lines.append(total_row(ours, ref))
    return lines


def total_row(ours: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """Markdown row with the summed phase times of one workload."""
    totals = []
    for result in (ours, ref):
        times = [seconds(result, phase) for phase in PHASES]
        totals.append(None if None in times else sum(times))
    return (
        f"| {ours['name']} | **total** | {fmt(totals[0])} | | | | {fmt(totals[1])} | "
        f"{ratio(totals[1], totals[0])} | | |"
    )


def check_error(result: dict[str, Any]) -> str | None:
    """The error raised while recording a worker's agreement checks, if any."""
    return result.get("checks", {}).get("error")


def error_lines(results: list[dict[str, Any]]) -> list[str]:
    """Markdown list of the errors reported by workers, first line of each."""
    lines = []
    for pair in results:
        for side in ("ours", "ref"):
            result = pair[side]
            if not result:
                continue
            label = "ours" if side == "ours" else "laplace-torch"
            for kind, error in (("", result.get("error")), ("checks: ", check_error(result))):
                if error:
                    first = error.strip().splitlines()[0]
                    lines.append(f"- {result['name']} ({label}): {kind}`{first}`")
    return lines


def run_metadata(args: argparse.Namespace) -> dict[str, Any]:
    """What the report says about this run: when, where, with which settings."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "threads": args.threads,
        "repeats": args.repeats,
        "quick": args.quick,
        "predictive": args.predictive,
        "ours_python": sys.executable,
        "reference_python": args.reference_python,
    }


def environment_lines(meta: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """Markdown lines describing the machine, the interpreters and the libraries."""
    first = results[0] if results else {"ours": {}, "ref": None}
    lines = [
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- torch threads: {meta['threads']}; repeats of fit and predict: {meta['repeats']} "
        "(median, after a warm-up pass on a throwaway object)",
        f"- ours: `{first['ours'].get('library', 'not imported')}` "
        f"(torch {first['ours'].get('torch', '?')}, {meta['ours_python']})",
    ]
    if first["ref"] is not None:
        lines.append(
            f"- laplace-torch: `{first['ref'].get('library', 'not imported')}` "
            f"(torch {first['ref'].get('torch', '?')}, {meta['reference_python']})"
        )
    return lines


def render(meta: dict[str, Any], specs: list[dict], results: list[dict]) -> str:
    """The whole Markdown report."""
    title = "# Core benchmark" + (" (quick)" if meta["quick"] else "")
    title += " (GLM predictive only)" if meta.get("predictive") else ""
    parts = [title, "", *environment_lines(meta, results), "", "## Workloads", ""]
    parts += workloads_table(specs, results)
    parts += ["", "## Timings", "", *timings_table(results), ""]
    parts += [
        "Floors: `fit` — one forward pass over the training data (the fwd+bwd epoch column is "
        "one forward+backward pass with the summed cross-entropy); `predict` — one forward "
        "pass over the test data; `marglik` touches no data and has no floor. `total` is the "
        "sum of the three phases (a library that factorises lazily pays in a later phase). "
        "laplace-torch/ours > 1 means ours is faster. Peak RSS is the process peak after the "
        "phase. Agreement: relative difference of the log marginal likelihood after `fit` and "
        "of the tuned prior precision after `marglik`, largest absolute difference of the "
        "predicted probabilities on the first test points after `predict`.",
    ]
    errors = error_lines(results)
    if errors:
        parts += ["", "## Errors", "", *errors]
    return "\n".join(parts) + "\n"


def parse_args() -> argparse.Namespace:
    """Command-line arguments of the driver."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="interpreter whose `laplace` is laplace-torch")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument(
        "--predictive", action="store_true", help="time only the kron/diag GLM predictive"
    )
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    parser.add_argument("--repeats", type=int, default=None, help="default 3, 1 with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these workloads")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    parser.add_argument("--output-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument(
        "--from-json", type=Path, help="re-render a saved core*.json instead of running"
    )
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats!r}")
    return args


def rerender(path: Path) -> None:
    """Print a saved run's report again and rewrite the Markdown file beside its JSON."""
    payload = json.loads(path.read_text())
    report = render(payload["meta"], payload["specs"], payload["results"])
    print(report)
    path.with_suffix(".md").write_text(report)


def main() -> None:
    """Run every workload for both libraries, print and save the report."""
    args = parse_args()
    if args.from_json:
        rerender(args.from_json)
        return
    if args.predictive:
        specs = predictive_specs(args.repeats, args.threads, args.seed)
    else:
        specs = workload_specs(args.quick, args.repeats, args.threads, args.seed)
    if args.only:
        unknown = set(args.only) - {s["name"] for s in specs}
        if unknown:
            sys.exit(f"--only: unknown workloads {sorted(unknown)}")
        specs = [s for s in specs if s["name"] in args.only]
    meta = run_metadata(args)
    results = []
    for spec in specs:
        print(f"[bench] {spec['name']}: ours", file=sys.stderr, flush=True)
        pair = {"ours": run_worker(sys.executable, spec, False, args.timeout), "ref": None}
        if args.reference_python:
            print(f"[bench] {spec['name']}: laplace-torch", file=sys.stderr, flush=True)
            pair["ref"] = run_worker(args.reference_python, spec, True, args.timeout)
        results.append(pair)
    report = render(meta, specs, results)
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = args.output_dir / ("core_quick" if args.quick else "core")
    if args.predictive:
        stem = args.output_dir / "core_predictive"
    stem.with_suffix(".md").write_text(report)
    payload = {"meta": meta, "specs": specs, "results": results}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print(f"[bench] saved {stem}.md and {stem}.json", file=sys.stderr)


if __name__ == "__main__":
    main()
