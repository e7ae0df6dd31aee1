"""Every curvature backend on one matrix, against float64 ground truth and against each other.

The matrix is backend × structure (full, diag, kron) × likelihood (classification, regression
with one output, regression with three outputs) × model (an ``nn.Sequential`` MLP, a CNN, a
model reading ``batch["input_ids"]`` from a dict). A cell the backend declares (``structures``,
``supports_dict_inputs``) is compared with the brute-force references of
``tests/groundtruth.py`` (dense GGN, empirical Fisher or Hessian; diagonals for ``diag``) and
the naive K-FAC of ``tests/kfac_reference.py`` (block by block for ``kron``); a cell it does
not declare must raise an error that names what would work. Further tests check K-FAC of a
layer shared over sequence positions, that every pair of backends offering a quantity agrees,
that sampled GGNs converge to the exact one, that differentiable Jacobians give the same input
gradient everywhere, that a backend leaves the model as it found it, and that the Laplace
classes work with every backend.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import make_data, make_mlp
from groundtruth import (
    dense_ef,
    dense_ggn,
    dense_hessian,
    dense_jacobians,
    loss_fn,
    per_sample_gradients,
    total_loss,
)
from kfac_reference import kfac_blocks, naive_kfac
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import BACKENDS
from laplace.curvature.curvature import GGNInterface
from laplace.utils.data import Inputs

KINDS = {
    "GGNInterface": "ggn",
    "CurvlinopsGGN": "ggn",
    "BackPackGGN": "ggn",
    "AsdlGGN": "ggn",
    "EFInterface": "ef",
    "CurvlinopsEF": "ef",
    "BackPackEF": "ef",
    "AsdlEF": "ef",
    "CurvlinopsHessian": "hessian",
    "AsdlHessian": "hessian",
}
"""What each backend computes; a registered backend missing here fails its tests."""
DENSE_REFERENCES = {"ggn": dense_ggn, "ef": dense_ef, "hessian": dense_hessian}
STRUCTURES = ("full", "diag", "kron")
CASES = {  # case id -> (likelihood, number of outputs)
    "classification": ("classification", 3),
    "regression-1out": ("regression", 1),
    "regression-3out": ("regression", 3),
}
MODELS = ("mlp", "cnn", "dict")
N_BATCH, N_DATA = 8, 20
VOCAB, SEQ_LEN = 7, 4
TOL = {"atol": 1e-9, "rtol": 1e-9}


def name(backend: type) -> str:
    return backend.__name__


backends = pytest.mark.parametrize("backend", BACKENDS, ids=name)


def make_small_cnn(n_out: int, seed: int = 0) -> nn.Sequential:
    """A CNN on ``1x4x4`` images with stride and padding, small enough for dense Hessians."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8, n_out)
    ).double()


class DictModel(nn.Module):
    """A sequence classifier reading ``batch["input_ids"]``: a frozen embedding, mean-pooled
    over positions, then a trainable MLP head (the LoRA-like setting: a frozen base)."""

    def __init__(self, n_out: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 3).requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, n_out))
        self.double()

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.head(self.embed(batch["input_ids"]).mean(dim=1))


