"""Last-layer Laplace against the all-weights classes and against naive dense float64 algebra.

Every last-layer class must equal (a) the matching all-weights class on the same model with
every parameter but the last layer's frozen, and (b) a dense implementation: Jacobians of
the last layer on the features from ``groundtruth``, the dense GGN, a dense inverse.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import make_cnn, make_data, make_mlp
from groundtruth import dense_ef, dense_jacobians, output_hessians, total_loss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import CurvlinopsEF, GGNInterface
from laplace.lllaplace import DiagLLLaplace, FullLLLaplace, KronLLLaplace, LLLaplace
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.matrix import block_diag, kron

LL = {"full": FullLLLaplace, "kron": KronLLLaplace, "diag": DiagLLLaplace}
ALL = {"full": FullLaplace, "kron": KronLaplace, "diag": DiagLaplace}
STRUCTURES = list(LL)


def loader(x, y, batch_size=5):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def make_model(name: str, likelihood: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny model and data; ``mlp-nobias`` has a last layer without bias."""
    if name == "cnn":
        return make_cnn(), *make_data(likelihood, n_out=3, image=True)
    model = make_mlp(n_out=3)
    if name == "mlp-nobias":
        torch.manual_seed(3)
        model[2] = nn.Linear(5, 3, bias=False).double()
    return model, *make_data(likelihood, n_out=3)


