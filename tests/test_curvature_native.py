"""The native torch.func backends against the brute-force references of tests/groundtruth.py."""

from __future__ import annotations

from collections import UserDict
from typing import ClassVar

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from groundtruth import (
    dense_ef,
    dense_ggn,
    dense_jacobians,
    per_sample_gradients,
    total_loss,
)
from torch import Tensor, nn

from laplace.curvature.curvature import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    _softmax_hessian_root,
)
from laplace.utils.enums import HessianStructure, Likelihood

TOL = {"atol": 1e-10, "rtol": 1e-10}
MODEL_KINDS = ["mlp", "cnn", "frozen", "dict", "userdict"]


class DictModel(nn.Module):
    """Reads its input from a dict-like batch under ``"input_ids"``, checking it is intact."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        assert batch["note"] == "shared by the batch"
        assert len(batch["labels"]) == len(batch["input_ids"])
        return self.net(batch["input_ids"])


class TinyExtractor(nn.Module):
    """A minimal feature extractor: a tanh body and a linear ``last_layer``."""

    def __init__(self, n_in: int = 3, n_features: int = 4, n_out: int = 2) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Linear(n_in, n_features), nn.Tanh())
        self.last_layer = nn.Linear(n_features, n_out)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        phi = self.body(x)
        return self.last_layer(phi), phi

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_features(x)[0]


def setup(kind: str, likelihood: str):
    """``(model, x, reference model, reference x, y)``; the reference takes tensors."""
    if kind == "cnn":
        model = make_cnn()
        x, y = make_data(likelihood, n_out=3, image=True)
        return model, x, model, x, y
    model = make_mlp()
    x, y = make_data(likelihood)
    if kind == "frozen":
        model[0].bias.requires_grad_(False)
    if kind in ("dict", "userdict"):
        mapping = dict if kind == "dict" else UserDict
        batch = mapping(input_ids=x, labels=y, note="shared by the batch")
        return DictModel(model), batch, model, x, y
    return model, x, model, x, y


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_jacobians_and_gradients(kind, likelihood):
    model, x, ref, x_ref, y = setup(kind, likelihood)
    backend = EFInterface(model, likelihood)
    Js, f = backend.jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(ref, x_ref), **TOL)
    torch.testing.assert_close(f, ref(x_ref).detach(), **TOL)
    assert not Js.requires_grad and not f.requires_grad
    Gs, loss = backend.gradients(x, y)
    torch.testing.assert_close(Gs, per_sample_gradients(ref, x_ref, y, likelihood), **TOL)
    torch.testing.assert_close(loss, total_loss(ref, x_ref, y, likelihood), **TOL)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize(
    ("backend_cls", "reference"),
    [(GGNInterface, dense_ggn), (EFInterface, dense_ef)],
    ids=["ggn", "ef"],
)
def test_full_and_diag(kind, backend_cls, reference, likelihood):
    model, x, ref, x_ref, y = setup(kind, likelihood)
    backend = backend_cls(model, likelihood)
    H_ref = reference(ref, x_ref, y, likelihood)
    loss_full, H = backend.full(x, y, N=100)
    loss_diag, h = backend.diag(x, y, N=100)
    torch.testing.assert_close(H, H_ref, **TOL)
    torch.testing.assert_close(h, H_ref.diagonal(), **TOL)
    for loss in (loss_full, loss_diag):
        torch.testing.assert_close(loss, total_loss(ref, x_ref, y, likelihood), **TOL)


def test_loss_convention(likelihood):
    model = make_mlp()
    x, y = make_data(likelihood)
    loss, _ = GGNInterface(model, likelihood).diag(x, y)
    f = model(x).detach()
    if likelihood == "regression":
        expected = 0.5 * ((f - y) ** 2).sum()
    else:
        expected = -torch.log_softmax(f, -1)[torch.arange(len(y)), y].sum()
    torch.testing.assert_close(loss, expected, **TOL)


def test_reward_modeling_is_classification():
    model = make_mlp()
    x, y = make_data("classification")
    backend = GGNInterface(model, "reward_modeling")
    assert backend.likelihood == Likelihood.CLASSIFICATION and backend.factor == 1.0
    torch.testing.assert_close(backend.full(x, y)[1], dense_ggn(model, x, y, "classification"))


@pytest.mark.parametrize("outputs", [1, 2, 3, 10])
@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
def test_softmax_hessian_root_has_one_row_fewer(outputs, scale):
    """``R^T R`` is the cross-entropy output Hessian, also when probabilities underflow."""
    generator = torch.Generator().manual_seed(outputs)
    f = scale * torch.randn(7, outputs, generator=generator, dtype=torch.float64)
    f[0] = 0.0  # uniform probabilities: every class ties for the most probable
    p = torch.softmax(f, dim=-1)
    hessian = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    R = _softmax_hessian_root(f)
    assert R.shape == (7, outputs - 1, outputs)
    assert torch.isfinite(R).all()
    torch.testing.assert_close(R.transpose(1, 2) @ R, hessian, atol=1e-14, rtol=0)


def test_mc_ggn_converges_to_exact_ggn(likelihood):
    model = make_mlp()
    x, y = make_data(likelihood)
    H_exact = dense_ggn(model, x, y, likelihood)
    errors = []
    for num_samples in (4, 100, 2000):
        backend = GGNInterface(model, likelihood, stochastic=True, num_samples=num_samples)
        _, H = backend.full(x, y, generator=torch.Generator().manual_seed(0))
        errors.append(((H - H_exact).norm() / H_exact.norm()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


def test_mc_ggn_is_reproducible_and_diag_matches_full(likelihood):
    model = make_mlp()
    x, y = make_data(likelihood)
    backend = GGNInterface(
        model,
        likelihood,
        stochastic=True,
        num_samples=3,
        generator=torch.Generator().manual_seed(5),
    )
    _, H = backend.full(x, y, generator=torch.Generator().manual_seed(1))
    _, h = backend.diag(x, y, generator=torch.Generator().manual_seed(1))
    _, h_other = backend.diag(x, y)
    torch.testing.assert_close(h, H.diagonal(), **TOL)
    assert not torch.allclose(h, h_other)
    assert not torch.allclose(H, dense_ggn(model, x, y, likelihood))


@pytest.mark.parametrize(
    ("backend_cls", "reference"),
    [(GGNInterface, dense_ggn), (EFInterface, dense_ef)],
    ids=["ggn", "ef"],
)
def test_subnetwork_indices_restrict_everything(backend_cls, reference, likelihood):
    model = make_mlp()
    x, y = make_data(likelihood)
    n_params = sum(p.numel() for p in model.parameters())
    idx = torch.tensor([n_params - 1, 0, 4, 17, 20])
    backend = backend_cls(model, likelihood, subnetwork_indices=idx)
    H_ref = reference(model, x, y, likelihood)[idx][:, idx]
    torch.testing.assert_close(backend.jacobians(x)[0], dense_jacobians(model, x)[..., idx], **TOL)
    G_ref = per_sample_gradients(model, x, y, likelihood)[:, idx]
    torch.testing.assert_close(backend.gradients(x, y)[0], G_ref, **TOL)
    torch.testing.assert_close(backend.full(x, y)[1], H_ref, **TOL)
    torch.testing.assert_close(backend.diag(x, y)[1], H_ref.diagonal(), **TOL)


def linear_jacobians(phi: Tensor, n_out: int) -> Tensor:
    """``I ⊗ phi`` for the weight of a linear layer, then the identity for its bias."""
    eye = torch.eye(n_out, dtype=phi.dtype)
    weight = torch.einsum("ce,bd->bced", eye, phi).flatten(2)
    return torch.cat([weight, eye.expand(len(phi), n_out, n_out)], dim=2)


@pytest.mark.parametrize(
    ("backend_cls", "reference"),
    [(GGNInterface, dense_ggn), (EFInterface, dense_ef)],
    ids=["ggn", "ef"],
)
def test_last_layer(backend_cls, reference, likelihood):
    model = TinyExtractor()
    x, y = make_data(likelihood)
    _, phi = model.forward_with_features(x)
    phi = phi.detach()
    backend = backend_cls(model, likelihood, last_layer=True)
    assert len(backend.params) == 2 and backend.params[0] is model.last_layer.weight
    Js, f = backend.jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(model.last_layer, phi), **TOL)
    torch.testing.assert_close(Js, linear_jacobians(phi, 2), **TOL)
    torch.testing.assert_close(f, model(x).detach(), **TOL)
    torch.testing.assert_close(backend.last_layer_jacobians(x)[0], Js, **TOL)
    all_weights = backend_cls(model, likelihood)
    torch.testing.assert_close(all_weights.last_layer_jacobians(x)[0], Js, **TOL)
    H_ref = reference(model.last_layer, phi, y, likelihood)
    torch.testing.assert_close(backend.full(x, y)[1], H_ref, **TOL)
    torch.testing.assert_close(backend.diag(x, y)[1], H_ref.diagonal(), **TOL)


def input_gradient(Js: Tensor, f: Tensor, x: Tensor) -> Tensor:
    return torch.autograd.grad((Js**2).sum() + (f**3).sum(), x)[0]


def test_enable_backprop_mlp():
    model = make_mlp()
    x, _ = make_data("regression")
    x.requires_grad_(True)
    backend = GGNInterface(model, "regression")
    expected = input_gradient(dense_jacobians(model, x), model(x), x)
    Js, f = backend.jacobians(x, enable_backprop=True)
    torch.testing.assert_close(input_gradient(Js, f, x), expected, **TOL)
    Js, f = backend.jacobians(x)
    assert not Js.requires_grad and not f.requires_grad


def test_enable_backprop_last_layer():
    model = TinyExtractor()
    x, _ = make_data("classification")
    x.requires_grad_(True)
    _, phi = model.forward_with_features(x)
    expected = input_gradient(linear_jacobians(phi, 2), model(x), x)
    for backend in (
        GGNInterface(model, "classification", last_layer=True),
        EFInterface(model, "classification"),
    ):
        Js, f = backend.last_layer_jacobians(x, enable_backprop=True)
        torch.testing.assert_close(input_gradient(Js, f, x), expected, **TOL)


def test_dtype_follows_model():
    model = make_mlp().float()
    x, y = make_data("classification")
    _, H = GGNInterface(model, "classification").full(x.float(), y)
    Js, _ = EFInterface(model, "classification").jacobians(x.float())
    assert H.dtype == torch.float32 and Js.dtype == torch.float32


def test_capabilities_are_declared():
    full_diag = frozenset({HessianStructure.FULL, HessianStructure.DIAG})
    for backend_cls in (GGNInterface, EFInterface):
        assert backend_cls.structures == full_diag
        assert backend_cls.supports_dict_inputs and backend_cls.supports_backprop


class KronOnly(CurvatureInterface):
    """Declares kron without implementing it, to test the shared structure checks."""

    structures: ClassVar[frozenset[HessianStructure]] = frozenset({HessianStructure.KRON})


def test_kron_with_subnetwork_indices_raises():
    x, y = make_data("classification")
    with pytest.raises(ValueError, match="KronOnly cannot compute 'kron'.*subnetwork"):
        KronOnly(make_mlp(), "classification", subnetwork_indices=torch.tensor([0])).kron(x, y, 1)
    with pytest.raises(NotImplementedError, match="KronOnly does not compute 'full'.*'kron'"):
        KronOnly(make_mlp(), "classification").full(x, y)


def frozen_mlp() -> nn.Module:
    return make_mlp().requires_grad_(False)


def nan_mlp() -> nn.Module:
    model = make_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    return model


X, Y_CLS = make_data("classification")
_, Y_REG = make_data("regression")
CONSTRUCTION_ERRORS = {
    "unknown-likelihood": (lambda: GGNInterface(make_mlp(), "poisson"), ValueError, "likelihood"),
    "no-trainable": (lambda: EFInterface(frozen_mlp(), "regression"), ValueError, "requires_grad"),
    "not-extractor": (
        lambda: GGNInterface(make_mlp(), "regression", last_layer=True),
        ValueError,
        "feature extractor",
    ),
    "float-indices": (
        lambda: GGNInterface(make_mlp(), "regression", subnetwork_indices=torch.tensor([0.0])),
        ValueError,
        "subnetwork_indices",
    ),
    "indices-out-of-range": (
        lambda: GGNInterface(make_mlp(), "regression", subnetwork_indices=torch.tensor([32])),
        ValueError,
        r"\[0, 32\)",
    ),
    "duplicate-indices": (
        lambda: GGNInterface(make_mlp(), "regression", subnetwork_indices=torch.tensor([1, 1])),
        ValueError,
        "distinct",
    ),
    "zero-samples": (
        lambda: GGNInterface(make_mlp(), "regression", stochastic=True, num_samples=0),
        ValueError,
        "num_samples",
    ),
    "unknown-kwarg": (
        lambda: EFInterface(make_mlp(), "regression", stochastic=True),
        TypeError,
        "EFInterface",
    ),
}


@pytest.mark.parametrize("case", CONSTRUCTION_ERRORS.values(), ids=CONSTRUCTION_ERRORS.keys())
def test_construction_errors(case):
    build, error, message = case
    with pytest.raises(error, match=message):
        build()


CALL_ERRORS = {
    "float-labels": (
        "classification",
        lambda b: b.full(X, Y_CLS.double()),
        ValueError,
        "integer labels",
    ),
    "label-out-of-range": (
        "classification",
        lambda b: b.diag(X, Y_CLS + 2),
        ValueError,
        r"\[0, 2\)",
    ),
    "label-shape": (
        "classification",
        lambda b: b.gradients(X, Y_CLS[:, None]),
        ValueError,
        r"shape \(12,\), got \(12, 1\)",
    ),
    "integer-regression-targets": (
        "regression",
        lambda b: b.full(X, Y_REG.long()),
        ValueError,
        "floating",
    ),
    "regression-shape": ("regression", lambda b: b.diag(X, Y_REG[:, 0]), ValueError, r"\(12, 2\)"),
    "kron": ("regression", lambda b: b.kron(X, Y_REG, 12), NotImplementedError, "'diag', 'full'"),
    "missing-dict-key": ("regression", lambda b: b.jacobians({"x": X}), ValueError, "input_ids"),
    "list-input": ("regression", lambda b: b.jacobians([X]), ValueError, "dict-like"),
    "not-extractor": (
        "regression",
        lambda b: b.last_layer_jacobians(X),
        ValueError,
        "feature extractor",
    ),
}


@pytest.mark.parametrize("backend_cls", [GGNInterface, EFInterface], ids=["ggn", "ef"])
@pytest.mark.parametrize("case", CALL_ERRORS.values(), ids=CALL_ERRORS.keys())
def test_call_errors(case, backend_cls):
    likelihood, call, error, message = case
    backend = backend_cls(make_mlp(), likelihood)
    with pytest.raises(error, match=message):
        call(backend)
    if error is NotImplementedError:
        with pytest.raises(error, match=backend_cls.__name__):
            call(backend)


@pytest.mark.parametrize("backend_cls", [GGNInterface, EFInterface], ids=["ggn", "ef"])
@pytest.mark.parametrize("method", ["full", "diag"])
def test_nan_curvature_raises(backend_cls, method, likelihood):
    x, y = make_data(likelihood)
    backend = backend_cls(nan_mlp(), likelihood)
    with pytest.raises(ValueError, match="curvature contains NaN or Inf.*model"):
        getattr(backend, method)(x, y)


def test_non_matrix_output_raises():
    model = nn.Sequential(make_mlp(), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"\(batch, outputs\)"):
        GGNInterface(model, "regression").jacobians(X)


@pytest.mark.parametrize("variant", ["mlp", "frozen", "dict", "wide", "subnetwork", "last_layer"])
def test_ggn_diag_of_linear_networks_skips_the_jacobians(monkeypatch, variant, likelihood):
    """Networks of Linear layers get the GGN diagonal from layer factors, equal to dense."""
    kind = variant if variant in ("frozen", "dict") else "mlp"
    model, x, ref, x_ref, y = setup(kind, likelihood)
    options, index = {}, slice(None)
    if variant == "wide":
        model = ref = make_mlp(n_out=4, seed=3)
        x, y = make_data(likelihood, n_out=4)
        x_ref = x
    if variant == "subnetwork":
        index = torch.tensor([30, 0, 4, 17, 20])
        options["subnetwork_indices"] = index
    if variant == "last_layer":
        model = TinyExtractor()
        x_ref = model.forward_with_features(x)[1].detach()
        ref = model.last_layer
        options["last_layer"] = True
    for rows in (True, False):  # both sampled and exact output Hessian roots
        backend = GGNInterface(model, likelihood, stochastic=not rows, num_samples=3, **options)
        monkeypatch.setattr(
            GGNInterface, "jacobians", lambda *a, **k: pytest.fail("formed the Jacobians")
        )
        loss, h = backend.diag(x, y, generator=torch.Generator().manual_seed(5))
        monkeypatch.undo()
        _, H = backend.full(x, y, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(h, H.diagonal(), **TOL)
        if rows:
            H_ref = dense_ggn(ref, x_ref, y, likelihood)
            torch.testing.assert_close(h, H_ref.diagonal()[index], **TOL)
            torch.testing.assert_close(loss, total_loss(ref, x_ref, y, likelihood), **TOL)
