"""The JSON and GraphML exports of a compiled network (``mpbackprop compile --format json|graphml``),
and reading every format back (``mpbackprop inspect``, :func:`mpbackprop.load`).

Both exports carry everything needed to rebuild the :class:`~mpbackprop.graph.network.CompiledNetwork`:
the layer metadata (``network`` / graph attribute ``metadata``), the node features and every
edge in edge-id order. JSON holds every canonical edge type; GraphML leaves the reverse types
out (each is its forward type reversed, same edge ids and coefficients) and splits the
neuron feature ``coord`` into ``coord_c``/``coord_h``/``coord_w``. Parameter values keep their
dtype (``dtype`` field / graph attribute). JSON is strict (:mod:`mpbackprop._json`): a
non-finite value is written as ``null`` and read back as NaN.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import atomic_write
from .._json import dumps
from .._quiet import dgl
from ..errors import GraphFileError
from .schema import NEURON, PARAM
from .layers import Layer
from .network import CompiledNetwork

__all__ = ["JSON_FORMAT", "GRAPHML_FORMAT", "FORMATS", "json_document", "networkx_for_export", "write_json",
           "write_graphml", "output_format", "write", "read_json", "read_graphml", "load_any"]

#: Output formats of ``compile`` and their default file extensions.
FORMATS: dict[str, str] = {"dgl": ".bin", "graphml": ".graphml", "json": ".json"}

JSON_FORMAT = "mpbackprop-json"
GRAPHML_FORMAT = "mpbackprop-graphml"
_FLOAT_FEATURES = {"value", "coef", "signal", "delta", "b", "M", "z", "a"}
_REVERSED = ("in_", "out_", "bias_", "fixed_")
_NTYPE_OF = {"n": NEURON, "p": PARAM}


def _dtype_name(net: CompiledNetwork) -> str:
    return str(net.dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------ writing
def json_document(net: CompiledNetwork, model_path: str = "") -> dict[str, Any]:
    """The document ``compile --format json`` writes (structure in the ``compile`` help)."""
    g = net.graph
    nodes = {}
    for ntype in g.ntypes:
        nodes[ntype] = {
            "count": int(g.num_nodes(ntype)),
            "data": {k: v.tolist() for k, v in g.nodes[ntype].data.items()},
        }
    edges = {}
    for (s, e, d) in g.canonical_etypes:
        u, v = g.edges(etype=(s, e, d), order="eid")
        edges[f"{s}:{e}:{d}"] = {
            "src": u.tolist(),
            "dst": v.tolist(),
            "data": {k: t.tolist() for k, t in g.edges[(s, e, d)].data.items()},
        }
    return {
        "format": JSON_FORMAT,
        "version": 1,
        "model": model_path,
        "dtype": _dtype_name(net),
        "summary": net.summary(),
        "network": net.metadata(),
        "nodes": nodes,
        "edges": edges,
    }


def _graphml_value(value: Any) -> Any:
    """A value GraphML can store (bool, int, float, str)."""
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def networkx_for_export(net: CompiledNetwork, model_path: str = "") -> Any:
    """``net.to_networkx()`` with GraphML-safe attributes, neuron coordinates and graph metadata."""
    G = net.to_networkx()
    coord = net.graph.nodes[NEURON].data.get("coord")
    if coord is not None:
        for n, (c, h, w) in enumerate(coord.tolist()):
            attrs = G.nodes[f"n{n}"]
            attrs["coord_c"], attrs["coord_h"], attrs["coord_w"] = c, h, w
    for _, attrs in G.nodes(data=True):
        for k, v in attrs.items():
            attrs[k] = _graphml_value(v)
    for _, _, attrs in G.edges(data=True):
        for k, v in attrs.items():
            attrs[k] = _graphml_value(v)
    G.graph.update({
        "format": GRAPHML_FORMAT,
        "model": model_path,
        "dtype": _dtype_name(net),
        "input_shape": ",".join(str(s) for s in net.input_shape),
        "output_layer": int(net.output_layer),
        "metadata": dumps(net.metadata()),
    })
    return G


def write_json(net: CompiledNetwork, path: str | os.PathLike, model_path: str = "") -> Path:
    """Write :func:`json_document` as strict JSON, atomically."""
    text = dumps(json_document(net, model_path))
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_graphml(net: CompiledNetwork, path: str | os.PathLike, model_path: str = "") -> Path:
    """Write :func:`networkx_for_export` with ``networkx.write_graphml``, atomically."""
    import networkx as nx

    G = networkx_for_export(net, model_path)
    return atomic_write(Path(path), lambda tmp: nx.write_graphml(G, tmp))


# ------------------------------------------------------------------------------------ reading
def output_format(output: Path | None, fmt: str | None, model_path: Path) -> tuple[Path, str]:
    """The file and format a compile writes: ``fmt``, else the one ``output``'s suffix names (``.xml``:
    graphml), else dgl; the file defaults to ``./<model stem><format extension>``."""
    if fmt is None:
        suffix = output.suffix.lower() if output is not None else ""
        fmt = next((name for name, ext in FORMATS.items() if ext == suffix), "dgl")
        if suffix == ".xml":
            fmt = "graphml"
    if output is None:
        output = Path(model_path.stem + FORMATS[fmt])
    return output, fmt


def write(net: CompiledNetwork, path: Path, fmt: str, model_path: str = "") -> Path:
    """Write ``net`` to ``path`` in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "dgl":
        net.save(path)
    elif fmt == "graphml":
        write_graphml(net, path, model_path)
    elif fmt == "json":
        write_json(net, path, model_path)
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return path