def frozen_but_last(model: nn.Module) -> nn.Module:
    """A copy whose only trainable parameters are the last layer's."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model[-1].parameters():
        p.requires_grad_(True)
    return model


def hyper(likelihood: str, n_layers: int) -> dict:
    prior = torch.linspace(0.5, 2.0, n_layers)
    noise = 0.7 if likelihood == "regression" else 1.0
    return {"prior_precision": prior, "sigma_noise": noise, "temperature": 0.8}


def assert_same_curvature(H, H_ref):
    H, H_ref = H.public(), H_ref.public()
    if isinstance(H, torch.Tensor):
        torch.testing.assert_close(H, H_ref)
        return
    assert len(H.kfacs) == len(H_ref.kfacs) > 0
    for factors, factors_ref in zip(H.kfacs, H_ref.kfacs):
        assert len(factors) == len(factors_ref)
        for f, f_ref in zip(factors, factors_ref):
            torch.testing.assert_close(f, f_ref)


def assert_same_predictions(la, ref, x, likelihood):
    if likelihood == "classification":
        for link in ("probit", "bridge", "bridge_norm"):
            torch.testing.assert_close(la(x, link_approx=link), ref(x, link_approx=link))
        mc = {"link_approx": "mc", "n_samples": 7}
        torch.testing.assert_close(
            la(x, **mc, generator=torch.Generator().manual_seed(1)),
            ref(x, **mc, generator=torch.Generator().manual_seed(1)),
        )
        return
    for kwargs in ({}, {"diagonal_output": True}, {"joint": True}):
        for a, b in zip(la(x, **kwargs), ref(x, **kwargs)):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        la.functional_samples(x, n_samples=5, generator=torch.Generator().manual_seed(2)),
        ref.functional_samples(x, n_samples=5, generator=torch.Generator().manual_seed(2)),
    )


# ---------------------------------------------------------------- (a) vs all weights
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize(
    ("model_name", "likelihood"),
    [
        ("mlp", "classification"),
        ("mlp", "regression"),
        ("mlp-nobias", "regression"),
        ("cnn", "classification"),
    ],
)
def test_equals_all_weights_with_frozen_body(structure, model_name, likelihood):
    model, x, y = make_model(model_name, likelihood)
    n_layers = len(list(model[-1].parameters()))
    la = LL[structure](model, likelihood, **hyper(likelihood, n_layers))
    ref = ALL[structure](frozen_but_last(model), likelihood, **hyper(likelihood, n_layers))
    la.fit(loader(x, y))
    ref.fit(loader(x, y))
    assert la.n_params == ref.n_params and la.n_layers == ref.n_layers == n_layers
    assert la.n_outputs == ref.n_outputs and la.n_data == ref.n_data
    assert_same_curvature(la._curvature, ref._curvature)
    torch.testing.assert_close(la.loss, ref.loss)
    torch.testing.assert_close(la.mean, ref.mean)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    torch.testing.assert_close(la.posterior_variance, ref.posterior_variance)
    assert_same_predictions(la, ref, x[:4], likelihood)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_tuned_prior_and_sample_statistics_equal_all_weights(structure):
    model, x, y = make_model("mlp", "classification")
    la = LL[structure](model, "classification")
    ref = ALL[structure](frozen_but_last(model), "classification")
    for approx in (la, ref):
        approx.fit(loader(x, y))
        approx.optimize_prior_precision(n_steps=20, prior_structure="layerwise")
    torch.testing.assert_close(la.prior_precision, ref.prior_precision)
    samples = la.sample(20000, generator=torch.Generator().manual_seed(0))
    covariance = ref.posterior_covariance
    if structure == "diag":
        covariance = torch.diag(covariance)
    scale = covariance.diagonal().sqrt()
    torch.testing.assert_close(samples.mean(0), ref.mean, atol=0.05 * scale.max(), rtol=0)
    torch.testing.assert_close(samples.T.cov(), covariance, atol=0.05 * scale.max() ** 2, rtol=0)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_gridsearch_equals_all_weights(structure):
    model, x, y = make_model("mlp", "classification")
    la = LL[structure](model, "classification")
    ref = ALL[structure](frozen_but_last(model), "classification")
    for approx in (la, ref):
        approx.fit(loader(x, y))
        approx.optimize_prior_precision(
            method="gridsearch", val_loader=loader(x, y), grid_size=6, log_prior_prec_min=-2
        )
    torch.testing.assert_close(la.prior_precision, ref.prior_precision)


def test_reward_modeling_predicts_like_regression_of_the_classifier():
    model, x, y = make_model("mlp", "classification")
    la = KronLLLaplace(model, "reward_modeling")
    ref = KronLLLaplace(copy.deepcopy(model), "classification")
    la.fit(loader(x, y))
    ref.fit(loader(x, y))
    f_mu, f_var = la(x[:4])
    ref_mu, ref_var = ref._glm_predictive_distribution(x[:4])
    torch.testing.assert_close(f_mu, ref_mu)
    torch.testing.assert_close(f_var, ref_var)
    torch.testing.assert_close(la(x[:4], fitting=True), ref(x[:4]))


def test_kron_damping_equals_all_weights():
    model, x, y = make_model("mlp", "regression")
    la = KronLLLaplace(model, "regression", damping=True, prior_precision=3.0, sigma_noise=0.5)
    ref = KronLaplace(frozen_but_last(model), "regression", damping=True, prior_precision=3.0)
    ref.sigma_noise = 0.5
    la.fit(loader(x, y))
    ref.fit(loader(x, y))
    assert la.damping
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    assert_same_predictions(la, ref, x[:4], "regression")


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_generic_backend_path_equals_all_weights(structure):
    """The empirical Fisher is computed by the backend on the features, not in closed form."""
    model, x, y = make_model("mlp", "classification")
    la = LL[structure](model, "classification", backend=CurvlinopsEF)
    ref = ALL[structure](frozen_but_last(model), "classification", backend=CurvlinopsEF)
    la.fit(loader(x, y))
    ref.fit(loader(x, y))
    assert_same_curvature(la._curvature, ref._curvature)
    if structure != "kron":
        phi = model[:-1](x).detach()
        H = dense_ef(model[-1], phi, y, "classification")
        torch.testing.assert_close(la.H, H if structure == "full" else H.diagonal())


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_sampled_ggn_equals_all_weights(structure):
    model, x, y = make_model("mlp", "classification")

    def options():
        generator = torch.Generator().manual_seed(5)
        return {"stochastic": True, "num_samples": 3, "generator": generator}

    la = LL[structure](model, "classification", backend=GGNInterface, backend_kwargs=options())
    ref = ALL[structure](
        frozen_but_last(model), "classification", backend=GGNInterface, backend_kwargs=options()
    )
    la.fit(loader(x, y))
    ref.fit(loader(x, y))
    assert_same_curvature(la._curvature, ref._curvature)


def test_online_fit_equals_one_fit():
    x, y = make_data("regression", n=20, n_out=3)
    for cls in (KronLLLaplace, DiagLLLaplace):
        la = cls(make_mlp(n_out=3), "regression")
        la.fit(loader(x, y))
        online = cls(make_mlp(n_out=3), "regression")
        online.fit(loader(x[:12], y[:12]))
        online.fit(loader(x[12:], y[12:]), override=False)
        assert online.n_data == 20
        assert_same_curvature(online._curvature, la._curvature)


# ---------------------------------------------------------------- (b) vs dense algebra
def naive_posterior(la, model, x, y, likelihood, structure):
    """Dense ``(H, P, Sigma)`` of the last layer from groundtruth Jacobians on the features."""
    head, phi = model[-1], model[:-1](x).detach()
    Js = dense_jacobians(head, phi)
    lams = output_hessians(model(x), y, likelihood)
    H = torch.einsum("nkp,nkl,nlq->pq", Js, lams, Js)
    if structure == "diag":
        H = torch.diag(H.diagonal())
    elif structure == "kron":
        B, A = lams.sum(0), phi.T @ phi / len(x)
        H = block_diag([kron(B, A), B] if head.bias is not None else [kron(B, A)])
    factor = 1 / (la.sigma_noise**2 * la.temperature)
    P = factor * H + torch.diag(la.prior_precision_diag)
    return H, P, torch.linalg.inv(P)


def naive_log_marglik(la, model, x, y, likelihood, P):
    loss = total_loss(model, x, y, likelihood)
    log_lik = -loss / (la.sigma_noise**2 * la.temperature)
    if likelihood == "regression":
        log_lik = log_lik - y.numel() * torch.log(la.sigma_noise * math.sqrt(2 * math.pi))
    delta = la.mean - la.prior_mean
    scatter = delta @ (la.prior_precision_diag * delta)
    log_det_ratio = torch.logdet(P) - la.prior_precision_diag.log().sum()
    return log_lik - 0.5 * (log_det_ratio + scatter)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize(
    ("model_name", "likelihood"),
    [("mlp", "classification"), ("mlp", "regression"), ("mlp-nobias", "classification")],
)
def test_matches_dense_ground_truth(structure, model_name, likelihood):
    model, x, y = make_model(model_name, likelihood)
    n_layers = len(list(model[-1].parameters()))
    la = LL[structure](model, likelihood, **hyper(likelihood, n_layers))
    la.fit(loader(x, y))
    H, P, Sigma = naive_posterior(la, model, x, y, likelihood, structure)
    torch.testing.assert_close(la._curvature.to_dense(), H)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), naive_log_marglik(la, model, x, y, likelihood, P)
    )
    xs = x[:4]
    Js = dense_jacobians(model[-1], model[:-1](xs).detach())
    f_var = Js @ Sigma @ Js.mT
    f_mu = model(xs).detach()
    torch.testing.assert_close(la.functional_variance(Js), f_var)
    mu_fast, var_fast = la.functional_variance_fast(xs)
    torch.testing.assert_close(mu_fast, f_mu)
    torch.testing.assert_close(var_fast, f_var.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(la._glm_predictive_distribution(xs)[1], f_var)
    if likelihood == "classification":
        kappa = (1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2)).rsqrt()
        torch.testing.assert_close(la(xs), torch.softmax(kappa * f_mu, -1))
        return
    flat = Js.reshape(-1, Js.shape[-1])
    joint_mu, joint_var = la(xs, joint=True)
    torch.testing.assert_close(joint_mu, f_mu.reshape(-1))
    torch.testing.assert_close(joint_var, flat @ Sigma @ flat.T)
    torch.testing.assert_close(la.functional_covariance(Js), flat @ Sigma @ flat.T)


def test_nn_predictive_equals_forward_passes_at_samples():
    model, x, y = make_model("mlp", "classification")
    la = KronLLLaplace(model, "classification")
    la.fit(loader(x, y))
    probs = la(x[:4], pred_type="nn", n_samples=6, generator=torch.Generator().manual_seed(3))
    thetas = la.sample(6, generator=torch.Generator().manual_seed(3))
    expected = []
    for theta in thetas:
        replaced = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(theta, replaced[-1].parameters())
        expected.append(torch.softmax(replaced(x[:4]), -1))
        torch.testing.assert_close(la.subset.forward_at(x[:4], theta), replaced(x[:4]))
    torch.testing.assert_close(probs, torch.stack(expected).mean(0))


def test_backprop_to_the_input_equals_all_weights():
    model, x, y = make_model("mlp", "regression")
    la = DiagLLLaplace(model, "regression")
    la.enable_backprop = True
    assert la.model.enable_backprop
    ref = DiagLaplace(frozen_but_last(model), "regression", enable_backprop=True)
    grads = []
    for approx in (la, ref):
        approx.fit(loader(x, y))
        xs = x[:3].clone().requires_grad_(True)
        f_mu, f_var = approx(xs)
        (f_mu.sum() + f_var.sum()).backward()
        grads.append(xs.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------- features and layers
class SequenceModel(nn.Module):
    """Dict inputs, a head on every token and one token's logits, as Hugging Face models."""

    def __init__(self, reduction: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.score = nn.Linear(4, 3)
        self.reduction = reduction

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        picks = {"pick_first": lambda: t[:, 0], "pick_last": lambda: t[:, -1]}
        return picks.get(self.reduction, lambda: t.mean(1))()

    def forward(self, batch: dict) -> torch.Tensor:
        return self.reduce(self.score(self.body(batch["input_ids"])))


@pytest.mark.parametrize("reduction", ["pick_first", "pick_last", "average"])
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_feature_reduction_equals_reduced_model(structure, reduction):
    seq = SequenceModel(reduction)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, 3, generator=g)
    y = torch.randint(3, (12,), generator=g)
    batches = [{"input_ids": x[i : i + 4], "labels": y[i : i + 4]} for i in range(0, 12, 4)]

    class DictLoader(list):
        dataset = range(12)

    la = LL[structure](seq, "classification", feature_reduction=reduction)
    la.fit(DictLoader(batches))
    assert la.subset.extractor.last_layer_name == "score"
    flat = nn.Sequential(nn.Identity(), copy.deepcopy(seq.score))
    phi = seq.reduce(seq.body(x)).detach()
    ref = LL[structure](flat, "classification")
    ref.fit(loader(phi, y, batch_size=4))
    assert_same_curvature(la._curvature, ref._curvature)
    torch.testing.assert_close(la({"input_ids": x[:3]}), ref(phi[:3]))


