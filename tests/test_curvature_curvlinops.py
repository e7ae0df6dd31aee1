"""The curvlinops backends against dense float64 ground truth and a naive K-FAC."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from groundtruth import dense_ef, dense_ggn, dense_hessian, total_loss
from kfac_reference import kfac_blocks, naive_kfac
from torch import nn

import laplace.curvature._operators as operators_module
import laplace.curvature.curvlinops as curvlinops_backend
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian
from laplace.utils.enums import HessianStructure

REFERENCES = {CurvlinopsGGN: dense_ggn, CurvlinopsEF: dense_ef, CurvlinopsHessian: dense_hessian}
KINDS = {CurvlinopsGGN: "ggn", CurvlinopsEF: "ef"}
TOL = {"atol": 1e-9, "rtol": 1e-9}


def setup(model_name: str, likelihood: str, n: int = 12):
    if model_name == "mlp":
        return make_mlp(), *make_data(likelihood, n=n)
    return make_cnn(), *make_data(likelihood, n=n, n_out=3, image=True)


class DictModel(nn.Module):
    """Reads its input from a dict-like batch, as Hugging Face models do."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["input_ids"])


class LastLayerModel(nn.Module):
    """A minimal feature extractor: ``forward_with_features`` and ``last_layer``."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.body, self.last_layer = net[:-1], net[-1]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phi = self.body(x)
        return self.last_layer(phi), phi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


backends = pytest.mark.parametrize("backend", list(REFERENCES), ids=lambda b: b.__name__)
fisher_backends = pytest.mark.parametrize("backend", list(KINDS), ids=lambda b: b.__name__)
models = pytest.mark.parametrize("model_name", ["mlp", "cnn"])


# ---------------------------------------------------------------------------- full / diag
@backends
@models
def test_full_and_diag_match_dense(backend, model_name, likelihood):
    model, x, y = setup(model_name, likelihood)
    expected = REFERENCES[backend](model, x, y, likelihood)
    curvature = backend(model, likelihood)
    loss, H = curvature.full(x, y, N=len(x))
    torch.testing.assert_close(H, expected, **TOL)
    torch.testing.assert_close(loss, total_loss(model, x, y, likelihood))
    loss, h = curvature.diag(x, y, N=len(x))
    torch.testing.assert_close(h, torch.diagonal(expected), **TOL)
    torch.testing.assert_close(loss, total_loss(model, x, y, likelihood))


@backends
def test_full_chunked_columns_match_dense(backend, monkeypatch):
    likelihood = "classification"
    model, x, y = setup("mlp", likelihood)
    n_params = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(operators_module, "_CHUNK_ENTRIES", 3 * n_params + 1)
    expected = REFERENCES[backend](model, x, y, likelihood)
    _, H = backend(model, likelihood).full(x, y)
    torch.testing.assert_close(H, expected, **TOL)
    if backend is CurvlinopsHessian:
        _, h = backend(model, likelihood).diag(x, y)
        torch.testing.assert_close(h, expected.diagonal(), **TOL)


@backends
def test_subnetwork_indices_restrict_full_and_diag(backend, likelihood):
    model, x, y = setup("mlp", likelihood)
    indices = torch.tensor([30, 0, 7, 21, 15])
    curvature = backend(model, likelihood, subnetwork_indices=indices)
    expected = REFERENCES[backend](model, x, y, likelihood)[indices][:, indices]
    torch.testing.assert_close(curvature.full(x, y)[1], expected, **TOL)
    torch.testing.assert_close(curvature.diag(x, y)[1], expected.diagonal(), **TOL)


@backends
def test_last_layer_curvature_matches_dense(backend, likelihood):
    net, x, y = setup("mlp", likelihood)
    model = LastLayerModel(net)
    for p in model.body.parameters():
        p.requires_grad_(False)
    expected = REFERENCES[backend](net, x, y, likelihood)
    curvature = backend(model, likelihood, last_layer=True)
    torch.testing.assert_close(curvature.full(x, y)[1], expected, **TOL)
    torch.testing.assert_close(curvature.diag(x, y)[1], expected.diagonal(), **TOL)
    if backend in KINDS:
        _, kron = curvature.kron(x, y, N=20)
        reference = naive_kfac(net, x, y, likelihood, KINDS[backend], n_data=20)
        assert_kron_matches_reference(kron, reference)


# ---------------------------------------------------------------------------- kron
def assert_kron_matches_reference(kron, reference):
    assert [len(f) for f in kron.kfacs] == [len(f) for f in reference]
    for ours, theirs in zip(kron.kfacs, reference):
        # the loss factor may be split differently between B and A; each block must agree
        ours_block, theirs_block = ours[0], theirs[0]
        if len(ours) == 2:
            ours_block, theirs_block = torch.kron(*ours), torch.kron(*theirs)
            # the split is even: B and A carry the same share sqrt(factor) of the loss factor
            share = (ours[1] / theirs[1]).flatten()
            share = share[torch.isfinite(share)]
            torch.testing.assert_close(share, share[0].expand_as(share))
        torch.testing.assert_close(ours_block, theirs_block, **TOL)
    dense = torch.block_diag(*kfac_blocks(reference))
    torch.testing.assert_close(kron.to_matrix(), dense, **TOL)


@fisher_backends
@models
def test_kron_matches_naive_kfac(backend, model_name, likelihood):
    model, x, y = setup(model_name, likelihood)
    loss, kron = backend(model, likelihood).kron(x, y, N=30)
    reference = naive_kfac(model, x, y, likelihood, KINDS[backend], n_data=30)
    assert_kron_matches_reference(kron, reference)
    torch.testing.assert_close(loss, total_loss(model, x, y, likelihood))


def param_blocks(model: nn.Module) -> list[slice]:
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [slice(a, b) for a, b in itertools.pairwise(starts)]


def test_kron_single_sample_equals_ggn_blocks(likelihood):
    model, x, y = setup("mlp", likelihood, n=1)
    _, kron = CurvlinopsGGN(model, likelihood).kron(x, y, N=1)
    ggn = dense_ggn(model, x, y, likelihood)
    for block, factors in zip(param_blocks(model), kron.kfacs):
        dense = torch.kron(*factors) if len(factors) == 2 else factors[0]
        torch.testing.assert_close(dense, ggn[block, block], **TOL)


@pytest.mark.parametrize("last_layer", [False, True], ids=["frozen-body", "last_layer"])
def test_kron_of_last_linear_layer_equals_ggn_for_regression(last_layer):
    net, x, y = setup("mlp", "regression")
    for p in net[0].parameters():
        p.requires_grad_(False)
    model = LastLayerModel(net) if last_layer else net
    _, kron = CurvlinopsGGN(model, "regression", last_layer=last_layer).kron(x, y, N=len(x))
    ggn = dense_ggn(net, x, y, "regression")
    assert len(kron.kfacs) == 2
    for block, factors in zip(param_blocks(net), kron.kfacs):
        dense = torch.kron(*factors) if len(factors) == 2 else factors[0]
        torch.testing.assert_close(dense, ggn[block, block], **TOL)


@fisher_backends
@models
def test_kron_batches_sum_to_full_data_kfac(backend, model_name, likelihood):
    model, x, y = setup(model_name, likelihood)
    curvature = backend(model, likelihood)
    _, full_batch = curvature.kron(x, y, N=len(x))
    (_, first), (_, second) = (
        curvature.kron(xb, yb, N=len(x)) for xb, yb in zip(x.split([5, 7]), y.split([5, 7]))
    )
    summed = [[F + G for F, G in zip(f, g)] for f, g in zip(first.kfacs, second.kfacs)]
    blocks = [torch.kron(*f) if len(f) == 2 else f[0] for f in summed]
    torch.testing.assert_close(torch.block_diag(*blocks), full_batch.to_matrix(), **TOL)
    torch.testing.assert_close((first + second).to_matrix(), full_batch.to_matrix(), **TOL)


def _operator_forbidden(*args, **kwargs):
    raise AssertionError("KFACLinearOperator was used")


@fisher_backends
@models
def test_exact_kron_needs_no_kfac_operator(backend, model_name, likelihood, monkeypatch):
    """Exact GGN and EF K-FAC come from one forward and one batched backward pass."""
    monkeypatch.setattr(curvlinops_backend, "KFACLinearOperator", _operator_forbidden)
    model, x, y = setup(model_name, likelihood)
    loss, kron = backend(model, likelihood).kron(x, y, N=30)
    assert_kron_matches_reference(kron, naive_kfac(model, x, y, likelihood, KINDS[backend], 30))
    torch.testing.assert_close(loss, total_loss(model, x, y, likelihood))


@fisher_backends
@models
def test_kron_operator_path_matches_naive_kfac(backend, model_name, likelihood, monkeypatch):
    monkeypatch.setattr(curvlinops_backend, "batch_kfac", lambda *args, **kwargs: None)
    model, x, y = setup(model_name, likelihood)
    loss, kron = backend(model, likelihood).kron(x, y, N=30)
    assert_kron_matches_reference(kron, naive_kfac(model, x, y, likelihood, KINDS[backend], 30))
    torch.testing.assert_close(loss, total_loss(model, x, y, likelihood))


def test_stochastic_kron_uses_the_kfac_operator(monkeypatch):
    model, x, y = setup("mlp", "classification")
    monkeypatch.setattr(curvlinops_backend, "KFACLinearOperator", _operator_forbidden)
    with pytest.raises(AssertionError, match="KFACLinearOperator was used"):
        CurvlinopsGGN(model, "classification", stochastic=True).kron(x, y, N=12)


def test_string_padding_takes_the_operator_path_and_agrees(likelihood):
    _, x, y = setup("cnn", likelihood)
    twin = make_cnn()
    model = make_cnn()
    model[0].padding = "valid"  # same convolution as padding 0, not an unfold padding
    _, native = CurvlinopsGGN(twin, likelihood).kron(x, y, N=12)
    _, operator = CurvlinopsGGN(model, likelihood).kron(x, y, N=12)
    torch.testing.assert_close(operator.to_matrix(), native.to_matrix(), **TOL)


@models
def test_kron_rows_in_chunks_and_one_at_a_time(model_name, likelihood, monkeypatch):
    """Chunked rows and the per-row fallback (no batching rule) give the same factors."""
    import laplace.curvature._kfac as kfac_path

    model, x, y = setup(model_name, likelihood)
    reference = naive_kfac(model, x, y, likelihood, "ggn", 30)
    monkeypatch.setattr(kfac_path, "_MAX_GRAD_ENTRIES", 1)
    _, kron = CurvlinopsGGN(model, likelihood).kron(x, y, N=30)
    assert_kron_matches_reference(kron, reference)
    grad = torch.autograd.grad
    batched_calls = []

    def no_batching_rule(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            batched_calls.append(1)
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(kfac_path, "_MAX_GRAD_ENTRIES", 2**24)
    monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
    _, kron = CurvlinopsGGN(model, likelihood).kron(x, y, N=30)
    assert batched_calls
    assert_kron_matches_reference(kron, reference)


class FoldedPairs(nn.Module):
    """A Bradley-Terry reward model: ``(batch, 2, d)`` folded to ``(2 batch, d)`` inside."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], -1)


