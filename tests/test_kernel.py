"""The posterior kernel ``k(X1, X2) = J(X1) P^-1 J(X2)^T`` and joint function samples.

Truth: per-sample Jacobians from ``torch.func`` with respect to the posterior's parameters
(all weights, the last layer, or the subnetwork's entries), and the dense inverse of the
posterior precision, in float64.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from float32_truth import make_data as make_data32
from float32_truth import relu_mlp, scaled_error
from groundtruth import dense_jacobians
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

from laplace import ELLA, FunctionalLaplace, Laplace, VaLLA

GRID = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("all", "lowrank"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
    ("subnetwork", "full"),
    ("subnetwork", "diag"),
]


def loader(x, y, batch_size=7):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def last_layer_jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Jacobians w.r.t. the last Linear layer's weight and bias, by ``torch.func``."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    params = {k: v.detach() for k, v in model.named_parameters() if k.startswith(name + ".")}

    def one(theta, xi):
        return functional_call(model, theta, (xi.unsqueeze(0),))[0]

    jac = vmap(jacrev(one), in_dims=(None, 0))(params, x)
    return torch.cat([jac[k].flatten(2) for k in params], dim=2)


def fitted(model, likelihood, subset, structure, x, y, **kwargs):
    if subset == "subnetwork":
        n_params = sum(p.numel() for p in model.parameters())
        kwargs["subnetwork_indices"] = torch.arange(1, n_params, 3)
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=0.7,
        **kwargs,
    )
    la.fit(loader(x, y))
    return la


def truth_jacobians(la, model, subset, x):
    if subset == "last_layer":
        return last_layer_jacobians(model, x)
    Js = dense_jacobians(model, x)
    if subset == "subnetwork":
        return Js[:, :, la.backend.subnetwork_indices]
    return Js


def dense_kernel(J1: torch.Tensor, J2: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``J1 P^-1 J2^T`` as ``(n1, n2, outputs, outputs)``."""
    n1, C, p = J1.shape
    n2 = J2.shape[0]
    cross = J1.reshape(-1, p) @ torch.linalg.solve(P, J2.reshape(-1, p).T)
    return cross.reshape(n1, C, n2, C).permute(0, 2, 1, 3)


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
@pytest.mark.parametrize("subset,structure", GRID, ids=[f"{s}-{h}" for s, h in GRID])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kernel_equals_dense_truth(model_kind, subset, structure, likelihood):
    if model_kind == "mlp":
        model, (x, y) = make_mlp(n_out=3), make_data(likelihood, n=20, n_out=3)
    else:
        model, (x, y) = make_cnn(n_out=3), make_data(likelihood, n=20, n_out=3, image=True)
    la = fitted(model, likelihood, subset, structure, x, y)
    P = la.posterior.to_dense()
    Js = truth_jacobians(la, model, subset, x)
    truth = dense_kernel(Js[:9], Js[4:], P)
    k = la.posterior_kernel(batch_size=4)
    torch.testing.assert_close(k(x[:9], x[4:]), truth, rtol=1e-9, atol=1e-11)
    # the same with X2's Jacobians recomputed per block (no cache)
    uncached = la.posterior_kernel(batch_size=4, max_cached_entries=1)
    torch.testing.assert_close(uncached(x[:9], x[4:]), truth, rtol=1e-9, atol=1e-11)
    full = dense_kernel(Js, Js, P)
    K = k(x)
    torch.testing.assert_close(K, full, rtol=1e-9, atol=1e-11)
    assert torch.equal(K, K.permute(1, 0, 3, 2))  # exactly symmetric
    # k(x, x) is the GLM predictive variance; k(X, X) is the functional covariance
    n, C = x.shape[0], K.shape[-1]
    _, f_var = la._glm_predictive_distribution(x)
    torch.testing.assert_close(k.diagonal(x), f_var, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(K.diagonal(dim1=0, dim2=1).permute(2, 0, 1), f_var)
    torch.testing.assert_close(k.variance(x), f_var.diagonal(dim1=1, dim2=2))
    joint = la.functional_covariance(la._kernel_rows(x))
    torch.testing.assert_close(K.permute(0, 2, 1, 3).reshape(n * C, n * C), joint)
    eigenvalues = torch.linalg.eigvalsh(K.permute(0, 2, 1, 3).reshape(n * C, n * C))
    assert eigenvalues.min() > -1e-10 * eigenvalues.max()


def test_kernel_of_regression_predictive_matches_joint_glm():
    model = make_mlp(n_out=2)
    x, y = make_data("regression", n=15, n_out=2)
    la = fitted(model, "regression", "all", "kron", x, y)
    _, f_cov = la(x[:6], pred_type="glm", joint=True)
    K = la.posterior_kernel(batch_size=2)(x[:6])
    torch.testing.assert_close(K.permute(0, 2, 1, 3).reshape(12, 12), f_cov)


def test_kron_and_diag_kernels_never_densify(monkeypatch):
    """The structured paths of the posterior are used, not its dense covariance."""
    model = make_mlp(n_out=3)
    x, y = make_data("classification", n=12, n_out=3)
    for structure in ["kron", "diag"]:
        la = fitted(model, "classification", "all", structure, x, y)
        posterior = la.posterior

        def refuse(*args, **kwargs):
            raise AssertionError("the kernel formed a dense matrix")

        monkeypatch.setattr(type(posterior), "covariance", refuse)
        monkeypatch.setattr(type(posterior), "to_dense", refuse)
        monkeypatch.setattr(type(posterior), "inv_quad_joint", refuse)
        K = la.posterior_kernel(batch_size=5)(x[:7], x[3:])
        assert K.shape == (7, 9, 3, 3)
        monkeypatch.undo()


def functional_cases():
    return [
        ("sod", lambda m: FunctionalLaplace(m, "classification", n_subset=15, seed=3)),
        ("sod-reg", lambda m: FunctionalLaplace(m, "regression", n_subset=15, seed=3)),
        ("sod-ll", lambda m: Laplace(m, "classification", "last_layer", "gp", n_subset=15)),
        ("ella", lambda m: ELLA(m, "classification", subsample_size=16, n_eigenvalues=8)),
        ("valla", lambda m: VaLLA(m, "classification", "kmeans", num_inducing=6, seed=2)),
    ]


@pytest.mark.parametrize("name,make", functional_cases(), ids=[c[0] for c in functional_cases()])
def test_function_space_kernel_equals_joint_covariance(name, make):
    model = make_mlp(n_out=3)
    likelihood = "regression" if name.endswith("reg") else "classification"
    x, y = make_data(likelihood, n=24, n_out=3)
    la = make(model)
    if name == "valla":
        la.fit(loader(x, y), iterations=5)
    else:
        la.fit(loader(x, y))
    k = la.posterior_kernel(batch_size=5)
    K = k(x[:11])
    n, C = 11, 3
    _, joint = la._glm_predictive_distribution(x[:11], joint=True)
    torch.testing.assert_close(K.permute(0, 2, 1, 3).reshape(n * C, n * C), joint)
    torch.testing.assert_close(k(x[:4], x[6:11]), K[:4, 6:11])
    _, f_var = la._glm_predictive_distribution(x[:11])
    torch.testing.assert_close(k.diagonal(x[:11]), f_var)


# ----------------------------------------------------------------------------- float32
def test_float32_kernel_against_float64_truth():
    """A float32 ReLU MLP (dead units, more parameters than data, prior precision 1e-3, so
    the kernel is dominated by directions without curvature) against the truth from the
    same weights and data upcast to float64, with the same posterior precision.

    Tolerance: the float-policy of the predictive (:mod:`laplace.utils.precision`) runs the
    products of data-sized Jacobians with the (float64-accurate) factors in float32; a
    rotation into the eigenbasis adds ``eps`` relative to the rows, which the prior-variance
    directions (``1 / 1e-3`` against a largest eigenvalue of about 20) amplify to about
    ``eps * cond``: the float32 predictive suite's target of 1e-3 relative to
    ``sqrt(k(x1, x1) k(x2, x2))`` (``TARGETS["var"]`` of tests/test_float32.py), seen here at
    about 1e-4.
    """
    model = relu_mlp(4, 3, seed=0)
    x, y = make_data32("classification", 30, 3, (4,), seed=1)
    for structure in ["kron", "full", "diag"]:
        la = Laplace(
            model, "classification", subset_of_weights="all", hessian_structure=structure,
            prior_precision=1e-3,
        )  # fmt: skip
        la.fit(loader(x, y, batch_size=10))
        P = la.posterior.to_dense().double()
        J64 = dense_jacobians(relu_mlp(4, 3, seed=0).double(), x.double())
        n, C = 30, 3
        truth = dense_kernel(J64, J64, P).permute(0, 2, 1, 3).reshape(n * C, n * C)
        K = la.posterior_kernel(batch_size=8)(x).permute(0, 2, 1, 3).reshape(n * C, n * C)
        assert K.dtype == torch.float32
        assert scaled_error(K, truth) <= 1e-3
        cross = la.posterior_kernel(batch_size=8)(x[:12], x[12:])
        cross = cross.permute(0, 2, 1, 3).reshape(12 * C, 18 * C).double()
        sd = truth.diagonal().sqrt()
        relative = (cross - truth[: 12 * C, 12 * C :]) / (sd[: 12 * C, None] * sd[None, 12 * C :])
        assert relative.abs().max() <= 1e-3


# ----------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("subset,structure", GRID, ids=[f"{s}-{h}" for s, h in GRID])
def test_function_sampler_is_the_linearised_network_at_weight_samples(subset, structure):
    model = make_mlp(n_out=3)
    x, y = make_data("regression", n=20, n_out=3)
    la = fitted(model, "regression", subset, structure, x, y)
    sampler = la.function_sampler(6, seed=11, batch_size=4)
    generator = torch.Generator().manual_seed(11)
    deltas = la.posterior.sample(6, generator)
    Js = truth_jacobians(la, model, subset, x)
    f = model(x).detach()
    truth = f + torch.einsum("bcp,sp->sbc", Js, deltas)
    torch.testing.assert_close(sampler(x), truth)
    # chunks of the pool belong to the same functions; the same seed, the same functions
    torch.testing.assert_close(torch.cat([sampler(x[:7]), sampler(x[7:])], 1), truth)
    torch.testing.assert_close(la.function_sampler(6, seed=11)(x[3:9]), truth[:, 3:9])
    nn_sampler = la.function_sampler(6, seed=11, pred_type="nn")
    outs = la._outputs_at(x, la.sample(6, torch.Generator().manual_seed(11)))
    torch.testing.assert_close(nn_sampler(x), outs)


@pytest.mark.parametrize(
    "name,make", functional_cases()[:4], ids=[c[0] for c in functional_cases()[:4]]
)
def test_function_space_samples_have_the_gp_posterior_moments(name, make):
    """Monte Carlo: 40,000 joint samples at 5 inputs have the posterior's mean and joint
    covariance within 5 standard errors (``sqrt(2 / S)`` of the scale of each entry)."""
    model = make_mlp(n_out=3)
    likelihood = "regression" if name.endswith("reg") else "classification"
    x, y = make_data(likelihood, n=24, n_out=3)
    la = make(model)
    la.fit(loader(x, y))
    S = 40_000
    sampler = la.function_sampler(S, seed=5)
    F = torch.cat([sampler(x[:2]), sampler(x[2:5])], 1).flatten(1)
    mu, cov = la._glm_predictive_distribution(x[:5], joint=True)
    centred = F - F.mean(0)
    sample_cov = centred.T @ centred / S
    sd = cov.diagonal().sqrt()
    scale = sd[:, None] * sd[None, :]
    assert ((F.mean(0) - mu).abs() / sd).max() < 5 * S**-0.5
    assert ((sample_cov - cov).abs() / scale).max() < 5 * (2 / S) ** 0.5


def test_sampler_and_kernel_errors():
    model = make_mlp(n_out=2)
    x, y = make_data("classification", n=10)
    la = Laplace(model, "classification", hessian_structure="diag")
    with pytest.raises(ValueError, match="not fitted"):
        la.posterior_kernel()(x)
    with pytest.raises(ValueError, match="not fitted"):
        la.function_sampler(3)
    la.fit(loader(x, y))
    with pytest.raises(ValueError, match="batch_size"):
        la.posterior_kernel(batch_size=0)
    with pytest.raises(ValueError, match="n_samples"):
        la.function_sampler(0)
    with pytest.raises(TypeError, match="seed"):
        la.function_sampler(3, seed=1.5)
    with pytest.raises(ValueError, match="pred_type"):
        la.function_sampler(3, pred_type="banana")
    with pytest.raises(TypeError, match="X1"):
        la.posterior_kernel()([1, 2])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="X1 contains NaN"):
        la.posterior_kernel()(bad)
    with pytest.raises(ValueError, match="X2 contains NaN"):
        la.posterior_kernel()(x, bad)
    sod = FunctionalLaplace(model, "classification", n_subset=5)
    sod.fit(loader(x, y))
    with pytest.raises(NotImplementedError, match="nn"):
        sod.function_sampler(3, pred_type="nn")
    independent = FunctionalLaplace(model, "classification", n_subset=5, independent_outputs=True)
    independent.fit(loader(x, y))
    with pytest.raises(NotImplementedError, match="independent_outputs"):
        independent.function_sampler(3)
    valla = VaLLA(model, "classification", "kmeans", num_inducing=4)
    valla.fit(loader(x, y), iterations=2)
    with pytest.raises(NotImplementedError, match="joint function samples"):
        valla.function_sampler(3)


