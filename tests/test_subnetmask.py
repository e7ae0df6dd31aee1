"""Subnetwork masks and diagonal SWAG: each mask selects what it should, misuse raises."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_data, make_mlp
from groundtruth import flat_params
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace.baselaplace import DiagLaplace, FullLaplace
from laplace.subnetlaplace import FullSubnetLaplace
from laplace.utils.subnetmask import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    SubnetMask,
)
from laplace.utils.swag import fit_diagonal_swag_var

# make_mlp: 0.weight [0, 15), 0.bias [15, 20), 2.weight [20, 30), 2.bias [30, 32)
RANGES = {"0.weight": (0, 15), "0.bias": (15, 20), "2.weight": (20, 30), "2.bias": (30, 32)}


def span(*names):
    return torch.cat([torch.arange(*RANGES[name]) for name in names]).sort().values


def loader(likelihood="classification", n=12):
    x, y = make_data(likelihood, n=n)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def nested_model():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
    return nn.Sequential(body, nn.ReLU(), nn.Linear(4, 2)).double()


# --------------------------------------------------------------- score-based masks
def test_largest_magnitude_is_top_k_of_abs_theta():
    model = make_mlp()
    mask = LargestMagnitudeSubnetMask(model, n_params_subnet=6)
    indices = mask.select()
    expected = flat_params(model).abs().topk(6).indices.sort().values
    assert torch.equal(indices, expected) and torch.equal(mask.indices, expected)
    assert mask.n_params_subnet == 6 and indices.dtype == torch.long


def test_random_mask_count_distinct_and_seeded():
    model = make_mlp()
    torch.manual_seed(7)
    first = RandomSubnetMask(model, n_params_subnet=10).select()
    torch.manual_seed(7)
    again = RandomSubnetMask(model, n_params_subnet=10).select()
    torch.manual_seed(8)
    other = RandomSubnetMask(model, n_params_subnet=10).select()
    assert first.numel() == 10 and first.unique().numel() == 10
    assert ((first >= 0) & (first < 32)).all()
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_largest_variance_diag_laplace_is_top_k_of_posterior_variance():
    model = make_mlp()
    la = DiagLaplace(model, "classification", prior_precision=0.5)
    mask = LargestVarianceDiagLaplaceSubnetMask(model, 5, la)
    indices = mask.select(loader())
    reference = DiagLaplace(model, "classification", prior_precision=0.5)
    reference.fit(loader())
    expected = reference.posterior_variance.topk(5).indices.sort().values
    assert torch.equal(indices, expected)
    fitted = LargestVarianceDiagLaplaceSubnetMask(model, 5, reference)
    assert torch.equal(fitted.select(), expected)  # an already fitted model needs no data


def test_largest_variance_diag_laplace_errors():
    model = make_mlp()
    with pytest.raises(ValueError, match="needs a train_loader"):
        LargestVarianceDiagLaplaceSubnetMask(
            model, 5, DiagLaplace(model, "classification")
        ).select()
    with pytest.raises(TypeError, match="posterior_variance"):
        LargestVarianceDiagLaplaceSubnetMask(model, 5, "diag")
    other = DiagLaplace(make_mlp(n_hidden=4), "classification")
    with pytest.raises(ValueError, match="all 32 trainable"):
        LargestVarianceDiagLaplaceSubnetMask(model, 5, other)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_largest_variance_swag_is_top_k_of_swag_variance(likelihood):
    model = make_mlp()
    data = loader(likelihood)
    mask = LargestVarianceSWAGSubnetMask(
        model, 4, likelihood=likelihood, swag_n_snapshots=3, swag_lr=0.05
    )
    indices = mask.select(data)
    criterion = nn.CrossEntropyLoss() if likelihood == "classification" else nn.MSELoss()
    variance = fit_diagonal_swag_var(model, data, criterion, n_snapshots_total=3, lr=0.05)
    assert torch.equal(indices, variance.topk(4).indices.sort().values)


def test_swag_mask_errors():
    model = make_mlp()
    with pytest.raises(ValueError, match="needs a train_loader"):
        LargestVarianceSWAGSubnetMask(model, 4).select()
    with pytest.raises(ValueError, match="likelihood"):
        LargestVarianceSWAGSubnetMask(model, 4, likelihood="reward_modeling")
    with pytest.raises(ValueError, match="likelihood"):
        LargestVarianceSWAGSubnetMask(model, 4, likelihood="poisson")
    with pytest.raises(ValueError, match="swag_n_snapshots"):
        LargestVarianceSWAGSubnetMask(model, 4, swag_n_snapshots=0)
    with pytest.raises(ValueError, match="swag_lr"):
        LargestVarianceSWAGSubnetMask(model, 4, swag_lr=-1.0)


@pytest.mark.parametrize(
    ("n_params_subnet", "error", "match"),
    [
        (0, ValueError, "between 1 and the model's 32"),
        (33, ValueError, "between 1 and the model's 32"),
        (2.0, TypeError, "must be an int"),
        (True, TypeError, "must be an int"),
    ],
    ids=["zero", "too-large", "float", "bool"],
)
def test_score_mask_size_errors(n_params_subnet, error, match):
    with pytest.raises(error, match=match):
        LargestMagnitudeSubnetMask(make_mlp(), n_params_subnet)


# --------------------------------------------------------------- diagonal SWAG
def naive_swag(model, data, n_snapshots, snapshot_freq, lr):
    """Snapshots of plain SGD on a copy (momentum 0.9, weight decay 3e-4) and their variance."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=3e-4)
    snapshots = []
    for _ in range(n_snapshots):
        for _ in range(snapshot_freq):
            for x, y in data:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        snapshots.append(torch.cat([p.detach().flatten() for p in params]))
    return torch.stack(snapshots).var(0, unbiased=False)