class PooledSequence(nn.Module):
    """Linear layers that see a ``(batch, positions, d)`` sequence, then mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh()).double()
        self.head = nn.Linear(5, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(1))


@fisher_backends
@pytest.mark.parametrize("model_cls", [FoldedPairs, PooledSequence])
def test_weight_sharing_kron_matches_the_kfac_operator(backend, model_cls, monkeypatch):
    """Folded and sequence inputs: the one-pass K-FAC keeps ``curvlinops``' convention."""
    torch.manual_seed(0)
    model = model_cls()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 2 if model_cls is FoldedPairs else 4, 3, generator=g, dtype=torch.double)
    y = torch.randint(0, 2, (12,), generator=g)
    loss, native = backend(model, "classification").kron(x, y, N=30)
    monkeypatch.setattr(curvlinops_backend, "batch_kfac", lambda *args, **kwargs: None)
    operator_loss, operator = backend(model, "classification").kron(x, y, N=30)
    torch.testing.assert_close(loss, operator_loss)
    for ours, theirs in zip(native.kfacs, operator.kfacs):
        for F, G in zip(ours, theirs):
            torch.testing.assert_close(F, G, **TOL)


# ---------------------------------------------------------------------------- Monte Carlo
def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return ((estimate - exact).norm() / exact.norm()).item()


