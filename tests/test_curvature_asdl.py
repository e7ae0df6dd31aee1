"""The ASDL backends (module ``asdl``) and the legacy-named ``asdfghjkl`` ones.

Checked in float64 against the brute-force references of tests/groundtruth.py and, for
K-FAC, factor for factor against the curvlinops backends.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from groundtruth import (
    dense_ef,
    dense_ggn,
    dense_hessian,
    dense_jacobians,
    per_sample_gradients,
    total_loss,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import laplace.curvature.asdfghjkl as legacy
from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature.asdl import AsdlEF, AsdlGGN, AsdlHessian, AsdlInterface
from laplace.curvature.curvlinops import CurvlinopsEF, CurvlinopsGGN
from laplace.utils.enums import HessianStructure

TOL = {"atol": 1e-9, "rtol": 1e-9}
REFERENCES = {AsdlGGN: dense_ggn, AsdlEF: dense_ef, AsdlHessian: dense_hessian}
CURVLINOPS = {AsdlGGN: CurvlinopsGGN, AsdlEF: CurvlinopsEF}
TASKS = ["classification", "regression", "regression-1d"]
RESULT_ATTR = "laplace_asdl_result"


class DictModel(nn.Module):
    """Reads its input from a dict-like batch, as Hugging Face models do."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["input_ids"])


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


