"""K-FAC blocks of normalisation layers' affine parameters (the default backend's one pass).

The parameters of batch norm in eval mode, ``LayerNorm`` and ``GroupNorm`` get one-factor
blocks that must equal the exact GGN (or empirical Fisher) blocks of a dense float64
reference built from per-sample ``torch.func.jacrev`` Jacobians, without changing the blocks
of the Linear and Conv2d layers around them.
"""

from __future__ import annotations

import copy

import float32_truth as T
import pytest
import torch
from groundtruth import dense_ef, dense_ggn, dense_jacobians
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from laplace.utils.matrix import Kron

NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)
TOL = {"rtol": 1e-9, "atol": 1e-12}
N_OUT = 3


class ResidualBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + x)``, with the in-place operations of torchvision's
    ResNet blocks (after the batch norms, whose outputs the K-FAC captures)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def randomise_norms(model: nn.Module, seed: int = 3) -> nn.Module:
    """Random affine parameters and running statistics, so that no block is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, NORMS):
                continue
            layer.weight.copy_(1 + 0.5 * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=g))
            if getattr(layer, "running_mean", None) is not None:
                layer.running_mean.copy_(0.2 * torch.randn(layer.running_mean.shape, generator=g))
                layer.running_var.copy_(0.5 + torch.rand(layer.running_var.shape, generator=g))
    return model.eval()


def residual_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        ResidualBlock(4),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, N_OUT),
    ).double()


def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, N_OUT)
    ).double()


def bn_sequence() -> nn.Module:
    """``BatchNorm1d`` on ``(batch, channels, length)`` inputs, first in the network."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm1d(2), nn.Flatten(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, N_OUT)
    ).double()


def bn_volume() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm3d(2), nn.Flatten(), nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, N_OUT)
    ).double()


def sync_bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.SyncBatchNorm(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, N_OUT)
    ).double()


def layernorm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, N_OUT)).double()


def layernorm_sequence() -> nn.Module:
    """``LayerNorm`` over the features of a sequence: its Jacobian sums the positions."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(2, 4), nn.LayerNorm(4), nn.Tanh(), nn.Flatten(), nn.Linear(16, N_OUT)
    ).double()


def groupnorm_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, N_OUT)
    ).double()


MODELS = {
    "residual_cnn": (residual_cnn, (2, 6, 6)),
    "bn_mlp": (bn_mlp, (3,)),
    "bn_sequence": (bn_sequence, (2, 4)),
    "bn_volume": (bn_volume, (2, 2, 2, 2)),
    "sync_bn_cnn": (sync_bn_cnn, (2, 6, 6)),
    "layernorm_mlp": (layernorm_mlp, (3,)),
    "layernorm_sequence": (layernorm_sequence, (4, 2)),
    "groupnorm_cnn": (groupnorm_cnn, (2, 6, 6)),
}
models = pytest.mark.parametrize("model_name", list(MODELS))


def setup(model_name: str, likelihood: str, n: int = 12, seed: int = 1):
    build, shape = MODELS[model_name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    if likelihood == "classification":
        y = torch.randint(N_OUT, (n,), generator=g)
    else:
        y = torch.randn(n, N_OUT, generator=g)
    return randomise_norms(build()), x, y


def norm_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of normalisation layers."""
    return [
        f"{prefix}.{kind}" if prefix else kind
        for prefix, layer in model.named_modules()
        if isinstance(layer, NORMS)
        for kind, p in layer.named_parameters(recurse=False)
        if p.requires_grad
    ]


def dense_blocks(model: nn.Module, H: torch.Tensor) -> dict[str, torch.Tensor]:
    """The diagonal blocks of a dense ``(params, params)`` matrix, by parameter name."""
    blocks, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            blocks[name] = H[start : start + p.numel(), start : start + p.numel()]
            start += p.numel()
    return blocks


def kron_blocks(model: nn.Module, kron: Kron) -> dict[str, list[torch.Tensor]]:
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(names) == len(kron.kfacs)
    return dict(zip(names, kron.kfacs))


