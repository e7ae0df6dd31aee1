"""Last-layer Laplace when the output is not the last layer applied to the reduced features.

A sequence classifier applies its head to every position and pools the logits at the last
real token of right-padded inputs (as Hugging Face's ``GPT2ForSequenceClassification``
does), while ``feature_reduction="pick_last"`` picks the last position. The closed forms
from the features do not apply; the library must fall back to the Jacobians of the real
output w.r.t. the head. Truth: per-sample Jacobians of the output w.r.t. the head by
``torch.func.jacrev`` through the whole model, the dense GGN and ``J P^-1 J^T`` (float64).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from laplace import DiagLLLaplace, FullLLLaplace, KronLLLaplace
from tests.groundtruth import output_hessians


class PooledAtLastToken(nn.Module):
    """``(batch, seq, 3)`` inputs whose padded positions are exactly zero: features per
    position, a head on every position, the logits of the last non-zero position."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.body(x))  # (batch, seq, 2)
        real = x.abs().sum(-1) > 0
        last = (real * torch.arange(1, x.shape[1] + 1)).argmax(-1)  # the last real position
        return logits[torch.arange(len(x)), last]


def _data(n: int = 10, seq: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq, 3, generator=g)
    lengths = torch.randint(1, seq + 1, (n,), generator=g)
    x[torch.arange(seq)[None, :] >= lengths[:, None]] = 0.0  # right padding
    return x, torch.randint(0, 2, (n,), generator=g)


def _head_jacobians(model: PooledAtLastToken, x: torch.Tensor) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.head.named_parameters()}

    def out(p, xi):
        with_head = {f"head.{k}": v for k, v in p.items()}
        return functional_call(model, with_head, (xi[None],))[0]

    rows = []
    for xi in x:
        jac = jacrev(out)(params, xi)
        rows.append(torch.cat([jac["weight"].flatten(1), jac["bias"]], dim=1))
    return torch.stack(rows)


@pytest.mark.parametrize("cls", [FullLLLaplace, KronLLLaplace, DiagLLLaplace])
def test_pooled_outputs_use_the_jacobians_of_the_real_output(cls):
    model = PooledAtLastToken().double()
    x, y = _data()
    la = cls(model, "classification", feature_reduction="pick_last", last_layer_name="head")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    J = _head_jacobians(model, x)
    lam = output_hessians(model(x).detach(), y, "classification")
    H = torch.einsum("ncp,ncd,ndq->pq", J, lam, J)
    if cls is FullLLLaplace:
        torch.testing.assert_close(la.H, H)
    elif cls is DiagLLLaplace:
        torch.testing.assert_close(la.H, H.diagonal())
    x_test, _ = _data(n=5, seed=3)
    J_test = _head_jacobians(model, x_test)
    P = la.posterior_precision
    P = P.to_matrix() if hasattr(P, "to_matrix") else (torch.diag(P) if P.ndim == 1 else P)
    expected = J_test @ torch.linalg.inv(P) @ J_test.mT
    f_mu, f_var = la._glm_predictive_distribution(x_test)
    torch.testing.assert_close(f_mu, model(x_test).detach())
    torch.testing.assert_close(f_var, expected)
    torch.testing.assert_close(
        la.functional_variance_fast(x_test)[1], expected.diagonal(dim1=1, dim2=2)
    )
    # the sampling predictive evaluates the real output at sampled head weights
    thetas = la.sample(3, generator=torch.Generator().manual_seed(0))
    samples = la._nn_samples(x_test, 3, torch.Generator().manual_seed(0))
    for theta, sample in zip(thetas, samples):
        w, b = theta[:10].reshape(2, 5), theta[10:]
        replaced = functional_call(model, {"head.weight": w, "head.bias": b}, (x_test,))
        torch.testing.assert_close(sample, replaced.detach())


def test_the_closed_form_is_kept_when_it_applies():
    """Left-padded inputs (the last position is the real last token): the closed forms."""
    model = PooledAtLastToken().double()
    x, y = _data()
    x = x.flip(1)  # the padding now comes first; the last position is always real
    la = FullLLLaplace(
        model, "classification", feature_reduction="pick_last", last_layer_name="head"
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    assert la._whole_backend is None  # never needed
    J = _head_jacobians(model, x)
    lam = output_hessians(model(x).detach(), y, "classification")
    torch.testing.assert_close(la.H, torch.einsum("ncp,ncd,ndq->pq", J, lam, J))


def test_pooled_outputs_on_a_float32_model():
    """float32 model, truth from the same weights in float64: the real-output Jacobians of the
    head carry relative errors of a few float32 eps and the sums are float64, so the GGN and
    the predictive variance agree to 100 eps of their largest entry."""
    import copy

    model = PooledAtLastToken().float()
    x, y = _data()
    la = FullLLLaplace(
        model, "classification", feature_reduction="pick_last", last_layer_name="head"
    )
    la.fit(DataLoader(TensorDataset(x.float(), y), batch_size=4))
    reference = copy.deepcopy(model).double()
    J = _head_jacobians(reference, x)
    lam = output_hessians(reference(x).detach(), y, "classification")
    H = torch.einsum("ncp,ncd,ndq->pq", J, lam, J)
    eps = torch.finfo(torch.float32).eps
    assert la.H.dtype == torch.float32
    assert (la.H.double() - H).abs().max() < 100 * eps * H.abs().max()
    x_test, _ = _data(n=5, seed=3)
    J_test = _head_jacobians(reference, x_test)
    P = H + torch.eye(H.shape[0])
    expected = J_test @ torch.linalg.inv(P) @ J_test.mT
    f_var = la._glm_predictive_distribution(x_test.float())[1]
    assert (f_var.double() - expected).abs().max() < 100 * eps * expected.abs().max()
