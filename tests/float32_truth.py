"""Ground truth for float32 models: the same weights and data in float64, and the input floor.

A float32 network gives Jacobians, features and outputs with a relative error of a few
units of float32 round-off; nothing downstream can be more accurate than those inputs allow.
For every quantity the float32 tests therefore compute two references, both by brute force
in float64 and independent of the library:

- the **truth**: the model and the data upcast to float64, every quantity from them;
- the **floor**: the float32 model's own Jacobians, features and outputs (evaluated here with
  ``torch.func`` in float32) upcast to float64, and every quantity from them in float64 —
  what an implementation achieves that adds no error of its own to its inputs.

A library result passes when its error against the truth is at most a small multiple of the
floor's error against the truth plus a few units of float32 round-off for its final cast
(see :func:`tolerance`). Curvatures summed in float32 miss this by orders of magnitude on the
hard cases: their error is about ``eps * lambda_max`` in every direction, while the floor's
is quadratic in ``eps`` along the (near) null directions of the Jacobians.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

EPS = torch.finfo(torch.float32).eps
"""float32 round-off (the spacing of float32 numbers at 1)."""

FLOOR_FACTOR = 3.0
"""Margin on the floor: the library and the floor evaluate the float32 network in different
orders of operations, so their round-off differs by a factor of order one."""

CAST_EPS = 16 * EPS
"""Relative error allowed for the library's own arithmetic beyond its inputs: the final cast
of a result to float32 (``eps / 2``) and a few roundings in products with the factors."""


def tolerance(floor_error: float, scale: float = 1.0) -> float:
    """The allowed error of a library result: ``3 * floor + 16 eps * scale``."""
    return FLOOR_FACTOR * floor_error + CAST_EPS * scale


# ----------------------------------------------------------------------------- problems
def relu_mlp(n_in: int, n_out: int, seed: int) -> nn.Module:
    """A float32 ReLU MLP ``n_in-24-24-n_out`` whose first hidden layer has six dead units
    (a bias of -50 keeps them inactive on standard-normal inputs): their outgoing weights
    get no curvature at all, and the input factor of the second layer is singular."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(n_in, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, n_out)
    )
    with torch.no_grad():
        model[0].bias[:6] = -50.0
    return model.float().eval()


def relu_cnn(n_out: int, seed: int) -> nn.Module:
    """A small float32 ReLU CNN on ``1x8x8`` images, 16 features before its last layer."""
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 16),
            nn.ReLU(),
            nn.Linear(16, n_out),
        )
        .float()
        .eval()
    )


