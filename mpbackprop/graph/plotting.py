"""Draw a small compiled network as a layered picture (``mpbackprop inspect --plot``).

Neurons stand in columns, one column per block (input on the left); a weight use
``z_j += w_p·a_i`` is drawn as a line from neuron ``i`` to neuron ``j`` coloured by the sign
and size of ``w_p`` (a shared convolution weight colours each of its uses alike), and
fixed-coefficient edges (pooling, residual, scaling, identity) are thin grey lines.
``param`` nodes are not drawn one by one: they are the colours. Biases are left out.

Drawing uses networkx on matplotlib's Agg canvas, so it needs no display.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import MPBackpropError
from .schema import NEURON, PARAM
from ..kinds import REGISTRY

__all__ = ["PlotError", "check_plot_size", "plot_network"]

#: Neuron colour per layer kind (each kind's own, :mod:`mpbackprop.kinds`).
_KIND_COLOURS = {name: kind.colour for name, kind in REGISTRY.items()}


class PlotError(MPBackpropError):
    """The network cannot be drawn (too large, or an unknown image format)."""


def check_plot_size(net: Any, max_nodes: int) -> None:
    """Raise :class:`PlotError` when ``net`` has more than ``max_nodes`` neurons."""
    if net.num_neurons > max_nodes:
        raise PlotError(
            f"the network has {net.num_neurons} neurons, more than --max-nodes {max_nodes}: too many to draw "
            "readably (raise --max-nodes to draw it anyway)"
        )


def _positions(net: Any) -> tuple[dict[int, tuple[float, float]], int]:
    """Column = block index; rows top to bottom in neuron order, a gap between channels."""
    slots = []
    for layer in net.layers:
        if len(layer.shape) == 3 and layer.shape[0] > 1:
            c, h, w = layer.shape
            gap = max(1, (h * w) // 4)
            slots.append([k + (k // (h * w)) * gap for k in range(layer.size)])
        else:
            slots.append(list(range(layer.size)))
    tallest = max(s[-1] + 1 for s in slots)
    spacing = 1.0 / max(tallest - 1, 1)
    pos = {}
    for layer, rows in zip(net.layers, slots):
        mid = rows[-1] / 2
        for k, r in enumerate(rows):
            pos[layer.offset + k] = (float(layer.index), (mid - r) * spacing)
    return pos, tallest


def _weighted_edges(net: Any) -> tuple[list[tuple[int, int]], list[float], list[tuple[int, int]]]:
    """Neuron→neuron edges of every use (with its weight) and every fixed edge."""
    g = net.graph
    values = net.values.detach().to(torch.float64)
    uses: list[tuple[int, int]] = []
    weights: list[float] = []
    fixed: list[tuple[int, int]] = []
    for layer in net.layers[1:]:
        L = layer.index
        if layer.weighted:
            i, p = g.edges(etype=(NEURON, f"in_{L}", PARAM), order="eid")
            _, j = g.edges(etype=(PARAM, f"out_{L}", NEURON), order="eid")
            uses += list(zip(i.tolist(), j.tolist()))
            weights += values[p].tolist()
        elif (NEURON, f"fixed_{L}", NEURON) in g.canonical_etypes:
            i, j = g.edges(etype=(NEURON, f"fixed_{L}", NEURON), order="eid")
            fixed += list(zip(i.tolist(), j.tolist()))
    return uses, weights, fixed


def plot_network(net: Any, path: str | Path, max_nodes: int = 400, title: str | None = None,
                 use_values: Any = None, value_label: str | None = None) -> Path:
    """Draw ``net`` (a :class:`~mpbackprop.CompiledNetwork`) into an image file.

    Parameters
    ----------
    net : CompiledNetwork
    path : path
        Image file; the format follows the extension (``.png``, ``.pdf``, ``.svg``, ...).
    max_nodes : int
        Refuse networks with more neurons than this.
    title : str, optional
        Shown before the counts in the title.
    use_values : Tensor, optional
        One non-negative value per weight use (layers in order, edge ids within a layer) to colour
        the uses by instead of the weights, e.g. message magnitudes from ``mpbackprop analyze``.
    value_label : str, optional
        Colour-bar label for ``use_values``.

    Raises
    ------
    PlotError
        Too many neurons, or an image format matplotlib cannot write.
    """
    check_plot_size(net, max_nodes)
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import networkx as nx
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = Path(path)
    fig = Figure()
    canvas = FigureCanvasAgg(fig)
    suffix = path.suffix.lower().lstrip(".")
    supported = canvas.get_supported_filetypes()
    if suffix not in supported:
        raise PlotError(f"{path}: cannot write a '{path.suffix}' image; use one of "
                        f"{', '.join('.' + k for k in sorted(supported))}")

    pos, tallest = _positions(net)
    uses, weights, fixed = _weighted_edges(net)
    G = nx.DiGraph()
    G.add_nodes_from(pos)
    G.add_edges_from(uses)
    G.add_edges_from(fixed)

    n_cols = len(net.layers)
    fig.set_size_inches(min(3.0 + 1.7 * n_cols, 30.0), min(4.5 + 0.04 * tallest, 14.0))
    ax = fig.add_axes((0.03, 0.08, 0.84, 0.8))
    cax = fig.add_axes((0.89, 0.2, 0.015, 0.55))
    node_size = max(6.0, min(90.0, 2400.0 / tallest))

    signed = use_values is None
    if not signed:
        weights = [float(v) for v in torch.as_tensor(use_values).reshape(-1).tolist()]
        if len(weights) != len(uses):
            raise PlotError(f"use_values has {len(weights)} entries, the network has {len(uses)} weight uses")
    cmap = matplotlib.colormaps["coolwarm" if signed else "viridis"]
    scale = float(torch.tensor(weights).abs().quantile(0.98)) if weights else 1.0
    scale = scale if scale > 0 else 1.0
    norm = Normalize(-scale, scale) if signed else Normalize(0.0, scale)
    if fixed:
        # edges that skip columns (residual branches) as arcs, so they do not run through other blocks
        near = [e for e in fixed if pos[e[1]][0] - pos[e[0]][0] <= 1]
        skip = [e for e in fixed if pos[e[1]][0] - pos[e[0]][0] > 1]
        nx.draw_networkx_edges(G, pos, edgelist=near, ax=ax, arrows=False, edge_color="#bdbdbd",
                               width=0.6, alpha=0.8)
        if skip:
            nx.draw_networkx_edges(G, pos, edgelist=skip, ax=ax, arrows=True, arrowstyle="-",
                                   connectionstyle="arc3,rad=-0.12", edge_color="#9e9e9e", width=0.6,
                                   alpha=0.8, node_size=0)
    if uses:
        order = sorted(range(len(uses)), key=lambda k: abs(weights[k]))  # strongest drawn last, on top
        w_sorted = [weights[k] for k in order]
        widths = [0.25 + 1.5 * min(abs(w) / scale, 1.0) for w in w_sorted]
        nx.draw_networkx_edges(G, pos, edgelist=[uses[k] for k in order], ax=ax, arrows=False,
                               edge_color=w_sorted, edge_cmap=cmap, edge_vmin=norm.vmin, edge_vmax=scale,
                               width=widths, alpha=0.75)
    colours = []
    for layer in net.layers:
        colours += [_KIND_COLOURS.get(layer.kind, "#333333")] * layer.size
    nx.draw_networkx_nodes(G, pos, nodelist=list(range(net.num_neurons)), node_color=colours,
                           node_size=node_size, edgecolors="black", linewidths=0.3, ax=ax)

    top = max(y for _, y in pos.values())
    for layer in net.layers:
        shape = "x".join(map(str, layer.shape))
        act = "" if layer.activation.is_identity else f"\n{layer.activation}"
        ax.text(layer.index, 1.0, f"{layer.name}\n{layer.kind} {shape}{act}", ha="center", va="bottom",
                fontsize=7, transform=ax.get_xaxis_transform())
    ax.set_xlim(-0.6, n_cols - 0.4)
    ax.set_ylim(-top - 0.04, top + 0.04)
    ax.set_axis_off()

    label = "weight (clipped at 98th pct |w|)" if signed else (value_label or "value")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, label=label)
    kinds = [k for k in _KIND_COLOURS if any(layer.kind == k for layer in net.layers)]
    handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor=_KIND_COLOURS[k],
                      markeredgecolor="black", markeredgewidth=0.3, label=k) for k in kinds]
    if signed:
        handles.append(Line2D([], [], color=cmap(0.95), label="weight use, w > 0"))
        handles.append(Line2D([], [], color=cmap(0.05), label="weight use, w < 0"))
    else:
        handles.append(Line2D([], [], color=cmap(0.9), label=f"weight use, coloured by {value_label or 'value'}"))
    if fixed:
        handles.append(Line2D([], [], color="#bdbdbd", label="fixed edge (pool/residual/scale)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.005), ncol=min(len(handles), 6),
              fontsize=7, frameon=False)
    head = f"{title}: " if title else ""
    fig.suptitle(f"{head}{net.num_neurons} neurons, {net.num_params} params, {len(uses)} weight uses "
                 f"(biases not drawn)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path