def _feature(name: str, values: Any, dtype: torch.dtype) -> Tensor:
    if name in _FLOAT_FEATURES:
        return torch.tensor(_nulls_to_nan(values), dtype=dtype)
    return torch.tensor(values, dtype=torch.int64)


def _nulls_to_nan(values: Any) -> Any:
    if isinstance(values, list):
        return [_nulls_to_nan(v) for v in values]
    return float("nan") if values is None else values


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating-point dtype")
    return dtype


def _network(graph: dgl.DGLGraph, meta: dict[str, Any]) -> CompiledNetwork:
    layers = [Layer.from_json(d) for d in meta["layers"]]
    return CompiledNetwork(graph, layers, tuple(meta["input_shape"]), int(meta["output_layer"]),
                           tuple(meta["output_shape"]) if "output_shape" in meta else None)


def read_json(path: str | os.PathLike) -> CompiledNetwork:
    """Rebuild the network of a ``compile --format json`` export."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise GraphFileError(f"{path}: not valid JSON ({exc}); inspect reads graphs written by "
                             "`mpbackprop compile` (--format dgl, json or graphml)") from exc
    if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
        raise GraphFileError(f"{path}: a JSON file, but not a graph exported by `mpbackprop compile --format json` "
                             f"(no \"format\": \"{JSON_FORMAT}\")")
    try:
        dtype = _dtype(doc.get("dtype", "float64"))
        data = {tuple(key.split(":")): (torch.tensor(e["src"], dtype=torch.int64),
                                        torch.tensor(e["dst"], dtype=torch.int64))
                for key, e in doc["edges"].items()}
        g = dgl.heterograph(data, num_nodes_dict={t: int(n["count"]) for t, n in doc["nodes"].items()})
        for ntype, n in doc["nodes"].items():
            for name, values in n["data"].items():
                g.nodes[ntype].data[name] = _feature(name, values, dtype)
        for key, e in doc["edges"].items():
            for name, values in e.get("data", {}).items():
                g.edges[tuple(key.split(":"))].data[name] = _feature(name, values, dtype)
        return _network(g, doc["network"])
    except Exception as exc:  # noqa: BLE001 - any inconsistency is a damaged file
        raise GraphFileError(f"{path}: an mpbackprop JSON export, but damaged or incomplete "
                             f"({type(exc).__name__}: {exc})") from exc


def read_graphml(path: str | os.PathLike) -> CompiledNetwork:
    """Rebuild the network of a ``compile --format graphml`` export."""
    import networkx as nx

    path = Path(path)
    try:
        G = nx.read_graphml(path, force_multigraph=True)
    except Exception as exc:  # noqa: BLE001 - ElementTree / networkx parse errors
        raise GraphFileError(f"{path}: not a GraphML file ({type(exc).__name__}); inspect reads graphs written by "
                             "`mpbackprop compile` (--format dgl, json or graphml)") from exc
    if G.graph.get("format") != GRAPHML_FORMAT:
        raise GraphFileError(f"{path}: a GraphML file, but not a graph exported by `mpbackprop compile --format "
                             f"graphml` (no graph attribute format={GRAPHML_FORMAT})")
    try:
        dtype = _dtype(G.graph.get("dtype", "float64"))
        meta = json.loads(G.graph["metadata"])
        counts = {NEURON: 0, PARAM: 0}
        feats: dict[str, dict[str, dict[int, Any]]] = {NEURON: defaultdict(dict), PARAM: defaultdict(dict)}
        for node, attrs in G.nodes(data=True):
            ntype, idx = _NTYPE_OF[node[0]], int(node[1:])
            counts[ntype] += 1
            for k, v in attrs.items():
                if k != "ntype":
                    feats[ntype][k][idx] = v
        edges: dict[tuple[str, str, str], list[tuple[int, int, int, float | None]]] = defaultdict(list)
        for u, v, attrs in G.edges(data=True):
            key = (_NTYPE_OF[u[0]], str(attrs["etype"]), _NTYPE_OF[v[0]])
            edges[key].append((int(attrs["eid"]), int(u[1:]), int(v[1:]), attrs.get("coef")))
        data, coefs = {}, {}
        for (s, e, d), rows in edges.items():
            rows.sort()
            src = torch.tensor([r[1] for r in rows], dtype=torch.int64)
            dst = torch.tensor([r[2] for r in rows], dtype=torch.int64)
            data[(s, e, d)] = (src, dst)
            if e.startswith(_REVERSED):
                data[(d, f"{e}_rev", s)] = (dst, src)
            if rows and rows[0][3] is not None:
                c = torch.tensor([r[3] for r in rows], dtype=dtype)
                coefs[(s, e, d)] = c
                coefs[(d, f"{e}_rev", s)] = c
        if not data:
            empty = torch.zeros(0, dtype=torch.int64)
            data[(NEURON, "none", PARAM)] = (empty, empty)
        g = dgl.heterograph(data, num_nodes_dict=counts)
        for etype, c in coefs.items():
            g.edges[etype].data["coef"] = c
        for ntype, table in feats.items():
            for name, column in table.items():
                if name.startswith("coord_"):
                    continue
                g.nodes[ntype].data[name] = _feature(name, [column[i] for i in range(counts[ntype])], dtype)
            if all(f"coord_{a}" in table for a in "chw"):
                g.nodes[ntype].data["coord"] = torch.tensor(
                    [[table[f"coord_{a}"][i] for a in "chw"] for i in range(counts[ntype])], dtype=torch.int64)
        return _network(g, meta)
    except Exception as exc:  # noqa: BLE001 - any inconsistency is a damaged file
        raise GraphFileError(f"{path}: an mpbackprop GraphML export, but damaged or incomplete "
                             f"({type(exc).__name__}: {exc})") from exc


def load_any(path: str | os.PathLike) -> CompiledNetwork:
    """Load a graph in any format ``mpbackprop compile`` writes: DGL (``.bin``), JSON or GraphML.

    The format is read from the file's first bytes, not its name.
    """
    path = Path(path)
    if not path.is_file():
        raise GraphFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head[:1] in (b"{", b"["):
        return read_json(path)
    if head.startswith(b"<"):
        return read_graphml(path)
    return CompiledNetwork.load(path)
