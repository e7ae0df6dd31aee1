"""Fitting one Laplace approximation across the processes of a ``torch.distributed`` group.

When each process (rank) of an initialised process group iterates over its own shard of the
training data (a ``DistributedSampler``), every sum a fit forms over the data is the sum over
the ranks of the sums over their shards. Each rank therefore fits its shard exactly as a single
process would, and one ``all_reduce`` (``SUM``) per quantity leaves every rank with the sums of
the whole data set, hence with the same posterior:

1. the number of data points, before the pass over the data (the backends scale by it): the
   sum of the ranks' shard sizes (:func:`shard_size`);
2. the training loss, packed with a count of the ranks whose pass raised, so that a failure on
   one rank makes every rank raise instead of waiting for a collective that never comes;
3. the stored sums of the curvature (the dense matrix, the diagonal, or every K-FAC factor),
   packed into one buffer (:meth:`~laplace.posterior.base.Curvature.summands`).

A low-rank curvature is not a sum of per-rank eigendecompositions; its Lanczos or subspace
iteration runs on every rank alike on curvature-vector products summed over the ranks
(:meth:`RankReduction.summed_matvec`, one ``all_reduce`` per Lanczos step, or per block
product of subspace iteration).

Only ``torch.distributed`` collectives are used, on the tensors' device: gloo on CPUs, NCCL on
GPUs. Only the default process group is supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch import distributed as dist

from laplace.utils.data import dataset_size

__all__ = [
    "RankReduction",
    "group_active",
    "refuse_across_ranks",
    "shard_size",
    "unwrap_parallel",
    "unwrapped_name",
]

_WRAPPER_PREFIX = "module."


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The network inside ``DistributedDataParallel`` / ``DataParallel`` wrappers.

    A Laplace approximation works on the wrapped network: its curvature and Jacobian passes
    must not trigger the wrapper's gradient synchronisation, and its parameter and layer names
    are then those of the network, without the wrapper's ``module.`` prefix.

    Args:
        model: A network, possibly wrapped (several times).

    Returns:
        ``model.module`` for a wrapper (repeatedly), else ``model`` itself.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def unwrapped_name(model: nn.Module, name: str | None) -> str | None:
    """A submodule name of ``model`` as a name in :func:`unwrap_parallel` of it.

    Args:
        model: A network, possibly wrapped.
        name: A submodule name, with or without the wrappers' ``module.`` prefixes.

    Returns:
        ``name`` without one ``module.`` prefix per wrapper that it has; None for None.
    """
    while name is not None and model is not unwrap_parallel(model):
        model = model.module
        if name.startswith(_WRAPPER_PREFIX):
            name = name[len(_WRAPPER_PREFIX) :]
    return name


def group_active() -> bool:
    """Whether a default process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_size(loader: object, name: str = "train_loader") -> int:
    """This rank's number of data points, before iterating ``loader``.

    ``len`` of the loader's sampler (that of its batch sampler first): a
    ``DistributedSampler`` yields one shard of ``len(loader.dataset)``. Without a sized
    sampler, ``len(loader.dataset)`` (each rank has a data set of its own).

    Args:
        loader: A data loader, usually a ``torch.utils.data.DataLoader``.
        name: The argument's name, for errors.

    Returns:
        The number of data points this rank's loader yields (with a ``DistributedSampler``
        that pads the data set to a multiple of the ranks, the padded count).

    Raises:
        ValueError: If the loader has neither a sized sampler nor a non-empty ``dataset``.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(batch_sampler, "sampler", None), getattr(loader, "sampler", None)):
        if sampler is not None and hasattr(sampler, "__len__"):
            return len(sampler)
    return dataset_size(loader, name)


class RankReduction:
    """Sums over the ranks of the default process group by ``torch.distributed.all_reduce``.

    Every rank must call the methods in the same order with tensors of the same shapes (the
    rule of collectives); the Laplace classes do so by running the same code on every rank.

    Attributes:
        world_size: Number of ranks.
        rank: This process's rank.
    """

    def __init__(self) -> None:
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    @classmethod
    def resolve(cls, distributed: bool | None) -> RankReduction | None:
        """The reduction a fit with the keyword ``distributed`` uses.

        Args:
            distributed: None reduces when a process group of more than one rank is
                initialised (:func:`group_active`); True requires one; False fits on this
                rank's data only.

        Returns:
            A reduction, or None to fit per rank.

        Raises:
            ValueError: For a value other than None, True and False, or for True without an
                initialised process group.
        """
        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        if distributed is False:
            return None
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, or a launch by torchrun); got none"
            )
        return cls() if distributed or group_active() else None

    def count(self, local: int, device: torch.device) -> int:
        """The sum over the ranks of the integer ``local``.

        Args:
            local: This rank's count.
            device: Device of the collective (a GPU for NCCL).

        Returns:
            The total.
        """
        total = torch.tensor([local], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        return int(total.item())

    def data_size(self, loader: object, device: torch.device, name: str = "train_loader") -> int:
        """The number of data points of all ranks: the sum of their :func:`shard_size`.

        Args:
            loader: This rank's data loader.
            device: Device of the collective.
            name: The argument's name, for errors.

        Returns:
            The total, the same on every rank.

        Raises:
            ValueError: As :func:`shard_size`, or if every rank's loader is empty.
        """
        total = self.count(shard_size(loader, name), device)
        if total == 0:
            raise ValueError(f"{name} yields no data points on any of the {self.world_size} ranks")
        return total

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor by its sum over the ranks, in one ``all_reduce``.

        A single contiguous tensor is reduced in place; several are packed into one buffer
        and unpacked.

        Args:
            tensors: Tensors of one dtype and device (the same shapes on every rank).

        Raises:
            ValueError: If the tensors have several dtypes or devices.
        """
        tensors = list(tensors)
        if not tensors:
            return
        if len({(t.dtype, t.device) for t in tensors}) > 1:
            raise ValueError(
                "tensors must share one dtype and device to be summed over the ranks, got "
                f"{sorted({(str(t.dtype), str(t.device)) for t in tensors})}"
            )
        if len(tensors) == 1 and tensors[0].is_contiguous():
            dist.all_reduce(tensors[0])
            return
        packed = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(packed)
        for tensor, chunk in zip(tensors, packed.split([t.numel() for t in tensors])):
            tensor.copy_(chunk.view_as(tensor))

    def sum_after(
        self,
        compute: Callable[[], Sequence[Tensor | float]],
        size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        """Run this rank's part of a fit and sum its ``size`` numbers over the ranks.

        One ``all_reduce`` carries the numbers and a count of the ranks where ``compute``
        raised; a rank that raises takes part with that count before re-raising, so the
        others raise too instead of waiting for it at a later collective.

        Args:
            compute: This rank's part; returns ``size`` numbers (floats or 0-d tensors).
            size: How many numbers ``compute`` returns.
            device: Device of the collective.
            dtype: Floating dtype of the sums.

        Returns:
            The sums over the ranks.

        Shapes:
            ``-> (size,)``

        Raises:
            RuntimeError: On the ranks where ``compute`` succeeded, if it raised on another.
        """
        packed = torch.zeros(size + 1, device=device, dtype=dtype)
        try:
            values = compute()
        except BaseException:
            packed[size] = 1
            dist.all_reduce(packed)
            raise
        packed[:size] = torch.stack([torch.as_tensor(v, dtype=dtype).to(device) for v in values])
        dist.all_reduce(packed)
        failed = int(packed[size].item())
        if failed:
            raise RuntimeError(
                f"the fit raised on {failed} of {self.world_size} ranks (see their errors); "
                f"rank {self.rank} discards its part"
            )
        return packed[:size]

    def weighted_mean(self, value: float, weight: float, device: torch.device) -> float:
        """``sum_r w_r v_r / sum_r w_r`` over the ranks, in one ``all_reduce``.

        Args:
            value: This rank's value (a mean over its ``weight`` points; inf stays inf).
            weight: This rank's number of points (0 for a rank without any).
            device: Device of the collective.

        Returns:
            The weighted mean, the same on every rank.
        """
        packed = torch.tensor(
            [value * weight if weight else 0.0, float(weight)], dtype=torch.float64, device=device
        )
        dist.all_reduce(packed)
        return float(packed[0] / packed[1])

    def broadcast_(self, tensor: Tensor) -> Tensor:
        """``tensor`` overwritten, in place, with rank 0's values; returned.

        Args:
            tensor: A contiguous tensor of the same shape on every rank.

        Returns:
            ``tensor``.
        """
        dist.broadcast(tensor, src=0)
        return tensor

    def summed_matvec(self, matvec: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``v -> sum_r H_r v`` from this rank's ``v -> H_r v``, one ``all_reduce`` per product.

        Args:
            matvec: The product with this rank's curvature.

        Returns:
            The product with the curvature of all ranks, the same on every rank.

        Shapes:
            ``(params,) -> (params,)``, or a block ``(params, b) -> (params, b)``
        """

        def summed(v: Tensor) -> Tensor:
            product = matvec(v).contiguous()
            dist.all_reduce(product)
            return product

        return summed


def refuse_across_ranks(owner: str, distributed: bool | None, reason: str) -> None:
    """Raise unless ``distributed`` resolves to a fit per rank, for a class that cannot sum
    its fit over the ranks.

    Args:
        owner: The class's name, for the message.
        distributed: The ``distributed`` keyword of its ``fit``.
        reason: Why the fit cannot be summed over the ranks.

    Raises:
        ValueError: If a process group of more than one rank is initialised and
            ``distributed`` is not False, or ``distributed=True``.
    """
    if RankReduction.resolve(distributed) is not None:
        raise ValueError(
            f"{owner} cannot fit across the ranks of a torch.distributed process group: "
            f"{reason}; pass fit(..., distributed=False) to fit on each rank's data"
        )