def test_sequence_features_need_a_reduction():
    seq = SequenceModel("pick_last")
    g = torch.Generator().manual_seed(1)
    batches = [
        {
            "input_ids": torch.randn(4, 5, 3, generator=g),
            "labels": torch.randint(3, (4,), generator=g),
        }
    ]

    class DictLoader(list):
        dataset = range(4)

    with pytest.raises(ValueError, match="feature_reduction"):
        DiagLLLaplace(seq, "classification").fit(DictLoader(batches))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_given_last_layer_name_equals_found(structure):
    model, x, y = make_model("mlp", "classification")
    given = LL[structure](model, "classification", last_layer_name="2")
    found = LL[structure](copy.deepcopy(model), "classification")
    assert given.n_params == 18
    with pytest.raises(ValueError, match="not known yet"):
        _ = found.n_params
    given.fit(loader(x, y))
    found.fit(loader(x, y))
    assert found.subset.extractor.last_layer_name == "2"
    assert_same_curvature(given._curvature, found._curvature)
    torch.testing.assert_close(given(x[:3]), found(x[:3]))


def test_accepts_a_feature_extractor():
    model, x, y = make_model("mlp", "classification")
    extractor = FeatureExtractor(model)
    la = DiagLLLaplace(extractor, "classification", feature_reduction="average")
    ref = DiagLLLaplace(model, "classification")
    la.fit(loader(x, y))
    ref.fit(loader(x, y))
    assert la.model is extractor and la.model.last_layer is model[2]
    assert extractor.feature_reduction == "average"
    torch.testing.assert_close(la.H, ref.H)


