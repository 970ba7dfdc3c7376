"""Paired comparison of two learned rules on a family's held-out tasks, at several horizons.

    python tools/compare_rules.py RULE_A RULE_B [--family digits-mlp] [--steps 100] [--horizons 1,2]
        [--tasks 3] [--seeds 10] [--json]

RULE_* are meta-training directories (their best.pt), rule files or ``default``. Both rules
train the same held-out tasks from the same initialisations with the same batches; reported per
horizon ``h·T``: mean validation loss of each rule with 95% intervals over all (task, seed) runs,
and the paired difference B − A with its interval. Typical use: ``A`` = a run's starting rule
(``mpbackprop meta-train --outer-steps 0 --out A`` writes it as ``A/best.pt``), ``B`` = the run's
best checkpoint: meta-training must not make a good start worse.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mpbackprop import _json as strict_json
from mpbackprop.evaluation import ci95, resolve_rule, run_method, suite_tasks

_SEED_BASE = 7_000_000  # the reported seeds of `mpbackprop evaluate`


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rule_a")
    ap.add_argument("rule_b")
    ap.add_argument("--family", default="digits-mlp")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--horizons", default="1,2", help="multiples of --steps to report")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    horizons = [int(h) for h in args.horizons.split(",")]
    rules = {}
    for key, name in (("a", args.rule_a), ("b", args.rule_b)):
        backward, update, path = resolve_rule(name)
        rules[key] = ((backward, update), str(path))
    longest = args.steps * max(horizons)
    finals: dict[str, dict[int, list[float]]] = {k: {h: [] for h in horizons} for k in rules}
    for spec, _ in suite_tasks("heldout", args.family, args.tasks, args.steps):
        for s in range(args.seeds):
            for key, (rule, _) in rules.items():
                curve = run_method(spec, "learned", longest, _SEED_BASE + s, rule)
                for h in horizons:
                    finals[key][h].append(curve.loss[h * args.steps - 1])
    report = {"family": args.family, "steps": args.steps, "tasks": args.tasks, "seeds": args.seeds,
              "rule_a": rules["a"][1], "rule_b": rules["b"][1], "horizons": {}}
    for h in horizons:
        a, b = finals["a"][h], finals["b"][h]
        ma, la, ha = ci95(a)
        mb, lb, hb = ci95(b)
        md, ld, hd = ci95([y - x for x, y in zip(a, b)])
        report["horizons"][f"{h}T"] = {"a": {"mean": ma, "ci": [la, ha]}, "b": {"mean": mb, "ci": [lb, hb]},
                                       "b_minus_a": {"mean": md, "ci": [ld, hd]}}
    if args.json:
        print(strict_json.dumps(report, indent=2))
        return 0
    print(f"A = {report['rule_a']}\nB = {report['rule_b']}")
    print(f"{args.family} held-out: {args.tasks} tasks x {args.seeds} seeds, T = {args.steps}")
    for key, r in report["horizons"].items():
        a, b, d = r["a"], r["b"], r["b_minus_a"]
        print(f"  at {key:>3}: A {a['mean']:.4f} [{a['ci'][0]:.4f}, {a['ci'][1]:.4f}]   "
              f"B {b['mean']:.4f} [{b['ci'][0]:.4f}, {b['ci'][1]:.4f}]   "
              f"B-A {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
