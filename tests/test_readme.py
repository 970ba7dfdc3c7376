"""The README's Python snippets run as written (from the repository root)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(ROOT)
    code = "\n".join(blocks).replace('"out/', f'"{tmp_path}/')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    # the snippets did what they say
    net, model, x = namespace["net"], namespace["model"], namespace["x"]
    assert torch.allclose(net.forward_graph(x), model(x), atol=1e-5)
    assert os.path.isfile(tmp_path / "convnet.bin")
    valid, mlp = namespace["valid"], namespace["mlp"]
    acc = (mlp(valid.x).argmax(1) == valid.y).float().mean()
    assert acc > 0.8, acc  # feedback alignment trained the MLP in place
