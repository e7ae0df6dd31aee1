"""Run one script of public-API calls on `laplace` and on a reference library; compare numbers.

The same battery of calls (fit, marginal likelihood and its gradients, prior tuning,
posterior quantities, every GLM link approximation, regression variances, joint covariances)
runs on both sides for every cell of the factory grid this library shares with the
reference: all weights × {full, kron, diag}, last layer × {full, kron, diag}, subnetwork ×
{full, diag}, for classification and regression, on a tiny float64 MLP with the default
backend, the empirical Fisher and BackPACK's GGN (and the last-layer Hessian), and the seed
document's Bradley-Terry reward model (all weights), and `marglik_training` (the negative
log marginal likelihood curve, the epoch losses, the learned hyperparameters and weights) on a
classification and a sinusoid regression task for full, kron and diag with BackPACK, curvlinops
and ASDL. The reference
(for example `laplace-torch` 0.3, which also imports as `laplace`) runs in a subprocess of its
own interpreter; each side prints its results as JSON and this script reports, per cell and
quantity, the largest relative difference.

Usage:
    python benchmarks/check_agreement.py --reference-python /path/to/venv/bin/python
        [--tolerance 1e-6] [--only SUBSTRING]

``--only marglik_training`` (say) runs only the cells whose key contains the substring.

The largest difference is over the quantities not explained by ``KNOWN``: differences traced
to bugs of the reference, each checked by hand against ground truth (brute-force per-sample
gradients, finite differences). Exits non-zero if another quantity differs by more than the
tolerance or our side raises.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

KNOWN = [
    (
        lambda key, name: key.startswith("regression/ef/"),
        "laplace-torch 0.3's empirical Fisher for regression is twice the EF of its loss "
        "0.5 * sum (f - y)^2; ours equals it (checked against per-sample gradients)",
    ),
    (
        lambda key, name: key.endswith("/kron") and name == "lml_grad_sigma",
        "laplace-torch 0.3's Kron gradient of the marginal likelihood w.r.t. sigma_noise "
        "disagrees with finite differences of its own value; ours matches them",
    ),
    (
        lambda key, name: (
            key.startswith("marglik_training/regression/")
            and "/kron/" in key
            and not key.endswith("/fixed_sigma")
        ),
        "laplace-torch 0.3's wrong Kron gradient w.r.t. sigma_noise (see above) changes the "
        "noise steps of marglik_training, and the run drifts apart; with the noise fixed the "
        "same run agrees",
    ),
    (
        lambda key, name: (
            key == "prior_before_fit/last_layer/full"
            and name in ("posterior_precision", "log_prob")
        ),
        "laplace-torch 0.3's FullLLLaplace posterior_precision before fit is a matrix of ones "
        "(so its log_prob is -inf); ours is diag(prior_precision), the prior's precision",
    ),
    (
        lambda key, name: key == "prior_before_fit/last_layer/kron" and name == "log_prob",
        "laplace-torch 0.3's KronLLLaplace log_prob before fit is not the prior's log density "
        "(-23.41 where the closed form of N(0.2, 1/0.7) over the 21 weights gives -26.97, ours)",
    ),
    (
        lambda key, name: key.startswith("functional/") and name == "lml",
        "FunctionalLaplace's marginal likelihood is the weight-space Laplace evidence with the "
        "loss over all the data (equal to FullLaplace's for n_subset = N); laplace-torch's "
        "sums the loss over the subset and uses a function-space scatter",
    ),
    (
        lambda key, name: key.startswith("functional/") and "n_subset=12" in key,
        "the subset stands for all the data: ours reweights its curvature by N / M, "
        "laplace-torch scales the kernel's prior variance by M / N",
    ),
    (
        lambda key, name: key.startswith("functional/") and key.endswith("independent=False"),
        "laplace-torch 0.3's coupled-output FunctionalLaplace is not the GGN posterior: "
        "diagonal output Hessians for classification, and for two-output regression a "
        "variance 3.4e-2 off the brute-force weight-space GGN predictive, which ours equals "
        "(tests/test_functional_sod.py)",
    ),
    (
        lambda key, name: key.endswith("ef/last_layer/diag"),
        "laplace-torch 0.3's CurvlinopsEF returns a zero last-layer diagonal",
    ),
]
"""Differences traced to the reference, each checked against ground truth by hand."""

CELLS = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
    ("subnetwork", "full"),
    ("subnetwork", "diag"),
]


def _battery(only: str = "") -> dict[str, Any]:
    """The calls, run inside whichever `laplace` this interpreter imports (only the cells
    whose key contains ``only``)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import laplace
    from laplace import Laplace

    torch.set_default_dtype(torch.float64)
    results: dict[str, Any] = {"library": laplace.__file__}

    def model_for(n_out: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, n_out)
        )

    def data(likelihood: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        X = torch.randn(40, 3, generator=g)
        if likelihood == "classification":
            y = torch.randint(0, 3, (40,), generator=g)
        else:
            y = torch.randn(40, 2, generator=g)
        return X, y, torch.randn(7, 3, generator=g)

    def tolist(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().double().flatten().tolist()
        return float(value)

    backends = {
        "default": None,
        "ef": laplace.curvature.CurvlinopsEF,
        "backpack": laplace.curvature.BackPackGGN,
        "hessian": laplace.curvature.CurvlinopsHessian,
    }
    for likelihood in ("classification", "regression"):
        n_out = 3 if likelihood == "classification" else 2
        X, y, X_test = data(likelihood)
        loader = DataLoader(TensorDataset(X, y), batch_size=16)
        for backend_name, backend in backends.items():
            for subset, structure in CELLS:
                if backend_name == "hessian" and (subset, structure) != ("last_layer", "full"):
                    # laplace-torch 0.3 has no Hessian diag or subnetwork, and the all-weights
                    # Hessian of this untrained network is indefinite (both libraries refuse)
                    continue
                key = f"{likelihood}/{backend_name}/{subset}/{structure}"
                if only not in key:
                    continue
                out: dict[str, Any] = {}
                try:
                    model = model_for(n_out)
                    kwargs: dict[str, Any] = {}
                    if backend is not None:
                        kwargs["backend"] = backend
                    if subset == "subnetwork":
                        kwargs["subnetwork_indices"] = torch.tensor([0, 5, 9, 30, 41, 60, 77, 90])
                    if likelihood == "regression":
                        kwargs["sigma_noise"] = 0.8
                    la = Laplace(
                        model,
                        likelihood,
                        subset_of_weights=subset,
                        hessian_structure=structure,
                        prior_precision=0.7,
                        **kwargs,
                    )
                    first, second = (
                        DataLoader(TensorDataset(X[part], y[part]), batch_size=16)
                        for part in (slice(0, 24), slice(24, None))
                    )
                    if subset != "last_layer":  # laplace-torch 0.3 refuses override=False there
                        la.fit(first)
                        la.fit(second, override=False)
                        out["lml_online"] = tolist(la.log_marginal_likelihood())
                    la.fit(loader)
                    out["log_likelihood"] = tolist(la.log_likelihood)
                    out["log_det_prior_precision"] = tolist(la.log_det_prior_precision)
                    out["log_det_posterior_precision"] = tolist(la.log_det_posterior_precision)
                    if structure != "kron":
                        out["posterior_precision"] = tolist(la.posterior_precision)
                    g = torch.Generator().manual_seed(5)
                    n_params = la.n_params_subnet if subset == "subnetwork" else la.n_params
                    value = torch.randn(n_params, generator=g)
                    if subset != "subnetwork":
                        out["square_norm"] = tolist(la.square_norm(la.mean + 0.1 * value))
                        out["log_prob"] = tolist(la.log_prob(la.mean + 0.1 * value))
                    Js = torch.randn(4, n_out, n_params, generator=g)
                    out["functional_variance"] = tolist(la.functional_variance(Js))
                    out["functional_covariance"] = tolist(la.functional_covariance(Js))
                    out["scatter"] = tolist(la.scatter)
                    out["log_det_ratio"] = tolist(la.log_det_ratio)
                    out["lml"] = tolist(la.log_marginal_likelihood())
                    prior = torch.tensor(1.3, requires_grad=True)
                    sigma = torch.tensor(0.9, requires_grad=True)
                    if likelihood == "regression":
                        lml = la.log_marginal_likelihood(prior, sigma)
                        lml.backward()
                        out["lml_grad_sigma"] = tolist(sigma.grad)
                    else:
                        lml = la.log_marginal_likelihood(prior)
                        lml.backward()
                    out["lml_at"] = tolist(lml)
                    out["lml_grad_prior"] = tolist(prior.grad)
                    la.prior_precision = 0.7
                    if likelihood == "regression":
                        la.sigma_noise = 0.8
                    if structure == "full":
                        out["posterior_covariance"] = tolist(la.posterior_covariance)
                    elif structure == "diag":
                        out["posterior_variance"] = tolist(la.posterior_variance)
                    out["mean"] = tolist(la.mean)
                    if likelihood == "classification":
                        for link in ("probit", "bridge", "bridge_norm"):
                            out[f"predict_{link}"] = tolist(la(X_test, link_approx=link))
                    else:
                        f_mu, f_var = la(X_test)
                        out["f_mu"], out["f_var"] = tolist(f_mu), tolist(f_var)
                        f_mu, f_cov = la(X_test[:3], joint=True)
                        out["f_cov_joint"] = tolist(f_cov)
                    val = DataLoader(TensorDataset(X[:20], y[:20]), batch_size=10)
                    la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=9)
                    out["gridsearch_prior"] = tolist(la.prior_precision)
                    la.optimize_prior_precision(method="marglik", n_steps=20, lr=0.1)
                    out["tuned_prior"] = tolist(la.prior_precision)
                    if subset == "all" and structure != "full":
                        la.optimize_prior_precision(
                            method="marglik", n_steps=20, lr=0.1, prior_structure="layerwise"
                        )
                        out["tuned_prior_layerwise"] = tolist(la.prior_precision)
                except Exception as error:  # reported, not raised
                    out["error"] = f"{type(error).__name__}: {error}"
                results[key] = out
    results.update(_reward_battery(tolist, only))
    results.update(_marglik_battery(tolist, only))
    results.update(_prior_battery(model_for, tolist, only))
    results.update(_functional_battery(model_for, tolist, only))
    return results


def _functional_battery(model_for: Any, tolist: Any, only: str = "") -> dict[str, Any]:
    """``FunctionalLaplace`` (subset of data) on all the data and on a subset, regression and
    classification (with independent outputs, where both libraries use diagonal output
    Hessians, and without)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from laplace import FunctionalLaplace

    g = torch.Generator().manual_seed(6)
    X = torch.randn(30, 3, generator=g)
    X_test = torch.randn(5, 3, generator=g)
    data = {
        "regression": (torch.randn(30, 2, generator=g), 2),
        "classification": (torch.randint(0, 3, (30,), generator=g), 3),
    }
    results = {}
    for likelihood, (y, n_out) in data.items():
        for n_subset in (30, 12):
            for independent in (False, True):
                key = f"functional/{likelihood}/n_subset={n_subset}/independent={independent}"
                if only not in key:
                    continue
                out: dict[str, Any] = {}
                try:
                    kwargs = {"sigma_noise": 0.6} if likelihood == "regression" else {}
                    la = FunctionalLaplace(
                        model_for(n_out),
                        likelihood,
                        n_subset=n_subset,
                        prior_precision=0.8,
                        independent_outputs=independent,
                        **kwargs,
                    )
                    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
                    f_mu, f_var = la._glm_predictive_distribution(X_test)
                    out["f_mu"], out["f_var"] = tolist(f_mu), tolist(f_var)
                    out["lml"] = tolist(la.log_marginal_likelihood())
                    if likelihood == "classification":
                        out["predict_probit"] = tolist(la(X_test, link_approx="probit"))
                except Exception as error:  # reported, not raised
                    out["error"] = f"{type(error).__name__}: {error}"
                results[key] = out
    return results


def _prior_battery(model_for: Any, tolist: Any, only: str = "") -> dict[str, Any]:
    """The approximation before ``fit`` (the prior): mean, ``H``, the posterior precision and
    ``log_prob`` for all weights (layerwise prior) and a named last layer (scalar prior)."""
    import torch

    from laplace import Laplace

    results = {}
    for subset, structure in CELLS:
        key = f"prior_before_fit/{subset}/{structure}"
        if subset == "subnetwork" or only not in key:
            continue
        out: dict[str, Any] = {}
        try:
            kwargs = {"last_layer_name": "4"} if subset == "last_layer" else {}
            la = Laplace(
                model_for(3),
                "classification",
                subset_of_weights=subset,
                hessian_structure=structure,
                prior_mean=0.2,
                **kwargs,
            )
            if subset == "all":  # laplace-torch 0.3 refuses a layerwise last-layer prior here
                la.prior_precision = torch.linspace(0.5, 2.0, la.n_layers)
            else:
                la.prior_precision = 0.7
            out["mean"] = tolist(torch.as_tensor(la.mean).expand(la.n_params))
            H = la.H
            out["H"] = tolist(H if isinstance(H, torch.Tensor) else H.to_matrix())
            theta = torch.randn(la.n_params, generator=torch.Generator().manual_seed(3))
            out["log_prob"] = tolist(la.log_prob(theta))
            if structure != "kron":  # laplace-torch 0.3 raises "not fitted" for kron
                out["posterior_precision"] = tolist(la.posterior_precision)
        except Exception as error:  # reported, not raised
            out["error"] = f"{type(error).__name__}: {error}"
        results[key] = out
    return results


def _reward_battery(tolist: Any, only: str = "") -> dict[str, Any]:
    """The seed document's Bradley-Terry example: pairs folded into the batch inside the model."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from laplace import Laplace

    class PairModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.ndim == 3:
                return self.net(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], 2)
            return self.net(x)

    g = torch.Generator().manual_seed(2)
    pairs, labels = torch.randn(30, 2, 3, generator=g), torch.randint(0, 2, (30,), generator=g)
    x_test = torch.randn(5, 3, generator=g)
    results = {}
    cells = [("all", "full"), ("all", "kron"), ("all", "diag"), ("last_layer", "full")]
    cells.append(("last_layer", "kron"))  # laplace-torch 0.3's DiagLLLaplace fails here
    for subset, structure in cells:
        if only not in f"reward_modeling/default/{subset}/{structure}":
            continue
        out: dict[str, Any] = {}
        try:
            torch.manual_seed(0)
            la = Laplace(
                PairModel(),
                "reward_modeling",
                subset_of_weights="all",
                hessian_structure=structure,
            )
            la.fit(DataLoader(TensorDataset(pairs, labels), batch_size=3))
            out["lml"] = tolist(la.log_marginal_likelihood())
            la.optimize_prior_precision()
            out["tuned_prior"] = tolist(la.prior_precision)
            f_mu, f_var = la(x_test)
            out["f_mu"], out["f_var"] = tolist(f_mu), tolist(f_var)
        except Exception as error:  # reported, not raised
            out["error"] = f"{type(error).__name__}: {error}"
        results[f"reward_modeling/default/{subset}/{structure}"] = out
    return results