def test_mc_fisher_converges_to_ggn(likelihood):
    model, x, y = setup("mlp", likelihood)
    exact = dense_ggn(model, x, y, likelihood)
    _, kron_exact = CurvlinopsGGN(model, likelihood).kron(x, y, N=len(x))
    errors = {}
    for n in (1, 100):
        mc = CurvlinopsGGN(
            model,
            likelihood,
            stochastic=True,
            num_samples=n,
            generator=torch.Generator().manual_seed(0),
        )
        loss, H = mc.full(x, y)
        _, kron = mc.kron(x, y, N=len(x))
        errors[n] = (
            relative_error(H, exact),
            relative_error(kron.to_matrix(), kron_exact.to_matrix()),
        )
        torch.testing.assert_close(loss, total_loss(model, x, y, likelihood))
    assert min(errors[1]) > 1e-3
    assert max(errors[100]) < 0.1


def test_mc_fisher_follows_generator():
    model, x, y = setup("mlp", "classification")
    mc = CurvlinopsGGN(model, "classification", stochastic=True)
    draws = [mc.full(x, y, generator=torch.Generator().manual_seed(s))[1] for s in (3, 3, 4)]
    torch.testing.assert_close(draws[0], draws[1], atol=0, rtol=0)
    assert not torch.allclose(draws[0], draws[2])