@pytest.mark.parametrize("snapshot_freq", [1, 2])
def test_swag_variance_matches_naive_and_leaves_model_unchanged(snapshot_freq):
    model = make_mlp()
    model[0].bias.requires_grad_(False)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    data = loader()
    variance = fit_diagonal_swag_var(
        model, data, nn.CrossEntropyLoss(), n_snapshots_total=4, snapshot_freq=snapshot_freq
    )
    assert variance.shape == (27,) and (variance > 0).all()
    expected = naive_swag(model, data, 4, snapshot_freq, lr=0.01).clamp(min=1e-30)
    torch.testing.assert_close(variance, expected)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_swag_errors():
    model = make_mlp()
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="n_snapshots_total"):
        fit_diagonal_swag_var(model, loader(), loss, n_snapshots_total=0)
    with pytest.raises(ValueError, match="lr must be positive"):
        fit_diagonal_swag_var(model, loader(), loss, lr=0.0)
    with pytest.raises(TypeError, match="model"):
        fit_diagonal_swag_var("model", loader(), loss)
    with pytest.raises(ValueError, match="no batches"):
        fit_diagonal_swag_var(model, [], loss, n_snapshots_total=1)


# --------------------------------------------------------------- name-based masks
@pytest.mark.parametrize(
    "names", [["2.bias"], ["2.weight", "0.bias"], list(RANGES)], ids=["one", "two", "all"]
)
def test_param_name_mask_selects_the_tensors(names):
    mask = ParamNameSubnetMask(make_mlp(), names)
    with pytest.raises(AttributeError, match="select"):
        _ = mask.n_params_subnet
    assert torch.equal(mask.select(), span(*names))
    assert mask.n_params_subnet == sum(RANGES[n][1] - RANGES[n][0] for n in names)


def test_module_name_mask_includes_submodules():
    model = nested_model()  # 0.0 (3x4 + 4), 0.2 (4x4 + 4), 2 (4x2 + 2)
    assert torch.equal(ModuleNameSubnetMask(model, ["0"]).select(), torch.arange(36))
    assert torch.equal(
        ModuleNameSubnetMask(model, ["2", "0.0"]).select(),
        torch.cat([torch.arange(16), torch.arange(36, 46)]),
    )
    assert torch.equal(
        ModuleNameSubnetMask(make_mlp(), ["2"]).select(), span("2.weight", "2.bias")
    )


def test_masks_index_the_trainable_vector():
    """With a frozen first layer the vector has the 12 head parameters only."""
    model = make_mlp()
    model[0].requires_grad_(False)
    assert torch.equal(ModuleNameSubnetMask(model, ["2"]).select(), torch.arange(12))
    assert torch.equal(ParamNameSubnetMask(model, ["2.bias"]).select(), torch.tensor([10, 11]))
    head = torch.cat([model[2].weight.flatten(), model[2].bias]).detach()
    expected = head.abs().topk(3).indices.sort().values
    indices = LargestMagnitudeSubnetMask(model, 3).select()
    assert torch.equal(indices, expected)
    x, y = make_data("classification")
    la = FullSubnetLaplace(model, "classification", indices)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    ref = FullLaplace(model, "classification")
    ref.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    torch.testing.assert_close(
        la._curvature.to_dense(), ref._curvature.to_dense()[indices][:, indices]
    )
    with pytest.raises(ValueError, match="requires_grad=False"):
        ParamNameSubnetMask(model, ["0.weight"])
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        ModuleNameSubnetMask(model, ["0"])


