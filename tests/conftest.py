"""Shared float64 fixtures: tiny models and data for every likelihood."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

torch.set_default_dtype(torch.float64)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per xdist worker: several workers each running multi-threaded BLAS on the
    # same cores slow dense linear algebra down by an order of magnitude
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    """Start every test from the same global RNG state, whatever ran before it on the worker.

    Tests still seed their own draws (a local ``torch.Generator`` or ``torch.manual_seed``);
    this is the safety net for draws the library makes from the global generators.
    """
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def make_mlp(n_in: int = 3, n_hidden: int = 5, n_out: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.Tanh(), nn.Linear(n_hidden, n_out)).double()


def make_cnn(n_out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, n_out),
    ).double()


def make_data(
    likelihood: str, n: int = 12, n_in: int = 3, n_out: int = 2, image: bool = False, seed: int = 1
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g) if image else torch.randn(n, n_in, generator=g)
    if likelihood == "classification":
        y = torch.randint(n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g)
    return x.double(), y.double() if y.is_floating_point() else y


@pytest.fixture(params=["classification", "regression"])
def likelihood(request) -> str:
    return request.param


@pytest.fixture(params=["mlp", "cnn"])
def model_and_data(request, likelihood):
    if request.param == "mlp":
        model = make_mlp()
        x, y = make_data(likelihood)
    else:
        model = make_cnn()
        x, y = make_data(likelihood, n_out=3, image=True)
    return model, x, y
