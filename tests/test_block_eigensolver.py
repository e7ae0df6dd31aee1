"""Randomized subspace iteration: block products, a fixed number of data passes.

Ground truth: ``torch.linalg.eigh`` of the dense float64 GGN built by brute force from
per-sample ``torch.func.jacrev`` Jacobians (``tests/groundtruth.py``), and the dense-route
``LowRankLaplace`` (one pass sums the dense GGN, Lanczos in memory to ``eps ** 0.75``).

Tolerances follow from the convergence of subspace iteration (``laplace/curvature/
subspace.py``): after ``q`` products the angle between an eigenvector ``j <= k`` and the
block shrinks like ``(lambda_{b+1} / lambda_j)^q`` (``b = k + oversampling``), the Ritz value
error like its square. :func:`power_iterations` picks ``q`` from the true spectrum so that
``(lambda_{b+1} / lambda_k)^q`` is below a target; each test derives its tolerances from
that target, the random start's constant (``tan`` of its angle, about ``sqrt(n / b)``) and
the gap between ``lambda_k`` and ``lambda_{k+1}``.
"""

from __future__ import annotations

import copy
import datetime
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_data, make_mlp
from groundtruth import dense_ggn
from torch import Tensor, nn
from torch import distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from laplace import Laplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian
from laplace.curvature.subspace import subspace_eigh, subspace_passes
from laplace.lowrank import LowRankLaplace
from laplace.utils.enums import Eigensolver
from laplace.utils.memory import memory_budget

K = 3
OVERSAMPLING = 10


def matrix_free(n_params: int) -> memory_budget:
    """A budget half of what the dense float64 curvature needs: the matrix-free route
    (``LowRankLaplace._dense_route``), with room for the Jacobian rows of ``fit``."""
    return memory_budget(n_params * n_params * 8)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)).double()


def case(name: str, likelihood: str) -> tuple[nn.Module, Tensor, Tensor]:
    """A 5-20-3 tanh MLP (183 parameters) on 100 points or a conv-tanh-linear CNN (235
    parameters) on 60 images of 6x6."""
    if name == "mlp":
        return make_mlp(n_in=5, n_hidden=20, n_out=3), *make_data(likelihood, 100, 5, 3)
    return small_cnn(), *make_data(likelihood, 60, n_out=3, image=True)


class CountingLoader:
    """A data loader that counts the complete passes over it (not the iterators made, nor a
    first batch peeked at: ``curvlinops`` looks at one when building an operator)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int = 16) -> None:
        self.loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        self.dataset = self.loader.dataset
        self.passes = 0

    def __iter__(self):
        yield from self.loader
        self.passes += 1

    def __len__(self) -> int:
        return len(self.loader)


def truth(model: nn.Module, x: Tensor, y: Tensor, likelihood: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of the brute-force dense GGN."""
    values, vectors = torch.linalg.eigh(dense_ggn(model, x, y, likelihood))
    return values.flip(0), vectors.flip(1)


@functools.cache
def case_truth(name: str, likelihood: str) -> tuple[Tensor, Tensor]:
    """:func:`truth` of :func:`case`, computed once per case."""
    return truth(*case(name, likelihood), likelihood)


def power_iterations(values: Tensor, target: float, k: int = K) -> int:
    """The smallest ``q`` with ``(lambda_{b+1} / lambda_k)^q <= target``."""
    ratio = (values[k + OVERSAMPLING] / values[k - 1]).item()
    return max(1, math.ceil(math.log(target) / math.log(ratio)))


def sin_largest_angle(U: Tensor, V: Tensor) -> float:
    """Sine of the largest principal angle between the column spans of orthonormal
    ``U`` and ``V`` of the same shape."""
    return torch.linalg.matrix_norm(U - V @ (V.T @ U), ord=2).item()


def fit_subspace(model, x, y, likelihood, q: int, **kwargs) -> tuple[LowRankLaplace, int]:
    """``LowRankLaplace`` by subspace iteration on the matrix-free route, and its passes
    over the data."""
    la = LowRankLaplace(
        model, likelihood, n_eigenvalues=K, eigensolver="subspace", n_power_iterations=q, **kwargs
    )
    loader = CountingLoader(x, y)
    with matrix_free(la.n_params):
        la.fit(loader)
    return la, loader.passes


