"""The BackPACK backends against dense float64 ground truth and the curvlinops K-FAC."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from groundtruth import dense_ef, dense_ggn, dense_jacobians, per_sample_gradients, total_loss
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature.backpack import BackPackEF, BackPackGGN, BackPackInterface
from laplace.curvature.curvature import GGNInterface
from laplace.curvature.curvlinops import CurvlinopsEF, CurvlinopsGGN
from laplace.utils.enums import HessianStructure

TOL = {"atol": 1e-9, "rtol": 1e-9}
CASES = ["classification", "regression", "regression-1"]
MODELS = ["mlp", "cnn"]
REFERENCES = {BackPackGGN: dense_ggn, BackPackEF: dense_ef}

cases = pytest.mark.parametrize("case", CASES)
models = pytest.mark.parametrize("model_name", MODELS)
backends = pytest.mark.parametrize("backend", list(REFERENCES), ids=lambda b: b.__name__)


def setup(model_name: str, case: str, n: int = 12) -> tuple[nn.Module, Tensor, Tensor, str]:
    """``(model, x, y, likelihood)``; ``regression-1`` is regression with one output."""
    likelihood = "classification" if case == "classification" else "regression"
    n_out = 1 if case == "regression-1" else (2 if model_name == "mlp" else 3)
    model = make_mlp(n_out=n_out) if model_name == "mlp" else make_cnn(n_out=n_out)
    x, y = make_data(likelihood, n=n, n_out=n_out, image=model_name == "cnn")
    return model, x, y, likelihood


class LastLayerModel(nn.Module):
    """A minimal feature extractor: ``forward_with_features`` and ``last_layer``."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.body, self.last_layer = net[:-1], net[-1]

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        phi = self.body(x)
        return self.last_layer(phi), phi

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_features(x)[0]


def assert_kron_equal(ours, theirs) -> None:
    """Same blocks, same factors, factor by factor."""
    assert [len(f) for f in ours.kfacs] == [len(f) for f in theirs.kfacs]
    for mine, reference in zip(ours.kfacs, theirs.kfacs):
        for a, b in zip(mine, reference):
            torch.testing.assert_close(a, b, **TOL)


def relative_error(estimate: Tensor, exact: Tensor) -> float:
    return ((estimate - exact).norm() / exact.norm()).item()


# ---------------------------------------------------------------------------- exact quantities
@models
@cases
def test_jacobians_and_gradients_match_dense(model_name, case):
    model, x, y, likelihood = setup(model_name, case)
    backend = BackPackEF(model, likelihood)
    Js, f = backend.jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(model, x), **TOL)
    torch.testing.assert_close(f, model(x).detach(), **TOL)
    assert not Js.requires_grad and not f.requires_grad
    Gs, loss = backend.gradients(x, y)
    torch.testing.assert_close(Gs, per_sample_gradients(model, x, y, likelihood), **TOL)
    torch.testing.assert_close(loss, total_loss(model, x, y, likelihood), **TOL)


@backends
@models
@cases
def test_full_and_diag_match_dense(backend, model_name, case):
    model, x, y, likelihood = setup(model_name, case)
    expected = REFERENCES[backend](model, x, y, likelihood)
    curvature = backend(model, likelihood)
    loss, H = curvature.full(x, y, N=30)
    torch.testing.assert_close(H, expected, **TOL)
    torch.testing.assert_close(loss, total_loss(model, x, y, likelihood), **TOL)
    loss, h = curvature.diag(x, y, N=30)
    torch.testing.assert_close(h, expected.diagonal(), **TOL)
    torch.testing.assert_close(loss, total_loss(model, x, y, likelihood), **TOL)


@models
@cases
@pytest.mark.parametrize("batch", [12, 5], ids=["M=N", "M<N"])
def test_kron_matches_curvlinops_factor_by_factor(model_name, case, batch):
    model, x, y, likelihood = setup(model_name, case)
    n_data = 12 if batch == 12 else 30
    loss, kron = BackPackGGN(model, likelihood).kron(x[:batch], y[:batch], N=n_data)
    ref_loss, reference = CurvlinopsGGN(model, likelihood).kron(x[:batch], y[:batch], N=n_data)
    assert_kron_equal(kron, reference)
    torch.testing.assert_close(loss, ref_loss, **TOL)


