"""``backend.last_layer_jacobians`` on every backend, for a ``FeatureExtractor`` whose last
layer is found on first use: ``Js[b, c] = [e_c ⊗ phi_b (weight, row-major), e_c (bias)]``,
checked against that closed form and a brute-force ``torch.func`` Jacobian, in float64 and
float32, detached unless ``enable_backprop`` (then differentiable w.r.t. the inputs)."""

from __future__ import annotations

import pytest
import torch
from groundtruth import dense_jacobians
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from laplace.curvature import BACKENDS, BackPackGGN
from laplace.utils import FeatureExtractor

N_OUT = 3
backends = pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.__name__)


def network(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """An MLP whose last ``nn.Linear`` (module ``"4"``) is the last layer."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, N_OUT)
    )
    return model.to(dtype)


def inputs(dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(6, 3, generator=torch.Generator().manual_seed(8), dtype=dtype)


def closed_form(model: nn.Sequential, x: Tensor) -> Tensor:
    """``[e_c ⊗ phi_b, e_c]`` from the features ``phi`` of the layers before the last.

    Shapes:
        ``x (batch, 3) -> (batch, outputs, outputs * features + outputs)``
    """
    phi = model[:-1](x)
    eye = torch.eye(N_OUT, dtype=phi.dtype)
    weight = torch.einsum("ce,bd->bced", eye, phi).flatten(2)
    return torch.cat([weight, eye.expand(len(phi), N_OUT, N_OUT)], dim=2)


def brute_force(model: nn.Sequential, x: Tensor) -> Tensor:
    """Per-sample Jacobians of the model output w.r.t. ``(weight, bias)`` of the last layer."""
    last = model[-1]

    def output(weight: Tensor, bias: Tensor, sample: Tensor) -> Tensor:
        params = {"4.weight": weight, "4.bias": bias}
        return functional_call(model, params, (sample.unsqueeze(0),))[0]

    J_weight, J_bias = vmap(jacrev(output, argnums=(0, 1)), in_dims=(None, None, 0))(
        last.weight.detach(), last.bias.detach(), x
    )
    return torch.cat([J_weight.flatten(2), J_bias], dim=2)


def unfound_extractor(model: nn.Module, enable_backprop: bool = False) -> FeatureExtractor:
    extractor = FeatureExtractor(model, enable_backprop=enable_backprop)
    assert extractor.last_layer is None
    return extractor


@backends
def test_found_on_first_use_float64(backend):
    model = network()
    x = inputs().requires_grad_(True)
    extractor = unfound_extractor(model)
    Js, f = backend(extractor, "classification").last_layer_jacobians(x)
    assert extractor.last_layer is model[-1]
    assert not Js.requires_grad and not f.requires_grad
    assert Js.shape == (len(x), N_OUT, N_OUT * 4 + N_OUT) and Js.dtype == torch.float64
    with torch.no_grad():
        expected = closed_form(model, x)
        torch.testing.assert_close(f, model(x), atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(Js, expected, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(Js, brute_force(model, x.detach()), atol=1e-14, rtol=1e-12)


@backends
def test_last_layer_backend(backend):
    """With ``last_layer=True`` (the last layer known) the same Jacobians."""
    model = network()
    x = inputs()
    extractor = FeatureExtractor(model, last_layer_name="4")
    Js, f = backend(extractor, "classification", last_layer=True).last_layer_jacobians(x)
    with torch.no_grad():
        torch.testing.assert_close(Js, closed_form(model, x), atol=1e-14, rtol=1e-12)
        torch.testing.assert_close(f, model(x), atol=1e-14, rtol=1e-12)


@backends
def test_last_layer_backend_needs_a_found_layer(backend):
    with pytest.raises(ValueError, match="last layer has not been found yet"):
        backend(unfound_extractor(network()), "classification", last_layer=True)


@backends
def test_float32(backend):
    """float32 Jacobians against the float64 closed form of the same (float32) weights.

    Tolerance from float32 round-off: a dot product of ``k`` terms is exact to ``k * eps``
    times the sum of its terms' magnitudes, and ``tanh`` is 1-Lipschitz. A feature passes two
    layers of fan-in at most 5 (weights below 1, inputs of a few units), so its error is below
    about ``2 * (5 + 1) * eps`` times a scale of a few units; ``f`` adds a layer of fan-in 4.
    ``32 * eps`` times the scale of the result bounds both (measured: under ``1 * eps``).
    """
    model = network(torch.float32)
    x = inputs(torch.float32)
    Js, f = backend(unfound_extractor(model), "classification").last_layer_jacobians(x)
    assert Js.dtype == torch.float32 and f.dtype == torch.float32
    reference = network(torch.float64)
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        expected, f_expected = closed_form(reference, x.double()), reference(x.double())
    eps = torch.finfo(torch.float32).eps
    tol = 32 * eps * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(Js.double(), expected, atol=tol, rtol=0)
    tol_f = 32 * eps * max(1.0, f_expected.abs().max().item())
    torch.testing.assert_close(f.double(), f_expected, atol=tol_f, rtol=0)


def input_gradient(Js: Tensor, f: Tensor, x: Tensor) -> Tensor:
    return torch.autograd.grad((Js**2).sum() + (f**3).sum(), x)[0]


@pytest.mark.parametrize("extractor_backprop", [False, True], ids=["detaching", "attached"])
@backends
def test_enable_backprop(backend, extractor_backprop):
    """Differentiable w.r.t. ``x``, whatever the extractor's own ``enable_backprop``."""
    model = network()
    x = inputs().requires_grad_(True)
    extractor = unfound_extractor(model, enable_backprop=extractor_backprop)
    Js, f = backend(extractor, "classification").last_layer_jacobians(x, enable_backprop=True)
    assert Js.requires_grad and f.requires_grad
    expected = input_gradient(closed_form(model, x), model(x), x)
    torch.testing.assert_close(input_gradient(Js, f, x), expected, atol=1e-12, rtol=1e-10)
    assert extractor.enable_backprop is extractor_backprop


def test_backpack_on_the_wrapper_differentiates_the_wrapped_model():
    """BackPACK accepts the (non-``Sequential``) ``FeatureExtractor`` by extending the model
    it wraps: its Jacobians are those of the whole model."""
    model = network()
    x = inputs()
    backend = BackPackGGN(unfound_extractor(model), "classification")
    Js, _ = backend.jacobians(x)
    torch.testing.assert_close(Js, dense_jacobians(model, x), atol=1e-13, rtol=1e-11)
