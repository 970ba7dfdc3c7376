"""The ``mpbackprop`` command line: compile and inspect, every refusal, and the installed script."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import networkx as nx
import pytest
import torch
from click.testing import CliRunner

import mpbackprop
from mpbackprop._quiet import dgl
from mpbackprop.cli import main, report_errors
from mpbackprop.compiler import load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BAD = EXAMPLES / "bad"
ACTIVATIONS = ["relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid", "softplus"]
GOOD = [f"mlp_{a}" for a in ACTIVATIONS] + ["convnet", "resmlp"]
#: neurons per example: input plus every block
NEURONS = {"mlp_relu": 64 + 32 + 10, "convnet": 64 + 192 + 48 + 24 + 10, "resmlp": 12 + 16 * 9 + 4}
NEURONS.update({f"mlp_{a}": 16 + 16 + 8 + 4 for a in ACTIVATIONS if a != "relu"})


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MPBACKPROP_"):
            monkeypatch.delenv(key)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: object, **kw):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def assert_refused(result, *needles: str) -> str:
    """Exit status 2 and exactly one ``Error: ...`` line on stderr containing every needle."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("Error: "), line
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def model_for(name: str, seed: int = 0) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    return load_model(EXAMPLES / f"{name}.py")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every good example compiled once to a .bin by the CLI."""
    out = tmp_path_factory.mktemp("bins")
    paths = {}
    r = CliRunner()
    for name in GOOD:
        path = out / f"{name}.bin"
        res = invoke(r, "compile", EXAMPLES / f"{name}.py", "-o", path)
        assert res.exit_code == 0, res.output
        paths[name] = path
    return paths


# ------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("name", GOOD)
def test_compile_dgl_reproduces_forward_in_float64(name: str, compiled: dict[str, Path]) -> None:
    net = mpbackprop.load(compiled[name])
    model, shape = model_for(name)  # the CLI seeds torch with --seed 0 before running the file
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert net.num_params == flat.numel()
    assert torch.equal(net.values, flat)
    assert net.num_neurons == NEURONS[name]
    assert net.input_shape == shape
    model = model.double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        got = net.forward(x, theta=net.values.double())
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-10


def test_compile_output_lines_and_default_name(runner: CliRunner, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = invoke(runner, "compile", EXAMPLES / "convnet.py")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "convnet.bin").is_file()
    facts = dict(line.split(": ", 1) for line in res.stdout.strip().splitlines())
    assert facts["neurons"] == "338"
    assert facts["params"] == "448"
    assert facts["edges"].startswith("9404 in 20 edge types")
    assert facts["layers"].startswith("4 (")
    assert facts["compile time"].endswith(" s")
    assert facts["wrote"] == "convnet.bin (dgl)"
    assert res.stderr == ""


@pytest.mark.parametrize("name", GOOD)
def test_compile_graphml_parses(name: str, runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "sub" / f"{name}.graphml"
    res = invoke(runner, "compile", EXAMPLES / f"{name}.py", "--format", "graphml", "-o", out)
    assert res.exit_code == 0, res.output
    G = nx.read_graphml(out)
    net = mpbackprop.compile(*model_for(name))
    summary = net.summary()
    assert G.number_of_nodes() == net.num_neurons + net.num_params
    forward_edges = sum(n for k, n in summary["num_edges"].items() if not k.split(":")[1].endswith("_rev"))
    assert G.number_of_edges() == forward_edges
    assert G.graph["input_shape"] == ",".join(map(str, net.input_shape))
    assert json.loads(G.graph["metadata"])["output_layer"] == net.output_layer
    ntypes = [d["ntype"] for _, d in G.nodes(data=True)]
    assert ntypes.count("neuron") == net.num_neurons
    assert {"layer", "coord_c", "coord_h", "coord_w"} <= set(G.nodes["n0"])


@pytest.mark.parametrize("name", GOOD)
def test_compile_json_parses(name: str, runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    res = invoke(runner, "compile", EXAMPLES / f"{name}.py", "--format", "json", "-o", out)
    assert res.exit_code == 0, res.output
    with open(out) as fh:
        doc = json.load(fh)
    net = mpbackprop.compile(*model_for(name))
    assert doc["format"] == "mpbackprop-json" and doc["version"] == 1
    assert doc["summary"] == json.loads(json.dumps(net.summary()))
    assert doc["network"]["input_shape"] == list(net.input_shape)
    assert doc["nodes"]["neuron"]["count"] == net.num_neurons
    assert doc["nodes"]["param"]["count"] == net.num_params
    assert doc["nodes"]["param"]["data"]["value"] == pytest.approx(net.values.tolist())
    assert len(doc["nodes"]["neuron"]["data"]["coord"]) == net.num_neurons
    for key, n in doc["summary"]["num_edges"].items():
        assert len(doc["edges"][key]["src"]) == len(doc["edges"][key]["dst"]) == n
    # the edge lists rebuild the same heterograph
    rebuilt = {tuple(k.split(":")): (torch.tensor(e["src"], dtype=torch.int64), torch.tensor(e["dst"], dtype=torch.int64))
               for k, e in doc["edges"].items()}
    g = dgl.heterograph(rebuilt, num_nodes_dict={t: d["count"] for t, d in doc["nodes"].items()})
    for etype in net.graph.canonical_etypes:
        u1, v1 = g.edges(etype=etype, order="eid")
        u2, v2 = net.graph.edges(etype=etype, order="eid")
        assert torch.equal(u1, u2) and torch.equal(v1, v2)


def test_format_follows_output_suffix_and_env(runner: CliRunner, tmp_path: Path) -> None:
    res = invoke(runner, "compile", EXAMPLES / "mlp_tanh.py", "-o", tmp_path / "a.json")
    assert res.exit_code == 0 and "(json)" in res.stdout
    json.loads((tmp_path / "a.json").read_text())
    res = invoke(runner, "compile", EXAMPLES / "mlp_tanh.py", "-o", tmp_path / "b.out",
                 env={"MPBACKPROP_COMPILE_FORMAT": "graphml"})
    assert res.exit_code == 0 and "(graphml)" in res.stdout
    nx.read_graphml(tmp_path / "b.out")


def test_input_shape_flag_and_attr(runner: CliRunner, tmp_path: Path) -> None:
    src = tmp_path / "two.py"
    src.write_text(
        "import torch.nn as nn\n"
        "small = nn.Sequential(nn.Linear(3, 2))\n"
        "def wide():\n"
        "    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))\n"
    )
    res = invoke(runner, "compile", src, "--attr", "wide", "--input-shape", "5", "-o", tmp_path / "w.bin")
    assert res.exit_code == 0, res.output
    assert mpbackprop.load(tmp_path / "w.bin").num_params == 5 * 4 + 4 + 4 + 1
    res = invoke(runner, "compile", src, "--attr", "small", "--input-shape", "(3,)", "-o", tmp_path / "s.bin")
    assert res.exit_code == 0, res.output
    assert mpbackprop.load(tmp_path / "s.bin").num_params == 8


def test_seed_changes_the_weights(runner: CliRunner, tmp_path: Path) -> None:
    for seed in (0, 0, 1):
        res = invoke(runner, "--seed", seed, "compile", EXAMPLES / "mlp_elu.py", "-o", tmp_path / f"{seed}.bin")
        assert res.exit_code == 0
    a, b = mpbackprop.load(tmp_path / "0.bin").values, mpbackprop.load(tmp_path / "1.bin").values
    assert not torch.equal(a, b)
    assert torch.equal(mpbackprop.load(tmp_path / "0.bin").values, a)  # the seed makes compile repeatable
    model, _ = model_for("mlp_elu", seed=0)
    assert torch.equal(a, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


# ------------------------------------------------------------------------------- inspect
def test_inspect_text(runner: CliRunner, compiled: dict[str, Path]) -> None:
    res = invoke(runner, "inspect", compiled["convnet"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    net = mpbackprop.load(compiled["convnet"])
    summary = net.summary()
    assert "neuron    338" in text and "param     448" in text
    for key, n in summary["num_edges"].items():
        assert any(line.split() == [key, str(n)] for line in text.splitlines()), key
    lines = text.splitlines()
    start = lines.index("layers:") + 1
    table = lines[start:start + len(summary["layers"]) + 2]
    assert table[0].split() == ["index", "name", "kind", "shape", "neurons", "params", "activation", "inputs", "uses"]
    assert len({len(row) for row in table}) == 1  # aligned: the right-aligned last column ends every row
    for row, layer in zip(table[1:], summary["layers"]):
        cells = row.split()
        assert cells[:3] == [str(layer["index"]), layer["name"], layer["kind"]]
        assert int(cells[4]) == layer["neurons"] and int(cells[5]) == layer["params"]
    assert table[-1].split() == ["total", "338", "448", str(sum(d["uses"] for d in summary["layers"]))]


@pytest.mark.parametrize("name", ["mlp_relu", "convnet", "resmlp"])
def test_inspect_json(name: str, runner: CliRunner, compiled: dict[str, Path]) -> None:
    res = invoke(runner, "inspect", compiled[name], "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    model, shape = model_for(name)
    assert doc["num_nodes"] == {"neuron": NEURONS[name], "param": sum(p.numel() for p in model.parameters())}
    assert doc["num_nodes"]["neuron"] == sum(layer["neurons"] for layer in doc["layers"])
    assert doc["layers"][0]["neurons"] == math.prod(shape)
    assert sum(layer["params"] for layer in doc["layers"]) == doc["num_nodes"]["param"]
    net = mpbackprop.load(compiled[name])
    assert sum(doc["num_edges"].values()) == net.graph.num_edges()
    assert all(len(k.split(":")) == 3 and isinstance(v, int) for k, v in doc["num_edges"].items())
    for layer in doc["layers"]:
        assert {"index", "name", "kind", "shape", "neurons", "params", "activation", "inputs", "uses"} <= set(layer)


def test_inspect_plot(runner: CliRunner, compiled: dict[str, Path], tmp_path: Path) -> None:
    png = tmp_path / "pics" / "convnet.png"
    res = invoke(runner, "inspect", compiled["convnet"], "--plot", png)
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    png2 = tmp_path / "res.png"
    res = invoke(runner, "inspect", compiled["resmlp"], "--json", "--plot", png2)
    assert res.exit_code == 0, res.output
    json.loads(res.stdout)  # the "wrote" line goes to stderr: stdout stays JSON
    assert png2.stat().st_size > 10_000


def test_inspect_plot_refuses_large_networks(runner: CliRunner, compiled: dict[str, Path], tmp_path: Path) -> None:
    png = tmp_path / "big.png"
    res = invoke(runner, "inspect", compiled["convnet"], "--plot", png, "--max-nodes", 100)
    assert_refused(res, "338 neurons", "--max-nodes 100")
    assert res.stdout == "" and not png.exists()
    res = invoke(runner, "inspect", compiled["mlp_tanh"], "--plot", tmp_path / "x.nope")
    assert_refused(res, "x.nope", ".png")


# ------------------------------------------------------------------------------ refusals
def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


REFUSALS = {
    # name: (file writer or path, extra args, needles)
    "groupnorm": (BAD / "bad_groupnorm.py", [], ["GroupNorm"]),
    "maxpool": (BAD / "bad_maxpool.py", [], ["MaxPool2d"]),
    "controlflow": (BAD / "bad_controlflow.py", [], ["control flow", "bad_controlflow.py:17"]),
    "syntax": (BAD / "bad_syntax.py", [], ["bad_syntax.py:7", "SyntaxError"]),
    "no_model": ("x = 1\nINPUT_SHAPE = (3,)\n", [], ["nomodel.py", "neither `model` nor `build_model()`"]),
    "no_model_lists_modules": (
        "import torch.nn as nn\nnet = nn.Linear(3, 2)\nclass Net(nn.Module):\n    pass\nINPUT_SHAPE = (3,)\n",
        [], ["nomodel.py", "net", "Net (class)", "--attr"]),
    "bad_attr": (EXAMPLES / "mlp_relu.py", ["--attr", "nosuch"], ["mlp_relu.py", "'nosuch'"]),
    "attr_not_module": (EXAMPLES / "mlp_relu.py", ["--attr", "INPUT_SHAPE"], ["INPUT_SHAPE", "not a torch.nn.Module"]),
    "raises_on_exec": ("import torch\nINPUT_SHAPE = (3,)\nraise RuntimeError('no GPU here')\n", [],
                       ["nomodel.py:3", "RuntimeError: no GPU here"]),
    "import_error": ("import not_a_module_xyz\n", [], ["nomodel.py:1", "not_a_module_xyz"]),
    "build_model_raises": ("INPUT_SHAPE = (3,)\n\ndef build_model():\n    raise ValueError('width must be even')\n",
                           [], ["nomodel.py:4", "build_model()", "ValueError: width must be even"]),
    "build_model_returns_junk": ("INPUT_SHAPE = (3,)\ndef build_model():\n    return 42\n", [],
                                 ["nomodel.py", "returned a int"]),
    "no_input_shape": ("import torch.nn as nn\nmodel = nn.Linear(3, 2)\n", [], ["nomodel.py", "INPUT_SHAPE", "--input-shape"]),
    "bad_input_shape": ("import torch.nn as nn\nmodel = nn.Linear(3, 2)\nINPUT_SHAPE = (3, 'a')\n", [],
                        ["nomodel.py", "INPUT_SHAPE = (3, 'a')"]),
    "wrong_input_shape": (EXAMPLES / "mlp_relu.py", ["--input-shape", "32"], ["Linear"]),
    "malformed_input_shape": (EXAMPLES / "mlp_relu.py", ["--input-shape", "1,x,8"], ["--input-shape", "1,x,8"]),
    "zero_input_shape": (EXAMPLES / "mlp_relu.py", ["--input-shape", "0,8"], ["--input-shape", "0,8"]),
    "missing_file": (EXAMPLES / "does_not_exist.py", [], ["does_not_exist.py"]),
    "not_python": ("not python\n", ["--format", "json"], ["nomodel.txt", "not a Python file"]),
    "unknown_format": (EXAMPLES / "mlp_relu.py", ["--format", "onnx"], ["--format", "onnx"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_compile_refusals_are_one_line(case: str, runner: CliRunner, tmp_path: Path) -> None:
    src, extra, needles = REFUSALS[case]
    if isinstance(src, str):
        src = _write(tmp_path, "nomodel.txt" if case == "not_python" else "nomodel.py", src)
    out = tmp_path / "out.bin"
    res = invoke(runner, "compile", src, "-o", out, *extra)
    assert_refused(res, *needles)
    assert res.stdout == ""
    assert not out.exists()


def test_inspect_refusals(runner: CliRunner, tmp_path: Path) -> None:
    assert_refused(invoke(runner, "inspect", tmp_path / "nope.bin"), "nope.bin")
    junk = _write(tmp_path, "junk.bin", "not a graph")
    assert_refused(invoke(runner, "inspect", junk), "junk.bin", "not a graph file")
    assert_refused(invoke(runner, "inspect", tmp_path), "is a directory")
    (tmp_path / "g.json").write_text('{"format": "something-else"}')  # mpbackprop's own exports are read
    assert_refused(invoke(runner, "inspect", tmp_path / "g.json"), "g.json", "not a graph exported")
    assert_refused(invoke(runner, "inspect", junk, "--max-nodes", "0"), "--max-nodes")


def test_debug_shows_traceback(runner: CliRunner, tmp_path: Path) -> None:
    res = invoke(runner, "--debug", "compile", BAD / "bad_maxpool.py", "-o", tmp_path / "x.bin")
    assert res.exit_code == 2
    assert "Traceback (most recent call last)" in res.stderr
    assert "UnsupportedOpError" in res.stderr and "MaxPool2d" in res.stderr
    res = invoke(runner, "compile", BAD / "bad_syntax.py", env={"MPBACKPROP_DEBUG": "1"})
    assert res.exit_code == 2 and "Traceback" in res.stderr and "ModelFileError" in res.stderr


def test_unexpected_errors_exit_70_with_one_line(runner: CliRunner, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(mpbackprop, "compile", boom)
    res = invoke(runner, "compile", EXAMPLES / "mlp_relu.py", "-o", tmp_path / "x.bin")
    assert res.exit_code == 70  # EX_SOFTWARE: not 1, which verify uses for "verification failed"
    assert res.stderr.strip() == ("Error: internal error (RuntimeError: kaput); rerun with --debug for the "
                                  "traceback")
    res = invoke(runner, "--debug", "compile", EXAMPLES / "mlp_relu.py", "-o", tmp_path / "x.bin")
    assert res.exit_code == 70 and "Traceback" in res.stderr and "second line" in res.stderr


def test_a_bug_outside_the_subcommands_is_an_internal_error_too(runner: CliRunner, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(_seed):
        raise RuntimeError("seeding broke")

    monkeypatch.setattr(torch, "manual_seed", boom)  # called by the group callback, before any subcommand
    res = invoke(runner, "compile", EXAMPLES / "mlp_relu.py", "-o", tmp_path / "x.bin")
    assert res.exit_code == 70
    assert res.stderr.strip() == ("Error: internal error (RuntimeError: seeding broke); rerun with --debug for "
                                  "the traceback")
    res = invoke(runner, "--debug", "compile", EXAMPLES / "mlp_relu.py", "-o", tmp_path / "x.bin")
    assert res.exit_code == 70 and "Traceback" in res.stderr and "seeding broke" in res.stderr


def test_interrupt_exits_130(runner: CliRunner) -> None:
    @click.command("interrupted")
    @report_errors
    def interrupted() -> None:
        raise KeyboardInterrupt

    main.add_command(interrupted)
    try:
        res = invoke(runner, "interrupted")
        assert res.exit_code == 130 and "Traceback" not in res.output
    finally:
        main.commands.pop("interrupted")


def test_full_disk_names_the_file_being_written(runner: CliRunner, tmp_path: Path) -> None:
    import errno

    from mpbackprop._io import atomic_write

    def no_space(_tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises: no file name

    @click.command("fill")
    @click.option("--named", is_flag=True)
    @report_errors
    def fill(named: bool) -> None:
        if named:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "named.bin"))
        atomic_write(tmp_path / "sub" / "results.json", no_space)

    main.add_command(fill)
    try:
        line = assert_refused(invoke(runner, "fill"), "no space left on device writing")
        assert str(tmp_path / "sub" / "results.json") in line and "internal error" not in line
        assert not list((tmp_path / "sub").iterdir())  # the temporary file is gone
        assert_refused(invoke(runner, "fill", "--named"), f"no space left on device writing {tmp_path / 'named.bin'}")
    finally:
        main.commands.pop("fill")


def test_report_errors_serves_new_subcommands(runner: CliRunner) -> None:
    @click.command("explode")
    @click.option("--how", type=click.Choice(["library", "cli", "os"]))
    @report_errors
    def explode(how: str) -> None:
        from mpbackprop.cli import CLIError

        if how == "library":
            raise mpbackprop.ShapeError("batch of shape (2, 3) does not fit\nmore detail")
        if how == "cli":
            raise CLIError("nothing to evaluate in run/ (train first)")
        open("/nonexistent-dir/x")

    main.add_command(explode)
    try:
        assert_refused(invoke(runner, "explode", "--how", "library"), "batch of shape (2, 3) does not fit")
        assert_refused(invoke(runner, "explode", "--how", "cli"), "nothing to evaluate")
        assert_refused(invoke(runner, "explode", "--how", "os"), "/nonexistent-dir/x")
        assert_refused(invoke(runner, "explode", "--how", "bogus"), "--how")
    finally:
        main.commands.pop("explode")


def test_version_and_help(runner: CliRunner) -> None:
    res = invoke(runner, "--version")
    assert res.exit_code == 0 and mpbackprop.__version__ in res.stdout
    res = invoke(runner, "--help")
    text = " ".join(res.stdout.split())
    assert res.exit_code == 0 and "70 internal error" in text and "130 interrupted" in text
    res = invoke(runner, "compile", "--help")
    assert res.exit_code == 0 and "mpbackprop-json" in res.stdout
    res = invoke(runner, "nosuchcommand")
    assert_refused(res, "nosuchcommand")


# ---------------------------------------------------------------------------- subprocess
def _script() -> str:
    here = Path(sys.executable).parent / "mpbackprop"
    found = str(here) if here.exists() else shutil.which("mpbackprop")
    if not found:
        pytest.skip("the mpbackprop console script is not installed")
    return found


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MPBACKPROP_")}


def test_installed_script(tmp_path: Path) -> None:
    script = _script()
    out = tmp_path / "convnet.bin"
    proc = subprocess.run([script, "compile", str(EXAMPLES / "convnet.py"), "-o", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "neurons: 338" in proc.stdout and out.is_file()
    assert mpbackprop.load(out).num_params == 448
    proc = subprocess.run([script, "compile", str(BAD / "bad_maxpool.py"), "-o", str(tmp_path / "x.bin")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "MaxPool2d" in lines[0]


def test_python_dash_m_and_quiet_import() -> None:
    code = "import mpbackprop, mpbackprop.cli"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0
    assert proc.stdout == "" and proc.stderr == ""
    proc = subprocess.run([sys.executable, "-m", "mpbackprop", "--version"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0 and mpbackprop.__version__ in proc.stdout
