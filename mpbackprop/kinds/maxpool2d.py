"""``MaxPool2d``: fixed edges from each window element to its output, gated per sample.

The block's edges are its windows (input element → output, padding taps left out), like average
pooling's. What flows on them depends on the sample: in sample ``s`` only the edge from the window's
argmax carries anything, ``z_j = a_{i*(j,s)}``. So the backward message on edge ``i → j`` is
``g_{ij,s}·b_{j,s}`` with the gate ``g = 1`` on that argmax edge and 0 elsewhere — a per-sample
coefficient on a fixed edge, taken from ``torch``'s own argmax so that ties break as autograd's do.
Rules do not choose the gates: a learned or feedback-alignment rule sees at these neurons only
``b = R.node(M, …)``, as at any parameter-free block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._quiet import ops
from .base import BlockGrad, BlockInput, FixedKind, ForwardContext, LayerEdges
from .windows import as_maps, from_maps, pair, pooling_windows

__all__ = ["MaxPool2d"]

_FUNC_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_FUNC_DEFAULTS = (None, None, 0, 1, False, False)


def _args(node: Any, mod: Any) -> tuple[Any, ...]:
    if mod is not None:
        return tuple(getattr(mod, a) for a in _FUNC_ARGS)
    return tuple(node.args[i + 1] if len(node.args) > i + 1 else node.kwargs.get(a, d)
                 for i, (a, d) in enumerate(zip(_FUNC_ARGS, _FUNC_DEFAULTS)))


class MaxPool2d(FixedKind):
    """``nn.MaxPool2d`` / ``F.max_pool2d`` (``ceil_mode=False``, ``return_indices=False``)."""

    name = "maxpool2d"
    id = 7
    colour = "#c44e52"
    modules = (nn.MaxPool2d,)
    functions = (F.max_pool2d,)
    supported = "MaxPool2d"
    spatial = True

    def trace(self, builder: Any, node: Any, mod: Any) -> Any:
        kernel, stride, padding, dilation, ceil_mode, return_indices = _args(node, mod)
        ref = builder._ref(node, node.args[0])
        if return_indices:
            raise builder._refuse(node, "return_indices=True; the indices are not a tensor of the network")
        k, s, p, d, _, keep, src, dst = pooling_windows(builder, node, ref, kernel, stride, padding, ceil_mode, dilation)
        edges = LayerEdges(src=src, dst=dst, coef=torch.ones(int(keep.sum()), dtype=torch.float64))
        config = {"kernel": list(k), "stride": list(s), "padding": list(p), "dilation": list(d)}
        name = str(node.target) if node.op == "call_module" else node.name
        return builder._new_block(node, self.name, [ref], edges, config, name=name)

    def estimate(self, node: Any, mod: Any, size: int, inputs: int) -> tuple[int, int, int]:
        kh, kw = pair(_args(node, mod)[0] or 1)
        return 0, 0, size * kh * kw

    @staticmethod
    def _pool(layer: Any, x: Tensor, indices: bool = False) -> Any:
        cfg = layer.config
        return F.max_pool2d(x, cfg["kernel"], cfg["stride"], cfg["padding"], cfg["dilation"], False, indices)

    def forward(self, layer: Any, inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        return self._pool(layer, inputs[0])

    def forward_graph(self, layer: Any, view: Any, a_src: Tensor, theta: Tensor) -> Tensor:
        return ops.copy_u_max(view.fwd, a_src.contiguous())  # the max over each window's edges

    def _argmax(self, inp: BlockInput) -> Tensor:
        """``(B, C, H_out, W_out)``: per sample and output, the argmax's flat index in its channel."""
        c, h, w = inp.layer.input_shapes[0]
        x = inp.a_src.t().reshape(inp.batch, c, h, w)
        return self._pool(inp.layer, x, indices=True)[1]

    def edge_coef(self, inp: BlockInput) -> Tensor:
        """The gates ``(E, 1, B)``: 1 where the edge's source is its window's argmax in that sample."""
        _, h, w = inp.layer.input_shapes[0]
        src, dst = inp.view.fwd.edges(order="eid")
        winner = self._argmax(inp).reshape(inp.batch, -1)[:, dst].t()  # (E, B)
        return (winner == (src % (h * w)).unsqueeze(1)).to(inp.b.dtype).unsqueeze(1)

    def dense(self, inp: BlockInput) -> BlockGrad:
        """The pooling's input gradient (``max_pool2d_with_indices_backward``), every state channel alike."""
        layer, b, batch = inp.layer, inp.b, inp.batch
        cfg = layer.config
        c, h, w = layer.input_shapes[0]
        d = b.shape[1]
        idx = self._argmax(inp)
        grad = as_maps(b, layer.shape, batch)
        x = inp.a_src.t().reshape(batch, c, h, w)
        m = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x.repeat(d, 1, 1, 1), cfg["kernel"], cfg["stride"], cfg["padding"], cfg["dilation"], False,
            idx.repeat(d, 1, 1, 1))
        return BlockGrad(messages=from_maps(m, d, batch))
