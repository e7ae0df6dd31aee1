"""The seed document's Hugging Face example on tiny random-weight GPT-2 and BERT models.

The models take ``UserDict`` batches from ``DataCollatorWithPadding`` (a word-level tokenizer
built offline), with the default ``sdpa`` and the ``eager`` attention. ``sdpa``'s attention
mask code has data-dependent control flow that ``torch.func.vmap`` cannot batch, and its
CPU kernel has no forward-mode derivative: the backends fall back once per model
(:mod:`laplace.curvature._fallback`), which these tests check against brute-force float64
references built from ``torch.autograd`` loops over samples and outputs (no ``vmap``).
"""

from __future__ import annotations

from collections import UserDict
from collections.abc import MutableMapping

import pytest
import torch
from kfac_reference import _hessian_sqrt, _layers, _output_rows, _patches, kfac_blocks
from torch import nn
from torch.utils.data import DataLoader

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face tests need the `hf` extra (transformers)"
)
peft = pytest.importorskip("peft", reason="the Hugging Face tests need the `hf` extra (peft)")
tokenizers = pytest.importorskip(
    "tokenizers", reason="the Hugging Face tests need the `hf` extra (tokenizers)"
)

import laplace.curvature.interface as interface_module  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian  # noqa: E402
from laplace.curvature._fallback import (  # noqa: E402
    FastPath,
    cannot_take,
    lacks,
    math_attention,
)

transformers.logging.set_verbosity_error()

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "fast", "slow", "big", "red"]
VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
TOL = {"rtol": 1e-7, "atol": 1e-9}


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer that needs no download; pads on the right."""
    model = tokenizers.models.WordLevel(VOCAB, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )


TOKENIZER = make_tokenizer()


def make_loader(n: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Sentences of 2-7 words with alternating labels, padded per batch by the collator."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(2, 8, (1,), generator=g))
        words = torch.randint(len(WORDS), (length,), generator=g)
        text = "[CLS] " + " ".join(WORDS[j] for j in words)
        rows.append({**TOKENIZER(text), "labels": i % 2})
    collator = transformers.DataCollatorWithPadding(TOKENIZER)
    return DataLoader(rows, batch_size=batch_size, collate_fn=collator)


class MyGPT2(nn.Module):
    """The seed's wrapper: forward takes the dict batch, returns the sequence logits."""

    def __init__(self, attn: str) -> None:
        super().__init__()
        config = transformers.GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=len(VOCAB),
            n_positions=32,
            pad_token_id=TOKENIZER.pad_token_id,
            num_labels=2,
            attn_implementation=attn,
        )
        self.hf_model = transformers.GPT2ForSequenceClassification(config)

    def forward(self, data: MutableMapping) -> torch.Tensor:
        device = next(self.parameters()).device
        input_ids = data["input_ids"].to(device)
        attn_mask = data["attention_mask"].to(device)
        return self.hf_model(input_ids=input_ids, attention_mask=attn_mask).logits


class MyBert(nn.Module):
    """The same wrapper around a tiny ``BertForSequenceClassification``."""

    def __init__(self, attn: str) -> None:
        super().__init__()
        config = transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=len(VOCAB),
            max_position_embeddings=32,
            pad_token_id=TOKENIZER.pad_token_id,
            num_labels=2,
            attn_implementation=attn,
        )
        self.hf_model = transformers.BertForSequenceClassification(config)

    def forward(self, data: MutableMapping) -> torch.Tensor:
        device = next(self.parameters()).device
        input_ids = data["input_ids"].to(device)
        attn_mask = data["attention_mask"].to(device)
        return self.hf_model(input_ids=input_ids, attention_mask=attn_mask).logits


LORA_TARGETS = {"gpt2": ["c_attn"], "bert": ["query", "value"]}
HEADS = {"gpt2": "score", "bert": "classifier"}


def make_model(name: str, attn: str, adapter: str) -> nn.Module:
    """A float64 model in eval mode with only the head (``"head"``) or LoRA adapters
    (``"lora"``, via ``peft``) trainable."""
    torch.manual_seed(0)
    model = (MyGPT2 if name == "gpt2" else MyBert)(attn).double()
    if adapter == "lora":
        config = peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=LORA_TARGETS[name],
            lora_dropout=0.1,
            bias="none",
            fan_in_fan_out=name == "gpt2",  # transformers' Conv1D stores the weight transposed
        )
        model = peft.get_peft_model(model, config)
        with torch.no_grad():  # LoRA's B starts at zero: perturb it so every Jacobian is nonzero
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, 0.1)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in getattr(model.hf_model, HEADS[name]).parameters():
            p.requires_grad_(True)
    return model.eval()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def samples(loader: DataLoader):
    """Every sample as a batch of one (keeping its batch's padding), with its label."""
    for batch in loader:
        for n in range(batch["labels"].shape[0]):
            yield UserDict({k: v[n : n + 1] for k, v in batch.items()}), batch["labels"][n]