def test_kernel_restores_train_mode_and_builds_no_graph():
    model = make_mlp(n_out=2)
    x, y = make_data("regression", n=10)
    la = fitted(model, "regression", "all", "full", x, y)
    model.train()
    K = la.posterior_kernel()(x)
    assert model.training and not K.requires_grad


BACKENDS = ["CurvlinopsGGN", "CurvlinopsEF", "BackPackGGN", "AsdlGGN", "AsdlEF"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_kernel_with_every_backend(backend, structure):
    import laplace.curvature as curvature

    model = make_mlp(n_out=3)
    x, y = make_data("classification", n=14, n_out=3)
    la = fitted(
        model, "classification", "all", structure, x, y, backend=getattr(curvature, backend)
    )
    Js = dense_jacobians(model, x)
    truth = dense_kernel(Js[:5], Js[3:], la.posterior.to_dense())
    torch.testing.assert_close(la.posterior_kernel(batch_size=3)(x[:5], x[3:]), truth)


def test_input_chunks_slice_dict_batches_per_sample():
    from laplace.kernel import input_chunks

    batch = {"input_ids": torch.arange(10).reshape(5, 2), "mask": torch.ones(5, 2), "flag": 3}
    chunks = list(input_chunks(batch, 2))
    assert [c["input_ids"].shape[0] for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c["input_ids"] for c in chunks]), batch["input_ids"])
    assert all(c["flag"] == 3 for c in chunks)


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
@pytest.mark.parametrize(
    "subset,structure",
    [
        ("all", "full"),
        ("all", "kron"),
        ("all", "diag"),
        ("all", "lowrank"),
        ("subnetwork", "full"),
    ],
)
def test_jvp_function_samples_equal_jacobian_ones(model_kind, subset, structure):
    """``method="jvp"`` (forward mode, no Jacobian) against ``f + J delta`` with the
    brute-force Jacobians, the same draws; ``"auto"`` takes it under a tiny budget."""
    if model_kind == "mlp":
        model, (x, y) = make_mlp(n_out=3), make_data("classification", n=16, n_out=3)
    else:
        model = make_cnn(n_out=3)
        x, y = make_data("classification", n=16, n_out=3, image=True)
    la = fitted(model, "classification", subset, structure, x, y)
    deltas = la.posterior.sample(5, torch.Generator().manual_seed(4))
    truth = model(x).detach() + torch.einsum(
        "bcp,sp->sbc", truth_jacobians(la, model, subset, x), deltas
    )
    jvp = la.function_sampler(5, seed=4, method="jvp", batch_size=6)
    torch.testing.assert_close(jvp(x), truth)
    auto = la.function_sampler(5, seed=4, max_jacobian_entries=1)
    assert auto._uses_jvp(x)
    torch.testing.assert_close(auto(x), truth)
    assert not la.function_sampler(5, seed=4, method="jacobian")._uses_jvp(x)