# ---------------------------------------------------------------------------- dict inputs
def as_dense(curvature) -> torch.Tensor:
    return curvature if isinstance(curvature, torch.Tensor) else curvature.to_matrix()


@backends
def test_dict_inputs_match_tensor_inputs(backend, likelihood):
    net, x, y = setup("mlp", likelihood)
    tensor_backend = backend(net, likelihood)
    dict_backend = backend(DictModel(net), likelihood, dict_key_x="input_ids")
    batch = {"input_ids": x, "labels": y}
    assert backend.supports_dict_inputs
    for structure in sorted(backend.structures):
        expected_loss, expected = getattr(tensor_backend, structure.value)(x, y, N=30)
        loss, curvature = getattr(dict_backend, structure.value)(batch, y, N=30)
        torch.testing.assert_close(loss, expected_loss, **TOL)
        torch.testing.assert_close(as_dense(curvature), as_dense(expected), **TOL)


# ---------------------------------------------------------------------------- capabilities
def test_declared_structures():
    full, diag, kron = HessianStructure.FULL, HessianStructure.DIAG, HessianStructure.KRON
    assert CurvlinopsGGN.structures == {full, diag, kron}
    assert CurvlinopsEF.structures == {full, diag, kron}
    assert CurvlinopsHessian.structures == {full, diag}


def test_hessian_kron_error_lists_supported_structures():
    model, x, y = setup("mlp", "classification")
    with pytest.raises(NotImplementedError, match=r"'kron'.*'diag', 'full'"):
        CurvlinopsHessian(model, "classification").kron(x, y, N=12)


@fisher_backends
def test_kron_rejects_unsupported_layer(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    x, y = torch.randint(5, (12, 2)), make_data("classification")[1]
    match = r"Linear, Conv2d.*'0\.weight' belongs to Embedding"
    with pytest.raises(NotImplementedError, match=match) as caught:  # laplace-torch's class
        backend(model, "classification").kron(x, y, N=12)
    assert isinstance(caught.value, ValueError)


def test_kron_rejects_subnetwork_and_bad_n():
    model, x, y = setup("mlp", "regression")
    with pytest.raises(ValueError, match="subnetwork_indices"):
        CurvlinopsGGN(model, "regression", subnetwork_indices=torch.tensor([0, 1])).kron(
            x, y, N=12
        )
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="N must be a positive integer"):
            CurvlinopsGGN(model, "regression").kron(x, y, N=bad)


def test_missing_kronecker_factors_raise_clear_error():
    class FactorlessKFAC:
        def compute_kronecker_factors(self) -> None:
            pass

        def state_dict(self) -> dict:
            return {"fisher_type": "type-2"}

    with pytest.raises(RuntimeError, match="curvlinops-for-pytorch 3"):
        curvlinops_backend._kronecker_factors(FactorlessKFAC())


def test_stochastic_options_only_for_ggn():
    model, _, _ = setup("mlp", "classification")
    with pytest.raises(TypeError, match="stochastic"):
        CurvlinopsEF(model, "classification", stochastic=True)
    with pytest.raises(ValueError, match="num_samples"):
        CurvlinopsGGN(model, "classification", stochastic=True, num_samples=0)


@pytest.mark.parametrize("backend", [CurvlinopsGGN, CurvlinopsHessian], ids=lambda b: b.__name__)
def test_float32_stays_float32(backend):
    x, y = make_data("regression")
    expected = REFERENCES[backend](make_mlp(), x, y, "regression")
    curvature = backend(make_mlp().float(), "regression")
    loss, H = curvature.full(x.float(), y.float())
    _, h = curvature.diag(x.float(), y.float())
    assert H.dtype == h.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(H.double(), expected, atol=1e-4, rtol=1e-4)
    if backend is CurvlinopsGGN:
        _, kron = curvature.kron(x.float(), y.float(), N=len(x))
        assert all(F.dtype == torch.float32 for f in kron.kfacs for F in f)


@pytest.mark.parametrize("route", ["operator", "jacobian_gram"])
@pytest.mark.parametrize("backend", [CurvlinopsGGN, CurvlinopsEF])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_full_routes_agree_with_ground_truth(route, backend, model_name, likelihood, monkeypatch):
    import laplace.curvature.curvlinops as module

    monkeypatch.setattr(module, "_GRAM_MAX_ENTRIES", 0 if route == "operator" else 2**40)
    model, x, y = setup(model_name, likelihood)
    reference = dense_ef if backend is CurvlinopsEF else dense_ggn
    curvature = backend(model, likelihood)
    assert curvature._gram_is_cheaper(x) == (route == "jacobian_gram")
    torch.testing.assert_close(curvature.full(x, y)[1], reference(model, x, y, likelihood), **TOL)
