"""Clear errors for bad input, and serialisation of fitted approximations."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from torch.utils.data import DataLoader, TensorDataset

from laplace import DiagLaplace, FullLaplace, KronLaplace, Laplace

CLASSES = {"full": FullLaplace, "kron": KronLaplace, "diag": DiagLaplace}


def loader(x, y, batch_size=5):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"likelihood": "classifcation"}, "likelihood must be one of"),
        ({"subset_of_weights": "everything"}, "subset_of_weights must be one of"),
        ({"hessian_structure": "dense"}, "hessian_structure must be one of"),
        ({"functional_approximation": "exact"}, "functional_approximation must be one of"),
        ({"sigma_noise": 2.0}, "sigma_noise must be 1"),
        ({"prior_precision": -1.0}, "prior_precision must be positive"),
        ({"prior_precision": torch.ones(7)}, "prior_precision must have 1"),
        ({"prior_precision": torch.ones(2, 2)}, "scalar or a 1-d tensor"),
        ({"prior_mean": torch.zeros(3)}, "prior_mean must be a scalar or have shape"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"hessian_structure": "kron", "prior_precision": torch.ones(32)}, "layerwise"),
    ],
)
def test_constructor_rejects_bad_options(kwargs, match):
    args = {
        "likelihood": "classification",
        "subset_of_weights": "all",
        "hessian_structure": "full",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Laplace(make_mlp(), **args)


def test_unsupported_backend_lists_alternatives():
    from laplace.curvature import GGNInterface

    with pytest.raises(ValueError, match="CurvlinopsGGN"):
        KronLaplace(make_mlp(), "classification", backend=GGNInterface)


def test_model_without_trainable_parameters():
    model = make_mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        FullLaplace(model, "classification")


@pytest.mark.parametrize("structure", list(CLASSES))
def test_predict_before_fit(structure):
    la = CLASSES[structure](make_mlp(), "classification")
    x, _ = make_data("classification")
    for call in (lambda: la(x), la.log_marginal_likelihood, la.state_dict):
        with pytest.raises(ValueError, match="not fitted"):
            call()


@pytest.mark.parametrize(
    ("likelihood", "y", "match"),
    [
        ("classification", torch.tensor([0, 1, 2, 1]), "range|labels"),
        ("classification", torch.tensor([0.0, 1.0, 0.0, 1.0]), "integer|dtype"),
        ("classification", torch.tensor([[0], [1], [0], [1]]), "shape"),
        ("regression", torch.zeros(4), "shape"),
        ("regression", torch.zeros(4, 3), "shape"),
        ("regression", torch.zeros(4, 2, dtype=torch.long), "floating|dtype"),
    ],
)
def test_fit_rejects_bad_targets(likelihood, y, match):
    la = FullLaplace(make_mlp(), likelihood)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=match):
        la.fit(loader(x, y))


def test_fit_rejects_nan_inputs_and_empty_or_datasetless_loaders():
    la = DiagLaplace(make_mlp(), "regression")
    x, y = make_data("regression")
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        la.fit(loader(x, y))
    with pytest.raises(ValueError, match="empty"):
        la.fit(loader(x[:0], y[:0]))
    with pytest.raises(ValueError, match="dataset"):
        la.fit([(x, y)])


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_parameters_are_reported(value):
    model = make_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = value
    la = DiagLaplace(model, "regression")
    x, y = make_data("regression")
    with pytest.raises(ValueError, match="NaN|Inf"):
        la.fit(loader(x, y))


def test_predict_rejects_unknown_options():
    la = FullLaplace(make_mlp(), "classification")
    x, y = make_data("classification")
    la.fit(loader(x, y))
    with pytest.raises(ValueError, match="link_approx must be one of"):
        la(x, link_approx="softmax")
    with pytest.raises(ValueError, match="pred_type must be one of"):
        la(x, pred_type="laplace")
    with pytest.raises(ValueError, match="gp"):
        la(x, pred_type="gp")
    with pytest.raises(ValueError, match="n_samples"):
        la(x, link_approx="mc", n_samples=0)
    with pytest.raises(ValueError, match="method must be one of"):
        la.optimize_prior_precision(method="cv")
    with pytest.raises(ValueError, match="val_loader"):
        la.optimize_prior_precision(method="gridsearch")


@pytest.mark.parametrize("structure", list(CLASSES))
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_state_dict_round_trip(structure, likelihood):
    x, y = make_data(likelihood, n_out=3, image=True)
    la = CLASSES[structure](make_cnn(), likelihood, prior_precision=0.4)
    la.fit(loader(x, y))
    la.optimize_prior_precision(n_steps=5)
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    la2 = CLASSES[structure](make_cnn(), likelihood)
    la2.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(la2.log_marginal_likelihood(), la.log_marginal_likelihood())
    out1, out2 = la(x[:3]), la2(x[:3])
    torch.testing.assert_close(out1, out2)


def test_state_dict_from_other_structure_or_model_is_rejected():
    x, y = make_data("classification")
    la = FullLaplace(make_mlp(), "classification")
    la.fit(loader(x, y))
    state = la.state_dict()
    with pytest.raises(ValueError, match="cls_name|structure"):
        DiagLaplace(make_mlp(), "classification").load_state_dict(state)
    with pytest.raises(ValueError, match="param_shapes"):
        FullLaplace(make_mlp(n_hidden=7), "classification").load_state_dict(state)
    with pytest.raises(ValueError, match="likelihood"):
        FullLaplace(make_mlp(), "regression").load_state_dict(state)


@pytest.mark.parametrize("structure", list(CLASSES))
def test_torch_save_whole_object(structure):
    x, y = make_data("regression")
    la = CLASSES[structure](make_mlp(), "regression", sigma_noise=0.5)
    la.fit(loader(x, y))
    expected = la(x[:4])
    buffer = io.BytesIO()
    torch.save(la, buffer)
    buffer.seek(0)
    la2 = torch.load(buffer, map_location="cpu", weights_only=False)
    for a, b in zip(la2(x[:4]), expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_online_fit_accumulates_like_one_fit(structure):
    x, y = make_data("regression", n=20)
    la = CLASSES[structure](make_mlp(), "regression")
    la.fit(loader(x, y))
    la_online = CLASSES[structure](make_mlp(), "regression")
    la_online.fit(loader(x[:12], y[:12]))
    la_online.fit(loader(x[12:], y[12:]), override=False)
    assert la_online.n_data == 20
    torch.testing.assert_close(la_online._curvature.to_dense(), la._curvature.to_dense())
    torch.testing.assert_close(la_online.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_dict_batches():
    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_mlp()

        def forward(self, batch):
            return self.net(batch["input_ids"])

    x, y = make_data("classification")
    data = [{"input_ids": x[i : i + 4], "labels": y[i : i + 4]} for i in range(0, 12, 4)]

    class DictLoader(list):
        dataset = range(12)

    la = DiagLaplace(DictModel(), "classification")
    la.fit(DictLoader(data))
    ref = DiagLaplace(make_mlp(), "classification")
    ref.fit(loader(x, y, batch_size=4))
    torch.testing.assert_close(la._curvature.to_dense(), ref._curvature.to_dense())
    torch.testing.assert_close(la({"input_ids": x[:3]}), ref(x[:3]))


@pytest.mark.parametrize("structure", list(CLASSES))
def test_nan_curvature_is_reported(structure):
    x, y = make_data("regression")
    torch.manual_seed(0)
    la = CLASSES[structure](torch.nn.Linear(3, 2), "regression")
    with pytest.raises(ValueError, match="NaN"):  # J^T J overflows
        la.fit(loader(1e300 * x, y))