def test_jvp_method_errors():
    model = make_mlp(n_out=2)
    x, y = make_data("classification", n=10)
    la = fitted(model, "classification", "last_layer", "kron", x, y)
    with pytest.raises(ValueError, match="method='jvp'"):
        la.function_sampler(3, method="jvp")
    with pytest.raises(ValueError, match="method must be"):
        la.function_sampler(3, method="reverse")


def test_rows_of_the_same_second_argument_are_reused_across_calls(monkeypatch):
    """Scoring a fixed pool against one point after another computes the pool's rows once;
    a modified pool (a new version of the tensor) is recomputed."""
    model = make_mlp(n_out=2)
    x, y = make_data("regression", n=20, n_out=2)
    la = fitted(model, "regression", "all", "full", x, y)
    k = la.posterior_kernel(batch_size=8)
    calls = []
    original = la._kernel_rows

    def counting(X):
        calls.append(len(X))
        return original(X)

    monkeypatch.setattr(la, "_kernel_rows", counting)
    pool = x.clone()
    first = k(pool[:1], pool)
    second = k(pool[1:2], pool)
    assert sum(calls) == 20 + 2  # the pool once, then one row per call
    Js = dense_jacobians(model, pool)
    truth = dense_kernel(Js[:2], Js, la.posterior.to_dense())
    torch.testing.assert_close(torch.cat([first, second]), truth)
    pool[0] += 1.0
    k(pool[:1], pool)
    assert sum(calls) == 22 + 21
