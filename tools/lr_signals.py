"""Does an early-run observable predict the step size a task wants? Measured on *meta-validation* tasks.

    python tools/lr_signals.py [--tasks 6] [--steps 100] [--multiple 10] [--window 20] [--probe-lr 0.01]
        [--out results/probe/lr-signals.json]

For ``--tasks`` validation tasks of each long-suite family (digits-mlp, tabular-mlp, synthetic, digits-conv)
it tunes Adam's learning rate (:func:`mpbackprop.evaluation.tune_lr`, constant rate, final validation loss)
at the horizon T and at ``--multiple``·T, and records what a step controller could see in the first
``--window`` steps of Adam at a fixed ``--probe-lr``: the ratio ``r`` of the mean batch loss over the
window's last 4 steps to the first batch loss, and the parameter count. It reports the correlation of
``log lr*`` with ``log r`` (and the residual spread of a least-squares line, against the spread of
``log lr*`` itself), and whether ``r`` predicts how far ``lr*`` falls from T to ``multiple``·T. A signal is
worth building into a rule only if it explains much of that spread. Adam's tuning is cached beside
``--out`` (``lr-signals-tuning/``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from mpbackprop import _json
from mpbackprop._io import atomic_write
from mpbackprop.engine import InnerStep
from mpbackprop.evaluation import LONG_FAMILIES, tune_lr
from mpbackprop.metatrain.inner import get_task
from mpbackprop.rules import Adam, Exact
from mpbackprop.tasks import FAMILIES, Task

ROOT = Path(__file__).resolve().parents[1]


def loss_ratio(task: Task, window: int, lr: float, seed: int = 123) -> float:
    """Mean batch loss over the last 4 of ``window`` Adam steps at ``lr`` on ``task`` (a built task), over
    the first batch loss."""
    gen = task.batch_generator(seed)
    run = InnerStep.start(task.net, task.theta0.clone(), Exact(), Adam(lr), total_steps=window,
                          batches=lambda: task.batch(gen), loss=task.loss)
    with torch.no_grad():
        losses = [float(run.step().loss) for _ in range(window)]
    return sum(losses[-4:]) / 4 / losses[0]


def fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Correlation, least-squares slope, and the residual and total standard deviations of ``y``."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    slope = sxy / sxx if sxx > 0 else 0.0
    resid = [b - my - slope * (a - mx) for a, b in zip(x, y)]
    corr = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0
    return {"corr": corr, "slope": slope, "resid_std": math.sqrt(sum(r * r for r in resid) / n),
            "std": math.sqrt(syy / n)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--multiple", type=int, default=10)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--probe-lr", type=float, default=0.01)
    ap.add_argument("--out", default=str(ROOT / "results" / "probe" / "lr-signals.json"))
    args = ap.parse_args(argv)
    if args.window < 5 or args.tasks < 1 or args.multiple < 2:
        raise SystemExit("need --window >= 5, --tasks >= 1 and --multiple >= 2")
    torch.set_num_threads(1)
    out = Path(args.out)
    cache = out.parent / "lr-signals-tuning"
    long = args.steps * args.multiple
    rows = []
    for family in LONG_FAMILIES:
        for spec in FAMILIES[family].tasks("valid", args.tasks, seed=0):
            task = get_task(spec)
            row = {"family": family, "task": spec.name,
                   "lr_T": tune_lr(spec, "adam", args.steps, 2, None, cache)["lr"],
                   "lr_long": tune_lr(spec, "adam", long, 2, None, cache)["lr"],
                   "ratio": loss_ratio(task, args.window, args.probe_lr),
                   "params": int(task.theta0.numel())}
            rows.append(row)
            print(f"{spec.name:44s} lr*(T) {row['lr_T']:.3g}  lr*({args.multiple}T) {row['lr_long']:.3g}  "
                  f"r {row['ratio']:.3f}", file=sys.stderr, flush=True)
    log_r = [math.log10(r["ratio"]) for r in rows]
    log_t = [math.log10(r["lr_T"]) for r in rows]
    log_l = [math.log10(r["lr_long"]) for r in rows]
    drop = [a - b for a, b in zip(log_t, log_l)]
    summary = {"lr_T_vs_ratio": fit(log_r, log_t), "lr_long_vs_ratio": fit(log_r, log_l),
               "lr_T_vs_params": fit([math.log10(r["params"]) for r in rows], log_t),
               "drop_vs_ratio": fit(log_r, drop),
               "drop_mean_decades": sum(drop) / len(drop)}
    doc = {"settings": vars(args) | {"out": None}, "units": "log10", "summary": summary, "tasks": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: Path(p).write_text(_json.dumps(doc, indent=1)))
    s = summary["lr_T_vs_ratio"]
    print(f"log lr*(T) ~ log r: corr {s['corr']:+.2f}, residual {s['resid_std']:.2f} of {s['std']:.2f} decades; "
          f"lr* falls {summary['drop_mean_decades']:.2f} decades from T to {args.multiple}T "
          f"(± {summary['drop_vs_ratio']['std']:.2f}; corr with log r {summary['drop_vs_ratio']['corr']:+.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
