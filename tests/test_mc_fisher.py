"""The Monte-Carlo Fisher (``stochastic=True``) with the ``mc_samples`` keyword: its mean
over many sampled targets approaches the exact GGN (dense, diagonal, K-FAC factors).

The tolerance comes from the sample count. For one input ``n`` the estimator averages ``S``
independent outer products ``v v^T`` with ``v = M_n g``, ``g`` the loss gradient w.r.t. the
output at a sampled target (``p_n - e_c`` with ``c ~ Cat(p_n)``; ``-eps`` with
``eps ~ N(0, I)`` for the squared error). Its exact mean and per-entry variance are computed
here in closed form (the class distribution is enumerated; Gaussian fourth moments by
Isserlis' theorem): the standardised error ``z = (estimate - mean) / sqrt(var / S)`` of every
entry must stay below 6, and its mean square over all entries checked together must be of
order one (within ``[0.02, 12]``: the entries are strongly correlated, as they share the few
sampled labels; over 30 seeds it ranged over ``[0.1, 2.6]``). Were ``mc_samples``
ignored (``S = 1``) the mean square would be ``S`` (64 or 256) times larger; were the
estimate exact, it would be near 0, and were it scaled, far from one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_data, make_mlp
from groundtruth import dense_jacobians
from torch import Tensor, nn
from torch.func import jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from laplace import KronLaplace, KronLLLaplace
from laplace.curvature import BackPackGGN, CurvlinopsGGN, GGNInterface

SAMPLES = 256
KFAC_SAMPLES = 64
"""Fewer for K-FAC: ``curvlinops`` runs one backward pass per sampled target."""
N_DATA = 32
Z_MAX = 6.0


def moments(M: Tensor, f: Tensor, likelihood: str) -> tuple[Tensor, Tensor]:
    """Exact mean and per-entry variance of ``sum_n v_n v_n^T`` for one sampled target per
    input, ``v_n = M_n g_n``.

    Shapes:
        ``M``: ``(batch, d, outputs)``; ``f``: ``(batch, outputs)`` -> ``(d, d)`` each
    """
    if likelihood == "classification":
        p = torch.softmax(f, dim=-1)
        grads = p.unsqueeze(1) - torch.eye(f.shape[1])  # (batch, class, outputs)
        v = torch.einsum("ndo,nco->ncd", M, grads)
        outer = v.unsqueeze(-1) * v.unsqueeze(-2)
        mean = torch.einsum("nc,ncij->nij", p, outer)
        var = torch.einsum("nc,ncij->nij", p, outer**2) - mean**2
    else:
        mean = M @ M.mT
        diagonal = mean.diagonal(dim1=-2, dim2=-1)
        var = diagonal.unsqueeze(-1) * diagonal.unsqueeze(-2) + mean**2
    return mean.sum(0), var.sum(0)


def assert_sampled(checks: list[tuple[Tensor, Tensor, Tensor]], samples: int) -> None:
    """Each ``(estimate, mean, var)`` of ``checks`` is a mean over ``samples`` draws of an
    estimator of ``mean`` whose per-entry variance is ``var``."""
    errors = []
    for estimate, mean, var in checks:
        std = (var / samples).sqrt()
        random = std > 1e-12
        torch.testing.assert_close(estimate[~random], mean[~random], atol=1e-10, rtol=0)
        errors.append((estimate - mean)[random] / std[random])
    z = torch.cat(errors)
    assert z.abs().max() < Z_MAX, f"largest standardised error {z.abs().max():.1f}"
    assert 0.02 < z.square().mean() < 12.0, f"mean square standardised error {z.square().mean()}"


def problem(likelihood: str) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """``(model, x, y, f)`` with 3 outputs."""
    model = make_mlp(n_hidden=4, n_out=3)
    x, y = make_data(likelihood, n=N_DATA, n_out=3)
    with torch.no_grad():
        f = model(x)
    return model, x, y, f


def layer_output_jacobians(model: nn.Module, x: Tensor) -> list[Tensor]:
    """``d f_n / d z_n`` for the output ``z`` of each linear layer of the MLP, per input.

    Shapes:
        ``-> [(batch, outputs, hidden), (batch, outputs, outputs)]``
    """
    with torch.no_grad():
        hidden = model[0](x)
    tail = vmap(jacrev(lambda z: model[1:](z)))(hidden)
    return [tail, torch.eye(3).expand(len(x), 3, 3)]


GGN_BACKENDS = [GGNInterface, CurvlinopsGGN, BackPackGGN]


@pytest.mark.parametrize("backend", GGN_BACKENDS, ids=lambda b: b.__name__)
def test_sampled_full_and_diag(backend, likelihood):
    model, x, y, f = problem(likelihood)
    mean, var = moments(dense_jacobians(model, x).mT, f, likelihood)
    sampled = backend(model, likelihood, stochastic=True)
    _, H = sampled.full(x, y, N=N_DATA, mc_samples=SAMPLES, seed=1)
    assert_sampled([(H, mean, var)], SAMPLES)
    _, h = sampled.diag(x, y, N=N_DATA, mc_samples=SAMPLES, seed=2)
    assert_sampled([(h, mean.diagonal(), var.diagonal())], SAMPLES)


def bias_blocks(H: Tensor, model: nn.Module) -> list[Tensor]:
    """The diagonal blocks of the two bias vectors in a dense curvature of the MLP."""
    sizes = [p.numel() for p in model.parameters()]
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [H[ends[i] - sizes[i] : ends[i], ends[i] - sizes[i] : ends[i]] for i in (1, 3)]


def sampled_kron(route: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The dense sampled K-FAC of ``route``: a backend's ``kron`` or a fitted Kron class."""
    options = {"mc_samples": KFAC_SAMPLES, "seed": 3}
    if route in ("CurvlinopsGGN", "BackPackGGN"):
        backend = {"CurvlinopsGGN": CurvlinopsGGN, "BackPackGGN": BackPackGGN}[route]
        return (
            backend(model, "classification", stochastic=True)
            .kron(x, y, N_DATA, **options)[1]
            .to_matrix()
        )
    laplace_cls = {"KronLaplace": KronLaplace, "KronLLLaplace": KronLLLaplace}[route]
    la = laplace_cls(
        model,
        "classification",
        backend=CurvlinopsGGN,
        backend_kwargs={"stochastic": True},
        asdl_fisher_kwargs=options,
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=N_DATA))
    return la.H.to_matrix()


