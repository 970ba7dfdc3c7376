"""Heterograph schema tests (mpbackprop.graph docstring, method.md §1).

Over the model table of ``test_compiler.py``: the relation set, aligned use edges, use counts
against an autograd oracle, reconstruction of every weighted layer's pre-activations from its
uses alone, fan-in/fan-out features, save/load, and loading the JSON and GraphML exports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import mpbackprop
from mpbackprop._json import loads_strict
from mpbackprop._quiet import dgl
from mpbackprop.errors import GraphFileError
from mpbackprop.graph import write_graphml, write_json
from test_compiler import CASE_IDS, CASES, DT, Case, build, close

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


def _edges(g, etype):
    return g.edges(etype=etype, order="eid")


def _has(g, rel: str) -> bool:
    return rel in g.etypes


# ------------------------------------------------------------------------------ relation set
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_relations_are_exactly_those_of_the_schema(case: Case) -> None:
    _, net, _ = build(case)
    g = net.graph
    assert sorted(g.ntypes) == ["neuron", "param"]
    expected: set[tuple[str, str, str]] = set()
    for l in net.layers[1:]:
        L = l.index
        if l.weighted:
            expected |= {("neuron", f"in_{L}", "param"), ("param", f"out_{L}", "neuron"),
                         ("param", f"in_{L}_rev", "neuron"), ("neuron", f"out_{L}_rev", "param")}
            if l.bias is not None:
                expected |= {("param", f"bias_{L}", "neuron"), ("neuron", f"bias_{L}_rev", "param")}
        else:
            expected |= {("neuron", f"fixed_{L}", "neuron"), ("neuron", f"fixed_{L}_rev", "neuron")}
    assert set(g.canonical_etypes) == expected


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_static_feature_names_and_dtypes(case: Case) -> None:
    _, net, _ = build(case)
    g = net.graph
    nd, pd = g.nodes["neuron"].data, g.nodes["param"].data
    assert set(nd) == {"layer", "pos", "coord", "act", "kind", "fan_in", "fan_out"}
    assert set(pd) == {"value", "layer", "role", "index", "tensor", "uses", "fan_in", "fan_out", "frozen"}
    assert not pd["frozen"].any()  # every parameter of the table's models requires grad
    for k, v in nd.items():
        assert v.dtype == torch.int64 and v.shape[0] == net.num_neurons, k
    for k, v in pd.items():
        assert v.dtype == (DT if k == "value" else torch.int64) and v.shape[0] == net.num_params, k
    assert nd["coord"].shape == (net.num_neurons, 3)
    assert pd["value"].dtype == DT and pd["value"].shape == (net.num_params,)
    for (s, e, d) in g.canonical_etypes:
        if e.startswith("fixed_"):
            assert set(g.edges[(s, e, d)].data) == {"coef"}
            assert g.edges[(s, e, d)].data["coef"].dtype == DT
        else:
            assert set(g.edges[(s, e, d)].data) == set()


# -------------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_use_edges_are_aligned_across_the_four_relations(case: Case) -> None:
    _, net, _ = build(case)
    g = net.graph
    for l in net.layers[1:]:
        L = l.index
        if l.weighted:
            i, p = _edges(g, f"in_{L}")
            p2, j = _edges(g, f"out_{L}")
            p3, i3 = _edges(g, f"in_{L}_rev")
            j4, p4 = _edges(g, f"out_{L}_rev")
            assert torch.equal(p, p2) and torch.equal(p, p3) and torch.equal(p, p4)
            assert torch.equal(i, i3) and torch.equal(j, j4)
            # uses stay inside the layer: sources in its input blocks, targets its own, weights its own
            srcs = torch.cat([torch.arange(net.layers[b].offset, net.layers[b].stop) for b in l.inputs])
            assert torch.isin(i, srcs).all()
            assert ((j >= l.offset) & (j < l.stop)).all()
            assert ((p >= l.weight.offset) & (p < l.weight.stop)).all()
            # a use appears once
            triples = torch.stack([i, p, j], 1)
            assert torch.unique(triples, dim=0).shape[0] == triples.shape[0]
            if l.bias is not None:
                pb, jb = _edges(g, f"bias_{L}")
                jb2, pb2 = _edges(g, f"bias_{L}_rev")
                assert torch.equal(pb, pb2) and torch.equal(jb, jb2)
                assert torch.equal(torch.sort(jb).values, torch.arange(l.offset, l.stop))  # one bias per neuron
                assert ((pb >= l.bias.offset) & (pb < l.bias.stop)).all()
        else:
            i, j = _edges(g, f"fixed_{L}")
            j2, i2 = _edges(g, f"fixed_{L}_rev")
            assert torch.equal(i, i2) and torch.equal(j, j2)
            assert torch.equal(g.edges[f"fixed_{L}"].data["coef"], g.edges[f"fixed_{L}_rev"].data["coef"])
            assert ((j >= l.offset) & (j < l.stop)).all()


def _use_count_oracle(mod: nn.Module, in_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Uses of each weight/bias by autograd: d/dw Σ_j z_j(ones) counts the taps not in padding."""
    m = mod.to(DT)
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True) if m.bias is not None else None
    ones = torch.ones(1, *in_shape, dtype=DT)
    if isinstance(m, nn.Conv2d):
        z = torch.nn.functional.conv2d(ones, w, b, m.stride, m.padding, m.dilation)
    else:
        z = torch.nn.functional.linear(ones, w, b)
    grads = torch.autograd.grad(z.sum(), [w] + ([b] if b is not None else []))
    return grads[0], (grads[1] if b is not None else None)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_weight_use_counts_match_autograd_oracle(case: Case) -> None:
    model, net, _ = build(case)
    g = net.graph
    uses = g.nodes["param"].data["uses"]
    for l in net.layers[1:]:
        if not l.weighted:
            continue
        mod = model.get_submodule(l.name)
        in_shape = l.input_shapes[0]
        gw, gb = _use_count_oracle(mod, in_shape)
        _, p = _edges(g, f"in_{l.index}")
        counted = torch.bincount(p - l.weight.offset, minlength=l.weight.numel)
        assert torch.equal(counted, gw.reshape(-1).long()), l.name
        assert torch.equal(uses[l.weight.offset:l.weight.stop], counted)
        if isinstance(mod, nn.Linear):  # one use per leading position
            assert (counted == math.prod(in_shape[:-1])).all()
        assert g.num_edges(f"in_{l.index}") == int(gw.sum())
        if l.bias is not None:
            pb, _ = _edges(g, f"bias_{l.index}")
            bcount = torch.bincount(pb - l.bias.offset, minlength=l.bias.numel)
            assert torch.equal(bcount, gb.reshape(-1).long())
            assert torch.equal(uses[l.bias.offset:l.bias.stop], bcount)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pre_activations_rebuilt_from_uses_equal_the_module(case: Case) -> None:
    """z_j = Σ_{uses (i,p,j)} w_p·a_i + Σ_{bias p→j} w_p over the graph's own edges equals the module op."""
    model, net, _ = build(case)
    torch.manual_seed(3)
    g = net.graph
    w_all = g.nodes["param"].data["value"]
    for l in net.layers[1:]:
        if not l.weighted:
            continue
        mod = model.get_submodule(l.name)
        src = net.layers[l.inputs[0]]
        a_in = torch.randn(1, *l.input_shapes[0], dtype=DT)
        a = torch.zeros(net.num_neurons, dtype=DT)
        a[src.offset:src.stop] = a_in.reshape(-1)
        i, p = _edges(g, f"in_{l.index}")
        _, j = _edges(g, f"out_{l.index}")
        z = torch.zeros(net.num_neurons, dtype=DT).index_add_(0, j, w_all[p] * a[i])
        if l.bias is not None:
            pb, jb = _edges(g, f"bias_{l.index}")
            z.index_add_(0, jb, w_all[pb])
        with torch.no_grad():
            ref = mod(a_in).reshape(-1)
        close(z[l.offset:l.stop], ref)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fixed_edges_rebuild_the_fixed_blocks(case: Case) -> None:
    """Σ_{fixed i→j} c·a_i over the graph's edges equals the block's value in a recorded forward pass."""
    _, net, x = build(case)
    rec = net.forward(x, record=True)
    g = net.graph
    a_all = torch.cat(rec.a, 1)  # (B, N)
    for l in net.layers[1:]:
        if l.weighted:
            continue
        i, j = _edges(g, f"fixed_{l.index}")
        c = g.edges[f"fixed_{l.index}"].data["coef"]
        z = torch.zeros(x.shape[0], net.num_neurons, dtype=DT).index_add_(1, j, c * a_all[:, i])
        close(z[:, l.offset:l.stop], rec.z[l.index])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fan_features_equal_degrees(case: Case) -> None:
    model, net, _ = build(case)
    g = net.graph
    n = net.num_neurons
    fan_in = torch.zeros(n, dtype=torch.int64)
    fan_out = torch.zeros(n, dtype=torch.int64)
    for (s, e, d) in g.canonical_etypes:
        if e.endswith("_rev") or e.startswith("bias_"):
            continue
        if d == "neuron":  # out_L (uses into j) and fixed_L
            fan_in += g.in_degrees(etype=(s, e, d))
        if s == "neuron":  # in_L (uses from i) and fixed_L
            fan_out += g.out_degrees(etype=(s, e, d))
    nd = g.nodes["neuron"].data
    assert torch.equal(nd["fan_in"], fan_in)
    assert torch.equal(nd["fan_out"], fan_out)
    assert (fan_in[: net.layers[0].size] == 0).all()  # input neurons receive nothing
    assert net.output_layer == len(net.layers) - 1  # in this table the output is the last block
    assert (fan_out[net.layers[-1].offset:] == 0).all()  # and nothing reads it
    # param fans are those torch.nn.init computes for the owning layer's weight tensor
    pd = g.nodes["param"].data
    for l in net.layers[1:]:
        if not l.weighted:
            continue
        fi, fo = torch.nn.init._calculate_fan_in_and_fan_out(model.get_submodule(l.name).weight)
        for t in l.params:
            assert (pd["fan_in"][t.offset:t.stop] == fi).all()
            assert (pd["fan_out"][t.offset:t.stop] == fo).all()


