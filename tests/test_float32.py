"""Float32 models against float64 ground truth, over the whole grid.

Every cell — all weights, last layer, subnetwork × full, kron, diag, low rank ×
classification, regression, reward modeling × the default backend and every backend that
declares the structure — fits a float32 model on float32 data, and its posterior precision,
marginal likelihood and gradients, posterior covariance, GLM predictive variance and
probabilities are compared with brute-force float64 references (``tests/float32_truth.py``):
the **truth**, from the model and data upcast to float64, and the **floor**, the same
quantities computed in float64 from the float32 network's own Jacobians, features, outputs
and per-sample gradients. A result passes when its error against the truth is at most
``3 x`` the floor's plus ``16 eps`` of its own scale (``eps`` = float32 round-off;
:func:`float32_truth.tolerance`), and every case also meets the absolute targets of
:data:`TARGETS`.

The cases are built to be hard for float32: ReLU networks with dead units (exactly singular
input factors and curvature), 2,000 points in batches of 250, 40 points for 819 weights (more
parameters than data), and prior precisions ``1e-5`` of the largest eigenvalue of the
likelihood curvature. A curvature summed in float32 carries about ``eps * lambda_max`` in
every direction, which that prior turns into relative errors of order ``1e-3`` (seen on the
code before the float64 accumulation: the last-layer K-FAC and full cells fail here by two to
four orders of magnitude); the floor's error is quadratic in ``eps`` along the null
directions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import float32_truth as T
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import (
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    BackPackEF,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    EFInterface,
    GGNInterface,
)

TARGETS = {"probs": 1e-4, "var": 1e-3, "lml": 2e-5}
"""The absolute targets of every case: probabilities, relative predictive (co)variances,
relative log marginal likelihood."""

KIND = {
    CurvlinopsGGN: "ggn",
    GGNInterface: "ggn",
    BackPackGGN: "ggn",
    AsdlGGN: "ggn",
    CurvlinopsEF: "ef",
    EFInterface: "ef",
    BackPackEF: "ef",
    AsdlEF: "ef",
    CurvlinopsHessian: "ggn",  # last layer only: its Hessian is the GGN (f linear in it)
    AsdlHessian: "ggn",
}
RELATIVE_PRIOR = 1e-5
"""The prior precision as a fraction of the largest eigenvalue of ``factor * H``."""
N_OUT = {"classification": 3, "regression": 2, "reward_modeling": 1}
SIGMA = {"classification": 1.0, "regression": 0.3, "reward_modeling": 1.0}


@pytest.fixture(autouse=True)
def float32_default():
    """These tests run as users do: with float32 as the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


