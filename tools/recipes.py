"""Compare meta-training recipes on meta-validation only: every seed's ``best.pt`` on common tasks.

    python tools/recipes.py NAME=RUN[,RUN...] [NAME=RUN,...] [--families augmented,augmented-depth]
        [--valid-tasks 6] [--out results/recipes.json] [--readme README.md] [--keep]

A recipe is judged over its seeds (each a run directory of ``mpbackprop meta-train``). Each seed's
``best.pt`` is scored on the same meta-validation tasks (``--valid-tasks`` tasks of each family in
``--families``, validation split, seed 0; trained for T, 10T and 25T as in meta-training: the score is
the mean log validation loss at the end, averaged over the three horizons; lower is better). No
held-out task is touched: this is where recipes are chosen (``tools/seeds.py`` then reports the chosen
recipe's seeds on held-out tasks). Writes the scores to ``--out`` and the README section between
``<!-- recipes:start -->`` and ``<!-- recipes:end -->``. With ``--keep``, the recipes already in
``--out`` that are not named again stay in the table with their stored scores (same families and number
of tasks; their run directories need not exist any more), listed before the new ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

import torch

from mpbackprop import _json
from mpbackprop._io import atomic_write, replace_section
from mpbackprop.metatrain.loop import score_key
from mpbackprop.tasks import get_family

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import seeds  # noqa: E402  (common meta-validation scores, shared with the seeds report)
START, END = "<!-- recipes:start -->", "<!-- recipes:end -->"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def score_run(run: Path, family: str, n_tasks: int) -> dict:
    """Scores of ``run``'s ``best.pt`` on ``n_tasks`` validation tasks of ``family`` (seed 0), at T, 10T, 25T."""
    scores, step = seeds.common_scores(run, n_tasks, family, (1, 10, 25))
    return {"step": step, "rule_sha256": _digest(run / "best.pt"), **scores}


def cached_score(previous: dict, run: Path, family: str, n_tasks: int) -> dict:
    """The score from an earlier ``--out`` when it was made from the same ``best.pt`` (same digest) on the
    same tasks, else a fresh one: re-running with one more recipe scores only the new runs."""
    if previous.get("valid_tasks") == n_tasks:
        for runs in previous.get("recipes", {}).values():
            old = runs.get(str(run), {}).get(family)
            if old and old.get("rule_sha256") == _digest(run / "best.pt"):
                return old
    return score_run(run, family, n_tasks)


def kept_recipes(previous: dict, families: list[str], n_tasks: int, named: set[str]) -> tuple[dict, dict]:
    """``(recipes, means)`` of ``previous`` (an earlier ``--out``) not in ``named``, when it was scored on
    the same tasks (same ``families``, ``n_tasks``); nothing when the tasks differ."""
    if previous.get("valid_tasks") != n_tasks or previous.get("families") != families:
        return {}, {}
    keep = [n for n in previous.get("recipes", {}) if n not in named]
    return ({n: previous["recipes"][n] for n in keep}, {n: previous["means"][n] for n in keep})


def parse_recipe(text: str) -> tuple[str, list[Path]]:
    name, sep, runs = text.partition("=")
    if not sep or not name or not runs:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN[,RUN...], got {text!r}")
    paths = [Path(r) for r in runs.split(",") if r]
    for p in paths:
        if not (p / "best.pt").is_file() or not (p / "config.json").is_file():
            raise argparse.ArgumentTypeError(f"{p}: not a meta-training run directory (needs best.pt and config.json)")
    return name, paths


def table(doc: dict, families: list[str]) -> list[str]:
    """Markdown: one row per seed, then the recipe's mean, per family (T / 10T / 25T and the score)."""
    keys = [score_key(k) for k in (1, 10, 25)]
    head = "| recipe | run (best.pt step) |" + "".join(f" {f}: T / 10T / 25T | {f}: score |" for f in families)
    lines = [head, "|---|---|" + "---|---|" * len(families)]
    for name, runs in doc["recipes"].items():
        for run, per_family in runs.items():
            cells = "".join(" " + " / ".join(f"{per_family[f][k]:.3f}" for k in keys) + f" | {per_family[f]['score']:.4f} |"
                            for f in families)
            step = next(iter(per_family.values()))["step"]
            lines.append(f"| {name} | `{Path(run).name}` ({step}) |{cells}")
        means = "".join(f" | **{doc['means'][name][f]:.4f}** |" for f in families)
        lines.append(f"| {name} | mean over {len(runs)} seeds |{means}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", type=parse_recipe, metavar="NAME=RUN[,RUN...]")
    ap.add_argument("--families", default="augmented,augmented-depth")
    ap.add_argument("--valid-tasks", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "results" / "recipes.json"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--keep", action="store_true",
                    help="keep the recipes already in --out (same tasks) that are not named again")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    families = [f for f in args.families.split(",") if f]
    for f in families:
        get_family(f)  # unknown family: refused before any work
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    doc: dict = {"families": families, "valid_tasks": args.valid_tasks, "recipes": {}, "means": {}}
    if args.keep:
        doc["recipes"], doc["means"] = kept_recipes(previous, families, args.valid_tasks,
                                                    {n for n, _ in args.recipes})
        if previous and not doc["recipes"] and previous.get("recipes"):
            print(f"--keep: {out} was scored on other tasks; nothing kept", file=sys.stderr)
    for name, runs in args.recipes:
        per_run = {}
        for run in runs:
            per_run[str(run)] = {f: cached_score(previous, run, f, args.valid_tasks) for f in families}
            print(f"{name} {run}: " + ", ".join(f"{f} {per_run[str(run)][f]['score']:.4f}" for f in families),
                  file=sys.stderr, flush=True)
        doc["recipes"][name] = per_run
        doc["means"][name] = {f: statistics.fmean(r[f]["score"] for r in per_run.values()) for f in families}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: Path(p).write_text(_json.dumps(doc, indent=1)))
    cmd = " ".join(f"{n}={','.join(Path(r).name for r in rs)}" for n, rs in args.recipes)
    kept = [n for n in doc["recipes"] if n not in dict(args.recipes)]
    note = (f" Recipes {', '.join(kept)}: kept from `{out.name}` (`--keep`), scored earlier on the same tasks."
            if kept else "")
    lines = [START, "", f"Generated by `python tools/recipes.py {cmd}{' --keep' if args.keep else ''} "
             f"--families {','.join(families)} --valid-tasks {args.valid_tasks}` (meta-validation only: "
             f"{args.valid_tasks} validation tasks per family, seed 0; mean log validation loss after T, 10T and "
             f"25T, and their mean, the score; lower is better).{note}", "", *table(doc, families), "", END]
    readme = Path(args.readme)
    readme.write_text(replace_section(readme.read_text(), START, END, lines, "Recipes on meta-validation"))
    print(f"README recipes section regenerated from {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
