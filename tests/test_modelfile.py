"""Loading MODEL.py files: resolution rules, isolation, and one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.nn as nn

from mpbackprop.compiler import load_model, parse_shape
from mpbackprop.errors import ModelFileError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,shape", [
    ("1,8,8", (1, 8, 8)), ("(1, 8, 8)", (1, 8, 8)), ("[3,4]", (3, 4)), ("1x8x8", (1, 8, 8)),
    ("64", (64,)), ("64,", (64,)), (" 2 3 ", (2, 3)),
])
def test_parse_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", ",", "1,,8", "a,b", "0,3", "-1", "1.5", "()", "1;2"])
def test_parse_shape_refuses_junk(text: str) -> None:
    with pytest.raises(ModelFileError, match="e.g. 1,8,8") as info:
        parse_shape(text)
    assert "\n" not in str(info.value)


def test_model_wins_over_build_model_and_shapes_normalise(tmp_path: Path) -> None:
    path = write(tmp_path, "m.py", "import torch, torch.nn as nn\nmodel = nn.Sequential(nn.Linear(4, 2))\n"
                                   "def build_model():\n    raise AssertionError('not called')\n"
                                   "INPUT_SHAPE = torch.Size([4])\n")
    model, shape = load_model(path)
    assert isinstance(model, nn.Sequential) and shape == (4,)
    assert load_model(path, input_shape=(2, 2))[1] == (2, 2)
    write(tmp_path, "n.py", "import torch.nn as nn\nINPUT_SHAPE = 7\nclass Net(nn.Sequential):\n"
                            "    def __init__(self):\n        super().__init__(nn.Linear(7, 1))\n")
    model, shape = load_model(tmp_path / "n.py", attr="Net")  # a class is a zero-argument builder
    assert type(model).__name__ == "Net" and shape == (7,)


def test_files_are_isolated(tmp_path: Path) -> None:
    a = write(tmp_path, "a/model.py", "import torch.nn as nn\nWIDTH = 3\nmodel = nn.Linear(WIDTH, 1)\n"
                                       "INPUT_SHAPE = (WIDTH,)\n")
    b = write(tmp_path, "b/model.py", "import torch.nn as nn\nfrom helper import WIDTH\n"
                                       "model = nn.Linear(WIDTH, 1)\nINPUT_SHAPE = (WIDTH,)\n")
    write(tmp_path, "b/helper.py", "WIDTH = 5\n")
    path_before = list(sys.path)
    mods_before = set(sys.modules)
    ma, _ = load_model(a)
    mb, shape_b = load_model(b)  # same stem, a sibling import: no collision
    assert (ma.in_features, mb.in_features, shape_b) == (3, 5, (5,))
    assert sys.path == path_before
    new = set(sys.modules) - mods_before - {"helper"}
    assert len(new) == 2 and all(n.startswith("_mpbackprop_model_model_") for n in new)
    assert "model" not in sys.modules
    assert not (tmp_path / "a" / "__pycache__").exists()
    sys.modules.pop("helper", None)


def test_failed_load_leaves_no_module(tmp_path: Path) -> None:
    path = write(tmp_path, "boom.py", "x = 1\nraise KeyError('k')\n")
    before = set(sys.modules)
    with pytest.raises(ModelFileError, match=r"boom.py:2: KeyError: 'k'"):
        load_model(path)
    assert set(sys.modules) == before


@pytest.mark.parametrize("text,match", [
    ("import sys\nsys.exit(3)\n", r"f.py:2: SystemExit: 3"),
    ("def build_model(width):\n    pass\nINPUT_SHAPE = (1,)\n", r"f.py:1: build_model\(\) raised TypeError"),
    ("model = 3\n", r"`model` is a int, not a torch.nn.Module"),
    ("import torch.nn as nn\nmodel = nn.Linear(1, 1)\nINPUT_SHAPE = (0, 2)\n", r"INPUT_SHAPE = \(0, 2\) is not a shape"),
    ("import torch.nn as nn\nmodel = nn.Linear(1, 1)\nINPUT_SHAPE = (True,)\n", r"INPUT_SHAPE = \(True,\)"),
    ("import torch.nn as nn\nmodel = nn.Linear(1, 1)\nINPUT_SHAPE = 'abc'\n", r"INPUT_SHAPE = 'abc'"),
    ("\x00", r"cannot compile it|SyntaxError"),
    ("import torch.nn as nn\nmodel = nn.Linear(1, 1)\nINPUT_SHAPE = {1: 8, 2: 8}\n",
     r"INPUT_SHAPE = \{1: 8, 2: 8\} is a dict, is not a shape: use a tuple of positive ints per sample, without"),
    ("import torch.nn as nn\nmodel = nn.Linear(1, 1)\nINPUT_SHAPE = {8}\n", r"INPUT_SHAPE = \{8\} is a set"),
])
def test_errors_are_one_line(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, "f.py", text)
    with pytest.raises(ModelFileError, match=match) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "missing.py")
    with pytest.raises(ModelFileError, match="is a directory"):
        load_model(tmp_path)
    with pytest.raises(ModelFileError, match="not a Python file"):
        load_model(write(tmp_path, "m.txt", "model = 1"))
    with pytest.raises(ModelFileError, match="input shape 'x' for"):
        load_model(ROOT / "examples" / "mlp_relu.py", input_shape="x")  # type: ignore[arg-type]


def test_what_a_model_file_prints_goes_to_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "chatty.py", "import torch.nn as nn\nprint('importing')\nINPUT_SHAPE = (3,)\n"
                                        "def build_model():\n    print('building')\n"
                                        "    return nn.Sequential(nn.Linear(3, 2))\n")
    load_model(path)
    out, err = capfd.readouterr()
    assert out == "" and "importing" in err and "building" in err


def test_verify_json_stays_strict_json_when_the_model_prints(tmp_path: Path) -> None:
    """Prints at import, in build_model() and in forward (while tracing and running) go to stderr."""
    from click.testing import CliRunner

    from mpbackprop._json import loads_strict
    from mpbackprop.cli import main

    path = write(tmp_path, "chatty.py", (
        "import torch, torch.nn as nn\nprint('importing')\nINPUT_SHAPE = (3,)\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(3, 2)\n    def forward(self, x):\n        print('forward', x.shape)\n"
        "        return self.fc(x)\n"
        "def build_model():\n    print('building')\n    return Net()\n"))
    runner = CliRunner()
    for argv in (["verify", str(path), "--json"], ["verify", str(path), "--json", "--rule", "fa"]):
        res = runner.invoke(main, argv, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        doc = loads_strict(res.stdout)
        assert doc["ok"] is True and doc["layers"][0]["name"] == "fc"
        assert "importing" in res.stderr and "building" in res.stderr and "forward" in res.stderr
    res = runner.invoke(main, ["compile", str(path), "-o", str(tmp_path / "c.json")], catch_exceptions=False)
    assert res.exit_code == 0 and "forward" not in res.stdout and "importing" not in res.stdout
