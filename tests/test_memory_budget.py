"""The memory budget: Jacobian predictives in blocks, Jacobian-free beyond it, clear errors.

Truth: the same approximation's moments with the default budget (whole batches), which the
kernel and predictive tests check against brute-force float64 Jacobians; and, for the
Jacobian-free path, the dense ``J P^-1 J^T`` from ``torch.func`` within Monte Carlo error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from groundtruth import dense_jacobians
from torch.utils.data import DataLoader, TensorDataset

from laplace import FunctionalLaplace, Laplace
from laplace.utils import memory
from laplace.utils.memory import MemoryBudgetError, memory_budget


def fitted(model, likelihood, subset, structure, x, y):
    kwargs = {}
    if subset == "subnetwork":
        n_params = sum(p.numel() for p in model.parameters())
        kwargs["subnetwork_indices"] = torch.arange(0, n_params, 2)
    la = Laplace(
        model, likelihood, subset_of_weights=subset, hessian_structure=structure, **kwargs
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=8))
    return la


def bytes_per_input(la) -> int:
    return la.n_outputs * la.n_params * 8


CASES = [("all", "full"), ("all", "lowrank"), ("subnetwork", "full"), ("subnetwork", "diag")]


@pytest.mark.parametrize("subset,structure", CASES, ids=[f"{s}-{h}" for s, h in CASES])
def test_blocks_of_inputs_give_the_whole_batch_moments(subset, structure):
    model = make_mlp(n_out=3)
    x, y = make_data("regression", n=20, n_out=3)
    la = fitted(model, "regression", subset, structure, x, y)
    f_mu, f_var = la(x, pred_type="glm")
    f_joint, cov = la(x, pred_type="glm", joint=True)
    with memory_budget(3 * bytes_per_input(la)):  # blocks of 3 (joint: kernel blocks of 1)
        blocked_mu, blocked_var = la(x, pred_type="glm")
        blocked_joint, blocked_cov = la(x, pred_type="glm", joint=True)
    torch.testing.assert_close(blocked_mu, f_mu)
    torch.testing.assert_close(blocked_var, f_var)
    torch.testing.assert_close(blocked_joint, f_joint)
    torch.testing.assert_close(blocked_cov, cov)


def test_blocked_path_never_exceeds_the_budget(monkeypatch):
    """Every Jacobian the predictive forms under the budget holds at most budget bytes."""
    model = make_mlp(n_out=3)
    x, y = make_data("classification", n=30, n_out=3)
    la = fitted(model, "classification", "all", "full", x, y)
    budget = 4 * bytes_per_input(la)
    sizes = []
    original = la.subset.jacobians

    def recording(*args, **kwargs):
        Js, f = original(*args, **kwargs)
        sizes.append(Js.numel() * Js.element_size())
        return Js, f

    monkeypatch.setattr(la.subset, "jacobians", recording)
    with memory_budget(budget):
        la(x, pred_type="glm", link_approx="mc", n_samples=10)
        la.posterior_kernel(batch_size=100)(x)
    assert sizes and max(sizes) <= budget


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag", "lowrank"])
def test_jacobian_free_predictive_within_monte_carlo_error(model_kind, structure):
    """Beyond the budget for one input, the covariance of ``J delta_s`` over 4,000 seeded
    samples: within 5 standard errors (``sqrt(2 / S)`` of ``sqrt(var_c var_d)``) of the dense
    ``J P^-1 J^T``; the mean is the network output exactly."""
    if model_kind == "mlp":
        model, (x, y) = make_mlp(n_out=3), make_data("classification", n=12, n_out=3)
    else:
        model = make_cnn(n_out=3)
        x, y = make_data("classification", n=12, n_out=3, image=True)
    la = fitted(model, "classification", "all", structure, x, y)
    Js = dense_jacobians(model, x)
    P = la.posterior.to_dense()
    truth = torch.einsum("bcp,pq,bdq->bcd", Js, torch.linalg.inv(P), Js)
    S = 4000
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(memory._state, "samples", S)
    try:
        with memory_budget(bytes_per_input(la) - 1):
            f_mu, f_var = la._glm_predictive_distribution(x)
            again = la._glm_predictive_distribution(x)[1]
    finally:
        monkeypatch.undo()
    torch.testing.assert_close(f_mu, model(x).detach())
    assert torch.equal(f_var, again)  # a fixed seed: the same inputs, the same moments
    sd = truth.diagonal(dim1=1, dim2=2).sqrt()
    scale = sd.unsqueeze(-1) * sd.unsqueeze(-2)
    assert ((f_var - truth).abs() / scale).max() < 5 * (2 / S) ** 0.5


def test_budget_errors_name_the_budget():
    model = make_mlp(n_out=3)
    x, y = make_data("classification", n=12, n_out=3)
    sod = FunctionalLaplace(model, "classification", n_subset=8)
    sod.fit(DataLoader(TensorDataset(x, y), batch_size=6))
    with memory_budget(100), pytest.raises(MemoryBudgetError, match="memory budget of"):
        sod(x)
    with memory_budget(100), pytest.raises(MemoryBudgetError, match="kernel"):
        sod.posterior_kernel()(x)
    with pytest.raises(ValueError, match="positive number of bytes"):
        memory.set_memory_budget(0)
    with pytest.raises(ValueError, match="at least 2"):
        memory.set_glm_sample_count(1)
    memory.set_memory_budget(12345)
    assert memory.get_memory_budget() == 12345
    memory.set_memory_budget(None)
    assert memory.get_memory_budget() == memory.DEFAULT_BUDGET


def test_function_space_blocks_give_the_whole_batch_moments():
    model = make_mlp(n_out=2)
    x, y = make_data("regression", n=16, n_out=2)
    sod = FunctionalLaplace(model, "regression", n_subset=10)
    sod.fit(DataLoader(TensorDataset(x, y), batch_size=8))
    f_mu, f_var = sod(x)
    _, cov = sod(x, joint=True)
    with memory_budget(4 * 2 * sod.n_params * 8):
        blocked_mu, blocked_var = sod(x)
        _, blocked_cov = sod(x, joint=True)
    torch.testing.assert_close(blocked_mu, f_mu)
    torch.testing.assert_close(blocked_var, f_var)
    torch.testing.assert_close(blocked_cov, cov)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_low_rank_dense_and_matrix_free_routes_agree(likelihood, monkeypatch):
    """Under the budget the dense curvature is summed once and never passed over again;
    with a budget too small for it, the matrix-free Lanczos passes run. Both give the top
    eigenpairs of the same GGN (checked against ``torch.linalg.eigh`` of the dense truth)."""
    from groundtruth import dense_ggn

    import laplace.lowrank as lowrank

    model = make_mlp(n_out=2)
    x, y = make_data(likelihood, n=30, n_out=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    def refuse(*args, **kwargs):
        raise AssertionError("the dense route passed over the data again")

    with monkeypatch.context() as patch:
        patch.setattr(lowrank, "curvature_matvec", refuse)
        dense = Laplace(model, likelihood, "all", "lowrank", n_eigenvalues=5)
        dense.fit(loader)
    with memory_budget(1024):
        free = Laplace(model, likelihood, "all", "lowrank", n_eigenvalues=5)
        free.fit(loader)
    truth = torch.linalg.eigvalsh(dense_ggn(model, x, y, likelihood)).flip(0)[:5]
    for la in (dense, free):
        (_, eigenvalues), _ = la.posterior_precision
        torch.testing.assert_close(eigenvalues, truth, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense.log_marginal_likelihood(), free.log_marginal_likelihood())
    torch.testing.assert_close(dense.loss, free.loss)


class ReusedLayerMLP(torch.nn.Module):
    """An MLP that applies one hidden layer twice: a layer that runs twice has no Jacobian
    factors, so Kron and diagonal posteriors have no factored predictive (K-FAC still fits
    it, with curvlinops' operator)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.hidden, self.last = (
            torch.nn.Linear(3, 5),
            torch.nn.Linear(5, 5),
            torch.nn.Linear(5, 3),
        )
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        h = torch.tanh(self.hidden(torch.tanh(self.hidden(h))))
        return self.last(h)


