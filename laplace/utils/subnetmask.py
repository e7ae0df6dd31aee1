"""Ways to choose the subnetwork of a subnetwork Laplace approximation.

A :class:`SubnetMask` marks entries of the flat vector of a model's trainable parameters
(``requires_grad=True``, ``named_parameters`` order); :meth:`SubnetMask.select` turns the
mask into the ``subnetwork_indices`` of :class:`~laplace.subnetlaplace.SubnetLaplace`, once
per mask object. Score-based masks keep the ``n_params_subnet`` parameters with the largest
score: uniformly random, largest magnitude, or largest marginal variance under a diagonal
Laplace or diagonal SWAG posterior (Daxberger et al., ICML 2021). Name-based masks keep whole
parameter tensors, modules, or the last layer.

Reference:
    Daxberger, Nalisnick, Allingham, Antorán, Hernández-Lobato. Bayesian deep learning via
    subnetwork inference. ICML, 2021.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from laplace.errors import HyperparameterTypeError, UnknownNameError
from laplace.utils.data import unpack_batch
from laplace.utils.enums import Likelihood, parse_enum
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.swag import fit_diagonal_swag_var

__all__ = [
    "SubnetMask",
    "ScoreBasedSubnetMask",
    "RandomSubnetMask",
    "LargestMagnitudeSubnetMask",
    "LargestVarianceDiagLaplaceSubnetMask",
    "LargestVarianceSWAGSubnetMask",
    "ParamNameSubnetMask",
    "ModuleNameSubnetMask",
    "LastLayerSubnetMask",
]


SubnetNameError = UnknownNameError


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class SubnetMask(ABC):
    """Base class of subnetwork masks; subclasses implement :meth:`get_subnet_mask`.

    Args:
        model: The trained network.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If it has no parameters with ``requires_grad=True``.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not _trainable(model):
            raise ValueError("model has no parameters with requires_grad=True")
        self.model = model
        self._indices: Tensor | None = None

    @property
    def parameter_vector(self) -> Tensor:
        """The current trainable parameters as a detached flat vector, ``(params,)``."""
        return torch.cat([p.detach().reshape(-1) for p in _trainable(self.model).values()])

    @property
    def n_params(self) -> int:
        """Number of trainable parameters of the model."""
        return sum(p.numel() for p in _trainable(self.model).values())

    @property
    def indices(self) -> Tensor:
        """The selected subnetwork indices, sorted.

        Raises:
            AttributeError: Before :meth:`select`.
        """
        if self._indices is None:
            raise AttributeError(
                f"{type(self).__name__} has not selected a subnetwork yet: call select() first"
            )
        return self._indices

    @property
    def n_params_subnet(self) -> int:
        """Number of selected parameters.

        Raises:
            AttributeError: Before :meth:`select`, for masks whose size is not fixed upfront.
        """
        return self.indices.numel()

    def select(self, train_loader: Iterable | None = None) -> Tensor:
        """Select the subnetwork; only once per mask object.

        Args:
            train_loader: Data for masks that need it (variance-based, last layer).

        Returns:
            The indices of the subnetwork in the trainable-parameter vector, sorted.

        Shapes:
            ``-> (n_params_subnet,)``

        Raises:
            ValueError: If this mask has already selected a subnetwork, or from the mask.
        """
        if self._indices is not None:
            raise ValueError(
                f"{type(self).__name__} has already selected a subnetwork; read .indices or "
                "create a new mask to select again"
            )
        self._indices = self.convert_subnet_mask_to_indices(self.get_subnet_mask(train_loader))
        return self._indices

    @abstractmethod
    def get_subnet_mask(self, train_loader: Iterable | None) -> Tensor:
        """A mask over the trainable-parameter vector, ``(params,)``, true where selected."""

    def convert_subnet_mask_to_indices(self, subnet_mask: Tensor) -> Tensor:
        """The indices of the selected entries of a boolean or 0/1 mask.

        Shapes:
            ``(params,) -> (n_params_subnet,)``

        Raises:
            ValueError: If ``subnet_mask`` is not a 1-d boolean or 0/1 integer tensor of
                length ``n_params`` that selects at least one parameter.
        """
        if not isinstance(subnet_mask, Tensor):
            raise ValueError(
                f"subnet_mask must be a torch.Tensor, got {type(subnet_mask).__name__}"
            )
        if subnet_mask.is_floating_point() or subnet_mask.is_complex():
            raise ValueError(f"subnet_mask must be boolean or integer, got {subnet_mask.dtype}")
        if subnet_mask.shape != (self.n_params,):
            raise ValueError(
                f"subnet_mask must have shape ({self.n_params},), got {tuple(subnet_mask.shape)}"
            )
        if subnet_mask.dtype != torch.bool:
            if ((subnet_mask != 0) & (subnet_mask != 1)).any():
                raise ValueError("an integer subnet_mask must contain only 0 and 1")
            subnet_mask = subnet_mask.bool()
        if not subnet_mask.any():
            raise ValueError("subnet_mask must select at least one parameter, got none")
        return subnet_mask.nonzero().flatten()


