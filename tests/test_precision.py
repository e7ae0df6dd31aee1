"""The precision machinery against brute force: Grams, the softmax-Hessian Laplacian, the
factored dense GGN, gathered K-FAC rows, and float64 copies of modules for library sums.

Each helper is checked in float64 (exact up to round-off) and on float32 inputs against the
same computation on the inputs upcast to float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from groundtruth import dense_ggn
from torch import nn

from laplace.curvature import CurvlinopsHessian, GGNInterface
from laplace.curvature._kfac import PendingRows
from laplace.curvature.linear import laplacian, softmax_hessian_diagonal
from laplace.posterior.diag import DiagPosterior
from laplace.utils.data import cast_inputs
from laplace.utils.precision import accumulation_dtype, gram, long_matmul

EPS32 = torch.finfo(torch.float32).eps


def _rows(n: int, p: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(7, 5), (600, 530), (520, 700)], ids=str)
def test_gram_matches_the_product_and_adds_in_place(shape):
    M = _rows(*shape, seed=0)
    torch.testing.assert_close(gram(M), M.T @ M)
    start = _rows(shape[1], shape[1], seed=1)
    out = start.clone()
    assert gram(M, out=out, scale=0.25) is out
    torch.testing.assert_close(out, start + 0.25 * (M.T @ M))


def test_gram_of_float32_rows_sums_in_float64():
    """The float32 rows are exact in float64: their Gram has float64 round-off only, far below
    the float32 product's (which errs by about eps32 times the entries)."""
    M = _rows(2000, 40, seed=2, dtype=torch.float32)
    exact = M.double().T @ M.double()
    G = gram(M)
    assert G.dtype == accumulation_dtype(torch.float32) == torch.float64
    assert (G - exact).abs().max() <= 1e-12 * exact.abs().max()
    assert (M.T @ M - exact).abs().max() > 1e-9 * exact.abs().max()


@pytest.mark.parametrize("inner", [100, 2**16 + 3, 3 * 2**16 + 5], ids=str)
def test_long_matmul_is_the_scaled_product_in_float64(inner):
    A, B = _rows(6, inner, seed=3).view(2, 3, inner), _rows(4, inner, seed=4).T
    scale = _rows(1, inner, seed=5)[0].abs()
    torch.testing.assert_close(long_matmul(A, B, scale), (A * scale) @ B)
    torch.testing.assert_close(long_matmul(A, B), A @ B)


def test_float32_long_inner_products_stay_at_the_round_off_of_short_ones():
    """``J diag(v) J^T`` over 2**22 float32 parameters (an 11M-parameter model's diagonal GLM
    variance, scaled down): the plain float32 product sums the inner dimension in float32 and
    errs by ~6e-4 of the largest entry here (measured); in chunks of 2**16 added in float64
    the error is that of a 2**16-term float32 sum, ~2e-6 (measured), asserted at 50 eps32 =
    6e-6 against the same numbers upcast to float64. The diagonal posterior's variances take
    that path."""
    g = torch.Generator().manual_seed(6)
    inner = 2**22
    J = torch.randn(2, 10, inner, generator=g, dtype=torch.float32)
    variance = torch.rand(inner, generator=g, dtype=torch.float32) + 0.5
    exact = torch.einsum("bop,p,bkp->bok", J.double(), variance.double(), J.double())
    scale = exact.abs().max()
    chunked = long_matmul(J, J.mT, variance)
    assert chunked.dtype == torch.float64
    assert (chunked - exact).abs().max() <= 50 * EPS32 * scale
    plain = (J * variance) @ J.mT
    assert (plain.double() - exact).abs().max() > 200 * EPS32 * scale  # what it fixes
    posterior = DiagPosterior(variance.double().reciprocal(), dtype=torch.float32)
    f_var = posterior.inv_quad(J)
    assert f_var.dtype == torch.float32
    assert (f_var.double() - exact).abs().max() <= 50 * EPS32 * scale


def _softmax_hessians(p: torch.Tensor) -> torch.Tensor:
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def test_laplacian_of_the_edge_weights_is_the_summed_softmax_hessian():
    logits = 3 * _rows(50, 6, seed=3)
    p = torch.softmax(logits, dim=-1)
    expected = _softmax_hessians(p).sum(0)
    torch.testing.assert_close(laplacian(p.T @ p), expected)
    torch.testing.assert_close(softmax_hessian_diagonal(p), _softmax_hessians(p).diagonal(0, 1, 2))