MARGLIK_CELLS = [
    ("classification", "kron", "backpack", "layerwise", False),
    ("classification", "full", "curvlinops", "scalar", False),
    ("classification", "diag", "asdl", "diag", False),
    ("regression", "full", "curvlinops", "scalar", False),
    ("regression", "diag", "backpack", "layerwise", False),
    ("regression", "kron", "backpack", "layerwise", False),
    ("regression", "kron", "backpack", "layerwise", True),
    ("regression", "kron", "curvlinops", "scalar", True),
]
"""``marglik_training`` cells: likelihood, structure, backend, prior structure, fixed noise."""


def _marglik_battery(tolist: Any, only: str = "") -> dict[str, Any]:
    """``marglik_training`` from the same initial weights, data and options on both sides:
    8 epochs, marginal-likelihood steps every second epoch (5 Adam steps each)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from laplace import marglik_training
    from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN

    backends = {"backpack": BackPackGGN, "curvlinops": CurvlinopsGGN, "asdl": AsdlGGN}
    g = torch.Generator().manual_seed(4)
    X_cls = torch.randn(60, 2, generator=g)
    y_cls = (X_cls[:, 0] * X_cls[:, 1] > 0).long() + (X_cls[:, 0] > 1).long()
    X_reg = 8 * torch.rand(60, 1, generator=g)  # the seed document's sinusoid
    y_reg = torch.sin(X_reg) + 0.3 * torch.randn(60, 1, generator=g)
    results = {}
    for likelihood, structure, backend, prior, fix_sigma in MARGLIK_CELLS:
        key = f"marglik_training/{likelihood}/{backend}/{structure}/{prior}"
        key += "/fixed_sigma" if fix_sigma else ""
        if only not in key:
            continue
        out: dict[str, Any] = {}
        try:
            X, y = (X_cls, y_cls) if likelihood == "classification" else (X_reg, y_reg)
            torch.manual_seed(0)
            n_out = 3 if likelihood == "classification" else 1
            model = nn.Sequential(nn.Linear(X.shape[1], 10), nn.Tanh(), nn.Linear(10, n_out))
            la, model, margliks, losses = marglik_training(
                model,
                DataLoader(TensorDataset(X, y), batch_size=20),
                likelihood=likelihood,
                hessian_structure=structure,
                backend=backends[backend],
                n_epochs=8,
                n_hypersteps=5,
                marglik_frequency=2,
                prior_structure=prior,
                optimizer_kwargs={"lr": 1e-2},
                fix_sigma_noise=fix_sigma,
                sigma_noise_init=1.0 if likelihood == "classification" else 0.5,
            )
            out["margliks"], out["losses"] = margliks, losses
            out["prior_precision"] = tolist(la.prior_precision)
            out["sigma_noise"] = tolist(la.sigma_noise)
            out["lml"] = tolist(la.log_marginal_likelihood())
            out["weights"] = tolist(nn.utils.parameters_to_vector(model.parameters()))
        except Exception as error:  # reported, not raised
            out["error"] = f"{type(error).__name__}: {error}"
        results[key] = out
    return results


def _run(python: str, only: str = "") -> dict[str, Any]:
    """Run the battery under ``python`` (from a directory outside the checkout)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [python, str(Path(__file__).resolve()), "--worker", "--only", only],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _difference(a: list[float] | float, b: list[float] | float) -> float:
    a = a if isinstance(a, list) else [a]
    b = b if isinstance(b, list) else [b]
    if len(a) != len(b):
        return float("inf")
    scale = max([abs(v) for v in b] + [1e-12])
    return max((abs(x - z) for x, z in zip(a, b)), default=0.0) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="interpreter whose `laplace` is the reference")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument(
        "--verbose", action="store_true", help="list every quantity of a cell that differs"
    )
    parser.add_argument(
        "--only", default="", help="run only the cells whose key contains this substring"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_battery(args.only)))
        return
    if not args.reference_python:
        parser.error("--reference-python is required")
    sys.path.insert(0, str(REPO_ROOT))
    ours = _run_ours(args.only)
    reference = _run(args.reference_python, args.only)
    print(f"ours:      {ours.pop('library')}")
    print(f"reference: {reference.pop('library')}")
    print()
    print("| cell | quantities | largest relative difference | where |")
    print("|---|---:|---:|---|")
    failures = 0
    for key in ours:
        mine, theirs = ours[key], reference.get(key, {})
        if "error" in mine or "error" in theirs:
            print(
                f"| {key} | - | - | ours: {mine.get('error', 'ok')}; "
                f"reference: {theirs.get('error', 'ok')} |"
            )
            failures += 1
            continue
        worst, where, known = 0.0, "", set()
        for name, value in mine.items():
            if name not in theirs:
                continue
            diff = _difference(value, theirs[name])
            reason = next((why for match, why in KNOWN if match(key, name)), None)
            if diff > args.tolerance and reason is not None:
                known.add(reason)
            elif diff > worst:
                worst, where = diff, name
        failures += worst > args.tolerance
        note = f" (known: {'; '.join(sorted(known))})" if known else ""
        print(f"| {key} | {len(mine)} | {worst:.1e} | {where}{note} |")
        if args.verbose and (worst > args.tolerance or known):
            for name, value in mine.items():
                if name in theirs:
                    print(
                        f"|   | {name} | {_difference(value, theirs[name]):.1e} | "
                        f"{str(value)[:60]} vs {str(theirs[name])[:60]} |"
                    )
    print()
    print("agreement: OK" if failures == 0 else f"agreement: {failures} cells differ")
    sys.exit(1 if failures else 0)


def _run_ours(only: str = "") -> dict[str, Any]:
    """Run the battery on the checkout's `laplace`."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "--only", only],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
            env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)},
        )
    if result.returncode != 0:
        raise RuntimeError(f"our run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
