"""``Linear``: every weight used once per row, ``z = a·Wᵀ + b``; its dense path is a matrix product."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError
from .base import FULL, SCALAR, BlockGrad, BlockInput, ForwardContext, LayerEdges, WeightedKind

__all__ = ["Linear"]


class Linear(WeightedKind):
    """``nn.Linear``. Uses ``(r·n_in + i, o·n_in + i, r·n_out + o)`` over leading rows ``r``."""

    name = "linear"
    id = 1
    colour = "#4c72b0"
    modules = (nn.Linear,)
    supported = "Linear"

    def trace(self, builder: Any, node: Any, mod: nn.Linear) -> Any:
        ref = builder._ref(node, node.args[0])
        if not ref.shape or ref.shape[-1] != mod.in_features:
            raise ShapeError(f"{builder.where(node)} expects {mod.in_features} input features, gets shape {ref.shape}")
        n_in, n_out = mod.in_features, mod.out_features
        rows = math.prod(ref.shape[:-1])
        r, o, i = torch.meshgrid(torch.arange(rows), torch.arange(n_out), torch.arange(n_in), indexing="ij")
        edges = LayerEdges(
            src=(r * n_in + i).reshape(-1),
            dst=(r * n_out + o).reshape(-1),
            param=(o * n_in + i).reshape(-1),
        )
        if mod.bias is not None:
            rb, ob = torch.meshgrid(torch.arange(rows), torch.arange(n_out), indexing="ij")
            edges.bias_dst = (rb * n_out + ob).reshape(-1)
            edges.bias_param = ob.reshape(-1)
        return builder._new_block(node, self.name, [ref], edges, {}, module=mod, name=str(node.target))

    def estimate(self, node: Any, mod: nn.Linear, size: int, inputs: int) -> tuple[int, int, int]:
        return size * mod.in_features, size if mod.bias is not None else 0, 0

    def forward(self, layer: Any, inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        return F.linear(inputs[0], w, b)

    def dense(self, inp: BlockInput) -> BlockGrad:
        """The same sums as the DGL path, as dense contractions.

        A Linear layer's uses are all ``(r·n_in + i, o·n_in + i, r·n_out + o)``, so
        ``Σ_uses a_i b_j`` is a matrix product and ``Σ_k C_p b_j`` is ``Cᵀ b`` per channel.
        """
        layer, b, a_src, batch = inp.layer, inp.b, inp.a_src, inp.batch
        coef = inp.coef.value if inp.coef is not None else None
        form = inp.coef.form if inp.coef is not None else None
        want_messages = inp.want_messages
        n_out, n_in = layer.weight.shape
        d = b.shape[1]
        rows = b.shape[0] // n_out
        if rows == 1:  # the usual case: plain matrix products on the stored layouts, no permuting copies
            b2 = b.view(n_out * d, batch)  # (out·d, B)
            a2 = a_src.t()  # (B, in): a_src is a transposed view of the (B, in) record
            g = b2 @ a2 / batch  # (out·d, in)
            g_w = (g if d == 1 else g.view(n_out, d, n_in).transpose(1, 2)).reshape(-1, d)
            g_b = b2.sum(1).view(n_out, d) / batch if layer.bias is not None else None
            msgs = None
            if want_messages and coef is not None:
                if form == SCALAR:  # (in, out) @ (out, d·B)
                    msgs = coef.view(n_out, n_in).t() @ b.view(n_out, d * batch)
                elif form != FULL:
                    msgs = torch.einsum("oic,ocb->icb", coef.view(n_out, n_in, d), b)
                else:  # one GEMM: (in·d, out·d) @ (out·d, B)
                    msgs = coef.view(n_out, n_in, d, d).permute(1, 2, 0, 3).reshape(n_in * d, n_out * d) @ b2
                msgs = msgs.reshape(n_in, d, batch)
            return BlockGrad(g_w, g_b, msgs)
        bb = b.view(rows, n_out, d, batch)  # (rows, out, d, B)
        aa = a_src.reshape(-1, n_in, batch)  # (rows, in, B)
        g_w = torch.einsum("rib,rocb->oic", aa, bb).reshape(-1, d) / batch
        g_b = bb.sum((0, 3)) / batch if layer.bias is not None else None
        msgs = None
        if want_messages and coef is not None:
            if form == SCALAR:
                msgs = torch.einsum("oi,rocb->ricb", coef.view(n_out, n_in), bb)
            elif form != FULL:
                msgs = torch.einsum("oic,rocb->ricb", coef.view(n_out, n_in, d), bb)
            else:  # one GEMM: (in·d, out·d) @ (out·d, rows·B)
                c2 = coef.view(n_out, n_in, d, d).permute(1, 2, 0, 3).reshape(n_in * d, n_out * d)
                b2 = bb.permute(1, 2, 0, 3).reshape(n_out * d, rows * batch)
                msgs = (c2 @ b2).view(n_in, d, rows, batch).permute(2, 0, 1, 3)
            msgs = msgs.reshape(-1, d, batch)
        return BlockGrad(g_w, g_b, msgs)