# ----------------------------------------------------------------------------- GGN truth
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_eigenpairs_and_passes_match_the_dense_ggn(name, likelihood):
    """Eigenvalues to rtol 1e-9, the span to 1e-5, exactly ``q + 1`` passes over the data
    after the loss pass, and the residuals as reported.

    ``q`` makes ``(lambda_{b+1} / lambda_k)^q <= 1e-7``: the Ritz value error is bounded by
    its square times ``tan^2`` of the start block's angle (about ``n / b``, 20 here), so
    about 2e-13; the span's angle by ``1e-7`` times ``tan`` of that angle (4) and
    ``lambda_k / (lambda_k - lambda_{k+1})`` (18 for the closest gap here), about 7e-6
    at worst."""
    model, x, y = case(name, likelihood)
    values, vectors = case_truth(name, likelihood)
    q = power_iterations(values, 1e-7)
    la, passes = fit_subspace(model, x, y, likelihood, q)
    assert passes == 1 + q + 1 == 1 + subspace_passes(la.n_params, K, OVERSAMPLING, q)
    U, eigenvalues = la._curvature.eigenvectors, la._curvature.eigenvalues
    torch.testing.assert_close(eigenvalues, values[:K], rtol=1e-9, atol=0)
    assert sin_largest_angle(U, vectors[:, :K]) < 1e-5
    torch.testing.assert_close(U.T @ U, torch.eye(K), atol=1e-12, rtol=0)
    G = (vectors * values) @ vectors.T  # the dense GGN to round-off (n eps ~ 5e-14)
    residuals = (G @ U - U * eigenvalues).norm(dim=0) / eigenvalues[0]
    torch.testing.assert_close(la.eigenpair_residuals, residuals, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("q", [1, 2], ids=["q1", "q2"])
def test_few_power_iterations_residuals_bound_the_error(q):
    """Unconverged pairs: an eigenvalue of ``H`` lies within ``r_j * lambda_1`` of each Ritz
    value ``theta_j`` (``r_j`` the reported relative residual; Bauer-Fike for a symmetric
    ``H``), here the ``j``-th one; the Ritz values are below the eigenvalues (Cauchy
    interlacing); two more passes lower the error."""
    model, x, y = case("cnn", "classification")
    values, _ = case_truth("cnn", "classification")
    errors = []
    for passes in (q, q + 2):
        la, _ = fit_subspace(model, x, y, "classification", passes)
        error = (la._curvature.eigenvalues - values[:K]).abs()
        assert bool((error <= la.eigenpair_residuals * values[0] * (1 + 1e-9)).all())
        assert bool((la._curvature.eigenvalues <= values[:K] * (1 + 1e-12)).all())  # Cauchy
        errors.append(error.max())
    assert errors[1] < errors[0]


# ----------------------------------------------------------------------------- Laplace
def test_laplace_matches_the_dense_route(likelihood):
    """Marginal likelihood and GLM predictive of the subspace fit equal those of the
    dense-route fit to rtol 1e-8 / 1e-7: ``q`` for a ``1e-10`` bound on the span's angle,
    which is the relative error of ``U diag(l) U^T`` within the rank (both are near 1e-12
    measured)."""
    model, x, y = case("mlp", likelihood)
    values, _ = case_truth("mlp", likelihood)
    sigma = 0.7 if likelihood == "regression" else 1.0
    la, _ = fit_subspace(
        model, x, y, likelihood, power_iterations(values, 1e-10), sigma_noise=sigma
    )
    dense = LowRankLaplace(model, likelihood, n_eigenvalues=K, sigma_noise=sigma)
    dense.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    assert dense.eigenpair_residuals is None  # the dense route ran Lanczos
    for prior in (torch.tensor([0.5]), torch.linspace(0.5, 2.0, la.n_params)):
        torch.testing.assert_close(
            la.log_marginal_likelihood(prior),
            dense.log_marginal_likelihood(prior),
            rtol=1e-8,
            atol=0,
        )
    for got, expected in zip(
        la._glm_predictive_distribution(x[:7]), dense._glm_predictive_distribution(x[:7])
    ):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(la(x[:7]), dense(x[:7]), rtol=1e-7, atol=1e-12)


def test_float32_model_against_float64_truth():
    """A float32 model: the block and its products run in float64 on a float64 copy of the
    weights (``CurvatureInterface._promoted``), so the kept eigenpairs match the float64
    truth of the same weights to the convergence target (rtol 1e-9); what ``la.H`` returns
    is them rounded to float32 (unit round-off 6e-8; rtol 1e-6 and, for the vectors,
    atol 1e-6 of unit-norm columns)."""
    model, x, y = case("mlp", "regression")
    model, x, y = model.float(), x.float(), y.float()
    values, vectors = truth(copy.deepcopy(model).double(), x.double(), y.double(), "regression")
    la, _ = fit_subspace(model, x, y, "regression", power_iterations(values, 1e-9))
    torch.testing.assert_close(la._curvature.eigenvalues, values[:K], rtol=1e-9, atol=0)
    U, eigenvalues = la.H
    assert U.dtype == eigenvalues.dtype == torch.float32
    torch.testing.assert_close(eigenvalues, values[:K].float(), rtol=1e-6, atol=0)
    signs = torch.sign((U.double() * vectors[:, :K]).sum(0))
    torch.testing.assert_close(U * signs.float(), vectors[:, :K].float(), rtol=0, atol=1e-6)


def test_progress_bar_counts_the_block_passes(capsys):
    model, x, y = case("mlp", "regression")
    la, passes = fit_subspace(model, x, y, "regression", 2)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=16), progress_bar=True)
    err = capsys.readouterr().err
    assert "Subspace iteration" in err and "3/3" in err and passes == 4


