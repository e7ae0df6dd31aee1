"""Fits across two gloo processes equal the single-process fit on all the data.

One spawn of two CPU ranks (a ``FileStore`` in ``tmp_path``, no network) runs every check:
each rank fits its half of the training data (``DistributedSampler(shuffle=False)``) for
every configuration and saves what it got; the tests compare the two ranks with each other
(exactly: every rank must hold the same posterior) and with a single-process fit on the whole
data computed here, in float64.

The truth for ``marglik_training`` with a ``DistributedDataParallel`` model is the
single-process run with the global batch: with ``shuffle=False`` the union of the ranks'
batches at each step is one batch of twice the size, DDP's mean of the ranks' gradients is
the gradient of the mean over that batch, and the Laplace fits are summed over the ranks.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch import distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from laplace import (
    ELLA,
    DiagLaplace,
    FullLaplace,
    FullLLLaplace,
    FullSubnetLaplace,
    FunctionalLaplace,
    KronLaplace,
    KronLLLaplace,
    LowRankLaplace,
    marglik_training,
)
from laplace.utils.distributed import RankReduction, unwrap_parallel, unwrapped_name
from laplace.utils.matrix import Kron, KronDecomposed
from laplace.utils.utils import get_nll

WORLD = 2
BATCH = 4  # per rank; the single-process marglik_training run takes WORLD * BATCH
RTOL, ATOL = 1e-9, 1e-11
SMALL_PRIOR = {"prior_precision": 1e-2}  # of the float32 fits
F32_RTOL, F32_ATOL = 1e-6, 1e-12
"""float32 fits (a ReLU MLP, prior precision 1e-2): the per-sample terms are float32 products
of one sample's data each, and the sums and factorisations run in float64 on the ranks and
in the single process alike, so the float64 results differ only by the order of the sums
(~1e-16 relative). Cast to float32, they agree unless a value sits next to a float32
rounding boundary: measured, 18 of the 98 entries of the diagonal fit's H off by one float32
ulp (at most 1.1e-7 relative), everything else bitwise equal; asserted at 1e-6 (eight ulps)."""


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # float64 explicitly: the ranks do not read tests/conftest.py
    f64 = torch.float64
    return nn.Sequential(nn.Linear(3, 5, dtype=f64), nn.Tanh(), nn.Linear(5, 2, dtype=f64))


def _relu32(seed: int = 0) -> nn.Module:
    """A float32 ReLU MLP with more parameters (98) than data points (16)."""
    torch.manual_seed(seed)
    f32 = torch.float32
    return nn.Sequential(nn.Linear(3, 16, dtype=f32), nn.ReLU(), nn.Linear(16, 2, dtype=f32))


def _model(name: str) -> nn.Module:
    return _relu32() if name.startswith("f32_") else _mlp()


def _data_key(name: str, likelihood: str) -> str:
    return likelihood + "32" if name.startswith("f32_") else likelihood


def _data(likelihood: str, n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    if likelihood == "classification":
        return TensorDataset(X, torch.randint(2, (n,), generator=generator))
    return TensorDataset(X, torch.randn(n, 2, generator=generator, dtype=torch.float64))


DATA = {
    "classification": _data("classification", 16, 1),
    "regression": _data("regression", 16, 2),
    "val_classification": _data("classification", 12, 19),  # ranks alone choose otherwise
}
DATA["classification32"] = TensorDataset(
    DATA["classification"].tensors[0].float(), DATA["classification"].tensors[1]
)
X_TEST = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _loader(key: str, rank: int | None = None, batch_size: int = BATCH) -> DataLoader:
    """The whole data set (``rank=None``) or the shard of ``rank``."""
    dataset = DATA[key]
    sampler = None
    if rank is not None:
        sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


SUBNET = torch.tensor([0, 3, 7, 16, 20, 25, 31])
BUILDERS: dict[str, tuple[str, Callable[[nn.Module], Any]]] = {
    "full": ("classification", lambda m: FullLaplace(m, "classification", prior_precision=0.5)),
    "kron": ("classification", lambda m: KronLaplace(m, "classification", prior_precision=0.5)),
    "diag": ("classification", lambda m: DiagLaplace(m, "classification", prior_precision=0.5)),
    "lowrank": ("classification", lambda m: LowRankLaplace(m, "classification", n_eigenvalues=6)),
    "ll_full": ("classification", lambda m: FullLLLaplace(m, "classification")),
    "ll_kron": ("classification", lambda m: KronLLLaplace(m, "classification")),
    "subnet": ("classification", lambda m: FullSubnetLaplace(m, "classification", SUBNET)),
    "reg_diag": ("regression", lambda m: DiagLaplace(m, "regression", sigma_noise=0.7)),
    "reg_kron": ("regression", lambda m: KronLaplace(m, "regression", sigma_noise=0.7)),
    "gp": ("classification", lambda m: FunctionalLaplace(m, "classification", n_subset=6)),
    # float32 ReLU MLP, small prior precision (see F32_RTOL)
    "f32_full": ("classification", lambda m: FullLaplace(m, "classification", **SMALL_PRIOR)),
    "f32_kron": ("classification", lambda m: KronLaplace(m, "classification", **SMALL_PRIOR)),
    "f32_diag": ("classification", lambda m: DiagLaplace(m, "classification", **SMALL_PRIOR)),
    "f32_lowrank": (
        "classification",
        lambda m: LowRankLaplace(m, "classification", n_eigenvalues=6, **SMALL_PRIOR),
    ),
    # the same through a DistributedDataParallel wrapper (a plain model in the truth)
    "ddp_full": ("classification", lambda m: FullLaplace(m, "classification")),
    "ddp_ll_kron": ("classification", lambda m: KronLLLaplace(m, "classification")),
    "ddp_ll_named": (
        "classification",
        lambda m: FullLLLaplace(m, "classification", last_layer_name=_layer_name(m)),
    ),
}


def _layer_name(model: nn.Module) -> str:
    return "module.2" if model is not unwrap_parallel(model) else "2"


def _dense_H(la: Any) -> Tensor:
    H = la.H
    if isinstance(H, tuple):
        U, eigenvalues = H
        return U @ torch.diag(eigenvalues) @ U.mT
    if isinstance(H, (Kron, KronDecomposed)):
        return H.to_matrix()
    return torch.diag(H) if H.ndim == 1 else H


def _summary(la: Any) -> dict[str, Any]:
    """What the tests compare of a fitted approximation."""
    summary = {
        "loss": torch.as_tensor(la.loss),
        "n_data": la.n_data,
        "lml": la.log_marginal_likelihood().detach(),
        "pred": la(X_TEST.to(la._dtype), link_approx="probit")
        if la.likelihood.value == "classification"
        else list(la(X_TEST)),
    }
    if hasattr(la, "H"):
        summary["H"] = _dense_H(la)
        summary["samples"] = la.sample(3, generator=torch.Generator().manual_seed(7))
    if isinstance(la, KronLaplace):
        summary["factors"] = [f.clone() for fs in la.H_facs.kfacs for f in fs]
    return summary


def _fit_configs(rank: int | None, ddp: nn.Module | None) -> dict[str, dict[str, Any]]:
    results = {}
    for name, (likelihood, build) in BUILDERS.items():
        model = ddp if name.startswith("ddp_") and ddp is not None else _model(name)
        la = build(model)
        la.fit(_loader(_data_key(name, likelihood), rank))
        results[name] = _summary(la)
    return results


def _tuning(rank: int | None) -> dict[str, Tensor]:
    """Prior precisions chosen by gridsearch (metric and callable) and by marglik."""
    grid = {"method": "gridsearch", "grid_size": 13, "log_prior_prec_min": -3}
    results = {}
    la = KronLaplace(_mlp(), "classification")
    la.fit(_loader("classification", rank))
    la.optimize_prior_precision(val_loader=_loader("val_classification", rank), **grid)
    results["grid_metric"] = la.prior_precision.clone()
    la = DiagLaplace(_mlp(), "classification")
    la.fit(_loader("classification", rank))
    val_loader = _loader("val_classification", rank)
    la.optimize_prior_precision(val_loader=val_loader, loss=get_nll, **grid)
    results["grid_callable"] = la.prior_precision.clone()
    la = FullLaplace(_mlp(), "classification")
    la.fit(_loader("classification", rank))
    la.optimize_prior_precision(method="marglik", n_steps=20, prior_structure="layerwise")
    results["marglik"] = la.prior_precision.detach().clone()
    return results


def _marglik_training(model: nn.Module, loader: DataLoader) -> dict[str, Any]:
    la, model, margliks, losses = marglik_training(
        model, loader, n_epochs=2, n_hypersteps=3, optimizer_kwargs={"lr": 1e-2}
    )
    return {
        "prior_precision": la.prior_precision.detach().clone(),
        "margliks": torch.tensor(margliks, dtype=torch.float64),
        "losses": torch.tensor(losses, dtype=torch.float64),
        "state": [p.detach().clone() for p in unwrap_parallel(model).parameters()],
        "factors": [f.clone() for fs in la.H_facs.kfacs for f in fs],
        "n_data": la.n_data,
    }


def _rank_checks(rank: int, ddp: nn.Module) -> dict[str, Any]:
    """What only a process group can check: opt-outs, refusals, failures on one rank."""
    results: dict[str, Any] = {}
    la = FullLaplace(_mlp(), "classification")
    la.fit(_loader("classification", rank), distributed=False)
    results["per_rank"] = {"H": la.H.clone(), "n_data": la.n_data, "loss": la.loss}
    ella = ELLA(_mlp(), "classification", n_eigenvalues=3, subsample_size=6)
    with pytest.raises(ValueError, match="distributed=False"):
        ella.fit(_loader("classification", rank))
    ella.fit(_loader("classification", rank), distributed=False)
    results["ella_per_rank"] = ella.n_data
    X, y = DATA["regression"].tensors
    y = y.clone()
    y[1] = float("nan")  # in rank 1's shard only
    bad = DataLoader(TensorDataset(X, y), batch_size=BATCH, sampler=_sampler(len(X), rank))
    la = DiagLaplace(_mlp(), "regression")
    la.fit(_loader("regression", rank))
    before = la.H.clone()
    try:
        la.fit(bad)
    except (ValueError, RuntimeError) as error:
        results["failure"] = type(error).__name__
    results["unchanged_after_failure"] = torch.equal(before, la.H)
    named = KronLLLaplace(ddp, "classification", last_layer_name="module.2")
    results["ddp_layer_name"] = named.subset.extractor.last_layer_name
    return results


def _sampler(n: int, rank: int) -> DistributedSampler:
    return DistributedSampler(range(n), num_replicas=WORLD, rank=rank, shuffle=False)


def _rank_main(rank: int, store: str, out_dir: str) -> None:
    """One rank of the spawned group: every check, saved to ``out_dir/rank<r>.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(_mlp())
        results = {
            "fits": _fit_configs(rank, ddp),
            "tuning": _tuning(rank),
            "marglik_training": _marglik_training(
                nn.parallel.DistributedDataParallel(_mlp()), _loader("classification", rank)
            ),
            "checks": _rank_checks(rank, ddp),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """The results of both ranks, from one spawn."""
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_rank_main, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_equal_ranks(values: list[Any], path: str) -> None:
    first, *others = values
    for other in others:
        if isinstance(first, Tensor):
            assert torch.equal(first, other), f"{path}: ranks differ"
        elif isinstance(first, dict):
            for key in first:
                _assert_equal_ranks([first[key], other[key]], f"{path}.{key}")
        elif isinstance(first, list):
            for index, (a, b) in enumerate(zip(first, other)):
                _assert_equal_ranks([a, b], f"{path}[{index}]")
        else:
            assert first == other, f"{path}: ranks differ"


def _assert_close(got: Any, expected: Any, path: str) -> None:
    if isinstance(expected, dict):
        assert set(got) == set(expected), path
        for key in expected:
            _assert_close(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for index, (a, b) in enumerate(zip(got, expected)):
            _assert_close(a, b, f"{path}[{index}]")
    elif isinstance(expected, Tensor):
        message = lambda text: f"{path}: {text}"  # noqa: E731
        rtol, atol = (F32_RTOL, F32_ATOL) if expected.dtype == torch.float32 else (RTOL, ATOL)
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=message)
    else:
        assert got == expected, f"{path}: {got!r} != {expected!r}"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fit_across_ranks_equals_single_process_fit(ranks, name):
    _assert_equal_ranks([r["fits"][name] for r in ranks], name)
    likelihood, build = BUILDERS[name]
    la = build(_model(name))
    la.fit(_loader(_data_key(name, likelihood)))
    got, expected = dict(ranks[0]["fits"][name]), _summary(la)
    # samples from the eigenbasis of H are the same for the same H only (signs of eigenvectors)
    got.pop("samples", None), expected.pop("samples", None)
    _assert_close(got, expected, name)


def test_prior_tuning_across_ranks_equals_single_process(ranks):
    _assert_equal_ranks([r["tuning"] for r in ranks], "tuning")
    _assert_close(ranks[0]["tuning"], _tuning(None), "tuning")


def test_marglik_training_with_ddp_equals_single_process_with_the_global_batch(ranks):
    _assert_equal_ranks([r["marglik_training"] for r in ranks], "marglik_training")
    expected = _marglik_training(_mlp(), _loader("classification", batch_size=WORLD * BATCH))
    _assert_close(ranks[0]["marglik_training"], expected, "marglik_training")


def test_distributed_false_fits_each_rank_on_its_shard(ranks):
    for rank, results in enumerate(ranks):
        la = FullLaplace(_mlp(), "classification")
        la.fit(_loader("classification", rank))  # no process group here
        got = results["checks"]["per_rank"]
        torch.testing.assert_close(got["H"], la.H, rtol=RTOL, atol=ATOL)
        assert got["n_data"] == la.n_data  # len(dataset), as without a process group
        torch.testing.assert_close(torch.as_tensor(got["loss"]), torch.as_tensor(la.loss))
    shards = [r["checks"]["per_rank"]["H"] for r in ranks]
    assert not torch.allclose(*shards)
    assert [r["checks"]["ella_per_rank"] for r in ranks] == [8, 8]


def test_a_failure_on_one_rank_raises_on_every_rank_and_changes_nothing(ranks):
    assert [r["checks"]["failure"] for r in ranks] == ["RuntimeError", "ValueError"]
    assert all(r["checks"]["unchanged_after_failure"] for r in ranks)


def test_ddp_layer_names_lose_the_wrapper_prefix(ranks):
    assert [r["checks"]["ddp_layer_name"] for r in ranks] == ["2", "2"]
    wrapped = nn.DataParallel(nn.DataParallel(_mlp()))
    assert isinstance(unwrap_parallel(wrapped), nn.Sequential)
    assert unwrapped_name(wrapped, "module.module.2") == "2"
    assert unwrapped_name(wrapped, "2") == "2"


def test_distributed_keyword_is_checked_without_a_process_group():
    la = FullLaplace(_mlp(), "classification")
    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        la.fit(_loader("classification"), distributed=True)
    with pytest.raises(ValueError, match="distributed must be None, True or False"):
        la.fit(_loader("classification"), distributed="yes")
    assert RankReduction.resolve(None) is None
    la.fit(_loader("classification"), distributed=False)
    assert la.n_data == 16


@pytest.mark.slow  # three interpreters importing torch and laplace: 15-20 s on 2 cores
def test_example_runs_under_torchrun_and_the_ranks_agree():
    root = Path(__file__).resolve().parent.parent
    python_path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(root / "examples" / "distributed_fit.py"), "--fast"]
    result = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "world size: 2" in result.stdout, result.stdout
    assert "ranks agree: True" in result.stdout, result.stdout
    match = re.search(r"single-process fit: (\S+)", result.stdout)
    assert match is not None and float(match.group(1)) < 1e-5, result.stdout
    accuracy = re.search(r"test accuracy: (\S+)", result.stdout)
    assert accuracy is not None and float(accuracy.group(1)) > 0.8, result.stdout