# ---------------------------------------------------------------- errors
def test_unknown_last_layer_name():
    with pytest.raises(ValueError, match=r"last_layer_name.*'head'.*\['0', '2'\]"):
        KronLLLaplace(make_mlp(), "classification", last_layer_name="head")


def test_model_without_linear_last_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Softmax(dim=-1)).double()
    x, y = make_data("classification")
    la = FullLLLaplace(model, "classification")
    with pytest.raises(ValueError, match="no nn.Linear last layer"):
        la.fit(loader(x, y))


def test_model_without_parameters():
    with pytest.raises(ValueError, match="no parameters"):
        DiagLLLaplace(nn.Sequential(nn.Tanh()), "classification")


def test_abstract_base_class():
    with pytest.raises(TypeError, match="abstract"):
        LLLaplace(make_mlp(), "classification")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_predict_before_fit(structure):
    la = LL[structure](make_mlp(), "classification")
    x, _ = make_data("classification")
    calls = (
        lambda: la(x),
        lambda: la.functional_variance_fast(x),
        la.log_marginal_likelihood,
        la.state_dict,
    )
    for call in calls:
        with pytest.raises(ValueError, match="not fitted"):
            call()
    with pytest.raises(ValueError, match="not known yet"):  # the prior needs the layer
        la.sample(2)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_wrong_prior_length(structure):
    x, y = make_data("classification")
    with pytest.raises(ValueError, match="prior_precision must have 1"):
        LL[structure](
            make_mlp(), "classification", last_layer_name="2", prior_precision=torch.ones(7)
        )
    la = LL[structure](make_mlp(), "classification", prior_precision=torch.ones(7))
    with pytest.raises(ValueError, match="prior_precision must have 1"):
        la.fit(loader(x, y))
    la.prior_precision = torch.ones(2)
    la.fit(loader(x, y))
    torch.testing.assert_close(la.prior_precision, torch.ones(2))
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        LL[structure](make_mlp(), "classification", prior_precision=-1.0)
    with pytest.raises(ValueError, match="scalar or a 1-d tensor"):
        LL[structure](make_mlp(), "classification", prior_precision=torch.ones(2, 2))