def make_data(
    likelihood: str, n: int, n_out: int, shape: tuple[int, ...], seed: int
) -> tuple[Tensor, Tensor]:
    """float32 inputs of ``shape`` and targets: labels, or noisy regression targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float32)
    if likelihood == "classification":
        return x, torch.randint(n_out, (n,), generator=g)
    return x, torch.randn(n, n_out, generator=g, dtype=torch.float32)


# ----------------------------------------------------------------------------- evaluations
def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def jacobians(model: nn.Module, x: Tensor, chunk: int = 500) -> tuple[Tensor, Tensor]:
    """Per-sample Jacobians ``(n, outputs, params)`` and outputs of ``model`` at ``x``, in
    the model's dtype."""
    named = {k: v.detach() for k, v in trainable(model).items()}

    def one(theta: dict[str, Tensor], xi: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(model, theta, (xi.unsqueeze(0),))[0]
        return out, out

    parts, outs = [], []
    for xs in x.split(chunk):
        jac, f = vmap(jacrev(one, has_aux=True), in_dims=(None, 0))(named, xs)
        parts.append(torch.cat([jac[k].flatten(2) for k in named], dim=2))
        outs.append(f)
    return torch.cat(parts), torch.cat(outs)


def per_sample_gradients(
    model: nn.Module, x: Tensor, y: Tensor, likelihood: str, chunk: int = 500
) -> Tensor:
    """Gradients ``(n, params)`` of each sample's loss, in the model's dtype."""
    named = {k: v.detach() for k, v in trainable(model).items()}

    def one(theta: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, theta, (xi.unsqueeze(0),))
        return total_loss(out, yi.unsqueeze(0), likelihood)

    parts = []
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        grads = vmap(torch.func.grad(one), in_dims=(None, 0, 0))(named, xs, ys)
        parts.append(torch.cat([grads[k].flatten(1) for k in named], dim=1))
    return torch.cat(parts)


def layer_inputs(model: nn.Module, x: Tensor) -> dict[nn.Module, Tensor]:
    """The input of every ``nn.Linear`` of ``model`` at ``x``."""
    seen: dict[nn.Module, Tensor] = {}
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(lambda m, a, o: seen.update({m: a[0]})) for m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def output_hessians(f: Tensor, likelihood: str) -> Tensor:
    """``Lambda_n`` of the library's losses (summed cross-entropy, ``0.5 ||f - y||^2``)."""
    if likelihood == "regression":
        return torch.eye(f.shape[1], dtype=f.dtype).expand(f.shape[0], -1, -1)
    p = torch.softmax(f, dim=-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def total_loss(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    if likelihood == "regression":
        return 0.5 * ((f - y) ** 2).sum()
    return nn.functional.cross_entropy(f, y, reduction="sum")


@dataclass
class Evaluation:
    """What the float32 network gives on the data, upcast to float64 (``floor``) or computed
    by its float64 copy (``truth``)."""

    J: Tensor  # (n, outputs, params)
    f: Tensor  # (n, outputs)
    inputs: dict[str, Tensor]  # per Linear weight name: its layer's inputs (n, in)
    J_test: Tensor
    f_test: Tensor
    inputs_test: dict[str, Tensor]
    grads: Tensor  # (n, params): per-sample loss gradients (the empirical Fisher's rows)


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, x_test: Tensor, likelihood: str, precision: str
) -> Evaluation:
    """Evaluate ``model`` (float32) in float64 (``"truth"``) or float32 (``"floor"``)."""
    if precision == "truth":
        model, x, x_test = copy.deepcopy(model).double(), x.double(), x_test.double()
    y = y.to(x.dtype) if y.is_floating_point() else y
    grads = per_sample_gradients(model, x, y, likelihood)
    J, f = jacobians(model, x)
    J_test, f_test = jacobians(model, x_test)
    names = {id(m): n for n, m in model.named_modules()}

    def inputs(points: Tensor) -> dict[str, Tensor]:
        seen = layer_inputs(model, points)
        return {f"{names[id(m)]}.weight": a.double() for m, a in seen.items()}

    return Evaluation(
        J.double(),
        f.double(),
        inputs(x),
        J_test.double(),
        f_test.double(),
        inputs(x_test),
        grads.double(),
    )


# ----------------------------------------------------------------------------- curvatures
def ggn(e: Evaluation, likelihood: str, kind: str = "ggn") -> Tensor:
    """Dense GGN ``sum J^T Lambda J`` or empirical Fisher ``sum g g^T``, ``g = J^T dl/df``."""
    if kind == "ef":
        return e.grads.T @ e.grads
    return torch.einsum("ncp,ncd,ndq->pq", e.J, output_hessians(e.f, likelihood), e.J)


def kfac(model: nn.Module, e: Evaluation, likelihood: str, kind: str = "ggn") -> Tensor:
    """Dense K-FAC of an MLP (every layer with a bias), from the evaluation: per layer
    ``B = sum_n G_n^T Lambda_n G_n`` (EF: ``sum_n G_n^T g g^T G_n``) with ``G_n`` the
    Jacobian w.r.t. the layer's bias (its output), ``A = sum_n a_n a_n^T / N``; blocks
    ``kron(B, A)`` for the weight and ``B`` for the bias."""
    sizes = [p.numel() for p in trainable(model).values()]
    names = list(trainable(model))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    n = e.f.shape[0]
    lam = output_hessians(e.f, likelihood)
    blocks = []
    for name in names:
        bias_index = names.index(name.replace("weight", "bias"))
        columns = slice(starts[bias_index], starts[bias_index] + sizes[bias_index])
        a = e.inputs[name.replace("bias", "weight")]
        if kind == "ef":  # the gradient w.r.t. a layer's bias is its output gradient
            g = e.grads[:, columns]
            B = g.T @ g
        elif len(a) != n:  # rows folded into the layer's batch, output c from row c only:
            G = e.J[:, :, columns]  # each row is a data point (the "expand" convention)
            B = torch.einsum("nco,nc,ncq->oq", G, lam.diagonal(dim1=1, dim2=2), G)
        else:
            G = e.J[:, :, columns]
            B = torch.einsum("nco,ncd,ndq->oq", G, lam, G)
        if name.endswith("weight"):
            a = e.inputs[name]
            blocks.append(torch.kron(B.contiguous(), (a.T @ a / n).contiguous()))
        else:
            blocks.append(B)
    return torch.block_diag(*blocks)


def low_rank(H: Tensor, k: int) -> Tensor:
    """The best rank-``k`` approximation of a PSD ``H`` (its top eigenpairs)."""
    values, vectors = torch.linalg.eigh(H)
    top = vectors[:, -k:]
    return (top * values[-k:].clamp(min=0)) @ top.T


# ----------------------------------------------------------------------------- posterior
def precision(H: Tensor, factor: float, prior: Tensor) -> Tensor:
    return factor * H + torch.diag(prior)


def log_marglik(
    H: Tensor,
    loss: Tensor,
    theta: Tensor,
    prior: Tensor,
    sigma: Tensor,
    n: int,
    n_out: int,
    likelihood: str,
) -> Tensor:
    """The Laplace log marginal likelihood, differentiable in ``prior`` and ``sigma``."""
    factor = 1 / sigma**2 if likelihood == "regression" else torch.ones((), dtype=H.dtype)
    log_lik = -factor * loss
    if likelihood == "regression":
        log_lik = log_lik - n * n_out * torch.log(sigma * math.sqrt(2 * math.pi))
    P = factor * H + torch.diag(prior)
    log_det = torch.linalg.slogdet(P)[1] - prior.log().sum()
    return log_lik - 0.5 * (log_det + (prior * theta**2).sum())


def loewner_error(P: Tensor, P_ref: Tensor) -> float:
    """``max |eig(L^-1 P L^-T) - 1|`` with ``P_ref = L L^T``: the relative error of ``P`` as a
    quadratic form, in every direction (and of ``P^-1`` to first order)."""
    L = torch.linalg.cholesky(P_ref)
    W = torch.linalg.solve_triangular(L, P.double(), upper=False)
    W = torch.linalg.solve_triangular(L, W.T, upper=False)
    return (torch.linalg.eigvalsh((W + W.T) / 2) - 1).abs().max().item()


def scaled_error(C: Tensor, C_ref: Tensor) -> float:
    """``max |C - C_ref|_ij / sqrt(C_ref_ii C_ref_jj)`` for covariance-like matrices (batched
    over leading dimensions); the relative error of every (co)variance."""
    d = C_ref.diagonal(dim1=-2, dim2=-1).sqrt()
    return ((C.double() - C_ref).abs() / (d.unsqueeze(-1) * d.unsqueeze(-2))).max().item()


def probit(f: Tensor, f_var: Tensor) -> Tensor:
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=-2, dim2=-1))
    return torch.softmax(kappa * f, dim=-1)


