"""Hostile input, output-hygiene area: out-of-range option values (the global ``--seed``,
``evaluate``, ``analyze``) and rule files that ask for too much or do not fit their config.

Format: ``tests/hostile.py``; runner: ``tests/test_hostile.py``. Full disks need a patched
``write`` and are tested in ``tests/test_cli.py``.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

from hostile import BAD_INPUT, Case

from mpbackprop.rules import LearnedBackward, LearnedUpdate, save_rule


def edited_rule_file(path: Path, part: str = "update", config: dict[str, Any] | None = None,
                     state: dict[str, torch.Tensor] | None = None) -> Path:
    """A default learned rule saved at ``path`` by ``save_rule``, then its ``part`` config updated with
    ``config`` and its state replaced by ``state``, as a careless or hostile editor would."""
    save_rule(path, LearnedBackward(), LearnedUpdate())
    blob = torch.load(path, weights_only=True)
    cfg = json.loads(blob[part]["config"])
    cfg.update(config or {})
    blob[part]["config"] = json.dumps(cfg)  # NaN / Infinity as Python writes them: what a hostile file holds
    if state is not None:
        blob[f"{part}_state"] = state
    torch.save(blob, path)
    return path


def _rule(tmp: Path, **kwargs: Any) -> None:
    edited_rule_file(tmp / "r.pt", **kwargs)


def _wide_state(tmp: Path) -> None:
    edited_rule_file(tmp / "r.pt", "backward", state=LearnedBackward(hidden=8).state_dict())


_MODEL = ["compile", "{examples}/mlp_relu.py", "-o", "{tmp}/x.bin"]
_SEED_RANGE = "0 <= seed < 2**63"
_PLOT = "use a name ending in .png, .pdf or .svg"
_POSITIVE = "a finite number > 0"

CASES: list[Case] = [
    # the global --seed (raw OverflowError traceback before): 0 <= seed < 2**63, for every command
    Case("output-seed-2**64", ["--seed", str(2**64), *_MODEL], BAD_INPUT, _SEED_RANGE),
    Case("output-seed-2**63", ["--seed", str(2**63), "evaluate"], BAD_INPUT, _SEED_RANGE),
    Case("output-seed-negative", ["--seed", "-1", *_MODEL], BAD_INPUT, _SEED_RANGE),
    Case("output-seed-not-integer", ["--seed", "1e3", *_MODEL], BAD_INPUT, "'1e3' is not an integer"),
    Case("output-seed-env-huge", ["analyze", "fa", "--steps", "3", "--adam-lr", "0.01"], BAD_INPUT,
         f"{_SEED_RANGE} (from MPBACKPROP_SEED)", env={"MPBACKPROP_SEED": str(10**30)}),
    # evaluate --threads (100000 hung): 1..256
    Case("output-evaluate-threads-huge", ["evaluate", "--threads", "100000"], BAD_INPUT, "1 <= threads <= 256"),
    Case("output-evaluate-threads-zero", ["evaluate", "--threads", "0"], BAD_INPUT, "1 <= threads <= 256"),
    Case("output-evaluate-threads-env", ["evaluate"], BAD_INPUT, "(from MPBACKPROP_EVALUATE_THREADS)",
         env={"MPBACKPROP_EVALUATE_THREADS": "100000"}),
    # evaluate --plot x.txt wrote a PNG named x.txt
    Case("output-evaluate-plot-txt", ["evaluate", "--plot", "{tmp}/x.txt"], BAD_INPUT, f"a .txt file; {_PLOT}"),
    Case("output-evaluate-plot-no-suffix", ["evaluate", "--plot", "{tmp}/curves"], BAD_INPUT,
         f"a file without a suffix; {_PLOT}"),
    Case("output-evaluate-plot-jpeg", ["evaluate", "--plot", "{tmp}/curves.jpg"], BAD_INPUT, _PLOT),
    # analyze --adam-lr: finite and > 0
    Case("output-analyze-adam-lr-negative", ["analyze", "fa", "--adam-lr", "-1"], BAD_INPUT, _POSITIVE),
    Case("output-analyze-adam-lr-zero", ["analyze", "fa", "--adam-lr", "0"], BAD_INPUT, _POSITIVE),
    Case("output-analyze-adam-lr-inf", ["analyze", "fa", "--adam-lr", "inf"], BAD_INPUT, _POSITIVE),
    Case("output-analyze-adam-lr-nan", ["analyze", "fa", "--adam-lr", "nan"], BAD_INPUT, _POSITIVE),
    Case("output-analyze-adam-lr-word", ["analyze", "fa", "--adam-lr", "fast"], BAD_INPUT, "'fast' is not a number"),
    # analyze --message-step after the last step (silently clamped before)
    Case("output-analyze-message-step-after-steps", ["analyze", "fa", "--steps", "3", "--message-step", "4"],
         BAD_INPUT, "--message-step 4 is after the last step; allowed: 1..3"),
    # rule files: sizes bounded before anything is built, state shapes named on one line
    Case("output-rule-hidden-2e8", ["evaluate", "{tmp}/r.pt"], BAD_INPUT,
         "the update rule's hidden is 200000000.0; allowed: an integer in 1..1024", setup=partial(_rule, config={"hidden": 2e8})),
    Case("output-rule-layers-negative", ["analyze", "{tmp}/r.pt", "--adam-lr", "0.01"], BAD_INPUT,
         "the update rule's layers is -1; allowed: an integer in 1..16", setup=partial(_rule, config={"layers": -1})),
    Case("output-rule-state-dim-huge", ["evaluate", "{tmp}/r.pt"], BAD_INPUT,
         "the backward rule's state_dim is 4096; allowed: an integer in 1..8",
         setup=partial(_rule, part="backward", config={"state_dim": 4096})),
    Case("output-rule-lr-nan", ["evaluate", "{tmp}/r.pt"], BAD_INPUT, "the update rule's lr is nan; allowed: finite",
         setup=partial(_rule, config={"lr": float("nan")})),
    Case("output-rule-state-does-not-fit", ["evaluate", "{tmp}/r.pt"], BAD_INPUT,
         "coef_mlp.0.weight has shape [8, 4], the config needs [4, 4]", setup=_wide_state),
]
