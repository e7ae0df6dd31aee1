"""FeatureExtractor: finding the last layer, capturing its features, reductions, errors."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from conftest import make_cnn, make_mlp
from torch import nn

from laplace.utils.feature_extractor import FeatureExtractor, FeatureReduction


class SequenceClassifier(nn.Module):
    """A head applied to every token, then one token's logits picked (as Hugging Face does)."""

    def __init__(self, reduction: str, n_in: int = 3, dim: int = 4, n_out: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(n_in, dim), nn.Tanh())
        self.score = nn.Linear(dim, n_out)
        self.reduction = reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.score(self.body(x))  # (batch, seq, n_out)
        if self.reduction == "pick_first":
            return logits[:, 0]
        if self.reduction == "pick_last":
            return logits[:, -1]
        return logits.mean(1)


def randn(*shape: int, seed: int = 1, **kwargs) -> torch.Tensor:
    """Standard normal inputs from a local generator, independent of the global RNG."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **kwargs)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("make", "x_shape", "name"),
    [
        (make_mlp, (4, 3), "2"),
        (make_cnn, (4, 1, 6, 6), "3"),
    ],
    ids=["mlp", "cnn"],
)
def test_finds_last_layer_and_captures_its_input(make, x_shape, name):
    model = make()
    x = randn(*x_shape)
    extractor = FeatureExtractor(model)
    assert extractor.last_layer is None
    out, phi = extractor.forward_with_features(x)
    assert extractor.last_layer_name == name
    assert extractor.last_layer is model[-1]
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(phi, model[:-1](x))
    out2, phi2 = extractor.forward_with_features(x)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(phi2, phi)
    assert no_hooks(model)


def test_forward_finds_the_layer_and_returns_the_output():
    model = make_mlp()
    x = randn(5, 3)
    extractor = FeatureExtractor(model)
    torch.testing.assert_close(extractor(x), model(x))
    assert extractor.last_layer_name == "2"
    torch.testing.assert_close(extractor.find_last_layer(x), model(x))
    assert no_hooks(model)


def test_given_name_equals_found_name():
    x = randn(5, 3)
    given = FeatureExtractor(make_mlp(), last_layer_name="2")
    found = FeatureExtractor(make_mlp())
    out_given, phi_given = given.forward_with_features(x)
    out_found, phi_found = found.forward_with_features(x)
    assert given.last_layer_name == found.last_layer_name == "2"
    torch.testing.assert_close(phi_given, phi_found)
    torch.testing.assert_close(out_given, out_found)


def test_set_last_layer_switches_the_captured_features():
    model = make_mlp()
    x = randn(5, 3)
    extractor = FeatureExtractor(model, last_layer_name="2")
    extractor.set_last_layer("0")
    _, phi = extractor.forward_with_features(x)
    assert extractor.last_layer is model[0]
    torch.testing.assert_close(phi, x)


@pytest.mark.parametrize("enable_backprop", [False, True], ids=["detached", "backprop"])
def test_features_are_detached_unless_backprop(enable_backprop):
    model = make_mlp()
    x = randn(5, 3, requires_grad=True)
    _, phi = FeatureExtractor(model, enable_backprop=enable_backprop).forward_with_features(x)
    assert phi.requires_grad == enable_backprop
    if enable_backprop:
        phi.sum().backward()
        expected = torch.func.vmap(torch.func.jacrev(lambda v: model[:-1](v).sum()))(x)
        torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("mode", [m.value for m in FeatureReduction])
def test_feature_reduction_matches_the_models_logit_reduction(mode):
    model = SequenceClassifier(mode)
    x = randn(4, 6, 3)
    extractor = FeatureExtractor(model, feature_reduction=mode)
    out, phi = extractor.forward_with_features(x)
    assert extractor.last_layer is model.score
    assert phi.shape == (4, 4)
    torch.testing.assert_close(model.score(phi), out)
    hidden = model.body(x)
    expected = {"pick_first": hidden[:, 0], "pick_last": hidden[:, -1], "average": hidden.mean(1)}
    torch.testing.assert_close(phi, expected[mode])


def test_sequence_features_without_reduction_are_returned_whole():
    _, phi = FeatureExtractor(SequenceClassifier("pick_last")).forward_with_features(
        randn(2, 5, 3)
    )
    assert phi.shape == (2, 5, 4)


@pytest.mark.parametrize("reduction", ["pick_first", "pick_last", "average"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 3), (1, 2, 2, 4, 3)], ids=["4d", "5d-batch1"])
def test_reduction_of_higher_dimensional_features(reduction, shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    extractor = FeatureExtractor(model, feature_reduction=reduction)
    x = randn(*shape)
    _, phi = extractor.forward_with_features(x)
    with torch.no_grad():
        hidden = model[0](x)  # the last layer's input, (batch, ..., 4)
    middle = [hidden[b].reshape(-1, 4) for b in range(shape[0])]  # the positions, row-major
    expected = {
        "pick_first": torch.stack([m[0] for m in middle]),
        "pick_last": torch.stack([m[-1] for m in middle]),
        "average": torch.stack([m.sum(0) / m.shape[0] for m in middle]),
    }[reduction]
    assert phi.shape == (shape[0], 4)
    torch.testing.assert_close(phi, expected)


def test_unknown_feature_reduction():
    with pytest.raises(ValueError, match="feature_reduction must be one of"):
        FeatureExtractor(make_mlp(), feature_reduction="max")


@pytest.mark.parametrize(
    ("name", "match"),
    [("fc", r"'fc' \(not found\)"), ("1", r"'1' \(not an nn.Linear: a Tanh\)")],
    ids=["missing", "not-linear"],
)
def test_bad_last_layer_name_lists_valid_names(name, match):
    with pytest.raises(ValueError, match=match) as info:
        FeatureExtractor(make_mlp(), last_layer_name=name)
    assert "nn.Linear modules: ['0', '2']" in str(info.value)
    # laplace-torch raises KeyError for a missing name: except clauses for it keep working
    assert isinstance(info.value, KeyError) == (name == "fc")


@pytest.mark.parametrize(
    ("build", "reached"),
    [  # builders, so that no weights are drawn at collection time
        (lambda: nn.Sequential(nn.Linear(3, 2), nn.Softmax(dim=-1)), "'1' (Softmax)"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh()), "'1' (Tanh)"),
    ],
    ids=["softmax", "tanh"],
)
def test_model_without_linear_last_layer(build, reached):
    torch.manual_seed(0)
    model = build().double()
    extractor = FeatureExtractor(model)
    with pytest.raises(ValueError, match="no nn.Linear last layer") as info:
        extractor.forward_with_features(randn(2, 3))
    assert reached in str(info.value)
    assert extractor.last_layer is None
    assert no_hooks(model)


def test_model_without_modules():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(randn(2, 3, seed=0))

        def forward(self, x):
            return x @ self.weight.T

    with pytest.raises(ValueError, match="no nn.Linear last layer.*'' \\(Functional\\)"):
        FeatureExtractor(Functional()).find_last_layer(randn(2, 3))


def test_hooks_are_removed_when_the_forward_fails():
    model = make_mlp()
    extractor = FeatureExtractor(model, last_layer_name="2")
    with pytest.raises(RuntimeError):
        extractor.forward_with_features(randn(2, 7))
    with pytest.raises(RuntimeError):
        FeatureExtractor(model).forward_with_features(randn(2, 7))
    assert no_hooks(model)


def test_last_layer_that_is_not_called_is_reported():
    model = make_mlp()
    extractor = FeatureExtractor(model, last_layer_name="2")
    model.forward = model[0].forward
    with pytest.raises(ValueError, match="was not called"):
        extractor.forward_with_features(randn(2, 3))


def test_dict_inputs_and_model_kwargs():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_mlp()

        def forward(self, batch, scale=1.0):
            return self.net(scale * batch["input_ids"])

    model = DictModel()
    x = randn(4, 3)
    out, phi = FeatureExtractor(model).forward_with_features({"input_ids": x}, scale=2.0)
    torch.testing.assert_close(out, model.net(2 * x))
    torch.testing.assert_close(phi, model.net[:-1](2 * x))


def test_pickles_before_and_after_use():
    model = make_mlp()
    x = randn(3, 3)
    extractor = FeatureExtractor(model, feature_reduction="pick_last")
    copy = pickle.loads(pickle.dumps(extractor))
    assert copy.last_layer is None
    extractor.forward_with_features(x)
    buffer = io.BytesIO()
    torch.save(extractor, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.last_layer_name == "2"
    assert loaded.feature_reduction == FeatureReduction.PICK_LAST
    torch.testing.assert_close(loaded.forward_with_features(x)[1], model[:-1](x))