def sequence_mlp(n_out: int) -> nn.Module:
    """A linear layer applied to 5 positions per sample (weight sharing), then a head."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(20, n_out)).double()


def setup(kind: str, task: str, n: int = 12):
    """``(model, x, reference model, reference x, y, likelihood)``; references take tensors."""
    likelihood = task.removesuffix("-1d")
    n_out = 1 if task.endswith("-1d") else (3 if kind == "cnn" else 2)
    x, y = make_data(likelihood, n=n, n_out=n_out, image=kind == "cnn")
    if kind == "cnn":
        model = make_cnn(n_out=n_out)
    elif kind == "sequence":
        model = sequence_mlp(n_out)
        x = torch.randn(n, 5, 3, generator=torch.Generator().manual_seed(4))
    else:
        model = make_mlp(n_out=n_out)
    if kind == "dict":
        return DictModel(model), {"input_ids": x, "labels": y}, model, x, y, likelihood
    return model, x, model, x, y, likelihood


def assert_untouched(model: nn.Module) -> None:
    """No gradients written and no ASDL result left on the model."""
    assert all(p.grad is None for p in model.parameters())
    assert not any(hasattr(m, RESULT_ATTR) for m in model.modules())


def assert_same_kron(kron, expected) -> None:
    """The same blocks with the same factors (so damping them also agrees)."""
    assert [len(f) for f in kron.kfacs] == [len(f) for f in expected.kfacs]
    for ours, theirs in zip(kron.kfacs, expected.kfacs):
        for F, G in zip(ours, theirs):
            torch.testing.assert_close(F, G, **TOL)


backends = pytest.mark.parametrize("backend", list(REFERENCES), ids=lambda b: b.__name__)
fisher_backends = pytest.mark.parametrize("backend", list(CURVLINOPS), ids=lambda b: b.__name__)
tasks = pytest.mark.parametrize("task", TASKS)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["mlp", "cnn", "dict", "sequence"])
@tasks
def test_jacobians_and_gradients_match_dense(kind, task):
    model, x, ref, x_ref, y, likelihood = setup(kind, task)
    backend = AsdlEF(model, likelihood)
    Js, f = backend.jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(ref, x_ref), **TOL)
    torch.testing.assert_close(f, ref(x_ref).detach(), **TOL)
    assert not Js.requires_grad and not f.requires_grad
    Gs, loss = backend.gradients(x, y)
    torch.testing.assert_close(Gs, per_sample_gradients(ref, x_ref, y, likelihood), **TOL)
    torch.testing.assert_close(loss, total_loss(ref, x_ref, y, likelihood), **TOL)
    assert_untouched(model)


def test_jacobians_under_no_grad():
    model, x, *_ = setup("mlp", "regression")
    with torch.no_grad():
        Js, _ = AsdlGGN(model, "regression").jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(model, x), **TOL)


def input_gradient(Js: Tensor, f: Tensor, x: Tensor) -> Tensor:
    return torch.autograd.grad((Js**2).sum() + (f**3).sum(), x)[0]


def test_enable_backprop_falls_back_to_torch_func():
    model, x, *_ = setup("mlp", "classification")
    x.requires_grad_(True)
    assert AsdlGGN.supports_backprop
    expected = input_gradient(dense_jacobians(model, x), model(x), x)
    Js, f = AsdlGGN(model, "classification").jacobians(x, enable_backprop=True)
    torch.testing.assert_close(input_gradient(Js, f, x), expected, **TOL)


# ---------------------------------------------------------------------------- full / diag
CASES = [("mlp", task) for task in TASKS] + [
    ("cnn", "classification"),
    ("cnn", "regression-1d"),
    ("dict", "regression"),
]


@backends
@pytest.mark.parametrize(("kind", "task"), CASES, ids=["-".join(case) for case in CASES])
def test_full_and_diag_match_dense(backend, kind, task):
    model, x, ref, x_ref, y, likelihood = setup(kind, task)
    expected = REFERENCES[backend](ref, x_ref, y, likelihood)
    curvature = backend(model, likelihood)
    loss_full, H = curvature.full(x, y, N=30)
    loss_diag, h = curvature.diag(x, y, N=30)
    torch.testing.assert_close(H, expected, **TOL)
    torch.testing.assert_close(h, expected.diagonal(), **TOL)
    for loss in (loss_full, loss_diag):
        torch.testing.assert_close(loss, total_loss(ref, x_ref, y, likelihood), **TOL)
    assert_untouched(model)


def test_layer_norm_is_supported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = make_data("classification")
    for backend in (AsdlGGN, AsdlEF):
        expected = REFERENCES[backend](model, x, y, "classification")
        torch.testing.assert_close(backend(model, "classification").full(x, y)[1], expected)
        torch.testing.assert_close(
            backend(model, "classification").diag(x, y)[1], expected.diagonal()
        )
    with pytest.raises(ValueError, match="Linear, Conv2d layers.*'1.weight' is LayerNorm"):
        AsdlGGN(model, "classification").kron(x, y, N=12)


@backends
def test_subnetwork_indices_restrict_everything(backend):
    model, x, _, _, y, likelihood = setup("mlp", "regression")
    indices = torch.tensor([30, 0, 7, 21, 15])
    curvature = backend(model, likelihood, subnetwork_indices=indices)
    expected = REFERENCES[backend](model, x, y, likelihood)[indices][:, indices]
    torch.testing.assert_close(curvature.full(x, y)[1], expected, **TOL)
    torch.testing.assert_close(curvature.diag(x, y)[1], expected.diagonal(), **TOL)
    torch.testing.assert_close(curvature.jacobians(x)[0], dense_jacobians(model, x)[..., indices])
    G_ref = per_sample_gradients(model, x, y, likelihood)[:, indices]
    torch.testing.assert_close(curvature.gradients(x, y)[0], G_ref, **TOL)
    with pytest.raises((ValueError, NotImplementedError), match="kron"):
        curvature.kron(x, y, N=12)


@backends
def test_last_layer(backend, likelihood):
    net, x, _, _, y, _ = setup("mlp", likelihood)
    model = LastLayerModel(net)
    phi = model.body(x).detach()
    expected = REFERENCES[backend](model.last_layer, phi, y, likelihood)
    curvature = backend(model, likelihood, last_layer=True)
    assert curvature.params == list(model.last_layer.parameters())
    torch.testing.assert_close(curvature.full(x, y)[1], expected, **TOL)
    torch.testing.assert_close(curvature.diag(x, y)[1], expected.diagonal(), **TOL)
    Js, f = curvature.jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(model.last_layer, phi), **TOL)
    torch.testing.assert_close(f, model(x).detach(), **TOL)
    all_weights = backend(model, likelihood)
    torch.testing.assert_close(all_weights.last_layer_jacobians(x)[0], Js, **TOL)
    if backend in CURVLINOPS:
        _, kron = curvature.kron(x, y, N=20)
        _, expected_kron = CURVLINOPS[backend](model, likelihood, last_layer=True).kron(x, y, N=20)
        assert_same_kron(kron, expected_kron)


# ---------------------------------------------------------------------------- kron
@fisher_backends
@pytest.mark.parametrize("kind", ["mlp", "cnn", "dict", "sequence"])
@tasks
def test_kron_matches_curvlinops(backend, kind, task):
    model, x, _, _, y, likelihood = setup(kind, task)
    batch = {k: v[:7] for k, v in x.items()} if kind == "dict" else x[:7]
    loss, kron = backend(model, likelihood).kron(batch, y[:7], N=20)
    expected_loss, expected = CURVLINOPS[backend](model, likelihood).kron(batch, y[:7], N=20)
    assert_same_kron(kron, expected)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    assert_untouched(model)


def test_full_refuses_linear_weight_sharing():
    model, x, _, _, y, likelihood = setup("sequence", "regression")
    with pytest.raises(ValueError, match="full needs per-sample gradients.*diag or kron"):
        AsdlGGN(model, likelihood).full(x, y)
    assert_untouched(model)
    torch.testing.assert_close(
        AsdlHessian(model, likelihood).full(x, y)[1], dense_hessian(model, x, y, likelihood)
    )


# ---------------------------------------------------------------------------- Monte Carlo
def relative_error(estimate: Tensor, exact: Tensor) -> float:
    return ((estimate - exact).norm() / exact.norm()).item()


def test_mc_fisher_converges_to_ggn(likelihood):
    model, x, _, _, y, _ = setup("mlp", likelihood)
    exact = dense_ggn(model, x, y, likelihood)
    _, kron_exact = AsdlGGN(model, likelihood).kron(x, y, N=12)
    errors = {}
    for n in (1, 100):
        mc = AsdlGGN(
            model,
            likelihood,
            stochastic=True,
            num_samples=n,
            generator=torch.Generator().manual_seed(0),
        )
        _, H = mc.full(x, y)
        _, kron = mc.kron(x, y, N=12)
        errors[n] = (
            relative_error(H, exact),
            relative_error(kron.to_matrix(), kron_exact.to_matrix()),
        )
    assert all(one > many for one, many in zip(errors[1], errors[100]))
    assert min(errors[1]) > 1e-3 and max(errors[100]) < 0.1


def test_mc_diag_is_diagonal_of_mc_full(likelihood):
    model, x, _, _, y, _ = setup("mlp", likelihood)
    mc = AsdlGGN(model, likelihood, stochastic=True, num_samples=3)
    _, H = mc.full(x, y, seed=5)
    _, h = mc.diag(x, y, seed=5)
    torch.testing.assert_close(h, H.diagonal(), **TOL)
    assert not torch.allclose(H, dense_ggn(model, x, y, likelihood))


def test_mc_fisher_follows_generator_and_keeps_global_rng():
    model, x, _, _, y, likelihood = setup("mlp", "classification")
    mc = AsdlGGN(model, likelihood, stochastic=True, num_samples=2)
    state = torch.get_rng_state()
    draws = [mc.full(x, y, generator=torch.Generator().manual_seed(s))[1] for s in (3, 3, 4)]
    torch.testing.assert_close(draws[0], draws[1], atol=0, rtol=0)
    assert not torch.allclose(draws[0], draws[2])
    assert torch.equal(torch.get_rng_state(), state)
    assert_untouched(model)


# ---------------------------------------------------------------------------- options
def test_fisher_options_reach_asdl():
    model, x, _, _, y, likelihood = setup("mlp", "regression")
    mc = AsdlGGN(model, likelihood, stochastic=True, num_samples=3)
    _, H = mc.full(x, y, seed=7)
    _, H_again = mc.full(x, y, seed=7, generator=torch.Generator().manual_seed(1))
    _, H_var = mc.full(x, y, seed=7, var=4.0)
    torch.testing.assert_close(H_again, H, atol=0, rtol=0)
    torch.testing.assert_close(H_var, 4.0 * H, **TOL)
    _, kron = mc.kron(x, y, N=12, seed=7)
    _, kron_var = mc.kron(x, y, N=12, seed=7, var=4.0)
    torch.testing.assert_close(kron_var.to_matrix(), 4.0 * kron.to_matrix(), **TOL)
    _, H_hessian = AsdlHessian(model, likelihood).full(x, y, var=4.0, seed=1)
    torch.testing.assert_close(H_hessian, dense_hessian(model, x, y, likelihood), **TOL)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"n_mc_samples": 3}, TypeError, r"\['n_mc_samples'\].*\['seed', 'var'\]"),
        ({"var": 0.0}, ValueError, "var must be a positive number, got 0.0"),
        ({"var": True}, ValueError, "var must be"),
        ({"seed": 1.5}, ValueError, "seed must be an integer"),
    ],
    ids=["unknown", "zero-var", "bool-var", "float-seed"],
)
@backends
def test_bad_fisher_options(backend, options, error, message):
    model, x, _, _, y, likelihood = setup("mlp", "regression")
    with pytest.raises(error, match=message):
        backend(model, likelihood).diag(x, y, **options)
    assert_untouched(model)


def loader(x: Tensor, y: Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=5)


def test_laplace_passes_asdl_fisher_kwargs():
    model, x, _, _, y, likelihood = setup("mlp", "regression")
    curvatures = []
    for var in (1.0, 2.5):
        la = DiagLaplace(
            model,
            likelihood,
            backend=AsdlGGN,
            backend_kwargs={"stochastic": True, "num_samples": 2},
            asdl_fisher_kwargs={"var": var, "seed": 3},
        )
        la.fit(loader(x, y))
        curvatures.append(la._curvature.to_dense())
    torch.testing.assert_close(curvatures[1], 2.5 * curvatures[0], **TOL)


# ---------------------------------------------------------------------------- Laplace
@pytest.mark.parametrize("laplace_cls", [FullLaplace, DiagLaplace, KronLaplace])
def test_laplace_with_asdl_equals_curvlinops(laplace_cls, likelihood):
    model, x, _, _, y, _ = setup("mlp", likelihood)
    fitted = []
    for backend in (AsdlGGN, CurvlinopsGGN):
        la = laplace_cls(model, likelihood, backend=backend, prior_precision=0.5)
        la.fit(loader(x, y))
        fitted.append(la)
    ours, theirs = fitted
    torch.testing.assert_close(ours.log_marginal_likelihood(), theirs.log_marginal_likelihood())
    prior = torch.tensor(2.0)
    torch.testing.assert_close(
        ours.log_marginal_likelihood(prior_precision=prior),
        theirs.log_marginal_likelihood(prior_precision=prior),
    )
    for prediction, expected in zip(ours(x[:4]), theirs(x[:4])):
        torch.testing.assert_close(prediction, expected)
    assert_untouched(model)


# ---------------------------------------------------------------------------- capabilities
def test_declared_capabilities():
    full, diag, kron = HessianStructure.FULL, HessianStructure.DIAG, HessianStructure.KRON
    assert AsdlGGN.structures == AsdlEF.structures == {full, diag, kron}
    assert AsdlHessian.structures == {full, diag}
    assert AsdlInterface.structures == frozenset()
    for backend in (AsdlGGN, AsdlEF, AsdlHessian):
        assert backend.supports_dict_inputs and backend.supports_backprop
    assert AsdlGGN.psd_curvature and AsdlEF.psd_curvature and not AsdlHessian.psd_curvature


def test_hessian_has_no_kron_and_n_is_checked():
    model, x, _, _, y, likelihood = setup("mlp", "classification")
    with pytest.raises(NotImplementedError, match=r"AsdlHessian.*'kron'.*'diag', 'full'"):
        AsdlHessian(model, likelihood).kron(x, y, N=12)
    for bad in (0, 2.5, None, True):
        with pytest.raises(ValueError, match="N must be a positive integer"):
            AsdlGGN(model, likelihood).kron(x, y, N=bad)


class Scaled(nn.Module):
    """A layer ASDL does not know: an elementwise scale."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def tied_linears() -> nn.Module:
    first, second = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    second.weight = first.weight
    return nn.Sequential(first, second)


