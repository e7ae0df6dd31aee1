"""The Kron and diag GLM variance of CNNs from per-layer convolution factors equals the dense
``J P^-1 J^T`` of brute-force Jacobians; unsupported convolutions fall back to Jacobians."""

from __future__ import annotations

import copy
import math

import float32_truth as T
import pytest
import torch
from groundtruth import dense_ggn, dense_jacobians, random_spd
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace.utils.conv_jacobians as conv_jacobians
from laplace import DiagLaplace, DiagSubnetLaplace, FullLaplace, KronLaplace
from laplace.utils.conv_jacobians import factored_conv_form
from laplace.utils.linear_jacobians import linear_jacobian_factors, partial_linear_factors
from laplace.utils.matrix import Kron, KronDecomposed

CLASSES = {"kron": KronLaplace, "diag": DiagLaplace}


def strided_cnn(n_out: int) -> nn.Module:
    """Two convolutions that take both orders of rotation (``L >= in`` and ``L < in``), a
    stride, padding, a dilation and a convolution without bias; 2x7x7 inputs."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(3, 4, (3, 2), stride=2, dilation=(1, 2), padding=(1, 0), bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 3, n_out),
    )


def same_padding_cnn(n_out: int) -> nn.Module:
    """``padding="same"`` (odd kernels) and ``"valid"``, then two linear layers."""
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding="same"),
        nn.Tanh(),
        nn.Conv2d(2, 3, 5, padding="valid", dilation=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
        nn.Tanh(),
        nn.Linear(4, n_out),
    )


def pooled_cnn(n_out: int) -> nn.Module:
    """A convolution whose ``L`` exceeds ``outputs * out`` and its input side, max-pooling."""
    return nn.Sequential(
        nn.Conv2d(2, 1, 2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(9, n_out),
    )


MODELS = {"strided": strided_cnn, "same": same_padding_cnn, "pooled": pooled_cnn}


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, 7, 7, generator=torch.Generator().manual_seed(seed))


def fitted(cls, model: nn.Module, likelihood: str, n_out: int, **kwargs):
    g = torch.Generator().manual_seed(3)
    x = images(16, seed=1)
    y = torch.randint(n_out, (16,), generator=g)
    if likelihood == "regression":
        y = torch.randn(16, n_out, generator=g)
    prior = torch.linspace(0.3, 1.2, sum(1 for _ in model.parameters()))
    la = cls(model, likelihood, prior_precision=prior, **kwargs)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=8))
    return la


def dense_variance(la, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    Js = dense_jacobians(model, x)
    if isinstance(la, KronLaplace):
        cov = la.posterior_precision.to_matrix(exponent=-1)
    else:
        cov = torch.diag(la.posterior_variance)
    return Js @ cov @ Js.mT


def no_jacobians(monkeypatch, la) -> None:
    """Make the Jacobian path fail, so that only the factored path can answer."""

    def refuse(*args, **kwargs):
        raise AssertionError("the factored predictive fell back to Jacobians")

    monkeypatch.setattr(la.subset, "jacobians", refuse)
    monkeypatch.setattr(la.backend, "jacobians", refuse)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("structure", list(CLASSES))
def test_conv_variance_matches_dense(monkeypatch, structure, model_kind, likelihood):
    torch.manual_seed(0)
    n_out = 3 if likelihood == "classification" else 2
    model = MODELS[model_kind](n_out).double()
    la = fitted(CLASSES[structure], model, likelihood, n_out)
    x = images(5, seed=2)
    expected = dense_variance(la, model, x)
    no_jacobians(monkeypatch, la)
    f_mu, f_var = la._glm_predictive_distribution(x)
    torch.testing.assert_close(f_var, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f_mu, model(x))
    if likelihood == "classification":
        la(x, pred_type="glm", link_approx="probit")  # the public call takes the same path


def test_damped_kron_and_chunks_over_samples_and_outputs(monkeypatch):
    """With ``2**20`` lowered to a few entries, ``M`` is formed one output (and sample) at a
    time; the result does not change."""
    torch.manual_seed(1)
    model = strided_cnn(5).double()
    la = fitted(KronLaplace, model, "regression", 5, damping=True)
    x = images(4, seed=2)
    expected = dense_variance(la, model, x)
    no_jacobians(monkeypatch, la)
    for entries in (2**20, 200, 60, 1):
        monkeypatch.setattr(conv_jacobians, "_CHUNK_ENTRIES", entries)
        la._predictive_memo = None
        torch.testing.assert_close(la._glm_predictive_distribution(x)[1], expected)


@pytest.mark.parametrize(
    ("L", "i", "C", "o"), [(9, 4, 3, 2), (3, 12, 3, 2), (5, 12, 1, 2), (6, 4, 1, 1)]
)
@pytest.mark.parametrize("chunk", [2**20, 7])
def test_factored_conv_form_in_every_rotation_order(monkeypatch, L, i, C, o, chunk):
    """Rotating the gradients, the patches or ``M`` gives ``sum M_c M_d w`` for the rotated
    per-sample Jacobians ``M_c = Q_0^T (sum_l g_cl a_l^T) Q_1``."""
    monkeypatch.setattr(conv_jacobians, "_CHUNK_ENTRIES", chunk)
    g = torch.Generator().manual_seed(0)
    b = 4
    G = [torch.randn(b, o, L, generator=g) for _ in range(C)]
    a = torch.randn(b, i, L, generator=g)
    Q0 = torch.linalg.qr(torch.randn(o, o, generator=g))[0]
    Q1 = torch.linalg.qr(torch.randn(i, i, generator=g))[0]
    w = torch.rand(o, i, generator=g)
    M = torch.stack([torch.einsum("bol,bil->boi", G_c, a) for G_c in G], 1)
    rotated = Q0.T @ M @ Q1
    expected = torch.einsum("bcoi,bdoi,oi->bcd", rotated, rotated, w)
    torch.testing.assert_close(factored_conv_form(G, a, w, bases=(Q0, Q1)), expected)
    plain = torch.einsum("bcoi,bdoi,oi->bcd", M, M, w)
    torch.testing.assert_close(factored_conv_form(G, a, w), plain)


@pytest.mark.parametrize("shared", [True, False], ids=["bias_shares_basis", "own_basis"])
def test_linear_bias_with_or_without_the_weights_output_basis(shared):
    """A bias block with its weight's output eigenvectors shares the rotation of ``G``; one
    with its own takes its own. Both give ``J P^-1 J^T`` of the explicit Jacobian."""
    g = torch.Generator().manual_seed(0)
    b, C, o, i = 5, 3, 4, 6

    def spd(n):
        return random_spd(n, g)

    B, A = spd(o), spd(i)
    kron = Kron([[B, A], [B if shared else spd(o)], [spd(2), spd(o)]]).decompose() + 0.3
    G, a = torch.randn(b, C, o, generator=g), torch.randn(b, i, generator=g)
    G2, a2 = torch.randn(b, C, 2, generator=g), torch.randn(b, o, generator=g)
    Js = torch.cat([(G[..., None] * a[:, None, None]).flatten(2), G], -1)
    Js = torch.cat([Js, (G2[..., None] * a2[:, None, None]).flatten(2)], -1)
    expected = kron.inv_square_form(Js)
    torch.testing.assert_close(kron.inv_square_form_factored([(G, a), (G,), (G2, a2)]), expected)


def test_fitted_kron_shares_each_linear_layers_rotation(monkeypatch):
    """The factors hand the same ``G`` to a layer's weight and bias (also after a cast), and
    K-FAC gives both blocks the same output factor: every linear bias shares the rotation."""
    torch.manual_seed(0)
    model = same_padding_cnn(3).double()
    la = fitted(KronLaplace, model, "classification", 3)
    shared = []
    original = KronDecomposed._bias_shares_rotation

    def spy(self, factors, index):
        shared.append(original(self, factors, index))
        return shared[-1]

    monkeypatch.setattr(KronDecomposed, "_bias_shares_rotation", spy)
    la._glm_predictive_distribution(images(3, seed=2))
    assert shared == [True, True]


class ReflectConv(nn.Conv2d):
    """Not supported: its own forward."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"))