def assert_norm_blocks_exact(model: nn.Module, kron: Kron, H: torch.Tensor) -> None:
    """Every normalisation parameter's block is one factor equal to its block of ``H``."""
    dense, factored = dense_blocks(model, H), kron_blocks(model, kron)
    names = norm_parameters(model)
    assert names
    for name in names:
        assert len(factored[name]) == 1, name
        expected = dense[name]
        torch.testing.assert_close(
            factored[name][0], expected, rtol=TOL["rtol"], atol=1e-12 * expected.abs().max()
        )


# ----------------------------------------------------------------------------- blocks
@models
@pytest.mark.parametrize("backend", [CurvlinopsGGN, CurvlinopsEF], ids=lambda b: b.__name__)
def test_norm_blocks_equal_the_dense_blocks(model_name, backend, likelihood):
    model, x, y = setup(model_name, likelihood)
    reference = dense_ggn if backend is CurvlinopsGGN else dense_ef
    _, kron = backend(model, likelihood).kron(x, y, N=30)
    assert_norm_blocks_exact(model, kron, reference(model, x, y, likelihood))


@pytest.mark.parametrize("model_name", ["residual_cnn", "layernorm_sequence"])
def test_norm_blocks_do_not_depend_on_kfac_approx(model_name):
    model, x, y = setup(model_name, "classification")
    _, expand = CurvlinopsGGN(model, "classification").kron(x, y, N=12)
    _, reduce = CurvlinopsGGN(model, "classification").kron(x, y, N=12, kfac_approx="reduce")
    expanded, reduced = kron_blocks(model, expand), kron_blocks(model, reduce)
    for name in norm_parameters(model):
        torch.testing.assert_close(expanded[name][0], reduced[name][0], **TOL)


@models
def test_other_blocks_are_those_without_the_norm_parameters(model_name, likelihood):
    model, x, y = setup(model_name, likelihood)
    _, kron = CurvlinopsGGN(model, likelihood).kron(x, y, N=30)
    names = norm_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in names)
    _, without = CurvlinopsGGN(model, likelihood).kron(x, y, N=30)
    expected = kron_blocks(model, without)
    for p in model.parameters():
        p.requires_grad_(True)
    ours = kron_blocks(model, kron)
    assert set(ours) - set(expected) == set(names)
    for name, factors in expected.items():
        assert len(ours[name]) == len(factors)
        for mine, theirs in zip(ours[name], factors):
            torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("model_name", ["residual_cnn", "bn_mlp", "layernorm_mlp"])
def test_frozen_gamma_or_beta(model_name):
    """Only one of a layer's affine parameters trainable: its block alone, still exact."""
    model, x, y = setup(model_name, "classification")
    for kind in ("weight", "bias"):
        for name, p in model.named_parameters():
            p.requires_grad_(not (name in norm_parameters(model) and name.endswith(kind)))
        _, kron = CurvlinopsGGN(model, "classification").kron(x, y, N=12)
        assert_norm_blocks_exact(model, kron, dense_ggn(model, x, y, "classification"))
        for p in model.parameters():
            p.requires_grad_(True)


@pytest.mark.parametrize("model_name", ["residual_cnn", "layernorm_sequence"])
def test_batches_sum_to_the_data_set_blocks(model_name, likelihood):
    model, x, y = setup(model_name, likelihood, n=13)
    backend = CurvlinopsGGN(model, likelihood)
    _, whole = backend.kron(x, y, N=13)
    parts = [backend.kron(xb, yb, N=13)[1] for xb, yb in zip(x.split(5), y.split(5))]
    summed = parts[0] + parts[1] + parts[2]
    in_place = Kron([[torch.zeros_like(f) for f in factors] for factors in whole.kfacs])
    for xb, yb in zip(x.split(4), y.split(4)):
        backend.kron(xb, yb, N=13, out=in_place)
    backend.flush_sums()
    H = dense_ggn(model, x, y, likelihood)
    for kron in (whole, summed, in_place):
        assert_norm_blocks_exact(model, kron, H)
        torch.testing.assert_close(kron.to_matrix(), whole.to_matrix(), rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- errors
def test_train_mode_batch_norm_raises():
    model, x, y = setup("residual_cnn", "classification")
    model[3].bn2.train()
    with pytest.raises(
        ValueError, match=r"'3\.bn2\.weight' belongs to a BatchNorm2d layer .*training mode.*eval"
    ):
        CurvlinopsGGN(model, "classification").kron(x, y, N=12)


def test_batch_norm_without_running_statistics_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    x, y = torch.randn(6, 3), torch.randint(4, (6,))
    with pytest.raises(ValueError, match=r"'1\.weight' belongs to a BatchNorm1d .*running stat"):
        CurvlinopsGGN(model.eval(), "classification").kron(x, y, N=6)


def test_layernorm_over_several_dimensions_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm((2, 3)), nn.Flatten(), nn.Linear(6, 2))
    x, y = torch.randn(6, 2, 3), torch.randint(2, (6,))
    with pytest.raises(ValueError, match=r"'0\.weight' belongs to a LayerNorm .*2 dimensions"):
        CurvlinopsGGN(model, "classification").kron(x, y, N=6)


