"""Room to win: tuned Adam's validation loss at T against at 10T, per task family.

    python tools/headroom.py [--families digits-mlp,tabular-mlp,...] [--steps 100] [--tasks 2]
        [--seeds 3] [--json]

For each family, Adam's learning rate is tuned at horizon T on held-out tasks (as
``mpbackprop evaluate`` tunes it), then Adam trains those tasks for 10·T steps. A family
whose loss at T is already near its loss at 10T leaves a learned optimizer nothing to win
(method.md §6 measured that for digits at T=100, batch 64).
"""

from __future__ import annotations

import argparse
import sys

import torch

from mpbackprop import _json as strict_json
from mpbackprop.evaluation import run_method, tune_lr
from mpbackprop.tasks import FAMILIES, get_family


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.families.split(","):
        fam = get_family(name)
        at_t, at_10t = [], []
        for spec in fam.tasks("heldout", args.tasks):
            lr = tune_lr(spec, "adam", args.steps)["lr"]
            for s in range(args.seeds):
                curve = run_method(spec, "adam", 10 * args.steps, 7_000_000 + s, lr=lr)
                at_t.append(curve.loss[args.steps - 1])
                at_10t.append(curve.loss[-1])
        t, t10 = sum(at_t) / len(at_t), sum(at_10t) / len(at_10t)
        rows.append({"family": name, "adam_loss_T": t, "adam_loss_10T": t10, "ratio": t / t10})
    if args.json:
        print(strict_json.dumps({"steps": args.steps, "families": rows}, indent=2))
        return 0
    print(f"tuned Adam, T = {args.steps}: validation loss at T and at 10T (held-out tasks)")
    print(f"  {'family':<14}{'at T':>10}{'at 10T':>10}{'T / 10T':>10}")
    for r in rows:
        print(f"  {r['family']:<14}{r['adam_loss_T']:>10.4f}{r['adam_loss_10T']:>10.4f}{r['ratio']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
