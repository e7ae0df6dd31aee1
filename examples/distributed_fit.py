"""Fit one Laplace approximation across the processes of a ``torch.distributed`` job.

Each process (rank) holds a ``DistributedDataParallel`` copy of a small MLP trained on its
shard of scikit-learn's bundled handwritten digits (offline). Every rank then fits the same
K-FAC Laplace approximation on its shard: ``fit`` sums the curvature, the loss and the number
of data points over the ranks, so every rank ends with the posterior of all the data. The
prior precision is tuned on the marginal likelihood and the GLM predictive is evaluated on
each rank's shard of the test digits.

Rank 0 prints the test accuracy and NLL of all ranks, whether the ranks hold the same
posterior (their log marginal likelihood, prior precision and Kronecker factors, compared
exactly), and the largest relative difference between the rank's Kronecker factors and those
of a single-process fit on all the training data (``fit(..., distributed=False)``), which is
round-off.

Usage::

    torchrun --nproc_per_node=2 examples/distributed_fit.py [--fast]

gloo on CPUs, NCCL when CUDA is available. Run with plain ``python`` it is one process.
"""

from __future__ import annotations

import argparse
import os

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from laplace import KronLaplace

SEED = 0
N_TEST = 296
N_EPOCHS, N_EPOCHS_FAST = 30, 2
BATCH_SIZE = 32


def start() -> torch.device:
    """Join the job's process group (launched by torchrun); the device of this rank."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(1)  # the ranks share the cores
    return torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def digits(device: torch.device) -> tuple[TensorDataset, TensorDataset]:
    """Standardised digits, split into training and test sets of even sizes."""
    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0).clamp(min=1e-3)
    y = torch.as_tensor(y)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(SEED))
    X, y = X[order].to(device), y[order].to(device)
    n_train = 2 * ((len(X) - N_TEST) // 2)
    train = TensorDataset(X[:n_train], y[:n_train])
    return train, TensorDataset(X[n_train : n_train + N_TEST], y[n_train : n_train + N_TEST])


def shard_loader(dataset: TensorDataset, shuffle: bool = False) -> DataLoader:
    """This rank's shard of ``dataset`` (all of it outside a process group)."""
    rank, world = rank_and_world()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle)
    return DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)


def train(model: nn.Module, dataset: TensorDataset, n_epochs: int) -> None:
    """Train the DDP-wrapped ``model`` on the shards (gradients averaged over the ranks)."""
    loader = shard_loader(dataset, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    model.train()
    for epoch in range(n_epochs):
        loader.sampler.set_epoch(epoch)
        for X, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            optimizer.step()
    model.eval()


def summed(values: list[float], device: torch.device) -> Tensor:
    """``values`` summed over the ranks."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    return total


def ranks_agree(la: KronLaplace, device: torch.device) -> bool:
    """Whether every rank holds exactly the same posterior (an all_gather of its numbers)."""
    factors = [f.reshape(-1) for fs in la.H_facs.kfacs for f in fs]
    mine = torch.cat(
        [la.log_marginal_likelihood().detach().reshape(1), la.prior_precision, *factors]
    ).to(device=device, dtype=torch.float64)
    if not dist.is_initialized():
        return True
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def single_process_difference(la: KronLaplace, train_set: TensorDataset) -> float:
    """Largest relative difference of the Kronecker factors from a fit of this rank alone on
    all the training data."""
    alone = KronLaplace(la.model, "classification")
    alone.fit(DataLoader(train_set, batch_size=BATCH_SIZE), distributed=False)
    worst = 0.0
    for got, expected in zip(la.H_facs.kfacs, alone.H_facs.kfacs):
        for a, b in zip(got, expected):
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two training epochs")
    args = parser.parse_args()
    device = start()
    rank, world = rank_and_world()
    torch.manual_seed(SEED)  # the same initial weights on every rank (DDP broadcasts too)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(device)
    if dist.is_initialized():
        model = DistributedDataParallel(model)
    train_set, test_set = digits(device)
    train(model, train_set, N_EPOCHS_FAST if args.fast else N_EPOCHS)
    la = KronLaplace(model, "classification")  # the wrapped network, without `module.`
    la.fit(shard_loader(train_set))  # summed over the ranks
    la.optimize_prior_precision(method="marglik", n_steps=50)
    correct, nll, count = 0.0, 0.0, 0
    for X, y in shard_loader(test_set):
        probs = la(X, link_approx="probit")
        correct += float((probs.argmax(-1) == y).sum())
        nll -= float(probs.gather(-1, y[:, None]).clamp(min=1e-30).log().sum())
        count += len(y)
    correct, nll, count = summed([correct, nll, count], device).tolist()
    agree = ranks_agree(la, device)
    difference = single_process_difference(la, train_set) if rank == 0 else 0.0
    if rank == 0:
        print(f"world size: {world}")
        print(f"n_data: {la.n_data}")
        print(f"prior precision: {la.prior_precision.item():.6g}")
        print(f"log marginal likelihood: {la.log_marginal_likelihood().item():.6g}")
        print(f"test accuracy: {correct / count:.4f}")
        print(f"test NLL: {nll / count:.4f}")
        print(f"ranks agree: {agree}")
        print(f"max relative difference from a single-process fit: {difference:.3g}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
