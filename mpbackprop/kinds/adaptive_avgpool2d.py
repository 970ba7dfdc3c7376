"""``AdaptiveAvgPool2d`` and global average pooling (``x.mean((2, 3))``): fixed edges from each element of
an adaptive window to its output, coefficient 1/(window area); the dense path is the pooling's gradient."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError
from .base import BlockGrad, BlockInput, FixedKind, ForwardContext, LayerEdges
from .windows import as_maps, from_maps

__all__ = ["AdaptiveAvgPool2d"]


def _bounds(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive windows: ``[⌊k·size/out⌋, ⌈(k+1)·size/out⌉)``."""
    return [((k * size) // out, -(-((k + 1) * size) // out)) for k in range(out)]


def _output_size(builder: Any, node: Any, mod: Any, shape: tuple[int, ...]) -> tuple[tuple[int, int], bool]:
    """``((H_out, W_out), global mean form)`` of the traced pooling ``node``."""
    _, h, w = shape
    if node.op == "call_module" or node.target is F.adaptive_avg_pool2d:
        size = mod.output_size if mod is not None else (node.args[1] if len(node.args) > 1 else
                                                         node.kwargs.get("output_size"))
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return (h if hw[0] is None else int(hw[0]), w if hw[1] is None else int(hw[1])), False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if node.kwargs.get("dtype") is not None:
        raise builder._refuse(node, "mean with a dtype")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if sorted(d % 4 for d in dims) != [2, 3]:
        raise builder._refuse(node, "a mean over other axes than the two spatial ones of a (C, H, W) map")
    return (1, 1), True


class AdaptiveAvgPool2d(FixedKind):
    """``nn.AdaptiveAvgPool2d``, ``F.adaptive_avg_pool2d``, and ``x.mean((2, 3))`` / ``torch.mean`` over the
    spatial axes (global average pooling, with or without ``keepdim``)."""

    name = "adaptive_avgpool2d"
    id = 10
    colour = "#e1812c"
    modules = (nn.AdaptiveAvgPool2d,)
    functions = (F.adaptive_avg_pool2d, torch.mean)
    methods = ("mean",)
    supported = "AdaptiveAvgPool2d, global average pooling (mean over H, W)"
    spatial = True

    def trace(self, builder: Any, node: Any, mod: Any) -> Any:
        ref = builder._ref(node, node.args[0])
        if len(ref.shape) != 3:
            raise ShapeError(f"{builder.where(node)} expects input of shape (C, H, W), gets {ref.shape}")
        c, h, w = ref.shape
        (ho, wo), _ = _output_size(builder, node, mod, ref.shape)
        src, dst, coef = [], [], []
        for oi, (r0, r1) in enumerate(_bounds(h, ho)):
            for oj, (c0, c1) in enumerate(_bounds(w, wo)):
                rows, cols = torch.meshgrid(torch.arange(r0, r1), torch.arange(c0, c1), indexing="ij")
                taps = (rows * w + cols).reshape(-1)
                for ch in range(c):
                    src.append(ch * h * w + taps)
                    dst.append(torch.full_like(taps, ch * ho * wo + oi * wo + oj))
                    coef.append(torch.full(taps.shape, 1.0 / taps.numel(), dtype=torch.float64))
        edges = LayerEdges(src=torch.cat(src), dst=torch.cat(dst), coef=torch.cat(coef))
        name = str(node.target) if node.op == "call_module" else node.name
        return builder._new_block(node, self.name, [ref], edges, {"output_size": [ho, wo]}, name=name)

    def estimate(self, node: Any, mod: Any, size: int, inputs: int) -> tuple[int, int, int]:
        value = node.args[0].meta.get("value") if node.args else None
        per_sample = math.prod(value.shape[1:]) if isinstance(value, Tensor) else size
        return 0, 0, 4 * per_sample  # each input element in at most 2×2 overlapping windows

    def forward(self, layer: Any, inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        return F.adaptive_avg_pool2d(inputs[0], layer.config["output_size"])

    def dense(self, inp: BlockInput) -> BlockGrad:
        """The pooling's input gradient, every state channel alike."""
        layer, b, batch = inp.layer, inp.b, inp.batch
        c, h, w = layer.input_shapes[0]
        ho, wo = layer.config["output_size"]
        d = b.shape[1]
        grad = as_maps(b, (c, ho, wo), batch)
        m = torch.ops.aten._adaptive_avg_pool2d_backward(grad, b.new_zeros(()).expand(d * batch, c, h, w))
        return BlockGrad(messages=from_maps(m, d, batch))
