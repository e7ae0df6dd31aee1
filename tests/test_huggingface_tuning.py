"""Hugging Face models beyond the seed example: every last-layer feature reduction,
``requires_grad`` subsets with ``peft`` adapters, prior tuning and exact K-FAC.

The tiny random-weight GPT-2 and BERT models, the offline tokenizer, the
``DataCollatorWithPadding`` loaders of ``UserDict`` batches and the brute-force float64
references (per-sample, per-output ``torch.autograd`` loops, no ``vmap``) come from
:mod:`test_huggingface`. Three ways of pooling a sequence meet the last layer:

- ``gpt2``: the seed document's ``MyGPT2``; ``GPT2ForSequenceClassification`` applies its
  head to every token and keeps the logits of the last real token, which, with right
  padding, no ``feature_reduction`` reproduces: the library must see that the output is not
  the head applied to the reduced features and differentiate the real output;
- ``gpt2-pooled``: GPT-2 with a head on every token whose logits are reduced over the
  positions exactly as the features are (first, last, mean), so the closed form applies;
- ``bert``: ``BertForSequenceClassification`` applies its head to the pooled ``[CLS]``
  vector, ``(batch, hidden)`` features that no reduction changes.
"""

from __future__ import annotations

import math
from collections import UserDict
from collections.abc import MutableMapping

import pytest
import torch
from torch import nn

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face tests need the `hf` extra (transformers)"
)
peft = pytest.importorskip("peft", reason="the Hugging Face tests need the `hf` extra (peft)")
pytest.importorskip("tokenizers", reason="the Hugging Face tests need the `hf` extra")

from test_huggingface import (  # noqa: E402
    HEADS,
    LORA_TARGETS,
    TOKENIZER,
    VOCAB,
    brute_ggn,
    brute_jacobians,
    brute_kfac,
    dense_precision,
    make_loader,
    make_model,
    samples,
    trainable,
)

from laplace import Laplace  # noqa: E402

TOL = {"rtol": 1e-7, "atol": 1e-9}
REDUCTIONS = ["pick_first", "pick_last", "average"]


class PooledGPT2(nn.Module):
    """GPT-2 whose head runs on every token and whose logits are reduced over all positions
    (padding included) by ``reduction``: the output is the head applied to the reduced
    features, the premise of the last-layer closed form."""

    def __init__(self, reduction: str) -> None:
        super().__init__()
        config = transformers.GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=len(VOCAB),
            n_positions=32,
            pad_token_id=TOKENIZER.pad_token_id,
            attn_implementation="eager",
        )
        self.transformer = transformers.GPT2Model(config)
        self.score = nn.Linear(32, 2)
        self.reduction = reduction

    def forward(self, data: MutableMapping) -> torch.Tensor:
        hidden = self.transformer(
            input_ids=data["input_ids"], attention_mask=data["attention_mask"]
        ).last_hidden_state
        logits = self.score(hidden)
        if self.reduction == "pick_first":
            return logits[:, 0]
        if self.reduction == "pick_last":
            return logits[:, -1]
        return logits.mean(dim=1)


def make_head_model(kind: str, reduction: str) -> nn.Module:
    """A float64 model in eval mode with only its classification head trainable."""
    if kind != "gpt2-pooled":
        return make_model(kind, "eager", "head")
    torch.manual_seed(0)
    model = PooledGPT2(reduction).double()
    for p in model.transformer.parameters():
        p.requires_grad_(False)
    return model.eval()


def make_subset_model(name: str, subset: str) -> nn.Module:
    """A float64 model in eval mode whose trainable parameters are

    - ``"lora+head"``: LoRA adapters and the head, which ``peft`` trains as a copy
      (``modules_to_save``), as for sequence classification;
    - ``"inner+head"``: without ``peft``, the second block's attention output projection
      and the head.
    """
    torch.manual_seed(0)
    model = make_model(name, "eager", "head")
    if subset == "inner+head":
        inner = (
            model.hf_model.transformer.h[1].attn.c_proj
            if name == "gpt2"
            else model.hf_model.bert.encoder.layer[1].attention.output.dense
        )
        for p in inner.parameters():
            p.requires_grad_(True)
        return model
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=LORA_TARGETS[name],
        modules_to_save=[HEADS[name]],
        lora_dropout=0.1,
        bias="none",
        fan_in_fan_out=name == "gpt2",
    )
    model = peft.get_peft_model(model, config)
    with torch.no_grad():  # LoRA's B starts at zero: perturb it so every Jacobian is nonzero
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0.0, 0.1)
    return model.eval()


