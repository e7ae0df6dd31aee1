"""Checks and unpacking for data loaders and batches, shared by every Laplace class."""

from __future__ import annotations

import copy
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from laplace.errors import InputMismatchError, MissingKeyError

__all__ = [
    "all_finite",
    "batch_size",
    "check_finite_inputs",
    "check_finite_targets",
    "check_input_dtype",
    "dataset_size",
    "per_sample_shape",
    "unpack_batch",
]

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
        MissingKeyError: If a dict-like batch lacks ``dict_key_x`` or ``dict_key_y`` (a
            ``KeyError`` and a ``ValueError``).
        ValueError: If the batch has neither form.
    """
    if isinstance(batch, MutableMapping):
        for argument, key in (("dict_key_x", dict_key_x), ("dict_key_y", dict_key_y)):
            if key not in batch:
                raise MissingKeyError(
                    f"dict-like batch has no key {argument}={key!r}; keys: {list(batch)}"
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


def check_finite_targets(y: Tensor, name: str = "y") -> None:
    """Raise ``ValueError`` if floating-point targets contain NaN or Inf."""
    if y.is_floating_point() and not all_finite(y):
        raise ValueError(
            f"{name} (the targets) contains NaN or Inf values; a fit on them would give a "
            "NaN loss and marginal likelihood"
        )


def check_input_dtype(X: Inputs, dtype: torch.dtype, dict_key_x: str = "input_ids") -> None:
    """Raise :class:`~laplace.errors.InputMismatchError` for floating inputs not in ``dtype``.

    For a dict-like batch only the entry ``dict_key_x`` is checked (masks and other entries
    may have other dtypes); integer inputs (token ids) are not checked.
    """
    name, tensor = "X", X
    if isinstance(X, MutableMapping):
        name, tensor = f"X[{dict_key_x!r}]", X.get(dict_key_x)
    if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.dtype != dtype:
        raise InputMismatchError(
            f"{name} has dtype {tensor.dtype}, the model's parameters {dtype}: cast the data "
            f"(.to({dtype})) or the model (.to({tensor.dtype}))"
        )


def per_sample_shape(X: Inputs) -> tuple[int, ...] | None:
    """The shape of one sample of tensor inputs, ``X.shape[1:]``; None for dict-like ones."""
    return tuple(X.shape[1:]) if isinstance(X, Tensor) else None


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