def bridge(f: Tensor, f_var: Tensor, normalize: bool = False) -> Tensor:
    """Mean of the Laplace-bridge Dirichlet (Hobbhahn et al., 2022) after conditioning the
    logits on ``sum(f) = 0``, in float64; ``normalize`` rescales the variances to a mean of
    ``sqrt(K / 2)`` first (``bridge_norm``)."""
    n_classes = f.shape[-1]
    row_sums = f_var.sum(-1)
    total = row_sums.sum(-1, keepdim=True)
    f = f - row_sums * f.sum(-1, keepdim=True) / total
    var = f_var - row_sums.unsqueeze(-1) * row_sums.unsqueeze(-2) / total.unsqueeze(-1)
    var = var.diagonal(dim1=-2, dim2=-1)
    if normalize:
        mean_var = var.mean(-1, keepdim=True) / math.sqrt(n_classes / 2)
        f, var = f / mean_var.sqrt(), var / mean_var
    sum_exp = torch.exp(-f).sum(-1, keepdim=True)
    alpha = (1 - 2 / n_classes + f.exp() / n_classes**2 * sum_exp) / var
    return alpha / alpha.sum(-1, keepdim=True)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name (of its weight) and the module of the last ``nn.Linear`` of ``model``."""
    name, layer = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return f"{name}.weight", layer


def last_layer_evaluation(model: nn.Module, e: Evaluation) -> Evaluation:
    """``e`` restricted to the parameters of the last linear layer (the trailing entries of
    the parameter vector: its weight, then its bias)."""
    _, layer = last_linear(model)
    size = sum(p.numel() for p in layer.parameters())
    return Evaluation(
        e.J[..., -size:],
        e.f,
        e.inputs,
        e.J_test[..., -size:],
        e.f_test,
        e.inputs_test,
        e.grads[:, -size:],
    )


def last_layer_kfac(model: nn.Module, e: Evaluation, likelihood: str, kind: str) -> Tensor:
    """Dense K-FAC of the last linear layer: ``kron(B, A)`` and ``B`` with
    ``B = sum_n Lambda_n`` (EF: the Gram of the output gradients, the bias gradients) and
    ``A = sum_n phi_n phi_n^T / N``; ``e`` is restricted to the last layer."""
    name, layer = last_linear(model)
    phi = e.inputs[name]
    if kind == "ef":
        g = e.grads[:, -layer.out_features :]
        B = g.T @ g
    else:
        B = output_hessians(e.f, likelihood).sum(0)
    return torch.block_diag(torch.kron(B.contiguous(), (phi.T @ phi / len(phi)).contiguous()), B)