@pytest.mark.parametrize("route", ["CurvlinopsGGN", "BackPackGGN", "KronLaplace", "KronLLLaplace"])
def test_sampled_kfac_output_factors(route):
    """The output-side factors ``B = sum_n G_n^T Lambda_n G_n`` of both layers (read off
    the bias blocks, which are ``B`` itself for classification) are sampled with
    ``mc_samples`` targets per input."""
    model, x, y, f = problem("classification")
    dense = sampled_kron(route, model, x, y)
    blocks = bias_blocks(dense, model)
    layers = layer_output_jacobians(model, x)
    if route == "KronLLLaplace":  # only the last layer: its bias block is the last one
        blocks, layers = [dense[-3:, -3:]], layers[1:]
    checks = [(block, *moments(G.mT, f, "classification")) for block, G in zip(blocks, layers)]
    assert_sampled(checks, KFAC_SAMPLES)


def test_exact_ggn_takes_mc_samples_one():
    """``mc_samples=1`` (curvlinops' default) leaves the exact GGN exact."""
    model, x, y, _ = problem("classification")
    backend = CurvlinopsGGN(model, "classification")
    torch.testing.assert_close(
        backend.full(x, y, N=N_DATA, mc_samples=1)[1], backend.full(x, y, N=N_DATA)[1]
    )
