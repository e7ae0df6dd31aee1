"""The fallbacks of the vectorised autodiff paths against brute-force Jacobians.

``torch.func.vmap`` of ``jacrev`` through ``nn.PReLU`` raises a shape mismatch in torch 2.14
(a bug of its batching rule, not an error ``vmap`` labels as its own): the per-sample loop
must take over and give the Jacobians that ``torch.func.jacrev`` gives one sample at a time,
while a model that fails in the loop too must still raise its own error.
"""

from __future__ import annotations

import logging

import pytest
import torch
from groundtruth import dense_jacobians
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import GGNInterface
from laplace.curvature._fallback import FastPath, lacks, run_with_fallback


def prelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.PReLU(), nn.Linear(6, 4)).double()


def test_prelu_jacobians_fall_back_to_the_loop(caplog):
    model = prelu_mlp()
    x = torch.randn(7, 3)
    with caplog.at_level(logging.WARNING, logger="laplace.curvature._fallback"):
        Js, f = GGNInterface(model, "classification").jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(model, x))
    torch.testing.assert_close(f, model(x).detach())
    assert lacks(model, FastPath.VMAP)
    assert "the fallback computes it" in caplog.text


def test_prelu_network_fits_and_predicts_like_the_dense_glm():
    """All-weights diag Laplace of a PReLU network (its slope has no Jacobian factors):
    ``J diag(1 / p) J^T`` with brute-force Jacobians."""
    model = prelu_mlp()
    x, y = torch.randn(12, 3), torch.randint(4, (12,))
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    Js = dense_jacobians(model, x)
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
