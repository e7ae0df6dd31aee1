"""Accuracy of Laplace approximations of float32 models against float64 ground truth.

Users run float32 models. This script trains two small float32 networks, asks the library
(through its public API only) for the quantities users look at, and compares them with the
same quantities computed by brute force in float64 from the very same weights and data
(upcast): dense generalized Gauss-Newton matrices from per-sample Jacobians, explicit
Kronecker products, dense inverses and ``slogdet``. No library code is used for the truth.

Cases:

- ``cnn``: a ReLU CNN (2 conv + 2 linear layers, 128 features, 10 classes, 80k parameters)
  trained for 2 epochs on 4,000 synthetic 28x28 images of 10 classes; last-layer Laplace
  (``kron`` — the default ``Laplace(model, "classification")`` —, ``full``, ``diag``) fitted
  on the training images with prior precision 1, probit predictive on 2,000 test images.
  Reported: the largest absolute error of the predictive probabilities, the mean predictive
  (functional) variance and the mean confidence, and for ``kron`` the largest curvature
  that ``la.H`` puts on the directions where the float64 K-FAC is exactly zero (the
  all-ones direction of the softmax Hessian times every feature, and the features of dead
  ReLU units).
  The first row, the float32 network's own softmax probabilities against float64, is the
  floor set by the input data: no Laplace predictive built on that network can be closer.
- ``sinusoid``: a 1-50-1 tanh MLP fitted to 500 noisy points of a sinusoid (noise 0.3),
  all-weights ``full`` GGN: the log marginal likelihood at prior precision 1 and noise 0.3,
  then 100 Adam steps (lr 0.1) on the log prior precision and the log noise from zero, as in
  the seed document's regression example: the distance of both from the float64 run of the
  same steps, and the largest relative error of the predictive variance at the tuned values.

The library side runs in a subprocess (``--worker``) of this interpreter with the checkout
on ``PYTHONPATH``, and, with ``--reference-python``, of a reference interpreter whose
``laplace`` is another library (e.g. ``laplace-torch`` 0.3 in its own venv: it also imports
as ``laplace``), in isolated mode outside the checkout. Both sides receive the same weights
and data in one file.

Usage:
    python benchmarks/check_accuracy.py [--reference-python /path/to/venv/bin/python]
        [--threads 2] [--output-dir benchmarks/results]

Exits non-zero if our side misses a target of the table (``TARGETS``) or is less accurate
than the reference on a row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]

N_TRAIN, N_TEST, N_CLASSES, SIDE = 4000, 2000, 10, 28
N_SINUSOID, NOISE = 500, 0.3
HYPER_STEPS, HYPER_LR = 100, 0.1

TARGETS = {
    "prob_abs": 1e-4,
    "var_rel": 1e-3,
    "lml_rel": 2e-5,
    "log_hyper": 5e-3,
}
"""The accuracy targets: predictive probabilities (absolute), regression predictive
variance (relative), log marginal likelihood (relative), tuned hyperparameters (log)."""


# ----------------------------------------------------------------------------- models
def make_cnn() -> nn.Module:
    """2 conv + 2 linear ReLU layers on 1x28x28 images; 128 features, 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, N_CLASSES),
    )


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))