EXACT_CASES = [
    ("all", "full", "mlp"),
    ("all", "lowrank", "mlp"),
    ("subnetwork", "full", "mlp"),
    ("all", "kron", "reused"),
    ("all", "diag", "reused"),
    ("all", "kron", "mlp"),
    ("all", "diag", "mlp"),
]


@pytest.mark.parametrize("subset,structure,model_kind", EXACT_CASES, ids=str)
def test_exact_marginal_variances_from_a_few_outputs_at_a_time(
    subset, structure, model_kind, monkeypatch
):
    """When one input's Jacobian exceeds the budget but two output rows fit, the marginal
    variances (probit, diagonal outputs) are exact: the dense ``diag(J P^-1 J^T)`` with
    brute-force Jacobians; no full Jacobian is formed. They come from rows of two outputs at
    a time, or (all-weights Kron and diag of a network with Jacobian factors) layer by layer;
    a Kron or diag posterior of a network without factors (a reused layer) takes the rows too,
    not the Monte Carlo estimate of the joint covariance."""
    model = make_mlp(n_out=3) if model_kind == "mlp" else ReusedLayerMLP()
    x, y = make_data("classification", n=10, n_out=3)
    la = fitted(model, "classification", subset, structure, x, y)
    Js = dense_jacobians(model, x)
    if subset == "subnetwork":
        Js = Js[:, :, la.backend.subnetwork_indices]
    truth = torch.einsum("bcp,pq,bcq->bc", Js, torch.linalg.inv(la.posterior.to_dense()), Js)

    def refuse(*args, **kwargs):
        raise AssertionError("formed a whole Jacobian")

    monkeypatch.setattr(la.subset, "jacobians", refuse)
    with memory_budget(2 * 2 * la.n_params * 8):  # two rows and their temporaries
        f_mu, f_var = la._glm_predictive_diagonal(x)
        probs = la(x, link_approx="probit")
    torch.testing.assert_close(f_var, truth)
    torch.testing.assert_close(f_mu, model(x).detach())
    kappa = 1 / torch.sqrt(1 + torch.pi / 8 * truth)
    torch.testing.assert_close(probs, torch.softmax(kappa * f_mu, -1))