def test_other_layers_still_raise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    x, y = torch.randint(5, (4, 2)), torch.randint(2, (4,))
    with pytest.raises(ValueError, match=r"Linear, Conv2d, .*'0\.weight' belongs to Embedding"):
        CurvlinopsGGN(model, "classification").kron(x, y, N=4)


def test_sampled_fisher_with_norm_parameters_raises():
    model, x, y = setup("bn_mlp", "classification")
    backend = CurvlinopsGGN(model, "classification", stochastic=True)
    with pytest.raises(ValueError, match=r"normalisation-layer parameters \(here '1\.weight'\)"):
        backend.kron(x, y, N=12)


def test_fit_puts_a_train_mode_model_in_eval_mode():
    """``fit`` linearises the network in eval mode, so batch norm in training mode is fine
    there, and the model gets its mode back."""
    model, x, y = setup("residual_cnn", "classification")
    model.train()
    la = Laplace(model, "classification", "all", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=5))
    assert model.training and model[3].bn2.training
    assert_norm_blocks_exact(
        model, la.H.to_kron(), dense_ggn(model.eval(), x, y, "classification")
    )


# ----------------------------------------------------------------------------- downstream
@pytest.mark.parametrize(
    "model_name", ["residual_cnn", "bn_mlp", "layernorm_mlp", "groupnorm_cnn"]
)
def test_laplace_downstream(model_name, likelihood):
    """fit over batches, marginal likelihood, prior tuning and the GLM predictive, against a
    dense posterior precision whose normalisation blocks are those of the dense GGN."""
    model, x, y = setup(model_name, likelihood, n=14)
    x_test = setup(model_name, likelihood, n=5, seed=7)[1]
    sigma = 0.7 if likelihood == "regression" else 1.0
    la = Laplace(model, likelihood, "all", hessian_structure="kron", sigma_noise=sigma)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=6))
    assert torch.isfinite(la.log_marginal_likelihood())
    la.optimize_prior_precision(n_steps=20, prior_structure="layerwise")
    assert torch.isfinite(la.log_marginal_likelihood())

    P = la.posterior_precision.to_matrix()
    prior = la.prior_precision.repeat_interleave(torch.tensor(la.H.sizes))
    H = dense_ggn(model, x, y, likelihood)
    dense, factored = dense_blocks(model, P), dense_blocks(model, H)
    for name, p in zip(dense, la.prior_precision):
        if name in norm_parameters(model):
            expected = factored[name] * la._H_factor + p * torch.eye(len(factored[name]))
            torch.testing.assert_close(dense[name], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(P.diagonal() - la.H.diag() * la._H_factor, prior, **TOL)
    torch.testing.assert_close(la.log_det_posterior_precision, torch.logdet(P), **TOL)

    Js = dense_jacobians(model, x_test)
    expected_var = Js @ torch.linalg.solve(P, Js.mT)
    f_mu, f_var = la._glm_predictive_distribution(x_test)
    torch.testing.assert_close(f_mu, model(x_test), **TOL)
    torch.testing.assert_close(f_var, expected_var, rtol=1e-8, atol=1e-12)
    out = la(x_test, pred_type="glm")
    if likelihood == "classification":
        torch.testing.assert_close(out.sum(-1), torch.ones(5), **TOL)
    else:
        torch.testing.assert_close(out[1], expected_var, rtol=1e-8, atol=1e-12)

    covariance = torch.linalg.inv(P)
    torch.testing.assert_close(la.posterior_covariance, covariance, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(la.posterior_variance, covariance.diagonal(), rtol=1e-8, atol=0.0)
    root = la.posterior_precision.bmm(torch.eye(len(P)), exponent=-0.5)
    torch.testing.assert_close(root.mT @ root, covariance, rtol=1e-8, atol=1e-12)
    samples = la.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, len(P)) and torch.isfinite(samples).all()


# ----------------------------------------------------------------------------- float32
def dead_unit_bn_mlp() -> nn.Module:
    """A float32 ``4-16-16-3`` ReLU MLP with batch norm after each hidden Linear; four units
    of the first batch norm are dead (a beta of -50 keeps their ReLU off on every input):
    their gamma and beta, and every weight behind them, get no curvature at all."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, N_OUT),
    )
    randomise_norms(model)
    with torch.no_grad():
        model[1].bias[:4] = -50.0
    return model.float().eval()


def norm_ggn_blocks(model: nn.Module, x: torch.Tensor, likelihood: str) -> dict[str, torch.Tensor]:
    """The normalisation blocks of the dense GGN from the model's own Jacobians, summed in
    float64 (for a float32 model: the floor; for its float64 copy: the truth)."""
    J, f = T.jacobians(model, x)
    J, f = J.double(), f.double()
    H = torch.einsum("ncp,ncd,ndq->pq", J, T.output_hessians(f, likelihood), J)
    blocks = dense_blocks(model, H)
    return {name: blocks[name] for name in norm_parameters(model)}


def test_float32_norm_blocks_against_float64_truth(likelihood):
    """The norm blocks and the GLM variance of a float32 fit (600 points) against the float64
    copy of the model (the same weights, upcast).

    Each Jacobian row is a float32 sum over the network with a relative error of a few
    ``eps`` (float32 round-off, 1.2e-7); the blocks are summed in float64, so their error is
    about that of the rows. The tolerance is ``3 * floor + 16 eps * max|block|``
    (:func:`float32_truth.tolerance`), the floor being the same blocks from the float32
    model's own ``torch.func`` Jacobians summed in float64. Dead units have exact zeros. The
    GLM (co)variances, relative to ``sqrt(var_i var_j)``, carry the error of the float32
    Jacobians and of their rotation into the eigenbasis, a few ``eps`` each (measured: 2
    ``eps``); the tolerance is 32 ``eps`` (3.8e-6). Their truth is the float64 fit, whose
    normalisation blocks the float64 tests above check against brute force.
    """
    model = dead_unit_bn_mlp()
    x, y = T.make_data(likelihood, 600, N_OUT, (4,), seed=2)
    x_test = T.make_data(likelihood, 50, N_OUT, (4,), seed=5)[0]
    twin = copy.deepcopy(model).double()
    y_twin = y.double() if y.is_floating_point() else y
    fits = []
    for net, inputs, targets in ((model, x, y), (twin, x.double(), y_twin)):
        la = Laplace(net, likelihood, "all", hessian_structure="kron", prior_precision=0.5)
        la.fit(DataLoader(TensorDataset(inputs, targets), batch_size=100))
        fits.append(la)
    ours = kron_blocks(model, fits[0]._curvature.H)  # the float64 sums, before any cast
    truth = norm_ggn_blocks(twin, x.double(), likelihood)
    floor = norm_ggn_blocks(model, x, likelihood)
    for name, expected in truth.items():
        block = ours[name][0].double()
        scale = expected.abs().max().item()
        floor_error = (floor[name] - expected).abs().max().item()
        error = (block - expected).abs().max().item()
        assert error <= T.tolerance(floor_error, scale), (name, error, floor_error, scale)
        if name.startswith("1."):
            assert block[:4].abs().max() == 0 and block[:, :4].abs().max() == 0, name
    f_var = fits[0]._glm_predictive_distribution(x_test)[1]
    assert f_var.dtype == torch.float32
    true_var = fits[1]._glm_predictive_distribution(x_test.double())[1]
    error = T.scaled_error(f_var, true_var)
    assert error <= 32 * T.EPS, error
