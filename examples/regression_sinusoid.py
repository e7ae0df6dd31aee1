"""Empirical Bayes on a toy sinusoid: tune prior precision and noise by the marginal likelihood.

150 inputs are drawn uniformly from ``[0, 8]`` with targets ``sin(x) + 0.3 * eps``. A 1-50-1
tanh MLP is trained to a MAP estimate with Adam; a full all-weights Laplace approximation is
fitted, and the log prior precision and log observation noise are optimised with Adam on the
negative log marginal likelihood, without validation data (MacKay, 1992; Immer et al., 2021).
The script prints the recovered noise (the true value is 0.3) and prior precision, and the
predictive standard deviation inside and outside the training range.

Usage::

    python examples/regression_sinusoid.py [--plot sinusoid.png]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import BaseLaplace, Laplace

SEED = 711
N_DATA = 150
SIGMA_NOISE = 0.3
N_EPOCHS = 1000


def make_data() -> tuple[Tensor, Tensor, Tensor]:
    """Noisy sinusoid training data and a test grid reaching beyond the training range.

    Returns:
        Training inputs, training targets and test inputs.

    Shapes:
        ``(150, 1)``, ``(150, 1)``, ``(500, 1)``.
    """
    generator = torch.Generator().manual_seed(SEED)
    X_train = 8 * torch.rand(N_DATA, 1, generator=generator)
    y_train = torch.sin(X_train) + SIGMA_NOISE * torch.randn(N_DATA, 1, generator=generator)
    X_test = torch.linspace(-5, 13, 500).unsqueeze(-1)
    return X_train, y_train, X_test


def train_map(train_loader: DataLoader) -> nn.Module:
    """Train a 1-50-1 tanh MLP on the mean squared error with Adam."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    criterion = nn.MSELoss()
    for _ in range(N_EPOCHS):
        for X, y in train_loader:
            optimizer.zero_grad()
            criterion(model(X), y).backward()
            optimizer.step()
    return model


def tune_hyperparameters(la: BaseLaplace) -> None:
    """Minimise the negative log marginal likelihood over log prior precision and log noise.

    The optimised values are stored on ``la`` (``la.prior_precision``, ``la.sigma_noise``).
    """
    log_prior = torch.ones(1, requires_grad=True)
    log_sigma = torch.ones(1, requires_grad=True)
    hyper_optimizer = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(N_EPOCHS):
        hyper_optimizer.zero_grad()
        neg_marglik = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        neg_marglik.backward()
        hyper_optimizer.step()
    la.prior_precision = log_prior.detach().exp()
    la.sigma_noise = log_sigma.detach().exp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="PATH", help="save the predictive band to PATH")
    args = parser.parse_args()

    X_train, y_train, X_test = make_data()
    train_loader = DataLoader(TensorDataset(X_train, y_train), batch_size=N_DATA)
    model = train_map(train_loader)

    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="full")
    la.fit(train_loader)
    tune_hyperparameters(la)
    sigma_noise = la.sigma_noise.item()
    print(f"sigma_noise: {sigma_noise:.4f} (true value {SIGMA_NOISE})")
    print(f"prior_precision: {la.prior_precision.item():.4f}")
    print(f"log_marginal_likelihood: {la.log_marginal_likelihood().item():.4f}")

    f_mu, f_var = la(X_test)
    f_mu, f_var = f_mu.detach().squeeze(-1), f_var.detach().reshape(-1)
    pred_std = (f_var + sigma_noise**2).sqrt()
    x = X_test.squeeze(-1)
    inside = (x >= 0) & (x <= 8)
    print(f"predictive std inside [0, 8]: {pred_std[inside].mean().item():.4f}")
    print(f"predictive std outside [0, 8]: {pred_std[~inside].mean().item():.4f}")

    if args.plot:
        save_plot(X_train, y_train, x, f_mu, pred_std, args.plot)
        print(f"plot saved to {args.plot}")


def save_plot(
    X_train: Tensor, y_train: Tensor, x: Tensor, f_mu: Tensor, pred_std: Tensor, path: str
) -> None:
    """Plot the data, the MAP mean and a two-standard-deviation predictive band.

    Shapes:
        ``X_train, y_train: (n, 1)``; ``x, f_mu, pred_std: (m,)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(X_train.squeeze(-1), y_train.squeeze(-1), s=8, color="black", label="data")
    ax.plot(x, f_mu, color="tab:blue", label="MAP mean")
    ax.fill_between(
        x, f_mu - 2 * pred_std, f_mu + 2 * pred_std, alpha=0.3, color="tab:blue", label="±2 std"
    )
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
