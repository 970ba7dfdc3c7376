"""``CompiledNetwork``: a DGL heterograph plus the layer metadata to run it.

This is what :func:`mpbackprop.compile` returns. Users inspect ``net.graph`` with plain
DGL; the network can run its forward pass either with dense torch ops per layer
(:meth:`CompiledNetwork.forward`, fast) or as message passing on the graph
(:meth:`CompiledNetwork.forward_graph`, the reference), write parameter values back into
a module, and save/load itself as one file.

Parameters live in one flat vector ``theta`` in param-node order (``g.nodes['param']
.data['value']`` holds the compiled values); every method takes an optional ``theta`` so
that the engine and meta-training can run the network functionally.
"""

from __future__ import annotations

import hashlib
import json
import os
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .._io import atomic_write
from .._json import dumps
from .._quiet import dgl
from ..compiler.trace import check_input_shape, trace_module
from ..errors import GraphFileError, ShapeError
from .schema import NEURON, PARAM, build_heterograph, frozen_feature, tensor_table
from ..kinds import ForwardContext
from ..kinds import get as _kind
from .layers import Layer, ParamTensor
from ..compiler.selfcheck import check_forward
from .views import LayerView, build_views

__all__ = ["CompiledNetwork", "ForwardRecord", "compile", "load"]

_FORMAT = "mpbackprop-graph"
_FORMAT_VERSION = 1
# A footer after DGL's bytes: magic + SHA-256 of everything before it. DGL's reader can crash the
# process (segfault) on a truncated or damaged file, so load() only hands DGL verified bytes.
# DGL itself ignores the trailing footer, so plain ``dgl.load_graphs`` still reads the file.
_FOOTER_MAGIC = b"MPBPSHA2"
_FOOTER_SIZE = len(_FOOTER_MAGIC) + 32
_DGL_MAGIC = (0xDD2E4FF046B4A13F).to_bytes(8, "little")