def test_low_rank_progress_bar_counts_the_lanczos_passes(capsys):
    model = make_mlp(n_out=1)
    x, y = make_data("regression", n=20, n_out=1)
    with memory_budget(1024):  # the matrix-free route: one pass per Lanczos step
        la = Laplace(model, "regression", "all", "lowrank", n_eigenvalues=3)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=5), progress_bar=True)
    err = capsys.readouterr().err
    assert "Lanczos" in err and f"/{la.lanczos_max_iter}" in err


def test_float32_budgeted_predictives_against_float64_truth():
    """A float32 ReLU MLP (dead units, prior 1e-3): blocked Jacobians and output-chunked
    exact variances against the truth from the same weights and data upcast to float64 and
    the same posterior precision, within the float32 predictive target of 1e-3 relative
    (``TARGETS["var"]`` of tests/test_float32.py; the products with the factors run in
    float32, see laplace/utils/precision.py)."""
    from float32_truth import make_data as make_data32
    from float32_truth import relu_mlp, scaled_error

    model = relu_mlp(4, 3, seed=0)
    x, y = make_data32("classification", 40, 3, (4,), seed=1)
    la = Laplace(model, "classification", "all", "full", prior_precision=1e-3)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=10))
    J64 = dense_jacobians(relu_mlp(4, 3, seed=0).double(), x.double())
    P = la.posterior.to_dense().double()
    truth = torch.einsum("bcp,pq,bdq->bcd", J64, torch.linalg.inv(P), J64)
    per_input = 2 * 3 * la.n_params * 4
    with memory_budget(5 * per_input):  # blocks of 5 inputs
        _, blocked = la._glm_predictive_distribution(x)
    with memory_budget(per_input - 1):  # one output row at a time, exact
        _, marginal = la._glm_predictive_diagonal(x)
    assert blocked.dtype == marginal.dtype == torch.float32
    assert scaled_error(blocked, truth) <= 1e-3
    rel = (marginal.double() - truth.diagonal(dim1=1, dim2=2)).abs() / truth.diagonal(
        dim1=1, dim2=2
    )
    assert rel.max() <= 1e-3