# ---------------------------------------------------------------------------------- save/load
def _assert_same_network(a: mpbackprop.CompiledNetwork, b: mpbackprop.CompiledNetwork) -> None:
    ga, gb = a.graph, b.graph
    assert ga.canonical_etypes == gb.canonical_etypes
    for nt in ga.ntypes:
        assert ga.num_nodes(nt) == gb.num_nodes(nt)
        assert set(ga.nodes[nt].data) == set(gb.nodes[nt].data)
        for k, v in ga.nodes[nt].data.items():
            assert v.dtype == gb.nodes[nt].data[k].dtype and torch.equal(v, gb.nodes[nt].data[k]), (nt, k)
    for et in ga.canonical_etypes:
        for x, y in zip(_edges(ga, et), _edges(gb, et)):
            assert torch.equal(x, y), et
        assert set(ga.edges[et].data) == set(gb.edges[et].data)
        for k, v in ga.edges[et].data.items():
            assert torch.equal(v, gb.edges[et].data[k]), (et, k)
    assert a.layers == b.layers
    assert a.input_shape == b.input_shape and a.output_layer == b.output_layer
    assert a.metadata() == b.metadata()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_save_load_round_trip(case: Case, tmp_path) -> None:
    model, net, x = build(case)
    path = net.save(tmp_path / "sub" / "net.bin")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["net.bin"]  # no temporary left behind
    loaded = mpbackprop.load(path)
    _assert_same_network(net, loaded)
    with torch.no_grad():
        ref = model(x)
        close(loaded.forward(x), ref)
        close(loaded.forward_graph(x), ref)
    # saving again over the same file is fine
    loaded.save(path)
    _assert_same_network(net, mpbackprop.load(path))


