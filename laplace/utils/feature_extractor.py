"""Access to the last layer of a network and to the features it is applied to.

:class:`FeatureExtractor` wraps a model whose output is produced by a final ``nn.Linear``
layer. It returns the model output together with the input of that layer (the features
``phi``), captured by a forward hook that exists only for the duration of one call, so the
wrapped model is left unchanged and the wrapper can be pickled.

The last layer is either named by the user or found automatically: one forward pass with hooks
on every leaf module records the last leaf module that runs, which must be an ``nn.Linear``.

Language models in the style of Hugging Face apply the classification head to every token,
``(batch, seq, dim) -> (batch, seq, classes)``, and then pick one token's logits. With a
:class:`FeatureReduction` the captured features are reduced in the same way
(``pick_first``, ``pick_last`` or ``average`` over the sequence) to ``(batch, dim)``;
features with more dimensions, ``(batch, d1, ..., dk, dim)``, are reduced over all of
``d1, ..., dk`` taken as one sequence in row-major order.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from laplace.errors import UnknownNameError
from laplace.utils.distributed import unwrap_parallel, unwrapped_name
from laplace.utils.enums import _StrEnum, parse_enum

__all__ = ["FeatureExtractor", "FeatureReduction"]


class FeatureReduction(_StrEnum):
    """How ``(batch, seq, dim)`` features are reduced to ``(batch, dim)``."""

    PICK_FIRST = "pick_first"
    PICK_LAST = "pick_last"
    AVERAGE = "average"


class FeatureExtractor(nn.Module):
    """A model with access to its last ``nn.Linear`` layer and that layer's input features.

    Args:
        model: The network; its last layer must be an ``nn.Linear``. A
            ``DistributedDataParallel`` or ``DataParallel`` wrapper is replaced by the network
            it wraps (layer names then lose the wrapper's ``module.`` prefix).
        last_layer_name: Name of the last layer in ``model.named_modules()`` (with or without
            a wrapper's ``module.`` prefix); ``None`` finds it on the first forward pass.
        enable_backprop: Keep the features attached to the autograd graph.
        feature_reduction: Reduction of ``(batch, seq, dim)`` features: ``"pick_first"``,
            ``"pick_last"``, ``"average"`` or ``None``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: For an unknown ``feature_reduction`` or a ``last_layer_name`` that does
            not name an ``nn.Linear`` of the model.
        UnknownNameError: For a ``last_layer_name`` the model has no module of (a
            ``KeyError`` and a ``ValueError``).
    """

    def __init__(
        self,
        model: nn.Module,
        last_layer_name: str | None = None,
        enable_backprop: bool = False,
        feature_reduction: FeatureReduction | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__()
        last_layer_name = unwrapped_name(model, last_layer_name)
        self.model = unwrap_parallel(model)  # a (Distributed)DataParallel wrapper's network
        self.enable_backprop = bool(enable_backprop)
        self.feature_reduction = (
            None
            if feature_reduction is None
            else parse_enum(FeatureReduction, feature_reduction, "feature_reduction")
        )
        self.last_layer_name: str | None = None
        self._captured: tuple[nn.Module, Tensor] | None = None
        if last_layer_name is not None:
            self.set_last_layer(last_layer_name)

    @property
    def last_layer(self) -> nn.Linear | None:
        """The last layer, or ``None`` while it has not been found."""
        if self.last_layer_name is None:
            return None
        return self.model.get_submodule(self.last_layer_name)

    def _linear_names(self) -> list[str]:
        return [name for name, m in self.model.named_modules() if isinstance(m, nn.Linear)]

    def set_last_layer(self, last_layer_name: str) -> None:
        """Use the module ``last_layer_name`` of the model as the last layer.

        Raises:
            UnknownNameError: If the model has no module of this name (a ``KeyError`` and a
                ``ValueError``); the message lists the ``nn.Linear`` names that are valid.
            ValueError: If the module is not an ``nn.Linear``.
        """
        modules = dict(self.model.named_modules())
        if last_layer_name not in modules:
            raise UnknownNameError(
                f"last_layer_name must name an nn.Linear module of the model, got "
                f"{last_layer_name!r} (not found); nn.Linear modules: {self._linear_names()}"
            )
        kind = type(modules[last_layer_name]).__name__
        if not isinstance(modules[last_layer_name], nn.Linear):
            raise ValueError(
                f"last_layer_name must name an nn.Linear module of the model, got "
                f"{last_layer_name!r} (not an nn.Linear: a {kind}); "
                f"nn.Linear modules: {self._linear_names()}"
            )
        self.last_layer_name = last_layer_name

    def forward(self, x: Any, **model_kwargs: Any) -> Tensor:
        """The model output; finds the last layer first if it is not known yet."""
        if self.last_layer is None:
            return self._find(x, **model_kwargs)[0]
        return self.model(x, **model_kwargs)

    def forward_with_features(self, x: Any, **model_kwargs: Any) -> tuple[Tensor, Tensor]:
        """The model output and the (reduced) input features of the last layer.

        Returns:
            ``(out, phi)``; ``phi`` is detached unless ``enable_backprop``.

        Shapes:
            ``out``: the model's output, ``(batch, outputs)``; ``phi``: ``(batch, features)``
            (or the layer input's shape without a ``feature_reduction``)

        Raises:
            ValueError: If the last layer cannot be found or is not called by the forward
                pass.
        """
        if self.last_layer is None:
            out, features = self._find(x, **model_kwargs)
        else:
            out, captured = self._run([self.last_layer], x, **model_kwargs)
            if captured is None:
                raise ValueError(
                    f"the last layer {self.last_layer_name!r} was not called by the forward pass"
                )
            features = captured[1]
        if not self.enable_backprop:
            features = features.detach()
        return out, self._reduce(features)

    def find_last_layer(self, x: Any, **model_kwargs: Any) -> Tensor:
        """Find the last layer with one forward pass of ``x`` and return the model output.

        Every leaf module gets a temporary forward hook; the last one to run is the last layer.

        Raises:
            ValueError: If the last leaf module to run is not an ``nn.Linear``.
        """
        return self._find(x, **model_kwargs)[0]

    def _run(
        self, modules: list[nn.Module], x: Any, **model_kwargs: Any
    ) -> tuple[Tensor, tuple[nn.Module, Tensor] | None]:
        """Run the model with temporary hooks on ``modules``.

        Returns:
            The model output and ``(module, input)`` of the last hooked module to run (or
            ``None`` if none ran).
        """
        handles = [m.register_forward_hook(self._record) for m in modules]
        try:
            out = self.model(x, **model_kwargs)
        finally:
            for handle in handles:
                handle.remove()
            captured, self._captured = self._captured, None
        return out, captured

    def _find(self, x: Any, **model_kwargs: Any) -> tuple[Tensor, Tensor]:
        leaves = [m for m in self.model.modules() if next(m.children(), None) is None]
        out, captured = self._run(leaves, x, **model_kwargs)
        last, features = (None, None) if captured is None else captured
        names = {id(m): name for name, m in self.model.named_modules()}
        if not isinstance(last, nn.Linear):
            reached = (
                "no module" if last is None else f"{names[id(last)]!r} ({type(last).__name__})"
            )
            raise ValueError(
                "model has no nn.Linear last layer: the last module reached by the forward "
                f"pass is {reached}; pass last_layer_name, one of {self._linear_names()}"
            )
        self.last_layer_name = names[id(last)]
        return out, features

    def _record(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """Forward hook: keep the module and its first input (the latest call wins)."""
        self._captured = (module, inputs[0])

    def _reduce(self, features: Tensor) -> Tensor:
        """Apply ``feature_reduction`` over every dimension between the batch and the last.

        Shapes:
            ``(batch, d1, ..., dk, dim) -> (batch, dim)``; ``(batch, dim)`` features, and any
            features when there is no reduction, are returned unchanged.
        """
        if self.feature_reduction is None or features.ndim <= 2:
            return features
        tokens = features.reshape(features.shape[0], -1, features.shape[-1])
        if self.feature_reduction == FeatureReduction.PICK_FIRST:
            return tokens[:, 0]
        if self.feature_reduction == FeatureReduction.PICK_LAST:
            return tokens[:, -1]
        return tokens.mean(dim=1)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_captured"] = None
        return state