# ----------------------------------------------------------------------------- data
def synthetic_images(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` noisy 28x28 images of 10 classes: a class-specific pair of blobs, shifted.

    Each class has two Gaussian blobs at fixed positions; every image shifts them by up to
    3 pixels, scales their brightness and adds pixel noise, so the classes overlap a little.
    """
    grid = torch.arange(SIDE, dtype=torch.float32)
    centres = torch.Generator().manual_seed(1234)
    positions = 5 + 18 * torch.rand(N_CLASSES, 2, 2, generator=centres)
    labels = torch.randint(N_CLASSES, (n,), generator=generator)
    shift = 3 * (2 * torch.rand(n, 1, 2, generator=generator) - 1)
    where = positions[labels] + shift  # (n, blobs, 2)
    dy = (grid.view(1, 1, SIDE, 1) - where[..., 0, None, None]) ** 2
    dx = (grid.view(1, 1, 1, SIDE) - where[..., 1, None, None]) ** 2
    brightness = 0.5 + torch.rand(n, 2, 1, 1, generator=generator)
    images = (brightness * torch.exp(-(dx + dy) / 8.0)).sum(1, keepdim=True)
    images = images + 0.3 * torch.randn(n, 1, SIDE, SIDE, generator=generator)
    return images, labels


def sinusoid(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    x = 8 * torch.rand(n, 1, generator=generator)
    return x, torch.sin(x) + NOISE * torch.randn(n, 1, generator=generator)


def train(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss_fn: Any,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    weight_decay: float = 0.0,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=generator)
        for index in order.split(batch):
            optimizer.zero_grad()
            loss_fn(model(X[index]), y[index]).backward()
            optimizer.step()
    model.eval()


def build_problems(path: Path) -> None:
    """Train the two float32 models and save weights and data to ``path``."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    X, y = synthetic_images(N_TRAIN, generator)
    X_test, y_test = synthetic_images(N_TEST, generator)
    cnn = make_cnn()
    train(cnn, X, y, nn.functional.cross_entropy, epochs=2, lr=1e-3, batch=64, seed=1)
    with torch.no_grad():
        accuracy = (cnn(X_test).argmax(-1) == y_test).float().mean().item()

    torch.manual_seed(2)
    x_sin, y_sin = sinusoid(N_SINUSOID, generator)
    mlp = make_mlp()
    train(
        mlp,
        x_sin,
        y_sin,
        nn.functional.mse_loss,
        epochs=300,
        lr=1e-2,
        batch=50,
        seed=3,
        weight_decay=1e-4,
    )
    x_grid = torch.linspace(-2, 10, 200).unsqueeze(-1)
    torch.save(
        {
            "cnn": cnn.state_dict(),
            "cnn_X": X,
            "cnn_y": y,
            "cnn_X_test": X_test,
            "cnn_test_accuracy": accuracy,
            "mlp": mlp.state_dict(),
            "sin_x": x_sin,
            "sin_y": y_sin,
            "sin_grid": x_grid,
        },
        path,
    )


# ----------------------------------------------------------------------------- library side
def run_library(problems: dict[str, Any]) -> dict[str, Any]:
    """The public-API calls, in whichever ``laplace`` this interpreter imports."""
    from torch.utils.data import DataLoader, TensorDataset

    import laplace
    from laplace import Laplace

    out: dict[str, Any] = {"library": laplace.__file__}
    cnn = make_cnn()
    cnn.load_state_dict(problems["cnn"])
    cnn.eval()
    loader = DataLoader(TensorDataset(problems["cnn_X"], problems["cnn_y"]), batch_size=128)
    X_test = problems["cnn_X_test"]
    with torch.no_grad():
        out["cnn_map"] = {"probs": torch.softmax(cnn(X_test), dim=-1)}
    for structure in ("kron", "full", "diag"):
        start = time.perf_counter()
        if structure == "kron":
            la = Laplace(cnn, "classification")  # the default: last layer, K-FAC
        else:
            la = Laplace(
                cnn, "classification", subset_of_weights="last_layer", hessian_structure=structure
            )
        la.fit(loader)
        probs = torch.cat(
            [la(x, pred_type="glm", link_approx="probit") for x in X_test.split(500)]
        )
        # private in both libraries, but the only call that gives every structure's variances
        f_var = torch.cat(
            [
                la._glm_predictive_distribution(x)[1].diagonal(dim1=-2, dim2=-1)
                for x in X_test.split(500)
            ]
        )
        result = {
            "probs": probs,
            "f_var": f_var,
            "seconds": time.perf_counter() - start,
            "dtype": str(probs.dtype),
        }
        if structure == "kron":
            H = la.H
            result["H"] = H.to_matrix() if hasattr(H, "to_matrix") else H
        out[f"cnn_{structure}"] = result

    mlp = make_mlp()
    mlp.load_state_dict(problems["mlp"])
    mlp.eval()
    x, y, grid = problems["sin_x"], problems["sin_y"], problems["sin_grid"]
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    la = Laplace(mlp, "regression", subset_of_weights="all", hessian_structure="full")
    la.fit(loader)
    lml = la.log_marginal_likelihood(torch.tensor(1.0), torch.tensor(NOISE)).item()
    log_prior = torch.zeros(1, requires_grad=True)
    log_sigma = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([log_prior, log_sigma], lr=HYPER_LR)
    for _ in range(HYPER_STEPS):
        optimizer.zero_grad()
        neg = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        neg.backward()
        optimizer.step()
    # the loop leaves the values of the step before the last one set: predict at the final
    la.prior_precision = log_prior.detach().exp()
    la.sigma_noise = log_sigma.detach().exp()
    _, f_var = la(grid)
    out["sinusoid"] = {
        "lml": lml,
        "log_prior": log_prior.item(),
        "log_sigma": log_sigma.item(),
        "f_var": f_var.reshape(-1),
        "dtype": str(f_var.dtype),
    }
    return out


# ----------------------------------------------------------------------------- truth
def _features(cnn64: nn.Module, X: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([cnn64[:-1](x) for x in X.double().split(500)])


def _softmax_hessians(logits: Tensor) -> Tensor:
    p = torch.softmax(logits, dim=-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def _last_layer_ggn(phi: Tensor, lam: Tensor) -> Tensor:
    """Dense GGN of ``W phi + b`` in the order (row-major weight, bias), from
    ``J_n = [I ⊗ phi_n^T, I]``: a loop over chunks of samples."""
    n, F = phi.shape
    C = lam.shape[-1]
    ones = torch.cat([phi, torch.ones(n, 1, dtype=phi.dtype)], dim=1)
    H = torch.zeros(C, F + 1, C, F + 1, dtype=phi.dtype)
    for index in torch.arange(n).split(250):
        H += torch.einsum("ncd,ni,nj->cidj", lam[index], ones[index], ones[index])
    weight = torch.arange(C * (F + 1)).view(C, F + 1)
    order = torch.cat([weight[:, :F].reshape(-1), weight[:, F]])
    return H.reshape(C * (F + 1), -1)[order][:, order]


def _glm_last_layer(phi: Tensor, logits: Tensor, covariance: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``J Sigma J^T`` diagonals and the probit probabilities."""
    F = phi.shape[1]
    C = logits.shape[-1]
    Sw = covariance[: C * F, : C * F].reshape(C, F, C, F)
    Swb = covariance[: C * F, C * F :].reshape(C, F, C)
    Sb = covariance[C * F :, C * F :]
    f_var = (
        torch.einsum("ni,cicj,nj->nc", phi, Sw, phi)
        + 2 * torch.einsum("ni,cic->nc", phi, Swb)
        + Sb.diagonal()
    )
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var)
    return f_var, torch.softmax(kappa * logits, dim=-1)


def _kron(B: Tensor, A: Tensor) -> Tensor:
    return (B[:, None, :, None] * A[None, :, None, :]).reshape(B.shape[0] * A.shape[0], -1)


def truth_cnn(problems: dict[str, Any]) -> dict[str, Any]:
    cnn = make_cnn()
    cnn.load_state_dict(problems["cnn"])
    cnn64 = cnn.double().eval()
    phi, phi_test = _features(cnn64, problems["cnn_X"]), _features(cnn64, problems["cnn_X_test"])
    last = cnn64[-1]
    with torch.no_grad():
        logits, logits_test = last(phi), last(phi_test)
    lam = _softmax_hessians(logits)
    C, F = N_CLASSES, phi.shape[1]
    ggn = _last_layer_ggn(phi, lam)
    B, A = lam.sum(0), phi.T @ phi / len(phi)
    n_params = C * F + C
    kron = torch.zeros(n_params, n_params, dtype=torch.float64)
    kron[: C * F, : C * F] = _kron(B, A)
    kron[C * F :, C * F :] = B
    curvatures = {"full": ggn, "kron": kron, "diag": torch.diag(ggn.diagonal())}
    eye = torch.eye(n_params, dtype=torch.float64)
    truth: dict[str, Any] = {"cnn_map": {"probs": torch.softmax(logits_test, dim=-1)}}
    for structure, H in curvatures.items():
        covariance = torch.linalg.inv(H + eye)
        f_var, probs = _glm_last_layer(phi_test, logits_test, covariance)
        truth[f"cnn_{structure}"] = {"probs": probs, "f_var": f_var}
    values, vectors = torch.linalg.eigh(kron)
    null = vectors[:, values <= 1e-12 * values.max()]
    truth["cnn_kron"]["null"] = null
    truth["cnn_kron"]["H"] = kron
    return truth


def _flat_fn(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def f(theta: Tensor, x: Tensor) -> Tensor:
        chunks = theta.split(sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return torch.func.functional_call(model, params, (x,))

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta


def truth_sinusoid(problems: dict[str, Any]) -> dict[str, Any]:
    mlp = make_mlp()
    mlp.load_state_dict(problems["mlp"])
    mlp64 = mlp.double().eval()
    f, theta = _flat_fn(mlp64)
    x, y, grid = (problems[k].double() for k in ("sin_x", "sin_y", "sin_grid"))
    J = torch.func.jacrev(lambda t: f(t, x).reshape(-1))(theta)  # (N, params)
    J_grid = torch.func.jacrev(lambda t: f(t, grid).reshape(-1))(theta)
    with torch.no_grad():
        sse = ((f(theta, x) - y) ** 2).sum()
    gram, n, p = J.T @ J, len(x), theta.numel()
    eye = torch.eye(p, dtype=torch.float64)

    def lml(prior: Tensor, sigma: Tensor) -> Tensor:
        precision = gram / sigma**2 + prior * eye
        log_lik = -0.5 * sse / sigma**2 - n * torch.log(sigma * math.sqrt(2 * math.pi))
        logdet = torch.linalg.slogdet(precision)[1] - p * torch.log(prior)
        return log_lik - 0.5 * (logdet + prior * (theta @ theta))

    value = lml(torch.tensor(1.0, dtype=torch.float64), torch.tensor(NOISE, dtype=torch.float64))
    log_prior = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([log_prior, log_sigma], lr=HYPER_LR)
    for _ in range(HYPER_STEPS):
        optimizer.zero_grad()
        (-lml(log_prior.exp()[0], log_sigma.exp()[0])).backward()
        optimizer.step()
    with torch.no_grad():
        precision = gram / log_sigma.exp() ** 2 + log_prior.exp() * eye
        f_var = torch.einsum("gp,pq,gq->g", J_grid, torch.linalg.inv(precision), J_grid)
        # the input floor: the float32 network's own Jacobians, everything else in float64
        f32, theta32 = _flat_fn(mlp_float32(problems))
        J32 = torch.func.jacrev(lambda t: f32(t, problems["sin_x"]).reshape(-1))(theta32)
        J32_grid = torch.func.jacrev(lambda t: f32(t, problems["sin_grid"]).reshape(-1))(theta32)
        J32, J32_grid = J32.double(), J32_grid.double()
        precision32 = J32.T @ J32 / log_sigma.exp() ** 2 + log_prior.exp() * eye
        f_var_floor = torch.einsum(
            "gp,pq,gq->g", J32_grid, torch.linalg.inv(precision32), J32_grid
        )
    floor = ((f_var_floor - f_var).abs() / f_var).max().item()
    return {
        "sinusoid": {
            "lml": value.item(),
            "log_prior": log_prior.item(),
            "log_sigma": log_sigma.item(),
            "f_var": f_var,
            "var_floor": floor,
        }
    }


def mlp_float32(problems: dict[str, Any]) -> nn.Module:
    mlp = make_mlp()
    mlp.load_state_dict(problems["mlp"])
    return mlp.eval()


# ----------------------------------------------------------------------------- report
def compare(side: dict[str, Any], truth: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Error measures of one library's results against the truth, by row."""
    rows: dict[str, dict[str, float]] = {}
    for structure in ("kron", "full", "diag"):
        key = f"cnn_{structure}"
        mine, true = side[key], truth[key]
        probs = mine["probs"].double()
        row = {
            "prob_abs": (probs - true["probs"]).abs().max().item(),
            "mean_var": mine["f_var"].double().mean().item(),
            "mean_var_truth": true["f_var"].mean().item(),
            "confidence": probs.max(-1).values.mean().item(),
            "confidence_truth": true["probs"].max(-1).values.mean().item(),
            "seconds": mine["seconds"],
        }
        if structure == "kron":
            null = true["null"]
            restricted = null.T @ mine["H"].double() @ null
            row["null_curvature"] = torch.linalg.eigvalsh(restricted).abs().max().item()
            row["null_dim"] = null.shape[1]
        rows[key] = row
    map_error = (side["cnn_map"]["probs"].double() - truth["cnn_map"]["probs"]).abs().max()
    rows["cnn_map"] = {"prob_abs": map_error.item()}
    mine, true = side["sinusoid"], truth["sinusoid"]
    rows["sinusoid"] = {
        "lml_rel": abs(mine["lml"] - true["lml"]) / abs(true["lml"]),
        "log_prior": abs(mine["log_prior"] - true["log_prior"]),
        "log_sigma": abs(mine["log_sigma"] - true["log_sigma"]),
        "var_rel": ((mine["f_var"].double() - true["f_var"]).abs() / true["f_var"]).max().item(),
        "var_floor": true["var_floor"],
    }
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    return (
        f"{value:.{digits}e}"
        if (abs(value) < 1e-2 or abs(value) >= 1e4) and value
        else (f"{value:.4g}")
    )


def report(ours: dict, reference: dict | None, failures: list[str]) -> str:
    ref = reference or {}

    def cell(rows: dict, key: str, name: str) -> float | None:
        return rows.get(key, {}).get(name)

    lines = [
        "| case (float32 model, float64 truth) | measure | target | ours | reference |",
        "|---|---|---:|---:|---:|",
    ]
    spec = [
        (
            "cnn_map",
            "prob_abs",
            "input floor: the float32 CNN's own (MAP) probabilities",
            "max abs error",
            None,
        ),
        (
            "cnn_kron",
            "prob_abs",
            "LL kron (default), probit probabilities",
            "max abs error",
            TARGETS["prob_abs"],
        ),
        (
            "cnn_kron",
            "mean_var",
            "LL kron, mean predictive variance",
            f"value (truth {ours['cnn_kron']['mean_var_truth']:.4g})",
            None,
        ),
        (
            "cnn_kron",
            "confidence",
            "LL kron, mean confidence",
            f"value (truth {ours['cnn_kron']['confidence_truth']:.4g})",
            None,
        ),
        (
            "cnn_kron",
            "null_curvature",
            "LL kron, `la.H` on the float64 null space "
            f"({ours['cnn_kron']['null_dim']} directions; prior 1)",
            "largest curvature",
            None,
        ),
        (
            "cnn_full",
            "prob_abs",
            "LL full, probit probabilities",
            "max abs error",
            TARGETS["prob_abs"],
        ),
        (
            "cnn_diag",
            "prob_abs",
            "LL diag, probit probabilities",
            "max abs error",
            TARGETS["prob_abs"],
        ),
        (
            "sinusoid",
            "lml_rel",
            "sinusoid MLP, all full: log marglik(1, 0.3)",
            "rel error",
            TARGETS["lml_rel"],
        ),
        (
            "sinusoid",
            "log_prior",
            "sinusoid MLP: 100 Adam steps, log prior precision",
            "abs error",
            TARGETS["log_hyper"],
        ),
        (
            "sinusoid",
            "log_sigma",
            "sinusoid MLP: 100 Adam steps, log sigma",
            "abs error",
            TARGETS["log_hyper"],
        ),
        (
            "sinusoid",
            "var_rel",
            "sinusoid MLP: predictive variance at the tuned values",
            "max rel error",
            TARGETS["var_rel"],
        ),
        (
            "sinusoid",
            "var_floor",
            "input floor: the same variance from the float32 network's Jacobians, in float64",
            "max rel error",
            None,
        ),
    ]
    for key, name, label, measure, target in spec:
        lines.append(
            f"| {label} | {measure} | {_fmt(target) if target else '—'} | "
            f"{_fmt(cell(ours, key, name))} | {_fmt(cell(ref, key, name))} |"
        )
    if failures:
        lines += ["", "Missed: " + "; ".join(failures)]
    return "\n".join(lines)


def check(ours: dict, reference: dict | None) -> list[str]:
    """Rows where ours misses a target or is less accurate than the reference."""
    failures = []
    errors = [
        ("cnn_kron", "prob_abs"),
        ("cnn_full", "prob_abs"),
        ("cnn_diag", "prob_abs"),
        ("sinusoid", "lml_rel"),
        ("sinusoid", "log_prior"),
        ("sinusoid", "log_sigma"),
        ("sinusoid", "var_rel"),
    ]
    target_of = {
        "prob_abs": "prob_abs",
        "lml_rel": "lml_rel",
        "log_prior": "log_hyper",
        "log_sigma": "log_hyper",
        "var_rel": "var_rel",
    }
    for key, name in errors:
        value = ours[key][name]
        if value > TARGETS[target_of[name]]:
            failures.append(f"{key} {name} = {value:.2e} > target {TARGETS[target_of[name]]:g}")
        if reference is not None and value > max(reference[key][name], 1e-7):
            failures.append(
                f"{key} {name}: ours {value:.2e} > reference {reference[key][name]:.2e}"
            )
    if reference is not None and ours["cnn_kron"]["null_curvature"] > max(
        reference["cnn_kron"]["null_curvature"], 1e-6
    ):
        failures.append("cnn_kron null-space curvature above the reference's")
    return failures


# ----------------------------------------------------------------------------- driver
def run_worker(python: str, problems: Path, output: Path, threads: int, isolated: bool) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [python]
    if isolated:
        command.append("-I")
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    command += [
        str(Path(__file__).resolve()),
        "--worker",
        str(problems),
        str(output),
        "--threads",
        str(threads),
    ]
    cwd = tempfile.gettempdir() if isolated else str(REPO_ROOT)
    subprocess.run(command, check=True, env=env, cwd=cwd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="interpreter whose `laplace` is the reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--worker", nargs=2, metavar=("PROBLEMS", "OUTPUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        problems = torch.load(args.worker[0])
        torch.save(run_library(problems), args.worker[1])
        return 0

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        problems_path = folder / "problems.pt"
        start = time.perf_counter()
        build_problems(problems_path)
        problems = torch.load(problems_path)
        print(
            f"[accuracy] trained the models in {time.perf_counter() - start:.1f} s "
            f"(CNN test accuracy {problems['cnn_test_accuracy']:.3f})",
            flush=True,
        )
        truth = {**truth_cnn(problems), **truth_sinusoid(problems)}
        run_worker(sys.executable, problems_path, folder / "ours.pt", args.threads, False)
        ours = compare(torch.load(folder / "ours.pt"), truth)
        reference = None
        if args.reference_python:
            run_worker(args.reference_python, problems_path, folder / "ref.pt", args.threads, True)
            reference = compare(torch.load(folder / "ref.pt"), truth)
    failures = check(ours, reference)
    table = report(ours, reference, failures)
    print(table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "accuracy.md").write_text(table + "\n")
    (args.output_dir / "accuracy.json").write_text(
        json.dumps({"ours": ours, "reference": reference, "failures": failures}, indent=2)
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
