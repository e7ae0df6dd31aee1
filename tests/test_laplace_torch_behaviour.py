"""Behaviour that scripts written for laplace-torch rely on (issue 10, items 2, 3, 9, 11).

- Before ``fit`` the approximation is the prior: its mean, curvature, precision, log density
  and samples are checked against the closed forms of ``N(mu0, diag(p0)^-1)``.
- Exceptions keep laplace-torch's classes (``ValueError``, ``KeyError``) as well as ours.
- Bad data (NaN targets, another dtype, another feature size) is refused with a clear error.
- A ``fit`` that raises leaves the object exactly as it was (bit for bit).
"""

from __future__ import annotations

import math
from collections import UserDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import (
    DiagLaplace,
    DiagLLLaplace,
    DiagSubnetLaplace,
    FullLaplace,
    FullLLLaplace,
    FullSubnetLaplace,
    KronLaplace,
    KronLLLaplace,
    Laplace,
    LowRankLaplace,
)
from laplace.errors import InputMismatchError
from laplace.utils import (
    FeatureExtractor,
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    RandomSubnetMask,
)
from tests.conftest import make_data, make_mlp

SUBNET = torch.tensor([0, 3, 7, 20, 26, 31])


def _build(name: str, likelihood: str = "regression", model: nn.Module | None = None, **kw):
    model = make_mlp() if model is None else model
    classes = {
        "full": FullLaplace,
        "kron": KronLaplace,
        "diag": DiagLaplace,
        "lowrank": LowRankLaplace,
        "ll-full": FullLLLaplace,
        "ll-kron": KronLLLaplace,
        "ll-diag": DiagLLLaplace,
    }
    if name.startswith("subnet"):
        cls = FullSubnetLaplace if name == "subnet-full" else DiagSubnetLaplace
        return cls(model, likelihood, SUBNET, **kw)
    if name == "lowrank":
        kw.setdefault("n_eigenvalues", 3)
    return classes[name](model, likelihood, **kw)


NAMES = ["full", "kron", "diag", "lowrank", "ll-full", "ll-kron", "ll-diag"]
NAMES += ["subnet-full", "subnet-diag"]


def _loader(x, y, batch_size=4):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _prior_blocks(la) -> list[int]:
    return la.subset.sizes


# ----------------------------------------------------------------------------- prior before fit
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layerwise", [False, True], ids=["scalar", "layerwise"])
def test_before_fit_the_approximation_is_the_prior(name, layerwise):
    kw = {"last_layer_name": "2"} if name.startswith("ll") else {}
    la = _build(name, prior_mean=0.3, **kw)
    if layerwise:
        la.prior_precision = torch.arange(1.0, len(la.subset.sizes) + 1) * 0.5
    p0 = la.prior_precision_diag  # (posterior params,)
    n = p0.numel()
    model_params = torch.cat([p.detach().flatten() for p in la.model.parameters()])

    if name.startswith("subnet"):  # the full vector, subnetwork entries at the prior mean
        expected_mean = model_params.clone()
        expected_mean[SUBNET] = 0.3
    else:
        expected_mean = torch.full((n,), 0.3)
    torch.testing.assert_close(la.mean, expected_mean, rtol=0, atol=0)

    precision = la.posterior_precision
    if name in ("full", "ll-full", "subnet-full"):
        torch.testing.assert_close(precision, torch.diag(p0))
        torch.testing.assert_close(la.H, torch.zeros(n, n), rtol=0, atol=0)
    elif name in ("diag", "ll-diag", "subnet-diag"):
        torch.testing.assert_close(precision, p0)
        torch.testing.assert_close(la.H, torch.zeros(n), rtol=0, atol=0)
    elif name == "kron":
        torch.testing.assert_close(precision.to_matrix(), torch.diag(p0))
        torch.testing.assert_close(la.H.to_matrix(), torch.zeros(n, n), rtol=0, atol=0)
    torch.testing.assert_close(la.posterior_variance, 1 / p0)

    theta = torch.randn(la.n_params, generator=torch.Generator().manual_seed(5))
    selected = theta[SUBNET] if name.startswith("subnet") else theta
    expected = torch.distributions.Normal(0.3, p0.rsqrt()).log_prob(selected).sum()
    torch.testing.assert_close(la.log_prob(theta), expected)


