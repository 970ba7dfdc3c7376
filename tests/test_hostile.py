"""Hostile and careless input, one table: command line -> exit status -> message fragment.

Every case must end with the stated exit status and (for refusals) exactly one ``Error: ...``
line on stderr that contains the fragment — never a traceback. The cases live in
``tests/hostile_<area>.py`` (format: ``tests/hostile.py``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from mpbackprop.cli import main

from hostile import Case

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
AREAS = sorted(p.stem for p in Path(__file__).parent.glob("hostile_*.py"))
CASES: list[Case] = [c for area in AREAS for c in getattr(importlib.import_module(area), "CASES")]


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{examples}", str(EXAMPLES))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MPBACKPROP_"):
            monkeypatch.delenv(key)
    for rel, text in case.files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(_fill(text, tmp_path))
    if case.setup is not None:
        case.setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    env = {k: _fill(v, tmp_path) for k, v in case.env.items()}
    result = CliRunner().invoke(main, [_fill(a, tmp_path) for a in case.argv], env=env, catch_exceptions=False)
    assert result.exit_code == case.code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if case.one_line:
        lines = result.stderr.strip().splitlines()
        errors = [ln for ln in lines if ln.startswith("Error: ")]
        assert len(errors) == 1, result.stderr
        assert case.fragment.lower() in errors[0].lower(), (case.fragment, errors[0])
    else:
        assert case.fragment.lower() in result.output.lower(), (case.fragment, result.output)
