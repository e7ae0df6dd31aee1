"""Big models on one CPU machine: ResNet-18 and MiniLM-with-LoRA, beside laplace-torch 0.3.

Every workload runs in a fresh process (``_big_workload.py``) per library and round; the
rounds interleave the two libraries (ours, reference, ours, ...), so both see the same load
of a shared machine. Each run times its floors in the same process, then ``fit`` once and
the probit GLM predictive twice (the first call includes any lazy factorisation of the
posterior; the second is reported as ``predict``). The table gives the median over the
rounds, each phase beside its floor:

- ``fit``: last layer beside one forward pass over the training data; all weights beside
  one forward+backward epoch (a curvature needs at least one gradient per sample; an exact
  GGN one per output class);
- ``predict``: beside one forward pass over the test inputs;
- memory: the peak resident set size after each phase minus the size before the Laplace
  object was built (network, data and libraries loaded).

Processes run under an address-space cap (``--memory-cap-gib``, default 16 of the
machine's 24 GiB) so that an allocation beyond the machine fails with an error that is
recorded (shown as ``out of memory``) instead of swapping or being killed.

Usage:
    python benchmarks/bench_big.py [--reference-python /work/lt-venv/bin/python]
        [--rounds 3] [--only NAME ...] [--threads 2] [--timeout 1800]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_big_workload.py"

RESNET = {"model": "resnet18", "n_train": 2000, "n_test": 500, "batch_size": 100}
MINILM = {"model": "minilm", "n_train": 256, "n_test": 128, "batch_size": 16, "seq_len": 32}
WORKLOADS: dict[str, dict[str, Any]] = {
    "resnet_ll_kron": {**RESNET, "subset": "last_layer", "structure": "kron"},
    "resnet_all_diag": {
        **RESNET,
        "subset": "all",
        "structure": "diag",
        "checks": ["log_marglik", "variance_vs_jacobians"],
    },
    "resnet_all_kron": {
        **RESNET,
        "subset": "all",
        "structure": "kron",
        "checks": ["log_marglik", "variance_vs_jacobians"],
    },
    "minilm_lora_kron": {
        **MINILM,
        "subset": "all",
        "structure": "kron",
        "checks": ["log_marglik", "variance_vs_jacobians"],
    },
}


def run_one(spec: dict[str, Any], python: str, reference: bool, timeout: float) -> dict:
    """One workload in a fresh process of ``python``; never raises."""
    spec = {**spec, "reference": reference, "repo_root": str(REPO_ROOT)}
    command = [python, *(["-I"] if reference else []), str(WORKER), "--spec", json.dumps(spec)]
    cwd = "/tmp" if reference else str(REPO_ROOT)
    env = None if reference else {"PYTHONPATH": str(REPO_ROOT), **_environ()}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
        )
    except subprocess.TimeoutExpired:
        return {"name": spec["name"], "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"name": spec["name"], "error": f"exit {done.returncode}: {done.stderr[-800:]}"}
    return json.loads(lines[-1])


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def _short_error(text: str | None) -> str:
    """A table cell for an error: out of memory, or the exception's first line."""
    if not text:
        return "-"
    first = text.splitlines()[0]
    if "MemoryError" in first or "can't allocate" in first or "not enough memory" in first:
        return "out of memory"
    if "timed out" in first:
        return first
    return first[:90]


def summarise(runs: list[dict]) -> dict[str, Any]:
    """Medians over the rounds of one workload and library."""
    ok = [r for r in runs if "fit" in r.get("phases", {}) and "seconds" in r["phases"]["fit"]]
    out: dict[str, Any] = {"rounds": len(runs), "ok": len(ok)}
    if not ok:
        errors = [r.get("error") or r.get("phases", {}).get("fit", {}).get("error") for r in runs]
        out["error"] = _short_error(next((e for e in errors if e), None))
        return out

    def median(get) -> float | None:
        values = [v for v in (get(r) for r in ok) if v is not None]
        return statistics.median(values) if values else None

    for phase in ("fit", "predict_first", "predict"):
        out[phase] = median(lambda r, p=phase: r["phases"].get(p, {}).get("seconds"))
        out[f"{phase}_mib"] = median(
            lambda r, p=phase: (
                r["phases"].get(p, {}).get("rss_mib", 0) - r["rss_mib_before_laplace"]
                if "seconds" in r["phases"].get(p, {})
                else None
            )
        )
    predict_errors = [r["phases"].get("predict", {}).get("error") for r in ok]
    out["predict_error"] = _short_error(next((e for e in predict_errors if e), None))
    for floor in ("fwd_train", "fwd_bwd_train", "fwd_test"):
        out[floor] = median(lambda r, f=floor: r["floors"][f])
    out["n_params"], out["n_trainable"] = ok[0]["n_params"], ok[0]["n_trainable"]
    out["checks"] = ok[-1].get("checks", {})
    return out