@pytest.mark.parametrize("name", ["full", "kron", "diag", "lowrank", "ll-diag", "subnet-full"])
def test_samples_before_fit_come_from_the_prior(name):
    kw = {"last_layer_name": "2"} if name.startswith("ll") else {}
    la = _build(name, prior_mean=-0.5, prior_precision=4.0, **kw)
    n_samples = 20_000
    samples = la.sample(n_samples, generator=torch.Generator().manual_seed(0))
    if name.startswith("subnet"):
        fixed = torch.ones(la.n_params, dtype=torch.bool)
        fixed[SUBNET] = False
        model_params = torch.cat([p.detach().flatten() for p in la.model.parameters()])
        torch.testing.assert_close(samples[:, fixed], model_params[fixed].expand(n_samples, -1))
        samples = samples[:, SUBNET]
    # mean: standard error 0.5 / sqrt(n); variance 0.25 with relative s.e. sqrt(2 / n)
    assert (samples.mean(0) + 0.5).abs().max() < 5 * 0.5 / math.sqrt(n_samples)
    assert ((samples.var(0) / 0.25) - 1).abs().max() < 5 * math.sqrt(2 / n_samples)


def test_after_fit_the_mean_is_the_map():
    la = _build("diag", prior_mean=0.3)
    x, y = make_data("regression")
    la.fit(_loader(x, y))
    params = torch.cat([p.detach().flatten() for p in la.model.parameters()])
    torch.testing.assert_close(la.mean, params, rtol=0, atol=0)


def test_unknown_last_layer_has_no_prior_vector_yet():
    la = Laplace(make_mlp(), "regression")  # last layer, found on the first batch
    assert la.mean is None and la.H is None
    with pytest.raises(ValueError, match="not known yet"):
        la.log_prob(torch.zeros(12))


# ----------------------------------------------------------------------------- error classes
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("argument", ["prior_precision", "prior_mean", "sigma_noise"])
def test_hyperparameters_of_a_wrong_type_are_value_and_type_errors(subset, argument):
    for caught in (ValueError, TypeError):
        with pytest.raises(caught, match=f"{argument} must be a number or a torch.Tensor"):
            Laplace(make_mlp(), "regression", subset_of_weights=subset, **{argument: "1.0"})


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("argument", ["prior_mean", "sigma_noise"])
def test_two_dimensional_hyperparameters_are_rejected(subset, argument):
    with pytest.raises(ValueError, match=f"{argument} must be a scalar"):
        Laplace(make_mlp(), "regression", subset_of_weights=subset, **{argument: torch.ones(1, 1)})


class _DictLoader:
    """Yields the given dict-like batches; its ``dataset`` has one entry per sample."""

    def __init__(self, batches):
        self.batches = batches
        self.dataset = list(range(sum(len(next(iter(b.values()))) for b in batches)))

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("missing", ["input_ids", "labels"])
def test_dict_batch_without_a_key_is_a_key_error(missing):
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_mlp()

        def forward(self, batch):
            return self.net(batch["input_ids"])

    x, y = make_data("classification", n=4)
    batch = UserDict({"input_ids": x, "labels": y})
    del batch[missing]
    la = DiagLaplace(DictModel(), "classification")
    with pytest.raises(KeyError, match=f"dict-like batch has no key .*{missing!r}"):
        la.fit(_DictLoader([batch]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: FeatureExtractor(make_mlp(), last_layer_name="head"),
        lambda: KronLLLaplace(make_mlp(), "classification", last_layer_name="head"),
        lambda: Laplace(make_mlp(), "regression", last_layer_name="head"),
        lambda: LastLayerSubnetMask(make_mlp(), last_layer_name="head"),
    ],
    ids=["extractor", "kron-ll", "factory", "subnet-mask"],
)
def test_unknown_last_layer_name_is_a_key_error(make):
    with pytest.raises(KeyError, match="'head' \\(not found\\)") as info:
        make()
    assert isinstance(info.value, ValueError)  # our own earlier class, still caught
    assert not str(info.value).startswith("'")  # shown as written, not as a repr


def _diag_la():
    la = DiagLaplace(make_mlp(), "regression")
    x, y = make_data("regression")
    la.fit(_loader(x, y))
    return la


@pytest.mark.parametrize(
    "mask",
    [
        lambda n: RandomSubnetMask(make_mlp(), n_params_subnet=n),
        lambda n: LargestMagnitudeSubnetMask(make_mlp(), n_params_subnet=n),
        lambda n: LargestVarianceDiagLaplaceSubnetMask(make_mlp(), n, _diag_la()),
        lambda n: LargestVarianceSWAGSubnetMask(make_mlp(), n_params_subnet=n),
    ],
    ids=["random", "magnitude", "diag-variance", "swag"],
)
@pytest.mark.parametrize("n", [None, 10_000], ids=["none", "too-large"])
def test_bad_n_params_subnet_is_a_value_error(mask, n):
    with pytest.raises(ValueError, match="n_params_subnet must be"):
        mask(n)


