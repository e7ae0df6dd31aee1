"""The ``Laplace(...)`` factory returns the class of API.md's grid and refuses the rest."""

from __future__ import annotations

import pytest
import torch
from conftest import make_mlp

import laplace
from laplace import Laplace

PARAMETRIC_GRID = {
    ("all", "full"): "FullLaplace",
    ("all", "kron"): "KronLaplace",
    ("all", "diag"): "DiagLaplace",
    ("all", "lowrank"): "LowRankLaplace",
    ("last_layer", "full"): "FullLLLaplace",
    ("last_layer", "kron"): "KronLLLaplace",
    ("last_layer", "diag"): "DiagLLLaplace",
    ("subnetwork", "full"): "FullSubnetLaplace",
    ("subnetwork", "diag"): "DiagSubnetLaplace",
}


@pytest.mark.parametrize(("cell", "name"), sorted(PARAMETRIC_GRID.items()))
def test_each_cell_builds_its_class(cell, name):
    subset, structure = cell
    kwargs = {"subnetwork_indices": torch.tensor([0, 3, 5])} if subset == "subnetwork" else {}
    la = Laplace(make_mlp(), "classification", subset, structure, **kwargs)
    assert type(la) is getattr(laplace, name)
    assert isinstance(la, laplace.ParametricLaplace)
    if subset == "last_layer":
        assert isinstance(la, laplace.LLLaplace)


def test_default_is_last_layer_kron():
    assert type(Laplace(make_mlp(), "regression")) is laplace.KronLLLaplace


@pytest.mark.parametrize(
    "cell",
    [("last_layer", "lowrank"), ("subnetwork", "kron"), ("subnetwork", "lowrank")],
)
def test_cells_outside_the_grid_raise(cell):
    with pytest.raises(ValueError, match=f"subset_of_weights='{cell[0]}'.*available"):
        Laplace(make_mlp(), "classification", *cell)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"subset_of_weights": "everything"}, "subset_of_weights"),
        ({"hessian_structure": "block"}, "hessian_structure"),
        ({"functional_approximation": "exact"}, "functional_approximation"),
    ],
)
def test_unknown_strings_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        Laplace(make_mlp(), "classification", **kwargs)


@pytest.mark.parametrize(("cell", "name"), sorted(PARAMETRIC_GRID.items()))
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_each_cell_predicts_under_no_grad(cell, name, likelihood):
    """Evaluation loops (and ``validate``) call the predictive under ``torch.no_grad()``."""
    from conftest import make_data
    from torch.utils.data import DataLoader, TensorDataset

    subset, structure = cell
    kwargs = {"subnetwork_indices": torch.tensor([0, 3, 5])} if subset == "subnetwork" else {}
    x, y = make_data(likelihood, n=12)
    la = Laplace(make_mlp(), likelihood, subset, structure, **kwargs)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    expected = la(x[:5])
    with torch.no_grad():
        got = la(x[:5])
    torch.testing.assert_close(got, expected)
