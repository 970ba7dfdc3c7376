"""The package layout: every module imports on its own, and README's Layout block names what exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mpbackprop

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mpbackprop"
STAGES = ("compiler", "graph", "engine", "tasks", "evaluation", "cli")


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


#: Run in a fresh interpreter: torch (the slow import that mpbackprop does not configure) loads once,
#: then each module is imported in a child forked before any of mpbackprop is loaded, a few at a time;
#: where fork is missing, each module gets an interpreter of its own.
_IMPORT_EACH = """
import importlib, os, subprocess, sys, traceback
names, jobs = sys.argv[1:], max(1, min(4, os.cpu_count() or 1))
failed = []
if hasattr(os, "fork"):
    import torch  # noqa: F401
    running = {}
    def reap():
        pid, status = os.wait()
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(running[pid])
        del running[pid]
    for name in names:
        while len(running) >= jobs:
            reap()
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        running[pid] = name
    while running:
        reap()
else:
    for name in names:
        if subprocess.run([sys.executable, "-c", f"import {name}"]).returncode != 0:
            failed.append(name)
print("FAILED", *sorted(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_in_a_fresh_process() -> None:
    modules = _modules()
    assert "mpbackprop.engine.backward" in modules and "mpbackprop.kinds.base" in modules
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPBACKPROP_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip() == "FAILED"


def test_the_package_is_the_tree_under_test() -> None:
    assert Path(mpbackprop.__file__).resolve().parent == PACKAGE


def _layout_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout\n"):]
    block = re.search(r"```\n(.*?)```", section, flags=re.S).group(1)
    paths, folder = [], ""
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or not re.fullmatch(r"[\w./-]+", m.group(2)) or "/" not in m.group(2) and "." not in m.group(2):
            continue  # a continuation line
        indent, name = len(m.group(1)), m.group(2)
        if indent == 0:
            folder = name if name.endswith("/") else ""
            paths.append(name)
        elif indent == 2:
            paths.append("mpbackprop/" + name)
            folder = "mpbackprop/" + name if name.endswith("/") else ""
        elif indent == 4 and folder:
            paths.append(folder + name)
    return paths


def test_every_path_in_the_readme_layout_exists() -> None:
    paths = _layout_paths()
    assert "mpbackprop/engine/backward.py" in paths and "tools/bench.py" in paths, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, missing


def test_the_readme_layout_lists_every_module_of_the_stages() -> None:
    listed = set(_layout_paths())
    modules = [p.relative_to(ROOT).as_posix() for stage in STAGES for p in (PACKAGE / stage).glob("*.py")]
    modules += [p.relative_to(ROOT).as_posix() for p in PACKAGE.glob("*.py")]
    unlisted = sorted(m for m in modules if m not in listed and Path(m).name not in ("__init__.py", "__main__.py")
                      or m == "mpbackprop/__init__.py" and m not in listed)
    assert not unlisted, unlisted


def test_the_stage_folders_are_packaged() -> None:
    from setuptools import find_packages

    found = set(find_packages(str(ROOT), include=["mpbackprop*"]))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert {f"mpbackprop.{s}" for s in STAGES} <= folders <= found, folders - found


def test_the_old_import_paths_of_user_files_still_work() -> None:
    from mpbackprop import compiler, modelfile, taskfile, tasks

    assert modelfile.load_model is compiler.load_model and modelfile.parse_shape is compiler.parse_shape
    assert taskfile.load_arrays is tasks.load_arrays and taskfile.load_task_file is tasks.load_task_file