# ----------------------------------------------------------------------------- bad data
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_regression_targets_are_refused_at_fit(name, bad):
    la = _build(name)
    x, y = make_data("regression")
    y[5, 1] = bad
    with pytest.raises(ValueError, match="targets.*NaN or Inf"):
        la.fit(_loader(x, y))
    assert la.n_data is None


@pytest.mark.parametrize("name", NAMES)
def test_data_of_another_dtype_is_refused(name):
    la = _build(name, likelihood="classification")
    x, y = make_data("classification")
    with pytest.raises(InputMismatchError, match="torch.float32.*torch.float64") as info:
        la.fit(_loader(x.float(), y))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    la.fit(_loader(x, y))
    with pytest.raises(InputMismatchError, match="torch.float32.*torch.float64"):
        la(x.float())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_predictive_inputs_of_another_feature_size_are_explained(name, pred_type):
    la = _build(name, likelihood="classification")
    x, y = make_data("classification")
    la.fit(_loader(x, y))
    with pytest.raises(InputMismatchError, match=r"per-sample shape \(5,\).*shape \(3,\)"):
        la(torch.randn(4, 5), pred_type=pred_type, n_samples=3)
    with pytest.raises(InputMismatchError, match=r"per-sample shape \(5,\)"):
        la.functional_samples(torch.randn(4, 5), pred_type=pred_type, n_samples=3)


# ----------------------------------------------------------------------------- failed fits
class _NaNOnThirdBatch:
    """A loader whose third batch has a NaN input."""

    def __init__(self, x, y, batch_size=3):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.dataset = TensorDataset(x, y)

    def __iter__(self):
        for index, start in enumerate(range(0, len(self.x), self.batch_size)):
            xb = self.x[start : start + self.batch_size].clone()
            if index == 2:
                xb[0, 0] = float("nan")
            yield xb, self.y[start : start + self.batch_size]


def _snapshot(la) -> dict:
    state = {key: value for key, value in vars(la).items() if key != "_posterior_cache"}
    state["_mean"] = None if la._mean is None else la._mean.clone()
    state["_loss"] = la._loss.clone() if isinstance(la._loss, torch.Tensor) else la._loss
    state["H"] = _tensors(la.H)
    state["prior_precision"] = la.prior_precision.clone()
    state["sigma_noise"] = la.sigma_noise.clone()
    state["modes"] = [m.training for m in la.model.modules()]
    if hasattr(la.subset, "extractor"):
        state["last_layer_name"] = la.subset.extractor.last_layer_name
    return state


def _tensors(H) -> list[torch.Tensor]:
    if H is None:
        return []
    if isinstance(H, torch.Tensor):
        return [H.clone()]
    if isinstance(H, tuple):
        return [h.clone() for h in H]
    if hasattr(H, "kfacs"):
        return [f.clone() for block in H.kfacs for f in block]
    return [v.clone() for block in H.eigenvectors for v in block]


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
        elif isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b)), key
        else:
            assert a is b or a == b, key


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("override", [True, False])
@pytest.mark.parametrize("fitted", [True, False], ids=["fitted", "unfitted"])
def test_a_failed_fit_leaves_the_object_as_it_was(name, override, fitted):
    if name == "lowrank" and not override:
        pytest.skip("LowRankLaplace refuses override=False before fitting anything")
    la = _build(name, likelihood="classification")
    x, y = make_data("classification", n=12)
    if fitted:
        la.fit(_loader(x, y))
        la.prior_precision = 0.7
    la.model.train()  # a fit switches to eval mode; a failed one must switch back
    before = _snapshot(la)
    with pytest.raises(ValueError, match="NaN or Inf"):
        la.fit(_NaNOnThirdBatch(x, y), override=override)
    _assert_same(before, _snapshot(la))
    if fitted:  # and it still predicts as before
        la(x[:2])
    else:
        with pytest.raises(ValueError, match="not fitted"):
            la(x[:2])