def reduced_features(model: nn.Module, x: MutableMapping, reduction: str) -> torch.Tensor:
    """The head's inputs reduced over the sequence by hand, ``(batch, hidden)``."""
    captured = []
    head = model.score if isinstance(model, PooledGPT2) else model.hf_model.classifier
    handle = head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    phi = captured[0]
    if phi.ndim == 2:
        return phi
    if reduction == "pick_first":
        return phi[:, 0]
    if reduction == "pick_last":
        return phi[:, -1]
    return phi.mean(dim=1)


def last_layer_kfac(model: nn.Module, loader, reduction: str) -> torch.Tensor:
    """``[B ⊗ A, B]`` with ``B = sum_n Lambda_n`` and ``A = sum_n phi_n phi_n^T / N``."""
    B, A, n_data = 0.0, 0.0, len(loader.dataset)
    for x, _ in samples(loader):
        p = torch.softmax(brute_jacobians(model, x)[1][0], dim=-1)
        phi = reduced_features(model, x, reduction)[0]
        B = B + torch.diag(p) - torch.outer(p, p)
        A = A + torch.outer(phi, phi) / n_data
    return torch.block_diag(torch.kron(B, A), B)


def check_probabilities(la, x: MutableMapping) -> None:
    for kwargs in ({"link_approx": "probit"}, {"pred_type": "nn", "n_samples": 5}):
        probs = la(x, **kwargs)
        assert probs.shape == (x["input_ids"].shape[0], 2)
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)), **TOL)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["gpt2", "gpt2-pooled", "bert"])
def test_last_layer_feature_reduction_matches_brute_force(kind, reduction, structure):
    """The last-layer curvature and GLM variance equal those of the real output w.r.t. the
    head, whether or not the output is the head applied to the reduced features."""
    model = make_head_model(kind, reduction)
    loader = make_loader()
    la = Laplace(model, "classification", "last_layer", structure, feature_reduction=reduction)
    la.fit(loader)
    x = next(iter(loader))
    assert la.subset.applies_layer(*la.subset.features(x)) == (kind != "gpt2")
    if structure == "kron":
        # GPT-2's own pooling is no closed form: the whole network's K-FAC w.r.t. the head
        expected = (
            brute_kfac(model, loader)
            if kind == "gpt2"
            else last_layer_kfac(model, loader, reduction)
        )
        torch.testing.assert_close(la.H.to_matrix(), expected, **TOL)
    else:
        ggn = brute_ggn(model, loader)
        torch.testing.assert_close(la.H, ggn.diagonal() if structure == "diag" else ggn, **TOL)

    Js, f = brute_jacobians(model, x)
    f_mu_la, f_var_la = la._glm_predictive_distribution(x)
    torch.testing.assert_close(f_mu_la, f, **TOL)
    f_var = Js @ torch.linalg.solve(dense_precision(la), Js.mT)
    torch.testing.assert_close(f_var_la, f_var, **TOL)
    check_probabilities(la, x)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("subset", ["lora+head", "inner+head"])
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_requires_grad_subsets_match_brute_force(name, subset, structure):
    """All-weights Laplace over the trainable parameters (adapters plus a trained copy of the
    head, or inner layers plus the head) against the dense GGN and the per-sample K-FAC."""
    model = make_subset_model(name, subset)
    loader = make_loader()
    la = Laplace(model, "classification", "all", structure)
    if structure == "kron" and subset == "inner+head" and name == "gpt2":
        # GPT-2's projections are transformers' Conv1D, for which K-FAC is not implemented
        with pytest.raises(ValueError, match="Conv1D"):
            la.fit(loader)
        return
    la.fit(loader)
    if structure == "kron":
        torch.testing.assert_close(la.H.to_matrix(), brute_kfac(model, loader), **TOL)
    else:
        ggn = brute_ggn(model, loader)
        torch.testing.assert_close(la.H, ggn.diagonal() if structure == "diag" else ggn, **TOL)
    check_probabilities(la, next(iter(loader)))