class ScoreBasedSubnetMask(SubnetMask):
    """Keep the ``n_params_subnet`` parameters with the largest scores.

    Subclasses implement :meth:`compute_param_scores`.

    Args:
        model: The trained network.
        n_params_subnet: Number of parameters to keep.

    Raises:
        HyperparameterTypeError: If ``n_params_subnet`` is not an integer (``None``
            included); it is a ``TypeError`` and a ``ValueError``.
        ValueError: If it is not in ``[1, n_params]``.
    """

    def __init__(self, model: nn.Module, n_params_subnet: int) -> None:
        super().__init__(model)
        if isinstance(n_params_subnet, bool) or not isinstance(n_params_subnet, int):
            raise HyperparameterTypeError(
                f"n_params_subnet must be an int, got {type(n_params_subnet).__name__}"
            )
        if not 1 <= n_params_subnet <= self.n_params:
            raise ValueError(
                f"n_params_subnet must be between 1 and the model's {self.n_params} trainable "
                f"parameters, got {n_params_subnet}"
            )
        self._n_params_subnet = n_params_subnet

    @property
    def n_params_subnet(self) -> int:
        return self._n_params_subnet

    @abstractmethod
    def compute_param_scores(self, train_loader: Iterable | None) -> Tensor:
        """One score per trainable parameter, ``(params,)``."""

    def get_subnet_mask(self, train_loader: Iterable | None) -> Tensor:
        scores = self.compute_param_scores(train_loader)
        if scores.shape != (self.n_params,):
            raise ValueError(
                f"parameter scores must have shape ({self.n_params},), got {tuple(scores.shape)}"
            )
        top = scores.topk(self._n_params_subnet).indices
        mask = torch.zeros(self.n_params, dtype=torch.bool, device=scores.device)
        return mask.index_fill(0, top, True)


class RandomSubnetMask(ScoreBasedSubnetMask):
    """A uniformly random subnetwork (from the global torch random state)."""

    def compute_param_scores(self, train_loader: Iterable | None) -> Tensor:
        reference = self.parameter_vector
        return torch.rand(reference.shape, device=reference.device, dtype=reference.dtype)


class LargestMagnitudeSubnetMask(ScoreBasedSubnetMask):
    """The parameters with the largest absolute values."""

    def compute_param_scores(self, train_loader: Iterable | None) -> Tensor:
        return self.parameter_vector.abs()


class LargestVarianceDiagLaplaceSubnetMask(ScoreBasedSubnetMask):
    """The parameters with the largest marginal variance under a diagonal Laplace posterior.

    Args:
        model: The trained network.
        n_params_subnet: Number of parameters to keep.
        diag_laplace_model: A Laplace approximation over all weights of ``model`` with a
            ``posterior_variance``, e.g. a :class:`~laplace.baselaplace.DiagLaplace`. It is
            fitted on the ``train_loader`` given to :meth:`select`; without one it must be
            fitted already.

    Raises:
        TypeError: If ``diag_laplace_model`` is no Laplace approximation with a
            ``posterior_variance``.
        ValueError: If it does not cover exactly the trainable parameters of ``model``.
    """

    def __init__(self, model: nn.Module, n_params_subnet: int, diag_laplace_model: Any) -> None:
        super().__init__(model, n_params_subnet)
        if not callable(getattr(diag_laplace_model, "fit", None)) or not hasattr(
            type(diag_laplace_model), "posterior_variance"
        ):
            raise TypeError(
                "diag_laplace_model must be a Laplace approximation with a posterior_variance "
                f"(e.g. DiagLaplace), got {type(diag_laplace_model).__name__}"
            )
        if diag_laplace_model.n_params != self.n_params:
            raise ValueError(
                f"diag_laplace_model must cover all {self.n_params} trainable parameters of the "
                f"model, it has {diag_laplace_model.n_params}"
            )
        self.diag_laplace_model = diag_laplace_model

    def compute_param_scores(self, train_loader: Iterable | None) -> Tensor:
        if train_loader is not None:
            self.diag_laplace_model.fit(train_loader)
        elif getattr(self.diag_laplace_model, "n_data", None) is None:
            raise ValueError(
                "select() needs a train_loader to fit diag_laplace_model, which is not fitted"
            )
        return self.diag_laplace_model.posterior_variance.detach()


