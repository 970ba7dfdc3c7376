"""Package a meta-trained rule as the default: ``mpbackprop/data/default_rule.pt`` + provenance JSON.

    python tools/ship_rule.py RUN_DIR      # the run's best.pt (chosen on meta-validation tasks)

The provenance (command, config, commit, step, meta-validation scores) is already inside the
rule file; it is also written beside it as ``default_rule.json`` for people and reviews.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from mpbackprop._json import dumps
from mpbackprop.rules import load_rule

DATA = Path(__file__).resolve().parents[1] / "mpbackprop" / "data"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(argv[0]) / "best.pt"
    _, _, meta = load_rule(src)  # refuses anything that is not a rule file
    DATA.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, DATA / "default_rule.pt")
    (DATA / "default_rule.json").write_text(dumps({"source": str(src), **meta}, indent=2) + "\n")
    print(f"shipped {src} (step {meta.get('step')}, commit {meta.get('commit')}) -> {DATA / 'default_rule.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
