"""Hostile-input cases of ``compile``, ``verify`` and ``inspect`` (run by ``tests/test_hostile.py``).

Model files that would compile to a graph whose gradient differs from the module's, input
shapes that are not per-sample shapes, networks without parameters or over the memory limit,
and files that are not graphs mpbackprop wrote. The library side of each refusal is tested in
``tests/test_compile_safety.py``.
"""

from __future__ import annotations

from pathlib import Path

from hostile import BAD_INPUT, Case

_HEAD = "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\nINPUT_SHAPE = (6,)\n"


def _net(body: str, extra: str = "") -> str:
    """A model file: fc (6→6), fc2 (6→6), out (6→3) and a forward whose body is ``body``."""
    return (_HEAD + extra + "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            "        self.fc = nn.Linear(6, 6)\n        self.fc2 = nn.Linear(6, 6)\n        self.out = nn.Linear(6, 3)\n"
            "    def forward(self, x):\n" + "".join(f"        {line}\n" for line in body.splitlines()) +
            "model = Net()\n")


_FUNCTION = ("class Twice(torch.autograd.Function):\n    @staticmethod\n    def forward(ctx, x):\n        return x * 2\n"
             "    @staticmethod\n    def backward(ctx, g):\n        return g\n")


def _compile(name: str) -> list[str]:
    return ["compile", f"{{tmp}}/{name}", "-o", "{tmp}/out.bin"]


def _verify(name: str, *extra: str) -> list[str]:
    return ["verify", f"{{tmp}}/{name}", *extra]


def _export(tmp: Path) -> Path:
    """A JSON export of a small network, ``{tmp}/g.json``."""
    import torch.nn as nn

    import mpbackprop as mp
    from mpbackprop.graph import write_json

    return write_json(mp.compile(nn.Sequential(nn.Linear(3, 2)), (3,)), tmp / "g.json")


def _export_then_damage(tmp: Path) -> None:
    """A JSON export of a small network with its layer records renamed away."""
    path = _export(tmp)
    path.write_text(path.read_text().replace('"layers"', '"layerz"'))