def test_non_finite_curvature_is_reported():
    x, y = make_data("regression")
    torch.manual_seed(0)
    for cls in LL.values():
        la = cls(nn.Linear(3, 2).double(), "regression")
        with pytest.raises(ValueError, match="NaN"):
            la.fit(loader(1e300 * x, y))


def test_model_output_must_be_the_last_layer_output():
    class Flattened(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(x).reshape(-1, 2)

    x, y = make_data("classification")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="model output must have shape"):
        DiagLLLaplace(Flattened().double(), "classification").fit(loader(x, y))


# ---------------------------------------------------------------- state
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_state_dict_round_trip(structure, likelihood):
    model, x, y = make_model("mlp", likelihood)
    la = LL[structure](model, likelihood, prior_precision=0.4)
    la.fit(loader(x, y))
    la.optimize_prior_precision(n_steps=5)
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    restored = LL[structure](copy.deepcopy(model), likelihood)
    restored.load_state_dict(torch.load(buffer))
    assert restored.subset.extractor.last_layer_name == "2"
    torch.testing.assert_close(restored.log_marginal_likelihood(), la.log_marginal_likelihood())
    if likelihood == "classification":
        torch.testing.assert_close(restored(x[:3]), la(x[:3]))
    else:
        for a, b in zip(restored(x[:3]), la(x[:3])):
            torch.testing.assert_close(a, b)