def brute_jacobians(model: nn.Module, x: MutableMapping) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Js, f)`` of a batch by one backward pass per sample and output (no ``vmap``)."""
    params = trainable(model)
    Js, fs = [], []
    for n in range(x["input_ids"].shape[0]):
        f = model(UserDict({k: v[n : n + 1] for k, v in x.items()}))[0]
        rows = []
        for c in range(f.shape[0]):
            grads = torch.autograd.grad(
                f[c], params, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        Js.append(torch.stack(rows))
        fs.append(f.detach())
    return torch.stack(Js), torch.stack(fs)


def brute_ggn(model: nn.Module, loader: DataLoader) -> torch.Tensor:
    """``sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n`` over the data set."""
    total = 0.0
    for x, _ in samples(loader):
        Js, f = brute_jacobians(model, x)
        p = torch.softmax(f[0], dim=-1)
        total = total + Js[0].T @ (torch.diag(p) - torch.outer(p, p)) @ Js[0]
    return total


def brute_kfac(model: nn.Module, loader: DataLoader) -> torch.Tensor:
    """The dense block-diagonal K-FAC ("expand") by per-sample loops (see ``kfac_reference``)."""
    layers = _layers(model)
    n_data = len(loader.dataset)
    A = {m: 0.0 for m in layers}
    B = {m: 0.0 for m in layers}
    for x, y in samples(loader):
        captured = {}
        handles = [
            m.register_forward_hook(lambda mod, inp, out: captured.update({mod: (inp[0], out)}))
            for m in layers
        ]
        f = model(x)[0]
        for handle in handles:
            handle.remove()
        outputs = [captured[m][1] for m in layers]
        for column in _hessian_sqrt(f, y, "classification").T:
            grads = torch.autograd.grad(f @ column, outputs, retain_graph=True)
            for m, g in zip(layers, grads):
                rows = _output_rows(m, g)
                B[m] = B[m] + rows.T @ rows
        for m in layers:
            a = _patches(m, captured[m][0].detach())
            A[m] = A[m] + a.T @ a / (n_data * a.shape[0])
    by_param = {}
    for m in layers:
        by_param[m.weight] = [B[m], A[m]]
        if m.bias is not None:
            by_param[m.bias] = [B[m]]
    return torch.block_diag(*kfac_blocks([by_param[p] for p in trainable(model)]))


def dense_precision(la) -> torch.Tensor:
    P = la.posterior_precision
    if isinstance(P, torch.Tensor):
        return torch.diag(P) if P.ndim == 1 else P
    return P.to_matrix()


CASES = [
    pytest.param(name, attn, adapter, id=f"{name}-{attn}-{adapter}")
    for name in ("gpt2", "bert")
    for attn in ("sdpa", "eager")
    for adapter in ("head", "lora")
]


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize(("name", "attn", "adapter"), CASES)
def test_fit_and_glm_predictive_match_brute_force(name, attn, adapter, structure):
    """Curvature and GLM predictive (probit, mc) against per-sample autograd loops."""
    model = make_model(name, attn, adapter)
    loader = make_loader()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(loader)
    ggn = brute_ggn(model, loader)
    if structure == "diag":
        torch.testing.assert_close(la.H, ggn.diagonal(), **TOL)
    elif structure == "full":
        torch.testing.assert_close(la.H, ggn, **TOL)
    else:
        torch.testing.assert_close(la.H.to_matrix(), brute_kfac(model, loader), **TOL)

    x = next(iter(loader))
    Js, f = brute_jacobians(model, x)
    f_var = Js @ torch.linalg.solve(dense_precision(la), Js.mT)
    f_mu_la, f_var_la = la._glm_predictive_distribution(x)
    torch.testing.assert_close(f_mu_la, f, **TOL)
    torch.testing.assert_close(f_var_la, f_var, **TOL)
    kappa = torch.rsqrt(1 + torch.pi / 8 * f_var.diagonal(dim1=-2, dim2=-1))
    torch.testing.assert_close(la(x, link_approx="probit"), torch.softmax(kappa * f, -1), **TOL)
    mc = la(x, link_approx="mc", n_samples=20, generator=torch.Generator().manual_seed(0))
    assert mc.shape == (4, 2) and torch.allclose(mc.sum(-1), torch.ones(4))


@pytest.mark.parametrize(("name", "attn"), [("gpt2", "sdpa"), ("bert", "eager")])
def test_empirical_fisher_and_backprop_jacobians_match_brute_force(name, attn):
    """Per-sample loss gradients (EF diagonal) and differentiable Jacobians on the fallback."""
    model = make_model(name, attn, "lora")
    loader = make_loader()
    la = Laplace(model, "classification", "all", "diag", backend=CurvlinopsEF)
    la.fit(loader)
    grads = []
    for x, y in samples(loader):
        loss = nn.functional.cross_entropy(model(x), y[None], reduction="sum")
        grads.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainable(model))])
        )
    torch.testing.assert_close(la.H, torch.stack(grads).square().sum(0), **TOL)

    x = next(iter(loader))
    Js, f = CurvlinopsGGN(model, "classification").jacobians(x, enable_backprop=True)
    assert Js.requires_grad and f.requires_grad
    torch.testing.assert_close(Js.detach(), brute_jacobians(model, x)[0], **TOL)


@pytest.mark.parametrize("backend", [CurvlinopsGGN, CurvlinopsEF, CurvlinopsHessian])
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_forward_mode_curvatures_on_sdpa_equal_eager(name, backend):
    """``curvlinops``' operators need forward-mode autodiff, which the CPU ``sdpa`` kernel
    lacks: they run with the math kernel and agree with the ``eager`` attention."""
    loader = make_loader()
    x = next(iter(loader))
    results = []
    for attn in ("sdpa", "eager"):
        model = make_model(name, attn, "lora")
        kwargs = {"stochastic": True} if backend is CurvlinopsGGN else {}
        be = backend(model, "classification", **kwargs)
        results.append(be.full(x, x["labels"], seed=3) if kwargs else be.full(x, x["labels"]))
        if backend is CurvlinopsHessian:
            h = be.diag(x, x["labels"])[1]
            torch.testing.assert_close(h, results[-1][1].diagonal(), **TOL)
    torch.testing.assert_close(results[0], results[1], **TOL)


def test_vmap_fails_once_then_falls_back(monkeypatch):
    """The first vmapped call on sdpa GPT-2 fails; every later one takes the loop directly."""
    calls = []
    vmap = interface_module.vmap

    def counting_vmap(*args, **kwargs):
        calls.append(1)
        return vmap(*args, **kwargs)

    monkeypatch.setattr(interface_module, "vmap", counting_vmap)
    model = make_model("gpt2", "sdpa", "head")
    loader = make_loader(n=12)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(loader)
    la(next(iter(loader)))
    assert len(calls) == 1 and lacks(model, FastPath.VMAP)

    calls.clear()
    eager = make_model("gpt2", "eager", "head")
    la = Laplace(eager, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(loader)
    assert len(calls) == 3 and not lacks(eager, FastPath.VMAP)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_fit_keeps_frozen_weights_and_mode(structure, training):
    """Fitting and predicting change no weight, bit for bit, and leave every module in the
    train/eval mode it was given (both run the network in eval mode: the curvature and the
    predictive of a deterministic network; dropout would make them random)."""
    model = make_model("gpt2", "sdpa", "lora").train(training)
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = make_loader()
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(loader)
    la(next(iter(loader)))
    la(next(iter(loader)), pred_type="nn", n_samples=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")
def test_seed_example_runs():
    """The seed document's three Hugging Face Laplace approximations, as written there."""
    model = MyGPT2("sdpa").double().eval()
    loader = make_loader()
    X_test = next(iter(loader))
    la = Laplace(
        model,
        likelihood="classification",
        subset_of_weights="last_layer",
        hessian_structure="full",
        feature_reduction="pick_last",
    )
    la.fit(loader)
    la.optimize_prior_precision()
    assert la(X_test).shape == (4, 2)

    for p in model.hf_model.parameters():
        p.requires_grad = False
    for p in model.hf_model.score.parameters():
        p.requires_grad = True
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(loader)
    la.optimize_prior_precision()
    assert la(X_test).shape == (4, 2)

    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.1, bias="none"
    )
    lora_model = peft.get_peft_model(MyGPT2("sdpa").double(), config).eval()
    lora_la = Laplace(
        lora_model, "classification", subset_of_weights="all", hessian_structure="kron"
    )
    lora_la.fit(loader)
    assert lora_la(X_test).shape == (4, 2)


def test_cannot_take_only_matches_autodiff_errors():
    vmap_error = RuntimeError("vmap: It looks like you're calling .item() on a Tensor.")
    assert cannot_take(FastPath.VMAP, vmap_error)
    assert cannot_take(FastPath.BATCHED_BACKWARD, RuntimeError("Batching rule not implemented"))
    assert not cannot_take(
        FastPath.VMAP, RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    )
    assert not cannot_take(FastPath.VMAP, ValueError("vmap"))
    forward = NotImplementedError("Trying to use forward AD with foo that does not support it")
    assert cannot_take(FastPath.FORWARD_MODE, forward)
    assert not cannot_take(FastPath.FORWARD_MODE, vmap_error)


def test_math_attention_explains_a_missing_derivative():
    """An operation without forward-mode derivative even with the math kernel: a clear error."""

    def compute():
        raise NotImplementedError("Trying to use forward AD with my_op that does not support it")

    with pytest.raises(NotImplementedError, match="attn_implementation='eager'"):
        math_attention(nn.Linear(1, 1), compute)
    with pytest.raises(RuntimeError, match="size"):
        math_attention(nn.Linear(1, 1), lambda: torch.ones(2) @ torch.ones(3))