#: one case per kind of block and edge (the exports are generic over the schema; kept short for time)
EXPORT_CASES = [c for c in CASES if c.id in {"mlp-no-bias", "conv-stride-pad", "pool-no-count-pad", "residual-mlp",
                                              "difference", "scaling", "act-on-shared", "linear-3d", "output-view"}]


@pytest.mark.parametrize("fmt", ["json", "graphml"])
@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c.id for c in EXPORT_CASES])
def test_exports_load_back_as_the_same_network(case: Case, fmt: str, tmp_path) -> None:
    """``compile --format json|graphml`` files rebuild the network exactly (``mpbackprop.load``)."""
    model, net, x = build(case)
    path = tmp_path / f"net.{fmt}"
    (write_json if fmt == "json" else write_graphml)(net, path, "model.py")
    if fmt == "json":
        loads_strict(path.read_text())
    loaded = mpbackprop.load(path)
    _assert_same_network(net, loaded)
    with torch.no_grad():
        close(loaded.forward_graph(x), model(x))


def test_json_export_is_strict_and_keeps_non_finite_values(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[1, 2] = float("nan")
    net = mpbackprop.compile(model, (3,))
    path = write_json(net, tmp_path / "nan.json")
    doc = loads_strict(path.read_text())
    assert doc["dtype"] == "float32" and doc["nodes"]["param"]["data"]["value"].count(None) == 1
    for loaded in (mpbackprop.load(path), mpbackprop.load(write_graphml(net, tmp_path / "nan.graphml"))):
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded.values.isnan(), net.values.isnan())
        assert torch.equal(loaded.values.nan_to_num(), net.values.nan_to_num())