def _file_digest(path: Path, size: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.digest()


def _check_footer(path: Path) -> None:
    """Raise GraphFileError unless ``path`` ends in a footer whose checksum matches its bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if size >= _FOOTER_SIZE:
            f.seek(size - _FOOTER_SIZE)
            footer = f.read(_FOOTER_SIZE)
        else:
            footer = b""
    if not footer.startswith(_FOOTER_MAGIC):
        if head == _DGL_MAGIC:
            raise GraphFileError(f"{path}: a DGL file, but not one written by mpbackprop, or truncated (no checksum)")
        raise GraphFileError(f"{path}: not a graph file written by mpbackprop")
    if _file_digest(path, size - _FOOTER_SIZE) != footer[len(_FOOTER_MAGIC):]:
        raise GraphFileError(f"{path}: graph file is damaged (checksum mismatch)")


@dataclass
class ForwardRecord:
    """Per-block values of one forward pass, each ``(B, size)`` (block 0: input, ``z is None``), and
    what blocks recorded for their backward (``aux[block]``: dropout masks)."""

    z: list[Tensor | None]
    a: list[Tensor]
    output: Tensor
    aux: dict[int, Tensor] = field(default_factory=dict)


class CompiledNetwork:
    """A target network compiled into a DGL heterograph.

    Parameters
    ----------
    graph : DGLGraph
        The heterograph (node types ``neuron`` and ``param``; schema in :mod:`mpbackprop.graph.schema`).
    layers : list of Layer
        Block metadata, block 0 being the input.
    input_shape : tuple of int
        Per-sample input shape.
    output_layer : int
        Index of the block whose values are the network output.
    output_shape : tuple of int, optional
        Per-sample shape the module returns: the output block seen through the module's final
        view/flatten (same number of elements). Defaults to the block's own shape.
    """

    def __init__(self, graph: dgl.DGLGraph, layers: list[Layer], input_shape: tuple[int, ...],
                 output_layer: int, output_shape: tuple[int, ...] | None = None) -> None:
        self.graph = graph
        self.layers = layers
        self.input_shape = tuple(input_shape)
        self.output_layer = output_layer
        self._output_shape = tuple(output_shape) if output_shape is not None else None
        self._views: list[LayerView | None] | None = None
        self._frozen_mask: Tensor | None = None

    # ------------------------------------------------------------------ basics
    @property
    def num_neurons(self) -> int:
        return int(self.graph.num_nodes(NEURON))

    @property
    def num_params(self) -> int:
        return int(self.graph.num_nodes(PARAM))

    @property
    def tensors(self) -> list[ParamTensor]:
        """Parameter tensors in param-node order."""
        return tensor_table(self.layers)

    @property
    def tensor_sizes(self) -> tuple[int, ...]:
        """Number of parameters of each tensor, in param-node order."""
        return tuple(p.numel for p in self.tensors)

    @property
    def tensor_fan_in(self) -> tuple[int, ...]:
        """Fan-in of each tensor's weights (``prod(shape[1:])``: ``in`` of a Linear weight, ``in·kh·kw`` of a
        convolution's), ``0`` for biases; in param-node order."""
        return tuple(math.prod(p.shape[1:]) if p.role == "weight" and len(p.shape) > 1 else 0 for p in self.tensors)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the network output, as the module returns it."""
        if self._output_shape is not None:
            return self._output_shape
        return self.layers[self.output_layer].shape

    @property
    def values(self) -> Tensor:
        """The parameter values stored on the graph (``g.nodes['param'].data['value']``)."""
        if self.num_params == 0:
            return torch.zeros(0)
        return self.graph.nodes[PARAM].data["value"]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def views(self) -> list[LayerView | None]:
        """Per-layer DGL blocks (built once, cached)."""
        if self._views is None:
            self._views = build_views(self.graph, self.layers)
        return self._views

    @property
    def num_frozen(self) -> int:
        """Number of frozen parameters (of tensors with ``requires_grad=False`` when compiled)."""
        return sum(p.numel for p in self.tensors if p.frozen)

    @property
    def frozen_mask(self) -> Tensor | None:
        """``(P,)`` bool, True on frozen parameters; ``None`` when nothing is frozen (the usual case)."""
        if self._frozen_mask is None and self.num_frozen:
            mask = torch.zeros(self.num_params, dtype=torch.bool)
            for p in self.tensors:
                if p.frozen:
                    mask[p.offset:p.stop] = True
            self._frozen_mask = mask
        return self._frozen_mask

    def set_frozen(self, frozen: dict[str, bool]) -> None:
        """Freeze or unfreeze parameter tensors by path (``{"fc1.weight": True}``); updates the
        ``param`` feature ``frozen`` and :attr:`frozen_mask`."""
        by_path = {p.path: p for p in self.tensors}
        for path, flag in frozen.items():
            if path not in by_path:
                raise KeyError(f"no parameter tensor {path!r} in this network")
            by_path[path].frozen = bool(flag)
        self._frozen_mask = None
        if self.num_params:
            self.graph.nodes[PARAM].data["frozen"] = frozen_feature(self.layers)

    def tensor_view(self, theta: Tensor, p: ParamTensor) -> Tensor:
        """The slice of ``theta`` holding parameter tensor ``p``, in its shape."""
        return theta[p.offset:p.stop].view(p.shape)

    def __repr__(self) -> str:
        return (f"CompiledNetwork(layers={len(self.layers) - 1}, neurons={self.num_neurons}, "
                f"params={self.num_params}, input_shape={self.input_shape})")

    def _check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"input of shape {tuple(x.shape)} does not fit: expected (batch, {', '.join(map(str, self.input_shape))})"
            )

    # ----------------------------------------------------------------- forward
    def _apply(self, layer: Layer, inputs: list[Tensor], theta: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        w = self.tensor_view(theta, layer.weight) if layer.weight is not None else None
        b = self.tensor_view(theta, layer.bias) if layer.bias is not None else None
        return _kind(layer.kind).forward(layer, inputs, w, b, ctx if ctx is not None else ForwardContext())

    def forward(self, x: Tensor, theta: Tensor | None = None, record: bool = False,
                generator: torch.Generator | None = None) -> Any:
        """Run the network with dense torch ops per layer.

        Parameters
        ----------
        x : Tensor
            ``(B, *input_shape)``.
        theta : Tensor, optional
            Flat parameters ``(num_params,)``; defaults to the graph's ``value``.
        record : bool
            Return a :class:`ForwardRecord` with every block's ``z`` and ``a`` instead of the output.
        generator : torch.Generator, optional
            Draws the random parts of a training-mode forward (dropout masks; recorded in
            ``ForwardRecord.aux`` for the backward pass). ``None``: deterministic, as in evaluation.
        """
        self._check_input(x)
        theta = self.values if theta is None else theta
        batch = x.shape[0]
        zs: list[Tensor | None] = [None]
        acts: list[Tensor] = [x.reshape(batch, -1)]
        ctx = ForwardContext(generator, {})
        for layer in self.layers[1:]:
            ins = [acts[k].reshape(batch, *shape) for k, shape in zip(layer.inputs, layer.input_shapes)]
            z = self._apply(layer, ins, theta, ctx).reshape(batch, -1)
            zs.append(z)
            acts.append(z if layer.activation.is_identity else layer.activation(z))
        out = acts[self.output_layer].reshape(batch, *self.output_shape)
        if record:
            return ForwardRecord(zs, acts, out, ctx.aux or {})
        return out

    __call__ = forward

    def forward_graph(self, x: Tensor, theta: Tensor | None = None) -> Tensor:
        """Run the forward pass as message passing on the graph (DGL ``u_mul_e`` + ``sum``).

        ``z_j = Σ_{uses (i,p,j)} w_p·a_i + Σ_{bias p→j} w_p`` for weighted blocks and
        ``z_j = Σ_{fixed i→j} c·a_i`` for the linear fixed ones; each kind says how
        (:meth:`~mpbackprop.kinds.Kind.forward_graph`); ``a = f(z)``. Equal to :meth:`forward`
        (in evaluation mode) up to summation order.
        """
        self._check_input(x)
        theta = self.values if theta is None else theta
        batch = x.shape[0]
        acts: list[Tensor] = [x.reshape(batch, -1).t()]  # (size, B): node axis first for DGL
        for layer, view in zip(self.layers[1:], self.views[1:]):
            assert view is not None
            a_src = torch.cat([acts[k] for k in view.sources]) if len(view.sources) > 1 else acts[view.sources[0]]
            z = _kind(layer.kind).forward_graph(layer, view, a_src, theta)
            acts.append(z if layer.activation.is_identity else layer.activation(z))
        return acts[self.output_layer].t().reshape(batch, *self.output_shape)

    # --------------------------------------------------------- module exchange
    def write_to(self, module: nn.Module, theta: Tensor | None = None) -> None:
        """Copy parameter values (``theta`` or the graph's) into ``module`` in place."""
        theta = self.values if theta is None else theta
        with torch.no_grad():
            for p in self.tensors:
                target = module.get_parameter(p.path)
                target.copy_(self.tensor_view(theta.detach(), p).to(target.dtype))

    def values_of(self, module: nn.Module) -> Tensor:
        """Flat parameter vector of ``module`` in param-node order (the graph is not changed)."""
        parts = [module.get_parameter(p.path).detach().reshape(-1) for p in self.tensors]
        return torch.cat(parts).clone() if parts else torch.zeros(0)

    def read_from(self, module: nn.Module) -> Tensor:
        """Flat parameter vector read from ``module``; also stored as the graph's ``value``."""
        theta = self.values_of(module)
        if self.num_params:
            self.graph.nodes[PARAM].data["value"] = theta.clone()
        return theta

    # ---------------------------------------------------------------- save/load
    def metadata(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "input_shape": list(self.input_shape),
            "output_layer": self.output_layer,
            "output_shape": list(self.output_shape),
            "layers": [layer.to_json() for layer in self.layers],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write graph and metadata to one file (``dgl.save_graphs``; metadata as a JSON label).

        A SHA-256 footer follows DGL's bytes, so :meth:`load` refuses a truncated or damaged
        file before DGL parses it. The write is atomic: a crash leaves either the old file or
        the new one.
        """
        path = Path(path)
        meta = dumps(self.metadata()).encode()
        labels = {"__mpbackprop__": torch.frombuffer(bytearray(meta), dtype=torch.uint8)}

        def write(tmp: str) -> None:
            dgl.save_graphs(tmp, [self.graph], labels)
            digest = _file_digest(Path(tmp), os.path.getsize(tmp))
            with open(tmp, "ab") as f:
                f.write(_FOOTER_MAGIC + digest)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompiledNetwork":
        """Load a file written by :meth:`save`; a missing, corrupt or foreign file raises GraphFileError."""
        path = Path(path)
        if not path.is_file():
            raise GraphFileError(f"{path}: no such file")
        _check_footer(path)
        try:
            graphs, labels = dgl.load_graphs(str(path))
        except Exception as exc:  # noqa: BLE001 - DGL raises assorted errors on bad files
            raise GraphFileError(f"{path}: not a graph file written by mpbackprop ({type(exc).__name__})") from exc
        raw = labels.get("__mpbackprop__")
        if raw is None or len(graphs) != 1:
            raise GraphFileError(f"{path}: a DGL file, but not one written by mpbackprop (no metadata)")
        try:
            meta = json.loads(bytes(raw.tolist()).decode())
            if meta.get("format") != _FORMAT:
                raise ValueError("format")
            layers = [Layer.from_json(d) for d in meta["layers"]]
        except Exception as exc:  # noqa: BLE001
            raise GraphFileError(f"{path}: its mpbackprop metadata is unreadable ({exc})") from exc
        if meta.get("version", 0) > _FORMAT_VERSION:
            raise GraphFileError(f"{path}: written by a newer mpbackprop (format {meta['version']}); upgrade")
        return cls(graphs[0], layers, tuple(meta["input_shape"]), int(meta["output_layer"]),
                   tuple(meta["output_shape"]) if "output_shape" in meta else None)

    # ------------------------------------------------------------------ export
    def to_networkx(self):  # -> networkx.MultiDiGraph
        """A ``networkx.MultiDiGraph`` with nodes ``('neuron', id)``/``('param', id)`` and their features."""
        import networkx as nx

        G = nx.MultiDiGraph()
        g = self.graph
        for ntype in (NEURON, PARAM):
            feats = {k: v for k, v in g.nodes[ntype].data.items() if v.dim() == 1}
            cols = {k: v.tolist() for k, v in feats.items()}
            for n in range(g.num_nodes(ntype)):
                attrs = {k: col[n] for k, col in cols.items()}
                attrs["ntype"] = ntype
                G.add_node(f"{ntype[0]}{n}", **attrs)
        for (st, et, dt) in g.canonical_etypes:
            if et.endswith("_rev") or g.num_edges((st, et, dt)) == 0:
                continue
            u, v = g.edges(etype=(st, et, dt), order="eid")
            coef = g.edges[(st, et, dt)].data.get("coef")
            for k, (a, b) in enumerate(zip(u.tolist(), v.tolist())):
                attrs = {"etype": et, "eid": k}
                if coef is not None:
                    attrs["coef"] = float(coef[k])
                G.add_edge(f"{st[0]}{a}", f"{dt[0]}{b}", **attrs)
        return G

    def summary(self) -> dict[str, Any]:
        """Node/edge counts and a layer table (what ``mpbackprop inspect --json`` prints)."""
        g = self.graph
        layers = []
        for layer in self.layers:
            layers.append({
                "index": layer.index,
                "name": layer.name,
                "kind": layer.kind,
                "shape": list(layer.shape),
                "neurons": layer.size,
                "params": layer.num_params,
                "frozen": sum(p.numel for p in layer.params if p.frozen),
                "activation": str(layer.activation),
                "inputs": list(layer.inputs),
                "uses": int(g.num_edges(f"in_{layer.index}")) if layer.weighted else 0,
                "fixed_edges": int(g.num_edges(f"fixed_{layer.index}")) if layer.kind != "input"
                and not layer.weighted else 0,
            })
        return {
            "num_nodes": {NEURON: self.num_neurons, PARAM: self.num_params},
            "frozen_params": self.num_frozen,
            "num_edges": {f"{s}:{e}:{d}": int(g.num_edges((s, e, d))) for (s, e, d) in g.canonical_etypes},
            "input_shape": list(self.input_shape),
            "output_layer": self.output_layer,
            "layers": layers,
        }


def compile(model: nn.Module, example_input: Tensor | tuple[int, ...]) -> CompiledNetwork:  # noqa: A001
    """Compile ``model`` into a :class:`CompiledNetwork`.

    Operations whose gradient the graph would not reproduce are refused while tracing
    (:mod:`mpbackprop.compiler.tracecheck`), a graph over the memory limit before it is built
    (:mod:`mpbackprop.compiler.budget`), and the compiled forward pass is checked against the module on a
    seeded random batch in float64 (:mod:`mpbackprop.compiler.selfcheck`; neither the global RNG nor the
    module's parameters are touched). Parameters with ``requires_grad=False`` are compiled as
    frozen (``param`` feature ``frozen``): training never changes them.

    Parameters
    ----------
    model : nn.Module
        Built from supported layers (see :data:`mpbackprop.compiler.SUPPORTED`).
    example_input : Tensor or tuple of int
        An input batch ``(B, *shape)`` or the per-sample shape itself (no batch axis).

    Raises
    ------
    MPBackpropError
        ``UnsupportedOpError``, ``ShapeError`` or ``GraphTooLargeError``, with one line that
        names what is wrong and where.
    """
    if isinstance(example_input, Tensor):
        shape = tuple(example_input.shape[1:])
    else:
        shape = check_input_shape(example_input)
    trace = trace_module(model, shape)
    graph = build_heterograph(trace)
    net = CompiledNetwork(graph, trace.layers, trace.input_shape, trace.output_layer, trace.output_shape)
    check_forward(model, net, trace.graph_module, trace.block_nodes)
    return net


def load(path: str | os.PathLike) -> CompiledNetwork:
    """Load a compiled network saved with :meth:`CompiledNetwork.save` (``compile --format dgl``) or
    exported with ``compile --format json|graphml`` (:mod:`mpbackprop.graph.exports`)."""
    from .exports import load_any  # exports builds on this module

    return load_any(path)