def test_auto_picks_by_route_and_curvature():
    """``auto``: Lanczos on the dense route and for an indefinite Hessian; subspace
    iteration on the matrix-free route for a PSD curvature (here the EF)."""
    model, x, y = case("mlp", "classification")
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    dense = LowRankLaplace(model, "classification", n_eigenvalues=K, eigensolver="auto")
    dense.fit(loader)
    assert dense.eigensolver is Eigensolver.AUTO and dense.eigenpair_residuals is None
    for backend, subspace in ((CurvlinopsEF, True), (CurvlinopsHessian, False)):
        la = LowRankLaplace(
            model, "classification", backend=backend, n_eigenvalues=K, eigensolver="auto"
        )
        counting = CountingLoader(x, y, batch_size=50)
        with matrix_free(la.n_params):
            la.fit(counting)
        assert (la.eigenpair_residuals is not None) is subspace
        assert (counting.passes == 1 + 4) is subspace  # the default q = 3


def test_options_defaults_and_factory():
    model = make_mlp()
    la = LowRankLaplace(model, "classification")
    assert la.eigensolver is Eigensolver.LANCZOS
    assert (la.n_power_iterations, la.oversampling, la.eigenpair_residuals) == (3, 10, None)
    la = Laplace(
        model,
        "classification",
        "all",
        "lowrank",
        n_eigenvalues=2,
        backend_kwargs={"eigensolver": "subspace", "oversampling": 4},
        n_power_iterations=5,
    )
    assert la.eigensolver is Eigensolver.SUBSPACE
    assert (la.n_power_iterations, la.oversampling) == (5, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"eigensolver": "block"},
            "eigensolver must be one of 'lanczos', 'subspace', 'auto'; got 'block'",
        ),
        ({"n_power_iterations": 0}, "n_power_iterations must be an integer >= 1, got 0"),
        ({"n_power_iterations": 2.0}, "n_power_iterations must be an integer >= 1, got 2.0"),
        ({"n_power_iterations": True}, "n_power_iterations must be an integer >= 1, got True"),
        ({"oversampling": -1}, "oversampling must be an integer >= 0, got -1"),
        (
            {"eigensolver": "subspace", "backend": CurvlinopsHessian},
            "eigensolver='subspace' needs a positive semi-definite curvature",
        ),
        (
            {"oversampling": 2, "backend_kwargs": {"oversampling": 3}},
            "oversampling was given both",
        ),
    ],
    ids=["solver", "q_zero", "q_float", "q_bool", "p_negative", "hessian", "twice"],
)
def test_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankLaplace(make_mlp(), "classification", **kwargs)


