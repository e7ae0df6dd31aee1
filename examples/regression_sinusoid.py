"""Empirical Bayes on a toy sinusoid: tune prior precision and noise by the marginal likelihood.

150 inputs are drawn uniformly from ``[0, 8]`` with targets ``sin(x) + 0.3 * eps``. A 1-50-1
tanh MLP is trained to a MAP estimate with Adam; a full all-weights Laplace approximation is
fitted, and the log prior precision and log observation noise are optimised with Adam on the
negative log marginal likelihood, without validation data (MacKay, 1992; Immer et al., 2021).
Then ``marglik_training`` trains a fresh network and both hyperparameters jointly (Immer et
al., 2021, Algorithm 1). The script prints the recovered noise (the true value is 0.3) and
prior precision of both, and the predictive standard deviation inside and outside the
training range, and draws data, MAP mean and the predictive band
``f_mu +- 2 sqrt(f_var + sigma^2)`` of both side by side.

Usage::

    python examples/regression_sinusoid.py [--fast] [--out DIR] [--plot PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import BaseLaplace, Laplace, marglik_training

SEED = 711
N_DATA = 150
SIGMA_NOISE = 0.3
N_EPOCHS = 1000
N_EPOCHS_FAST = 200
FIGURE_NAME = "regression_sinusoid.png"
DEFAULT_OUT = Path(__file__).resolve().parent / "figures"


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


def make_model() -> nn.Module:
    """A freshly initialised 1-50-1 tanh MLP (the same weights on every call)."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))


def train_map(train_loader: DataLoader, n_epochs: int) -> nn.Module:
    """Train the MLP on the mean squared error with Adam."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    criterion = nn.MSELoss()
    for _ in range(n_epochs):
        for X, y in train_loader:
            optimizer.zero_grad()
            criterion(model(X), y).backward()
            optimizer.step()
    return model


def tune_hyperparameters(la: BaseLaplace, n_steps: int) -> None:
    """Minimise the negative log marginal likelihood over log prior precision and log noise.

    The optimised values are stored on ``la`` (``la.prior_precision``, ``la.sigma_noise``).
    """
    log_prior = torch.ones(1, requires_grad=True)
    log_sigma = torch.ones(1, requires_grad=True)
    hyper_optimizer = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(n_steps):
        hyper_optimizer.zero_grad()
        neg_marglik = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        neg_marglik.backward()
        hyper_optimizer.step()
    la.prior_precision = log_prior.detach().exp()
    la.sigma_noise = log_sigma.detach().exp()


def predictive_band(la: BaseLaplace, X_test: Tensor) -> tuple[Tensor, Tensor]:
    """MAP mean and predictive standard deviation ``sqrt(f_var + sigma^2)`` on ``X_test``.

    Shapes:
        ``X_test: (m, 1)`` -> ``(m,)``, ``(m,)``.
    """
    f_mu, f_var = la(X_test)
    f_mu, f_var = f_mu.detach().squeeze(-1), f_var.detach().reshape(-1)
    return f_mu, (f_var + la.sigma_noise.item() ** 2).sqrt()


def report(prefix: str, la: BaseLaplace, X_test: Tensor, seconds: float) -> Tensor:
    """Print the hyperparameters and the predictive spread of ``la``; return its band."""
    print(f"{prefix}sigma_noise: {la.sigma_noise.item():.4f} (true value {SIGMA_NOISE})")
    print(f"{prefix}prior_precision: {la.prior_precision.item():.4f}")
    print(f"{prefix}log_marginal_likelihood: {la.log_marginal_likelihood().item():.4f}")
    f_mu, pred_std = predictive_band(la, X_test)
    x = X_test.squeeze(-1)
    inside = (x >= 0) & (x <= 8)
    print(f"{prefix}predictive std inside [0, 8]: {pred_std[inside].mean().item():.4f}")
    print(f"{prefix}predictive std outside [0, 8]: {pred_std[~inside].mean().item():.4f}")
    print(f"{prefix}time: {seconds:.1f} s")
    return torch.stack([f_mu, pred_std])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fast", action="store_true", help=f"{N_EPOCHS_FAST} instead of {N_EPOCHS} epochs"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of {FIGURE_NAME}")
    parser.add_argument("--plot", metavar="PATH", help="save the figure to PATH instead")
    args = parser.parse_args()
    n_epochs = N_EPOCHS_FAST if args.fast else N_EPOCHS

    X_train, y_train, X_test = make_data()
    train_loader = DataLoader(TensorDataset(X_train, y_train), batch_size=N_DATA)

    start = time.perf_counter()
    model = train_map(train_loader, n_epochs)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="full")
    la.fit(train_loader)
    tune_hyperparameters(la, n_epochs)
    post_hoc = report("", la, X_test, time.perf_counter() - start)

    start = time.perf_counter()
    la_joint, _, _, _ = marglik_training(
        model=make_model(),
        train_loader=train_loader,
        likelihood="regression",
        hessian_structure="full",
        n_epochs=n_epochs,
        optimizer_kwargs={"lr": 1e-2},
        prior_structure="scalar",
    )
    print()
    joint = report("marglik_training ", la_joint, X_test, time.perf_counter() - start)

    path = Path(args.plot) if args.plot else args.out / FIGURE_NAME
    bands = {"post-hoc marglik": post_hoc, "marglik_training": joint}
    save_plot(X_train, y_train, X_test.squeeze(-1), bands, path)
    print(f"\nfigure saved to {path}")


def save_plot(
    X_train: Tensor, y_train: Tensor, x: Tensor, bands: dict[str, Tensor], path: Path
) -> None:
    """Plot the data, the MAP mean and a two-standard-deviation predictive band per panel.

    Args:
        X_train: Training inputs.
        y_train: Training targets.
        x: Test inputs.
        bands: Panel title -> stacked ``(f_mu, pred_std)`` on ``x``.
        path: Where the PNG goes (its folder is created).

    Shapes:
        ``X_train, y_train: (n, 1)``; ``x: (m,)``; each band ``(2, m)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(bands), figsize=(5 * len(bands), 3.5), sharey=True)
    for ax, (title, (f_mu, pred_std)) in zip(axes, bands.items()):
        ax.scatter(X_train.squeeze(-1), y_train.squeeze(-1), s=8, color="black", label="data")
        ax.plot(x, f_mu, color="tab:blue", label="MAP mean")
        band = r"$\pm 2\sqrt{f_{var} + \sigma^2}$"
        ax.fill_between(x, f_mu - 2 * pred_std, f_mu + 2 * pred_std, alpha=0.3, label=band)
        ax.set(title=title, xlabel="x", ylim=(-4, 4))
    axes[0].set_ylabel("y")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