class TensorView(nn.Module):
    """``DictModel`` called on the ``input_ids`` tensor, for the tensor-only references."""

    def __init__(self, model: DictModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model({"input_ids": input_ids})


@dataclass
class Problem:
    """A model and batch for the backends, and the same in tensor form for the references."""

    model: nn.Module
    x: Inputs
    y: Tensor
    likelihood: str
    reference: nn.Module
    x_reference: Tensor


def make_problem(model_kind: str, case: str, n: int = N_BATCH) -> Problem:
    """The (deterministic) model and batch of a matrix cell."""
    likelihood, n_out = CASES[case]
    if model_kind == "mlp":
        model = make_mlp(n_out=n_out)
        x, y = make_data(likelihood, n=n, n_out=n_out)
        return Problem(model, x, y, likelihood, model, x)
    if model_kind == "cnn":
        model = make_small_cnn(n_out)
        _, y = make_data(likelihood, n=n, n_out=n_out)
        x = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(2))
        return Problem(model, x, y, likelihood, model, x)
    model = DictModel(n_out)
    _, y = make_data(likelihood, n=n, n_out=n_out)
    ids = torch.randint(VOCAB, (n, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    return Problem(model, {"input_ids": ids}, y, likelihood, TensorView(model), ids)


@functools.cache
def dense_reference(model_kind: str, case: str, kind: str) -> Tensor:
    """Dense GGN, empirical Fisher or Hessian of a cell's batch."""
    p = make_problem(model_kind, case)
    return DENSE_REFERENCES[kind](p.reference, p.x_reference, p.y, p.likelihood)


@functools.cache
def kfac_reference(model_kind: str, case: str, kind: str) -> tuple[Tensor, ...]:
    """Blocks of the naive K-FAC of a cell's batch out of a data set of ``N_DATA``."""
    p = make_problem(model_kind, case)
    factors = naive_kfac(p.reference, p.x_reference, p.y, p.likelihood, kind, N_DATA)
    return tuple(kfac_blocks(factors))


def kron_blocks(kron) -> list[Tensor]:
    return [torch.kron(*factors) if len(factors) == 2 else factors[0] for factors in kron.kfacs]


def takes_model(backend: type, model_kind: str) -> bool:
    return model_kind != "dict" or backend.supports_dict_inputs


def offers(backend: type, structure: str, model_kind: str) -> bool:
    """Whether the backend declares this structure for this kind of model."""
    declared = {s.value for s in backend.structures}
    return structure in declared and takes_model(backend, model_kind)


def compute(backend: type, structure: str, p: Problem, **kwargs) -> tuple[Tensor, object]:
    curvature = backend(p.model, p.likelihood, **kwargs)
    return getattr(curvature, structure)(p.x, p.y, N=N_DATA)


@functools.cache
def cell(backend: type, structure: str, model_kind: str, case: str) -> tuple[Tensor, object]:
    """``(loss, curvature)`` of a declared cell, shared by the matrix and the pair tests."""
    return compute(backend, structure, make_problem(model_kind, case))


def assert_unsupported(backend: type, structure: str, p: Problem, model_kind: str) -> None:
    """The error of an undeclared cell names the backends or structures that would work."""
    if not takes_model(backend, model_kind):
        with pytest.raises(ValueError) as info:
            compute(backend, structure, p)
        able = [name(b) for b in BACKENDS if b.supports_dict_inputs]
        assert any(a in str(info.value) for a in able), str(info.value)
        return
    curvature = backend(p.model, p.likelihood)
    with pytest.raises(NotImplementedError, match=structure) as info:
        getattr(curvature, structure)(p.x, p.y, N=N_DATA)
    for declared in backend.structures:
        assert repr(declared.value) in str(info.value)


# ---------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("model_kind", MODELS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("structure", STRUCTURES)
@backends
def test_matrix_cell(backend, structure, case, model_kind):
    p = make_problem(model_kind, case)
    if not offers(backend, structure, model_kind):
        assert_unsupported(backend, structure, p, model_kind)
        return
    kind = KINDS[name(backend)]
    loss, curvature = cell(backend, structure, model_kind, case)
    torch.testing.assert_close(loss, total_loss(p.reference, p.x_reference, p.y, p.likelihood))
    if structure == "kron":
        expected = kfac_reference(model_kind, case, kind)
        blocks = kron_blocks(curvature)
        assert len(blocks) == len(expected)
        for block, reference in zip(blocks, expected):
            torch.testing.assert_close(block, reference, **TOL)
        return
    expected = dense_reference(model_kind, case, kind)
    if structure == "diag":
        expected = expected.diagonal()
    torch.testing.assert_close(curvature, expected, **TOL)


class SequenceModel(DictModel):
    """``DictModel`` whose first Linear layer acts on every position (weight sharing ``R``)."""

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        hidden = self.head[:2](self.embed(batch["input_ids"]))
        return self.head[2](hidden.mean(dim=1))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if offers(b, "kron", "dict")], ids=name)
def test_kron_of_a_layer_shared_over_positions(backend, case):
    """K-FAC of a Linear applied to ``SEQ_LEN`` positions per sample (the "expand" case of
    sequence models and LoRA adapters): ``A`` averages over samples and positions."""
    likelihood, n_out = CASES[case]
    model = SequenceModel(n_out)
    p = make_problem("dict", case)
    reference = TensorView(model)
    factors = naive_kfac(reference, p.x_reference, p.y, likelihood, KINDS[name(backend)], N_DATA)
    _, kron = backend(model, likelihood).kron(p.x, p.y, N=N_DATA)
    for block, expected in zip(kron_blocks(kron), kfac_blocks(factors), strict=True):
        torch.testing.assert_close(block, expected, **TOL)