class PairModel(nn.Module):
    """A Bradley-Terry reward model: scores items ``(n, 5)`` or folded pairs ``(n, 2, 5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = T.relu_mlp(5, 1, seed=3)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            return self.net(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], 2)
        return self.net(x)


@dataclass(frozen=True)
class Case:
    likelihood: str
    model: nn.Module
    x: Tensor
    y: Tensor
    x_test: Tensor
    truth: T.Evaluation
    floor: T.Evaluation

    @property
    def fit_likelihood(self) -> str:
        """The likelihood of ``fit``: reward models fit as classifiers on pairs."""
        return "classification" if self.likelihood == "reward_modeling" else self.likelihood


@functools.cache
def problem(likelihood: str, size: str = "big", model_kind: str = "mlp") -> Case:
    """The float32 model, data and both evaluations; cached per case."""
    n = {"big": 2000, "small": 40}[size]
    n_out = N_OUT[likelihood]
    if likelihood == "reward_modeling":
        model = PairModel().eval()
        x, y = T.make_data("classification", n, 2, (2, 5), seed=1)
        x_test = T.make_data("regression", 100, 1, (5,), seed=2)[0]
    elif model_kind == "cnn":
        model = T.relu_cnn(n_out, seed=0)
        x, y = T.make_data(likelihood, n, n_out, (1, 8, 8), seed=1)
        x_test = T.make_data(likelihood, 100, n_out, (1, 8, 8), seed=2)[0]
    else:
        model = T.relu_mlp(5, n_out, seed=0)
        x, y = T.make_data(likelihood, n, n_out, (5,), seed=1)
        x_test = T.make_data(likelihood, 100, n_out, (5,), seed=2)[0]
    fit = "classification" if likelihood == "reward_modeling" else likelihood
    truth = T.evaluate(model, x, y, x_test, fit, "truth")
    floor = T.evaluate(model, x, y, x_test, fit, "floor")
    return Case(likelihood, model, x, y, x_test, truth, floor)


@dataclass
class Reference:
    """One reference of a cell: its curvature, test Jacobians and outputs, training loss."""

    H: Tensor
    J_test: Tensor
    f_test: Tensor
    loss: Tensor


def references(
    case: Case,
    subset: str,
    structure: str,
    kind: str,
    indices: Tensor | None = None,
    rank: int | None = None,
) -> dict[str, Reference]:
    """The truth and floor references of a cell (``kind``: ``"ggn"`` or ``"ef"``)."""
    lik = case.fit_likelihood
    y = case.y.double() if case.y.is_floating_point() else case.y
    out = {}
    for name, e in (("truth", case.truth), ("floor", case.floor)):
        if subset == "last_layer":
            e = T.last_layer_evaluation(case.model, e)
        if structure == "kron" and subset == "all":
            H = T.kfac(case.model, e, lik, kind)
        elif structure == "kron":
            H = T.last_layer_kfac(case.model, e, lik, kind)
        else:
            H = T.ggn(e, lik, kind)
        J_test = e.J_test
        if indices is not None:
            H, J_test = H[indices][:, indices], J_test[..., indices]
        if structure == "diag":
            H = torch.diag(H.diagonal())
        if structure == "lowrank":
            H = T.low_rank(H, rank)
        out[name] = Reference(H, J_test, e.f_test, T.total_loss(e.f, y, lik))
    return out


def stored_curvature(la) -> Tensor:
    """The library's ``H`` from its storage, in its accumulation precision, densely."""
    curvature, structure = la._curvature, la._structure.value
    if structure == "kron":
        return curvature.H.to_matrix().double()
    if structure == "diag":
        return torch.diag(curvature.H.double())
    if structure == "lowrank":
        U, values = curvature.eigenvectors.double(), curvature.eigenvalues.double()
        return (U * values) @ U.T
    return curvature.H.double()


def prior_for(la, delta: float, prior_kind: str) -> Tensor:
    """A prior precision around ``delta``, exactly representable in float32: scalar,
    layerwise (factors 1 to 4 over the layers) or per parameter (factors 1 to 4, seeded)."""
    if prior_kind == "scalar":
        prior = torch.tensor([delta], dtype=torch.float64)
    elif prior_kind == "layerwise":
        prior = delta * torch.linspace(1, 4, la.n_layers, dtype=torch.float64)
    else:
        g = torch.Generator().manual_seed(7)
        prior = delta * (1 + 3 * torch.rand(la._n_posterior, generator=g, dtype=torch.float64))
    return prior.float().double()


Errors = dict[str, tuple[float, float, float]]
"""Per quantity: ``(library error, floor error, scale)`` against the truth."""


def check_cell(la, case: Case, refs: dict[str, Reference], prior_kind: str = "scalar") -> None:
    """Fit ``la`` on the case and check every quantity against the references."""
    la.fit(DataLoader(TensorDataset(case.x, case.y), batch_size=250))
    sigma = SIGMA[case.likelihood]
    factor = 1 / sigma**2
    lam_max = torch.linalg.eigvalsh(factor * refs["truth"].H).max().item()
    prior = prior_for(la, RELATIVE_PRIOR * lam_max, prior_kind)
    la.prior_precision = prior.float()
    prior_diag = la.prior_precision_diag.double()
    P = {name: T.precision(ref.H, factor, prior_diag) for name, ref in refs.items()}
    cov = {name: torch.linalg.inv(p) for name, p in P.items()}
    errors: Errors = {}

    # the posterior precision, as a quadratic form in every direction
    P_lib = T.precision(stored_curvature(la), factor, prior_diag)
    errors["precision"] = (
        T.loewner_error(P_lib, P["truth"]),
        T.loewner_error(P["floor"], P["truth"]),
        1.0,
    )
    # the public posterior covariance, every (co)variance relative to its own scale
    if la._structure.value == "diag":
        lib_cov = torch.diag(la.posterior_variance)
    else:
        lib_cov = la.posterior_covariance
    assert lib_cov.dtype == torch.float32
    errors["covariance"] = (
        T.scaled_error(lib_cov, cov["truth"]),
        T.scaled_error(cov["floor"], cov["truth"]),
        1.0,
    )
    errors.update(marglik_errors(la, case, refs, prior, prior_diag, sigma))
    errors.update(predictive_errors(la, case, refs, cov))
    for quantity, (error, floor_error, scale) in errors.items():
        assert error <= T.tolerance(floor_error, scale), (quantity, error, floor_error, errors)