# ----------------------------------------------------------------------------- solver
def _rotated(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return (Q * eigenvalues) @ Q.T


def test_solver_exact_cases_and_counts():
    """One product when the block spans everything; a matrix of rank below the block is
    exact after one power iteration; zero matrix; seeded; float32 blocks."""
    H = _rotated(torch.linspace(0.0, 4.0, 12))
    calls = []

    def product(V: Tensor) -> Tensor:
        calls.append(V.shape)
        return H @ V

    values, vectors, residuals = subspace_eigh(product, 12, 4, oversampling=8)
    assert calls == [(12, 12)]
    torch.testing.assert_close(values, torch.linspace(0.0, 4.0, 12).flip(0)[:4])
    assert residuals.max() < 1e-14 and vectors.shape == (12, 4)
    low_rank = _rotated(torch.cat([torch.tensor([5.0, 3.0, 2.0, 1.0]), torch.zeros(36)]))
    values, _, residuals = subspace_eigh(lambda V: low_rank @ V, 40, 3, n_power_iterations=1)
    torch.testing.assert_close(values, torch.tensor([5.0, 3.0, 2.0]), rtol=1e-13, atol=0)
    values, vectors, residuals = subspace_eigh(torch.zeros_like, 40, 3)
    assert torch.equal(values, torch.zeros(3)) and torch.equal(residuals, torch.zeros(3))
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(3))
    first, second = (
        subspace_eigh(lambda V: low_rank @ V, 40, 3, generator=torch.Generator().manual_seed(2))
        for _ in range(2)
    )
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    H32 = low_rank.float()
    values, vectors, residuals = subspace_eigh(lambda V: H32 @ V, 40, 3, dtype=torch.float32)
    assert values.dtype == vectors.dtype == residuals.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"k must be an integer in \[1, 5\]"),
        ({"k": 6}, r"k must be an integer in \[1, 5\]"),
        ({"k": 2, "oversampling": 1.5}, "oversampling must be an integer >= 0"),
        ({"k": 2, "n_power_iterations": 0}, "n_power_iterations must be an integer >= 1"),
    ],
    ids=["k0", "k_too_big", "oversampling", "power_iterations"],
)
def test_solver_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        subspace_eigh(lambda V: V, 5, **kwargs)


def test_solver_nan_product_raises():
    with pytest.raises(ValueError, match="NaN or Inf"):
        subspace_eigh(lambda V: V * math.nan, 30, 2)


# ----------------------------------------------------------------------------- ranks
WORLD = 2


def _rank_main(rank: int, store: str, out_dir: str) -> None:
    """One of two gloo ranks: a subspace fit on its half of the data, recording the
    shapes of every ``all_reduce``."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    shapes = []
    all_reduce = dist.all_reduce

    def recorded(tensor: Tensor, *args, **kwargs):
        shapes.append(tuple(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    try:
        model, x, y = case("mlp", "classification")
        dataset = TensorDataset(x, y)
        sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=False)
        la = LowRankLaplace(
            model, "classification", n_eigenvalues=K, eigensolver="subspace", n_power_iterations=4
        )
        dist.all_reduce = recorded
        with matrix_free(la.n_params):
            la.fit(DataLoader(dataset, batch_size=16, sampler=sampler))
        dist.all_reduce = all_reduce
        result = {
            "shapes": shapes,
            "H": la._curvature.to_dense(),
            "lml": la.log_marginal_likelihood(),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()


def test_distributed_fit_sums_each_block_product_once(tmp_path):
    """Two gloo ranks on halves of the data: one ``all_reduce`` of a ``(params, k + p)``
    block per pass, and the single-process posterior (to round-off of the summation
    order)."""
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    model, x, y = case("mlp", "classification")
    single = LowRankLaplace(
        model, "classification", n_eigenvalues=K, eigensolver="subspace", n_power_iterations=4
    )
    with matrix_free(single.n_params):
        single.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    blocks = [s for s in ranks[0]["shapes"] if s == (single.n_params, K + OVERSAMPLING)]
    assert len(blocks) == 5 and len(ranks[0]["shapes"]) == 5 + 2  # + data size and loss
    assert torch.equal(ranks[0]["H"], ranks[1]["H"])
    torch.testing.assert_close(ranks[0]["H"], single._curvature.to_dense(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        ranks[0]["lml"], single.log_marginal_likelihood(), rtol=1e-10, atol=0
    )


def test_stochastic_fisher_keeps_its_samples_across_block_passes():
    """The sampled Fisher draws the same targets in every pass and for every column of a
    block (``curvlinops`` vmaps with ``randomness="same"``): the passes see one matrix,
    that of the backend's ``full`` from the same seed."""
    model, x, y = case("mlp", "classification")

    def options() -> dict:
        return {
            "stochastic": True,
            "num_samples": 2,
            "generator": torch.Generator().manual_seed(0),
        }

    _, H = CurvlinopsGGN(model, "classification", **options()).full(x, y)
    values, vectors = torch.linalg.eigh(H)
    values, vectors = values.flip(0), vectors.flip(1)
    la, _ = fit_subspace(
        model, x, y, "classification", power_iterations(values, 1e-7), backend_kwargs=options()
    )
    torch.testing.assert_close(la._curvature.eigenvalues, values[:K], rtol=1e-9, atol=0)
    assert sin_largest_angle(la._curvature.eigenvectors, vectors[:, :K]) < 1e-5
