"""``marglik_training`` (Immer et al., ICML 2021) against hand-written training and Adam steps,
known noise levels, and the library's own Laplace objects."""

from __future__ import annotations

import copy
import math
from collections import UserDict

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace, marglik_training
from laplace.curvature import (
    AsdlGGN,
    BackPackEF,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
    GGNInterface,
)


def _mlp(n_in: int, n_hidden: int, n_out: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.Tanh(), nn.Linear(n_hidden, n_out))


def _sinusoid(n: int = 150, seed: int = 711) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed document's toy data: ``X ~ U(0, 8)``, ``y = sin(X) + 0.3 * noise``."""
    g = torch.Generator().manual_seed(seed)
    X = 8 * torch.rand(n, 1, generator=g)
    return X, torch.sin(X) + 0.3 * torch.randn(n, 1, generator=g)


def _blobs(n_per_class: int = 30, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 2-d with overlapping tails."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 2.0], [-1.7, -1.0], [1.7, -1.0]])
    X = torch.cat([c + torch.randn(n_per_class, 2, generator=g) for c in centres])
    return X, torch.arange(3).repeat_interleave(n_per_class)


def _tiny(likelihood: str, n: int = 24, seed: int = 1):
    """A tiny float64 model and a loader of two batches (the last one smaller)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g)
    if likelihood == "classification":
        y = torch.randint(0, 3, (n,), generator=g)
        model = _mlp(3, 6, 3)
    else:
        y = torch.randn(n, 2, generator=g)
        model = _mlp(3, 6, 2)
    return model, DataLoader(TensorDataset(X, y), batch_size=16)


# ---------------------------------------------------------------------------- ground truth


def test_sinusoid_learns_the_noise_level_and_predicts():
    X, y = _sinusoid()
    loader = DataLoader(TensorDataset(X, y), batch_size=50)
    la, _, margliks, losses = marglik_training(
        _mlp(1, 50, 1, seed=711),
        loader,
        likelihood="regression",
        hessian_structure="full",
        n_epochs=100,
        optimizer_kwargs={"lr": 3e-2},
        prior_structure="scalar",
        marglik_frequency=5,
    )
    # the data were generated with sigma = 0.3; the sample's residual scale is 0.3 +- 0.02
    assert abs(la.sigma_noise.item() - 0.3) < 0.15 * 0.3
    assert len(losses) == 100 and len(margliks) == 20 * 10
    X_test = torch.linspace(0.5, 7.5, 40).reshape(-1, 1)
    f_mu, f_var = la(X_test)
    assert f_mu.shape == (40, 1) and f_var.shape == (40, 1, 1)
    assert torch.isfinite(f_mu).all() and (f_var > 0).all()
    # the fitted mean follows the noiseless function within the noise level
    assert (f_mu - torch.sin(X_test)).abs().mean() < 0.15


def test_classification_marglik_rises_and_layerwise_priors_are_positive():
    X, y = _blobs()
    loader = DataLoader(TensorDataset(X, y), batch_size=30, shuffle=False)
    n_hypersteps = 5
    la, _, margliks, _ = marglik_training(
        _mlp(2, 10, 3),
        loader,
        likelihood="classification",
        n_epochs=40,
        n_hypersteps=n_hypersteps,
        optimizer_kwargs={"lr": 1e-2},
    )
    # margliks holds the negative log marginal likelihood before each step (as laplace-torch)
    per_epoch = torch.tensor(margliks).reshape(40, n_hypersteps)[:, -1]
    assert per_epoch[-5:].mean() < per_epoch[:5].mean() - 10
    assert la.prior_precision.shape == (4,)  # one per parameter tensor
    assert torch.isfinite(la.prior_precision).all() and (la.prior_precision > 0).all()


def _hand_training_epoch(model, loader, prior_prec, sigma, temperature, likelihood):
    """One epoch as laplace-torch writes it: mean data loss plus the prior divided by
    ``N * c`` with ``c = 1 / T`` (classification) or ``1 / (2 sigma^2 T)``; the squared
    error is summed over the outputs (laplace-torch's ``MSELoss`` also averages over them, which
    weighs the prior by the number of outputs; the same for one output)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    n_data = len(loader.dataset)
    sizes = torch.tensor([p.numel() for p in model.parameters()])
    delta = prior_prec.repeat_interleave(sizes) if prior_prec.numel() > 1 else prior_prec
    if likelihood == "classification":
        criterion, factor = nn.CrossEntropyLoss(), 1 / temperature
    else:
        criterion = lambda f, y: ((f - y) ** 2).sum(-1).mean()  # noqa: E731
        factor = 1 / (2 * sigma**2 * temperature)
    for X, y in loader:
        optimizer.zero_grad()
        theta = parameters_to_vector(model.parameters())
        loss = criterion(model(X), y) + 0.5 * (delta * theta) @ theta / n_data / factor
        loss.backward()
        optimizer.step()


def _hand_adam(log_params, lml_of, n_steps, lr, betas=(0.9, 0.999), eps=1e-8):
    """``n_steps`` of Adam on ``-lml_of(*exp(log_params))`` by the update formula; the
    objective before each step and the final log parameters."""
    m = [torch.zeros_like(p) for p in log_params]
    v = [torch.zeros_like(p) for p in log_params]
    values = []
    for t in range(1, n_steps + 1):
        params = [p.detach().requires_grad_(True) for p in log_params]
        objective = -lml_of(*[p.exp() for p in params])
        grads = torch.autograd.grad(objective, params)
        values.append(objective.item())
        new = []
        for i, (p, g) in enumerate(zip(params, grads)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g**2
            m_hat, v_hat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
            new.append(p.detach() - lr * m_hat / (v_hat.sqrt() + eps))
        log_params = new
    return values, log_params


@pytest.mark.parametrize(
    ("likelihood", "temperature"),
    [("regression", 1.0), ("classification", 1.0), ("regression", 0.5)],
    ids=["regression", "classification", "regression-T0.5"],
)
@pytest.mark.parametrize("n_hypersteps", [1, 2, 3])
def test_one_epoch_equals_hand_written_training_and_adam(likelihood, temperature, n_hypersteps):
    model, loader = _tiny(likelihood)
    hand_model = copy.deepcopy(model)
    prior_init, sigma_init, lr_hyp = 0.7, 1.3 if likelihood == "regression" else 1.0, 0.1
    la, trained, margliks, losses = marglik_training(
        model,
        loader,
        likelihood=likelihood,
        hessian_structure="full",
        n_epochs=1,
        n_hypersteps=n_hypersteps,
        lr_hyp=lr_hyp,
        prior_prec_init=prior_init,
        sigma_noise_init=sigma_init,
        temperature=temperature,
        optimizer_kwargs={"lr": 1e-2},
    )
    prior0 = torch.full((4,), prior_init)
    _hand_training_epoch(hand_model, loader, prior0, sigma_init, temperature, likelihood)
    for mine, hand in zip(trained.parameters(), hand_model.parameters()):
        torch.testing.assert_close(mine, hand, rtol=1e-12, atol=1e-14)

    hand_la = Laplace(
        hand_model,
        likelihood,
        subset_of_weights="all",
        hessian_structure="full",
        sigma_noise=sigma_init,
        temperature=temperature,
    )
    hand_la.fit(loader)
    log_params = [prior0.log()]
    if likelihood == "regression":
        log_params.append(torch.tensor(sigma_init).log())
    values, final = _hand_adam(log_params, hand_la.log_marginal_likelihood, n_hypersteps, lr_hyp)
    torch.testing.assert_close(torch.tensor(margliks), torch.tensor(values), rtol=1e-10, atol=0)
    # the returned hyperparameters are those at which the last recorded value was taken:
    # after n_hypersteps - 1 steps (with a single step, the initial values), as laplace-torch
    _, at_last = _hand_adam(log_params, hand_la.log_marginal_likelihood, n_hypersteps - 1, lr_hyp)
    torch.testing.assert_close(la.prior_precision, at_last[0].exp(), rtol=1e-10, atol=0)
    if likelihood == "regression":
        torch.testing.assert_close(la.sigma_noise, at_last[1].exp(), rtol=1e-10, atol=0)
        assert not torch.allclose(final[1], at_last[1])
    torch.testing.assert_close(-la.log_marginal_likelihood(), torch.tensor(values[-1]))
    assert len(losses) == 1 and math.isfinite(losses[0])


def test_reported_loss_is_the_mean_batch_loss():
    model, loader = _tiny("regression")
    start = copy.deepcopy(model)
    _, _, _, losses = marglik_training(
        model, loader, likelihood="regression", hessian_structure="diag", n_epochs=1
    )
    # the loss of each batch is taken before that batch's step
    optimizer = torch.optim.Adam(start.parameters())
    total = 0.0
    for X, y in loader:
        optimizer.zero_grad()
        theta = parameters_to_vector(start.parameters())
        loss = ((start(X) - y) ** 2).sum(-1).mean() + 0.5 * theta @ theta * 2 / 24
        total += loss.item() * len(y)
        loss.backward()
        optimizer.step()
    assert losses[0] == pytest.approx(total / 24, rel=1e-12)


# ---------------------------------------------------------------------------- grid


_BACKENDS = [CurvlinopsGGN, BackPackGGN, AsdlGGN, CurvlinopsEF, GGNInterface]
_CASES = [
    pytest.param(structure, likelihood, backend, id=f"{structure}-{likelihood}-{backend.__name__}")
    for structure in ("full", "kron", "diag")
    for likelihood in ("classification", "regression")
    for backend in _BACKENDS
    if structure in backend.structures
]


@pytest.mark.parametrize(("structure", "likelihood", "backend"), _CASES)
def test_every_structure_and_backend(structure, likelihood, backend):
    model, loader = _tiny(likelihood)
    n_epochs, n_hypersteps = 3, 2
    la, trained, margliks, losses = marglik_training(
        model,
        loader,
        likelihood=likelihood,
        hessian_structure=structure,
        backend=backend,
        n_epochs=n_epochs,
        n_hypersteps=n_hypersteps,
        optimizer_kwargs={"lr": 1e-2},
    )
    assert type(la.backend) is backend and la.n_data == 24
    assert len(margliks) == n_epochs * n_hypersteps and len(losses) == n_epochs
    assert all(map(math.isfinite, margliks + losses))
    assert (la.prior_precision > 0).all() and torch.isfinite(la.prior_precision).all()
    assert la.posterior_precision is not None
    # the returned object is the best epoch's: its marginal likelihood is the best recorded
    # value (the last one of each epoch), and its mean is the returned model's weights
    best = min(margliks[n_hypersteps - 1 :: n_hypersteps])
    assert -la.log_marginal_likelihood().item() == pytest.approx(best, rel=1e-10)
    torch.testing.assert_close(la.mean, parameters_to_vector(trained.parameters()))
    # a Laplace approximation fitted afresh on the returned model agrees with it
    fresh = Laplace(
        trained,
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        backend=backend,
        prior_precision=la.prior_precision,
        sigma_noise=la.sigma_noise,
    )
    fresh.fit(loader)
    torch.testing.assert_close(fresh.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_diag_prior_per_parameter():
    model, loader = _tiny("regression")
    la, *_ = marglik_training(
        model, loader, "regression", "diag", n_epochs=2, prior_structure="diag", n_hypersteps=2
    )
    assert la.prior_precision.shape == (la.n_params,)
    assert len(set(la.prior_precision.tolist())) > 1  # the entries are learned separately


# ---------------------------------------------------------------------------- options


class _DictModel(nn.Module):
    """A model that takes the whole batch dict, as Hugging Face models do."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch["input_ids"])


def _dict_collate(items):
    X, y = torch.utils.data.default_collate(items)
    return UserDict({"input_ids": X, "labels": y})


def test_dict_batches_give_the_numbers_of_tensor_batches():
    model, loader = _tiny("classification")
    dict_loader = DataLoader(loader.dataset, batch_size=16, collate_fn=_dict_collate)
    options = dict(likelihood="classification", hessian_structure="kron", n_epochs=2)
    la, _, margliks, losses = marglik_training(copy.deepcopy(model), loader, **options)
    la_dict, _, margliks_dict, losses_dict = marglik_training(
        _DictModel(copy.deepcopy(model)), dict_loader, **options
    )
    assert margliks_dict == pytest.approx(margliks, rel=1e-12)
    assert losses_dict == pytest.approx(losses, rel=1e-12)
    torch.testing.assert_close(la_dict.prior_precision, la.prior_precision)


def test_custom_dict_keys():
    model, loader = _tiny("regression")

    def collate(items):
        X, y = torch.utils.data.default_collate(items)
        return {"x": X, "target": y}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, batch):
            return self.net(batch["x"])

    la, *_ = marglik_training(
        Net(),
        DataLoader(loader.dataset, batch_size=16, collate_fn=collate),
        "regression",
        "diag",
        n_epochs=1,
        dict_key_x="x",
        dict_key_y="target",
    )
    assert la.dict_key_x == "x" and la.dict_key_y == "target"


def test_progress_bar(capsys):
    model, loader = _tiny("classification")
    marglik_training(model, loader, n_epochs=3, n_hypersteps=1, progress_bar=True)
    err = capsys.readouterr().err
    assert "marglik_training" in err and "3/3" in err


def test_enable_backprop_gives_input_gradients():
    model, loader = _tiny("regression")
    la, *_ = marglik_training(model, loader, "regression", "kron", n_epochs=1, n_hypersteps=1)
    assert la.enable_backprop is False
    la, *_ = marglik_training(
        model, loader, "regression", "kron", n_epochs=1, n_hypersteps=1, enable_backprop=True
    )
    x = torch.randn(5, 3, requires_grad=True)
    f_mu, f_var = la(x)
    (f_mu.sum() + f_var.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_float32_model_follows_float64_run():
    X, y = _sinusoid(60)
    runs = {}
    for dtype in (torch.float64, torch.float32):
        loader = DataLoader(TensorDataset(X.to(dtype), y.to(dtype)), batch_size=20)
        la, model, margliks, _ = marglik_training(
            _mlp(1, 10, 1).to(dtype),
            loader,
            "regression",
            "kron",
            n_epochs=5,
            n_hypersteps=3,
            optimizer_kwargs={"lr": 1e-2},
        )
        assert la.prior_precision.dtype == la.sigma_noise.dtype == dtype
        assert next(model.parameters()).dtype == dtype
        runs[dtype] = (la, margliks)
    la32, margliks32 = runs[torch.float32]
    la64, margliks64 = runs[torch.float64]
    f_mu, f_var = la32(X[:5].float())
    assert f_mu.dtype == f_var.dtype == torch.float32 and torch.isfinite(f_var).all()
    # The float32 run carries round-off of 6e-8 relative per operation through 15 training
    # steps and 15 Adam steps on the hyperparameters. The marginal likelihood's terms are
    # summed in float64 inside the library, so its value and gradient carry ~1e-7 relative
    # error; Adam normalises the gradient, which amplifies such errors where a gradient is
    # small, but each step moves a log hyperparameter by at most about lr_hyp = 0.1.
    # Measured: 9e-8 (margliks), 1.4e-6 (prior precision), 3e-8 (noise); 1e-4 leaves a
    # margin of 70 and still catches any float32 leak into the sums or a float64 leak
    # into the returned values (checked by dtype above).
    torch.testing.assert_close(
        torch.tensor(margliks32, dtype=torch.float64),
        torch.tensor(margliks64),
        rtol=1e-4,
        atol=0,
    )
    torch.testing.assert_close(
        la32.prior_precision.double(), la64.prior_precision, rtol=1e-4, atol=0
    )
    torch.testing.assert_close(la32.sigma_noise.double(), la64.sigma_noise, rtol=1e-4, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_keeps_everything_on_its_device():
    model, loader = _tiny("regression")
    la, trained, margliks, _ = marglik_training(
        model.cuda(), loader, "regression", "kron", n_epochs=2, n_hypersteps=2
    )
    assert la.prior_precision.is_cuda and la.sigma_noise.is_cuda
    assert next(trained.parameters()).is_cuda and all(map(math.isfinite, margliks))
    f_mu, f_var = la(torch.randn(4, 3, device="cuda"))
    assert f_mu.is_cuda and f_var.is_cuda


def test_schedule_of_marglik_epochs():
    model, loader = _tiny("classification")
    common = dict(hessian_structure="diag", n_hypersteps=3)
    _, _, margliks, losses = marglik_training(
        model, loader, n_epochs=5, n_epochs_burnin=2, **common
    )
    assert len(losses) == 5 and len(margliks) == 3 * 3  # epochs 3, 4, 5
    _, _, margliks, _ = marglik_training(model, loader, n_epochs=5, marglik_frequency=2, **common)
    assert len(margliks) == 2 * 3  # epochs 2 and 4


def test_no_marglik_epoch_returns_the_fitted_prior():
    model, loader = _tiny("regression")
    la, trained, margliks, losses = marglik_training(
        model, loader, "regression", "full", n_epochs=2, n_epochs_burnin=2, prior_prec_init=0.5
    )
    assert margliks == [] and len(losses) == 2
    torch.testing.assert_close(la.prior_precision, torch.full((4,), 0.5))
    assert la.sigma_noise.item() == 1.0 and la.n_data == 24
    torch.testing.assert_close(la.mean, parameters_to_vector(trained.parameters()))


def test_fixed_noise_stays_fixed():
    model, loader = _tiny("regression")
    la, *_ = marglik_training(
        model, loader, "regression", "diag", n_epochs=2, sigma_noise_init=0.4, fix_sigma_noise=True
    )
    assert la.sigma_noise.item() == 0.4


def test_scheduler_is_stepped_after_every_batch():
    model, loader = _tiny("classification")
    optimizers = []

    class Recorder(torch.optim.lr_scheduler.StepLR):
        def __init__(self, optimizer, **kwargs) -> None:
            optimizers.append(optimizer)
            super().__init__(optimizer, **kwargs)

    marglik_training(
        model,
        loader,
        n_epochs=3,
        n_hypersteps=1,
        optimizer_cls=torch.optim.SGD,
        optimizer_kwargs={"lr": 0.1},
        scheduler_cls=Recorder,
        scheduler_kwargs={"step_size": 1, "gamma": 0.5},
    )
    assert optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (3 * 2))


def test_weight_decay_is_replaced_by_the_prior():
    model, loader = _tiny("classification")
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    with pytest.warns(UserWarning, match="weight_decay"):
        _, _, margliks, _ = marglik_training(
            copy.deepcopy(model), loader, n_epochs=2, optimizer_kwargs=kwargs
        )
    assert kwargs["weight_decay"] == 0.1  # the caller's dict is not changed
    _, _, plain, _ = marglik_training(
        copy.deepcopy(model), loader, n_epochs=2, optimizer_kwargs={"lr": 1e-2}
    )
    assert margliks == plain


_BAD = [
    ({"likelihood": "poisson"}, "likelihood"),
    ({"likelihood": "reward_modeling"}, "likelihood"),
    ({"hessian_structure": "lowrank"}, "hessian_structure"),
    ({"hessian_structure": "block"}, "hessian_structure"),
    ({"prior_structure": "rowwise"}, "prior_structure"),
    ({"prior_structure": "diag"}, "prior_structure='diag'"),  # with the default kron
    ({"n_epochs": 0}, "n_epochs"),
    ({"n_epochs": 2.5}, "n_epochs"),
    ({"n_epochs_burnin": -1}, "n_epochs_burnin"),
    ({"n_hypersteps": 0}, "n_hypersteps"),
    ({"marglik_frequency": 0}, "marglik_frequency"),
    ({"lr_hyp": 0.0}, "lr_hyp"),
    ({"prior_prec_init": -1.0}, "prior_prec_init"),
    ({"prior_prec_init": torch.tensor([1.0, 0.0, 1.0, 1.0])}, "prior_prec_init"),
    ({"prior_prec_init": torch.ones(3)}, "prior_prec_init"),
    ({"sigma_noise_init": 0.5}, "sigma_noise_init"),  # classification
    ({"sigma_noise_init": float("nan")}, "sigma_noise_init"),
    ({"temperature": 0.0}, "temperature"),
    ({"backend": BackPackEF}, "BackPackEF"),  # no K-FAC
    ({"backend": "CurvlinopsGGN"}, "backend"),
]


@pytest.mark.parametrize(("kwargs", "match"), _BAD, ids=[str(k) for k, _ in _BAD])
def test_bad_options_raise_before_training(kwargs, match):
    model, loader = _tiny("classification")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        marglik_training(model, loader, **{"n_epochs": 1, **kwargs})
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_bad_loader_and_targets():
    model, _ = _tiny("regression")
    with pytest.raises(ValueError, match="train_loader"):
        marglik_training(model, [(torch.randn(4, 3), torch.randn(4, 2))], "regression")
    bad = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8)), batch_size=4)
    with pytest.raises(ValueError, match="shape"):
        marglik_training(model, bad, "regression", n_epochs=1)