def marglik_errors(la, case: Case, refs: dict[str, Reference], prior, prior_diag, sigma):
    """The log marginal likelihood and its gradients in the log prior precision (and, for
    regression, the log noise), against truth and floor."""
    theta = (la.mean_subnet if hasattr(la, "mean_subnet") else la.mean).double()
    counts = torch.as_tensor(la.subset.sizes if len(prior) == la.n_layers else [1] * len(prior))
    if len(prior) == 1:
        counts = torch.as_tensor([len(theta)])
    log_prior = prior.log().requires_grad_(True)
    log_sigma = torch.tensor(math.log(sigma), dtype=torch.float64, requires_grad=True)
    values = {}
    for name, ref in refs.items():
        lml = T.log_marglik(
            ref.H,
            ref.loss,
            theta,
            log_prior.exp().repeat_interleave(counts),
            log_sigma.exp(),
            len(case.x),
            N_OUT[case.likelihood],
            case.fit_likelihood,
        )
        grads = torch.autograd.grad(lml, [log_prior, log_sigma], allow_unused=True)
        values[name] = (lml.item(), *grads)
    lib_prior = log_prior.detach().float().requires_grad_(True)
    lib_sigma = log_sigma.detach().float().requires_grad_(True)
    if case.likelihood == "regression":
        lml = la.log_marginal_likelihood(lib_prior.exp(), lib_sigma.exp())
    else:
        lml = la.log_marginal_likelihood(lib_prior.exp())
    assert lml.dtype == torch.float32
    lml.backward()
    (true, true_grad, true_sigma), (floor, floor_grad, floor_sigma) = values.values()
    relative = abs(lml.item() - true) / abs(true)
    assert relative <= TARGETS["lml"], relative
    scale = abs(true) + abs(refs["truth"].loss.item()) / sigma**2
    errors = {"lml": (abs(lml.item() - true), abs(floor - true), scale)}
    errors["lml_grad_prior"] = (
        (lib_prior.grad.double() - true_grad).abs().max().item(),
        (floor_grad - true_grad).abs().max().item(),
        true_grad.abs().sum().item() + 0.5 * len(theta),
    )
    if case.likelihood == "regression":
        errors["lml_grad_sigma"] = (
            abs(lib_sigma.grad.item() - true_sigma.item()),
            abs(floor_sigma.item() - true_sigma.item()),
            scale,
        )
    return errors


def predictive_errors(la, case: Case, refs: dict[str, Reference], cov: dict[str, Tensor]):
    """The GLM predictive (co)variances and, for classifiers, the probit, bridge and
    normalised bridge probabilities, against truth and floor (the ``mc`` link adds only its
    sampling to the same moments)."""
    var = {name: ref.J_test @ cov[name] @ ref.J_test.mT for name, ref in refs.items()}
    if case.likelihood == "classification":
        lib_var = la._glm_predictive_distribution(case.x_test)[1]
    else:
        lib_var = la(case.x_test, pred_type="glm")[1]
    assert lib_var.dtype == torch.float32
    error = T.scaled_error(lib_var, var["truth"])
    assert error <= TARGETS["var"], error
    errors = {"f_var": (error, T.scaled_error(var["floor"], var["truth"]), 1.0)}
    if case.likelihood != "classification":
        return errors
    links = {
        "probit": T.probit,
        "bridge": T.bridge,
        "bridge_norm": lambda f, v: T.bridge(f, v, normalize=True),
    }
    for link, approximation in links.items():
        probs = la(case.x_test, pred_type="glm", link_approx=link)
        assert probs.dtype == torch.float32
        truth = approximation(refs["truth"].f_test, var["truth"])
        floor = approximation(refs["floor"].f_test, var["floor"])
        error = (probs.double() - truth).abs().max().item()
        assert error <= TARGETS["probs"], (link, error)
        errors[link] = (error, (floor - truth).abs().max().item(), 1.0)
    return errors


def declared(backend: type, structure: str) -> bool:
    return structure in {s.value for s in backend.structures}


