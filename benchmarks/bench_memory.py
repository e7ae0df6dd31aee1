"""Peak memory of the Jacobian GLM predictive against the memory budget.

An all-weights diagonal Laplace approximation of an MLP with a PReLU (its parameter belongs to
no layer with Jacobian factors, so the predictive forms Jacobians instead of the factored
path) predicts
batches of growing size and output count. Each configuration runs in a fresh subprocess that
resets its peak resident memory after the fit (``/proc/self/clear_refs``, Linux) and reports
the peak reached during the predictive (``VmHWM``) beside the resident memory just before it
(the floor: the interpreter, the model, the approximation and the inputs) and the size of one
batch's ``(batch, outputs, params)`` float32 Jacobian, which an unblocked predictive needs at
once.

Usage::

    python benchmarks/bench_memory.py [--budget-mib 256] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from laplace import Laplace
from laplace.utils.memory import memory_budget

batch, outputs, budget_mib = (int(v) for v in sys.argv[1:4])
torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(
    nn.Linear(64, 256), nn.PReLU(), nn.Linear(256, 256), nn.Tanh(),
    nn.Linear(256, outputs),
)
X = torch.randn(64, 64)
y = torch.randint(outputs, (64,))
la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
la.fit(DataLoader(TensorDataset(X, y), batch_size=16))
X_test = torch.randn(batch, 64)


def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
before = status("VmRSS")
with memory_budget(budget_mib * 2**20):
    probs = la(X_test, pred_type="glm", link_approx="probit")
after = status("VmHWM")
print(json.dumps({"before_mib": before, "after_mib": after,
                  "params": la.n_params, "finite": bool(torch.isfinite(probs).all())}))
"""


def run(batch: int, outputs: int, budget_mib: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(batch), str(outputs), str(budget_mib)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    batches = (256, 1024) if args.quick else (256, 1024, 4096)
    outputs_list = (10,) if args.quick else (10, 100)
    print(f"memory budget {args.budget_mib} MiB")
    header = f"{'batch':>6}{'outputs':>8}{'params':>9}{'Jacobian MiB':>14}"
    print(header + f"{'RSS before':>12}{'peak RSS':>10}{'growth':>8}")
    for outputs in outputs_list:
        for batch in batches:
            result = run(batch, outputs, args.budget_mib)
            jacobian = batch * outputs * result["params"] * 4 / 2**20
            growth = result["after_mib"] - result["before_mib"]
            print(
                f"{batch:>6}{outputs:>8}{result['params']:>9}{jacobian:>14.0f}"
                f"{result['before_mib']:>12.0f}{result['after_mib']:>10.0f}{growth:>8.0f}"
            )


if __name__ == "__main__":
    main()
