"""Normalisation layers in the factored paths: the diagonal GGN of CNNs with batch, layer and
group normalisation (and residual blocks) from Jacobian factors equals the diagonal of the
dense ``sum_n J_n^T H_n J_n`` of brute-force ``torch.func`` Jacobians; the diag and Kron GLM
variances equal the dense ``J P^-1 J^T``; batch normalisation with the batch's statistics
falls back to the Jacobians."""

from __future__ import annotations

import copy

import float32_truth as T
import pytest
import torch
from groundtruth import dense_ggn, dense_jacobians, random_spd
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace.utils.conv_jacobians as conv_jacobians
from laplace import DiagLaplace, FullLaplace, KronLaplace, Laplace
from laplace.curvature import GGNInterface
from laplace.curvature.curvature import _GramInterface
from laplace.utils.conv_jacobians import conv_gram_diagonal, factored_conv_form
from laplace.utils.linear_jacobians import linear_jacobian_factors
from laplace.utils.matrix import Kron
from laplace.utils.memory import memory_budget

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def randomized(model: nn.Module, seed: int, dead_channels: int = 0) -> nn.Module:
    """``model`` in eval mode with random affine parameters and running statistics of its
    normalisation layers. With ``dead_channels``, the first channels of each batch
    normalisation get a shift of -50 (the ReLU after them never fires), the others one in
    ``[1, 2)`` (it fires for most inputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, NORMS):
                continue
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and layer.track_running_stats:
                shape = layer.running_mean.shape
                layer.running_mean.copy_(torch.randn(shape, generator=g))
                layer.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=g))
                if dead_channels:
                    layer.bias.copy_(1 + torch.rand(shape, generator=g))
                    layer.bias[:dead_channels] = -50.0
    return model.eval()


def bn_cnn(n_out: int) -> nn.Module:
    """2x8x8 inputs: convolutions with ``L = 64``, ``9`` and ``1`` output positions (forming
    ``M`` and the pair expansion), one without bias, each followed by batch normalisation."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, bias=False),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5, n_out),
    )


class Residual(nn.Module):
    """A ResNet basic block with a strided 1x1 shortcut, then global pooling and a head."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.shortcut = nn.Sequential(nn.Conv2d(2, 3, 1, stride=2, bias=False), nn.BatchNorm2d(3))
        self.fc = nn.Linear(3, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = self.relu(out)
        return self.fc(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


def bn_mlp(n_out: int) -> nn.Module:
    """Batch normalisation of vectors, after a linear layer without bias too (8 inputs)."""
    return nn.Sequential(
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 5, bias=False),
        nn.BatchNorm1d(5),
        nn.Tanh(),
        nn.Linear(5, n_out),
    )


def group_layer_cnn(n_out: int) -> nn.Module:
    """Group normalisation, layer normalisation over the last two dimensions of an image
    (``gamma`` of shape ``(4, 4)``, shared by the channels) and over vectors."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.LayerNorm((4, 4)),
        nn.Flatten(),
        nn.Linear(64, 6),
        nn.LayerNorm(6),
        nn.Tanh(),
        nn.Linear(6, n_out),
    )


MODELS = {"bn_cnn": bn_cnn, "residual": Residual, "bn_mlp": bn_mlp, "group_layer": group_layer_cnn}
KRON_MODELS = ["bn_cnn", "residual", "bn_mlp"]  # K-FAC takes batch normalisation only


def model_and_data(kind: str, likelihood: str, n: int = 12, seed: int = 0):
    n_out = 3 if likelihood == "classification" else 2
    torch.manual_seed(seed)
    model = randomized(MODELS[kind](n_out).double(), seed)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (8,) if kind == "bn_mlp" else (2, 8, 8)
    x = torch.randn(n, *shape, generator=g)
    if likelihood == "classification":
        y = torch.randint(n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g)
    return model, x, y


def no_jacobians(monkeypatch, la) -> None:
    """Make the Jacobian paths fail, so that only the factored paths can answer."""

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to Jacobians")

    monkeypatch.setattr(la.subset, "jacobians", refuse)
    monkeypatch.setattr(la.backend, "jacobians", refuse)


def loader(x, y, batch_size: int = 6) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