# ----------------------------------------------------------------------------- float32 models
@pytest.mark.parametrize("name", ["full", "kron", "diag", "lowrank", "ll-kron", "subnet-diag"])
def test_prior_before_fit_on_a_float32_model(name):
    """The prior of a float32 model: float32 results, equal to the float64 closed form up to
    float32 round-off (relative 1e-6 on a sum of 32 log densities of size ~1: each term has
    relative error ~6e-8, so the sum is within ~32 * 6e-8 * |term| of the truth)."""
    kw = {"last_layer_name": "2"} if name.startswith("ll") else {}
    model = make_mlp().float()
    la = _build(name, model=model, prior_mean=0.3, prior_precision=1e-3, **kw)
    assert la.mean.dtype == torch.float32
    theta = torch.randn(la.n_params, generator=torch.Generator().manual_seed(5)).float()
    selected = theta[SUBNET] if name.startswith("subnet") else theta
    n = selected.numel()
    truth = torch.distributions.Normal(0.3, (1e-3) ** -0.5).log_prob(selected.double()).sum()
    value = la.log_prob(theta)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), truth, rtol=n * 6e-8, atol=0)
    samples = la.sample(5, generator=torch.Generator().manual_seed(0))
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()


@pytest.mark.parametrize("name", ["full", "kron", "diag", "ll-kron", "subnet-full"])
def test_a_failed_fit_of_a_float32_model_leaves_it_as_it_was(name):
    la = _build(name, likelihood="classification", model=make_mlp().float())
    x, y = make_data("classification", n=12)
    la.fit(_loader(x.float(), y))
    before = _snapshot(la)
    with pytest.raises(ValueError, match="NaN or Inf"):
        la.fit(_NaNOnThirdBatch(x.float(), y), override=False)
    _assert_same(before, _snapshot(la))


# ----------------------------------------------------------------------------- train/eval mode
class _Dropout(nn.Module):
    """An MLP with dropout: in train mode its outputs (and any curvature) are random."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("name", ["full", "kron", "diag", "ll-kron", "subnet-diag", "gp"])
def test_fit_and_predict_run_in_eval_mode_and_give_the_mode_back(name):
    torch.manual_seed(0)
    model = _Dropout().double().train()
    model.net[0].eval()  # a mixed state, restored module by module
    modes = [m.training for m in model.modules()]
    x, y = make_data("classification", n=12)
    if name == "gp":
        la = Laplace(model, "classification", "all", "gp", n_subset=6)
    else:
        kw = {"last_layer_name": "net.3"} if name.startswith("ll") else {}
        la = _build(name, likelihood="classification", model=model, **kw)
    la.fit(_loader(x, y))
    assert [m.training for m in model.modules()] == modes
    first, second = la(x[:4]), la(x[:4])
    torch.testing.assert_close(first, second)  # no dropout: deterministic
    assert [m.training for m in model.modules()] == modes
    # the same numbers as fitting and predicting the network in eval mode
    reference = _Dropout().double().eval()
    reference.load_state_dict(model.state_dict())
    if name == "gp":
        other = Laplace(reference, "classification", "all", "gp", n_subset=6)
    else:
        other = _build(name, likelihood="classification", model=reference, **kw)
    other.fit(_loader(x, y))
    torch.testing.assert_close(first, other(x[:4]))


def test_gridsearch_computes_dict_batch_features_once():
    """The prior-independent part of the predictive (here the last layer's features) is
    memoised per validation batch for dict-like batches too: one forward pass per batch for
    the whole grid."""

    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_mlp()

        def forward(self, batch):
            return self.net(batch["input_ids"])

    x, y = make_data("classification", n=12)
    model = DictModel().double()
    batches = [UserDict({"input_ids": x[i : i + 6], "labels": y[i : i + 6]}) for i in (0, 6)]
    la = KronLLLaplace(model, "classification", last_layer_name="net.2")
    la.fit(_DictLoader(batches))
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    la.optimize_prior_precision(method="gridsearch", val_loader=batches, grid_size=7)
    assert len(calls) == len(batches)


@pytest.mark.parametrize("name", ["full", "kron", "ll-full"])
def test_whole_object_pickle_holds_no_caches(name, tmp_path):
    """After predicting (which caches eigendecompositions and float32 copies), torch.save of
    the whole object is about the size of its state dict and predicts identically."""
    kw = {"last_layer_name": "2"} if name.startswith("ll") else {}
    la = _build(name, likelihood="classification", model=make_mlp(n_hidden=30), **kw)
    x, y = make_data("classification", n=12)
    la.fit(_loader(x, y))
    expected = la(x[:4])
    whole, state = tmp_path / "whole.pt", tmp_path / "state.pt"
    torch.save(la, whole)
    torch.save(la.state_dict(), state)
    model_bytes = sum(p.numel() * 8 for p in la.model.parameters()) + 4096
    assert whole.stat().st_size < 1.2 * state.stat().st_size + model_bytes
    loaded = torch.load(whole, weights_only=False)
    torch.testing.assert_close(loaded(x[:4]), expected)
