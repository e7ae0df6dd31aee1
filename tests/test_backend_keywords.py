"""Backend class hierarchy, the keyword options of the structure methods, and K-FAC's
``kfac_approx`` ("expand" / "reduce", Eschenhagen et al., NeurIPS 2023) checked against
``curvlinops``' own ``KFACLinearOperator`` on a convolution network and on linear layers
fed ``(batch, seq, dim)`` inputs."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from conftest import make_data, make_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace.curvature as curvature
import laplace.curvature.asdfghjkl as legacy
import laplace.curvature.curvlinops as curvlinops_backend
from laplace import DiagLaplace, FullLaplace, KronLaplace, KronLLLaplace
from laplace.curvature import (
    BACKENDS,
    AsdfghjklInterface,
    AsdlInterface,
    BackPackInterface,
    CurvatureInterface,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsInterface,
    EFInterface,
    GGNInterface,
)
from laplace.curvature._options import KFACApprox
from laplace.errors import UnknownOptionError
from laplace.utils.enums import HessianStructure

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=FutureWarning)
    from curvlinops import FisherType, KFACLinearOperator

EXPORTED = sorted(
    {
        getattr(module, name)
        for module in (curvature, legacy)
        for name in module.__all__
        if isinstance(getattr(module, name), type)
    },
    key=lambda cls: cls.__name__,
)
FAMILIES = {
    "Curvlinops": CurvlinopsInterface,
    "BackPack": BackPackInterface,
    "Asdl": AsdlInterface,
    "Asdfghjkl": AsdfghjklInterface,
}
KNOWN_OPTIONS = {"mc_samples", "seed", "kfac_approx", "var"}


# ---------------------------------------------------------------------------- hierarchy
def test_every_api_backend_is_exported():
    names = {cls.__name__ for cls in EXPORTED}
    for family in ("Curvlinops", "BackPack", "Asdl", "Asdfghjkl"):
        for kind in ("Interface", "GGN", "EF", "Hessian"):
            if family == "BackPack" and kind == "Hessian":
                continue
            assert family + kind in names
    assert {"CurvatureInterface", "GGNInterface", "EFInterface"} <= names
    assert set(BACKENDS) <= set(EXPORTED)


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda cls: cls.__name__)
def test_backend_hierarchy(cls):
    name = cls.__name__
    assert issubclass(cls, CurvatureInterface)
    assert issubclass(cls, EFInterface) == (name.endswith("EF") or name == "EFInterface")
    assert issubclass(cls, GGNInterface) == (name.endswith("GGN") or name == "GGNInterface")
    if name.endswith("Hessian"):
        assert not cls.psd_curvature
    for prefix, family in FAMILIES.items():
        if name.startswith(prefix):
            assert issubclass(cls, family)
    if name.startswith("Asdfghjkl") and name != "AsdfghjklInterface":
        maintained = getattr(curvature, name.replace("Asdfghjkl", "Asdl"))
        assert issubclass(cls, maintained)


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda cls: cls.__name__)
def test_declared_options(cls):
    options = cls.structure_options
    assert set(options) <= set(HessianStructure)
    for accepted in options.values():
        assert accepted <= KNOWN_OPTIONS
    name = cls.__name__
    if name.startswith("Curvlinops") and HessianStructure.KRON in cls.structures:
        assert "kfac_approx" in options[HessianStructure.KRON]
    if issubclass(cls, GGNInterface) and not name.startswith(("Asdl", "Asdfghjkl")):
        for structure in cls.structures:
            assert {"mc_samples", "seed"} <= options[structure]
    if issubclass(cls, EFInterface) and not name.startswith(("Asdl", "Asdfghjkl")):
        assert all(not ({"mc_samples", "seed"} & accepted) for accepted in options.values())


# ---------------------------------------------------------------------------- options
CALLS = [
    (backend, structure)
    for backend in BACKENDS
    for structure in sorted(backend.structures, key=lambda s: s.value)
]
calls = pytest.mark.parametrize(
    ("backend", "structure"), CALLS, ids=[f"{b.__name__}-{s.value}" for b, s in CALLS]
)


@calls
def test_unknown_keyword_raises(backend, structure):
    model = make_mlp()
    x, y = make_data("classification")
    method = getattr(backend(model, "classification"), structure.value)
    with pytest.raises(UnknownOptionError) as info:
        method(x, y, N=12, bogus=1)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    accepted = sorted(backend.structure_options.get(structure, frozenset()))
    message = str(info.value)
    assert f"{backend.__name__}.{structure.value}()" in message
    assert "['bogus']" in message and str(accepted) in message


@calls
def test_existing_keywords_still_work(backend, structure):
    """``N``, ``generator`` and (where the signature has it) ``out``, as ``fit`` passes."""
    model = make_mlp()
    x, y = make_data("classification")
    method = getattr(backend(model, "classification"), structure.value)
    generator = torch.Generator().manual_seed(0)
    loss, curv = method(x, y, N=12, generator=generator)
    if structure == HessianStructure.FULL and "out" in inspect.signature(method).parameters:
        out = torch.eye(curv.shape[0])
        _, summed = method(x, y, N=12, generator=generator, out=out)
        assert summed is out
        torch.testing.assert_close(summed, torch.eye(curv.shape[0]) + curv)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kfac_approx": "bogus"}, "kfac_approx must be one of 'expand', 'reduce'"),
        ({"mc_samples": 0}, "mc_samples must be a positive integer, got 0"),
        ({"mc_samples": True}, "mc_samples must be a positive integer"),
        ({"seed": 1.5}, "seed must be an integer or None, got 1.5"),
        ({"mc_samples": 3}, "mc_samples=3 needs the sampled Fisher"),
    ],
    ids=["approx", "zero-samples", "bool-samples", "float-seed", "exact-with-samples"],
)
def test_bad_option_values(options, message):
    model = make_mlp()
    x, y = make_data("classification")
    with pytest.raises(ValueError, match=message):
        CurvlinopsGGN(model, "classification").kron(x, y, N=12, **options)


def test_seed_option_fixes_the_sampler():
    model = make_mlp()
    x, y = make_data("classification")
    backend = CurvlinopsGGN(model, "classification", stochastic=True)
    for structure in ("full", "diag", "kron"):
        method = getattr(backend, structure)
        first = method(x, y, N=12, seed=3, mc_samples=2)[1]
        again = method(x, y, N=12, seed=3, mc_samples=2)[1]
        other = method(x, y, N=12, seed=4, mc_samples=2)[1]
        dense = [c.to_matrix() if structure == "kron" else c for c in (first, again, other)]
        torch.testing.assert_close(dense[0], dense[1], atol=0, rtol=0)
        assert not torch.allclose(dense[0], dense[2])


# ---------------------------------------------------------------------------- kfac_approx
class SequenceMean(nn.Module):
    """``(batch, seq, dim) -> (batch, dim)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def sequence_net() -> tuple[nn.Module, torch.Tensor]:
    """Two linear layers applied to every position of a sequence, then a mean."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), SequenceMean())
    return model, torch.randn(10, 6, 4, generator=torch.Generator().manual_seed(5))


def conv_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    return model, torch.randn(10, 2, 6, 6, generator=torch.Generator().manual_seed(6))


NETS = {"conv": conv_net, "sequence": sequence_net}
FISHER = {CurvlinopsGGN: FisherType.TYPE2, CurvlinopsEF: FisherType.EMPIRICAL}


def targets(likelihood: str, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    if likelihood == "classification":
        return torch.randint(3, (n,), generator=generator)
    return torch.randn(n, 3, generator=generator)


def reference_kfac(model, data, n_data, likelihood, backend, approx) -> torch.Tensor:
    """Dense K-FAC of ``curvlinops.KFACLinearOperator`` in the library's loss scaling
    (``0.5 * sum (f - y)^2``: the GGN is halved, the empirical Fisher quartered)."""
    regression = likelihood == "regression"
    loss = nn.MSELoss(reduction="sum") if regression else nn.CrossEntropyLoss(reduction="sum")
    params = [p for p in model.parameters() if p.requires_grad]
    operator = KFACLinearOperator(
        model,
        loss,
        params,
        data,
        fisher_type=FISHER[backend],
        kfac_approx=approx,
        separate_weight_and_bias=True,
        check_deterministic=False,
        num_data=n_data,
    )
    scale = (0.5 if backend is CurvlinopsGGN else 0.25) if regression else 1.0
    return scale * (operator @ torch.eye(operator.shape[1]))


@pytest.mark.parametrize("route", ["one-pass", "operator"])
@pytest.mark.parametrize("backend", list(FISHER), ids=lambda b: b.__name__)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("net", list(NETS))
def test_kfac_approx_matches_curvlinops(net, approx, backend, route, likelihood, monkeypatch):
    if route == "operator":
        monkeypatch.setattr(curvlinops_backend, "batch_kfac", lambda *args, **kwargs: None)
    model, x = NETS[net]()
    y = targets(likelihood, len(x))
    _, kron = backend(model, likelihood).kron(x, y, N=len(x), kfac_approx=approx)
    expected = reference_kfac(model, [(x, y)], len(x), likelihood, backend, approx)
    torch.testing.assert_close(kron.to_matrix(), expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("net", list(NETS))
def test_reduce_differs_from_expand_with_weight_sharing(net):
    model, x = NETS[net]()
    y = targets("classification", len(x))
    backend = CurvlinopsGGN(model, "classification")
    expand = backend.kron(x, y, N=len(x))[1].to_matrix()
    explicit = backend.kron(x, y, N=len(x), kfac_approx=KFACApprox.EXPAND)[1].to_matrix()
    reduce = backend.kron(x, y, N=len(x), kfac_approx="reduce")[1].to_matrix()
    torch.testing.assert_close(expand, explicit, atol=0, rtol=0)
    assert (expand - reduce).abs().max() > 1e-2 * expand.abs().max()


def test_reduce_equals_expand_without_weight_sharing():
    model = make_mlp()
    x, y = make_data("classification")
    backend = CurvlinopsGGN(model, "classification")
    expand = backend.kron(x, y, N=12)[1].to_matrix()
    reduce = backend.kron(x, y, N=12, kfac_approx="reduce")[1].to_matrix()
    torch.testing.assert_close(expand, reduce, atol=1e-14, rtol=1e-12)


# ---------------------------------------------------------------------------- Laplace
def test_kron_laplace_forwards_asdl_fisher_kwargs():
    """``asdl_fisher_kwargs`` reach ``kron`` in every batch of ``fit`` (as in laplace-torch)."""
    model, x = sequence_net()
    y = targets("classification", len(x))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    la = KronLaplace(model, "classification", asdl_fisher_kwargs={"kfac_approx": "reduce"})
    la.fit(loader)
    data = [(xb, yb) for xb, yb in loader]
    expected = reference_kfac(model, data, len(x), "classification", CurvlinopsGGN, "reduce")
    torch.testing.assert_close(la.H.to_matrix(), expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(
    "laplace_cls", [KronLaplace, FullLaplace, DiagLaplace, KronLLLaplace], ids=lambda c: c.__name__
)
def test_laplace_refuses_unknown_asdl_fisher_kwargs(laplace_cls):
    model = make_mlp()
    x, y = make_data("classification")
    la = laplace_cls(model, "classification", asdl_fisher_kwargs={"bogus": 1})
    with pytest.raises(UnknownOptionError, match="bogus"):
        la.fit(DataLoader(TensorDataset(x, y), batch_size=6))
