"""VaLLA: the variational linearised Laplace approximation with inducing outputs.

The linearised network is a Gaussian process centred on the trained network,
``f ~ GP(f(x; theta*), k)`` with ``k(x, x') = J(x) P0^-1 J(x')^T`` and a scalar prior
precision ``P0 = lambda I``. VaLLA keeps the network output as the posterior mean and fits a
Gaussian ``q(u) = N(0, S)`` to the GP values ``u`` (relative to the network output) at ``M``
inducing points ``Z``, each point paired with one output (``inducing_classes``). ``S`` is
parametrised by a lower-triangular ``L``, ``A = L L^T`` acting as a precision of pseudo
observations of ``u`` (the decoupled parametrisation of Cheng & Boots, 2017):

    ``S = K_ZZ - K_ZZ (K_ZZ + A^-1)^-1 K_ZZ``,
    ``Cov[f*] = k** - k*Z K_ZZ^-1 (K_ZZ - S) K_ZZ^-1 kZ* = k** - k*Z L B^-1 L^T kZ*``,
    ``B = I + L^T K_ZZ L = R R^T``,                    (so ``K_ZZ`` may be singular)
    ``KL(q(u) || p(u)) = sum log diag R - (M - ||R^-1||_F^2) / 2``.

``fit`` minimises ``-(N / batch) sum_n E_alpha[log p(y_n | f_n)] / T + KL`` with Adam over
``L``, ``log lambda``, the log noise variance (regression) and ``Z`` (floating tensor inputs),
where ``E_alpha = (1/alpha) log E_q[p(y|f)^alpha]`` is the power (alpha-divergence) data term:
``alpha = 0`` is the expected log likelihood (the ELBO), ``alpha = 1`` (the default) the log
predictive likelihood. Regression has it in closed form; classification averages
``mc_softmax_samples`` reparametrised samples, or, with none, takes
``log softmax(f / sqrt(1 + pi/8 var))_y`` (probit, the same for every ``alpha``).

Cost per step for a batch of ``B`` inputs and ``C`` outputs with ``P`` parameters: the
Jacobians at the batch and (when ``Z`` is trained; otherwise once) at the ``M`` inducing
points, ``O((M + B C) M P + M^3)`` time and ``O((M + B C) P)`` memory. Predictions cost the
same per batch; the factor ``R`` is kept between them.

References:
    Ortega, Rodríguez-Santana, Hernández-Lobato. Variational linearized Laplace approximation
    for Bayesian deep learning. ICML 2024. Cheng & Boots. Variational inference for Gaussian
    process models with linear complexity. NeurIPS 2017. Li & Gal. Dropout inference in
    Bayesian neural networks with alpha-divergences. ICML 2017.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from contextlib import suppress
from numbers import Integral, Real
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from laplace.functional.base import BaseFunctionalLaplace, check_seed, copy_history, is_count
from laplace.functional.inducing import (
    InducingPosterior,
    choose_inducing,
    copy_inputs,
    parse_inducing,
)
from laplace.functional.variational import (
    TrainableHyperparameters,
    alpha_log_likelihood,
    fresh_parameter,
    targets,
)
from laplace.utils.data import Inputs, dataset_size
from laplace.utils.distributed import refuse_across_ranks
from laplace.utils.enums import Likelihood

__all__ = ["VaLLA"]


class _Schedule(NamedTuple):
    """The optimisation options of :meth:`VaLLA.fit`."""

    iterations: int
    lr: float
    val_loader: Any
    val_steps: int | None
    progress_bar: bool


class VaLLA(TrainableHyperparameters, BaseFunctionalLaplace):
    """Variational linearised Laplace with inducing outputs; see the module docstring.

    ``model``, ``likelihood``, ``sigma_noise``, ``prior_precision``, ``prior_mean``,
    ``temperature``, ``enable_backprop``, ``dict_key_x``, ``dict_key_y``, ``backend``,
    ``backend_kwargs`` are as for :class:`~laplace.base.BaseLaplace`; ``prior_precision`` must
    be a scalar and ``prior_mean`` zero. ``sigma_noise`` and ``prior_precision`` are initial
    values.

    Args:
        inducing_locations: Inputs ``(M, ...)`` (floating tensors are optimised; integer
            tensors and dict-like batches stay fixed), or ``"random"`` / ``"kmeans"`` to
            choose ``num_inducing`` training inputs in ``fit`` (k-means: the training input
            nearest to each of ``num_inducing`` centres), reproducibly from ``seed``.
        num_inducing: ``M``; required for a strategy, must match explicit inputs.
        inducing_classes: The output each inducing point is for, ``(M,)`` (default 0); the
            strategies take the training labels for classification and 0 otherwise.
        seed: Seed of the inducing choice and of the Monte Carlo draws (``generator``).
        alpha: The alpha-divergence parameter in ``[0, 1]`` (0: the ELBO).
        mc_softmax_samples: Monte Carlo draws of the classification data term (0: probit);
            positive whenever ``alpha != 1`` for classification or reward modelling.

    Attributes:
        L: Packed lower triangle of the variational factor, ``(M (M + 1) / 2,)``.
        log_prior_precision: ``log lambda``, ``(1,)``. log_noise_variance: ``log sigma^2``
            (regression; else None). Set ``requires_grad_(False)`` on either, or on a
            tensor ``inducing_locations``, to keep it fixed in ``fit(override=False)``.
        fit_history_: ``"objective"`` per step and ``"val_nll"`` per validation.

    Raises:
        ValueError: For arguments outside the ranges above, naming the argument.
    """

    _no_marginal_likelihood = (
        "VaLLA has no Laplace marginal likelihood: fit() maximises its variational "
        "(alpha-divergence) objective, recorded in fit_history_['objective'], and learns "
        "prior_precision and sigma_noise with it; to compare settings use a validation "
        "set (fit(val_loader=...), fit_history_['val_nll'])"
    )
    _no_log_likelihood = (
        "VaLLA tracks its variational objective (fit_history_['objective']), not the "
        "training log likelihood"
    )

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        inducing_locations: Tensor | MutableMapping | str,
        num_inducing: int | None = None,
        inducing_classes: Tensor | None = None,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        alpha: float = 1.0,
        mc_softmax_samples: int = 0,
    ) -> None:
        _check_options(seed, alpha, mc_softmax_samples)
        self.seed, self.alpha = int(seed), float(alpha)
        self.mc_softmax_samples = mc_softmax_samples
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
        )
        if self.likelihood != Likelihood.REGRESSION and alpha != 1 and mc_softmax_samples == 0:
            raise ValueError(
                f"alpha={alpha!r} needs mc_softmax_samples > 0 for likelihood="
                f"{self.likelihood.value!r}: the probit data term does not depend on alpha"
            )
        self.generator = torch.Generator(device=self._device).manual_seed(self.seed)
        self._init_inducing(inducing_locations, num_inducing, inducing_classes)
        self._init_variational_factor()
        self.fit_history_: dict[str, list[float]] = {"objective": [], "val_nll": []}
        self._fitted_once = False
        self._jacobian_cache: tuple[list[tuple[Tensor, int]], Tensor] | None = None

    # ----------------------------------------------------------------- inducing points
    def _init_inducing(self, locations: Any, num_inducing: Any, classes: Any) -> None:
        strategy, inputs, M, classes = parse_inducing(
            locations, num_inducing, classes, self.dict_key_x, self._device, self._dtype
        )
        self._inducing_strategy, self.num_inducing = strategy, M
        self._initial_inducing_locations = inputs
        self.inducing_locations = None if inputs is None else self._as_locations(inputs)
        self.inducing_classes = self._initial_inducing_classes = classes

    def _copy_inputs(self, inputs: Inputs) -> Inputs:
        return copy_inputs(inputs, self._device, self._dtype)

    def _as_locations(self, inputs: Inputs) -> Inputs:
        """Floating tensor inputs as a trainable parameter; others as fixed copies."""
        copied = self._copy_inputs(inputs)
        return (
            nn.Parameter(copied)
            if isinstance(copied, Tensor) and copied.is_floating_point()
            else copied
        )

    def _init_variational_factor(self) -> None:
        """``L = I``: ``q(u)`` starts at the exact posterior for unit-precision pseudo data."""
        M = self.num_inducing
        rows, cols = torch.tril_indices(M, M)
        self.L = nn.Parameter((rows == cols).to(self._accumulation_dtype).to(self._device))

    def _factor(self) -> Tensor:
        """The lower-triangular ``(M, M)`` factor from its packed entries ``L``."""
        M = self.num_inducing
        rows, cols = torch.tril_indices(M, M, device=self.L.device)
        return self.L.new_zeros(M, M).index_put((rows, cols), self.L)

    def _inducing_jacobians(self) -> Tensor:
        """Jacobians of the selected outputs at the inducing points, ``(M, params)``, in the
        accumulation dtype; differentiable in trainable ``inducing_locations``."""
        Z, classes = self.inducing_locations, self.inducing_classes
        trainable = isinstance(Z, Tensor) and Z.requires_grad
        tensors = self._inducing_tensors()
        if not trainable and _unchanged(self._jacobian_cache, tensors):
            return self._jacobian_cache[1]
        Js, _ = self.backend.jacobians(Z, enable_backprop=trainable)
        if classes.max() >= Js.shape[1]:
            raise ValueError(
                f"inducing_classes must be below the {Js.shape[1]} outputs at the inducing "
                f"points, got {classes.max().item()}"
            )
        index = classes[:, None, None].expand(-1, 1, Js.shape[2])
        J_Z = Js.gather(1, index)[:, 0].to(self._accumulation_dtype)
        if not trainable:
            self._jacobian_cache = ([(t, t._version) for t in tensors], J_Z.detach())
        return J_Z

    def _inducing_tensors(self) -> list[Tensor]:
        """The tensors the inducing Jacobians depend on (their identity and version)."""
        Z = self.inducing_locations
        tensors = [self.inducing_classes, *(Z.values() if isinstance(Z, MutableMapping) else [Z])]
        return [t for t in tensors if isinstance(t, Tensor)]

    def _posterior_now(self) -> InducingPosterior:
        """``q(u)`` at the current parameters, on the autograd graph."""
        prior = self.log_prior_precision.exp().reshape(())
        return InducingPosterior(self._inducing_jacobians(), self._factor(), prior)

    @property
    def posterior(self) -> InducingPosterior:
        """``q(u)`` at the current parameters, detached (kept while they are unchanged)."""
        self._check_fitted()
        tensors = [self.L, self.log_prior_precision, *self._inducing_tensors()]
        if not _unchanged(self._posterior_cache, tensors):
            with torch.no_grad():
                posterior = self._posterior_now()
            self._posterior_cache = ([(t, t._version) for t in tensors], posterior)
        return self._posterior_cache[1]

    # ----------------------------------------------------------------- predictive
    def _moments_from(self, Js: Tensor, f_mu: Tensor, joint: bool) -> tuple[Tensor, Tensor]:
        posterior = self.posterior
        cov = posterior.covariance(Js, joint)
        dtype = cov.dtype if posterior.precise_results else f_mu.dtype
        return (f_mu.reshape(-1) if joint else f_mu), cov.to(dtype)

    # ----------------------------------------------------------------- objective
    def _objective(self, X: Inputs, y: Tensor) -> Tensor:
        """``-(N / batch) sum_n E_alpha[log p(y_n | f_n)] / T + KL`` for one batch, a scalar
        in the accumulation dtype, differentiable in the variational parameters."""
        Js, f = self.backend.jacobians(X, enable_backprop=False)
        posterior = self._posterior_now()
        f_mu, f_cov = f.to(posterior.K.dtype), posterior.covariance(Js, joint=False)
        noise = None if self.log_noise_variance is None else self.log_noise_variance.exp()
        data = alpha_log_likelihood(
            self.likelihood, f_mu, f_cov, targets(y, f, self.likelihood), self.alpha, noise,
            self.mc_softmax_samples, self.generator,
        )  # fmt: skip
        return -(self.n_data / len(f)) * data / self.temperature + posterior.kl()

    # ----------------------------------------------------------------- fit
    def fit(
        self,
        train_loader: Any,
        *,
        iterations: int = 100,
        lr: float = 1e-3,
        val_loader: Any = None,
        val_steps: int | None = None,
        progress_bar: bool = False,
        override: bool = True,
        distributed: bool | None = None,
    ) -> None:
        """Optimise ``q(u)``, the inducing points and the hyperparameters with Adam.

        Each of ``iterations`` steps takes the next batch of ``train_loader`` (cycling).
        ``override=True`` (re)chooses the inducing points and resets ``L`` (the
        hyperparameters continue from their current values); ``override=False`` continues
        the previous fit. With ``val_loader`` the predictive NLL is recorded in
        ``fit_history_["val_nll"]`` every ``val_steps`` steps and at the end. A fit that
        raises leaves the object as it was.

        ``distributed`` must resolve to a fit per rank: False, or None without a
        ``torch.distributed`` process group of several ranks (VaLLA does not sum its fit
        over ranks).

        Raises:
            ValueError: For non-positive ``iterations``, ``lr`` or ``val_steps``, inducing
                points or classes that do not fit the data, bad batches, and within a process
                group of several ranks unless ``distributed=False``.
        """
        refuse_across_ranks(
            type(self).__name__,
            distributed,
            "its optimisation would need gradients averaged over the ranks at every step",
        )
        if not is_count(iterations):
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        if isinstance(lr, bool) or not isinstance(lr, Real) or not 0 < lr < math.inf:
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if val_steps is not None and not is_count(val_steps):
            raise ValueError(f"val_steps must be a positive integer or None, got {val_steps!r}")
        schedule = _Schedule(iterations, lr, val_loader, val_steps, progress_bar)
        with self._unchanged_on_failure():
            self._fit(train_loader, override, schedule)

    def _fit(self, train_loader: Any, override: bool, schedule: _Schedule) -> None:
        """:meth:`fit` after its checks: reset or continue, then optimise."""
        n_data = dataset_size(train_loader)
        self.model.eval()
        first = next(iter(train_loader), None)
        if first is None:
            raise ValueError("train_loader yielded no batches")
        X, _ = self._checked_batch(first, first=True)
        with torch.no_grad():
            self.n_outputs = self.model(X).shape[-1]
        self.generator = _copy_generator(self.generator)
        for name in ("L", "log_prior_precision", "log_noise_variance", "inducing_locations"):
            value = getattr(self, name)  # fresh copies: the saved state is never stepped on
            if isinstance(value, nn.Parameter):
                setattr(self, name, fresh_parameter(value, value))
        if override or not self._fitted_once:
            if self._inducing_strategy is not None:
                keys = (self.dict_key_x, self.dict_key_y)
                Z, self.inducing_classes = choose_inducing(
                    train_loader, self._inducing_strategy, self.num_inducing, self.seed,
                    self.likelihood, keys, self._device,
                )  # fmt: skip
                self.inducing_locations = self._as_locations(Z)
            else:
                self.inducing_locations = self._as_locations(self._initial_inducing_locations)
                self.inducing_classes = self._initial_inducing_classes
            self._init_variational_factor()
            self.fit_history_ = {"objective": [], "val_nll": []}
        else:
            self.fit_history_ = copy_history(self.fit_history_)
        self.mean, self.n_data, self._posterior_cache = self.subset.mean(), n_data, None
        self._optimise(train_loader, schedule)
        self._fitted_once, self._posterior_cache = True, None

    def _optimise(self, train_loader: Any, schedule: _Schedule) -> None:
        """``schedule.iterations`` Adam steps on the trainable parameters, cycling the loader."""
        iterations, _, val_loader, val_steps, _ = schedule
        trained = [
            self.L,
            self.log_prior_precision,
            self.log_noise_variance,
            self.inducing_locations,
        ]
        trained = [t for t in trained if isinstance(t, nn.Parameter) and t.requires_grad]
        optimizer = torch.optim.Adam(trained, lr=schedule.lr) if trained else None
        batches = iter(train_loader)
        for step in tqdm(range(iterations), desc="fit VaLLA", disable=not schedule.progress_bar):
            batch = next(batches, None)
            if batch is None:
                batches = iter(train_loader)
                batch = next(batches)
            X, y = self._checked_batch(batch, first=False)
            objective = self._objective(X, y)
            if not torch.isfinite(objective):
                raise ValueError(f"the VaLLA objective is {objective.item()} at step {step}")
            if optimizer is not None:  # gradients of these only, not into the model's .grad
                grads = torch.autograd.grad(objective, trained, allow_unused=True)
                for tensor, grad in zip(trained, grads):
                    tensor.grad = grad
                optimizer.step()
            self.fit_history_["objective"].append(objective.item())
            if val_loader is not None and val_steps and (step + 1) % val_steps == 0:
                self.fit_history_["val_nll"].append(self._validation_nll(val_loader))
        for tensor in trained:
            tensor.grad = None
        if val_loader is not None and (not val_steps or iterations % val_steps):
            self.fit_history_["val_nll"].append(self._validation_nll(val_loader))

    @torch.no_grad()
    def _validation_nll(self, val_loader: Any) -> float:
        """Mean predictive NLL: the ``alpha = 1`` data term without sampling (regression
        with the noise, classification by probit)."""
        total, count, acc = 0.0, 0, self._accumulation_dtype
        noise = None if self.log_noise_variance is None else self.log_noise_variance.exp()
        for X, y in self._batches(val_loader):
            f_mu, f_cov = (m.to(acc) for m in self.predictive_moments(X))
            y = targets(y, f_mu, self.likelihood)
            log_lik = alpha_log_likelihood(self.likelihood, f_mu, f_cov, y, 1.0, noise)
            total, count = total - log_lik.item(), count + len(y)
        return total / count

    # ----------------------------------------------------------------- not applicable
    def optimize_prior_precision(self, *args: Any, **kwargs: Any) -> None:
        """Not available, as in laplace-torch.

        Raises:
            NotImplementedError: Always: ``fit`` already optimises the prior precision.
        """
        raise NotImplementedError(
            "VaLLA learns prior_precision in fit() together with q(u) (see "
            "fit_history_['objective']); set it as a starting value with "
            "la.prior_precision = value, or pass val_loader to fit to monitor the NLL"
        )

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and strings that restore the fitted approximation."""
        self._check_fitted()
        log_noise = self.log_noise_variance
        return {
            **self._state_identity({"num_inducing": self.num_inducing}),
            "inducing_strategy": self._inducing_strategy,
            "inducing_locations": _detached(self.inducing_locations),
            "inducing_classes": self.inducing_classes.clone(),
            "initial_inducing_locations": _detached(self._initial_inducing_locations),
            "initial_inducing_classes": self._initial_inducing_classes.clone(),
            "L": self.L.detach().clone(),
            "log_prior_precision": self.log_prior_precision.detach().clone(),
            "log_noise_variance": None if log_noise is None else log_noise.detach().clone(),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "mc_softmax_samples": self.mc_softmax_samples,
            "seed": self.seed,
            "generator_state": self.generator.get_state(),
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "fit_history": copy_history(self.fit_history_),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted approximation saved by :meth:`state_dict`.

        Raises:
            ValueError: If it was saved from another class, likelihood, model or number of
                inducing points.
        """
        self._check_state(state_dict, {"num_inducing": self.num_inducing})
        acc, device = self._accumulation_dtype, self._device
        self._inducing_strategy = state_dict["inducing_strategy"]
        self.inducing_locations = self._as_locations(state_dict["inducing_locations"])
        self.inducing_classes = state_dict["inducing_classes"].to(device)
        initial = state_dict["initial_inducing_locations"]
        self._initial_inducing_locations = None if initial is None else self._copy_inputs(initial)
        self._initial_inducing_classes = state_dict["initial_inducing_classes"].to(device)
        self.L = nn.Parameter(state_dict["L"].to(device=device, dtype=acc))
        log_prior = state_dict["log_prior_precision"].to(device=device, dtype=acc)
        self.log_prior_precision = nn.Parameter(log_prior)
        log_noise = state_dict["log_noise_variance"]
        if log_noise is not None:
            self.log_noise_variance = nn.Parameter(log_noise.to(device=device, dtype=acc))
        self.temperature, self.alpha = state_dict["temperature"], state_dict["alpha"]
        self.mc_softmax_samples, self.seed = state_dict["mc_softmax_samples"], state_dict["seed"]
        self.generator = _generator_from(state_dict["generator_state"], self.seed, device)
        self.n_data, self.n_outputs = state_dict["n_data"], state_dict["n_outputs"]
        self.fit_history_ = copy_history(state_dict["fit_history"])
        self.mean, self._fitted_once, self._posterior_cache = self.subset.mean(), True, None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["generator"] = self.generator.get_state()
        state["_jacobian_cache"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.generator = _generator_from(state["generator"], self.seed, self._device)


# --------------------------------------------------------------------- helpers
def _check_options(seed: Any, alpha: Any, mc_softmax_samples: Any) -> None:
    check_seed(seed, Integral)
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1] (0: the ELBO), got {alpha!r}")
    if not is_count(mc_softmax_samples, minimum=0):
        raise ValueError(
            f"mc_softmax_samples must be a non-negative integer, got {mc_softmax_samples!r}"
        )


def _unchanged(cache: tuple[list[tuple[Tensor, int]], Any] | None, tensors: list[Tensor]) -> bool:
    """Whether ``cache`` was computed from exactly these ``tensors`` at their versions."""
    if cache is None or len(cache[0]) != len(tensors):
        return False
    return all(t is old and t._version == v for t, (old, v) in zip(tensors, cache[0]))


def _detached(inputs: Inputs | None) -> Inputs | None:
    return None if inputs is None else copy_inputs(inputs, None, None)


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _generator_from(state: Tensor, seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` with ``state`` (re-seeded when the state is another device
    type's, as after ``torch.load(map_location=...)``)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with suppress(RuntimeError):
        generator.set_state(state.cpu())
    return generator
