"""The fallbacks of the vectorised autodiff paths against brute-force Jacobians.

``torch.func.vmap`` of ``jacrev`` through ``nn.PReLU`` raises a shape mismatch in torch 2.14
for most batch sizes and, when the batch size equals the number of outputs, returns wrong
Jacobians without an error: networks with a PReLU never take that path, and their
Jacobians, curvatures and predictives must equal those of brute-force Jacobians computed one
sample at a time. An error of a fast path that is not its own gets the fallback once: its
result is taken, or, where it fails too, the fast path's error is raised.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from groundtruth import dense_ggn, dense_jacobians
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import GGNInterface
from laplace.curvature._fallback import FastPath, lacks, run_with_fallback
from laplace.subsets import AllWeights


def prelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.PReLU(), nn.Linear(6, 4)).double()


@pytest.mark.parametrize("n", [4, 7], ids=["batch_equals_outputs", "other_batch"])
def test_prelu_jacobians_match_brute_force(n):
    model = prelu_mlp()
    x = torch.randn(n, 3)
    Js, f = GGNInterface(model, "classification").jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(model, x))
    torch.testing.assert_close(f, model(x).detach())
    assert lacks(model, FastPath.VMAP)
    rows = AllWeights(model).output_rows(x, slice(1, 3))
    torch.testing.assert_close(rows, dense_jacobians(model, x)[:, 1:3])


def test_an_unlabelled_error_of_the_fast_path_takes_the_fallback(caplog):
    module = nn.Linear(2, 2)

    def fast():
        raise RuntimeError("The size of tensor a (5) must match the size of tensor b (4)")

    with caplog.at_level(logging.WARNING, logger="laplace.curvature._fallback"):
        assert run_with_fallback(module, FastPath.VMAP, fast, lambda: "looped") == "looped"
    assert "the fallback computes it" in caplog.text
    assert lacks(module, FastPath.VMAP)


def test_prelu_network_fits_and_predicts_like_the_dense_glm():
    """All-weights diag Laplace of a PReLU network (its slope has no Jacobian factors): the
    diagonal of the brute-force GGN, and ``J diag(1 / p) J^T`` with brute-force Jacobians."""
    model = prelu_mlp()
    x, y = torch.randn(12, 3), torch.randint(4, (12,))
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))  # batches of 4 = the outputs
    Js = dense_jacobians(model, x)
    H = dense_ggn(model, x, y, "classification")
    torch.testing.assert_close(la.H, H.diagonal())
    truth = torch.einsum("bcp,p,bdp->bcd", Js, la.posterior_variance, Js)
    torch.testing.assert_close(la._glm_predictive_distribution(x)[1], truth)


def test_an_error_of_the_fallback_too_raises_the_fast_paths_error():
    module = nn.Linear(2, 2)

    def fast():
        raise RuntimeError("shape mismatch in the model")

    def fallback():
        raise RuntimeError("the loop fails as well")

    with pytest.raises(RuntimeError, match="shape mismatch in the model"):
        run_with_fallback(module, FastPath.VMAP, fast, fallback)
    assert not lacks(module, FastPath.VMAP)


def test_float32_prelu_jacobians_against_float64_truth():
    """A float32 PReLU network at batch size = outputs (where the vectorised path is silently
    wrong): the Jacobians against those of the same weights and inputs in float64, within
    50 float32 round-offs of the largest entry."""
    model = prelu_mlp().float()
    x = torch.randn(4, 3, dtype=torch.float32)
    Js, _ = GGNInterface(model, "classification").jacobians(x)
    truth = dense_jacobians(copy.deepcopy(model).double(), x.double())
    assert Js.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    assert (Js.double() - truth).abs().max() <= 50 * eps * truth.abs().max()
