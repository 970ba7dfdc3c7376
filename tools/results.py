"""Regenerate the README's results section: the shipped rule against tuned baselines, every suite.

    python tools/results.py [--rule default] [--family digits-mlp] [--steps 100] [--seeds 10]
        [--tasks 3] [--suites heldout,wider,...] [--out results]

Runs ``mpbackprop evaluate`` per suite (same code path, same tuning cache under OUT/tuning),
writes ``OUT/<suite>.json`` and ``OUT/curves-<suite>.png``, and replaces the text between
``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md with the tables. Nothing
in that section is typed by hand. A suite already in OUT (same rule, steps, seeds, tasks) is
reused, so an interrupted run continues where it stopped. The JSON files are strict: a value
that is not finite (a method whose runs diverged) is ``null``, shown as ``n/a`` in the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mpbackprop import _json as strict_json
from mpbackprop import evaluation as ev
from mpbackprop._io import atomic_write, replace_section

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
SHORT = {"learned": "learned", "backprop_learned_update": "exact + learned update",
         "learned_backward_adam": "learned backward + Adam", "fa_adam": "FA + Adam", "sgd": "SGD",
         "momentum": "SGD + momentum", "adam": "Adam"}


def _suite(args: argparse.Namespace, suite: str, rule: tuple, rule_path: Path) -> dict:
    out = Path(args.out)
    path = out / f"{suite}.json"
    key = {"rule": str(rule_path), "rule_sha256": hashlib.sha256(rule_path.read_bytes()).hexdigest()[:16],
           "steps": args.steps, "seeds": args.seeds, "tasks": args.tasks, "family": args.family}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):  # not there yet, or unreadable: run the suite (again)
        doc = None
    if isinstance(doc, dict) and doc.get("key") == key:
        return doc
    start = time.perf_counter()
    tasks = ev.suite_tasks(suite, args.family, args.tasks, args.steps)
    results = ev.evaluate(tasks, rule, seeds=args.seeds, tuning_seeds=args.tuning_seeds, cache=out / "tuning",
                          progress=lambda m: print(f"  [{suite}] {m}", file=sys.stderr))
    doc = {"key": key, "seconds": time.perf_counter() - start, **ev.summarize(results)}
    ev.plot_curves(results, out / f"curves-{suite}.png")
    atomic_write(path, lambda p: Path(p).write_text(strict_json.dumps(doc, indent=1)))
    return json.loads(strict_json.dumps(doc))  # as a reused suite reads back: null for what is not finite


def _num(value: Any) -> float:
    """A number of a suite file as a float: ``null`` (not finite when written) is ``nan``."""
    return float("nan") if value is None else float(value)


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``n/a`` where it is ``null`` or not finite."""
    x = _num(value)
    return format(x, spec) if math.isfinite(x) else "n/a"


def _table(doc: dict) -> list[str]:
    lines = ["| method | val loss at T [95% CI] | accuracy | Δ vs tuned Adam (paired) [95% CI] | speedup | wall-clock speedup | ms/step |",
             "|---|---|---|---|---|---|---|"]
    seeds = doc["key"]["seeds"]
    for m, e in doc["methods"].items():
        # mean over tasks, intervals combined from the per-task standard errors (tasks independent)
        tasks = [t["methods"][m] for t in doc["tasks"]]
        dmean, dlo, dhi = ev.combine_task_cis([tuple(_num(v) for v in (d["paired_diff_vs_adam"]["mean"],
                                                                      *d["paired_diff_vs_adam"]["ci"]))
                                               for d in tasks], seeds)
        _, lo, hi = ev.combine_task_cis([tuple(_num(v) for v in (d["val_loss_mean"], *d["val_loss_ci"]))
                                         for d in tasks], seeds)
        speed = _num(e["speedup_vs_adam"])
        stxt = "<1" if speed == 0 else _fmt(speed, ".2f")
        wall = _num(e.get("wallclock_speedup_vs_adam"))  # n/a in suite files from before it was measured
        wtxt = "<1" if wall == 0 else _fmt(wall, ".2f")
        name = f"**{SHORT[m]}**" if m == "learned" else SHORT[m]
        dtxt = "—" if m == "adam" else f"{_fmt(dmean, '+.4f')} [{_fmt(dlo, '+.4f')}, {_fmt(dhi, '+.4f')}]"
        diverged = f" ({e['diverged']} runs diverged)" if e.get("diverged") else ""
        lines.append(f"| {name}{diverged} | {_fmt(e['val_loss_mean'], '.4f')} [{_fmt(lo, '.4f')}, {_fmt(hi, '.4f')}] | "
                     f"{_fmt(e['val_acc_mean'], '.3f')} | {dtxt} | {stxt} | {wtxt} | {_fmt(e['ms_per_step'], '.2f')} |")
    return lines