def unsupported(kind: str) -> nn.Module:
    layers = {
        "groups": (nn.Conv2d(2, 2, 3, groups=2), 50),
        "asymmetric_same": (nn.Conv2d(2, 2, 2, padding="same"), 98),
        "reflect": (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), 98),
        "own_forward": (ReflectConv(2, 2, 3), 98),
    }
    conv, features = layers[kind]
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(features, 2))


UNSUPPORTED = [
    (structure, kind)
    for structure in CLASSES
    for kind in ("groups", "asymmetric_same", "reflect", "own_forward")
    if (structure, kind) != ("kron", "asymmetric_same")  # its K-FAC cannot be fitted
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize(("structure", "kind"), UNSUPPORTED)
def test_unsupported_convolutions_fall_back(structure, kind):
    torch.manual_seed(0)
    model = unsupported(kind).double()
    x = images(4, seed=2)
    assert (
        linear_jacobian_factors(model, dict(model.named_parameters()), x, convolutions=True)
        is None
    )
    la = fitted(CLASSES[structure], model, "regression", 2)
    torch.testing.assert_close(la._glm_predictive_distribution(x)[1], dense_variance(la, model, x))


def test_a_reused_convolution_falls_back():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), conv, nn.Flatten(), nn.Linear(98, 2)).double()
    x = images(4, seed=2)
    assert (
        linear_jacobian_factors(model, dict(model.named_parameters()), x, convolutions=True)
        is None
    )
    la = fitted(KronLaplace, model, "regression", 2)
    torch.testing.assert_close(la._glm_predictive_distribution(x)[1], dense_variance(la, model, x))