def single_token_loader(name: str):
    """A data set of one sample of one token: K-FAC is then exact for every linear layer."""
    collator = transformers.DataCollatorWithPadding(TOKENIZER)
    rows = [{**TOKENIZER("cat"), "labels": 1}]
    assert len(rows[0]["input_ids"]) == 1
    return torch.utils.data.DataLoader(rows, batch_size=1, collate_fn=collator)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_lora_kfac_is_the_ggn_block_diagonal_where_exact(name):
    """With one sample of one token (no weight sharing, one data point), ``B ⊗ A`` of every
    LoRA (and head) layer is that parameter's block of the dense GGN, which itself couples
    the parameters (so the check is not vacuous). Attention over a single key does not
    depend on the query, so the value adapters and the head carry the check; the
    per-sample K-FAC reference covers longer, padded sequences above."""
    model = make_subset_model(name, "lora+head")
    loader = single_token_loader(name)
    kron = Laplace(model, "classification", "all", "kron")
    kron.fit(loader)
    full = Laplace(model, "classification", "all", "full")
    full.fit(loader)
    ggn = brute_ggn(model, loader)
    torch.testing.assert_close(full.H, ggn, **TOL)
    sizes = [p.numel() for p in trainable(model)]
    blocks = [torch.ones(n, n) for n in sizes]
    mask = torch.block_diag(*blocks).bool()
    assert ggn[~mask].abs().max() > 1e-3
    torch.testing.assert_close(kron.H.to_matrix(), torch.where(mask, ggn, 0.0), **TOL)


APPROXIMATIONS = [
    pytest.param("last_layer", "kron", id="last_layer-kron"),
    pytest.param("all", "kron", id="lora-kron"),
    pytest.param("all", "diag", id="lora-diag"),
]


def make_tuned_laplace(name: str, subset: str, structure: str):
    model = make_subset_model(name, "lora+head")
    kwargs = {"feature_reduction": "pick_last"} if subset == "last_layer" else {}
    la = Laplace(model, "classification", subset, structure, **kwargs)
    la.fit(make_loader())
    return la


@pytest.mark.parametrize(("subset", "structure"), APPROXIMATIONS)
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_marglik_prior_tuning_finds_the_maximum(name, subset, structure):
    """``method="marglik"`` ends where the log marginal likelihood is maximal over the
    scalar prior precision (its neighbours on either side are lower)."""
    la = make_tuned_laplace(name, subset, structure)
    la.optimize_prior_precision(method="marglik", n_steps=200)
    tuned = la.prior_precision.detach().clone()
    with torch.no_grad():
        best = float(la.log_marginal_likelihood(tuned))
        for factor in (0.8, 1.25):
            assert float(la.log_marginal_likelihood(tuned * factor)) < best
    la.prior_precision = tuned
    check_probabilities(la, next(iter(make_loader(seed=1))))


@pytest.mark.parametrize(("subset", "structure"), APPROXIMATIONS)
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_gridsearch_prior_tuning_on_dict_batches(name, subset, structure):
    """``method="gridsearch"`` on a validation loader of ``UserDict`` batches keeps the grid
    point with the lowest validation NLL of the probit predictive, recomputed here."""
    la = make_tuned_laplace(name, subset, structure)
    val_loader = make_loader(n=8, seed=1)
    assert isinstance(next(iter(val_loader)), UserDict)
    grid = {"log_prior_prec_min": -2.0, "log_prior_prec_max": 2.0, "grid_size": 5}
    la.optimize_prior_precision(method="gridsearch", val_loader=val_loader, **grid)
    chosen = float(la.prior_precision)

    nlls = []
    for prior_precision in torch.logspace(-2, 2, 5).tolist():
        la.prior_precision = prior_precision
        total = 0.0
        for batch in val_loader:
            probs = la(batch, link_approx="probit")
            torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)), **TOL)
            total -= probs.gather(-1, batch["labels"][:, None]).log().sum().item()
        nlls.append((total, prior_precision))
    assert math.isclose(chosen, min(nlls)[1], rel_tol=1e-12)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_fit_tune_predict_change_no_weight_nor_flag(name):
    """Fitting, tuning (both methods) and predicting with the adapters' and the last layer's
    Laplace leave every weight of an eval-mode model bit for bit, every ``requires_grad``
    flag and the eval mode as they were (the last layer's GPT-2 fallback differentiates the
    whole model with the adapters switched off for a while)."""
    model = make_subset_model(name, "lora+head")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    loader, val_loader = make_loader(), make_loader(seed=1)
    x = next(iter(val_loader))
    for subset, kwargs in (("all", {}), ("last_layer", {"feature_reduction": "pick_last"})):
        la = Laplace(model, "classification", subset, "kron", **kwargs)
        la.fit(loader)
        la.optimize_prior_precision(method="marglik", n_steps=10)
        la.optimize_prior_precision(method="gridsearch", val_loader=val_loader, grid_size=3)
        la(x)
        la(x, pred_type="nn", n_samples=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert not any(m.training for m in model.modules())
