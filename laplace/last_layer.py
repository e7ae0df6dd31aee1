"""What every last-layer class shares, weight-space or function-space.

The model is wrapped in a :class:`~laplace.utils.feature_extractor.FeatureExtractor`; its last
``nn.Linear`` layer is named by the user or found on the first batch of ``fit``, and until
then the prior is checked only as far as it can be without the layer's size
(:attr:`_parameters_known`). A fit that raises forgets a last layer it found.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from laplace.subsets import LastLayer
from laplace.utils.data import check_input_dtype, dataset_size, unpack_batch
from laplace.utils.enums import parse_enum
from laplace.utils.feature_extractor import FeatureExtractor, FeatureReduction

__all__ = ["LastLayerMixin"]


class LastLayerMixin:
    """Mixin for the classes over the last layer of a network; put it before the base class."""

    @staticmethod
    def _extractor(
        model: nn.Module,
        last_layer_name: str | None,
        enable_backprop: bool,
        feature_reduction: FeatureReduction | str | None,
    ) -> FeatureExtractor:
        """``model`` wrapped in a feature extractor; a given extractor gets the options that
        are not None."""
        if not isinstance(model, FeatureExtractor):
            return FeatureExtractor(model, last_layer_name, enable_backprop, feature_reduction)
        if last_layer_name is not None:
            model.set_last_layer(last_layer_name)
        if feature_reduction is not None:
            model.feature_reduction = parse_enum(
                FeatureReduction, feature_reduction, "feature_reduction"
            )
        return model

    def _make_subset(self, model: nn.Module) -> LastLayer:
        return LastLayer(model)

    @property
    def enable_backprop(self) -> bool:
        """Keep the predictive differentiable w.r.t. the input (held by the extractor)."""
        return self.subset.extractor.enable_backprop

    @enable_backprop.setter
    def enable_backprop(self, value: bool) -> None:
        self.subset.extractor.enable_backprop = bool(value)

    @property
    def _device(self) -> torch.device:
        return self.subset.reference.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.subset.reference.dtype

    @property
    def _parameters_known(self) -> bool:
        return self.subset.ready

    def _find_last_layer(self, train_loader: Any) -> None:
        """Find the last layer with the first batch of ``train_loader`` if it is not known.

        Raises:
            ValueError: For a loader without ``dataset`` or batches, or a model without an
                ``nn.Linear`` last layer.
        """
        if self.subset.ready:
            return
        dataset_size(train_loader)
        batch = next(iter(train_loader), None)
        if batch is None:
            raise ValueError("train_loader yielded no batches")
        X, _ = unpack_batch(batch, self.dict_key_x, self.dict_key_y, self._device)
        check_input_dtype(X, self._dtype, self.dict_key_x)
        with torch.no_grad():
            self.subset.extractor.find_last_layer(X)

    def _fit_state(self) -> tuple[dict[str, Any], list[bool]]:
        """As ``BaseLaplace._fit_state``, plus the last layer a fit may find."""
        attributes, modes = super()._fit_state()
        return {**attributes, "_saved_last_layer": self.subset.extractor.last_layer_name}, modes

    def _restore_fit_state(self, saved: tuple[dict[str, Any], list[bool]]) -> None:
        attributes, modes = saved
        attributes = dict(attributes)
        self.subset.extractor.last_layer_name = attributes.pop("_saved_last_layer")
        super()._restore_fit_state((attributes, modes))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """As the base class's ``state_dict``, plus the name of the last layer."""
        state = super().state_dict()
        state["last_layer_name"] = self.subset.extractor.last_layer_name
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a fitted approximation; adopts the saved last layer if none is known yet.

        Raises:
            ValueError: If the state comes from another class, structure, likelihood, last
                layer or a model with other last-layer shapes.
        """
        name = state_dict.get("last_layer_name")
        extractor = self.subset.extractor
        if name is None:
            raise ValueError(
                "state_dict has no 'last_layer_name': it was saved with cls_name="
                f"{state_dict.get('cls_name')!r}, not by a last-layer Laplace"
            )
        if extractor.last_layer_name is None:
            extractor.set_last_layer(name)
        elif name != extractor.last_layer_name:
            raise ValueError(
                f"state_dict was saved with last_layer_name={name!r}, this object has "
                f"last_layer_name={extractor.last_layer_name!r}"
            )
        super().load_state_dict(state_dict)
