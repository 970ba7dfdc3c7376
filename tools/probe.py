"""Probe update-rule variants against tuned Adam on *meta-validation* tasks, before meta-training them.

    python tools/probe.py NAME=RULE[:key=value,...] [NAME=...] [--suites heldout,conv,long]
        [--seeds 4] [--tasks 2] [--long-seeds 3] [--long-tasks 1] [--out results/probe]

Each variant is a rule file (or ``default``) whose update's attributes are overridden, e.g.
``big=default:log_lr_scale=0.7`` (the scheduled update's ``a``) or ``wd=default:weight_decay=true,log_wd=-2.3`` (a
config option of :class:`~mpbackprop.rules.ScheduledUpdate`; options rebuild the update with the file's
meta-parameters). The suites are :func:`mpbackprop.evaluation.suite_tasks` built from the
**validation** split (``split="valid"``): the same shapes and horizons as the held-out report (at T;
``long``: 10T and 25T on every family, 4x wider and 2x deeper), so that a recipe can be chosen here
and held-out tasks stay untouched until the report (``tools/seeds.py``). Tuned Adam's learning rate is
tuned per task and horizon (tuning seeds, cached under ``--out``/tuning) and shared by all variants.

Prints, per variant: at T the paired difference to tuned Adam and the speedup; on ``long`` the
learned/Adam ratio of mean final validation losses per task and horizon, the worst, the geometric mean,
and failed runs (final loss NaN or above the initial loss).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

from mpbackprop import _json
from mpbackprop import evaluation as ev
from mpbackprop._io import atomic_write
from mpbackprop.rules import load_rule
from mpbackprop.rules.io import make_update

ROOT = Path(__file__).resolve().parents[1]


def variant(text: str) -> tuple[str, tuple]:
    """``NAME=RULE[:key=value,...]`` → (name, (backward, update)) with the overrides applied."""
    name, _, rest = text.partition("=")
    source, _, over = rest.partition(":")
    backward, update = ev.resolve_rule(source or "default")[:2]
    items = dict(item.partition("=")[::2] for item in filter(None, over.split(",")))
    options = {k: json_value(v) for k, v in items.items() if k in update.config()}
    if options:
        rebuilt = make_update(update.name, **{**update.config(), **options})
        missing = rebuilt.load_state_dict(update.state_dict(), strict=False)
        if missing.unexpected_keys:
            raise SystemExit(f"{text}: the rebuilt update has no {missing.unexpected_keys}")
        update = rebuilt
    params = dict(update.named_parameters()) | dict(update.named_buffers())
    for key, value in items.items():
        if key in options:
            continue
        if key not in params:
            raise SystemExit(f"{text}: {key!r} is neither an option ({sorted(update.config())}) "
                             f"nor a meta-parameter ({sorted(params)}) of the update")
        with torch.no_grad():
            params[key].fill_(float(value))
    return name, (backward, update)


def json_value(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def run_suite(suite: str, rules: dict[str, tuple], args: argparse.Namespace) -> dict[str, dict]:
    cache = Path(args.out) / "tuning"
    n_tasks, n_seeds = (args.long_tasks, args.long_seeds) if suite == "long" else (args.tasks, args.seeds)
    tasks = ev.suite_tasks(suite, args.family, n_tasks, args.steps, split="valid")
    say = (lambda m: print(f"  [{suite}] {m}", file=sys.stderr, flush=True)) if args.verbose else None
    base = ev.evaluate(tasks, None, seeds=n_seeds, methods=("adam",), cache=cache, progress=say)
    out = {}
    for name, rule in rules.items():
        mine = ev.evaluate(tasks, rule, seeds=n_seeds, methods=("learned",), progress=say)
        merged = [replace(b, curves={**m.curves, **b.curves}) for b, m in zip(base, mine)]
        out[name] = ev.summarize(merged, ("learned", "adam"))
        print(report_line(suite, name, out[name]), flush=True)
    return out


def report_line(suite: str, name: str, summary: dict) -> str:
    learned = summary["methods"]["learned"]
    if suite != "long":
        d = learned["paired_diff_vs_adam"]
        sp = learned["speedup_vs_adam"]
        return (f"{suite:8s} {name:14s} Δ {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]  "
                f"speedup {sp:.2f}  failed {learned['failed']}")
    ratios = [t["methods"]["learned"]["ratio_to_adam"] for t in summary["tasks"]]
    cells = " ".join(f"{t['task'].split('/')[1][:14]}@{t['steps']}:{r:.3f}" for t, r in zip(summary["tasks"], ratios))
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if all(r > 0 for r in ratios) else float("nan")
    return (f"{suite:8s} {name:14s} worst {max(ratios):.3f} geo {geo:.3f} "
            f"within-1.05 {sum(r <= 1.05 for r in ratios)}/{len(ratios)} failed {learned['failed']}\n    {cells}")


def add_suite_options(ap: argparse.ArgumentParser, seeds: int = 4, tasks: int = 2) -> None:
    """The options :func:`run_suite` reads (suites, family, horizon, seeds and tasks per suite, ``--out``)."""
    ap.add_argument("--suites", default="heldout,conv,long")
    ap.add_argument("--family", default="digits-mlp")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--tasks", type=int, default=tasks)
    ap.add_argument("--long-seeds", type=int, default=3)
    ap.add_argument("--long-tasks", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "probe"))
    ap.add_argument("--verbose", action="store_true")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    add_suite_options(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rules = dict(variant(v) for v in args.variants)
    doc = {"variants": args.variants, "suites": {s: run_suite(s, rules, args) for s in args.suites.split(",")}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out) / "probe.json", lambda p: Path(p).write_text(_json.dumps(doc, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