A_START, A_END = "<!-- analysis:start -->", "<!-- analysis:end -->"


def _analysis(args: argparse.Namespace, rel: Path) -> list[str]:
    """``mpbackprop analyze`` of the rule on the family's first held-out task, as README text."""
    from mpbackprop.evaluation import analysis
    from mpbackprop.tasks import get_family

    out = Path(args.out) / "analysis"
    spec = get_family(args.family).tasks("heldout", 1)[0]
    analysis.report(args.rule, spec, args.steps, 0, out)
    summary = (out / "summary.md").read_text().splitlines()[2:]  # drop the markdown title
    body = [A_START, "", f"Generated by `python tools/results.py` through `mpbackprop analyze {args.rule} "
            f"--family {args.family} --steps {args.steps} --out {rel}/analysis`.", "", *summary, "",
            f"![alignment]({rel}/analysis/alignment.png)", "", f"![curves]({rel}/analysis/curves.png)", ""]
    pics = sorted(out.glob("messages-*.png"))
    body += [f"![messages]({rel}/analysis/{p.name})" for p in pics]
    body += ["", A_END]
    return body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rule", default="default")
    ap.add_argument("--family", default="digits-mlp")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--tuning-seeds", type=int, default=2)
    ap.add_argument("--suites", default=",".join(s for s in ev.SUITES if s != "long"),
                    help="suites at T (the long suite, over every meta-training seed: tools/seeds.py)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--no-analysis", action="store_true", help="skip the analysis section")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    backward, update, rule_path = ev.resolve_rule(args.rule)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rel = Path(args.out).resolve().relative_to(ROOT) if Path(args.out).resolve().is_relative_to(ROOT) else Path(args.out)
    body = [START, "",
            f"Generated by `python tools/results.py --rule {args.rule} --steps {args.steps} --seeds {args.seeds} "
            f"--tasks {args.tasks}` (family `{args.family}`; rule `{rule_path.name}`). Each row averages "
            f"{args.tasks} tasks (or their variants) × {args.seeds} fresh seeds; learning rates of the tuned "
            "methods are tuned per task on separate seeds; speedup = T / steps for the method's mean curve to "
            "reach tuned Adam's mean loss at T (`<1`: not reached within T; geometric mean over tasks), wall-clock "
            "speedup = Adam's time for T steps / the method's time to reach that loss (step speedup × Adam's "
            "ms/step ÷ the method's); intervals "
            "of the rows combine the per-task standard errors. Per-task tables are in `results/<suite>.json`.", ""]
    for suite in args.suites.split(","):
        doc = _suite(args, suite, (backward, update), rule_path)
        body.append(f"#### {suite}  ({', '.join(sorted({t['task'].split('/')[0] for t in doc['tasks']}))}; "
                    f"horizons {sorted({t['steps'] for t in doc['tasks']})})")
        body.append("")
        body += _table(doc)
        body += ["", f"![{suite}]({rel}/curves-{suite}.png)", ""]
    body.append(END)
    readme = Path(args.readme)
    text = replace_section(readme.read_text(), START, END, body, "Results")
    if not args.no_analysis:
        text = replace_section(text, A_START, A_END, _analysis(args, rel), "What the learned backward pass does")
    readme.write_text(text)
    print(f"README results section regenerated from {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
