"""``AvgPool2d``: fixed edges from each window element to its output, coefficient 1/divisor; the dense
path is the pooling's input gradient."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import BlockGrad, BlockInput, FixedKind, ForwardContext, LayerEdges
from .windows import as_maps, from_maps, pair, pooling_windows

__all__ = ["AvgPool2d"]


def _arg(node: Any, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class AvgPool2d(FixedKind):
    """``nn.AvgPool2d`` / ``F.avg_pool2d`` (``ceil_mode=False``)."""

    name = "avgpool2d"
    id = 3
    colour = "#c9a227"
    modules = (nn.AvgPool2d,)
    functions = (F.avg_pool2d,)
    supported = "AvgPool2d"
    spatial = True

    def trace(self, builder: Any, node: Any, mod: Any) -> Any:
        if mod is not None:
            args = (mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                    mod.divisor_override)
        else:
            args = (_arg(node, 1, "kernel_size", None), _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0),
                    _arg(node, 4, "ceil_mode", False), _arg(node, 5, "count_include_pad", True),
                    _arg(node, 6, "divisor_override", None))
        kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = args
        ref = builder._ref(node, node.args[0])
        (kh, kw), (sh, sw), (ph, pw), _, cols, keep, src, dst = pooling_windows(builder, node, ref, kernel, stride,
                                                                               padding, ceil_mode)
        if divisor_override:
            div = torch.full(cols.shape, float(divisor_override), dtype=torch.float64)
        elif count_include_pad:
            div = torch.full(cols.shape, float(kh * kw), dtype=torch.float64)
        else:
            div = keep.sum(1, keepdim=True).to(torch.float64).expand(cols.shape)
        edges = LayerEdges(src=src, dst=dst, coef=(1.0 / div)[keep])
        config = {
            "kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw],
            "count_include_pad": bool(count_include_pad), "divisor_override": divisor_override or None,
        }
        name = str(node.target) if node.op == "call_module" else node.name
        return builder._new_block(node, self.name, [ref], edges, config, name=name)

    def estimate(self, node: Any, mod: Any, size: int, inputs: int) -> tuple[int, int, int]:
        if mod is not None:
            kernel = mod.kernel_size
        else:
            kernel = _arg(node, 1, "kernel_size", 1)
        kh, kw = pair(kernel)
        return 0, 0, size * max(inputs, 1) * kh * kw

    def forward(self, layer: Any, inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        cfg = layer.config
        return F.avg_pool2d(inputs[0], cfg["kernel"], cfg["stride"], cfg["padding"], False,
                            cfg["count_include_pad"], cfg["divisor_override"])

    def accepts_dense(self, inp: BlockInput) -> bool:
        return len(inp.view.sources) == 1

    def dense(self, inp: BlockInput) -> BlockGrad:
        """The fixed messages are the pooling's input gradient (every state channel alike)."""
        layer, b, batch = inp.layer, inp.b, inp.batch
        cfg = layer.config
        c, h, w = layer.input_shapes[0]
        d = b.shape[1]
        grad = as_maps(b, layer.shape, batch)
        m = torch.ops.aten.avg_pool2d_backward(grad, b.new_zeros(()).expand(d * batch, c, h, w), cfg["kernel"],
                                               cfg["stride"], cfg["padding"], False, cfg["count_include_pad"],
                                               cfg["divisor_override"])
        return BlockGrad(messages=from_maps(m, d, batch))