def test_state_dict_from_other_structure_layer_or_model_is_rejected():
    model, x, y = make_model("mlp", "classification")
    la = FullLLLaplace(model, "classification")
    la.fit(loader(x, y))
    state = la.state_dict()
    with pytest.raises(ValueError, match="cls_name"):
        DiagLLLaplace(copy.deepcopy(model), "classification").load_state_dict(state)
    with pytest.raises(ValueError, match="param_shapes"):
        FullLLLaplace(make_mlp(n_hidden=7, n_out=3), "classification").load_state_dict(state)
    with pytest.raises(ValueError, match="last_layer_name"):
        FullLLLaplace(model, "classification", last_layer_name="0").load_state_dict(state)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="last_layer_name"):
        FullLLLaplace(nn.Sequential(nn.Linear(3, 3)), "classification").load_state_dict(state)
    all_weights = FullLaplace(frozen_but_last(model), "classification")
    all_weights.fit(loader(x, y))
    with pytest.raises(ValueError, match="cls_name"):
        FullLLLaplace(copy.deepcopy(model), "classification").load_state_dict(
            all_weights.state_dict()
        )


@pytest.mark.parametrize("structure", STRUCTURES)
def test_torch_save_whole_object(structure):
    model, x, y = make_model("mlp", "regression")
    unfitted = io.BytesIO()
    torch.save(LL[structure](model, "regression", sigma_noise=0.5), unfitted)
    la = LL[structure](model, "regression", sigma_noise=0.5)
    la.fit(loader(x, y))
    expected = la(x[:4])
    la(x[:4], pred_type="nn", n_samples=3, generator=torch.Generator().manual_seed(0))
    assert all(not m._forward_hooks for m in model.modules())
    buffer = io.BytesIO()
    torch.save(la, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location="cpu", weights_only=False)
    for a, b in zip(loaded(x[:4]), expected):
        torch.testing.assert_close(a, b)
    unfitted.seek(0)
    later = torch.load(unfitted, weights_only=False)
    later.fit(loader(x, y))
    for a, b in zip(later(x[:4]), expected):
        torch.testing.assert_close(a, b)


def test_kron_fit_accumulates_factors_in_place(monkeypatch):
    """The K-FAC sums go straight into the factors: one add per fit (the merge), not per batch;
    the result equals the per-batch closed form summed over the batches."""
    from laplace.lllaplace import linear_kron_ggn, output_curvature
    from laplace.posterior.kron import KronCurvature

    model, x, y = make_model("mlp", "classification")
    la = KronLLLaplace(model, "classification")
    calls = []
    add = KronCurvature.add_
    monkeypatch.setattr(KronCurvature, "add_", lambda self, H: calls.append(1) or add(self, H))
    la.fit(loader(x, y, batch_size=3))
    assert len(calls) == 1 and len(x) > 9
    expected = None
    for xb, _ in loader(x, y, batch_size=3):
        f, phi = la.subset.features(xb)
        lam = output_curvature(la.backend, f)
        part = linear_kron_ggn(phi, lam, bias=True, n_data=len(x), factor=la.backend.factor)
        expected = part if expected is None else expected + part
    assert len(la.H_facs.kfacs) == len(expected.kfacs) == 2
    for got, want in zip(la.H_facs.kfacs, expected.kfacs):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