def test_kron_batches_accumulate_to_full_data_kron(likelihood):
    model, x, y, _ = setup("cnn", likelihood)
    backend = BackPackGGN(model, likelihood)
    _, whole = backend.kron(x, y, N=len(x))
    parts = [backend.kron(x[i : i + 5], y[i : i + 5], N=len(x))[1] for i in range(0, len(x), 5)]
    assert_kron_equal(parts[0] + parts[1] + parts[2], whole)


# ---------------------------------------------------------------------------- Monte Carlo
@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_monte_carlo_ggn_converges_to_exact(structure, likelihood):
    model, x, y, _ = setup("mlp", likelihood)

    def estimate(backend: BackPackGGN) -> Tensor:
        _, H = getattr(backend, structure)(x, y, N=len(x))
        return H.to_matrix() if structure == "kron" else H

    exact = estimate(BackPackGGN(model, likelihood))
    errors = []
    for num_samples in (1, 400):
        sampled = BackPackGGN(model, likelihood, stochastic=True, num_samples=num_samples)
        torch.manual_seed(0)
        errors.append(relative_error(estimate(sampled), exact))
    assert errors[1] < 0.1 and errors[0] > max(3 * errors[1], 0.05)


def test_monte_carlo_generator_is_reproducible_and_leaves_global_state():
    model, x, y, _ = setup("mlp", "classification")
    backend = BackPackGGN(model, "classification", stochastic=True, num_samples=3)
    state = torch.random.get_rng_state()
    first = backend.full(x, y, generator=torch.Generator().manual_seed(1))[1]
    again = backend.full(x, y, generator=torch.Generator().manual_seed(1))[1]
    other = backend.full(x, y, generator=torch.Generator().manual_seed(2))[1]
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(first, again, **TOL)
    assert not torch.allclose(first, other)
    diag = backend.diag(x, y, generator=torch.Generator().manual_seed(1))[1]
    assert not torch.allclose(diag, dense_ggn(model, x, y, "classification").diagonal())


# ---------------------------------------------------------------------------- subsets
@backends
def test_last_layer_matches_dense_on_features(backend, likelihood):
    net, x, y, _ = setup("mlp", likelihood)
    model = LastLayerModel(net)
    phi = model.body(x).detach()
    curvature = backend(model, likelihood, last_layer=True)
    assert curvature.params == list(model.last_layer.parameters())
    Js, f = curvature.jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(model.last_layer, phi), **TOL)
    torch.testing.assert_close(f, model(x).detach(), **TOL)
    torch.testing.assert_close(curvature.last_layer_jacobians(x)[0], Js, **TOL)
    expected = REFERENCES[backend](model.last_layer, phi, y, likelihood)
    torch.testing.assert_close(curvature.full(x, y)[1], expected, **TOL)
    torch.testing.assert_close(curvature.diag(x, y)[1], expected.diagonal(), **TOL)
    if backend is BackPackGGN:
        reference = CurvlinopsGGN(model, likelihood, last_layer=True).kron(x, y, N=20)[1]
        assert_kron_equal(curvature.kron(x, y, N=20)[1], reference)


@backends
def test_subnetwork_indices_restrict_everything(backend, likelihood):
    model, x, y, _ = setup("cnn", likelihood)
    idx = torch.tensor([118, 0, 7, 21, 33, 19])
    curvature = backend(model, likelihood, subnetwork_indices=idx)
    expected = REFERENCES[backend](model, x, y, likelihood)[idx][:, idx]
    torch.testing.assert_close(curvature.jacobians(x)[0], dense_jacobians(model, x)[..., idx])
    G_ref = per_sample_gradients(model, x, y, likelihood)[:, idx]
    torch.testing.assert_close(curvature.gradients(x, y)[0], G_ref, **TOL)
    torch.testing.assert_close(curvature.full(x, y)[1], expected, **TOL)
    torch.testing.assert_close(curvature.diag(x, y)[1], expected.diagonal(), **TOL)


def test_frozen_parameters_are_left_out():
    model, x, y, likelihood = setup("cnn", "regression")
    model[0].bias.requires_grad_(False)
    backend = BackPackGGN(model, likelihood)
    torch.testing.assert_close(backend.jacobians(x)[0], dense_jacobians(model, x), **TOL)
    torch.testing.assert_close(backend.full(x, y)[1], dense_ggn(model, x, y, likelihood), **TOL)
    reference = CurvlinopsGGN(model, likelihood).kron(x, y, N=12)[1]
    assert_kron_equal(backend.kron(x, y, N=12)[1], reference)


def test_kron_rejects_subnetwork_indices():
    model, x, y, _ = setup("mlp", "classification")
    backend = BackPackGGN(model, "classification", subnetwork_indices=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="subnetwork"):
        backend.kron(x, y, N=12)