class LargestVarianceSWAGSubnetMask(ScoreBasedSubnetMask):
    """The parameters with the largest diagonal SWAG variance (Maddox et al., 2019).

    Args:
        model: The trained network; it is not changed (SWAG trains a copy).
        n_params_subnet: Number of parameters to keep.
        likelihood: ``"classification"`` (cross-entropy) or ``"regression"`` (squared
            error) for the SGD loss, averaged over the batch.
        swag_n_snapshots: Number of SWAG snapshots.
        swag_snapshot_freq: Epochs between snapshots.
        swag_lr: SGD learning rate.

    Raises:
        ValueError: For another likelihood, or non-positive SWAG settings.
    """

    def __init__(
        self,
        model: nn.Module,
        n_params_subnet: int,
        likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
        swag_n_snapshots: int = 40,
        swag_snapshot_freq: int = 1,
        swag_lr: float = 0.01,
    ) -> None:
        super().__init__(model, n_params_subnet)
        self.likelihood = parse_enum(Likelihood, likelihood, "likelihood")
        if self.likelihood == Likelihood.REWARD_MODELING:
            raise ValueError(
                "likelihood must be 'classification' or 'regression' for SWAG, got "
                f"{self.likelihood.value!r}"
            )
        for name, value in (
            ("swag_n_snapshots", swag_n_snapshots),
            ("swag_snapshot_freq", swag_snapshot_freq),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(swag_lr, bool) or not isinstance(swag_lr, Real) or swag_lr <= 0:
            raise ValueError(f"swag_lr must be a positive number, got {swag_lr!r}")
        self.swag_n_snapshots = swag_n_snapshots
        self.swag_snapshot_freq = swag_snapshot_freq
        self.swag_lr = swag_lr

    def compute_param_scores(self, train_loader: Iterable | None) -> Tensor:
        if train_loader is None:
            raise ValueError("select() needs a train_loader to run SWAG")
        criterion = (
            nn.MSELoss() if self.likelihood == Likelihood.REGRESSION else nn.CrossEntropyLoss()
        )
        return fit_diagonal_swag_var(
            self.model,
            train_loader,
            criterion,
            n_snapshots_total=self.swag_n_snapshots,
            snapshot_freq=self.swag_snapshot_freq,
            lr=self.swag_lr,
        )


def _check_names(names: object, argument: str) -> list[str]:
    """``names`` as a non-empty list of distinct strings.

    Raises:
        TypeError: If ``names`` is a string or not a sequence of strings.
        ValueError: If it is empty or has duplicates.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{argument} must be a list of strings, got {type(names).__name__}")
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"{argument} must contain only strings, got {bad!r}")
    if not names:
        raise ValueError(f"{argument} must not be empty")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"{argument} must be distinct, got duplicates {duplicated}")
    return list(names)


def _mask_of(model: nn.Module, selected: list[nn.Parameter]) -> Tensor:
    """Mask over the trainable-parameter vector that is true on the tensors ``selected``."""
    chosen = {id(p) for p in selected}
    parts = [
        torch.full((p.numel(),), id(p) in chosen, dtype=torch.bool, device=p.device)
        for p in _trainable(model).values()
    ]
    return torch.cat(parts)


def _named_parameters(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """The trainable parameters called ``names``.

    Raises:
        SubnetNameError: For names that are no parameters of ``model``.
        ValueError: For parameters with ``requires_grad=False``.
    """
    known = dict(model.named_parameters())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SubnetNameError(
            f"parameter_names {unknown} are not parameters of the model; its parameters: "
            f"{list(known)}"
        )
    frozen = [name for name in names if not known[name].requires_grad]
    if frozen:
        raise ValueError(
            f"parameter_names {frozen} have requires_grad=False and are not part of the "
            "Laplace parameter vector"
        )
    return [known[name] for name in names]


def _module_parameters(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """The trainable parameters of the modules called ``names`` (with their submodules).

    Raises:
        SubnetNameError: For names that are no modules of ``model``.
        ValueError: For modules without trainable parameters.
    """
    known = dict(model.named_modules())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SubnetNameError(
            f"module_names {unknown} are not modules of the model; its modules: "
            f"{[name for name in known if name]}"
        )
    selected = []
    for name in names:
        params = [p for p in known[name].parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"module {name!r} has no parameters with requires_grad=True")
        selected.extend(params)
    return selected


class ParamNameSubnetMask(SubnetMask):
    """Whole parameter tensors, by their names in ``model.named_parameters()``.

    Args:
        model: The trained network.
        parameter_names: Names of trainable parameters, e.g. ``["2.weight", "2.bias"]``.

    Raises:
        TypeError: If ``parameter_names`` is not a list of strings.
        ValueError: If it is empty, has duplicates or names frozen parameters.
        SubnetNameError: A ``KeyError`` and ``ValueError``, for names that are no parameters
            of the model.
    """

    def __init__(self, model: nn.Module, parameter_names: Sequence[str]) -> None:
        super().__init__(model)
        self.parameter_names = _check_names(parameter_names, "parameter_names")
        _named_parameters(model, self.parameter_names)

    def get_subnet_mask(self, train_loader: Iterable | None) -> Tensor:
        return _mask_of(self.model, _named_parameters(self.model, self.parameter_names))


class ModuleNameSubnetMask(SubnetMask):
    """All trainable parameters of modules, by their names in ``model.named_modules()``.

    A module's parameters include those of its submodules.

    Args:
        model: The trained network.
        module_names: Names of modules, e.g. ``["layer.1", "layer.3"]``.

    Raises:
        TypeError: If ``module_names`` is not a list of strings.
        ValueError: If it is empty, has duplicates or names a module without trainable
            parameters.
        SubnetNameError: A ``KeyError`` and ``ValueError``, for names that are no modules of
            the model.
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str]) -> None:
        super().__init__(model)
        self.module_names = _check_names(module_names, "module_names")
        _module_parameters(model, self.module_names)

    def get_subnet_mask(self, train_loader: Iterable | None) -> Tensor:
        return _mask_of(self.model, _module_parameters(self.model, self.module_names))


