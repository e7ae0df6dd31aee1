"""Bradley-Terry reward modelling: fit as a classifier on pairs, predict as a regressor."""

from __future__ import annotations

import pytest
import torch
from groundtruth import dense_ggn, dense_jacobians
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace


class PairRewardModel(nn.Module):
    """Scores ``(batch, dim) -> (batch, 1)`` or a pair ``(batch, 2, dim) -> (batch, 2)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1))

    def forward(self, x):
        if x.ndim == 3:
            return self.net(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], 2)
        return self.net(x)


@pytest.fixture
def pairs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 2, 3, generator=gen)
    y = torch.randint(2, (10,), generator=gen)
    return x, y


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_reward_model_fits_as_classifier_and_predicts_as_regressor(pairs, structure):
    x, y = pairs
    model = PairRewardModel()
    la = Laplace(model, "reward_modeling", subset_of_weights="all", hessian_structure=structure)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    if structure != "kron":  # the curvature is the classification GGN of the pair logits
        H = dense_ggn(model, x, y, "classification")
        expected = H if structure == "full" else torch.diag(H.diagonal())
        torch.testing.assert_close(la._curvature.to_dense(), expected)
    la.optimize_prior_precision(n_steps=20)
    x_test = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    f_mu, f_var = la(x_test)
    assert f_mu.shape == (5, 1) and f_var.shape == (5, 1, 1)
    Js = dense_jacobians(model, x_test)
    P = la._H_factor * la._curvature.to_dense() + torch.diag(la.prior_precision_diag)
    torch.testing.assert_close(f_var, Js @ torch.linalg.solve(P, Js.transpose(1, 2)))
    probs = la(x[:3], fitting=True)
    assert probs.shape == (3, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_reward_modeling_rejects_noise():
    with pytest.raises(ValueError, match="sigma_noise must be 1"):
        Laplace(PairRewardModel(), "reward_modeling", "all", "diag", sigma_noise=0.5)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_last_layer_of_a_folding_model_is_the_whole_network_restricted(pairs, structure):
    """The pair's two rows meet in the loss: the last-layer GGN is the whole network's."""
    from laplace.curvature import CurvlinopsGGN

    x, y = pairs
    model = PairRewardModel()
    la = Laplace(model, "reward_modeling", hessian_structure=structure)  # last layer
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    assert all(p.requires_grad for p in model.parameters())  # the body is left trainable
    frozen = PairRewardModel()
    frozen.net[0].requires_grad_(False)
    if structure == "kron":  # K-FAC of the whole network w.r.t. the last layer
        expected = CurvlinopsGGN(frozen, "classification").kron(x, y, N=len(x))[1]
        torch.testing.assert_close(la._curvature.to_dense(), expected.to_matrix())
    else:
        H = dense_ggn(frozen, x, y, "classification")
        torch.testing.assert_close(
            la._curvature.to_dense(), H if structure == "full" else torch.diag(H.diagonal())
        )
    x_test = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    f_mu, f_var = la(x_test)
    torch.testing.assert_close(f_mu, frozen(x_test))
    Js = dense_jacobians(frozen, x_test)
    P = la._H_factor * la._curvature.to_dense() + torch.diag(la.prior_precision_diag)
    torch.testing.assert_close(f_var, Js @ torch.linalg.solve(P, Js.transpose(1, 2)))
    with pytest.raises(ValueError, match="folds 2 rows per sample"):
        la(x[:3], fitting=True)


def test_last_layer_subnetwork_of_a_folding_model_is_the_dense_restriction(pairs):
    from laplace.utils import LastLayerSubnetMask

    x, y = pairs
    model = PairRewardModel()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    indices = LastLayerSubnetMask(model, last_layer_name="net.2").select(loader)
    la = Laplace(model, "reward_modeling", "subnetwork", "full", subnetwork_indices=indices)
    la.fit(loader)
    H = dense_ggn(model, x, y, "classification")
    torch.testing.assert_close(la.H, H[indices][:, indices])


def test_folding_last_layer_with_another_backend_checks_folding_once_per_fit(pairs, monkeypatch):
    """Backends without the closed form: the empirical Fisher of the whole network w.r.t.
    the last layer, with one extra forward pass per fit to see the folding."""
    from groundtruth import dense_ef

    from laplace.curvature import CurvlinopsEF

    x, y = pairs
    model = PairRewardModel()
    la = Laplace(model, "reward_modeling", hessian_structure="full", backend=CurvlinopsEF)
    calls = []
    features = la.subset.features

    def counted(*args, **kwargs):
        calls.append(1)
        return features(*args, **kwargs)

    monkeypatch.setattr(la.subset, "features", counted)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))  # 3 batches
    assert len(calls) == 1
    frozen = PairRewardModel()
    frozen.net[0].requires_grad_(False)
    torch.testing.assert_close(la.H, dense_ef(frozen, x, y, "classification"))