LIKELIHOODS = ["classification", "regression"]


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_diag_ggn_matches_the_dense_ggn(monkeypatch, kind, likelihood):
    model, x, y = model_and_data(kind, likelihood)
    expected = dense_ggn(model, x, y, likelihood).diagonal()
    backend = GGNInterface(model, likelihood)
    monkeypatch.setattr(backend, "jacobians", lambda *a, **k: pytest.fail("used Jacobians"))
    _, h = backend.diag(x, y)
    torch.testing.assert_close(h, expected, rtol=1e-9, atol=1e-12)
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="diag")
    no_jacobians(monkeypatch, la)
    la.fit(loader(x, y))
    torch.testing.assert_close(la.H, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["bn_cnn", "group_layer"])
def test_sampled_diag_equals_the_jacobian_path_with_the_same_draws(kind):
    """With one or three sampled targets per input, ``R`` has as many rows: the factored
    diagonal equals the Jacobian path's with the same seed."""
    model, x, y = model_and_data(kind, "classification")
    for samples in (1, 3):
        backend = GGNInterface(model, "classification", stochastic=True, num_samples=samples)
        _, h = backend.diag(x, y, seed=7)
        _, expected = _GramInterface.diag(backend, x, y, seed=7)
        torch.testing.assert_close(h, expected, rtol=1e-9, atol=1e-12)


def test_full_ggn_with_normalisation_rows_matches_the_dense_ggn():
    """The full GGN takes the normalisation layers' rows with the linear factors."""
    model, x, y = model_and_data("bn_mlp", "classification")
    la = FullLaplace(model, "classification")
    la.fit(loader(x, y))
    torch.testing.assert_close(la.H, dense_ggn(model, x, y, "classification"))