# ---------------------------------------------------------------------------- backprop
def input_gradient(Js: Tensor, f: Tensor, x: Tensor) -> Tensor:
    return torch.autograd.grad((Js**2).sum() + (f**3).sum(), x)[0]


@pytest.mark.parametrize("mode", ["mlp", "cnn", "last_layer"])
def test_enable_backprop_matches_torch_func(mode):
    net, x, _, likelihood = setup("cnn" if mode == "cnn" else "mlp", "regression")
    model = LastLayerModel(net) if mode == "last_layer" else net
    last_layer = mode == "last_layer"
    x.requires_grad_(True)
    reference = GGNInterface(model, likelihood, last_layer=last_layer)
    expected = input_gradient(*reference.jacobians(x, enable_backprop=True), x)
    backend = BackPackGGN(model, likelihood, last_layer=last_layer)
    Js, f = backend.jacobians(x, enable_backprop=True)
    assert BackPackGGN.supports_backprop and Js.requires_grad
    torch.testing.assert_close(input_gradient(Js, f, x), expected, **TOL)
    Js, f = backend.jacobians(x)
    assert not Js.requires_grad and not f.requires_grad


# ---------------------------------------------------------------------------- model handling
def test_model_is_left_unchanged_and_torch_func_still_works():
    model, x, y, likelihood = setup("cnn", "classification")
    backend = BackPackGGN(model, likelihood)
    backend.full(x, y)
    backend.kron(x, y, N=12)
    backend.jacobians(x)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None and set(vars(p)) <= {"_is_param"} for p in model.parameters())
    H = GGNInterface(model, likelihood).full(x, y)[1]
    torch.testing.assert_close(H, dense_ggn(model, x, y, likelihood), **TOL)


def test_follows_parameter_updates_and_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2))
    x, y = make_data("classification")
    backend = BackPackGGN(model, "classification")
    model.eval()
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    torch.testing.assert_close(backend.jacobians(x)[0], dense_jacobians(model, x), **TOL)
    expected = dense_ggn(model, x, y, "classification")
    torch.testing.assert_close(backend.full(x, y)[1], expected, **TOL)


def zoo(kron_only: bool) -> nn.Sequential:
    """Every kind of module the backends accept (the K-FAC ones if ``kron_only``)."""
    torch.manual_seed(4)
    if kron_only:
        extra = [nn.Identity(), nn.Dropout(0.3), nn.Sigmoid()]
        pool = [nn.ZeroPad2d(1), nn.MaxPool2d(2), nn.Tanh(), nn.AvgPool2d(1)]
    else:
        extra = [nn.ELU(), nn.SELU(), nn.LeakyReLU(0.1), nn.LogSigmoid()]
        pool = [nn.ZeroPad2d(1), nn.AvgPool2d(2), nn.Tanh()]
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, stride=1),
        nn.ReLU(),
        *pool,
        nn.Flatten(),
        nn.Sequential(nn.Linear(32, 4), *extra),
        nn.Linear(4, 3),
    ).eval()


@pytest.mark.parametrize("kron_only", [False, True], ids=["all-modules", "kfac-modules"])
def test_supported_modules(kron_only):
    model = zoo(kron_only)
    x, y = make_data("classification", n_out=3, image=True)
    backend = BackPackGGN(model, "classification")
    expected = dense_ggn(model, x, y, "classification")
    torch.testing.assert_close(backend.full(x, y)[1], expected, **TOL)
    torch.testing.assert_close(backend.diag(x, y)[1], expected.diagonal(), **TOL)
    if kron_only:
        reference = CurvlinopsGGN(model, "classification").kron(x, y, N=12)[1]
        assert_kron_equal(backend.kron(x, y, N=12)[1], reference)
    else:
        with pytest.raises(ValueError, match="ELU.*CurvlinopsGGN"):
            backend.kron(x, y, N=12)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layer(x)


