"""One harness for every layer kind: what a kind's test file runs on its own models.

A kind is correct when, on models that use it,

* the engine's exact signals equal autograd's (``verify``: <= 1e-10 absolute in float64, <= 1e-4 relative
  in float32) and feedback alignment equals its straight-through autograd oracle;
* its dense fast path equals its DGL reference path (``fused=True`` vs ``False``) for the exact rule,
  feedback alignment and learned rules with one and with two state channels (full coefficients);
* its forward as message passing equals its dense forward, and the graph survives save/load and the
  JSON export with the same signals;
* the budget's estimate bounds the graph it builds.

``check_kind(make, shape)`` runs all of it and returns the verify errors per dtype for the report.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import mpbackprop as mp
from mpbackprop import verify
from mpbackprop.compiler import estimate, symbolic_trace
from mpbackprop.engine import signals
from mpbackprop.graph import read_json, write_json
from mpbackprop.kinds import BlockInput, get, select_kernel
from mpbackprop.rules import Exact, FeedbackAlignment, LearnedBackward


def _rules(dtype: torch.dtype) -> list:
    rules = [Exact(), FeedbackAlignment(seed=3), LearnedBackward(init="feedback"),
             LearnedBackward(state_dim=2, features="full")]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for r in rules[2:]:
            for p in r.parameters():  # off the initial point, so the learned parts are not zero
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return [r.to(dtype) for r in rules]


def _compiled(make, shape, dtype=torch.float64):
    torch.manual_seed(0)
    model = make().to(dtype)
    return model, mp.compile(model, shape)


def check_exact(make, shape, batch: int = 5) -> dict[str, float]:
    """verify (exact and FA) in float64 and float32; returns the worst errors."""
    out = {}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        rep = verify(make(), shape, batch=batch, dtype=dtype)
        assert rep.ok, (str(dtype), rep.layers)
        out[str(dtype).replace("torch.", "")] = rep.max_abs_err if dtype == torch.float64 else rep.max_rel_err
        torch.manual_seed(0)
        fa = verify(make(), shape, batch=batch, dtype=dtype, rule="fa")
        assert fa.ok, ("fa", str(dtype), fa.layers)
    return out


def check_paths(make, shape, kind: str, batch: int = 4) -> None:
    """Dense fast path == DGL reference path, for every rule; and the dense path is the one chosen."""
    _, net = _compiled(make, shape)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, net.layers[net.output_layer].size, (batch,), generator=gen)
    for rule in _rules(torch.float64):
        fast, _ = signals(net, x, y, rule, fused=True)
        ref, _ = signals(net, x, y, rule, fused=False)
        assert fast.abs().max() > 0
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12), rule
    assert any(layer.kind == kind for layer in net.layers), f"the model has no {kind} block"
    k = get(kind)
    if k.has_dense():
        layer = next(layer for layer in net.layers if layer.kind == kind)
        view = net.views[layer.index]
        n_src = sum(net.layers[s].size for s in view.sources)
        inp = BlockInput(layer, view, torch.zeros(layer.size, 1, batch, dtype=torch.float64),
                         torch.zeros(layer.size, batch, dtype=torch.float64),
                         torch.zeros(n_src, batch, dtype=torch.float64), batch, False)
        assert select_kernel(k, inp, True) == k.dense and select_kernel(k, inp, False) == k.reference


def check_graph(make, shape, tmp_path, batch: int = 3) -> None:
    """Forward as messages == dense forward; save/load and JSON export keep the signals; budget bound."""
    model, net = _compiled(make, shape)
    x = torch.randn(batch, *shape, dtype=torch.float64)
    torch.testing.assert_close(net.forward_graph(x), net.forward(x), rtol=1e-10, atol=1e-12)
    y = torch.randint(0, net.layers[net.output_layer].size, (batch,))
    want, _ = signals(net, x, y, Exact())
    net.save(tmp_path / "g.bin")
    write_json(net, tmp_path / "g.json")
    for other in (mp.load(tmp_path / "g.bin"), read_json(tmp_path / "g.json")):
        got, _ = signals(other, x, y, Exact())
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    gm = symbolic_trace(model)
    from mpbackprop.compiler.trace import _ShapeRecorder

    with torch.no_grad():
        _ShapeRecorder(gm, str).run(torch.zeros(2, *shape, dtype=torch.float64))
    est = estimate(gm, model)
    g = net.graph
    uses = sum(g.num_edges(e) for e in g.etypes if e.startswith("in_") and not e.endswith("_rev"))
    fixed = sum(g.num_edges(e) for e in g.etypes if e.startswith("fixed_") and not e.endswith("_rev"))
    assert est.uses >= uses and est.fixed_edges >= fixed and est.neurons >= net.num_neurons, (est, uses, fixed)


def check_kind(make, shape, kind: str, tmp_path) -> dict[str, float]:
    """Everything above; returns the verify errors (float64 absolute, float32 relative)."""
    errors = check_exact(make, shape)
    check_paths(make, shape, kind)
    check_graph(make, shape, tmp_path)
    return errors


def seq(*layers: nn.Module):
    """A factory of ``nn.Sequential(*fresh copies)`` (each test builds its own)."""
    import copy

    return lambda: nn.Sequential(*[copy.deepcopy(m) for m in layers])