def dense_variance(la, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    Js = dense_jacobians(model, x)
    if isinstance(la, KronLaplace):
        covariance = la.posterior_precision.to_matrix(exponent=-1)
    else:
        covariance = torch.diag(la.posterior_variance)
    return Js @ covariance @ Js.mT


PREDICTIVE_CASES = [
    (s, k) for s in ("diag", "kron") for k in MODELS if s == "diag" or k in KRON_MODELS
]


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize(("structure", "kind"), PREDICTIVE_CASES)
def test_glm_variance_matches_dense(monkeypatch, structure, kind, likelihood):
    model, x, y = model_and_data(kind, likelihood)
    cls = DiagLaplace if structure == "diag" else KronLaplace
    prior = torch.linspace(0.3, 1.2, sum(1 for _ in model.parameters()))
    la = cls(model, likelihood, prior_precision=prior)
    la.fit(loader(x, y))
    x_test = model_and_data(kind, likelihood, n=5, seed=3)[1]
    expected = dense_variance(la, model, x_test)
    no_jacobians(monkeypatch, la)
    f_mu, f_var = la._glm_predictive_distribution(x_test)
    torch.testing.assert_close(f_var, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f_mu, model(x_test))


def test_one_factor_blocks_with_the_same_basis_but_other_rows_stay_apart():
    """Batch normalisation after a linear layer without bias: its ``gamma`` block may have
    the weight's output eigenvectors (here the same matrix), but its rows are its own; only
    a bias holding the weight's very ``G`` shares the rotation."""
    g = torch.Generator().manual_seed(0)
    b, C, o, i = 5, 3, 4, 6

    def spd(n):
        return random_spd(n, g)

    B, A = spd(o), spd(i)
    kron = Kron([[B, A], [B.clone()], [spd(o)]]).decompose() + 0.3
    G, a = torch.randn(b, C, o, generator=g), torch.randn(b, i, generator=g)
    gamma, beta = torch.randn(b, C, o, generator=g), torch.randn(b, C, o, generator=g)
    Js = torch.cat([(G[..., None] * a[:, None, None]).flatten(2), gamma, beta], -1)
    factored = kron.inv_square_form_factored([(G, a), (gamma,), (beta,)])
    torch.testing.assert_close(factored, kron.inv_square_form(Js))


def batch_statistics_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    train = randomized(bn_cnn(2).double(), 0).train()
    untracked = bn_cnn(2).double()
    untracked[5] = nn.BatchNorm2d(4, track_running_stats=False).double()
    return {"train_mode": train, "untracked": randomized(untracked, 0)}


@pytest.mark.parametrize("kind", ["train_mode", "untracked"])
def test_batch_statistics_give_no_factors(kind):
    """Batch normalisation with the batch's statistics couples the samples: no factors, and
    no forward pass that would update the running statistics."""
    model = batch_statistics_models()[kind]
    x = model_and_data("bn_cnn", "regression", n=8)[1]
    buffers = [t.clone() for t in model.buffers()]
    assert linear_jacobian_factors(model, dict(model.named_parameters()), x, True, True) is None
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_batch_statistics_in_eval_mode_fall_back_to_jacobians():
    """Without running statistics a batch normalisation uses the batch's also in eval mode:
    the diagonal, full and predictive paths give the Jacobian path's answer."""
    model = batch_statistics_models()["untracked"]
    x, y = model_and_data("bn_cnn", "regression", n=8)[1:]
    backend = GGNInterface(model, "regression")
    torch.testing.assert_close(backend.diag(x, y)[1], _GramInterface.diag(backend, x, y)[1])
    torch.testing.assert_close(backend.full(x, y)[1], _GramInterface.full(backend, x, y)[1])
    la = DiagLaplace(model, "regression")
    la.fit(loader(x, y, batch_size=4))
    Js, f = la.backend.jacobians(x)
    torch.testing.assert_close(la.H, (Js.square()).sum((0, 1)))
    f_mu, f_var = la._glm_predictive_distribution(x)
    torch.testing.assert_close(f_var, la.functional_variance(Js))
    torch.testing.assert_close(f_mu, f)


def test_a_model_in_training_mode_is_fitted_and_predicted_in_eval_mode(monkeypatch):
    """The Laplace classes fit and predict in eval mode, so batch normalisation in training
    mode normalises with its running statistics there: the factored paths give the eval-mode
    network's exact answers, and the model keeps its training mode and statistics."""
    model = batch_statistics_models()["train_mode"]
    x, y = model_and_data("bn_cnn", "regression", n=8)[1:]
    buffers = [t.clone() for t in model.buffers()]
    la = DiagLaplace(model, "regression")
    no_jacobians(monkeypatch, la)
    la.fit(loader(x, y, batch_size=4))
    f_mu, f_var = la(x, pred_type="glm")
    assert model.training and all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    model.eval()
    torch.testing.assert_close(la.H, dense_ggn(model, x, y, "regression").diagonal())
    torch.testing.assert_close(f_var, dense_variance(la, model, x))
    torch.testing.assert_close(f_mu, model(x))


def test_fit_takes_whole_batches_beyond_the_jacobian_budget(monkeypatch):
    """Where the Jacobians of a batch exceed the memory budget, the factored diagonal still
    takes the whole batch (it forms no Jacobians); a network without factors is split."""
    model, x, y = model_and_data("residual", "classification", n=12)
    expected = dense_ggn(model, x, y, "classification").diagonal()
    sizes = []
    original = GGNInterface._factored_diag

    def spy(self, x, *args):
        sizes.append(x.shape[0])
        return original(self, x, *args)

    monkeypatch.setattr(GGNInterface, "_factored_diag", spy)
    la = DiagLaplace(model, "classification")
    two_inputs = 2 * 2 * 3 * la.n_params * 8  # two inputs' Jacobians and a temporary each
    with memory_budget(two_inputs):
        la.fit(loader(x, y))
    assert sizes == [6, 6]
    torch.testing.assert_close(la.H, expected, rtol=1e-9, atol=1e-12)
    untracked = batch_statistics_models()["untracked"]
    la = DiagLaplace(untracked, "regression")
    reference = DiagLaplace(untracked, "regression")
    x_reg, y_reg = model_and_data("bn_cnn", "regression", n=12)[1:]
    reference.fit(loader(x_reg, y_reg))
    sizes.clear()
    with memory_budget(2 * 2 * 2 * la.n_params * 8):
        la.fit(loader(x_reg, y_reg))
    assert sizes == [6, 2, 2, 2, 6, 2, 2, 2]  # the whole batch tried, then parts of two
    torch.testing.assert_close(la.H, reference.H)


def explicit_rows(G, a, root):
    """``M_nk`` of a convolution's weight, ``(batch, k, o, i)``, by brute force."""
    M = torch.stack([torch.einsum("bol,bil->boi", g, a) for g in G], 1)
    return M if root is None else torch.einsum("bkc,bcoi->bkoi", root, M)


@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "forming_M"])
@pytest.mark.parametrize("chunk", [2**20, 40, 1])
@pytest.mark.parametrize(("L", "i", "C", "o"), [(1, 12, 3, 2), (4, 5, 3, 4), (9, 4, 1, 2)])
def test_conv_diagonal_and_form_by_either_expansion(monkeypatch, pairs, chunk, L, i, C, o):
    """Both expansions, in chunks of samples (and of rows or outputs), give the diagonal
    ``sum M_nk^2`` and the rotated form ``sum M_c M_d w`` of the explicit ``M``."""
    monkeypatch.setattr(conv_jacobians, "_pairs_are_cheaper", lambda L, k: pairs)
    monkeypatch.setattr(conv_jacobians, "_CHUNK_ENTRIES", chunk)
    g = torch.Generator().manual_seed(0)
    b = 4
    G = [torch.randn(b, o, L, generator=g) for _ in range(C)]
    a = torch.randn(b, i, L, generator=g)
    root = torch.randn(b, 2, C, generator=g)
    for R in (None, root):
        expected = explicit_rows(G, a, R).square().sum((0, 1))
        torch.testing.assert_close(conv_gram_diagonal(G, a, R), expected)
    Q0 = torch.linalg.qr(torch.randn(o, o, generator=g))[0]
    Q1 = torch.linalg.qr(torch.randn(i, i, generator=g))[0]
    w = torch.rand(o, i, generator=g)
    M = explicit_rows(G, a, None)
    rotated = Q0.T @ M @ Q1
    expected = torch.einsum("bcoi,bdoi,oi->bcd", rotated, rotated, w)
    torch.testing.assert_close(factored_conv_form(G, a, w, bases=(Q0, Q1)), expected)
    plain = torch.einsum("bcoi,bdoi,oi->bcd", M, M, w)
    torch.testing.assert_close(factored_conv_form(G, a, w), plain)


