"""Joint training of a network and its hyperparameters on the marginal likelihood.

Algorithm 1 of Immer et al. (ICML 2021): the network takes gradient steps on the log joint
(the data loss plus a Gaussian prior at the current prior precision), and every
``marglik_frequency`` epochs after a burn-in a Laplace approximation of the log marginal
likelihood is fitted at the current weights and maximised for ``n_hypersteps`` Adam steps in
the log prior precision and, for regression, the log observation noise. The network and the
Laplace approximation with the best marginal likelihood are returned.

The per-batch training loss follows laplace-torch 0.3, so that ``losses`` and the training
trajectory are the same numbers: the mean data loss over the batch (cross-entropy, or the
squared error summed over outputs for regression) plus the prior term
``0.5 * sum_i delta_i theta_i^2`` divided by ``N * c``. ``c`` is the factor of the
likelihood in the log joint, ``1 / T`` for classification and ``1 / (2 sigma^2 T)`` for
regression (temperature ``T``, noise ``sigma``), so ``c`` times the loss is the negative
tempered log joint per data point (up to a constant) whose Laplace approximation is fitted.

References:
    Immer, Bauer, Fortuin, Rätsch, Khan. Scalable marginal likelihood estimation for model
    selection in deep learning. ICML 2021.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from laplace.baselaplace import ParametricLaplace
from laplace.laplace import Laplace
from laplace.utils.data import dataset_size, unpack_batch
from laplace.utils.distributed import RankReduction
from laplace.utils.enums import (
    HessianStructure,
    Likelihood,
    PriorStructure,
    SubsetOfWeights,
    parse_enum,
)
from laplace.utils.precision import accumulation_dtype
from laplace.utils.utils import fix_prior_prec_structure

__all__ = ["marglik_training"]

logger = logging.getLogger(__name__)

_LIKELIHOODS = (Likelihood.CLASSIFICATION, Likelihood.REGRESSION)
_STRUCTURES = (HessianStructure.FULL, HessianStructure.KRON, HessianStructure.DIAG)


def marglik_training(
    model: nn.Module,
    train_loader: Any,
    likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
    hessian_structure: HessianStructure | str = HessianStructure.KRON,
    backend: type | None = None,
    optimizer_cls: type[Optimizer] = Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    scheduler_cls: type[LRScheduler] | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    n_epochs: int = 300,
    lr_hyp: float = 1e-1,
    prior_structure: PriorStructure | str = PriorStructure.LAYERWISE,
    n_epochs_burnin: int = 0,
    n_hypersteps: int = 10,
    marglik_frequency: int = 1,
    prior_prec_init: float | Tensor = 1.0,
    sigma_noise_init: float = 1.0,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    enable_backprop: bool = False,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
    *,
    distributed: bool | None = None,
) -> tuple[ParametricLaplace, nn.Module, list[float], list[float]]:
    """Train ``model`` and its prior precision (and noise) jointly (Immer et al., 2021).

    Each epoch trains the network on the log joint with ``optimizer_cls`` (``scheduler.step()``
    after every batch). In epochs ``e > n_epochs_burnin`` with ``e % marglik_frequency == 0``
    (``e = 1, ..., n_epochs``) an all-weights Laplace approximation with ``hessian_structure``
    is fitted and ``n_hypersteps`` Adam steps (rate ``lr_hyp``, one optimizer for the whole
    run) are taken on its negative log marginal likelihood in ``log prior_precision`` and,
    for regression unless ``fix_sigma_noise``, ``log sigma_noise``.

    Args:
        model: The network; it returns logits (classification) or ``(batch, outputs)``
            predictions (regression) and takes the whole batch dict for dict-like batches.
        train_loader: Yields ``(X, y)`` or dict-like batches; ``len(train_loader.dataset)``
            is the number of data points ``N``.
        likelihood: ``"classification"`` or ``"regression"``.
        hessian_structure: ``"full"``, ``"kron"`` or ``"diag"``.
        backend: Curvature backend class; None picks the default of :func:`Laplace`
            (``CurvlinopsGGN``; laplace-torch defaults to ``AsdlGGN``).
        optimizer_cls: Optimizer of the network's parameters.
        optimizer_kwargs: Its keyword arguments; a ``weight_decay`` is replaced by 0 (the
            prior is the weight decay), with a warning.
        scheduler_cls: Optional learning-rate scheduler, stepped after every batch.
        scheduler_kwargs: Its keyword arguments.
        n_epochs: Number of training epochs.
        lr_hyp: Adam learning rate of the hyperparameters.
        prior_structure: ``"scalar"``, ``"layerwise"`` (one precision per parameter tensor)
            or ``"diag"`` (one per parameter; not with ``"kron"``).
        n_epochs_burnin: Epochs trained before the first marginal-likelihood step.
        n_hypersteps: Adam steps on the hyperparameters per marginal-likelihood epoch.
        marglik_frequency: Take marginal-likelihood steps every this many epochs.
        prior_prec_init: Initial prior precision (a number, or a tensor of the structure's
            shape).
        sigma_noise_init: Initial observation noise (regression; must be 1 otherwise).
        temperature: Likelihood temperature ``T``, as in :func:`Laplace`: the likelihood
            enters training and marginal likelihood as ``p(D | theta)^(1/T)``.
        fix_sigma_noise: Keep ``sigma_noise_init`` instead of learning the noise.
        progress_bar: Show a tqdm progress bar over epochs.
        enable_backprop: Make the returned Laplace approximation's predictive
            differentiable w.r.t. its input.
        dict_key_x: Key of the inputs in dict-like batches.
        dict_key_y: Key of the targets in dict-like batches.
        distributed: Train and fit across the ranks of the initialised ``torch.distributed``
            process group, with ``model`` a ``DistributedDataParallel`` and each rank's
            ``train_loader`` over its shard (a ``DistributedSampler``): ``N`` is the number
            of data points of all ranks, the Laplace approximations are fitted across the
            ranks on the wrapped network, and ``losses`` are means over all ranks, so every
            rank takes the same hyperparameter steps. None (the default) does so when the
            group has more than one rank, True requires a group, False trains and fits on
            this rank's data only (as ``Laplace.fit``'s ``distributed``).

    Returns:
        ``(la, model, margliks, losses)``: the fitted Laplace approximation with the best
        marginal likelihood, carrying the hyperparameters at which it was evaluated; the
        model restored to the weights of that epoch (in eval mode); the *negative* log
        marginal likelihood before each hyperparameter step (``n_hypersteps`` values per
        marginal-likelihood epoch, as in laplace-torch); the mean training loss per epoch.

    Shapes:
        ``la.prior_precision``: ``(1,)``, ``(layers,)`` or ``(params,)`` by
        ``prior_structure``; ``la.sigma_noise``: ``()``

    Raises:
        ValueError: For unknown option strings, counts out of range, non-positive initial
            values or learning rate, ``sigma_noise_init != 1`` for classification,
            ``prior_structure="diag"`` with ``"kron"``, a backend that cannot compute the
            structure, or a loader without a data set.
    """
    reduction = RankReduction.resolve(distributed)
    setup = _Setup.create(
        model, train_loader, likelihood, hessian_structure, backend, prior_structure,
        prior_prec_init, sigma_noise_init, temperature, dict_key_x, dict_key_y, reduction,
    )  # fmt: skip
    _check_schedule(n_epochs, n_epochs_burnin, n_hypersteps, marglik_frequency, lr_hyp)
    hyper = _Hyperparameters(setup, prior_prec_init, sigma_noise_init, fix_sigma_noise, lr_hyp)
    # built before training: it checks backend, structure and hyperparameters once, and is
    # the result if no epoch takes marginal-likelihood steps
    initial_la = setup.laplace(hyper)
    optimizer = optimizer_cls(model.parameters(), **_optimizer_kwargs(optimizer_kwargs))
    scheduler = (
        None if scheduler_cls is None else scheduler_cls(optimizer, **(scheduler_kwargs or {}))
    )
    margliks: list[float] = []
    losses: list[float] = []
    best = _Best()
    epochs = tqdm(range(1, n_epochs + 1), desc="marglik_training", disable=not progress_bar)
    for epoch in epochs:
        losses.append(_train_epoch(setup, hyper, optimizer, scheduler))
        if epoch > n_epochs_burnin and epoch % marglik_frequency == 0:
            la = setup.laplace(hyper)
            la.fit(train_loader, distributed=reduction is not None)
            margliks.extend(_hyperparameter_steps(la, hyper, n_hypersteps))
            best.update(margliks[-1], model, la)
            epochs.set_postfix(loss=losses[-1], neg_log_marglik=margliks[-1])
        else:
            epochs.set_postfix(loss=losses[-1])
        logger.info("epoch %d: loss %.4g", epoch, losses[-1])
    la = best.restore(model)
    if la is None:
        la = initial_la
        la.fit(train_loader, distributed=reduction is not None)
    la.enable_backprop = bool(enable_backprop)
    model.eval()
    return la, model, margliks, losses


@dataclass
class _Setup:
    """The validated options of a run that the training and the Laplace objects share."""

    model: nn.Module
    train_loader: Any
    likelihood: Likelihood
    hessian_structure: HessianStructure
    backend: type | None
    prior_structure: PriorStructure
    temperature: float
    dict_key_x: str
    dict_key_y: str
    n_data: int
    params: list[nn.Parameter]
    reduction: RankReduction | None = None

    @classmethod
    def create(
        cls,
        model: nn.Module,
        train_loader: Any,
        likelihood: Likelihood | str,
        hessian_structure: HessianStructure | str,
        backend: type | None,
        prior_structure: PriorStructure | str,
        prior_prec_init: float | Tensor,
        sigma_noise_init: float,
        temperature: float,
        dict_key_x: str,
        dict_key_y: str,
        reduction: RankReduction | None = None,
    ) -> _Setup:
        """Parse and check the options (see :func:`marglik_training`); ``reduction`` sums
        over the ranks of a process group."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        likelihood = _parse_choice(Likelihood, likelihood, "likelihood", _LIKELIHOODS)
        structure = _parse_choice(
            HessianStructure, hessian_structure, "hessian_structure", _STRUCTURES
        )
        prior_structure = parse_enum(PriorStructure, prior_structure, "prior_structure")
        if structure == HessianStructure.KRON and prior_structure == PriorStructure.DIAG:
            raise ValueError(
                "prior_structure='diag' is not available with hessian_structure='kron' "
                "(the Kronecker factors take a scalar or layerwise prior); use 'scalar' or "
                "'layerwise'"
            )
        _check_positive("temperature", temperature)
        _check_positive("sigma_noise_init", sigma_noise_init)
        if likelihood == Likelihood.CLASSIFICATION and float(sigma_noise_init) != 1.0:
            raise ValueError(
                f"sigma_noise_init must be 1 for likelihood='classification', got "
                f"{sigma_noise_init!r}"
            )
        values = prior_prec_init if isinstance(prior_prec_init, Tensor) else [prior_prec_init]
        for value in torch.as_tensor(values).reshape(-1).tolist():
            _check_positive("prior_prec_init", value)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameters with requires_grad=True")
        if reduction is None:
            n_data = dataset_size(train_loader)
        else:
            n_data = reduction.data_size(train_loader, params[0].device)
        return cls(
            model, train_loader, likelihood, structure, backend, prior_structure,
            float(temperature), dict_key_x, dict_key_y, n_data, params, reduction,
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def laplace(self, hyper: _Hyperparameters) -> ParametricLaplace:
        """An unfitted all-weights Laplace approximation at the current hyperparameters."""
        return Laplace(
            self.model,
            self.likelihood,
            subset_of_weights=SubsetOfWeights.ALL,
            hessian_structure=self.hessian_structure,
            sigma_noise=hyper.sigma_noise().detach(),
            prior_precision=hyper.prior_precision().detach(),
            temperature=self.temperature,
            backend=self.backend,
            dict_key_x=self.dict_key_x,
            dict_key_y=self.dict_key_y,
        )

    def likelihood_factor(self, sigma_noise: Tensor) -> Tensor:
        """``c``: the factor of the mean data loss in the log joint per data point."""
        if self.likelihood == Likelihood.REGRESSION:
            return 1.0 / (2.0 * sigma_noise.square() * self.temperature)
        return torch.as_tensor(1.0 / self.temperature, device=self.device, dtype=self.dtype)


class _Hyperparameters:
    """``log prior_precision`` and (when learned) ``log sigma_noise``, with their Adam.

    Shapes:
        ``log_prior_prec``: ``(1,)``, ``(layers,)`` or ``(params,)``; ``log_sigma_noise``:
        ``()``
    """

    def __init__(
        self,
        setup: _Setup,
        prior_prec_init: float | Tensor,
        sigma_noise_init: float,
        fix_sigma_noise: bool,
        lr: float,
    ) -> None:
        sizes = [p.numel() for p in setup.params]
        prior = fix_prior_prec_structure(
            prior_prec_init,
            setup.prior_structure,
            len(sizes),
            sum(sizes),
            setup.device,
            setup.dtype,
        )
        self.log_prior_prec = prior.detach().log().requires_grad_(True)
        self._sigma_noise = torch.tensor(
            float(sigma_noise_init), device=setup.device, dtype=setup.dtype
        )
        self.learn_sigma = setup.likelihood == Likelihood.REGRESSION and not fix_sigma_noise
        self.log_sigma_noise = self._sigma_noise.log().requires_grad_(self.learn_sigma)
        learned = [self.log_prior_prec] + ([self.log_sigma_noise] if self.learn_sigma else [])
        self.optimizer = Adam(learned, lr=lr)

    def prior_precision(self) -> Tensor:
        return self.log_prior_prec.exp()

    def sigma_noise(self) -> Tensor:
        """The learned noise, or exactly ``sigma_noise_init`` when it is not learned."""
        return self.log_sigma_noise.exp() if self.learn_sigma else self._sigma_noise


class _Best:
    """The network weights and Laplace approximation with the best marginal likelihood."""

    def __init__(self) -> None:
        self.neg_marglik = math.inf
        self.state: dict[str, Tensor] | None = None
        self.la: ParametricLaplace | None = None

    def update(self, neg_marglik: float, model: nn.Module, la: ParametricLaplace) -> None:
        """Keep ``model``'s weights and ``la`` if ``neg_marglik`` is the lowest so far."""
        if neg_marglik < self.neg_marglik:
            self.neg_marglik, self.la = neg_marglik, la
            self.state = copy.deepcopy(model.state_dict())

    def restore(self, model: nn.Module) -> ParametricLaplace | None:
        """Load the best weights into ``model``; the best Laplace object (None if none)."""
        if self.state is not None:
            model.load_state_dict(self.state)
        return self.la


def _train_epoch(
    setup: _Setup, hyper: _Hyperparameters, optimizer: Optimizer, scheduler: Any
) -> float:
    """One epoch on the log joint at the current hyperparameters; the mean batch loss."""
    model = setup.model
    model.train()
    prior_prec = hyper.prior_precision().detach()
    prior_scale = 1.0 / (setup.n_data * setup.likelihood_factor(hyper.sigma_noise().detach()))
    total = torch.zeros(
        (), device=setup.device, dtype=accumulation_dtype(setup.dtype, setup.device)
    )
    for batch in setup.train_loader:
        X, y = unpack_batch(batch, setup.dict_key_x, setup.dict_key_y, setup.device)
        optimizer.zero_grad()
        data_loss = _data_loss(model(X), y, setup.likelihood)
        loss = data_loss + prior_scale * _prior_energy(setup.params, prior_prec)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total = total + loss.detach().to(total.dtype) * y.shape[0]
    if setup.reduction is not None:
        setup.reduction.sum_([total])
    return float(total) / setup.n_data


def _data_loss(f: Tensor, y: Tensor, likelihood: Likelihood) -> Tensor:
    """Mean over the batch of the cross-entropy, or of the squared error summed over outputs.

    Shapes:
        ``f``: ``(batch, outputs)``; ``y``: ``(batch,)`` class indices or ``(batch, outputs)``
        -> ``()``

    Raises:
        ValueError: If regression targets do not have the output's shape.
    """
    if likelihood == Likelihood.CLASSIFICATION:
        return F.cross_entropy(f, y)
    if y.shape != f.shape:
        raise ValueError(
            f"regression targets y must have the model output's shape {tuple(f.shape)}, got "
            f"{tuple(y.shape)}"
        )
    return (f - y).square().sum() / f.shape[0]


def _prior_energy(params: list[Tensor], prior_prec: Tensor) -> Tensor:
    """``0.5 * sum_i delta_i theta_i^2`` for a scalar, layerwise or per-parameter ``delta``.

    Shapes:
        ``prior_prec``: ``(1,)``, ``(len(params),)`` or ``(params,)`` -> ``()``
    """
    if prior_prec.numel() == 1:
        return 0.5 * prior_prec[0] * sum(p.square().sum() for p in params)
    if prior_prec.numel() == len(params):
        return 0.5 * (prior_prec @ torch.stack([p.square().sum() for p in params]))
    chunks = prior_prec.split([p.numel() for p in params])
    return 0.5 * sum((d.view_as(p) * p.square()).sum() for d, p in zip(chunks, params))


def _hyperparameter_steps(
    la: ParametricLaplace, hyper: _Hyperparameters, n_steps: int
) -> list[float]:
    """``n_steps`` Adam steps on ``-la.log_marginal_likelihood``; the value before each.

    ``la`` keeps the hyperparameters of the last evaluation (detached), so its marginal
    likelihood is the last value returned.
    """
    values = []
    for _ in range(n_steps):
        hyper.optimizer.zero_grad()
        sigma_noise = hyper.sigma_noise() if hyper.learn_sigma else None
        neg_marglik = -la.log_marginal_likelihood(hyper.prior_precision(), sigma_noise)
        neg_marglik.backward()
        hyper.optimizer.step()
        values.append(neg_marglik.detach())
    la.prior_precision = la.prior_precision.detach()
    la.sigma_noise = la.sigma_noise.detach()
    return torch.stack(values).tolist()


def _optimizer_kwargs(optimizer_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``optimizer_kwargs`` with any weight decay set to 0 (warned about)."""
    kwargs = dict(optimizer_kwargs or {})
    if kwargs.get("weight_decay", 0.0):
        warnings.warn(
            "marglik_training learns the prior precision, which is the weight decay: "
            f"optimizer_kwargs weight_decay={kwargs['weight_decay']!r} is replaced by 0",
            stacklevel=3,
        )
    if "weight_decay" in kwargs:
        kwargs["weight_decay"] = 0.0
    return kwargs


def _check_schedule(
    n_epochs: int, n_epochs_burnin: int, n_hypersteps: int, marglik_frequency: int, lr_hyp: float
) -> None:
    """Raise ``ValueError`` for counts out of range or a non-positive ``lr_hyp``."""
    counts = (
        ("n_epochs", n_epochs, 1),
        ("n_epochs_burnin", n_epochs_burnin, 0),
        ("n_hypersteps", n_hypersteps, 1),
        ("marglik_frequency", marglik_frequency, 1),
    )
    for name, value, low in counts:
        if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    _check_positive("lr_hyp", lr_hyp)


def _check_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive finite number."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _parse_choice(enum_cls: type, value: object, name: str, accepted: tuple) -> Any:
    """``value`` as a member of ``enum_cls`` among ``accepted``, or a ``ValueError``."""
    try:
        member = enum_cls(value)
    except ValueError:
        member = None
    if member not in accepted:
        names = ", ".join(repr(m.value) for m in accepted)
        raise ValueError(f"{name} must be one of {names} for marglik_training; got {value!r}")
    return member