def test_fit_paths_never_see_convolution_factors():
    """Without ``convolutions=True`` a CNN has no factors (the fit paths' view)."""
    torch.manual_seed(0)
    model = same_padding_cnn(2).double()
    params = dict(model.named_parameters())
    x = images(3, seed=2)
    assert linear_jacobian_factors(model, params, x) is None
    factors, _ = partial_linear_factors(model, params, x)
    assert set(factors) == {"5.weight", "5.bias", "7.weight", "7.bias"}
    assert all(
        t.ndim in (2, 3) and isinstance(t, torch.Tensor) for b in factors.values() for t in b
    )


def test_in_place_activations_and_tied_weights_keep_the_jacobians_exact():
    """``ReLU(inplace=True)`` after a layer changes its output tensor in place; a weight
    held by two layers gets gradients from both: the factors stay exact or are refused."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    factors, _ = linear_jacobian_factors(model, dict(model.named_parameters()), x)
    Js = dense_jacobians(model, x)
    rebuilt = torch.cat(
        [
            (b[0][..., :, None] * b[1][:, None, None, :]).flatten(2) if len(b) == 2 else b[0]
            for b in factors
        ],
        -1,
    )
    torch.testing.assert_close(rebuilt, Js)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    tied[2].weight = tied[0].weight
    assert linear_jacobian_factors(tied, dict(tied.named_parameters()), x) is None


@pytest.mark.parametrize("cls", [FullLaplace, DiagLaplace], ids=lambda c: c.__name__)
@pytest.mark.parametrize("model_kind", ["in_place", "tied"])
def test_factored_fits_with_in_place_activations_or_tied_weights(cls, model_kind):
    """The fit paths share the factors: their GGN is exact for both networks (it was not:
    the gradient taken after ``ReLU(inplace=True)``, one of the two uses of a tied weight)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    model = nn.Sequential(
        nn.Linear(3, 3), nn.ReLU(inplace=model_kind == "in_place"), nn.Linear(3, 3), nn.Tanh()
    ).append(nn.Linear(3, 2))
    if model_kind == "tied":
        model[2].weight = model[0].weight
    la = cls(model, "regression")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    H = dense_ggn(model, x, y, "regression")
    torch.testing.assert_close(la.H, H if cls is FullLaplace else H.diagonal())


def test_backprop_through_the_conv_path_matches_the_jacobian_path():
    torch.manual_seed(0)
    model = strided_cnn(2).double()
    la = fitted(KronLaplace, model, "regression", 2, enable_backprop=True)
    x_in = images(3, seed=2).requires_grad_(True)
    f_mu, f_var = la(x_in)
    (f_var.sum() + f_mu.sum()).backward()
    generic_x = images(3, seed=2).requires_grad_(True)
    Js, f = la.backend.jacobians(generic_x, enable_backprop=True)
    (la.functional_variance(Js).sum() + f.sum()).backward()
    torch.testing.assert_close(x_in.grad, generic_x.grad)


def largest_eigenvalue(H: torch.Tensor | Kron) -> float:
    """Of a stored diagonal, or of a Kronecker-factored curvature from its factors."""
    if isinstance(H, torch.Tensor):
        return float(H.max())
    tops = [[float(torch.linalg.eigvalsh(f).max()) for f in block] for block in H.kfacs]
    return max(math.prod(top) for top in tops)


