"""DGL through :mod:`mpbackprop._quiet`: graphbolt is left out only when it cannot load.

DGL 2.1's graphbolt library exists per PyTorch version up to 2.2.1; with a newer PyTorch its
import raises ``FileNotFoundError``. The subprocess tests reproduce that failure exactly by
giving torch a version string for which no graphbolt library was built.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mpbackprop import _quiet

_NEWER = "2.15.0"  # newest torch on PyPI when this was written; DGL 2.1 ships no graphbolt for it

_TRAIN_ONE_STEP = """
import torch, torch.nn as nn
import mpbackprop
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
ref.load_state_dict(model.state_dict())
x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
mpbackprop.Trainer(model, "exact", update=mpbackprop.rules.SGD(lr=0.1)).step(x, y)
torch.nn.functional.cross_entropy(ref(x), y).backward()
with torch.no_grad():
    for p in ref.parameters():
        p -= 0.1 * p.grad
err = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), ref.parameters()))
print("GRAPHBOLT", mpbackprop._quiet.GRAPHBOLT, "ERR", err)
"""


def _run(prelude: str, body: str = _TRAIN_ONE_STEP) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DGLBACKEND" and not k.startswith("MPBACKPROP_")}
    code = textwrap.dedent(prelude) + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not torch.__version__.startswith("2.2."), reason="DGL 2.1 ships graphbolt for torch <= 2.2 only")
def test_locked_torch_loads_real_graphbolt() -> None:
    import dgl

    assert _quiet.GRAPHBOLT is True
    assert type(sys.modules["dgl.graphbolt"]).__name__ == "module"
    assert hasattr(sys.modules["dgl.graphbolt"], "load_graphbolt")  # DGL's own, not the stand-in
    assert _quiet.dgl is dgl


def test_newer_torch_without_graphbolt_imports_quietly_and_trains() -> None:
    proc = _run(f"import torch; torch.__version__ = {_NEWER!r}\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    words = proc.stdout.split()
    assert words[:2] == ["GRAPHBOLT", "False"]
    assert float(words[3]) < 1e-12


def test_newer_torch_without_graphbolt_saves_and_loads_graphs() -> None:
    """DGL's object FFI survives the second import (its C core is not initialised twice): graphs save."""
    body = """
import tempfile, torch, torch.nn as nn
import mpbackprop
net = mpbackprop.compile(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.zeros(2, 4))
path = net.save(tempfile.mkdtemp() + "/net.bin")
back = mpbackprop.load(path)
print("SAVED", back.graph.num_nodes("neuron") == net.graph.num_nodes("neuron"))
"""
    proc = _run(f"import torch; torch.__version__ = {_NEWER!r}\n", body)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["SAVED", "True"]


def test_stand_in_says_why_it_is_empty() -> None:
    proc = _run(f"import torch; torch.__version__ = {_NEWER!r}\n",
                "import mpbackprop, dgl\ntry:\n    dgl.graphbolt.ItemSampler\nexcept AttributeError as e:\n"
                "    print(e)\n")
    assert proc.returncode == 0, proc.stderr
    assert "could not load" in proc.stdout and "ItemSampler" in proc.stdout


def test_other_dgl_import_failures_are_not_hidden() -> None:
    prelude = """
    import sys, importlib.abc
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dgl.heterograph":
                raise ImportError("simulated broken DGL")
    sys.meta_path.insert(0, Refuse())
    """
    proc = _run(prelude, "import mpbackprop\n")
    assert proc.returncode != 0
    assert "simulated broken DGL" in proc.stderr


@pytest.mark.parametrize("frames, expected", [
    ([os.path.join("x", "dgl", "graphbolt", "__init__.py")], True),
    ([os.path.join("x", "dgl", "heterograph.py")], False),
])
def test_graphbolt_failure_is_recognised_by_where_it_was_raised(frames: list[str], expected: bool) -> None:
    namespace: dict = {}
    code = compile("raise FileNotFoundError('no lib')", frames[0], "exec")
    try:
        exec(code, namespace)
    except FileNotFoundError as exc:
        assert _quiet._failed_in_graphbolt(exc) is expected