class LastLayerSubnetMask(SubnetMask):
    """The trainable parameters of the model's last ``nn.Linear`` layer.

    Args:
        model: The trained network.
        last_layer_name: Name of the last layer; ``None`` finds it with a forward pass of the
            first batch of the ``train_loader`` given to :meth:`select`.

    Raises:
        ValueError: If ``last_layer_name`` names no ``nn.Linear`` of the model or one without
            trainable parameters.
    """

    def __init__(self, model: nn.Module, last_layer_name: str | None = None) -> None:
        super().__init__(model)
        self._extractor = FeatureExtractor(model, last_layer_name=last_layer_name)
        if last_layer_name is not None:
            _module_parameters(model, [last_layer_name])

    @property
    def last_layer_name(self) -> str | None:
        """The name of the last layer, ``None`` until it is known."""
        return self._extractor.last_layer_name

    def get_subnet_mask(self, train_loader: Iterable | None) -> Tensor:
        """Mask of the last layer's parameters; finds the layer first if needed.

        Raises:
            ValueError: If the last layer is unknown and there is no ``train_loader``, the
                model's last module is no ``nn.Linear``, or it has no trainable parameters.
        """
        if self.last_layer_name is None:
            if train_loader is None:
                raise ValueError(
                    "select() needs a train_loader to find the last layer; or pass last_layer_name"
                )
            batch = next(iter(train_loader), None)
            if batch is None:
                raise ValueError("train_loader yielded no batches")
            X, _ = unpack_batch(batch, "input_ids", "labels", self.parameter_vector.device)
            with torch.no_grad():
                self._extractor.find_last_layer(X)
        return _mask_of(self.model, _module_parameters(self.model, [self.last_layer_name]))
