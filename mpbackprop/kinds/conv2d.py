"""``Conv2d`` (groups=1, zero padding): a use per kernel tap and output position not in the padding, so
weight sharing is exact; its dense path is the convolution's weight and input gradients."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError
from .base import SCALAR, BlockGrad, BlockInput, ForwardContext, LayerEdges, WeightedKind
from .windows import unfold_hw

__all__ = ["Conv2d"]


class Conv2d(WeightedKind):
    """``nn.Conv2d``; uses come from unfolding a map of input indices (padding taps dropped)."""

    name = "conv2d"
    id = 2
    colour = "#55a868"
    modules = (nn.Conv2d,)
    supported = "Conv2d (groups=1, zero padding)"
    spatial = True

    def trace(self, builder: Any, node: Any, mod: nn.Conv2d) -> Any:
        ref = builder._ref(node, node.args[0])
        if mod.groups != 1:
            raise builder._refuse(node, f"groups={mod.groups}; only groups=1")
        if mod.padding_mode != "zeros":
            raise builder._refuse(node, f"padding_mode={mod.padding_mode!r}; only 'zeros'")
        if len(ref.shape) != 3 or ref.shape[0] != mod.in_channels:
            raise ShapeError(f"{builder.where(node)} expects input of shape ({mod.in_channels}, H, W), gets {ref.shape}")
        pad = [int(p) for p in mod._reversed_padding_repeated_twice]  # (left, right, top, bottom)
        c_in, h, w = ref.shape
        kh, kw = mod.kernel_size
        idx = torch.arange(1, c_in * h * w + 1, dtype=torch.float64).reshape(1, c_in, h, w)
        cols = F.unfold(F.pad(idx, pad), (kh, kw), dilation=mod.dilation, stride=mod.stride)[0].long()
        rows_k, locs = cols.shape  # rows_k = c_in*kh*kw, locs = H_out*W_out
        c_out = mod.out_channels
        o, rk, lc = torch.meshgrid(torch.arange(c_out), torch.arange(rows_k), torch.arange(locs), indexing="ij")
        src = cols[rk, lc]
        keep = src > 0  # zero padding contributes nothing: no use
        edges = LayerEdges(
            src=(src - 1)[keep],
            dst=(o * locs + lc)[keep],
            param=(o * rows_k + rk)[keep],
        )
        if mod.bias is not None:
            ob, lb = torch.meshgrid(torch.arange(c_out), torch.arange(locs), indexing="ij")
            edges.bias_dst = (ob * locs + lb).reshape(-1)
            edges.bias_param = ob.reshape(-1)
        config = {"stride": list(mod.stride), "dilation": list(mod.dilation), "pad": pad}
        out = builder._new_block(node, self.name, [ref], edges, config, module=mod, name=str(node.target))
        expect = (c_out, *unfold_hw(h, w, pad, (kh, kw), mod.stride, mod.dilation))
        assert builder.layers[out.block].shape == expect, (builder.layers[out.block].shape, expect)
        return out

    def estimate(self, node: Any, mod: nn.Conv2d, size: int, inputs: int) -> tuple[int, int, int]:
        import math

        return size * math.prod(mod.weight.shape[1:]), size if mod.bias is not None else 0, 0

    def forward(self, layer: Any, inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        cfg = layer.config
        return F.conv2d(F.pad(inputs[0], cfg["pad"]), w, b, stride=cfg["stride"], dilation=cfg["dilation"])

    def accepts_dense(self, inp: BlockInput) -> bool:
        """One state channel, one source, and a scalar coefficient per weight (or no messages)."""
        return (super().accepts_dense(inp) and inp.b.shape[1] == 1 and len(inp.view.sources) == 1
                and (inp.coef is None or inp.coef.form == SCALAR))

    def dense(self, inp: BlockInput) -> BlockGrad:
        """A convolution's uses are its kernel applications, so ``Σ_uses a_i b_j`` is the weight gradient
        of a convolution with output gradient ``b`` and ``Σ_k C_p b_j`` its input gradient with kernel
        ``C`` (on the padded input, then cropped): the same sums as the DGL path."""
        layer, b, batch = inp.layer, inp.b, inp.batch
        cfg = layer.config
        c_in, h, w = layer.input_shapes[0]
        c_out, h_out, w_out = layer.shape
        shape = layer.weight.shape
        left, right, top, bottom = cfg["pad"]
        grad = b.view(c_out, h_out, w_out, batch).permute(3, 0, 1, 2)  # (B, C_out, H_out, W_out)
        a = torch.nn.functional.pad(inp.a_src.t().reshape(batch, c_in, h, w), cfg["pad"])
        g_w = torch.nn.grad.conv2d_weight(a, shape, grad, stride=cfg["stride"], dilation=cfg["dilation"])
        g_b = grad.sum((0, 2, 3)).view(-1, 1) / batch if layer.bias is not None else None
        msgs = None
        if inp.want_messages and inp.coef is not None:
            m = torch.nn.grad.conv2d_input(a.shape, inp.coef.value.view(shape), grad, stride=cfg["stride"],
                                           dilation=cfg["dilation"])
            m = m[:, :, top:m.shape[2] - bottom, left:m.shape[3] - right]
            msgs = m.reshape(batch, c_in * h * w).t().unsqueeze(1)
        return BlockGrad(g_w.reshape(-1, 1) / batch, g_b, msgs)