@pytest.mark.parametrize(
    ("cls", "names", "error", "match"),
    [
        (ParamNameSubnetMask, ["2.bias", "3.bias"], KeyError, r"\['3.bias'\] are not param"),
        (ParamNameSubnetMask, ["nope"], ValueError, "are not parameters"),
        (ParamNameSubnetMask, [], ValueError, "must not be empty"),
        (ParamNameSubnetMask, "2.bias", TypeError, "list of strings"),
        (ParamNameSubnetMask, ["2.bias", 3], TypeError, "only strings"),
        (ParamNameSubnetMask, ["2.bias", "2.bias"], ValueError, "duplicates"),
        (ModuleNameSubnetMask, ["4"], KeyError, r"\['4'\] are not modules"),
        (ModuleNameSubnetMask, ["1"], ValueError, "'1' has no parameters"),
        (ModuleNameSubnetMask, [], ValueError, "must not be empty"),
    ],
    ids=[
        "unknown-param",
        "unknown-param-valueerror",
        "empty-params",
        "string",
        "non-string",
        "duplicate",
        "unknown-module",
        "parameterless-module",
        "empty-modules",
    ],
)
def test_name_mask_errors(cls, names, error, match):
    with pytest.raises(error, match=match):
        cls(make_mlp(), names)


# --------------------------------------------------------------- last layer
def test_last_layer_mask():
    model = nested_model()
    found = LastLayerSubnetMask(model)
    assert found.last_layer_name is None
    assert torch.equal(found.select(loader()), torch.arange(36, 46))
    assert found.last_layer_name == "2"
    named = LastLayerSubnetMask(model, last_layer_name="0.2")
    assert torch.equal(named.select(), torch.arange(16, 36))


def test_last_layer_mask_errors():
    model = make_mlp()
    with pytest.raises(ValueError, match="needs a train_loader"):
        LastLayerSubnetMask(model).select()
    with pytest.raises(ValueError, match="nn.Linear"):
        LastLayerSubnetMask(model, last_layer_name="1")
    model[2].requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        LastLayerSubnetMask(model, last_layer_name="2")
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        LastLayerSubnetMask(model).select(loader())


# --------------------------------------------------------------- the base class
class EvenMask(SubnetMask):
    """A user-defined mask: every other parameter."""

    def get_subnet_mask(self, train_loader):
        return torch.arange(self.n_params) % 2 == 0


def test_custom_mask_and_select_once():
    mask = EvenMask(make_mlp())
    with pytest.raises(AttributeError, match="call select"):
        _ = mask.indices
    assert torch.equal(mask.select(), torch.arange(0, 32, 2))
    assert mask.n_params_subnet == 16
    with pytest.raises(ValueError, match="already selected"):
        mask.select()
    with pytest.raises(TypeError, match="abstract"):
        SubnetMask(make_mlp())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        EvenMask("model")
    frozen = make_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=True"):
        EvenMask(frozen)


@pytest.mark.parametrize(
    ("subnet_mask", "match"),
    [
        ([1, 0], "must be a torch.Tensor"),
        (torch.ones(32), "boolean or integer"),
        (torch.ones(31, dtype=torch.bool), r"shape \(32,\)"),
        (torch.zeros(32, dtype=torch.bool), "at least one"),
        (torch.full((32,), 2), "only 0 and 1"),
    ],
    ids=["list", "float", "length", "empty", "values"],
)
def test_convert_subnet_mask_to_indices_errors(subnet_mask, match):
    with pytest.raises(ValueError, match=match):
        EvenMask(make_mlp()).convert_subnet_mask_to_indices(subnet_mask)


def test_convert_integer_mask():
    mask = torch.zeros(32, dtype=torch.int64)
    mask[[3, 30, 9]] = 1
    indices = EvenMask(make_mlp()).convert_subnet_mask_to_indices(mask)
    assert torch.equal(indices, torch.tensor([3, 9, 30]))