CASES: list[Case] = [
    # 1. gradient-changing code: in-place changes of tensors read again, no_grad, detach, Functions
    Case("compile-iadd-then-old-tensor-read", _compile("m.py"), BAD_INPUT, "in-place '+=' in traced node 'iadd' at m.py:14",
         files={"m.py": _net("h = self.fc(x)\nskip = h\nh += self.fc2(h)\nreturn self.out(h + skip)")}),
    Case("verify-mul_-alias", _verify("m.py", "--json"), BAD_INPUT, "in-place Tensor.mul_ in traced node 'mul_' at m.py:13",
         files={"m.py": _net("h = self.fc(x)\ng = h.mul_(0.5)\nreturn self.out(g + self.fc2(h))")}),
    Case("compile-add_-unassigned", _compile("m.py"), BAD_INPUT, "Tensor.add_",
         files={"m.py": _net("h = self.fc(x)\nh.add_(self.fc2(x))\nreturn self.out(h)")}),
    Case("compile-inplace-relu-read-again", _compile("m.py"), BAD_INPUT, "inplace=False",
         files={"m.py": _net("h = self.fc(x)\nr = F.relu(h, inplace=True)\nreturn self.out(r + h)")}),
    Case("verify-no-grad-block", _verify("m.py"), BAD_INPUT, "runs with gradients disabled",
         files={"m.py": _net("h = self.fc(x)\nwith torch.no_grad():\n    g = self.fc2(h)\nreturn self.out(g + h)")}),
    Case("compile-set-grad-enabled", _compile("m.py"), BAD_INPUT, "torch.set_grad_enabled(False)",
         files={"m.py": _net("torch.set_grad_enabled(False)\nh = self.fc(x)\ntorch.set_grad_enabled(True)\n"
                             "return self.out(self.fc2(h))")}),
    Case("compile-detach", _compile("m.py"), BAD_INPUT, "Tensor.detach",
         files={"m.py": _net("h = self.fc(x)\nreturn self.out(h + self.fc2(h).detach())")}),
    Case("compile-custom-autograd-function", _compile("m.py"), BAD_INPUT, "custom autograd Function Twice",
         files={"m.py": _net("return self.out(Twice.apply(self.fc2(self.fc(x))))", extra=_FUNCTION)}),
    Case("compile-backward-hook", _compile("m.py"), BAD_INPUT, "module 'fc2' (Linear) has a backward hook",
         files={"m.py": _net("return self.out(self.fc2(self.fc(x)))") +
                "model.fc2.register_full_backward_hook(lambda m, gi, go: gi)\n"}),
    Case("compile-weight-norm", _compile("m.py"), BAD_INPUT, "not an nn.Parameter of its own",
         files={"m.py": _HEAD + "model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), "
                "nn.utils.parametrizations.weight_norm(nn.Linear(4, 2)))\n"}),
    Case("compile-forward-hook-changes-output", _compile("m.py"), BAD_INPUT,
         "does not compute what the module computes",
         files={"m.py": _net("return self.out(self.fc2(self.fc(x)))") +
                "model.fc2.register_forward_hook(lambda m, i, o: o * 2)\n"}),
    # 4. input shapes
    Case("compile-input-shape-dict", _compile("m.py"), BAD_INPUT, "INPUT_SHAPE = {1: 6} is a dict",
         files={"m.py": "import torch.nn as nn\nINPUT_SHAPE = {1: 6}\nmodel = nn.Sequential(nn.Linear(6, 2))\n"}),
    Case("compile-input-shape-with-batch-axis", _compile("m.py"), BAD_INPUT,
         "is per sample, without the batch axis",
         files={"m.py": "import torch.nn as nn\nINPUT_SHAPE = (32, 64)\n"
                        "model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))\n"}),
    Case("verify-input-shape-flag-with-batch-axis", _verify("m.py", "--input-shape", "1,64"), BAD_INPUT,
         "use (64,) if 1 is the batch size",
         files={"m.py": "import torch.nn as nn\nINPUT_SHAPE = (64,)\nmodel = nn.Sequential(nn.Linear(64, 10))\n"}),
    Case("compile-output-is-a-map", _compile("m.py"), BAD_INPUT, "(2, 6, 6), not a vector",
         files={"m.py": "import torch.nn as nn\nINPUT_SHAPE = (1, 8, 8)\n"
                        "model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())\n"}),
    # 5. no parameters
    Case("compile-no-parameters", _compile("m.py"), BAD_INPUT, "has no parameters to train",
         files={"m.py": "import torch.nn as nn\nINPUT_SHAPE = (1, 4, 4)\n"
                        "model = nn.Sequential(nn.AvgPool2d(2), nn.Flatten())\n"}),
    # 6. memory
    Case("compile-50m-parameters", _compile("m.py"), BAD_INPUT, "more than the limit of 2 GB",
         files={"m.py": "import torch.nn as nn\nINPUT_SHAPE = (7072,)\n"
                        "model = nn.utils.skip_init(nn.Linear, 7072, 7072)\n"}),
    Case("verify-over-a-lowered-limit", _verify("m.py"), BAD_INPUT, "MPBACKPROP_MAX_GRAPH_GB=1",
         files={"m.py": "import torch.nn as nn\nINPUT_SHAPE = (64,)\nmodel = nn.Sequential(nn.Linear(64, 10))\n"},
         env={"MPBACKPROP_MAX_GRAPH_GB": "0.000001"}),
    Case("compile-malformed-limit", ["compile", "{examples}/mlp_relu.py", "-o", "{tmp}/o.bin"], BAD_INPUT,
         "MPBACKPROP_MAX_GRAPH_GB='lots' is not a positive number", env={"MPBACKPROP_MAX_GRAPH_GB": "lots"}),
    # 8. files inspect cannot read
    Case("inspect-foreign-json", ["inspect", "{tmp}/g.json"], BAD_INPUT, "not a graph exported by",
         files={"g.json": '{"nodes": {"neuron": 3}}'}),
    Case("inspect-damaged-json-export", ["inspect", "{tmp}/g.json", "--json"], BAD_INPUT,
         "an mpbackprop JSON export, but damaged", setup=_export_then_damage),
    # inspect --plot into a file that is no picture (matplotlib's ValueError: exit 70 before)
    Case("inspect-plot-txt", ["inspect", "{tmp}/g.json", "--plot", "{tmp}/x.txt"], BAD_INPUT,
         "x.txt: cannot draw into a .txt file; use a name ending in .png, .pdf or .svg", setup=_export),
    Case("inspect-plot-no-suffix", ["inspect", "{tmp}/g.json", "--plot", "{tmp}/net"], BAD_INPUT,
         "cannot draw into a file without a suffix", setup=_export),
    Case("inspect-foreign-graphml", ["inspect", "{tmp}/g.graphml"], BAD_INPUT, "a GraphML file, but not a graph",
         files={"g.graphml": '<?xml version="1.0"?><graphml xmlns="http://graphml.graphdrawing.org/xmlns">'
                             '<graph edgedefault="directed"><node id="a"/></graph></graphml>'}),
]
