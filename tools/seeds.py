"""Judge a meta-training recipe over its seeds: choose on meta-validation, then report every seed.

    python tools/seeds.py RUN_DIR [RUN_DIR ...] [--suites heldout,conv,long] [--steps 100] [--seeds 10]
        [--tasks 3] [--long-seeds 5] [--long-tasks 1] [--out results/seeds] [--readme README.md] [--ship]

1. **Choice, before any held-out number is computed**: every run's ``best.pt`` is scored again on one
   common set of meta-validation tasks (``--valid-tasks`` tasks of the runs' family, validation split,
   seed 0; the same multiples of T as in meta-training: each run chose its ``best.pt`` on validation
   tasks drawn with its own seed, so those scores are not comparable across runs), and the run with the
   lowest score is the recipe's rule. ``--ship`` copies it to ``mpbackprop/data/default_rule.pt``
   (``tools/ship_rule.py``).
2. **Report**: every seed's ``best.pt`` on the held-out suites (``long``: 10T and 25T on every
   family, 4x wider, 2x deeper; baselines tuned per task and horizon once, on tuning seeds, shared
   by all rules). Writes ``OUT/seeds.json`` and the README section between ``<!-- seeds:start -->``
   and ``<!-- seeds:end -->``.

A rule meets the long-horizon bar of issue 13 on a family when it has no diverged run (final loss
NaN or above the initial loss) and its mean validation loss is at most 1.05x tuned Adam's at every
long horizon of that family.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mpbackprop import _json
from mpbackprop.metatrain import MetaConfig
from mpbackprop import evaluation as ev
from mpbackprop._io import atomic_write, replace_section
from mpbackprop.rules import load_rule

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- seeds:start -->", "<!-- seeds:end -->"
BASELINES = ("sgd", "momentum", "adam")
BAR = 1.05


def common_scores(run: Path, n_tasks: int, family: str | None = None,
                  multiples: tuple[int, ...] | None = None) -> tuple[dict[str, float], int]:
    """``(meta_validate's scores of the run's best.pt on the common validation tasks, the step it was saved
    at)``: tasks of ``family`` (default: the run's own family), validation split, seed 0, trained for
    ``multiples`` of T (default: the run's own ``eval_multiples``)."""
    from mpbackprop.metatrain import MetaConfig, meta_validate
    from mpbackprop.tasks import get_family

    cfg = MetaConfig.load_run(run / "config.json")
    backward, update, meta = load_rule(run / "best.pt")
    specs = get_family(family or cfg.family).tasks("valid", n_tasks, seed=0)
    with torch.no_grad():
        scores = meta_validate(backward, update, specs, cfg.eval_horizon, cfg.val_examples,
                               multiples or cfg.eval_multiples)
    return {k: float(v) for k, v in scores.items()}, int(meta.get("step", -1))


def common_score(run: Path, n_tasks: int, family: str | None = None) -> tuple[float, int]:
    """``(score of the run's best.pt on the common validation tasks, the step it was saved at)``."""
    scores, step = common_scores(run, n_tasks, family)
    return scores["score"], step


def _group(spec_name: str, steps: int, base: int) -> str:
    """Row label of a long-suite task: its family (by dataset/arch) and horizon multiple."""
    return f"{spec_name.split('/')[0]}/{spec_name.split('/')[1]} @ {steps // base}T"


def _evaluate(suite: str, rules: dict[str, tuple], args: argparse.Namespace) -> dict[str, dict]:
    """Per rule, the summary of ``suite``: baselines once (tuned, cached), the rule's runs per rule."""
    cache = Path(args.out) / "tuning"
    n_tasks, n_seeds = (args.long_tasks, args.long_seeds) if suite == "long" else (args.tasks, args.seeds)
    tasks = ev.suite_tasks(suite, args.family, n_tasks, args.steps)
    say = (lambda m: print(f"  [{suite}] {m}", file=sys.stderr, flush=True))
    methods = ev.SUITE_METHODS.get(suite, BASELINES + ("learned",))
    base = ev.evaluate(tasks, None, seeds=n_seeds, methods=tuple(m for m in methods if m in BASELINES),
                       tuning_seeds=args.tuning_seeds, cache=cache, progress=say)
    out = {}
    for name, rule in rules.items():
        mine = ev.evaluate(tasks, rule, seeds=n_seeds, methods=("learned",), progress=say)
        merged = []
        for b, m in zip(base, mine):
            merged.append(replace(b, curves={**m.curves, **b.curves}, lrs=dict(b.lrs)))
        order = ("learned",) + tuple(m for m in methods if m in BASELINES)
        out[name] = ev.summarize(merged, order)
    return out


def _long_rows(summary: dict, base: int) -> dict[str, dict]:
    """Long suite per (family, multiple): learned/Adam ratio of mean losses, diverged counts."""
    rows: dict[str, dict] = {}
    for t in summary["tasks"]:
        key = _group(t["task"], t["steps"], base)
        learned, adam = t["methods"]["learned"], t["methods"]["adam"]
        row = rows.setdefault(key, {"ratios": [], "diverged": 0, "adam_diverged": 0, "runs": 0})
        row["ratios"].append(learned.get("ratio_to_adam"))
        row["diverged"] += learned["failed"]
        row["adam_diverged"] += adam["failed"]
        row["runs"] += learned["runs"]
    return rows


def _extra_flags(args: argparse.Namespace) -> str:
    """The command line's flags that change what the report holds, when not at their defaults."""
    out = ""
    if args.compare:
        out += f" --compare {','.join(Path(c).name if Path(c).is_dir() else c for c in args.compare.split(',') if c)}"
    if args.valid_family:
        out += f" --valid-family {args.valid_family}"
    if Path(args.out).resolve() != (ROOT / "results" / "seeds").resolve():
        out += f" --out {Path(args.out).name}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--suites", default="heldout,conv,long")
    ap.add_argument("--family", default="digits-mlp")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=10, help="report seeds per task (suites at T)")
    ap.add_argument("--tasks", type=int, default=3, help="held-out tasks per suite at T")
    ap.add_argument("--long-seeds", type=int, default=5, help="report seeds per task of the long suite")
    ap.add_argument("--long-tasks", type=int, default=1, help="held-out tasks per family in the long suite")
    ap.add_argument("--tuning-seeds", type=int, default=2)
    ap.add_argument("--valid-tasks", type=int, default=6, help="common meta-validation tasks for the choice")
    ap.add_argument("--valid-family", default=None,
                    help="family of the common meta-validation tasks (default: the runs' family; needed when "
                         "the runs, or run directories given to --compare, were meta-trained on different families)")
    ap.add_argument("--out", default=str(ROOT / "results" / "seeds"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--compare", default="", help="comma-separated rules reported beside the runs, never chosen "
                                                  "(e.g. 'default' for the rule shipped before)")
    ap.add_argument("--ship", action="store_true", help="package the chosen run's best.pt as the default rule")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # 1. the choice, on meta-validation only (run directories given to --compare are scored too, never chosen)
    compare_runs = [Path(c) for c in args.compare.split(",") if c and (Path(c) / "config.json").is_file()]
    families = {MetaConfig.load_run(r / "config.json").family for r in [*args.runs, *compare_runs]}
    if args.valid_family is None and len(families) > 1:
        ap.error(f"the runs were meta-trained on different families ({', '.join(sorted(families))}): "
                 f"name the common validation tasks' family with --valid-family")
    scores = {str(r): common_score(r, args.valid_tasks, args.valid_family) for r in args.runs}
    scores_compare = {str(r): common_score(r, args.valid_tasks, args.valid_family) for r in compare_runs}
    chosen = min(scores, key=lambda r: scores[r][0])
    scores.update(scores_compare)
    print(f"chosen on meta-validation: {chosen} (score {scores[chosen][0]:.4f} at step {scores[chosen][1]})",
          file=sys.stderr)
    rules_compare = {c: ev.resolve_rule(c)[:2] for c in (c for c in args.compare.split(",") if c)}  # before shipping
    if args.ship:
        sys.path.insert(0, str(ROOT / "tools"))
        import ship_rule

        ship_rule.main([chosen])
    # 2. every seed on held-out
    rules = {str(r): load_rule(r / "best.pt")[:2] for r in args.runs}
    if compare_runs:
        print("common meta-validation scores: " + ", ".join(f"{Path(r).name} {s:.4f}" for r, (s, _) in scores.items()),
              file=sys.stderr)
    rules.update(rules_compare)
    compare = list(rules_compare)
    start = time.perf_counter()
    suites = {s: _evaluate(s, rules, args) for s in args.suites.split(",")}
    doc = {"chosen": chosen, "validation": {r: {"score": s, "step": k} for r, (s, k) in scores.items()},
           "steps": args.steps, "seeds": args.seeds, "tasks": args.tasks, "suites": suites,
           "seconds": time.perf_counter() - start}
    atomic_write(Path(args.out) / "seeds.json", lambda p: Path(p).write_text(_json.dumps(doc, indent=1)))
    lines = [START, "", f"Generated by `python tools/seeds.py {' '.join(Path(r).name for r in args.runs)} "
             f"--steps {args.steps} --seeds {args.seeds} --tasks {args.tasks} --long-seeds {args.long_seeds} "
             f"--long-tasks {args.long_tasks}{_extra_flags(args)}`: every meta-training seed of the "
             f"recipe, its `best.pt`; the shipped rule is the seed with the best meta-validation score (chosen "
             f"before any held-out number was computed). Long suite: horizons 10T and 25T on held-out tasks of "
             f"every family and on 4x wider and 2x deeper nets, every baseline re-tuned per task and horizon; "
             f"bar: learned ≤ {BAR} x tuned Adam and no failed run (final loss NaN or above its initial loss).", ""]
    names = {str(r): f"`{Path(r).name}`" + (" (shipped)" if str(r) == chosen else "") for r in args.runs}
    names.update({r: f"`{Path(r).name}` (comparison)" for r in compare})
    at_t = [x for x in ("heldout", "conv") if x in suites]
    if at_t:
        lines += ["| run | meta-val score (step) |" + "".join(f" {x} Δ vs tuned Adam at T [95% CI] | {x} speedup |"
                                                            for x in at_t), "|---|---|" + "---|---|" * len(at_t)]
        for r in rules:
            s, k = scores.get(r, (None, None))
            row = f"| {names[r]} | " + (f"{s:.4f} ({k}) |" if s is not None else "— |")
            for x in at_t:
                e = suites[x][r]["methods"]["learned"]
                d = e.get("paired_diff_vs_adam", {})
                ci = d.get("ci", [None, None])
                row += (f" {d['mean']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] |" if d and None not in ci else " n/a |")
                row += f" {e['speedup_vs_adam']:.2f} |" if e["speedup_vs_adam"] else " <1 |"
            lines.append(row)
        lines.append("")
    if "long" in suites:
        per_rule = {r: _long_rows(suites["long"][r], args.steps) for r in rules}
        keys = sorted(next(iter(per_rule.values())))
        lines += ["| long suite: task @ horizon |" + "".join(f" {names[r]} |" for r in rules) + " tuned Adam failed |",
                  "|---|" + "---|" * (len(rules) + 1)]
        for key in keys:
            cells = []
            for r in rules:
                row = per_rule[r][key]
                ratios = [x for x in row["ratios"] if x is not None]
                worst = max(ratios) if ratios else None
                flag = "" if worst is not None and worst <= BAR and row["diverged"] == 0 else " ✗"
                cells.append((f" {worst:.3f}" if worst is not None else " n/a") + f" ({row['diverged']}/{row['runs']}){flag} |")
            adam = next(iter(per_rule.values()))[key]
            lines.append(f"| {key} |" + "".join(cells) + f" {adam['adam_diverged']}/{adam['runs']} |")
        met = {r: sum(1 for key in keys if all(x is not None and x <= BAR for x in per_rule[r][key]["ratios"])
                      and per_rule[r][key]["diverged"] == 0) for r in rules}
        lines += ["", "Each cell: learned / tuned-Adam mean validation loss at that horizon (the worst task), then "
                      "(failed runs / runs); ✗ where the bar is missed. Rows meeting the bar: "
                      + ", ".join(f"{names[r]} {met[r]}/{len(keys)}" for r in rules)
                      + f". Per-task numbers: `{Path(args.out).name}/seeds.json`."]
    lines += ["", END]
    readme = Path(args.readme)
    readme.write_text(replace_section(readme.read_text(), START, END, lines, "Meta-training seeds"))
    print(f"README seeds section regenerated from {args.out}/seeds.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
