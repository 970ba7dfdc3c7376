"""Per-layer message-flow views of the heterograph.

Propagation runs layer by layer, and only the edges of one layer take part in a step
of it. Running ``update_all`` on the whole ``neuron`` type would write (zeros) on every
neuron of the network per layer; instead each layer gets small bipartite DGL *blocks*
(``dgl.create_block``) whose source nodes are the neurons of its input blocks and whose
destination nodes are its own neurons. They are built once from the heterograph's
``in_L``/``out_L``/``bias_L``/``fixed_L`` relations (edge ids preserved, so edge ``k``
is still use ``k``) and cached on the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._quiet import dgl
from .schema import NEURON
from .layers import Layer

__all__ = ["LayerView", "build_views"]


@dataclass
class LayerView:
    """The DGL blocks and index tensors of one layer (block-local numbering).

    Attributes
    ----------
    sources : list of int
        Distinct input blocks; source-local neuron ids run over their concatenation.
    fwd : DGLBlock
        Use/fixed edges pre→post (``num_src = Σ sizes of sources``, ``num_dst = layer.size``).
    bwd : DGLBlock
        The same edges post→pre, same edge ids: backward messages travel here.
    param : Tensor or None
        ``(E,)`` weight-local index of each use (weighted layers).
    to_param : DGLBlock or None
        Edge ``k`` ends at the weight of use ``k``: ``copy_e_sum`` sums over uses.
    coef : Tensor or None
        ``(E,)`` fixed coefficients (fixed layers).
    bias_fwd, bias_bwd : DGLBlock or None
        bias→post and post→bias edges.
    """

    layer: Layer
    sources: list[int]
    fwd: dgl.DGLGraph
    bwd: dgl.DGLGraph
    param: Tensor | None = None
    to_param: dgl.DGLGraph | None = None
    coef: Tensor | None = None
    bias_fwd: dgl.DGLGraph | None = None
    bias_bwd: dgl.DGLGraph | None = None

    @property
    def num_edges(self) -> int:
        return int(self.fwd.num_edges())


def _block(src: Tensor, dst: Tensor, n_src: int, n_dst: int) -> dgl.DGLGraph:
    return dgl.create_block((src, dst), num_src_nodes=n_src, num_dst_nodes=n_dst)


def build_views(g: dgl.DGLGraph, layers: list[Layer]) -> list[LayerView | None]:
    """One :class:`LayerView` per block (``None`` for the input block)."""
    num_neurons = g.num_nodes(NEURON)
    views: list[LayerView | None] = [None]
    for layer in layers[1:]:
        L = layer.index
        sources = list(dict.fromkeys(layer.inputs))
        local = torch.full((num_neurons,), -1, dtype=torch.int64)
        base = 0
        for b in sources:
            src_layer = layers[b]
            local[src_layer.offset:src_layer.stop] = torch.arange(base, base + src_layer.size)
            base += src_layer.size
        n_src, n_dst = base, layer.size
        if layer.weighted:
            assert layer.weight is not None
            i, p = g.edges(etype=f"in_{L}", order="eid")
            p2, j = g.edges(etype=f"out_{L}", order="eid")
            assert torch.equal(p, p2), f"in_{L} and out_{L} are not aligned"
            src, dst, par = local[i], j - layer.offset, p - layer.weight.offset
            view = LayerView(
                layer, sources, _block(src, dst, n_src, n_dst), _block(dst, src, n_dst, n_src),
                param=par, to_param=_block(src, par, n_src, layer.weight.numel),
            )
            if layer.bias is not None:
                pb, jb = g.edges(etype=f"bias_{L}", order="eid")
                pb, jb = pb - layer.bias.offset, jb - layer.offset
                view.bias_fwd = _block(pb, jb, layer.bias.numel, n_dst)
                view.bias_bwd = _block(jb, pb, n_dst, layer.bias.numel)
        else:
            i, j = g.edges(etype=f"fixed_{L}", order="eid")
            src, dst = local[i], j - layer.offset
            coef = g.edges[f"fixed_{L}"].data["coef"]
            view = LayerView(layer, sources, _block(src, dst, n_src, n_dst), _block(dst, src, n_dst, n_src),
                             coef=coef)
        views.append(view)
    return views
