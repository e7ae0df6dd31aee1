"""``examples/active_learning_sinc.py`` runs in its ``--fast`` mode and draws its figure.

The full run (three seeds, 16 rounds, about 2.5 minutes) is what the documentation page
shows; here one seed and three rounds check that every study runs end to end and prints
finite errors for the passive and the active models.
"""

from __future__ import annotations

import math
import re

from test_examples import NUMBER, run_example


def test_active_learning_sinc_fast(tmp_path):
    output = run_example("active_learning_sinc.py", "--fast", "--out", str(tmp_path))
    assert (tmp_path / "active_learning_sinc.png").stat().st_size > 0, output
    for label in ("RMSE", r"MAE at x=3\.0", "RMSE at points"):
        row = re.search(
            rf"^{label}\s+({NUMBER}) ± ({NUMBER})\s+({NUMBER}) ± ({NUMBER})",
            output,
            flags=re.MULTILINE,
        )
        assert row is not None, output
        passive, active = float(row.group(1)), float(row.group(3))
        assert math.isfinite(passive) and math.isfinite(active), output
        assert 0 <= passive < 1 and 0 <= active < 1, output