def test_foreign_or_damaged_exports_are_refused(tmp_path) -> None:
    torch.manual_seed(0)
    net = mpbackprop.compile(nn.Sequential(nn.Linear(3, 2)), (3,))
    text = write_json(net, tmp_path / "ok.json").read_text()
    cases = {
        "foreign.json": ('{"nodes": []}', "not a graph exported by `mpbackprop compile --format json`"),
        "list.json": ("[1, 2]", "not a graph exported"),
        "broken.json": (text[: len(text) // 2], "not valid JSON"),
        "damaged.json": (text.replace('"layers"', '"layerz"'), "damaged or incomplete"),
        "foreign.graphml": ('<?xml version="1.0"?><graphml xmlns="http://graphml.graphdrawing.org/xmlns">'
                            '<graph edgedefault="directed"/></graphml>', "not a graph exported"),
        "broken.graphml": ("<graphml><graph", "not a GraphML file"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(GraphFileError, match=match):
            mpbackprop.load(tmp_path / name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    net = mpbackprop.compile(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)).double(),
                             (1, 8, 8))
    path = net.save(tmp_path_factory.mktemp("saved") / "net.bin")
    return path.read_bytes()


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(GraphFileError, match="no such file"):
        mpbackprop.load(tmp_path / "absent.bin")
    with pytest.raises(GraphFileError):
        mpbackprop.load(tmp_path)  # a directory


def test_load_truncated_file(saved: bytes, tmp_path) -> None:
    """Every cut is refused with GraphFileError, never a crash (DGL's reader segfaults on some)."""
    path = tmp_path / "cut.bin"
    cuts = sorted({int(len(saved) * k / 64) for k in range(64)} | {len(saved) - 1, len(saved) - 40})
    for n in cuts:
        path.write_bytes(saved[:n])
        with pytest.raises(GraphFileError):
            mpbackprop.load(path)


def test_load_damaged_bytes(saved: bytes, tmp_path) -> None:
    path = tmp_path / "flip.bin"
    for pos in (100, len(saved) // 3, len(saved) // 2, saved.index(b'{"format"') + 3, len(saved) - 5):
        data = bytearray(saved)
        data[pos] ^= 0x5A
        path.write_bytes(bytes(data))
        with pytest.raises(GraphFileError, match="damaged"):
            mpbackprop.load(path)


def test_load_random_bytes(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (1, 100, 5000):
        path = tmp_path / f"rand{n}.bin"
        path.write_bytes(bytes(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).tolist()))
        with pytest.raises(GraphFileError):
            mpbackprop.load(path)


def test_load_dgl_file_without_mpbackprop_metadata(tmp_path) -> None:
    g = dgl.heterograph({("neuron", "in_1", "param"): (torch.tensor([0, 1]), torch.tensor([0, 0]))})
    path = tmp_path / "plain.bin"
    dgl.save_graphs(str(path), [g])
    with pytest.raises(GraphFileError, match="not one written by mpbackprop"):
        mpbackprop.load(path)
    dgl.save_graphs(str(path), [g], {"other": torch.zeros(3)})
    with pytest.raises(GraphFileError, match="not one written by mpbackprop"):
        mpbackprop.load(path)
    _seal(path)  # even with an intact footer, a file without the metadata label is refused
    with pytest.raises(GraphFileError, match="no metadata"):
        mpbackprop.load(path)


def _seal(path) -> None:
    """Append the checksum footer ``save`` writes, so a hand-made file reaches the metadata checks."""
    from mpbackprop.graph import network

    data = path.read_bytes()
    path.write_bytes(data + network._FOOTER_MAGIC + hashlib.sha256(data).digest())


def _save_with_metadata(path, graph, raw: bytes) -> None:
    dgl.save_graphs(str(path), [graph], {"__mpbackprop__": torch.frombuffer(bytearray(raw), dtype=torch.uint8)})
    _seal(path)


def test_load_unreadable_metadata_foreign_format_and_newer_version(saved: bytes, tmp_path) -> None:
    net = mpbackprop.load(_write(tmp_path / "ok.bin", saved))
    path = tmp_path / "meta.bin"
    cases = [
        (b"\xff\xfe not json", "metadata"),
        (json.dumps({"format": "mpbackprop-graph"}).encode(), "metadata"),  # no layers
        (json.dumps(dict(net.metadata(), format="something-else")).encode(), "metadata"),
        (json.dumps(dict(net.metadata(), version=99)).encode(), "newer"),
    ]
    for raw, match in cases:
        _save_with_metadata(path, net.graph, raw)
        with pytest.raises(GraphFileError, match=match):
            mpbackprop.load(path)
    _save_with_metadata(path, net.graph, json.dumps(net.metadata()).encode())  # the control: it loads
    _assert_same_network(net, mpbackprop.load(path))


def test_saved_file_is_still_a_plain_dgl_file(saved: bytes, tmp_path) -> None:
    net = mpbackprop.load(_write(tmp_path / "n.bin", saved))
    graphs, labels = dgl.load_graphs(str(tmp_path / "n.bin"))
    assert len(graphs) == 1 and "__mpbackprop__" in labels
    assert graphs[0].canonical_etypes == net.graph.canonical_etypes
    meta = json.loads(bytes(labels["__mpbackprop__"].tolist()).decode())
    assert meta == net.metadata()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_views_cache_survives_round_trip(saved: bytes, tmp_path) -> None:
    """A loaded network rebuilds its per-layer views lazily and runs both forward paths alike."""
    net = mpbackprop.load(_write(tmp_path / "n.bin", saved))
    x = torch.randn(4, 1, 8, 8, dtype=DT)
    close(net.forward_graph(x), net.forward(x))
    assert len(net.views) == len(net.layers) and net.views[0] is None
    assert os.path.getsize(tmp_path / "n.bin") == len(saved)