@pytest.mark.parametrize("structure", list(CLASSES))
def test_float32_cnn_against_float64_truth(monkeypatch, structure):
    """A float32 ReLU CNN (2 conv + 2 linear) with a prior ``1e-5`` of the curvature's
    largest eigenvalue: the conv path's variance is within the float32 target (``1e-3``
    relative) of the float64 truth, and within the margin of the Jacobian path's error."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = T.relu_cnn(3, seed=0)
        x, y = T.make_data("classification", 240, 3, (1, 8, 8), seed=1)
        x_test = T.make_data("classification", 20, 3, (1, 8, 8), seed=2)[0]
        la = CLASSES[structure](model, "classification")
        la.fit(DataLoader(TensorDataset(x, y), batch_size=120))
        H = la._curvature.H.to_matrix() if structure == "kron" else torch.diag(la._curvature.H)
        H = H.double()
        la.prior_precision = 1e-5 * largest_eigenvalue(la._curvature.H)
        P = H + torch.diag(la.prior_precision_diag.double())
        J_truth = T.jacobians(copy.deepcopy(model).double(), x_test.double())[0]
        truth = J_truth @ torch.linalg.solve(P, J_truth.mT)
        J32 = T.jacobians(model, x_test)[0]
        jacobian_path = la.functional_variance(J32)
        no_jacobians(monkeypatch, la)
        f_var = la._glm_predictive_distribution(x_test)[1]
    finally:
        torch.set_default_dtype(previous)
    assert f_var.dtype == torch.float32
    error = T.scaled_error(f_var, truth)
    assert error <= 1e-3, error
    assert error <= T.tolerance(T.scaled_error(jacobian_path, truth)), error


def subnet_indices(model: nn.Module, first_tensor_only: bool) -> torch.Tensor:
    """Every third parameter, or (``first_tensor_only``) a few entries of the first tensor
    only, so that the other tensors' factors are skipped."""
    n = sum(p.numel() for p in model.parameters())
    if first_tensor_only:
        return torch.tensor([0, 2, 5])
    return torch.arange(1, n, 3)


@pytest.mark.parametrize("first_tensor_only", [False, True], ids=["spread", "one_tensor"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("model_kind", list(MODELS))
def test_diag_subnetwork_variance_from_factors_matches_dense(
    monkeypatch, model_kind, likelihood, first_tensor_only
):
    """A diagonal subnetwork posterior over CNN weights: ``J_S diag(v) J_S^T`` with the
    brute-force Jacobians' subnetwork columns, without the Jacobian path."""
    torch.manual_seed(0)
    n_out = 3 if likelihood == "classification" else 2
    model = MODELS[model_kind](n_out).double()
    g = torch.Generator().manual_seed(3)
    x = images(16, seed=1)
    y = torch.randint(n_out, (16,), generator=g)
    if likelihood == "regression":
        y = torch.randn(16, n_out, generator=g)
    indices = subnet_indices(model, first_tensor_only)
    la = DiagSubnetLaplace(model, likelihood, indices, prior_precision=0.7)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=8))
    x_test = images(5, seed=2)
    Js = dense_jacobians(model, x_test)[:, :, indices]
    expected = Js @ torch.diag(la.posterior_variance) @ Js.mT
    no_jacobians(monkeypatch, la)
    f_mu, f_var = la._glm_predictive_distribution(x_test)
    torch.testing.assert_close(f_var, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f_mu, model(x_test))


def test_float32_diag_subnetwork_variance_against_float64_truth(monkeypatch):
    """A float32 ReLU CNN (dead units, prior 1e-2, a subnetwork of half the weights): the
    factored subnetwork variance against the truth from the same weights, data and
    posterior variances in float64, within the floor-based tolerance of tests/float32_truth.py
    (the float32 network's own Jacobians upcast set the floor)."""
    model = T.relu_cnn(3, seed=0)
    x, y = T.make_data("classification", 60, 3, (1, 8, 8), seed=1)
    n = sum(p.numel() for p in model.parameters())
    indices = torch.arange(0, n, 2)
    la = DiagSubnetLaplace(model, "classification", indices, prior_precision=1e-2)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=20))
    x_test = x[:10]
    variance = la.posterior_variance.double()
    truth_J = T.jacobians(copy.deepcopy(model).double(), x_test.double())[0][:, :, indices]
    floor_J = T.jacobians(model, x_test)[0].double()[:, :, indices]
    truth = truth_J @ torch.diag(variance) @ truth_J.mT
    floor = floor_J @ torch.diag(variance) @ floor_J.mT
    no_jacobians(monkeypatch, la)
    _, f_var = la._glm_predictive_distribution(x_test)
    assert f_var.dtype == torch.float32
    floor_error = T.scaled_error(floor, truth)
    assert T.scaled_error(f_var.double(), truth) <= T.tolerance(floor_error)


@pytest.mark.parametrize("L", [1, 4, 16])
def test_left_rotation_equals_the_broadcast_product(L):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(3, 5, 6, L, generator=g)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    torch.testing.assert_close(conv_jacobians._left_rotate(Q, X), Q.mT @ X)