# ----------------------------------------------------------------------------- the grid
ALL_BACKENDS = (
    CurvlinopsGGN,
    GGNInterface,
    CurvlinopsEF,
    EFInterface,
    BackPackGGN,
    BackPackEF,
    AsdlGGN,
    AsdlEF,
)
ALL_WEIGHTS = [(s, b) for s in ("full", "kron", "diag") for b in ALL_BACKENDS if declared(b, s)]


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize(
    ("structure", "backend"), ALL_WEIGHTS, ids=[f"{s}-{b.__name__}" for s, b in ALL_WEIGHTS]
)
def test_all_weights(likelihood, structure, backend):
    case = problem(likelihood)
    refs = references(case, "all", structure, KIND[backend])
    la = Laplace(
        case.model,
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        backend=backend,
        sigma_noise=SIGMA[likelihood],
    )
    check_cell(la, case, refs)


LAST_LAYER_BACKENDS = (
    CurvlinopsGGN,
    GGNInterface,
    CurvlinopsEF,
    BackPackGGN,
    AsdlGGN,
    AsdlEF,
    CurvlinopsHessian,
    AsdlHessian,
)
LAST_LAYER = [
    (s, b, "mlp") for s in ("full", "kron", "diag") for b in LAST_LAYER_BACKENDS if declared(b, s)
] + [(s, CurvlinopsGGN, "cnn") for s in ("full", "kron", "diag")]
"""The MLP runs every backend, the CNN the default one."""


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize(
    ("structure", "backend", "model_kind"),
    LAST_LAYER,
    ids=[f"{s}-{b.__name__}-{m}" for s, b, m in LAST_LAYER],
)
def test_last_layer(likelihood, structure, backend, model_kind):
    case = problem(likelihood, "big", model_kind)
    refs = references(case, "last_layer", structure, KIND[backend])
    la = Laplace(
        case.model,
        likelihood,
        subset_of_weights="last_layer",
        hessian_structure=structure,
        backend=backend,
        sigma_noise=SIGMA[likelihood],
    )
    check_cell(la, case, refs)


def test_default_laplace_on_a_relu_cnn():
    """``Laplace(model, "classification")``: last-layer K-FAC with the default backend."""
    case = problem("classification", "big", "cnn")
    refs = references(case, "last_layer", "kron", "ggn")
    la = Laplace(case.model, "classification")
    assert type(la).__name__ == "KronLLLaplace"
    check_cell(la, case, refs)


SUBNETWORK = torch.cat([torch.arange(0, 50), torch.arange(200, 700, 25), torch.arange(760, 794)])
"""Subnetwork entries: the first-layer rows of the six dead units and of four live ones, a
spread over the middle layer, and most of the last layer."""


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("backend", [CurvlinopsGGN, BackPackGGN, AsdlEF], ids=lambda b: b.__name__)
def test_subnetwork(likelihood, structure, backend):
    case = problem(likelihood)
    refs = references(case, "all", structure, KIND[backend], indices=SUBNETWORK)
    la = Laplace(
        case.model,
        likelihood,
        subset_of_weights="subnetwork",
        hessian_structure=structure,
        subnetwork_indices=SUBNETWORK,
        backend=backend,
        sigma_noise=SIGMA[likelihood],
    )
    check_cell(la, case, refs)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_more_parameters_than_data(likelihood, structure):
    """40 points for 819 weights: most directions carry no curvature at all."""
    case = problem(likelihood, "small")
    refs = references(case, "all", structure, "ggn")
    la = Laplace(
        case.model,
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        sigma_noise=SIGMA[likelihood],
    )
    check_cell(la, case, refs)


@pytest.mark.parametrize(
    ("structure", "prior_kind"), [("full", "layerwise"), ("kron", "layerwise"), ("diag", "diag")]
)
def test_structured_priors(structure, prior_kind):
    """A layerwise prior takes the dense Cholesky path; a per-parameter one the diagonal."""
    case = problem("regression")
    refs = references(case, "all", structure, "ggn")
    la = Laplace(
        case.model,
        "regression",
        subset_of_weights="all",
        hessian_structure=structure,
        sigma_noise=SIGMA["regression"],
    )
    check_cell(la, case, refs, prior_kind)


