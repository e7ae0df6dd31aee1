"""Checks and unpacking for data loaders and batches, shared by every Laplace class."""

from __future__ import annotations

import copy
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["dataset_size", "unpack_batch", "batch_size", "check_finite_inputs", "all_finite"]

Inputs = Tensor | MutableMapping[str, Any]


def dataset_size(loader: object, name: str = "train_loader") -> int:
    """Number of data points ``len(loader.dataset)``.

    Raises:
        ValueError: If the loader has no ``dataset`` or the data set is empty.
    """
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise ValueError(
            f"{name} must be a torch DataLoader with a `dataset` attribute (len(loader.dataset) "
            f"gives the number of data points); got {type(loader).__name__}"
        )
    n_data = len(dataset)
    if n_data == 0:
        raise ValueError(f"{name} is empty: len({name}.dataset) == 0")
    return n_data


def unpack_batch(
    batch: object, dict_key_x: str, dict_key_y: str, device: torch.device
) -> tuple[Inputs, Tensor]:
    """Split a batch into inputs and targets.

    A batch is ``(X, y)`` or a dict-like object holding the targets under ``dict_key_y``; the
    whole dict-like object is then the model's input (the model reads ``dict_key_x`` itself).
    Tensors are moved to ``device``.

    Raises:
        ValueError: If the batch has neither form.
    """
    if isinstance(batch, MutableMapping):
        if dict_key_y not in batch:
            raise ValueError(
                f"dict-like batch has no key dict_key_y={dict_key_y!r}; keys: {list(batch)}"
            )
        return batch, torch.as_tensor(batch[dict_key_y]).to(device)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        X, y = batch
        if isinstance(X, Tensor):
            X = X.to(device)
        return X, torch.as_tensor(y).to(device)
    raise ValueError(
        "each batch must be (X, y) or a dict-like object with keys dict_key_x and dict_key_y; "
        f"got {type(batch).__name__}"
    )


def batch_size(X: Inputs, dict_key_x: str) -> int:
    """Number of samples in the inputs ``X``."""
    if isinstance(X, MutableMapping):
        return len(X[dict_key_x])
    return len(X)


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite.

    The sum is finite whenever every entry is (unless it overflows), and NaN or Inf entries
    make it NaN or Inf: one reduction without a boolean copy decides the common case, and
    only a non-finite sum pays for the entrywise test.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite_inputs(X: Inputs, name: str = "X") -> None:
    """Raise ``ValueError`` if floating-point inputs contain NaN or Inf."""
    tensors = X.values() if isinstance(X, MutableMapping) else [X]
    for tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and not all_finite(tensor):
            raise ValueError(f"{name} contains NaN or Inf values")


def cast_inputs(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """``inputs`` with every floating tensor (of a dict-like batch too) cast to ``dtype``;
    None stays None."""
    if inputs is None:
        return None
    if isinstance(inputs, Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    cast = copy.copy(inputs)
    for key, value in inputs.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            cast[key] = value.to(dtype)
    return cast