class ReversedSequential(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:
        for module in reversed(self):
            x = module(x)
        return x


@pytest.mark.parametrize(  # builders, so that no weights are drawn at collection time
    ("build", "match"),
    [
        (Residual, "must be an nn.Sequential.*got Residual.*CurvlinopsGGN.*GGNInterface"),
        (
            lambda: ReversedSequential(nn.Linear(3, 3)),
            "must be an nn.Sequential.*ReversedSequential",
        ),
        (
            lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
            r"model\.1 is a normalisation",
        ),
        (
            lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)),
            "normalisation.*CurvlinopsGGN",
        ),
        (
            lambda: nn.Sequential(nn.Sequential(nn.GroupNorm(1, 3))),
            r"model\.0\.0 is a normalisation",
        ),
        (
            lambda: nn.Sequential(nn.Linear(3, 4), nn.Softplus()),
            "no extension for model.1 .Softplus",
        ),
        (
            lambda: nn.Sequential(nn.Linear(3, 4), Residual()),
            "no extension for model.1 .Residual",
        ),
    ],
    ids=[
        "custom-forward",
        "sequential-subclass",
        "batchnorm",
        "layernorm",
        "groupnorm",
        "softplus",
        "nested-custom",
    ],
)
@pytest.mark.parametrize("backend", [BackPackGGN, BackPackEF], ids=lambda b: b.__name__)
def test_unsupported_models_raise_at_construction(backend, build, match):
    torch.manual_seed(0)
    model = build()
    with pytest.raises(ValueError, match=match):
        backend(model, "regression")


def test_last_layer_must_be_supported():
    model = LastLayerModel(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match=r"model\.last_layer .*normalisation"):
        BackPackGGN(model, "regression", last_layer=True)
    BackPackGGN(LastLayerModel(make_mlp()), "regression", last_layer=True)


def test_input_and_structure_errors():
    model, x, y, _ = setup("mlp", "classification")
    backend = BackPackGGN(model, "classification")
    with pytest.raises(ValueError, match="dict-like.*CurvlinopsGGN"):
        backend.jacobians({"input_ids": x})
    with pytest.raises(ValueError, match="dict-like"):
        backend.full({"input_ids": x, "labels": y}, y)
    with pytest.raises(NotImplementedError, match="'kron'.*'diag', 'full'"):
        BackPackEF(model, "classification").kron(x, y, N=12)
    with pytest.raises(ValueError, match="N must be a positive integer"):
        backend.kron(x, y, N=0)
    with pytest.raises(ValueError, match="labels must lie"):
        backend.diag(x, y + 5)
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 2))
    g = torch.Generator().manual_seed(1)
    x_grouped, y_grouped = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, generator=g)
    with pytest.raises(ValueError, match="groups=1.*groups=2"):
        BackPackGGN(grouped, "regression").kron(x_grouped, y_grouped, N=4)
    with pytest.raises(ValueError, match="num_samples"):
        BackPackGGN(model, "classification", stochastic=True, num_samples=0)
    with pytest.raises(TypeError, match="stochastic"):
        BackPackEF(model, "classification", stochastic=True)


def test_capabilities_and_dtype():
    assert BackPackGGN.structures == {"full", "diag", "kron"}
    assert BackPackEF.structures == {HessianStructure.FULL, HessianStructure.DIAG}
    for backend in (BackPackInterface, BackPackGGN, BackPackEF):
        assert not backend.supports_dict_inputs and backend.supports_backprop
    model = make_mlp().float()
    x, y = make_data("classification")
    _, H = BackPackGGN(model, "classification").full(x.float(), y)
    _, kron = BackPackGGN(model, "classification").kron(x.float(), y, N=12)
    assert H.dtype == torch.float32 and kron.kfacs[0][1].dtype == torch.float32


# ---------------------------------------------------------------------------- Laplace classes
def fit_and_predict(laplace_cls: type, backend: type, model_name: str, likelihood: str):
    model, x, y, _ = setup(model_name, likelihood)
    la = laplace_cls(model, likelihood, backend=backend, prior_precision=0.7)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=5))
    prediction = la(x[:4])
    outputs = prediction if isinstance(prediction, tuple) else (prediction,)
    return la.log_marginal_likelihood(), *outputs


CURVLINOPS: dict[type, type] = {BackPackGGN: CurvlinopsGGN, BackPackEF: CurvlinopsEF}


@pytest.mark.parametrize(
    ("laplace_cls", "backend"),
    [
        (FullLaplace, BackPackGGN),
        (DiagLaplace, BackPackGGN),
        (KronLaplace, BackPackGGN),
        (FullLaplace, BackPackEF),
        (DiagLaplace, BackPackEF),
    ],
    ids=lambda v: v.__name__,
)
@models
def test_laplace_classes_agree_with_curvlinops(laplace_cls, backend, model_name, likelihood):
    ours = fit_and_predict(laplace_cls, backend, model_name, likelihood)
    theirs = fit_and_predict(laplace_cls, CURVLINOPS[backend], model_name, likelihood)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)