def test_float32_softmax_sums_keep_the_null_direction_and_the_confident_diagonal():
    """On 4,000 float32 softmax outputs, the Laplacian form leaves nothing along the all-ones
    direction (float64 round-off), where ``sum diag(p) - sum p p^T`` in float32 leaves about
    ``eps32 * N``; and ``p (1 - p)`` of a class with ``p = 1 - 1e-5`` keeps its relative
    accuracy (``1 - p`` from the other classes, not from ``1 - p`` in float32)."""
    logits = 4 * _rows(4000, 10, seed=4, dtype=torch.float32)
    p = torch.softmax(logits, dim=-1)
    ones = torch.ones(10, dtype=torch.float64) / 10**0.5
    B = laplacian(p.T @ p)
    signed = (torch.diag(p.sum(0)) - p.T @ p).double()
    assert abs(ones @ B @ ones) < 1e-12 * B.abs().max()
    assert abs(ones @ signed @ ones) > 1e-8 * B.abs().max()
    truth = _softmax_hessians(torch.softmax(logits.double(), dim=-1)).sum(0)
    assert (B - truth).abs().max() <= 100 * EPS32 * truth.abs().max()

    confident = torch.tensor([[20.0, 8.5, 9.0]])
    diagonal = softmax_hessian_diagonal(torch.softmax(confident, dim=-1)).double()
    exact = _softmax_hessians(torch.softmax(confident.double(), dim=-1)).diagonal(0, 1, 2)
    assert ((diagonal - exact).abs() / exact).max() <= 8 * EPS32


def test_factored_dense_ggn_of_interleaved_layers():
    """A linear layer, a convolution, then linear layers (weights factored, the convolution and
    everything after the first factored parameter handled as their rows) against the dense
    GGN, for classification and multi-output regression, and summed into ``out``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(36, 6),
        nn.Tanh(),
        nn.Unflatten(1, (1, 2, 3)),
        nn.Conv2d(1, 2, 1),
        nn.Flatten(),
        nn.Linear(12, 5),
        nn.Tanh(),
        nn.Linear(5, 4),
    )
    x = _rows(9, 36, seed=5)
    for likelihood, y in (
        ("classification", torch.randint(4, (9,), generator=torch.Generator().manual_seed(6))),
        ("regression", _rows(9, 4, seed=7)),
    ):
        backend = GGNInterface(model, likelihood)
        assert backend._factored_full(x, y, None) is not None
        _, H = backend.full(x, y)
        expected = dense_ggn(model, x, y, likelihood)
        torch.testing.assert_close(H, expected)
        out = torch.eye(H.shape[0])
        backend.full(x, y, out=out)
        torch.testing.assert_close(out, torch.eye(H.shape[0]) + expected)


def test_pending_rows_sum_once_enough_have_gathered_and_on_flush():
    factor = torch.zeros(4, 4)
    pending = PendingRows()
    parts = [_rows(300, 4, seed=s) for s in range(5)]
    for part in parts[:3]:
        pending.add(factor, part, 0.5, torch.float64)
    assert factor.abs().max() == 0  # 900 rows: kept
    pending.add(factor, parts[3], 0.5, torch.float64)  # 1,200 rows: summed
    first = torch.cat(parts[:4])
    torch.testing.assert_close(factor, 0.5 * first.T @ first)
    pending.add(factor, parts[4], 0.5, torch.float64)
    pending.flush()
    every = torch.cat(parts)
    torch.testing.assert_close(factor, 0.5 * every.T @ every)


def test_cast_inputs_casts_floating_tensors_only():
    batch = {"x": torch.ones(2, dtype=torch.float32), "ids": torch.arange(2), "n": 3}
    cast = cast_inputs(batch, torch.float64)
    assert cast["x"].dtype == torch.float64 and cast["ids"].dtype == torch.int64
    assert cast["n"] == 3 and batch["x"].dtype == torch.float32
    assert cast_inputs(None, torch.float64) is None


def test_library_sums_run_on_a_refreshed_float64_copy_of_the_module():
    """A backend asked for float64 sums on a float32 module runs the library on a float64
    copy whose parameters follow the module's; the module itself is not touched."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).float()
    x = _rows(20, 3, seed=8, dtype=torch.float32)
    y = torch.randint(2, (20,), generator=torch.Generator().manual_seed(9))
    backend = CurvlinopsHessian(layer, "classification")
    backend.sum_dtype = torch.float64
    before = copy.deepcopy(layer.state_dict())
    for scale in (1.0, 2.0):
        with torch.no_grad():
            layer.weight.mul_(scale)
        _, H = backend.full(x, y)
        assert H.dtype == torch.float64
        reference = copy.deepcopy(layer).double()
        torch.testing.assert_close(H, dense_ggn(reference, x.double(), y, "classification"))
        assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert not torch.equal(before["weight"], layer.weight)  # the copy followed the change