def _cell(seconds: float | None, floor: float | None, mib: float | None) -> str:
    if seconds is None:
        return "-"
    ratio = f" ({seconds / floor:.1f}x)" if floor else ""
    memory = f", +{mib:,.0f} MiB" if mib is not None else ""
    return f"{seconds:.2f} s{ratio}{memory}"


def table(results: dict[str, dict[str, dict]]) -> str:
    """The Markdown report: one row per workload and library."""
    lines = [
        "| workload | library | params (trainable) | fit (x floor), memory | floor | "
        "predict (x floor), memory | first predict | floor |",
        "|---|---|---|---|---:|---|---:|---:|",
    ]
    for name, by_library in results.items():
        for library, s in by_library.items():
            if "error" in s:
                lines.append(f"| {name} | {library} | | {s['error']} | | | | |")
                continue
            fit_floor = (
                s["fwd_train"] if WORKLOADS[name]["subset"] == "last_layer" else s["fwd_bwd_train"]
            )
            predict = (
                _cell(s["predict"], s["fwd_test"], s["predict_mib"])
                if s["predict"] is not None
                else s["predict_error"]
            )
            first = f"{s['predict_first']:.2f} s" if s["predict_first"] is not None else "-"
            lines.append(
                f"| {name} | {library} | {s['n_params']:,} ({s['n_trainable']:,}) | "
                f"{_cell(s['fit'], fit_floor, s['fit_mib'])} | {fit_floor:.2f} s | {predict} | "
                f"{first} | {s['fwd_test']:.2f} s |"
            )
    lines += ["", "Cross-checks (last round):", ""]
    for name, by_library in results.items():
        checks = {lib: s.get("checks", {}) for lib, s in by_library.items()}
        ours = checks.get("laplace", {})
        ref = checks.get("laplace-torch", {})
        parts = []
        if "log_marglik" in ours and "log_marglik" in ref:
            rel = abs(ours["log_marglik"] - ref["log_marglik"]) / abs(ref["log_marglik"])
            parts.append(f"log marglik rel. diff {rel:.1e}")
        if "probs_head" in ours and "probs_head" in ref:
            diff = max(
                abs(a - b)
                for ra, rb in zip(ours["probs_head"], ref["probs_head"])
                for a, b in zip(ra, rb)
            )
            parts.append(f"probs max abs diff {diff:.1e}")
        if "variance_vs_jacobians" in ours:
            parts.append(
                f"ours: GLM variance vs Jacobians rel. diff {ours['variance_vs_jacobians']:.1e}"
            )
        if "log_marglik" in ours:
            parts.append(f"ours: log marglik {ours['log_marglik']:.6g}")
        lines.append(f"- {name}: " + ("; ".join(parts) if parts else "-"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(WORKLOADS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--memory-cap-gib", type=float, default=16.0)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    names = args.only or list(WORKLOADS)
    libraries = [("laplace", sys.executable, False)]
    if args.reference_python:
        libraries.append(("laplace-torch", args.reference_python, True))
    runs: dict[str, dict[str, list[dict]]] = {
        n: {lib: [] for lib, _, _ in libraries} for n in names
    }
    for round_index in range(args.rounds):
        order = libraries if round_index % 2 == 0 else libraries[::-1]
        for name in names:
            spec = {
                **WORKLOADS[name],
                "name": name,
                "seed": args.seed,
                "threads": args.threads,
                "test_batch_size": WORKLOADS[name]["batch_size"],
                "memory_cap_gib": args.memory_cap_gib,
            }
            for library, python, reference in order:
                result = run_one(spec, python, reference, args.timeout)
                runs[name][library].append(result)
                fit = result.get("phases", {}).get("fit", {})
                print(
                    f"round {round_index + 1} {name} {library}: fit "
                    f"{fit.get('seconds', _short_error(fit.get('error') or result.get('error')))}",
                    flush=True,
                )
    results = {n: {lib: summarise(r) for lib, r in by.items()} for n, by in runs.items()}
    report = table(results)
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "big.md").write_text(report + "\n")
    (args.output_dir / "big.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