@pytest.mark.parametrize(
    ("subset", "structure"),
    [("all", "full"), ("all", "kron"), ("all", "diag"), ("last_layer", "full")],
)
def test_reward_modeling(subset, structure):
    """Bradley-Terry pairs folded into the model's batch; predictions on single items."""
    case = problem("reward_modeling")
    refs = references(case, subset, structure, "ggn")
    la = Laplace(
        case.model, "reward_modeling", subset_of_weights=subset, hessian_structure=structure
    )
    check_cell(la, case, refs)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_low_rank(likelihood):
    """The top 40 eigenpairs by Lanczos, against those of the float64 GGN."""
    case = problem(likelihood, "small")
    rank = 40
    refs = references(case, "all", "lowrank", "ggn", rank=rank)
    la = Laplace(
        case.model,
        likelihood,
        subset_of_weights="all",
        hessian_structure="lowrank",
        sigma_noise=SIGMA[likelihood],
        n_eigenvalues=rank,
    )
    check_cell(la, case, refs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("subset", "structure"),
    [("all", "full"), ("all", "kron"), ("all", "diag"), ("last_layer", "kron")],
)
def test_half_precision(dtype, subset, structure):
    """Half-precision models: the curvature is summed in float64, results come back in the
    model's dtype, within the same floor-relative tolerance with the half type's round-off
    (a moderate prior: 1e-3 of the largest curvature eigenvalue)."""
    model = T.relu_mlp(5, 3, seed=0).to(dtype)
    x, y = T.make_data("classification", 500, 3, (5,), seed=1)
    x, x_test = x.to(dtype), T.make_data("classification", 50, 3, (5,), seed=2)[0].to(dtype)
    case = Case(
        "classification",
        model,
        x,
        y,
        x_test,
        T.evaluate(model, x, y, x_test, "classification", "truth"),
        T.evaluate(model, x, y, x_test, "classification", "floor"),
    )
    refs = references(case, subset, structure, "ggn")
    la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=100))
    stored = la._curvature.H.kfacs[0][0] if structure == "kron" else la._curvature.H
    assert stored.dtype == torch.float64
    delta = 1e-3 * torch.linalg.eigvalsh(refs["truth"].H).max().item()
    la.prior_precision = delta
    cov = {
        name: torch.linalg.inv(T.precision(ref.H, 1.0, la.prior_precision_diag.double()))
        for name, ref in refs.items()
    }
    var = {name: ref.J_test @ cov[name] @ ref.J_test.mT for name, ref in refs.items()}
    probs = la(x_test, link_approx="probit")
    lml = la.log_marginal_likelihood()
    assert probs.dtype == dtype and lml.dtype == dtype
    eps = torch.finfo(dtype).eps
    truth = T.probit(refs["truth"].f_test, var["truth"])
    floor = T.probit(refs["floor"].f_test, var["floor"])
    error, floor_error = (probs.double() - truth).abs().max(), (floor - truth).abs().max()
    assert error <= T.FLOOR_FACTOR * floor_error + 16 * eps, (error, floor_error)
    theta = la.mean.double()
    true_lml = T.log_marglik(
        refs["truth"].H,
        refs["truth"].loss,
        theta,
        la.prior_precision_diag.double(),
        torch.ones((), dtype=torch.float64),
        len(x),
        3,
        "classification",
    )
    assert abs(lml.item() - true_lml.item()) <= 16 * eps * abs(true_lml.item())


@pytest.mark.parametrize("structure", ["full", "kron", "diag", "lowrank"])
def test_samples_have_the_posterior_covariance(structure):
    """Posterior samples of a float32 model: float32, with the float64 posterior covariance
    up to Monte-Carlo error (a tiny model, 40,000 samples: 6 standard errors of each
    covariance entry, ``sqrt((S_ii S_jj + S_ij^2) / n)``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).float()
    x, y = T.make_data("regression", 200, 2, (3,), seed=1)
    kwargs = {"n_eigenvalues": 10} if structure == "lowrank" else {}
    la = Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure=structure,
        sigma_noise=0.5,
        prior_precision=0.1,
        **kwargs,
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=50))
    P = T.precision(stored_curvature(la), 4.0, la.prior_precision_diag.double())
    covariance = torch.linalg.inv(P)
    n = 40_000
    samples = la.sample(n, generator=torch.Generator().manual_seed(3))
    assert samples.dtype == torch.float32
    centred = samples.double() - la.mean.double()
    empirical = centred.T @ centred / n
    d = covariance.diagonal()
    standard_error = torch.sqrt((d[:, None] * d[None, :] + covariance**2) / n)
    assert ((empirical - covariance).abs() <= 6 * standard_error).all()