@pytest.mark.parametrize("structure", ["full", "lowrank", "diag", "kron"])
def test_float32_jacobian_free_predictive_against_float64_truth(structure, monkeypatch):
    """float32 networks (full, low rank: a ReLU MLP with dead units and more parameters
    than points; Kron, diag: an MLP with a reused layer, which has no factored predictive),
    prior 1e-2, beyond the single-input budget: the forward-mode samples run in float32
    and their covariance is within Monte Carlo error (5 standard errors for 4,000 samples, 0.11 of
    ``sqrt(var_c var_d)``) of the truth from the same weights, data and posterior precision
    in float64; float32 round-off (~1e-6 relative) is far below that, so a bias of the
    float32 products beyond it would show. The mean is the float32 network output."""
    from float32_truth import make_data as make_data32
    from float32_truth import relu_mlp

    # Kron and diag have a factored predictive for the ReLU MLP: take a network without
    # factors for them (a reused layer), so that the samples run
    if structure in ("full", "lowrank"):
        model, x = relu_mlp(4, 3, seed=0), make_data32("classification", 20, 3, (4,), seed=1)[0]
    else:
        model, x = ReusedLayerMLP().float(), make_data32("classification", 20, 3, (3,), 1)[0]
    y = model(x).argmax(-1).detach()
    la = Laplace(model, "classification", "all", structure, prior_precision=1e-2)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=10))
    J64 = dense_jacobians(copy.deepcopy(model).double(), x.double())
    P = la.posterior.to_dense().double()
    truth = torch.einsum("bcp,pq,bdq->bcd", J64, torch.linalg.inv(P), J64)
    S = 4000
    monkeypatch.setitem(memory._state, "samples", S)
    sampled = []
    original = la._sampled_moments
    monkeypatch.setattr(la, "_sampled_moments", lambda *a: sampled.append(1) or original(*a))
    with memory_budget(2 * 3 * la.n_params * 4 - 1):
        f_mu, f_var = la._glm_predictive_distribution(x)
    assert sampled  # the Jacobian-free path ran
    assert f_var.dtype == torch.float32
    torch.testing.assert_close(f_mu, model(x).detach())
    sd = truth.diagonal(dim1=1, dim2=2).sqrt()
    scale = sd.unsqueeze(-1) * sd.unsqueeze(-2)
    assert ((f_var.double() - truth).abs() / scale).max() < 5 * (2 / S) ** 0.5


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_float32_exact_rows_for_kron_and_diag_without_factors(structure, monkeypatch):
    """A float32 network without Jacobian factors (a reused layer), prior 1e-2, one output
    row at a time beyond the single-input budget: the marginal variances against the truth
    from the same weights, data and posterior precision in float64, within the float32
    predictive target of 1e-3 relative (``TARGETS["var"]`` of tests/test_float32.py)."""
    from float32_truth import make_data as make_data32

    model = ReusedLayerMLP().float()
    x = make_data32("classification", 20, 3, (3,), seed=2)[0]
    y = model(x).argmax(-1).detach()
    la = Laplace(model, "classification", "all", structure, prior_precision=1e-2)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=10))
    J64 = dense_jacobians(copy.deepcopy(model).double(), x.double())
    P = la.posterior.to_dense().double()
    truth = torch.einsum("bcp,pq,bcq->bc", J64, torch.linalg.inv(P), J64)
    with memory_budget(2 * 3 * la.n_params * 4 - 1):
        _, marginal = la._glm_predictive_diagonal(x)
    assert marginal.dtype == torch.float32
    assert ((marginal.double() - truth).abs() / truth).max() <= 1e-3
