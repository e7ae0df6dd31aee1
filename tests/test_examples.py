"""The example scripts run end to end as a user would run them, and print sensible numbers."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
TIMEOUT_S = 300
NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"


def run_example(script: str, *args: str) -> str:
    """Run ``examples/<script>`` in a fresh interpreter and return its standard output.

    The repository root leads ``PYTHONPATH`` so the script imports the ``laplace`` under test;
    one intra-op thread keeps the script from oversubscribing cores shared with other workers.
    """
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def printed_value(output: str, label: str) -> float:
    """The number printed after ``<label>:`` on its own line."""
    match = re.search(rf"^{re.escape(label)}: ({NUMBER})", output, flags=re.MULTILINE)
    assert match is not None, f"no '{label}:' line in output:\n{output}"
    return float(match.group(1))


def test_regression_sinusoid_recovers_noise(tmp_path):
    output = run_example("regression_sinusoid.py", "--fast", "--out", str(tmp_path))
    for prefix in ("", "marglik_training "):  # post hoc, then trained jointly
        assert 0.25 <= printed_value(output, f"{prefix}sigma_noise") <= 0.33, output
        prior_precision = printed_value(output, f"{prefix}prior_precision")
        assert math.isfinite(prior_precision) and prior_precision > 0, output
        assert math.isfinite(printed_value(output, f"{prefix}log_marginal_likelihood")), output
        inside = printed_value(output, f"{prefix}predictive std inside [0, 8]")
        outside = printed_value(output, f"{prefix}predictive std outside [0, 8]")
        assert inside < outside, output
    assert (tmp_path / "regression_sinusoid.png").stat().st_size > 0


def test_demo_digits_laplace_is_better_calibrated_under_shift(tmp_path):
    plot = tmp_path / "reliability.png"
    output = run_example("demo_digits.py", "--plot", str(plot))
    rows = {
        match.group(1): [float(value) for value in match.group(2, 3, 4, 5, 6, 7)]
        for match in re.finditer(
            r"^(MAP|LL \w+|all \w+)" + rf"\s+({NUMBER})" * 6, output, flags=re.MULTILINE
        )
    }
    assert set(rows) == {"MAP", "LL kron", "LL full", "all diag", "all kron"}, output
    for name, values in rows.items():
        for accuracy, nll, ece in (values[:3], values[3:]):
            assert 0.4 <= accuracy <= 1.0, f"{name}: accuracy {accuracy}\n{output}"
            assert math.isfinite(nll) and nll > 0, f"{name}: NLL {nll}\n{output}"
            assert 0.0 <= ece <= 1.0, f"{name}: ECE {ece}\n{output}"
    assert rows["MAP"][0] >= 0.9, output
    map_shift_nll = rows["MAP"][4]
    for name in ("LL kron", "LL full", "all diag", "all kron"):
        # the overconfident MAP pays for its confidence under the shift; Laplace much less
        assert rows[name][4] < 0.75 * map_shift_nll, f"{name}\n{output}"
        assert abs(rows[name][0] - rows["MAP"][0]) <= 0.02, f"{name}\n{output}"
    assert plot.stat().st_size > 0