UNSUPPORTED = {
    "unknown-layer": (lambda: nn.Sequential(make_mlp(), Scaled()), r"'1.scale' is Scaled.scale"),
    "tied-weights": (tied_linears, "each owned by one layer"),
    "grouped-conv": (
        lambda: nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).double(),
        "groups=1",
    ),
    "dilated-conv": (
        lambda: nn.Sequential(nn.Conv2d(2, 1, 3, dilation=2), nn.Flatten()).double(),
        "dilation=1",
    ),
}


@pytest.mark.parametrize("case", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_layers_raise(case):
    build, message = case
    torch.manual_seed(0)  # the initial weights of the layers the builders create
    model = build()
    g = torch.Generator().manual_seed(1)
    shape = (4, 2, 6, 6) if isinstance(model[0], nn.Conv2d) else (4, 3)
    x = torch.randn(shape, generator=g)
    y = model(x).detach()
    backend = AsdlGGN(model, "regression")
    for call in (
        lambda: backend.jacobians(x),
        lambda: backend.gradients(x, y),
        lambda: backend.diag(x, y),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_hessian_diag_needs_weights_and_biases_full_does_not():
    model = nn.Sequential(make_mlp(), Scaled())
    x, y = make_data("regression")
    expected = dense_hessian(model, x, y, "regression")
    torch.testing.assert_close(AsdlHessian(model, "regression").full(x, y)[1], expected, **TOL)
    with pytest.raises(ValueError, match=r"'1.scale' is Scaled.scale"):
        AsdlHessian(model, "regression").diag(x, y)


@pytest.mark.parametrize("method", ["full", "diag", "kron"])
def test_bad_targets_and_nan_curvature_raise_and_clean_up(method):
    model, x, _, _, y, likelihood = setup("mlp", "classification")
    with pytest.raises(ValueError, match="integer labels"):
        getattr(AsdlGGN(model, likelihood), method)(x, y.double(), N=12)
    assert_untouched(model)
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        getattr(AsdlEF(model, likelihood), method)(x, y, N=12)
    assert_untouched(model)


def test_float32_stays_float32():
    model, x, _, _, y, likelihood = setup("mlp", "regression")
    model = model.float()
    expected = dense_ggn(model.double(), x, y, likelihood)
    model = model.float()
    curvature = AsdlGGN(model, likelihood)
    loss, H = curvature.full(x.float(), y.float())
    _, kron = curvature.kron(x.float(), y.float(), N=12)
    assert H.dtype == loss.dtype == torch.float32
    assert all(F.dtype == torch.float32 for f in kron.kfacs for F in f)
    torch.testing.assert_close(H.double(), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- legacy module
LEGACY = {
    legacy.AsdfghjklGGN: AsdlGGN,
    legacy.AsdfghjklEF: AsdlEF,
    legacy.AsdfghjklHessian: AsdlHessian,
}
CAPABILITIES = ("structures", "supports_dict_inputs", "supports_backprop", "psd_curvature")


@pytest.mark.parametrize("legacy_cls", [*LEGACY, legacy.AsdfghjklInterface])
def test_legacy_classes_raise_without_legacy_module(legacy_cls, monkeypatch):
    monkeypatch.setattr(legacy, "_legacy_module_installed", lambda: False)
    model, *_ = setup("mlp", "regression")
    with pytest.raises(ImportError) as info:
        legacy_cls(model, "regression")
    message = str(info.value)
    assert legacy_cls.__name__ in message and "legacy `asdfghjkl` module" in message
    assert "pip install asdfghjkl==0.1a2" in message
    assert "AsdlGGN, AsdlEF and AsdlHessian" in message and "asdfghjkl 0.1a4" in message


def test_legacy_module_is_absent_here():
    assert importlib.util.find_spec("asdfghjkl") is None
    assert not legacy._legacy_module_installed()


@pytest.mark.parametrize("legacy_cls", list(LEGACY), ids=lambda c: c.__name__)
def test_legacy_classes_delegate_when_legacy_module_present(legacy_cls, monkeypatch):
    monkeypatch.setattr(legacy, "_legacy_module_installed", lambda: True)
    maintained = LEGACY[legacy_cls]
    for attribute in CAPABILITIES:
        assert getattr(legacy_cls, attribute) == getattr(maintained, attribute)
    model, x, _, _, y, likelihood = setup("mlp", "classification")
    curvature = legacy_cls(model, likelihood)
    assert isinstance(curvature, maintained)
    torch.testing.assert_close(
        curvature.full(x, y)[1], maintained(model, likelihood).full(x, y)[1]
    )


def test_legacy_module_imports_without_asdl(monkeypatch):
    monkeypatch.setitem(sys.modules, "laplace.curvature.asdl", None)
    spec = importlib.util.spec_from_file_location("legacy_copy", legacy.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    monkeypatch.setattr(copy, "_legacy_module_installed", lambda: True)
    model, *_ = setup("mlp", "regression")
    for name in ("AsdfghjklGGN", "AsdfghjklEF", "AsdfghjklHessian"):
        legacy_cls = getattr(copy, name)
        for attribute in CAPABILITIES:
            assert getattr(legacy_cls, attribute) == getattr(getattr(legacy, name), attribute)
        with pytest.raises(ImportError, match=rf"{name} delegates to the `asdl` module"):
            legacy_cls(model, "regression")
