"""The command line's choices come from one source each, and its helpers live beside the API."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from mpbackprop import evaluation
from mpbackprop.cli import format_table, main, shape_text
from mpbackprop.engine import LOSSES
from mpbackprop.evaluation import DTYPES, RULES, SUITE_CHOICES, check_suite, task_family
from mpbackprop.graph import FORMATS, output_format
from mpbackprop.metatrain.config import CHOICES, MetaConfig, asked_settings, default_run_dir


def _choices(command: str, option: str) -> tuple[str, ...]:
    param = next(p for p in main.commands[command].params if option in p.opts)
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


@pytest.mark.parametrize("command, option, expected", [
    ("meta-train", "--estimator", CHOICES["estimator"]),
    ("meta-train", "--objective", CHOICES["objective"]),
    ("meta-train", "--backward-init", CHOICES["backward_init"]),
    ("meta-train", "--update-init", CHOICES["update_init"]),
    ("evaluate", "--suite", (*evaluation.SUITES, "all")),
    ("verify", "--rule", RULES),
    ("verify", "--dtype", DTYPES),
    ("verify", "--loss", ("auto", *LOSSES)),
    ("compile", "--format", tuple(FORMATS)),
])
def test_choices_come_from_their_source(command, option, expected):
    assert _choices(command, option) == tuple(expected)


def test_config_checks_with_the_same_choices():
    for name, options in CHOICES.items():
        for value in options:
            MetaConfig().replace(**{name: value})
        with pytest.raises(ValueError):
            MetaConfig().replace(**{name: "nonsense"})
    assert SUITE_CHOICES[-1] == "all" and set(SUITE_CHOICES[:-1]) == set(evaluation.SUITES)


@pytest.mark.parametrize("output, fmt, expected", [
    (None, None, ("model.bin", "dgl")), ("g.json", None, ("g.json", "json")), ("g.xml", None, ("g.xml", "graphml")),
    ("g.GRAPHML", None, ("g.GRAPHML", "graphml")), ("g.txt", None, ("g.txt", "dgl")), (None, "json", ("model.json", "json")),
    ("g.bin", "json", ("g.bin", "json")),
])
def test_output_format(output, fmt, expected):
    out, chosen = output_format(None if output is None else Path(output), fmt, Path("dir/model.py"))
    assert (str(out), chosen) == expected


def test_meta_train_settings_and_run_directory(tmp_path):
    asked, cfg = asked_settings(None, {"estimator": "es", "seed": 4}, resume=False)
    assert asked == {} and cfg is not None and cfg.estimator == "es"
    assert default_run_dir(cfg, asked, {}) == Path("runs") / f"{cfg.family}-es-s4"
    assert asked_settings(None, {"estimator": "es"}, resume=True) == ({}, None)  # the run's own config decides
    assert default_run_dir(None, {}, {"seed": 9}) == Path("runs") / f"{MetaConfig().family}-{MetaConfig().estimator}-s9"
    bad = tmp_path / "c.json"
    bad.write_text('{"estimator": "nope"}')
    with pytest.raises(ValueError, match=r"c\.json: not a valid meta-training config"):
        asked_settings(bad, {}, resume=False)
    with pytest.raises(ValueError, match="truncation"):
        asked_settings(None, {"truncation": 10_000, "unroll": (10, 10)}, resume=False)


def test_task_family_and_suite_checks(tmp_path):
    assert task_family(None, None, str(tmp_path)) == "digits-mlp"
    assert task_family("synthetic", None, "default") == "synthetic"
    with pytest.raises(ValueError, match="unknown task family"):
        check_suite("nope", "heldout")
    check_suite("digits-mlp", "wider")


def test_tables():
    assert shape_text((1, 8, 8)) == "1x8x8" and shape_text(()) == "scalar"
    assert format_table(["a", "bb"], [[10, 2]], right={1}) == ["a   bb", "10   2"]