def relu_bn_cnn(n_out: int, seed: int) -> nn.Module:
    """A float32 ReLU CNN with batch normalisation on 1x8x8 images; two channels of each
    normalisation are dead (shift -50): their weights get no curvature at all."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32, n_out),
    ).float()
    return randomized(model, seed, dead_channels=2)


def diag_truth(J: torch.Tensor, f: torch.Tensor, prior: float, x_J: torch.Tensor):
    """The diagonal GGN, and the GLM variance at the test Jacobians ``x_J``, in float64."""
    h = torch.einsum("ncp,ncd,ndp->p", J, T.output_hessians(f, "classification"), J)
    return h, (x_J / (h + prior)) @ x_J.mT


def test_float32_fit_and_predictive_against_float64_truth(monkeypatch):
    """A float32 ReLU CNN with batch normalisation and dead units, 600 points, prior
    precision ``1e-3``. Truth: the same weights and data in float64; floor: the float32
    network's own Jacobians in float64 arithmetic (:mod:`float32_truth`).

    The precision ``P = h + prior`` is compared entry by entry: its relative error
    ``|h - h_truth| / (h_truth + prior)`` is allowed ``3 * floor + 300 eps``, the floor's
    error from the float32 Jacobians plus the worst-case round-off of summing a batch's 300
    non-negative terms in float32 (``(n - 1) eps`` relative). The dead units' curvature is
    exactly zero. The variances are allowed ``3 * floor + 16 eps`` relative
    (:func:`float32_truth.tolerance`) on top of the error that the precision's tolerance
    carries into them (a relative error ``r`` of every ``P`` entry moves ``J P^-1 J^T`` by
    at most ``r`` relative).
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = relu_bn_cnn(3, seed=0)
        x, y = T.make_data("classification", 600, 3, (1, 8, 8), seed=1)
        x_test = T.make_data("classification", 20, 3, (1, 8, 8), seed=2)[0]
        prior = 1e-3
        la = DiagLaplace(model, "classification", prior_precision=prior)
        no_jacobians(monkeypatch, la)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=300))
        f_var = la._glm_predictive_distribution(x_test)[1]
        truth_model = copy.deepcopy(model).double()
        J, f = T.jacobians(truth_model, x.double())
        h_truth, var_truth = diag_truth(J, f, prior, T.jacobians(truth_model, x_test.double())[0])
        J, f = T.jacobians(model, x)
        h_floor, var_floor = diag_truth(
            J.double(), f.double(), prior, T.jacobians(model, x_test)[0].double()
        )
    finally:
        torch.set_default_dtype(previous)
    assert f_var.dtype == torch.float32
    dead = h_truth == 0
    assert dead.sum() > 0 and torch.all(la.H[dead] == 0)

    def precision_error(h):
        return ((h.double() - h_truth).abs() / (h_truth + prior)).max().item()

    fit_tolerance = 3 * precision_error(h_floor) + 300 * T.EPS
    assert precision_error(la.H) <= fit_tolerance
    error = T.scaled_error(f_var, var_truth)
    assert error <= T.tolerance(T.scaled_error(var_floor, var_truth)) + fit_tolerance, error