# ---------------------------------------------------------------------------- pairwise
QUANTITIES = (
    "jacobians",
    "gradients",
    *(f"{kind}-{s}" for kind in ("ggn", "ef") for s in STRUCTURES),
    "hessian-full",
    "hessian-diag",
)


def quantity(backend: type, what: str, model_kind: str, case: str) -> list[Tensor]:
    """The tensors of a quantity: ``[Js, f]``, ``[Gs, loss]`` or loss and curvature factors."""
    if what in ("jacobians", "gradients"):
        p = make_problem(model_kind, case)
        curvature = backend(p.model, p.likelihood)
        if what == "jacobians":
            return list(curvature.jacobians(p.x))
        return list(curvature.gradients(p.x, p.y))
    loss, curvature = cell(backend, what.split("-")[1], model_kind, case)
    if hasattr(curvature, "kfacs"):
        return [loss, *(factor for factors in curvature.kfacs for factor in factors)]
    return [loss, curvature]


def providers(what: str, model_kind: str) -> list[type]:
    if what in ("jacobians", "gradients"):
        return [b for b in BACKENDS if takes_model(b, model_kind)]
    kind, structure = what.split("-")
    return [b for b in BACKENDS if KINDS[name(b)] == kind and offers(b, structure, model_kind)]


@pytest.mark.parametrize("model_kind", MODELS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("what", QUANTITIES)
def test_every_pair_of_backends_agrees(what, case, model_kind):
    able = providers(what, model_kind)
    if len(able) < 2:
        pytest.skip(f"only {[name(b) for b in able]} compute {what} for the {model_kind} model")
    p = make_problem(model_kind, case)
    results = {b: quantity(b, what, model_kind, case) for b in able}
    if what == "jacobians":
        reference = [dense_jacobians(p.reference, p.x_reference), p.reference(p.x_reference)]
    elif what == "gradients":
        G = per_sample_gradients(p.reference, p.x_reference, p.y, p.likelihood)
        reference = [G, total_loss(p.reference, p.x_reference, p.y, p.likelihood)]
    else:
        reference = None
    for first, second in [(a, b) for i, a in enumerate(able) for b in able[i + 1 :]]:
        assert len(results[first]) == len(results[second])
        for mine, theirs in zip(results[first], results[second]):
            msg = f"{name(first)} and {name(second)} disagree on {what}"
            torch.testing.assert_close(mine, theirs, **TOL, msg=msg)
    for b in able if reference is not None else ():
        for mine, expected in zip(results[b], reference):
            torch.testing.assert_close(mine, expected.detach(), **TOL, msg=name(b))


# ---------------------------------------------------------------------------- Monte Carlo
SAMPLED = [  # every GGN backend takes stochastic=True, for each structure it declares
    pytest.param(b, s, id=f"{name(b)}-{s}")
    for b in BACKENDS
    for s in STRUCTURES
    if KINDS[name(b)] == "ggn" and offers(b, s, "mlp")
]
SAMPLES_FEW, SAMPLES_MANY = 1, 100


def relative_error(estimate: Tensor, exact: Tensor) -> float:
    return ((estimate - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("case", ["classification", "regression-3out"])
@pytest.mark.parametrize(("backend", "structure"), SAMPLED)
def test_sampled_ggn_converges_to_exact(backend, structure, case):
    p = make_problem("mlp", case)
    if structure == "kron":
        exact = torch.block_diag(*kfac_reference("mlp", case, "ggn"))
    else:
        exact = dense_reference("mlp", case, "ggn")
        exact = exact.diagonal() if structure == "diag" else exact

    def error(num_samples: int) -> float:
        generator = torch.Generator().manual_seed(0)
        _, estimate = compute(
            backend, structure, p, stochastic=True, num_samples=num_samples, generator=generator
        )
        if structure == "kron":
            estimate = torch.block_diag(*kron_blocks(estimate))
        return relative_error(estimate, exact)

    few, many = error(SAMPLES_FEW), error(SAMPLES_MANY)
    # the error shrinks like 1/sqrt(samples), by 10x here; measured: 0.02-0.12 at 100
    assert many < 0.2, many
    assert many < 0.5 * few, (few, many)


# ---------------------------------------------------------------------------- backprop
def input_gradient(backend: type, p: Problem) -> Tensor:
    """Gradient w.r.t. the input of a fixed random linear functional of ``(Js, f)``."""
    x = p.x.clone().requires_grad_(True)
    Js, f = backend(p.model, p.likelihood).jacobians(x, enable_backprop=True)
    w_js = torch.randn(Js.shape, generator=torch.Generator().manual_seed(3))
    w_f = torch.randn(f.shape, generator=torch.Generator().manual_seed(4))
    (grad,) = torch.autograd.grad((w_js * Js).sum() + (w_f * f).sum(), x)
    return grad


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
@backends
def test_backprop_through_jacobians_gives_the_same_input_gradient(backend, model_kind):
    p = make_problem(model_kind, "regression-3out")
    if not backend.supports_backprop:
        with pytest.raises(NotImplementedError, match="enable_backprop"):
            input_gradient(backend, p)
        return
    expected = input_gradient(GGNInterface, p)
    assert expected.abs().max() > 0
    torch.testing.assert_close(input_gradient(backend, p), expected, **TOL)


# ---------------------------------------------------------------------------- side effects
@backends
def test_backend_leaves_the_model_as_it_was(backend):
    p = make_problem("mlp", "classification")
    curvature = backend(p.model, p.likelihood)
    for structure in backend.structures:
        getattr(curvature, structure.value)(p.x, p.y, N=N_DATA)
    curvature.jacobians(p.x)
    curvature.gradients(p.x, p.y)
    for param_name, param in p.model.named_parameters():
        assert param.grad is None and vars(param) == {}, (param_name, vars(param))
    for module in p.model.modules():
        # fails if a regular (non-full) backward hook was ever left registered on the module
        module.register_full_backward_hook(lambda *args: None).remove()


# ---------------------------------------------------------------------------- Laplace classes
LAPLACE_CLASSES = {"full": FullLaplace, "kron": KronLaplace, "diag": DiagLaplace}
PRIOR_PRECISION, SIGMA_NOISE = 2.0, 0.8
N_FIT, FIT_BATCH, N_TEST, N_POSTERIOR_SAMPLES = 12, 5, 4, 2000


def noise(p: Problem) -> float:
    return SIGMA_NOISE if p.likelihood == "regression" else 1.0


@functools.cache
def map_parameters(case: str) -> tuple[Tensor, ...]:
    """MLP parameters at the MAP of ``loss / sigma^2 + prior / 2 |theta|^2`` (L-BFGS), where
    the loss Hessian plus the prior is positive definite, as a Laplace approximation needs."""
    p = make_problem("mlp", case, n=N_FIT)
    params = list(p.model.parameters())
    optimizer = torch.optim.LBFGS(params, max_iter=200, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        value = loss_fn(p.model(p.x), p.y, p.likelihood) / noise(p) ** 2
        value = value + 0.5 * PRIOR_PRECISION * sum(param.square().sum() for param in params)
        value.backward()
        return value

    optimizer.step(objective)
    return tuple(param.detach().clone() for param in params)


def map_problem(case: str) -> Problem:
    p = make_problem("mlp", case, n=N_FIT)
    with torch.no_grad():
        for param, value in zip(p.model.parameters(), map_parameters(case)):
            param.copy_(value)
    return p


@functools.cache
def expected_curvature(kind: str, structure: str, case: str) -> Tensor:
    """Dense ``H`` of the whole data set at the MAP, fitted in batches of ``FIT_BATCH``."""
    p = map_problem(case)
    if structure != "kron":
        H = DENSE_REFERENCES[kind](p.model, p.x, p.y, p.likelihood)
        return torch.diag(H.diagonal()) if structure == "diag" else H
    batches = [
        naive_kfac(
            p.model, p.x[i : i + FIT_BATCH], p.y[i : i + FIT_BATCH], p.likelihood, kind, N_FIT
        )
        for i in range(0, N_FIT, FIT_BATCH)
    ]
    summed = [[sum(factors) for factors in zip(*blocks)] for blocks in zip(*batches)]
    return torch.block_diag(*kfac_blocks(summed))


def closed_form_log_marglik(p: Problem, P: Tensor) -> Tensor:
    """``log p(D | theta) - 0.5 (log det P - log det P0 + theta^T P0 theta)``, prior mean 0."""
    with torch.no_grad():
        f = p.model(p.x)
    if p.likelihood == "classification":
        log_lik = -nn.functional.cross_entropy(f, p.y, reduction="sum")
    else:
        log_lik = torch.distributions.Normal(f, noise(p)).log_prob(p.y).sum()
    theta = torch.cat([param.detach().flatten() for param in p.model.parameters()])
    P0 = PRIOR_PRECISION * torch.eye(len(theta))
    log_det_ratio = torch.logdet(P) - torch.logdet(P0)
    return log_lik - 0.5 * (log_det_ratio + theta @ P0 @ theta)


@functools.cache
def map_jacobians(case: str) -> Tensor:
    p = map_problem(case)
    return dense_jacobians(p.model, p.x[:N_TEST])


def check_glm_predictive(la, p: Problem, P: Tensor, case: str) -> None:
    """``la``'s GLM predictive against ``N(f, J P^-1 J^T)`` with dense Jacobians."""
    x_test = p.x[:N_TEST]
    Js = map_jacobians(case)
    f_var = Js @ torch.linalg.solve(P, Js.transpose(1, 2))
    with torch.no_grad():
        f_mu = p.model(x_test)
    if p.likelihood == "regression":
        mean, var = la(x_test, pred_type="glm")
        torch.testing.assert_close(var, f_var, atol=1e-9, rtol=1e-7)
    else:
        mean = la(x_test, pred_type="glm", link_approx="probit")
        kappa = torch.rsqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
        f_mu = torch.softmax(kappa * f_mu, dim=-1)
    torch.testing.assert_close(mean, f_mu, atol=1e-9, rtol=1e-7)


def check_samples(la, P: Tensor) -> None:
    """Posterior samples have mean ``theta_MAP`` and covariance ``P^-1``, within statistical
    tolerances: 5 standard errors for the mean; for the sample covariance ``S`` of ``n``
    Gaussian draws, ``E |S - C|_F^2 = ((tr C)^2 + |C|_F^2) / n``, allowed three times over."""
    samples = la.sample(N_POSTERIOR_SAMPLES, generator=torch.Generator().manual_seed(0))
    cov = torch.linalg.inv(P)
    stderr = (cov.diagonal() / N_POSTERIOR_SAMPLES).sqrt()
    assert ((samples.mean(0) - la.mean).abs() < 5 * stderr).all()
    expected_error = ((cov.trace() ** 2 + cov.square().sum()) / N_POSTERIOR_SAMPLES).sqrt()
    assert (torch.cov(samples.T) - cov).norm() < 3 * expected_error


def check_prior_tuning(la, p: Problem, backend: type) -> None:
    """Marglik tuning improves the marginal likelihood. An indefinite Hessian makes it
    unbounded (towards singular P), so Hessian backends tune by grid search above the prior."""
    before = la.log_marginal_likelihood(torch.tensor(PRIOR_PRECISION)).item()
    if backend.psd_curvature:
        la.optimize_prior_precision(n_steps=20, init_prior_prec=PRIOR_PRECISION)
        assert la.log_marginal_likelihood().item() >= before - 1e-9
    else:
        val_loader = DataLoader(TensorDataset(p.x, p.y), batch_size=FIT_BATCH)
        log_min = math.log10(PRIOR_PRECISION)
        la.optimize_prior_precision(
            method="gridsearch", val_loader=val_loader, log_prior_prec_min=log_min, grid_size=3
        )
        assert PRIOR_PRECISION - 1e-9 <= la.prior_precision.item() <= 1e4 + 1e-6
    assert torch.isfinite(la.log_marginal_likelihood())


@pytest.mark.parametrize("case", ["classification", "regression-3out"])
@pytest.mark.parametrize("structure", LAPLACE_CLASSES)
@backends
def test_laplace_with_every_backend(backend, structure, case):
    p = map_problem(case)
    laplace_cls = LAPLACE_CLASSES[structure]
    kwargs = {"sigma_noise": noise(p), "prior_precision": PRIOR_PRECISION, "backend": backend}
    if structure not in {s.value for s in backend.structures}:
        with pytest.raises(ValueError, match=structure) as info:
            laplace_cls(p.model, p.likelihood, **kwargs)
        for able in BACKENDS:
            if structure in {s.value for s in able.structures}:
                assert name(able) in str(info.value)
        return
    la = laplace_cls(p.model, p.likelihood, **kwargs)
    la.fit(DataLoader(TensorDataset(p.x, p.y), batch_size=FIT_BATCH))
    H = la._curvature.to_dense()
    torch.testing.assert_close(
        H, expected_curvature(KINDS[name(backend)], structure, case), atol=1e-9, rtol=1e-8
    )
    P = H / noise(p) ** 2 + PRIOR_PRECISION * torch.eye(len(H))
    lml = closed_form_log_marglik(p, P)
    torch.testing.assert_close(la.log_marginal_likelihood(), lml, atol=1e-8, rtol=1e-8)
    check_glm_predictive(la, p, P, case)
    check_samples(la, P)
    check_prior_tuning(la, p, backend)
